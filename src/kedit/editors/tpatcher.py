"""T-Patcher (Huang et al., ICLR 2023): one patch neuron per fact, appended to one layer's MLP.

Weight editors overwrite shared parameters, and on a small model a thousand facts fill the room
general text needs. T-Patcher *adds* parameters instead: patch ``p`` is a key ``k_p``, a bias
``b_p`` and a value ``v_p``, and the MLP's output becomes ``MLP(x) + Σ_p relu(k_p·x + b_p) v_p``
(``x`` the MLP's input). A patch is trained to fire (pre-activation >= ``tp_act_margin``) on its
fact's inputs and to stay silent (<= ``-tp_memory_margin``) on a memory set of unrelated text, so
with ReLU a silent patch adds exactly zero: where no patch fires the model *is* the base model.

Nothing of the base model changes: :meth:`TPatcherEditor.compute` returns no deltas, only a new
:class:`EditorState` whose tensors hold every patch (``tp.key`` / ``tp.bias`` / ``tp.value``) and
the MLP inputs of every edit so far (``tp.edit_x``, so a later patch learns not to fire for an old
fact); ``meta["patch_facts"]`` says which fact owns which patch row. :func:`attach` puts the
patches on the live model as a forward hook (idempotent, see :mod:`kedit.editors.attach`).

Training a batch: the base model below the patched layer is frozen and the patches only add to
that layer's output, so one no-grad pass gives the MLP inputs and the layer's output for every
(fact, prefix context) row; each Adam step adds the patches and replays only the blocks above, on
all rows at once and only on each row's suffix (one forward/backward per step, never a loop over
facts). The loss per patch is
its fact's target NLL (teacher forcing, averaged over the contexts), plus ``tp_memory_weight`` ×
(the activation hinge on its fact's inputs + the memory hinge on the memory set). The memory set's
MLP inputs are read once per batch (the general part once per process). Each term touches one
patch only, and a patch silent on the other facts' inputs (which are in its memory set) adds
nothing to their rows, so a patch trained in a batch is the patch trained alone with the same
memory set (tested).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from kedit.atomic import sha256_json
from kedit.editors import attach as _attach
from kedit.editors.base import EditorState, EditRequest, EditResult, RequestDiagnostics
from kedit.editors.common import EditCaches, check_requests, check_state
from kedit.editors.context import context_prefixes
from kedit.editors.hparams import EditHparams
from kedit.editors.prompts import pad_right, subject_rows, target_ids
from kedit.editors.runner import BlockSlice, base_model, unembed_states
from kedit.hooks import Trace

log = logging.getLogger(__name__)

METHOD = "tpatcher"
KEY, BIAS, VALUE = "tp.key", "tp.bias", "tp.value"
EDIT_X, EDIT_OWNER = "tp.edit_x", "tp.edit_owner"


# --- the patch computation (pure) ------------------------------------------------------------
def patch_preactivation(x: torch.Tensor, key: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``k_p·x + b_p`` for every position of ``x`` [..., d_in] and patch: [..., P]."""
    return x @ key.T + bias


def patch_output(x: torch.Tensor, key: torch.Tensor, bias: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``Σ_p relu(k_p·x + b_p) v_p``: [..., d_out]. A patch below zero contributes exactly 0."""
    return torch.relu(patch_preactivation(x, key, bias)) @ value


@dataclass
class Patches:
    """Patch rows: keys [P, d_in], biases [P], values [P, d_out] (float32)."""

    key: torch.Tensor
    bias: torch.Tensor
    value: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.key.shape[0])

    @classmethod
    def empty(cls, d_in: int, d_out: int, device=None) -> Patches:
        return cls(torch.zeros(0, d_in, device=device), torch.zeros(0, device=device),
                   torch.zeros(0, d_out, device=device))


def patches_of(state: EditorState, device=None) -> Patches | None:
    """The state's patches (None when it has none)."""
    if KEY not in state.tensors:
        return None
    t = state.tensors
    return Patches(t[KEY].to(device), t[BIAS].to(device), t[VALUE].to(device))


# --- attaching to the live model -------------------------------------------------------------
def _mlp_hook(patches: Patches):
    def hook(_mod, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        out = output[0] if isinstance(output, tuple) else output
        add = patch_output(x.to(patches.key.dtype), patches.key, patches.bias, patches.value).to(out.dtype)
        new = out + add
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook


def attach(lm, state: EditorState) -> _attach.Attachment | None:
    """Install the state's patches on ``lm`` (replacing any earlier T-Patcher attachment); None and
    nothing attached when the state has no patches. ``.remove()`` restores the base model exactly."""
    if state.method != METHOD:
        raise ValueError(f"attach: state is for {state.method!r}, not {METHOD!r}")
    model = getattr(lm, "model", lm)  # a LoadedModel or a bare module (the lineage store takes both)
    adapter = getattr(lm, "adapter", None)
    if adapter is None:
        from kedit.models.adapters import ModelAdapter

        adapter = ModelAdapter(model)
    patches = patches_of(state, next(model.parameters()).device)
    if patches is None or patches.n == 0:
        _attach.detach(model, METHOD)
        return None
    layer = int(state.meta["layer"])
    return _attach.install(model, METHOD, adapter.mlp_name(layer), _mlp_hook(patches))


def without_facts(state: EditorState, fact_ids: list[str]) -> EditorState:
    """A copy of ``state`` without the patches (and stored edit inputs) of ``fact_ids``."""
    owners = list(state.meta.get("patch_facts", []))
    missing = [f for f in fact_ids if f not in owners]
    if missing:
        raise KeyError(f"no patch belongs to facts {missing}")
    keep = torch.tensor([o not in set(fact_ids) for o in owners], dtype=torch.bool)
    new = state.copy()
    for k in (KEY, BIAS, VALUE):
        new.tensors[k] = state.tensors[k][keep].clone()
    if EDIT_X in state.tensors:
        old_owner = state.tensors[EDIT_OWNER]
        rows = keep[old_owner]
        remap = torch.cumsum(keep.long(), 0) - 1
        new.tensors[EDIT_X] = state.tensors[EDIT_X][rows].clone()
        new.tensors[EDIT_OWNER] = remap[old_owner[rows]].clone()
    new.meta["patch_facts"] = [o for o in owners if o not in set(fact_ids)]
    return new


# --- MLP inputs ----------------------------------------------------------------------------
def mlp_inputs(lm, layer: int, texts: list[str], max_len: int = 128, batch_size: int = 16) -> torch.Tensor:
    """The MLP inputs at ``layer`` of every real token of ``texts`` (truncated to ``max_len``): [N, d]."""
    ids = [s[:max_len] for s in lm.tokenizer(list(texts)).input_ids] if texts else []
    return mlp_inputs_of_ids(lm, layer, ids, batch_size)


def mlp_inputs_of_ids(lm, layer: int, ids: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """The MLP inputs at ``layer`` of every token of the sequences ``ids``: [N, d]. The forward
    stops after that layer's MLP."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    name = lm.adapter.mlp_name(layer)
    ids = [s for s in ids if s]
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i: i + batch_size]
        with torch.no_grad(), Trace(lm.model, [name], retain_input=True, stop=True) as tr:
            base_model(lm)(input_ids=pad_right(chunk, pad, lm.device))  # right pads: real tokens never see them
        x = tr.inputs[name]
        out += [x[r, : len(s)].float() for r, s in enumerate(chunk)]
    if not out:  # the MLP reads the residual stream's width
        return torch.zeros(0, lm.adapter.out_dim(layer), device=lm.device)
    return torch.cat(out)


_MEMORY_MEMO: dict[str, torch.Tensor] = {}


def general_memory(lm, layer: int, corpus: str, n_tokens: int) -> torch.Tensor:
    """MLP inputs at ``layer`` of the canary prompts and ``n_tokens`` positions of ``corpus`` (its
    training split: the held-out split is what perplexity is measured on), once per process."""
    from kedit.prompts import shipped_prompts

    key = sha256_json({"model": lm.manifest.model_hash, "layer": layer, "corpus": corpus, "n": n_tokens})
    if key not in _MEMORY_MEMO:
        parts = [mlp_inputs(lm, layer, shipped_prompts())]
        if corpus and n_tokens:
            from kedit.stats.corpus import load_corpus

            texts, have = [], 0
            for t in load_corpus(corpus).texts():
                texts.append(t)
                have += min(128, len(lm.tokenizer(t).input_ids))
                if have >= n_tokens:
                    break
            parts.append(mlp_inputs(lm, layer, texts)[:n_tokens])
        _MEMORY_MEMO[key] = torch.cat(parts)
    return _MEMORY_MEMO[key]


# --- one batch's training problem --------------------------------------------------------------
@dataclass
class PatchProblem:
    """Everything a batch's patch training reads (all on the model's device).

    Rows are (request × context) prompts with the target's teacher-forced tokens; a *pair* is a
    position that predicts a target token. ``neg_x`` is the memory set; ``neg_owner`` is the new
    patch a memory row belongs to (another fact's input in the same batch: every *other* patch must
    stay silent on it) or -1 (every new patch must: general text, canaries, neighbourhood prompts,
    earlier edits' inputs, and every row's tokens before the prompt's end, so a patch fires only
    where its fact's answer is predicted and is silent everywhere in the other facts' rows)."""

    blocks: BlockSlice  # blocks above the patched layer; .hidden = the layer's base output (+ old patches)
    x: torch.Tensor  # [rows, T, d] MLP inputs at the patched layer
    pair_row: torch.Tensor
    pair_col: torch.Tensor
    pair_lab: torch.Tensor
    pair_w: torch.Tensor  # 1 / (target tokens × contexts): each request's NLL is a mean
    pair_req: torch.Tensor
    neg_x: torch.Tensor  # [N, d]
    neg_owner: torch.Tensor  # [N]
    n_requests: int

    @property
    def pos_x(self) -> torch.Tensor:
        return self.x[self.pair_row, self.pair_col]


def build_problem(lm, requests: list[EditRequest], prefixes: list[str], layer: int, old: Patches | None,
                  old_edit_x: torch.Tensor | None, general: torch.Tensor) -> PatchProblem:
    """Rows, pairs and memory set of one batch. Only each row's suffix (its prompt's last token and
    the teacher-forced target tokens) is replayed: the tokens before it are in the memory set, where
    every patch is silent and so adds exactly nothing, and their keys/values are computed once into
    a read-only cache (as v* does), so a step costs a few tokens per row, not the whole prompt."""
    from kedit.editors.vstar import slice_above

    tok, dev = lm.tokenizer, lm.device
    n_layers = lm.adapter.num_layers
    if not 0 <= layer < n_layers - 1:
        raise ValueError(f"T-Patcher: layer {layer} must be below the last block ({n_layers - 1}): the blocks "
                         f"above it are replayed during training")
    ctx = subject_rows(tok, requests, prefixes)
    tgts = target_ids(tok, [r.target_new for r in requests])
    seqs, split, pr, pc, pl, pw = [], [], [], [], [], []
    for row, (ids, r) in enumerate(zip(ctx.ids, ctx.req)):
        t = tgts[r]
        seqs.append(ids + t[:-1])
        split.append(len(ids) - 1)
        for j, lab in enumerate(t):
            pr.append(row), pc.append(j), pl.append(lab), pw.append(1.0 / (len(t) * len(prefixes)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    name = lm.adapter.mlp_name(layer)
    with torch.no_grad(), Trace(lm.model, [name], retain_input=True) as tr:
        blocks = slice_above(lm, seqs, split, layer, pad)  # the suffix capture runs last: its x is kept
    x = tr.inputs[name].float()  # [rows, suffix width, d]
    if old is not None and old.n:
        with torch.no_grad():
            blocks.hidden = blocks.hidden + patch_output(x, old.key, old.bias, old.value).to(blocks.hidden.dtype)
    long = {"dtype": torch.long, "device": dev}
    pair_row, pair_col = torch.tensor(pr, **long), torch.tensor(pc, **long)
    pair_req = torch.tensor(ctx.req, **long)[pair_row]
    neighbors = [n for r in requests for n in r.neighbors]
    # every row's tokens before its prompt's last one (the prefixes, the prompt's own words)
    lead = mlp_inputs_of_ids(lm, layer, [s[:p] for s, p in zip(seqs, split) if p > 0])
    negs = [general, mlp_inputs(lm, layer, neighbors) if neighbors else general[:0], torch.unique(lead, dim=0)]
    if old_edit_x is not None:
        negs.append(old_edit_x.to(dev))
    n_general = sum(t.shape[0] for t in negs)
    pos_x = x[pair_row, pair_col]
    neg_x = torch.cat(negs + [pos_x])
    neg_owner = torch.cat([torch.full((n_general,), -1, **long), pair_req])
    return PatchProblem(blocks=blocks, x=x, pair_row=pair_row, pair_col=pair_col, pair_lab=torch.tensor(pl, **long),
                        pair_w=torch.tensor(pw, device=dev), pair_req=pair_req, neg_x=neg_x, neg_owner=neg_owner,
                        n_requests=len(requests))


def init_patches(prob: PatchProblem, d_out: int, hp: EditHparams) -> Patches:
    """Key along (own inputs' mean − its memory set's mean), scaled and biased so the pre-activation is
    ``tp_act_margin`` on the patch's weakest own input and ``-tp_memory_margin`` on the memory row
    that projects highest (where the two overlap, the memory's 99th percentile); value 0."""
    n = prob.n_requests
    pos = prob.pos_x
    # each patch's memory mean (every row but its own inputs), the same whatever else is in the batch
    mine = (prob.neg_owner[None] == torch.arange(n, device=pos.device)[:, None]).to(pos.dtype)  # [n, N]
    cnt = (prob.neg_x.shape[0] - mine.sum(1)).clamp_min(1)[:, None]
    mu = (prob.neg_x.sum(0)[None] - mine @ prob.neg_x) / cnt
    own_mean = torch.zeros(n, pos.shape[1], device=pos.device).index_add(0, prob.pair_req, pos)
    own_mean = own_mean / torch.bincount(prob.pair_req, minlength=n).clamp_min(1)[:, None].to(pos.dtype)
    u = own_mean - mu
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-8)
    proj_pos = pos @ u.T  # [pairs, n]
    lo = torch.full((n,), float("inf"), device=pos.device).scatter_reduce(
        0, prob.pair_req, proj_pos[torch.arange(pos.shape[0], device=pos.device), prob.pair_req], "amin")
    proj_neg = prob.neg_x @ u.T  # [N, n]
    mask = prob.neg_owner[:, None] != torch.arange(n, device=pos.device)[None]
    proj_neg = torch.where(mask, proj_neg, torch.full_like(proj_neg, -float("inf")))
    hi = proj_neg.max(0).values
    q = torch.quantile(torch.where(mask, proj_neg, proj_neg.new_tensor(0.0)), 0.99, dim=0) \
        if proj_neg.shape[0] else hi
    hi = torch.where(hi < lo, hi, torch.minimum(q, lo - 1e-3))
    spread = proj_neg.masked_fill(~mask, 0.0).std(0).clamp_min(1e-3) if proj_neg.shape[0] > 1 else lo.abs() + 1
    gap = (lo - hi).clamp_min(0.1 * spread)
    scale = (hp.tp_act_margin + hp.tp_memory_margin) / gap
    key = scale[:, None] * u
    bias = hp.tp_act_margin - scale * lo
    return Patches(key=key, bias=bias, value=torch.zeros(n, d_out, device=pos.device))


@dataclass
class PatchLosses:
    nll: torch.Tensor  # [n] per request
    act: torch.Tensor  # [n] mean hinge of the patch's own inputs below tp_act_margin
    memory: torch.Tensor  # [n] mean hinge of the memory rows above -tp_memory_margin (over violators)
    total: torch.Tensor  # [n]


def patch_losses(lm, prob: PatchProblem, p: Patches, hp: EditHparams) -> PatchLosses:
    """Each new patch's loss; one forward through the blocks above the layer for all rows."""
    n = prob.n_requests
    h = prob.blocks.hidden + patch_output(prob.x, p.key, p.bias, p.value).to(prob.blocks.hidden.dtype)
    out = prob.blocks.run(lm, h)
    logits = unembed_states(lm, out[prob.pair_row, prob.pair_col])
    logp = torch.log_softmax(logits, -1).gather(1, prob.pair_lab[:, None]).squeeze(1)
    nll = torch.zeros(n, device=h.device).index_add(0, prob.pair_req, -logp * prob.pair_w)
    own = patch_preactivation(prob.pos_x, p.key, p.bias)[torch.arange(prob.pair_req.numel(), device=h.device),
                                                          prob.pair_req]
    viol = torch.relu(hp.tp_act_margin - own)
    cnt = torch.bincount(prob.pair_req, minlength=n).clamp_min(1)
    act = torch.zeros(n, device=h.device).index_add(0, prob.pair_req, viol) / cnt
    z = patch_preactivation(prob.neg_x, p.key, p.bias)  # [N, n]
    mask = prob.neg_owner[:, None] != torch.arange(n, device=h.device)[None]
    mv = torch.relu(z + hp.tp_memory_margin) * mask
    memory = mv.sum(0) / (mv > 0).sum(0).clamp_min(1)
    return PatchLosses(nll=nll, act=act, memory=memory, total=nll + hp.tp_memory_weight * (act + memory))


def train_patches(lm, prob: PatchProblem, init: Patches, hp: EditHparams, progress=None
                  ) -> tuple[Patches, list[dict]]:
    """Adam on every new patch at once; a patch stops (and is frozen) once its NLL is below
    ``tp_stop_nll`` and both margins hold. At the end each bias is lowered until the patch is below
    ``-tp_memory_margin`` on its whole memory set (a hinge loss alone leaves small violations).
    Returns the patches and per-patch numbers."""
    n = prob.n_requests
    params = [init.key.clone().requires_grad_(True), init.bias.clone().requires_grad_(True),
              init.value.clone().requires_grad_(True)]
    lrs = [hp.tp_key_lr, hp.tp_key_lr, hp.tp_lr]
    m = [torch.zeros_like(q) for q in params]
    v = [torch.zeros_like(q) for q in params]
    t_step = torch.zeros(n, device=init.key.device)
    active = torch.ones(n, dtype=torch.bool, device=init.key.device)
    first: PatchLosses | None = None
    last = {"nll": torch.zeros(n), "act": torch.zeros(n), "memory": torch.zeros(n)}
    steps = torch.zeros(n, dtype=torch.long)
    met_end = torch.zeros(n, dtype=torch.bool)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for it in range(hp.tp_steps + 1):
        loss = patch_losses(lm, prob, Patches(*params), hp)
        with torch.no_grad():
            first = first or PatchLosses(*(t.detach().clone() for t in (loss.nll, loss.act, loss.memory, loss.total)))
            met = (loss.nll < hp.tp_stop_nll) & (loss.act == 0) & (loss.memory == 0)
            done = active & (met | (it == hp.tp_steps))
            for i in done.nonzero().squeeze(1).tolist():
                last["nll"][i], last["act"][i], last["memory"][i] = (float(loss.nll[i]), float(loss.act[i]),
                                                                     float(loss.memory[i]))
                steps[i], met_end[i] = it, bool(met[i])
            active = active & ~done
        if progress is not None:
            progress(it, int(active.sum()), float(loss.nll.detach().mean()))
        if not bool(active.any()):
            break
        (loss.total * active).sum().backward()
        with torch.no_grad():  # Adam, row-wise: a frozen patch's moments and values stay as they are
            t_step += active.to(t_step.dtype)
            for q, mq, vq, lr in zip(params, m, v, lrs):
                a = active.view(-1, *([1] * (q.dim() - 1)))
                g = q.grad
                mq.copy_(torch.where(a, b1 * mq + (1 - b1) * g, mq))
                vq.copy_(torch.where(a, b2 * vq + (1 - b2) * g * g, vq))
                tt = t_step.clamp_min(1).view_as(a)
                step = lr * (mq / (1 - b1 ** tt)) / ((vq / (1 - b2 ** tt)).sqrt() + eps)
                q.sub_(torch.where(a, step, torch.zeros_like(step)))
                q.grad = None
    out = Patches(*(q.detach() for q in params))
    with torch.no_grad():  # silence is the guarantee: shift a bias down until no memory row is within the margin
        z = patch_preactivation(prob.neg_x, out.key, out.bias)
        z = z.masked_fill(prob.neg_owner[:, None] == torch.arange(n, device=z.device)[None], -float("inf"))
        excess = (z.max(0).values + hp.tp_memory_margin).clamp_min(0) if z.shape[0] else out.bias * 0
        out.bias = out.bias - excess
        own = patch_preactivation(prob.pos_x, out.key, out.bias)[
            torch.arange(prob.pair_req.numel(), device=z.device), prob.pair_req]
        act_low = torch.zeros(n, device=z.device).index_add(0, prob.pair_req, torch.relu(hp.tp_act_margin - own))
    info = [{"nll_start": float(first.nll[i]), "nll_end": float(last["nll"][i]),
             "loss_start": float(first.total[i]), "act_end": float(last["act"][i]),
             "memory_end": float(last["memory"][i]), "bias_shift": float(excess[i]),
             "act_after_shift": float(act_low[i]), "steps": int(steps[i]),
             "met": bool(met_end[i]) and float(act_low[i]) == 0.0}
            for i in range(n)]
    return out, info


def _append(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b.cpu() if a is None else torch.cat([a.cpu(), b.cpu()])


class TPatcherEditor:
    """T-Patcher as a kedit editor: ``compute`` returns no weight deltas, only the state with the
    batch's new patches appended; :meth:`attach` puts them on the live model."""

    method = METHOD

    def __init__(self, hparams: EditHparams, cache_dir=None, progress=None) -> None:
        self.hp = hparams
        self.cache_dir = cache_dir
        self.progress = progress

    def attach(self, lm, state: EditorState) -> _attach.Attachment | None:
        return attach(lm, state)

    def compute(self, lm, requests: list[EditRequest], state: EditorState | None = None, stats=None,
                caches: EditCaches | None = None) -> EditResult:
        """``stats`` is unused (the memory set replaces key statistics); taken for the common call;
        ``caches``: the run's prefix cache."""
        t0 = time.perf_counter()
        check_requests(requests)
        hp = self.hp
        layers = hp.resolve_layers(lm.adapter.num_layers)
        if len(layers) != 1:
            raise ValueError(f"T-Patcher patches one layer; hparams give {layers} (set tpatcher.layers: [L])")
        layer = layers[0]
        state = check_state(state, self.method, layers, lm.manifest.model_hash)
        prefixes = context_prefixes(lm, hp.n_prefixes, hp.prefix_len, hp.prefix_seed, self.cache_dir,
                                    None if caches is None else caches.prefixes)
        old = patches_of(state, lm.device)
        old_x = state.tensors.get(EDIT_X)
        with _attach.suspended(lm.model, METHOD):  # read the base model; old patches are added explicitly
            general = general_memory(lm, layer, hp.tp_memory_corpus, hp.tp_memory_tokens)
            prob = build_problem(lm, requests, prefixes, layer, old, old_x, general)
            init = init_patches(prob, lm.adapter.out_dim(layer), hp)
            new, info = train_patches(lm, prob, init, hp, progress=self.progress)
        n_old = 0 if old is None else old.n
        st = state
        st.tensors[KEY] = _append(None if old is None else old.key, new.key)
        st.tensors[BIAS] = _append(None if old is None else old.bias, new.bias)
        st.tensors[VALUE] = _append(None if old is None else old.value, new.value)
        st.tensors[EDIT_X] = _append(old_x, prob.pos_x.detach())
        st.tensors[EDIT_OWNER] = _append(state.tensors.get(EDIT_OWNER), (prob.pair_req + n_old).cpu())
        fact_ids = [r.id if r.id is not None else f"{r.subject}|{r.prompt}" for r in requests]
        st.meta.update(n_edits=int(st.meta.get("n_edits", 0)) + len(requests),
                       n_batches=int(st.meta.get("n_batches", 0)) + 1, hparams_sha256=hp.source_sha256,
                       layer=layer, activation="relu", act_margin=hp.tp_act_margin,
                       memory_margin=hp.tp_memory_margin,
                       patch_facts=list(st.meta.get("patch_facts", [])) + fact_ids,
                       memory_rows=int(prob.neg_x.shape[0]))
        diags = [RequestDiagnostics(request_id=r.id, vstar_loss_start=d["loss_start"], vstar_loss_end=d["nll_end"],
                                    vstar_steps=d["steps"], target_prob=float(torch.exp(torch.tensor(-d["nll_end"]))),
                                    delta_norm=float(new.value[i].norm()), constraint_met=d["met"])
                 for i, (r, d) in enumerate(zip(requests, info))]
        info_l = {f"L{layer}": {"patches": float(st.tensors[KEY].shape[0]), "new_patches": float(new.n),
                                "value_norm": float(new.value.norm(dim=1).mean()),
                                "key_norm": float(new.key.norm(dim=1).mean()),
                                "memory_rows": float(prob.neg_x.shape[0]),
                                "act_violation": sum(d["act_end"] for d in info) / len(info),
                                "memory_violation": sum(d["memory_end"] for d in info) / len(info)}}
        return EditResult(deltas={}, state=st, diagnostics=diags, layer_info=info_l,
                          seconds=time.perf_counter() - t0)


def export_added(lm, state: EditorState) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """What an exported directory adds for this state: where the patches act and their tensors
    (None: no patches yet)."""
    p = patches_of(state)
    if p is None or p.n == 0:
        return None
    layer = int(state.meta["layer"])
    spec = {"method": METHOD, "layer": layer, "module": lm.adapter.mlp_name(layer), "n": p.n,
            "d_in": int(p.key.shape[1]), "d_out": int(p.value.shape[1])}
    return spec, {"key": p.key, "bias": p.bias, "value": p.value}
