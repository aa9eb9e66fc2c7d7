"""Per-architecture knowledge as data: where the edited MLP matrix, its key input, the layers,
final norm, unembedding and embeddings live, and whether weights are stored transposed.

Adding a family is one row in :data:`ARCHITECTURES`; an unknown one can be declared in a small
YAML/JSON file (see :func:`load_arch_spec`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (dotted, relative to the model) for one architecture family.

    ``layers`` is the ModuleList of blocks; ``mlp_out``, ``mlp`` and ``attn`` are relative to
    one block. The edited matrix is ``mlp_out``'s weight; its *input* is the key ``k``.
    ``transposed`` marks Conv1D-style weights stored ``[in, out]`` (GPT-2). ``mlp_post_norm`` (relative
    to a block) names a norm between the MLP's output and the residual stream (Gemma 2/3's
    ``post_feedforward_layernorm``): a change meant for the residual stream is added after it, since
    one added at ``mlp_out`` reaches the stream rescaled and turned by that norm.
    """

    layers: str
    mlp_out: str
    mlp: str
    attn: str
    embed: str
    final_norm: str
    unembed: str
    transposed: bool = False
    mlp_post_norm: str | None = None


_LLAMA = ArchSpec(
    layers="model.layers", mlp_out="mlp.down_proj", mlp="mlp", attn="self_attn",
    embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
)

_POST_NORM = ArchSpec(**{**asdict(_LLAMA), "mlp_post_norm": "post_feedforward_layernorm"})

ARCHITECTURES: dict[str, ArchSpec] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "smollm3", "phi3")},
    # the MLP's output passes a norm of its own before the residual add
    **{t: _POST_NORM for t in ("gemma2", "gemma3_text", "olmo2")},
    "gpt2": ArchSpec(
        layers="transformer.h", mlp_out="mlp.c_proj", mlp="mlp", attn="attn",
        embed="transformer.wte", final_norm="transformer.ln_f", unembed="lm_head", transposed=True,
    ),
    "gptj": ArchSpec(
        layers="transformer.h", mlp_out="mlp.fc_out", mlp="mlp", attn="attn",
        embed="transformer.wte", final_norm="transformer.ln_f", unembed="lm_head",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers", mlp_out="mlp.dense_4h_to_h", mlp="mlp", attn="attention",
        embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm", unembed="embed_out",
    ),
}

ARCH_SPEC_FILE = "kedit_arch.json"


class UnknownArchitectureError(ValueError):
    pass


def load_arch_spec(path: str | Path) -> ArchSpec:
    """Read an :class:`ArchSpec` from a JSON or YAML file with the dataclass's field names."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    names = {f.name for f in fields(ArchSpec)}
    unknown = set(data) - names
    required = {f.name for f in fields(ArchSpec) if f.name not in ("transposed", "mlp_post_norm")}
    missing = required - set(data)
    if unknown or missing:
        raise ValueError(f"{path}: architecture spec has unknown fields {sorted(unknown)} "
                         f"and misses required fields {sorted(missing)}")
    return ArchSpec(**data)


def spec_for(model_type: str, override: ArchSpec | None = None) -> ArchSpec:
    if override is not None:
        return override
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        names = ", ".join(f.name for f in fields(ArchSpec))
        raise UnknownArchitectureError(
            f"kedit has no adapter for model_type={model_type!r} (known: {sorted(ARCHITECTURES)}). "
            f"Declare one in a JSON/YAML file with the fields {names} (dotted module paths; "
            f"'transposed' true for Conv1D weights) and pass it as --arch FILE, or save it as "
            f"{ARCH_SPEC_FILE} in the model directory."
        ) from None


class ModelAdapter:
    """Uniform access to one loaded model's editable parts, whatever its family."""

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None) -> None:
        self.model = model
        self.model_type = getattr(model.config, "model_type", "unknown")
        self.spec = spec_for(self.model_type, spec)
        modules = dict(model.named_modules())
        for attr in ("layers", "embed", "final_norm"):
            if getattr(self.spec, attr) not in modules:
                raise UnknownArchitectureError(
                    f"{type(model).__name__}: module {getattr(self.spec, attr)!r} ({attr}) not found")
        self._modules = modules

    # --- names ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self._modules[self.spec.layers])

    def layer_name(self, i: int) -> str:
        return f"{self.spec.layers}.{i}"

    def mlp_out_name(self, i: int) -> str:
        return f"{self.layer_name(i)}.{self.spec.mlp_out}"

    def residual_out_name(self, i: int) -> str:
        """The module whose output joins the residual stream after layer ``i``'s MLP: its post-norm where
        the family has one, else the down-projection."""
        post = self.spec.mlp_post_norm
        return f"{self.layer_name(i)}.{post}" if post else self.mlp_out_name(i)

    def mlp_name(self, i: int) -> str:
        return f"{self.layer_name(i)}.{self.spec.mlp}"

    def attn_name(self, i: int) -> str:
        return f"{self.layer_name(i)}.{self.spec.attn}"

    def weight_name(self, i: int) -> str:
        """State-dict key of the edited matrix at layer ``i``."""
        return f"{self.mlp_out_name(i)}.weight"

    # --- modules -------------------------------------------------------------------------
    def module(self, name: str) -> nn.Module:
        return self._modules[name]

    def mlp_out(self, i: int) -> nn.Module:
        return self._modules[self.mlp_out_name(i)]

    @property
    def embed(self) -> nn.Module:
        return self._modules[self.spec.embed]

    @property
    def final_norm(self) -> nn.Module:
        return self._modules[self.spec.final_norm]

    @property
    def unembed(self) -> nn.Module:
        mod = self._modules.get(self.spec.unembed)
        return mod if mod is not None else self.model.get_output_embeddings()

    # --- the edited matrix, always seen as [out, in] ---------------------------------------
    def weight(self, i: int) -> torch.Tensor:
        """The edited matrix as ``[d_out, d_key]`` (a view; transposed for Conv1D)."""
        w = self.mlp_out(i).weight
        return w.T if self.spec.transposed else w

    def key_dim(self, i: int = 0) -> int:
        return self.weight(i).shape[1]

    def out_dim(self, i: int = 0) -> int:
        return self.weight(i).shape[0]

    def to_stored(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """Convert an ``[out, in]`` delta to the parameter's stored layout."""
        return delta_out_in.T.contiguous() if self.spec.transposed else delta_out_in

    def from_stored(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.T if self.spec.transposed else stored

    def describe(self) -> dict:
        return {"model_type": self.model_type, "num_layers": self.num_layers,
                "key_dim": self.key_dim(), "hidden": self.out_dim(), **asdict(self.spec)}
