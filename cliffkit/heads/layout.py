"""Where the attention heads of each architecture live, keyed by `config.model_type`.

A `HeadLayout` names the module paths (decoder layers, the attention output
projection, the final norm) of one architecture. `model_heads(model)` binds a
layout to a loaded model and reads the head geometry from its config. Supporting
another architecture means one `register_layout(HeadLayout(...))` call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import reduce

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadLayout:
    """Module paths of one architecture, as dotted attribute paths.

    `layers_path`, `body_path` and `final_norm_path` start at the causal-LM module
    (the object `AutoModelForCausalLM` returns). `o_proj_path` and
    `post_attention_norm_path` start at one decoder layer. The input of the output
    projection is the concatenation of the per-head attention outputs, head after
    head, which is what head attribution and ablation act on.
    """

    model_type: str
    body_path: str = "model"
    layers_path: str = "model.layers"
    o_proj_path: str = "self_attn.o_proj"
    final_norm_path: str = "model.norm"
    # Gemma 2 and 3 normalise the attention output (RMSNorm) before adding it to
    # the residual stream. Llama-style layers add the projection output directly.
    post_attention_norm_path: str | None = None
    # Gemma's RMSNorm multiplies by (1 + weight), Llama's by weight.
    norm_weight_offset: float = 0.0
    description: str = ""


HEAD_LAYOUTS: dict[str, HeadLayout] = {}


def register_layout(layout: HeadLayout) -> HeadLayout:
    """Add (or replace) the layout for `layout.model_type` and return it."""
    HEAD_LAYOUTS[layout.model_type] = layout
    return layout


for _layout in [
    HeadLayout("qwen2", description="Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen, QwQ, Skywork-OR1."),
    HeadLayout("qwen3", description="Qwen3 dense: head_dim set in the config, q/k norms."),
    HeadLayout("qwen3_moe", description="Qwen3 mixture of experts: the attention is the Qwen3 one."),
    HeadLayout("llama", description="Llama and DeepSeek-R1-Distill-Llama."),
    HeadLayout("mistral", description="Mistral."),
    HeadLayout("phi3", description="Phi-3 and Phi-4-mini: fused qkv_proj, separate o_proj."),
    HeadLayout("gemma2", post_attention_norm_path="post_attention_layernorm", norm_weight_offset=1.0,
               description="Gemma 2: attention output normalised before the residual add."),
    HeadLayout("gemma3_text", post_attention_norm_path="post_attention_layernorm", norm_weight_offset=1.0,
               description="Gemma 3 text: as Gemma 2, with q/k norms."),
]:
    register_layout(_layout)


def get_layout(model_type: str) -> HeadLayout:
    """Return the registered layout of `model_type`, or raise ValueError naming the supported ones."""
    try:
        return HEAD_LAYOUTS[model_type]
    except KeyError:
        supported = ", ".join(sorted(HEAD_LAYOUTS))
        raise ValueError(
            f"No head layout for model_type {model_type!r}. Supported model types: {supported}. "
            "To add one, call cliffkit.heads.register_layout(HeadLayout(model_type=..., "
            "layers_path=..., o_proj_path=..., final_norm_path=...)) with the attribute paths of "
            "that architecture (see `print(model)`)."
        ) from None


def resolve_path(root: nn.Module, dotted: str) -> nn.Module:
    """Follow a dotted attribute path such as "model.layers" from `root`."""
    try:
        return reduce(getattr, dotted.split("."), root)
    except AttributeError as error:
        raise ValueError(f"{type(root).__name__} has no module at {dotted!r} ({error}). "
                         "The registered head layout does not match this model; fix it with register_layout.") from error


@dataclass(frozen=True)
class ModelHeads:
    """A head layout bound to one model, with the head geometry read from its config.

    `head_dim` is `config.head_dim` when set (Gemma, Qwen3: not d_model / n_heads),
    else d_model / n_heads. Query heads share key/value heads in groups of
    `n_heads // n_kv_heads` (grouped-query attention), which does not change the
    per-head split of the output projection's input.
    """

    model: nn.Module
    layout: HeadLayout
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int

    @property
    def n_total(self) -> int:
        """Number of attention heads in the whole model."""
        return self.n_layers * self.n_heads

    def body(self) -> nn.Module:
        """The decoder without the language-model head (embeddings, layers, final norm)."""
        return resolve_path(self.model, self.layout.body_path)

    def layers(self) -> nn.ModuleList:
        return resolve_path(self.model, self.layout.layers_path)

    def layer(self, index: int) -> nn.Module:
        self.check_layer(index)
        return self.layers()[index]

    def o_proj(self, index: int) -> nn.Linear:
        """The attention output projection of decoder layer `index`."""
        return resolve_path(self.layer(index), self.layout.o_proj_path)

    def final_norm(self) -> nn.Module:
        return resolve_path(self.model, self.layout.final_norm_path)

    def post_attention_norm(self, index: int) -> nn.Module | None:
        """The norm between the attention output and the residual add, or None (Llama-style layers)."""
        if self.layout.post_attention_norm_path is None:
            return None
        return resolve_path(self.layer(index), self.layout.post_attention_norm_path)

    def w_o(self, index: int) -> torch.Tensor:
        """The output projection weight of layer `index` split by head: (d_model, n_heads, head_dim)."""
        return self.o_proj(index).weight.view(self.d_model, self.n_heads, self.head_dim)

    def check_layer(self, index: int) -> None:
        if not 0 <= index < self.n_layers:
            raise ValueError(f"layer {index} is out of range: the model has decoder layers 0..{self.n_layers - 1}.")

    def check_head(self, layer: int, head: int) -> None:
        self.check_layer(layer)
        if not 0 <= head < self.n_heads:
            raise ValueError(f"head {head} of layer {layer} is out of range: each layer has heads "
                             f"0..{self.n_heads - 1}.")


def model_heads(model: nn.Module) -> ModelHeads:
    """Bind the layout of `model`'s architecture to it and check the geometry against its weights.

    Accepts a causal-LM module or anything with a `.model` attribute holding one
    (such as `cliffkit.models.LoadedModel`).
    """
    if not hasattr(model, "config") and hasattr(model, "model"):
        model = model.model
    config = model.config.get_text_config()
    layout = get_layout(config.model_type)

    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d_model // n_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    heads = ModelHeads(model=model, layout=layout, n_layers=config.num_hidden_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=head_dim, d_model=d_model)

    o_proj = heads.o_proj(0)
    if tuple(o_proj.weight.shape) != (d_model, n_heads * head_dim):
        raise ValueError(
            f"{config.model_type}: o_proj weight has shape {tuple(o_proj.weight.shape)}, expected "
            f"(d_model={d_model}, n_heads*head_dim={n_heads * head_dim}). The config's head geometry "
            "does not match the weights, so per-head slices would be wrong."
        )
    return heads


def rms_norm_gain(norm: nn.Module, offset: float) -> tuple[torch.Tensor, float]:
    """Return an RMSNorm's per-channel gain (weight + offset) in float32 and its epsilon."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm, "eps", None)
    if eps is None or not hasattr(norm, "weight"):
        raise ValueError(f"{type(norm).__name__} is not an RMSNorm with `weight` and `eps`/`variance_epsilon`; "
                         "the norm-aware projection supports RMSNorm only.")
    return norm.weight.detach().float() + offset, float(eps)


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Return 1 / RMS(x) over the last dimension, in float32, keeping that dimension: (..., 1)."""
    x = x.float()
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
