"""Free-generation scores: does an edit show when the model writes on its own?

Teacher-forced scores (ES / PS / NS) only ask whether the new object outranks the old one when both are
fed in; they overstate editing (Yang et al., "The Mirage of Model Editing", ACL 2025, WILD evaluation).
Here the model continues each prompt greedily for ``max_new_tokens`` tokens (no target is fed in) and
the text it wrote is searched for the new object:

- ``gen_efficacy`` / ``gen_generalization``: the share of edit / paraphrase prompts whose continuation
  *begins with* the new object; ``*_contains``: the share whose continuation *contains* it anywhere.
- ``gen_specificity`` / ``gen_specificity_contains``: the share of neighbourhood prompts whose
  continuation does *not* begin with (does not contain) the new object: higher is better, as NS.

Matching (:func:`begins_with`, :func:`contains`): the object as written in the record, case-sensitive,
as a whole word: no letter or digit directly before or after it (``Rome`` does not match ``Romeo``);
leading whitespace of the continuation is dropped for "begins with". The continuation is the decoded
new tokens alone (special tokens skipped).

Generation is batched (:func:`kedit.models.scoring.greedy_tokens`): prompts are sorted by length,
left-padded and generated ``batch_size`` at a time with the KV cache (transformers' ``generate``,
greedy, EOS does not stop it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kedit.models.scoring import greedy_tokens
from kedit.models.store import LoadedModel

FREEGEN_TOKENS = 8  # new tokens per prompt: a CounterFact object is 1-4 tokens, with room to say it later
FREEGEN_BATCH = 32
# the result keys, in report order, with the teacher-forced metric each stands beside
FREEGEN_KEYS = ("gen_efficacy", "gen_efficacy_contains", "gen_generalization", "gen_generalization_contains",
                "gen_specificity", "gen_specificity_contains")
SHORT = {"gen_efficacy": "ES gen", "gen_efficacy_contains": "ES gen ∋", "gen_generalization": "PS gen",
         "gen_generalization_contains": "PS gen ∋", "gen_specificity": "NS gen",
         "gen_specificity_contains": "NS gen ∌"}


def greedy_new_tokens(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = FREEGEN_TOKENS,
                      batch_size: int = FREEGEN_BATCH) -> list[list[int]]:
    """The ``max_new_tokens`` greedy token ids after each prompt (in the prompts' order): the scoring
    primitive :func:`kedit.models.scoring.greedy_tokens` in length-sorted batches (little padding)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"free generation: max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) "
                         "must be at least 1")
    if not prompts:
        return []
    return greedy_tokens(lm, prompts, k=max_new_tokens, batch_size=batch_size, by_length=True).tolist()


def continuations(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = FREEGEN_TOKENS,
                  batch_size: int = FREEGEN_BATCH) -> list[str]:
    """The decoded greedy continuation of each prompt (new tokens only, special tokens skipped)."""
    return [lm.tokenizer.decode(t, skip_special_tokens=True)
            for t in greedy_new_tokens(lm, prompts, max_new_tokens, batch_size)]


def _word_char(c: str) -> bool:
    return c.isalnum()


def begins_with(text: str, obj: str) -> bool:
    """``text`` (leading whitespace dropped) starts with ``obj`` as a whole word."""
    obj = obj.strip()
    t = text.lstrip()
    if not obj or not t.startswith(obj):
        return False
    rest = t[len(obj):]
    return not (rest and _word_char(rest[0]) and _word_char(obj[-1]))


def contains(text: str, obj: str) -> bool:
    """``obj`` occurs in ``text`` as a whole word (no letter or digit directly before or after)."""
    obj = obj.strip()
    if not obj:
        return False
    i = text.find(obj)
    while i >= 0:
        before = text[i - 1] if i > 0 else ""
        after = text[i + len(obj)] if i + len(obj) < len(text) else ""
        if not (before and _word_char(before) and _word_char(obj[0])) and \
                not (after and _word_char(after) and _word_char(obj[-1])):
            return True
        i = text.find(obj, i + 1)
    return False


@dataclass
class FreeGenRecords:
    """Per-record verdicts (lists of bools in record order) and the texts they were read from."""

    edit_begins: list[bool]
    edit_contains: list[bool]
    para_begins: list[bool]
    para_contains: list[bool]
    nbr_begins: list[bool]  # the neighbour's continuation begins with the NEW object (a leak)
    nbr_contains: list[bool]
    texts: list[tuple[str, str, str]]  # (edit, paraphrase, neighbour) continuation of each record


def free_generation_records(lm: LoadedModel, prompts: Sequence[str], paraphrases: Sequence[str],
                            neighbours: Sequence[str], objects: Sequence[str],
                            max_new_tokens: int = FREEGEN_TOKENS, batch_size: int = FREEGEN_BATCH
                            ) -> FreeGenRecords:
    """Greedy continuations of every record's edit, paraphrase and neighbourhood prompt (one batched
    pass over all 3n prompts) and whether each begins with / contains the record's new object."""
    n = len(prompts)
    if not (len(paraphrases) == len(neighbours) == len(objects) == n):
        raise ValueError(f"free generation: {n} prompts, {len(paraphrases)} paraphrases, "
                         f"{len(neighbours)} neighbours, {len(objects)} objects: one of each per record")
    for i, o in enumerate(objects):
        if not isinstance(o, str) or not o.strip():
            raise ValueError(f"free generation: record {i} has an empty new object ({o!r})")
    texts = continuations(lm, [*prompts, *paraphrases, *neighbours], max_new_tokens, batch_size)
    e, p, nb = texts[:n], texts[n: 2 * n], texts[2 * n:]
    return FreeGenRecords(
        edit_begins=[begins_with(t, o) for t, o in zip(e, objects)],
        edit_contains=[contains(t, o) for t, o in zip(e, objects)],
        para_begins=[begins_with(t, o) for t, o in zip(p, objects)],
        para_contains=[contains(t, o) for t, o in zip(p, objects)],
        nbr_begins=[begins_with(t, o) for t, o in zip(nb, objects)],
        nbr_contains=[contains(t, o) for t, o in zip(nb, objects)],
        texts=list(zip(e, p, nb)))


def free_generation_scores(recs: FreeGenRecords | Sequence[FreeGenRecords | dict]) -> dict[str, float]:
    """The six shares of :data:`FREEGEN_KEYS` over one :class:`FreeGenRecords` or several joined (chunks
    of one run, as objects or their ``vars()`` dicts)."""
    parts = [recs] if isinstance(recs, FreeGenRecords) else list(recs)
    if not parts:
        raise ValueError("free generation: no records to score")

    def joined(name: str) -> list[bool]:
        return [x for r in parts for x in (r[name] if isinstance(r, dict) else getattr(r, name))]

    def share(xs: list[bool], negate: bool = False) -> float:
        if not xs:
            raise ValueError("free generation: no records to score")
        return sum((not x) if negate else bool(x) for x in xs) / len(xs)

    return {"gen_efficacy": share(joined("edit_begins")), "gen_efficacy_contains": share(joined("edit_contains")),
            "gen_generalization": share(joined("para_begins")),
            "gen_generalization_contains": share(joined("para_contains")),
            "gen_specificity": share(joined("nbr_begins"), negate=True),
            "gen_specificity_contains": share(joined("nbr_contains"), negate=True)}


def evaluate_free_generation(lm: LoadedModel, prompts: Sequence[str], paraphrases: Sequence[str],
                             neighbours: Sequence[str], objects: Sequence[str],
                             max_new_tokens: int = FREEGEN_TOKENS, batch_size: int = FREEGEN_BATCH) -> dict:
    """The six shares of :data:`FREEGEN_KEYS` for these records."""
    return free_generation_scores(free_generation_records(lm, prompts, paraphrases, neighbours, objects,
                                                          max_new_tokens, batch_size))
