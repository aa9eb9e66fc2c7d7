"""A base causal LM plus the parameters a kedit edit state added (shipped with ``kedit export``).

Needs only torch and transformers. The added computation is a forward hook on one module of the
base model, the same computation kedit attaches in-process (``kedit.editors.tpatcher.attach`` /
``kedit.editors.memoir.attach``):

- ``tpatcher``: on one MLP, ``output += Σ_p relu(k_p·x + b_p) v_p`` with ``x`` the MLP input.
- ``memoir``: on one down-projection, each token's fingerprint ``sort(perm[top_k(x - μ)])`` is matched
  against the stored masks; a token whose best overlap ``|M_q ∩ M_e| / k`` reaches the threshold gets
  ``U_e V_e · x[M_e]`` (its entry's own block; ``read: own``) or ``W'[:, M_e] · x[M_e]`` (``read:
  shared``) added to its output; every other token's output is left untouched. With exact keys
  (``exact_threshold`` in the spec), a token whose overlap with entry ``e``'s exact key reaches that
  threshold reads entry ``e`` whatever its mask overlap. With span keys (``span_threshold`` in the
  spec), an entry marked in ``span_on`` counts for a token's mask match only if the token before it
  overlaps the entry's span key by that threshold: within a call the previous position, at the start
  of a call that continues a KV cache the previous call's last token, at the start of a text none.
  With ``read_scale`` in the spec, a token reading through the mask adds that share of its entry's
  output change, one reading through the exact key ``exact_read_scale`` (default: ``read_scale``).
  With ``add_module`` in the spec (a norm between the MLP and the residual stream, as in Gemma 2/3),
  the change computed at the down-projection is added to that module's output instead.

The added tensors are float32 buffers/parameters of ``kedit_added`` and the computation runs in float32,
as in kedit, whatever dtype the base model is loaded in.
"""

import torch
import transformers
from torch import nn

from .configuration_kedit_added import KeditAddedConfig

BASE_MODEL_CLASS = "LlamaForCausalLM"  # kedit export writes the base architecture's model class here

_BaseModel = getattr(transformers, BASE_MODEL_CLASS)


class PatchNeurons(nn.Module):
    """T-Patcher's patches: keys [P, d_in], biases [P], values [P, d_out]."""

    def __init__(self, spec):
        super().__init__()
        n, d_in, d_out = int(spec["n"]), int(spec["d_in"]), int(spec["d_out"])
        self.register_buffer("key", torch.zeros(n, d_in, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("value", torch.zeros(n, d_out, dtype=torch.float32))

    def hook(self, _module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        out = output[0] if isinstance(output, tuple) else output
        key, bias, value = self.key.float(), self.bias.float(), self.value.float()
        add = (torch.relu(x.to(key.dtype) @ key.T + bias) @ value).to(out.dtype)
        new = out + add
        return (new, *output[1:]) if isinstance(output, tuple) else new


class SparseResidualMemory(nn.Module):
    """MEMOIR-style memory: W' [d_out, d], masks [entries, k], background mean [d], permutation [d]; with
    ``read: own`` also each entry's block as factors U [entries, d_out, r] and V [entries, r, k]."""

    def __init__(self, spec):
        super().__init__()
        n, d, d_out = int(spec["n_entries"]), int(spec["d"]), int(spec["d_out"])
        self.k, self.threshold = int(spec["k"]), float(spec["threshold"])
        self.register_buffer("W", torch.zeros(d_out, d, dtype=torch.float32))
        self.register_buffer("masks", torch.zeros(n, self.k, dtype=torch.long))
        self.register_buffer("bg_mean", torch.zeros(d, dtype=torch.float32))
        self.register_buffer("perm", torch.arange(d, dtype=torch.long))
        self.own = spec.get("read", "shared") == "own"
        self.add_after = spec.get("add_module") is not None
        self.exact_threshold = spec.get("exact_threshold")
        if self.exact_threshold is not None:
            self.register_buffer("exact", torch.zeros(n, self.k, dtype=torch.long))
        self.read_scale = float(spec.get("read_scale", 1.0))
        self.exact_read_scale = float(spec.get("exact_read_scale", self.read_scale))
        self.span_threshold = spec.get("span_threshold")
        if self.span_threshold is not None:
            self.register_buffer("span", torch.zeros(n, self.k, dtype=torch.long))
            self.register_buffer("span_on", torch.zeros(n, dtype=torch.bool))
        self.continuing, self.live, self.carry = False, False, None  # set around each call of the model
        if self.own:
            r = int(spec["rank"])
            self.register_buffer("block_u", torch.zeros(n, d_out, r, dtype=torch.float32))
            self.register_buffer("block_v", torch.zeros(n, r, self.k, dtype=torch.float32))
        self._stored = None  # one-hot masks (and exact keys), built on first use
        self.pending = None  # with add_module: (tokens, change) waiting for that module's output

    def _one_hot(self, sets, d):
        out = torch.zeros(sets.shape[0], d, dtype=torch.float32, device=sets.device)
        return out.scatter_(1, sets, 1.0)

    def _fingerprint(self, x, d):
        idx = torch.topk(x.float() - self.bg_mean.to(x.device, torch.float32), self.k, dim=-1).indices
        return self._one_hot(torch.sort(self.perm.to(x.device)[idx], dim=-1).values, d)

    def hook(self, _module, args, kwargs, output):
        """On the down-projection: its output plus each reading token's change (or, with an
        ``add_module``, the output as it is, the change kept for :meth:`add_hook`)."""
        self.pending = None
        if self.masks.shape[0] == 0:
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        found = self.changes(x)
        if found is None:
            return output
        if self.add_after:
            self.pending = found
            return output
        return self._add(output, *found)

    def add_hook(self, _module, args, kwargs, output):
        """On ``add_module``: its output plus the change the down-projection's hook kept."""
        if self.pending is None:
            return output
        out = self._add(output, *self.pending)
        self.pending = None
        return out

    @staticmethod
    def _add(output, fire, delta):
        out = output.reshape(-1, output.shape[-1]).clone()
        out[fire] = out[fire] + delta.to(out.dtype)
        return out.view_as(output)

    def changes(self, x):
        """``(tokens, change)``: which tokens of ``x`` (flattened) read an entry and what each adds
        (None: no token reads one)."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 0:
            return None
        d, k = flat.shape[-1], self.k
        masks = self.masks.to(flat.device)
        exact = self.exact.to(flat.device) if self.exact_threshold is not None else None
        span = self.span.to(flat.device) if self.span_threshold is not None else None
        key = (masks.device, masks.data_ptr(), masks._version,
               None if exact is None else (exact.data_ptr(), exact._version),
               None if span is None else (span.data_ptr(), span._version))
        if self._stored is None or self._stored[0] != key:
            self._stored = (key, self._one_hot(masks, d), None if exact is None else self._one_hot(exact, d),
                            None if span is None else self._one_hot(span, d))
        stored, stored_exact, stored_span = self._stored[1], self._stored[2], self._stored[3]
        allowed = None
        if stored_span is not None:
            seq = x if x.dim() == 3 else x.reshape(1, -1, d)  # a bare [tokens, d] input is one text
            b, t = seq.shape[0], seq.shape[1]
            carry = self.carry if self.continuing and self.carry is not None and self.carry.shape[0] == b else None
            self.carry = seq[:, -1].detach().clone() if self.live else None
            first = carry.to(seq.dtype) if carry is not None else torch.zeros_like(seq[:, 0])
            prev = torch.cat([first[:, None], seq[:, :-1]], 1).reshape(b * t, d)
            has = torch.ones(b, t, dtype=torch.bool, device=x.device)
            if carry is None:
                has[:, 0] = False
            with torch.no_grad():
                prev_ok = (self._fingerprint(prev, d) @ stored_span.T / k) >= self.span_threshold
                allowed = ~self.span_on.to(flat.device)[None] | (prev_ok & has.reshape(-1)[:, None])
        with torch.no_grad():
            query = self._fingerprint(flat, d)
            ov = query @ stored.T / k
            if allowed is not None:
                ov = torch.where(allowed, ov, torch.full_like(ov, -1.0))
            best, entry = ov.max(dim=1)  # the first maximal index: ties go to the older entry
            hit = best >= self.threshold
            exact_hit = torch.zeros_like(hit)
            if stored_exact is not None:
                best_x, entry_x = (query @ stored_exact.T / k).max(dim=1)
                exact_hit = best_x >= self.exact_threshold
                entry, hit = torch.where(exact_hit, entry_x, entry), hit | exact_hit
            fire = hit.nonzero().squeeze(1)
        if fire.numel() == 0:
            return None
        cols = masks[entry[fire]]
        xs = flat[fire].gather(1, cols).float()
        if self.own:
            e = entry[fire]
            u = self.block_u.to(flat.device, torch.float32)[e]
            v = self.block_v.to(flat.device, torch.float32)[e]
            delta = torch.bmm(u, torch.bmm(v, xs[:, :, None]))[:, :, 0]
        else:
            w = self.W.to(flat.device, torch.float32)
            delta = torch.einsum("omk,mk->mo", w[:, cols], xs)
        if self.read_scale != 1.0 or self.exact_read_scale != 1.0:
            scale = torch.where(exact_hit[fire], self.exact_read_scale, self.read_scale)
            delta = delta * scale.to(delta.dtype)[:, None]
        return fire, delta


ADDED_MODULES = {"tpatcher": PatchNeurons, "memoir": SparseResidualMemory}


class KeditAddedForCausalLM(_BaseModel):
    config_class = KeditAddedConfig

    def __init__(self, config):
        super().__init__(config)
        spec = config.kedit_added
        if spec.get("method") not in ADDED_MODULES:
            raise ValueError(f"config.kedit_added.method is {spec.get('method')!r}; this code knows "
                             f"{sorted(ADDED_MODULES)}")
        self.kedit_added = ADDED_MODULES[spec["method"]](spec)
        self.get_submodule(spec["module"]).register_forward_hook(self.kedit_added.hook, with_kwargs=True)
        if spec.get("add_module"):  # the change joins the residual stream after this module (a norm)
            self.get_submodule(spec["add_module"]).register_forward_hook(self.kedit_added.add_hook,
                                                                         with_kwargs=True)

    def forward(self, *args, **kwargs):
        """The base forward, telling the added module whether this call continues a KV cache."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.2x: `cache`
        length = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        added = self.kedit_added
        added.live, added.continuing = True, length > 0
        try:
            return super().forward(*args, **kwargs)
        finally:
            added.live, added.continuing = False, False
