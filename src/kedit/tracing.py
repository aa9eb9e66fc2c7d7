"""ROME-style causal tracing: where in the network does the model recall a fact?

Clean run; corrupted runs that add Gaussian noise to the subject's token embeddings (several
samples); restored runs that copy one clean state back at one (layer, token) -- the whole hidden
state, the MLP output or the attention output, the last two over a window of neighbouring layers.
Indirect effect = P(target | restored) - P(target | corrupted).

Batched: every (restoration, noise sample) pair is one row of a batch; :class:`kedit.hooks.Trace`
adds the noise and patches the clean states by index, so a full trace is a handful of forward
passes rather than thousands.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kedit.atomic import write_json_atomic, write_text_atomic
from kedit.console import save_fig
from kedit.hooks import Trace
from kedit.models.store import LoadedModel

KINDS = ("hidden", "mlp", "attn")
KIND_LABELS = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}
KIND_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
Plan = list[tuple[str, int]]  # (module name, token position) pairs restored together in one run


# --- small pure helpers ----------------------------------------------------------------------------
def module_names(lm: LoadedModel, kind: str) -> list[str]:
    """Per-layer module whose output a restoration of ``kind`` patches."""
    a = lm.adapter
    fn = {"hidden": a.layer_name, "mlp": a.mlp_name, "attn": a.attn_name}.get(kind)
    if fn is None:
        raise ValueError(f"unknown trace kind {kind!r}; choose from {KINDS}")
    return [fn(i) for i in range(a.num_layers)]


def window_layers(layer: int, num_layers: int, window: int) -> list[int]:
    """The ``window`` layers centred on ``layer`` (as ROME: [l - w//2, l + ceil(w/2))), clipped."""
    if window <= 1:
        return [layer]
    lo = max(0, layer - window // 2)
    hi = min(num_layers, layer - (-window // 2))
    return list(range(lo, hi))


def best_block(curve: Sequence[float], size: int) -> list[int]:
    """The contiguous block of ``size`` layers with the largest summed effect (first on ties)."""
    if not curve:
        raise ValueError("best_block: empty curve")
    size = max(1, min(size, len(curve)))
    sums = [sum(curve[i: i + size]) for i in range(len(curve) - size + 1)]
    start = max(range(len(sums)), key=lambda i: (sums[i], -i))
    return list(range(start, start + size))


def subject_token_range(tokenizer, prompt: str, subject: str, char_start: int | None = None) -> tuple[int, int]:
    """Token positions ``[start, end)`` covering ``subject`` in ``prompt`` (tokenized with special tokens)."""
    c0 = prompt.find(subject) if char_start is None else char_start
    if c0 < 0 or prompt[c0: c0 + len(subject)] != subject:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    c1 = c0 + len(subject)
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and b > c0 and a < c1]
    else:  # slow tokenizers: count the tokens of the text before / through the subject
        n_special = len(tokenizer(prompt)["input_ids"]) - len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        pre = len(tokenizer(prompt[:c0], add_special_tokens=False)["input_ids"]) if c0 else 0
        through = len(tokenizer(prompt[:c1], add_special_tokens=False)["input_ids"])
        hits = list(range(n_special + pre, n_special + through))
    if not hits:
        raise ValueError(f"subject {subject!r} maps to no tokens of {prompt!r}")
    return hits[0], hits[-1] + 1


def fill_prompt(prompt: str, subject: str) -> tuple[str, int]:
    """``(text, char offset of the subject)`` for a template with ``{}`` or an already-filled prompt."""
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise ValueError(f"prompt template must contain exactly one '{{}}': {prompt!r}")
        return prompt.replace("{}", subject), prompt.index("{}")
    pos = prompt.find(subject)
    if pos < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r} (and it has no '{{}}')")
    return prompt, pos


def embedding_std(lm: LoadedModel) -> float:
    """Standard deviation of the token embedding matrix (noise is a multiple of it)."""
    return float(lm.adapter.embed.weight.detach().float().std())


# --- the batched engine --------------------------------------------------------------------------
@dataclass
class Setup:
    """One prompt ready for tracing: its ids, target token, subject span and fixed noise samples."""

    ids: torch.Tensor  # [T]
    target_id: int
    subject: tuple[int, int]
    noise: torch.Tensor  # [S, n_subject_tokens, d]


def _last_probs(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    kw = {"logits_to_keep": 1} if lm.takes_logits_to_keep else {}
    logits = lm.model(input_ids=ids, use_cache=False, **kw).logits[:, -1]
    return torch.softmax(logits.float(), dim=-1)


def clean_run(lm: LoadedModel, ids: torch.Tensor, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clean states ``{module: [T, d]}`` and the clean next-token distribution ``[V]``."""
    with torch.no_grad(), Trace(lm.model, names, retain_output=True) as tr:
        probs = _last_probs(lm, ids[None].to(lm.device))[0]
    return {n: tr.outputs[n][0] for n in names}, probs


def restored_probs(lm: LoadedModel, setup: Setup, clean: dict[str, torch.Tensor], plans: Sequence[Plan],
                   batch_rows: int = 512, corrupt: bool = True) -> torch.Tensor:
    """Mean P(target) over the noise samples for each plan, ``[len(plans)]``.

    Row ``p * S + s`` runs plan ``p`` with noise sample ``s``: the subject embeddings get the noise
    and every (module, token) in the plan is overwritten with its clean state. An empty plan is the
    corrupted run. Plans are packed into batches of at most ``batch_rows`` rows.
    """
    S = setup.noise.shape[0] if corrupt else 1
    per = max(1, batch_rows // S)
    s0, s1 = setup.subject
    embed_name = lm.adapter.spec.embed
    device = lm.device
    names = sorted({n for plan in plans for n, _ in plan})
    clean = {n: clean[n].to(device) for n in names}
    out = torch.empty(len(plans))
    for start in range(0, len(plans), per):
        chunk = plans[start: start + per]
        P = len(chunk)
        rows: dict[str, list[int]] = {n: [] for n in names}
        toks: dict[str, list[int]] = {n: [] for n in names}
        for p, plan in enumerate(chunk):
            for name, t in plan:
                for s in range(S):
                    rows[name].append(p * S + s)
                    toks[name].append(t)
        index = {n: (torch.tensor(rows[n], device=device), torch.tensor(toks[n], device=device))
                 for n in names if rows[n]}
        noise = setup.noise.to(device).repeat(P, 1, 1) if corrupt else None

        def edit(name: str, x: torch.Tensor, index=index, noise=noise) -> torch.Tensor | None:
            if name == embed_name:
                if noise is None:
                    return None
                x = x.clone()
                x[:, s0:s1] += noise.to(x.dtype)
                return x
            if name not in index:
                return None
            r, t = index[name]
            x = x.clone()
            x[r, t] = clean[name][t].to(x.dtype)
            return x

        ids = setup.ids.to(device)[None].expand(P * S, -1)
        with torch.no_grad(), Trace(lm.model, [embed_name, *index], edit_output=edit):
            probs = _last_probs(lm, ids)[:, setup.target_id]
        out[start: start + P] = probs.view(P, S).mean(1).cpu()
    return out


def make_setup(lm: LoadedModel, prompt: str, subject: str, target: str | None = None, samples: int = 10,
               noise: float = 3.0, noise_scale: float | None = None, seed: int = 0) -> tuple[Setup, str, str]:
    """Tokenize, locate the subject, pick the target token (given, else the clean greedy one), draw noise.

    Returns ``(setup, filled prompt, target string)``. A given target is traced by its first token.
    """
    text, char_start = fill_prompt(prompt, subject)
    tok = lm.tokenizer
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    subj = subject_token_range(tok, text, subject, char_start)
    if target is not None:
        t_ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
        if not t_ids:
            raise ValueError(f"target {target!r} has no tokens")
        target_id = int(t_ids[0])
    else:
        with torch.no_grad():
            target_id = int(_last_probs(lm, ids[None].to(lm.device))[0].argmax())
        target = tok.decode([target_id]).strip()
    scale = noise_scale if noise_scale is not None else noise * embedding_std(lm)
    g = torch.Generator().manual_seed(seed)
    d = lm.adapter.embed.weight.shape[1]
    eps = torch.randn(samples, subj[1] - subj[0], d, generator=g) * scale
    return Setup(ids=ids, target_id=target_id, subject=subj, noise=eps), text, target


# --- one full trace ------------------------------------------------------------------------------
@dataclass
class TraceResult:
    prompt: str
    subject: str
    target: str
    target_id: int
    tokens: list[str]
    subject_range: list[int]  # [start, end) token positions
    clean_prob: float
    corrupted_prob: float
    effects: dict[str, list[list[float]]]  # kind -> [token][layer] indirect effect
    restored: dict[str, list[list[float]]]  # kind -> [token][layer] P(target | restored)
    num_layers: int
    samples: int
    noise_scale: float
    window: int
    seconds: float
    model: str = ""
    forward_rows: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "trace.json", self.to_dict())
        plot_trace(self, out / "trace.png")
        return out


def trace_fact(lm: LoadedModel, prompt: str, subject: str, target: str | None = None,
               kinds: Sequence[str] = KINDS, samples: int = 10, noise: float = 3.0,
               noise_scale: float | None = None, window: int = 10, seed: int = 0,
               batch_rows: int = 512, progress: Callable[[str], None] | None = None) -> TraceResult:
    """Full causal trace of one fact: indirect effect of every (token, layer) for each kind."""
    t0 = time.perf_counter()
    setup, text, target = make_setup(lm, prompt, subject, target, samples, noise, noise_scale, seed)
    L, T = lm.adapter.num_layers, len(setup.ids)
    names = {k: module_names(lm, k) for k in kinds}
    clean, clean_p = clean_run(lm, setup.ids, [n for k in kinds for n in names[k]])
    corrupted = float(restored_probs(lm, setup, clean, [[]], batch_rows)[0])
    effects, restored = {}, {}
    rows = S = samples
    s0 = setup.subject[0]
    for kind in kinds:
        w = 1 if kind == "hidden" else window
        # tokens before the subject never see the noise (causal attention): restoring them changes
        # nothing, so their effect is exactly zero and they are not run
        plans = [[(names[kind][j], t) for j in window_layers(layer, L, w)] for t in range(s0, T) for layer in range(L)]
        probs = torch.full((T, L), corrupted)
        probs[s0:] = restored_probs(lm, setup, clean, plans, batch_rows).view(T - s0, L)
        restored[kind] = probs.tolist()
        effects[kind] = (probs - corrupted).tolist()
        rows += len(plans) * S
        if progress:
            progress(kind)
    tokens = [lm.tokenizer.decode([i]) for i in setup.ids.tolist()]
    scale = noise_scale if noise_scale is not None else noise * embedding_std(lm)
    return TraceResult(
        prompt=text, subject=subject, target=target, target_id=setup.target_id, tokens=tokens,
        subject_range=list(setup.subject), clean_prob=float(clean_p[setup.target_id]), corrupted_prob=corrupted,
        effects=effects, restored=restored, num_layers=L, samples=samples, noise_scale=scale, window=window,
        seconds=time.perf_counter() - t0, model=lm.slug, forward_rows=rows,
    )


def plot_trace(res: TraceResult, path: str | Path) -> None:
    """Three heatmaps (tokens x layers) of the indirect effect, subject tokens starred, as in ROME."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(res.effects)
    T = len(res.tokens)
    s0, s1 = res.subject_range
    labels = [f"{t!r}*" if s0 <= i < s1 else repr(t) for i, t in enumerate(res.tokens)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.32 * T + 1.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        data = torch.tensor(res.effects[kind])
        im = ax.pcolormesh(data.numpy(), cmap=KIND_CMAPS.get(kind, "viridis"), vmin=min(0.0, float(data.min())))
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(T)])
        ax.set_yticklabels(labels if ax is axes[0][0] else [""] * T, fontsize=8)
        step = max(1, res.num_layers // 10)
        ax.set_xticks([i + 0.5 for i in range(0, res.num_layers, step)])
        ax.set_xticklabels(list(range(0, res.num_layers, step)), fontsize=8)
        for y in (s0, s1):
            ax.axhline(y, color="black", lw=0.6, ls=":")
        win = "" if kind == "hidden" else f" (window {res.window})"
        ax.set_title(f"Restoring {KIND_LABELS.get(kind, kind)}{win}", fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        cb = fig.colorbar(im, ax=ax, fraction=0.05)
        cb.ax.tick_params(labelsize=7)
        cb.set_label(f"IE on p({res.target.strip()})", fontsize=7)
    fig.suptitle(f"{res.prompt} -> {res.target!r}   clean p={res.clean_prob:.3f}, corrupted p={res.corrupted_prob:.3f}"
                 f"   ({res.samples} noise samples, * = subject)", fontsize=9)
    fig.tight_layout()
    save_fig(fig, path)


# --- aggregate over many known facts --------------------------------------------------------------
def known_facts(lm: LoadedModel, records: Sequence[dict], n: int, batch_size: int = 64,
                progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """The first ``n`` records whose greedy next token after ``prompt`` is the first token of the true answer."""
    from kedit.evaluation.metrics import next_token_logprobs

    tok = lm.tokenizer
    found: list[dict] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start: start + batch_size]
        for k, r in enumerate(chunk):
            for f in ("prompt", "subject", "ground_truth"):
                if not isinstance(r.get(f), str) or not r[f].strip():
                    raise ValueError(f"facts[{start + k}]: field {f!r} missing or empty")
        argmax = next_token_logprobs(lm, [fill_prompt(r["prompt"], r["subject"])[0] for r in chunk]).argmax(-1)
        for r, a in zip(chunk, argmax.tolist()):
            first = tok(" " + r["ground_truth"].strip(), add_special_tokens=False)["input_ids"][:1]
            if first and a == first[0]:
                found.append(r)
                if len(found) >= n:
                    return found
        if progress:
            progress(min(start + batch_size, len(records)), len(found))
    return found


@dataclass
class AggregateResult:
    model: str
    n: int
    kinds: list[str]
    mean: dict[str, list[float]]  # kind -> per-layer mean IE at the last subject token
    stderr: dict[str, list[float]]
    recommended_layers: list[int]
    peak_layer: int
    block_size: int
    mean_clean_prob: float
    mean_corrupted_prob: float
    case_ids: list = field(default_factory=list)
    samples: int = 10
    window: int = 10
    noise: float = 3.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "aggregate.json", self.to_dict())
        plot_aggregate(self, out / "aggregate.png")
        write_text_atomic(out / "aggregate.md", aggregate_markdown(self))
        return out


def trace_last_subject(lm: LoadedModel, record: dict, kinds: Sequence[str], samples: int, noise: float,
                       window: int, seed: int, batch_rows: int) -> tuple[dict[str, torch.Tensor], float, float]:
    """Per-layer indirect effect of restoring each kind at the last subject token (one fact)."""
    setup, _, _ = make_setup(lm, record["prompt"], record["subject"], record["ground_truth"], samples, noise,
                             seed=seed)
    L = lm.adapter.num_layers
    last = setup.subject[1] - 1
    names = {k: module_names(lm, k) for k in kinds}
    clean, clean_p = clean_run(lm, setup.ids, [n for k in kinds for n in names[k]])
    plans: list[Plan] = [[]]
    for kind in kinds:
        w = 1 if kind == "hidden" else window
        plans += [[(names[kind][j], last) for j in window_layers(layer, L, w)] for layer in range(L)]
    probs = restored_probs(lm, setup, clean, plans, batch_rows)
    corrupted = float(probs[0])
    effects = {kind: probs[1 + i * L: 1 + (i + 1) * L] - corrupted for i, kind in enumerate(kinds)}
    return effects, float(clean_p[setup.target_id]), corrupted


def aggregate(lm: LoadedModel, facts: Sequence[dict], n: int = 100, kinds: Sequence[str] = ("mlp",),
              samples: int = 10, noise: float = 3.0, window: int = 10, block_size: int = 5, seed: int = 0,
              batch_rows: int = 512, progress: bool = True) -> AggregateResult:
    """Average indirect effect at the last subject token over ``n`` known facts; recommend edit layers.

    ``facts`` are flat CounterFact-style records (``prompt`` with the subject filled in or a ``{}``
    template, ``subject``, ``ground_truth``); only those the model gets right (greedy) are traced.
    """
    if "mlp" not in kinds:
        kinds = ("mlp", *kinds)
    t0 = time.perf_counter()
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        scan = bar.add_task("finding known facts", total=len(facts))
        known = known_facts(lm, facts, n, progress=lambda done, _k: bar.update(scan, completed=done))
        bar.update(scan, completed=len(facts))
        if not known:
            raise ValueError(f"none of the {len(facts)} facts is known by {lm.slug} (greedy first token); "
                             f"nothing to trace")
        task = bar.add_task(f"tracing {len(known)} known facts", total=len(known))
        per_kind: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
        cleans, corrupts = [], []
        for rec in known:
            eff, cp, cr = trace_last_subject(lm, rec, kinds, samples, noise, window, seed, batch_rows)
            for k in kinds:
                per_kind[k].append(eff[k])
            cleans.append(cp)
            corrupts.append(cr)
            bar.advance(task)
    mean, stderr = {}, {}
    for k in kinds:
        stack = torch.stack(per_kind[k])
        mean[k] = stack.mean(0).tolist()
        sd = stack.std(0, unbiased=True) if len(known) > 1 else torch.zeros(stack.shape[1])
        stderr[k] = (sd / math.sqrt(len(known))).tolist()
    block = best_block(mean["mlp"], block_size)
    peak = max(range(len(mean["mlp"])), key=lambda i: mean["mlp"][i])
    return AggregateResult(
        model=lm.slug, n=len(known), kinds=list(kinds), mean=mean, stderr=stderr, recommended_layers=block,
        peak_layer=peak, block_size=len(block), mean_clean_prob=sum(cleans) / len(cleans),
        mean_corrupted_prob=sum(corrupts) / len(corrupts), case_ids=[r.get("case_id") for r in known],
        samples=samples, window=window, noise=noise, seconds=time.perf_counter() - t0,
    )


def plot_aggregate(res: AggregateResult, path: str | Path) -> None:
    """Per-layer mean indirect effect at the last subject token (± stderr), recommended block shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for k in res.kinds:
        m, se = torch.tensor(res.mean[k]), torch.tensor(res.stderr[k])
        x = list(range(len(m)))
        ax.plot(x, m.numpy(), marker="o", ms=3, color=colors.get(k), label=KIND_LABELS.get(k, k))
        ax.fill_between(x, (m - se).numpy(), (m + se).numpy(), color=colors.get(k), alpha=0.2)
    lo, hi = res.recommended_layers[0], res.recommended_layers[-1]
    ax.axvspan(lo - 0.5, hi + 0.5, color="gold", alpha=0.25, label=f"recommended layers {lo}-{hi}")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean indirect effect on p(answer)")
    ax.set_title(f"{res.model}: restoring at the last subject token, n={res.n} known facts "
                 f"(window {res.window})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_fig(fig, path)


def aggregate_markdown(res: AggregateResult) -> str:
    lines = [f"# Causal tracing aggregate: {res.model}", "",
             f"- known facts traced: **{res.n}** ({res.samples} noise samples, noise {res.noise}x embedding std, "
             f"window {res.window})",
             f"- mean clean p(answer) {res.mean_clean_prob:.3f}, corrupted {res.mean_corrupted_prob:.3f}",
             f"- MLP indirect effect peaks at layer **{res.peak_layer}**; recommended block of "
             f"{res.block_size}: **{res.recommended_layers}**", f"- wall time {res.seconds:.0f} s", "",
             "![aggregate](aggregate.png)", "", "| layer | " + " | ".join(res.kinds) + " |",
             "|---|" + "---|" * len(res.kinds)]
    for i in range(len(res.mean["mlp"])):
        mark = " *" if i in res.recommended_layers else ""
        lines.append(f"| {i}{mark} | " + " | ".join(f"{res.mean[k][i]:+.4f}" for k in res.kinds) + " |")
    return "\n".join(lines) + "\n"


# --- writing the recommendation into the model's hyperparameter file --------------------------------
def hparams_path(slug: str) -> Path:
    return Path(__file__).parent / "hparams" / f"{slug}.yaml"


def write_layers(path: str | Path, layers: Sequence[int], note: str = "") -> None:
    """Set ``defaults.layers`` (or a top-level ``layers``) in a YAML file by a one-line edit.

    Everything else in the file (comments, other keys, order) is kept byte for byte.
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no hyperparameter file for this model; create it first "
                                f"(the editing engine's hparams/<slug>.yaml) or pass --hparams FILE")
    text = path.read_text()
    value = "[" + ", ".join(str(int(x)) for x in layers) + "]"
    comment = f"  # {note}" if note else ""
    m = re.search(r"^defaults:[ \t]*(#.*)?\n((?:[ \t]+.*\n|[ \t]*\n)*)", text, flags=re.M)
    new = None
    if m:
        block = m.group(2)
        lm_ = re.search(r"^([ \t]+)layers:.*$", block, flags=re.M)
        if lm_:
            line_start = m.start(2) + lm_.start()
            line_end = m.start(2) + lm_.end()
            new = text[:line_start] + f"{lm_.group(1)}layers: {value}{comment}" + text[line_end:]
        else:
            indent = re.match(r"[ \t]+", block).group(0) if block.strip() else "  "
            new = text[: m.start(2)] + f"{indent}layers: {value}{comment}\n" + text[m.start(2):]
    else:
        top = re.search(r"^layers:.*$", text, flags=re.M)
        if top:
            new = text[: top.start()] + f"layers: {value}{comment}" + text[top.end():]
        else:
            new = text.rstrip("\n") + f"\nlayers: {value}{comment}\n"
    data = yaml.safe_load(new)
    got = (data.get("defaults") or {}).get("layers") if m else data.get("layers")
    if got != [int(x) for x in layers]:
        raise RuntimeError(f"{path}: editing 'layers' did not produce the expected YAML (got {got!r})")
    write_text_atomic(path, new)
