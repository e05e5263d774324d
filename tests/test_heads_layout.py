"""Head layouts: every supported architecture splits its output projection into heads exactly."""

import pytest
import torch

from cliffkit.heads import HEAD_LAYOUTS, HeadLayout, get_layout, head_contributions, model_heads, register_layout
from cliffkit.heads.testing import tiny_head_model

# (model_type, config overrides). Qwen3 and Gemma get head_dim 16, so n_heads * head_dim
# = 64 differs from d_model = 32; every model has 4 query heads over 2 KV heads.
ARCHITECTURES = [
    ("qwen2", {}),
    ("qwen3", {"head_dim": 16}),
    ("qwen3_moe", {"head_dim": 16}),
    ("llama", {}),
    ("mistral", {}),
    ("gemma2", {"head_dim": 16}),
    ("gemma3_text", {"head_dim": 16}),
    ("phi3", {}),
]


def _with_bias(lm):
    """Give every o_proj a random bias, so the bias term of the decomposition is tested too."""
    torch.manual_seed(1)
    for layer in lm.model.model.layers:
        o_proj = layer.self_attn.o_proj
        o_proj.bias = torch.nn.Parameter(torch.randn(o_proj.out_features))
    return lm


@pytest.mark.parametrize("model_type,overrides", ARCHITECTURES)
def test_head_split_sums_to_o_proj_output(model_type, overrides):
    lm = _with_bias(tiny_head_model(model_type, **overrides))
    heads = model_heads(lm.model)
    captured = {}

    def hook(module, args, output):
        captured["input"], captured["output"] = args[0], output

    ids = torch.randint(0, 300, (2, 9))
    for layer in range(heads.n_layers):
        handle = heads.o_proj(layer).register_forward_hook(hook)
        with torch.no_grad():
            lm.model(input_ids=ids)
        handle.remove()

        per_head = head_contributions(heads, layer, captured["input"])
        assert per_head.shape == (2, 9, heads.n_heads, heads.d_model)
        total = per_head.sum(dim=-2) + heads.o_proj(layer).bias
        torch.testing.assert_close(total, captured["output"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type,overrides", ARCHITECTURES)
def test_geometry_read_from_config(model_type, overrides):
    heads = model_heads(tiny_head_model(model_type, **overrides).model)
    assert heads.n_layers == 2
    assert heads.n_heads == 4
    assert heads.n_kv_heads == 2
    assert heads.head_dim == overrides.get("head_dim", 8)
    assert heads.d_model == 32
    assert heads.n_total == 8
    assert heads.w_o(1).shape == (32, 4, heads.head_dim)


def test_head_split_matches_weight_columns():
    heads = model_heads(tiny_head_model("qwen3", head_dim=16).model)
    z = torch.randn(3, heads.n_heads * heads.head_dim)
    weight = heads.o_proj(0).weight
    per_head = head_contributions(heads, 0, z)
    for head in range(heads.n_heads):
        columns = slice(head * 16, (head + 1) * 16)
        torch.testing.assert_close(per_head[:, head], z[:, columns] @ weight[:, columns].T)


def test_gemma_layout_has_post_attention_norm():
    gemma = model_heads(tiny_head_model("gemma2", head_dim=16).model)
    qwen = model_heads(tiny_head_model("qwen2").model)
    assert gemma.post_attention_norm(0) is gemma.layer(0).post_attention_layernorm
    assert qwen.post_attention_norm(0) is None
    assert gemma.layout.norm_weight_offset == 1.0


def test_unknown_model_type_names_supported_ones():
    with pytest.raises(ValueError) as error:
        get_layout("mamba")
    message = str(error.value)
    assert "'mamba'" in message
    assert "qwen2" in message
    assert "gemma3_text" in message
    assert "register_layout" in message


def test_register_layout_adds_an_architecture():
    layout = register_layout(HeadLayout("custom_test_type", o_proj_path="attn.out"))
    try:
        assert get_layout("custom_test_type") is layout
    finally:
        HEAD_LAYOUTS.pop("custom_test_type")


def test_mismatched_geometry_is_rejected():
    lm = tiny_head_model("qwen2")
    lm.model.config.head_dim = 16  # the weights still hold 4 heads of 8
    with pytest.raises(ValueError, match="head geometry"):
        model_heads(lm.model)


def test_out_of_range_head_is_rejected():
    heads = model_heads(tiny_head_model("qwen2").model)
    with pytest.raises(ValueError, match="layer 5"):
        heads.check_head(5, 0)
    with pytest.raises(ValueError, match="head 4"):
        heads.check_head(0, 4)
