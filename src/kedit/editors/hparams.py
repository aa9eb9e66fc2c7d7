"""Editor hyperparameters: one dataclass per kind of editor, loaded from versioned per-model YAML files.

``src/kedit/hparams/<model-slug>.yaml`` holds a ``defaults`` block shared by every method and one
block per method (``rome``, ``memit``, ``alphaedit``, ``tpatcher``, ``memoir``) that overrides it; any
block may carry ``why:`` notes (kept in ``notes``, never hashed). Lookup order: an explicit file, then
the store model's own ``models/<slug>/hparams.yaml`` (written by ``kedit calibrate``), then
``<slug>.yaml``, then ``<model_type>.yaml``, then ``default.yaml`` (layers chosen relative to depth).

The classes nest: :class:`EditHparams` (layers, prompt contexts) <- :class:`VStarHparams` (the v*
optimisation every editor that writes v* shares) <- :class:`WeightEditHparams` (ROME / MEMIT /
AlphaEdit solves) and :class:`MemoirHparams`; :class:`TPatcherHparams` adds its patch training to
the base. Each class checks its own values when built (loaded or constructed), and an error names
the method, the key and the value. ``EditHparams(method=..., **values)`` builds the class of that
method, so code written against the single flat class keeps working.

:meth:`EditHparams.digest` hashes the resolved values, not a file's bytes: a changed note leaves it
as it was, a changed value (in the file, an override or a default) changes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml

from kedit.atomic import sha256_json
from kedit.editors.precision import V_DTYPES

# fields that record where values came from, not values: never set in a file, never hashed
_PROVENANCE = ("method", "source", "source_sha256", "notes")


def _positive(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0


@dataclass
class EditHparams:
    """Settings every editor reads: the edited layers and the random-prefix prompt contexts.

    ``EditHparams(**values)`` builds the class of ``values["method"]`` (default ``alphaedit``)."""

    method: str = "alphaedit"
    layers: list[int] | str = "auto"  # edited MLP output matrices; "auto" = ~15%-30% of depth, "late" = ~80%
    # random prefixes (generated once per model by the model itself)
    n_prefixes: int = 5
    prefix_len: int = 10
    prefix_seed: int = 0
    source: str = ""  # file the values came from
    source_sha256: str = ""  # sha256 of that file's bytes (provenance; the refresh key uses digest())
    notes: dict[str, str] = field(default_factory=dict)

    # string-valued settings of this class and what each accepts (subclasses extend)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is EditHparams:  # the compatible entry point: the method's own class
            cls = hparams_type(kwargs.get("method", "alphaedit"))
        return object.__new__(cls)

    def __post_init__(self) -> None:
        if self.method not in HPARAMS_TYPES:
            raise ValueError(f"unknown edit method {self.method!r}; choose one of {METHODS}")
        if not isinstance(self, HPARAMS_TYPES[self.method]):
            raise ValueError(f"{type(self).__name__} holds no {self.method} settings; "
                             f"use {HPARAMS_TYPES[self.method].__name__}")
        for k, allowed in self.CHOICES.items():
            v = getattr(self, k)
            if v not in allowed:
                self._bad(k, f"must be {', '.join(allowed[:-1])} or {allowed[-1]}")
        for k in ("n_prefixes", "prefix_len", "prefix_seed"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                self._bad(k, "must be an integer >= 0")
        self.check()

    def check(self) -> None:
        """The class's own checks beyond ``CHOICES`` (raise through :meth:`_bad`)."""

    def _bad(self, key: str, what: str, value: Any = dataclasses.MISSING) -> None:
        v = getattr(self, key) if value is dataclasses.MISSING else value
        raise ValueError(f"hparams ({self.source or 'inline'}): {key} {what}, not {v!r} (method {self.method})")

    def resolve_layers(self, num_layers: int) -> list[int]:
        if self.layers == "auto":
            lo = max(0, round(0.15 * num_layers))
            hi = max(lo, min(num_layers - 2, round(0.3 * num_layers)))
            return list(range(lo, hi + 1))
        if self.layers == "late":  # one layer at ~80% of depth, below the last block (T-Patcher)
            return [max(0, min(num_layers - 2, round(0.8 * num_layers)))]
        layers = sorted(int(x) for x in self.layers)  # type: ignore[union-attr]
        bad = [x for x in layers if not 0 <= x < num_layers]
        if bad or not layers:
            raise ValueError(f"hparams ({self.source or 'inline'}): edit layers {self.layers} invalid for a "
                             f"{num_layers}-layer model (method {self.method})")
        return layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def values(self) -> dict[str, Any]:
        """The settings that decide what the editor does: every field but the provenance (source,
        its sha256, notes); ``method`` included."""
        return {k: v for k, v in self.to_dict().items() if k not in _PROVENANCE[1:]}

    def digest(self) -> str:
        """sha256 of :meth:`values`: equal settings hash equal, wherever they were written and
        whatever notes they carry."""
        return sha256_json(self.values())


@dataclass
class VStarHparams(EditHparams):
    """The v* optimisation (a delta on the residual stream at the last edit layer, at the subject's
    last token), shared by every editor that writes v*."""

    v_lr: float = 0.5
    v_steps: int = 25
    v_weight_decay: float = 0.5  # times ‖δ‖² / ‖v₀‖²
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75  # ‖δ‖ <= factor · ‖v₀‖
    v_stop_nll: float = 0.05  # per-request early stop: mean target NLL below this
    # "nll": stop at v_stop_nll; "most_probable" (ENCORE's MPES): also stop as soon as every target
    # token is the top prediction in every context, before v* overfits (a smaller δ, a smaller update)
    v_stop: str = "nll"
    v_prefix_cache: bool = True  # replay only the tokens from the subject on (pre-subject K/V cached)
    # matmul precision of v*'s replayed blocks and unembedding ("bfloat16": autocast, δ, the residual
    # stream, norms, softmax and Adam stay float32); the prefix cache and v₀ are float32 either way.
    # "auto": bfloat16 where the device has bfloat16 matrix units, else float32 (editors/precision.py)
    v_dtype: str = "float32"
    # v* replays rows grouped by suffix length; the next length joins a group when the pad tokens that
    # adds (rows so far x length gap) are at most this many (causal attention: a right pad never
    # changes a real position). It is a group's fixed cost per Adam step, counted in replayed tokens:
    # 0 = one group per length (no padded compute), large = one group (fewest kernel launches: GPUs)
    v_replay_merge_tokens: int = 0

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"v_stop": ("nll", "most_probable"), "v_dtype": V_DTYPES}

    def check(self) -> None:
        super().check()
        m = self.v_replay_merge_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            self._bad("v_replay_merge_tokens", "must be an integer >= 0 (pad tokens a merge of replay groups "
                      "may add)")


@dataclass
class WeightEditHparams(VStarHparams):
    """ROME, MEMIT and AlphaEdit: v* written into the edited layers' weights by a least-squares solve."""

    # keys: "average" (r-ROME: one prefix-averaged key per request) or "contexts" (MEMIT/AlphaEdit only:
    # each prompt context's own key, weighted 1/n_contexts, asked to carry the same δ that v* put in
    # every context, so a context whose key is far from the average, e.g. the bare prompt, is written too)
    key_mode: str = "average"
    # solves
    mom2_update_weight: float = 1600.0  # MEMIT λ (scales with the key dimension)
    memit_sequential: bool = False  # MEMIT: also protect earlier batches' keys (RECT-free "memit_seq")
    L2: float = 10.0  # AlphaEdit ridge term
    nullspace_threshold: float = 0.5
    nullspace_mode: str = "relative_mean"  # "absolute" | "relative_mean" | "relative_max" | "energy"
    nullspace_mom2_weight: float = 0.0  # AlphaEdit: MEMIT's λ·C term kept inside the null space (0 = paper)
    cache_dtype: str = "float32"  # dtype of Σ K_p K_pᵀ kept in the editor state
    # norm-anchored v* (NAS; MEMIT/AlphaEdit only, editors/norm_anchor.py): rescale each request's MLP
    # output target at the last edit layer to the base model's mean norm; skip requests above
    # v_norm_skip_factor times that mean (reported in the diagnostics and layer_info)
    v_norm_anchor: bool = False
    v_norm_skip_factor: float = 2.0

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        **VStarHparams.CHOICES, "key_mode": ("average", "contexts"),
        "nullspace_mode": ("absolute", "relative_mean", "relative_max", "energy")}

    def check(self) -> None:
        super().check()
        if not isinstance(self.v_norm_anchor, bool):
            self._bad("v_norm_anchor", "must be true or false")
        if self.v_norm_anchor and self.method == "rome":
            self._bad("v_norm_anchor", "applies to memit and alphaedit, not rome")
        f = self.v_norm_skip_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f >= 1.0 or f == float("inf"):
            self._bad("v_norm_skip_factor", "must be a finite number >= 1 (a request is skipped above factor x "
                      "the anchor norm)")


@dataclass
class TPatcherHparams(EditHparams):
    """T-Patcher: one patch neuron per fact on ``layers: [L]``'s MLP (see editors/tpatcher.py)."""

    method: str = "tpatcher"
    tp_steps: int = 40  # Adam steps of a batch's patch training (per-patch early stop)
    tp_lr: float = 0.1  # Adam learning rate of the patch values
    tp_key_lr: float = 0.01  # Adam learning rate of the patch keys and biases
    tp_act_margin: float = 1.0  # pre-activation a patch must reach on its own edit's inputs
    tp_memory_margin: float = 1.0  # pre-activation every patch must stay below, negated, on the memory set
    tp_memory_weight: float = 1.0  # weight of the activation and memory losses against the edit loss
    tp_stop_nll: float = 0.05  # a patch stops training once its edit's NLL is below this and both margins hold
    tp_memory_corpus: str = "wiki-summaries-en"  # general text in the memory set ("" = canaries only)
    tp_memory_tokens: int = 4096  # token positions of that text in the memory set

    def check(self) -> None:
        super().check()
        for k in ("tp_steps", "tp_lr", "tp_key_lr", "tp_act_margin", "tp_memory_margin", "tp_stop_nll"):
            if not _positive(getattr(self, k)):
                self._bad(k, "must be positive")
        for k in ("tp_memory_weight", "tp_memory_tokens"):
            if not getattr(self, k) >= 0:
                self._bad(k, "must be >= 0")


@dataclass
class MemoirHparams(VStarHparams):
    """The sparse residual memory beside one down-projection (see docs/editors/memoir-findings.md)."""

    method: str = "memoir"
    mm_layer: int = -1  # block whose down-projection gets the memory; -1: the last of `layers`
    mm_k: int = 64  # columns per fingerprint / written per edit
    mm_threshold: float = 0.5  # least overlap |M_q ∩ M_e| / k at which a token reads entry e
    # each entry also keeps the fingerprint of its own prompt (no prefix) as an exact key, read at a
    # strict overlap: near the start of a text the subject's activation is unlike its prefixed contexts
    mm_exact_key: bool = True
    mm_exact_threshold: float = 0.95
    # span key: an entry whose subject spans several tokens also keeps the fingerprint of the token before
    # the subject's last one, and a token reads it through its mask only if the token before it overlaps
    # that key by mm_span_threshold (so "Adi Shankar" does not read the entry of "Ravi Shankar")
    mm_span_key: bool = True
    mm_span_threshold: float = 0.3
    # how an edit's block is found: "vstar" = the batch's v* (the output change at the subject that makes
    # the model predict the target, as the weight editors compute it) written into the block in closed
    # form (ridge least squares over the prompt contexts); "adam" = Adam on the block itself (MEMOIR's way)
    mm_solver: str = "vstar"
    # what a token that matches entry e reads: "own" = e's block alone (facts never interfere, retraction
    # is exact for every other fact); "shared" = W'[:, M_e], the sum of every block on e's columns (MEMOIR)
    mm_read: str = "own"
    # share of an entry's block that a reading token adds (1: all of it). Below 1 every read writes less:
    # less damage where general text reads an entry, bought with generalization (docs/editors/memoir.md, read shares)
    mm_read_scale: float = 1.0
    # the share a token reading an entry through its exact key adds (the text begins as the edit's own
    # prompt does, up to the subject: the case v* was fitted for); null: the mask reads' share (as the
    # memory grows, general text reaches exact keys too: they soften with the schedule)
    mm_exact_read_scale: float | None = 1.0
    # the mask reads' share as the memory grows: [[entries, share], ...], linear in between, constant past
    # the ends; overrides mm_read_scale. Every entry read on general text adds damage, so a larger memory
    # reads each entry more softly to hold the total (docs/editors/memoir.md, read shares); older facts soften too;
    # [[0, 1.0]] turns a file's schedule off
    mm_read_scale_by_entries: list | None = None
    # "vstar": start each request's Adam from the stored v* of the entries with the same new object (their
    # mean direction at their mean norm; kept in the state, one d_out-vector per entry); a new object, or
    # off, starts from 0
    mm_warm_start: bool = False
    mm_ridge: float = 0.01  # "vstar": ridge of the closed form, times the mean squared norm of the masked inputs
    mm_lr: float = 0.1  # Adam on each edit's block
    mm_steps: int = 40
    mm_stop_nll: float = 0.05  # per-edit early stop (mean target NLL)
    mm_bg_docs: int = 200  # documents of the statistics corpus for the background mean
    mm_perm_seed: int = 0  # seed of the fixed column permutation

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        **VStarHparams.CHOICES, "mm_solver": ("vstar", "adam"), "mm_read": ("own", "shared")}

    def check(self) -> None:
        super().check()
        if not 0.0 < self.mm_threshold <= 1.0:
            self._bad("mm_threshold", "must be in (0, 1]")
        for k in ("mm_k", "mm_lr", "mm_bg_docs"):
            if not _positive(getattr(self, k)):
                self._bad(k, "must be positive")
        if not self.mm_steps >= 1:
            self._bad("mm_steps", "must be >= 1")
        if not self.mm_ridge >= 0:
            self._bad("mm_ridge", "must be >= 0")
        sched = self.mm_read_scale_by_entries
        if sched is not None:
            ok = isinstance(sched, (list, tuple)) and len(sched) > 0 and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], int) and p[0] >= 0
                and isinstance(p[1], (int, float)) and 0.0 < p[1] <= 1.0 for p in sched)
            if not ok or any(a[0] >= b[0] for a, b in zip(sched, sched[1:])):
                self._bad("mm_read_scale_by_entries", "must be [[entries, share], ...] with entries increasing "
                          "and 0 < share <= 1")
        if not (isinstance(self.mm_read_scale, (int, float)) and 0.0 < self.mm_read_scale <= 1.0):
            self._bad("mm_read_scale", "must be in (0, 1]")
        x = self.mm_exact_read_scale
        if x is not None and not (isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 < x <= 1.0):
            self._bad("mm_exact_read_scale", "must be in (0, 1], or null (the mask reads' share)")
        for k in ("mm_warm_start", "mm_span_key", "mm_exact_key"):
            if not isinstance(getattr(self, k), bool):
                self._bad(k, "must be true or false")
        if not 0.0 <= self.mm_span_threshold <= 1.0:
            self._bad("mm_span_threshold", "must be in [0, 1]")
        if not 0.0 < self.mm_exact_threshold <= 1.0:
            self._bad("mm_exact_threshold", "must be in (0, 1]")


# each method's settings class (the editor registry's spec rows name the same classes)
HPARAMS_TYPES: dict[str, type[EditHparams]] = {
    "rome": WeightEditHparams, "memit": WeightEditHparams, "alphaedit": WeightEditHparams,
    "tpatcher": TPatcherHparams, "memoir": MemoirHparams}
METHODS = tuple(HPARAMS_TYPES)


def hparams_type(method: str) -> type[EditHparams]:
    """The settings class of ``method``."""
    if method not in HPARAMS_TYPES:
        raise ValueError(f"unknown edit method {method!r}; choose one of {METHODS}")
    return HPARAMS_TYPES[method]


def fields_of(cls: type[EditHparams]) -> dict[str, str]:
    """A settings class's settable fields and their type names (provenance fields left out)."""
    return {f.name: str(f.type) for f in dataclasses.fields(cls) if f.name not in _PROVENANCE}


# every key some method's block may set
ALL_KEYS = frozenset().union(*(fields_of(c) for c in set(HPARAMS_TYPES.values())))


def for_method(hp: EditHparams, method: str) -> EditHparams:
    """``hp``'s values as ``method``'s settings: the fields both share are kept, the rest are the
    target class's defaults."""
    if hp.method == method:
        return hp
    cls = hparams_type(method)
    keep = set(fields_of(cls)) | {"source", "source_sha256", "notes"}
    return cls(**{k: v for k, v in hp.to_dict().items() if k in keep}, method=method)


def _builtin(name: str) -> Path | None:
    p = resources.files("kedit") / "hparams" / f"{name}.yaml"
    return Path(str(p)) if p.is_file() else None


MODEL_HPARAMS = "hparams.yaml"  # a calibrated file in the model store, beside the model's manifest


def model_store_dir(model: Any) -> Path | None:
    """The store folder of a LoadedModel read from a workspace (None for in-memory models)."""
    path = getattr(model, "path", None)
    if path is None or getattr(getattr(model, "manifest", None), "source", "memory") == "memory":
        return None
    from kedit.models.store import MANIFEST

    return Path(path) if (Path(path) / MANIFEST).is_file() else None


def hparams_file_for(model_slug: str | None, model_type: str | None = None, model_dir: str | Path | None = None
                     ) -> Path:
    """The settings file a model uses: its own calibrated file in the store (``model_dir``, written by
    ``kedit calibrate``), else the package's ``<slug>.yaml``, ``<model_type>.yaml``, ``default.yaml``."""
    if model_dir is not None and (Path(model_dir) / MODEL_HPARAMS).is_file():
        return Path(model_dir) / MODEL_HPARAMS
    for name in (model_slug, model_type, "default"):
        if name:
            p = _builtin(name)
            if p is not None:
                return p
    raise FileNotFoundError("no hparams file found (the package's hparams/default.yaml is missing)")


def _coerce(file: Path, method: str, types: dict[str, str], values: dict[str, Any]) -> dict[str, Any]:
    """YAML reads "1e9" as a string and "5" as an int: numbers become the field's type."""
    out = dict(values)
    for k, v in values.items():
        want = types.get(k)
        if want in ("float", "int") and not isinstance(v, bool) and isinstance(v, (str, int, float)):
            try:
                out[k] = float(v) if want == "float" else int(v)
            except ValueError:
                raise ValueError(f"{file}: hyperparameter {k} must be a number, got {v!r} (method {method})") from None
    return out


def load_hparams(method: str, model: Any = None, path: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> EditHparams:
    """Settings for ``method`` (its :func:`hparams_type`): ``model`` is a LoadedModel, a slug, or None
    (defaults). The ``defaults`` block may hold any method's keys (each method takes its own); the
    method's block and ``overrides`` may hold only the method's keys."""
    cls = hparams_type(method)
    own = fields_of(cls)
    slug = getattr(model, "slug", model if isinstance(model, str) else None)
    model_type = getattr(getattr(model, "adapter", None), "model_type", None)
    file = Path(path) if path else hparams_file_for(slug, model_type, model_store_dir(model))
    if not file.exists():
        raise FileNotFoundError(f"hparams file {file} does not exist")
    raw = file.read_bytes()
    data = yaml.safe_load(raw) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a mapping with 'defaults' and per-method blocks")
    merged: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for block in ("defaults", method):
        section = data.get(block) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{file}: block {block!r} must be a mapping, not {section!r}")
        keys = set(section) - {"why"}
        unknown = keys - ALL_KEYS
        if unknown:
            raise ValueError(f"{file}: block {block!r} has unknown hyperparameters {sorted(unknown)}; "
                             f"known: {sorted(ALL_KEYS)}")
        if block == method and keys - set(own):
            raise ValueError(f"{file}: block {block!r} sets {sorted(keys - set(own))}, which {method} does not "
                             f"read; its hyperparameters: {sorted(own)}")
        merged.update({k: v for k, v in section.items() if k in own})
        if isinstance(section.get("why"), dict):
            notes.update({str(k): str(v) for k, v in section["why"].items()})
    for k, v in (overrides or {}).items():
        if k not in ALL_KEYS:
            raise ValueError(f"unknown hyperparameter override {k!r}={v!r} (method {method}); "
                             f"known: {sorted(own)}")
        if k not in own:
            raise ValueError(f"hyperparameter override {k}={v!r}: {method} does not read {k!r}; "
                             f"its hyperparameters: {sorted(own)}")
        if v is not None:
            merged[k] = v
    merged = _coerce(file, method, own, merged)
    return cls(**{**merged, "method": method, "source": str(file),
                  "source_sha256": hashlib.sha256(raw).hexdigest(), "notes": notes})


def hparams_digest(method: str, model: Any = None, path: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> str | None:
    """:meth:`EditHparams.digest` of what :func:`load_hparams` gives (None where no file is found):
    what a content key should hash, so editing a ``why`` note does not change it."""
    try:
        return load_hparams(method, model, path, overrides).digest()
    except FileNotFoundError:
        return None
