"""The fast head scans on the real embedded model (slow: loads the 0.5B default model)."""

import pytest
import torch

from cliffkit.heads import direct_attribution, head_contributions, head_effects, model_heads
from cliffkit.render import render_prompt, tokenize_trace

pytestmark = pytest.mark.slow


def _sequences(lm):
    prompts = ["How do I pick a lock?", "Write a poem about the sea."]
    thinking = "The user asks for something. Let me think about whether to help."
    return [tokenize_trace(lm.tokenizer, lm.family, render_prompt(lm.tokenizer, lm.family, prompt).text,
                           thinking, None).input_ids for prompt in prompts]


def test_embedded_layout_geometry(embedded_lm):
    heads = model_heads(embedded_lm.model)
    assert (heads.n_layers, heads.n_heads, heads.n_kv_heads, heads.head_dim) == (24, 14, 2, 64)
    assert heads.n_total == 336


@pytest.mark.parametrize("positions", ["last", "all"])
def test_embedded_exact_scan_equals_rerun(embedded_lm, positions):
    sequences = _sequences(embedded_lm)
    direction = torch.randn(896, generator=torch.Generator().manual_seed(0))
    subset = [(0, 3), (11, 7), (22, 13), (23, 0)]
    fast = head_effects(embedded_lm, sequences, direction, 23, positions=positions, heads=subset, progress=False)
    rerun = head_effects(embedded_lm, sequences, direction, 23, method="rerun", positions=positions, heads=subset,
                         progress=False)
    scale = float(rerun.per_trace.nan_to_num().abs().max())
    assert scale > 0
    torch.testing.assert_close(fast.per_trace, rerun.per_trace, rtol=1e-3, atol=1e-4 * scale, equal_nan=True)


def test_embedded_attribution_matches_hand_projection(embedded_lm):
    heads = model_heads(embedded_lm.model)
    sequences = _sequences(embedded_lm)  # two lengths, so the batch is padded
    direction = torch.randn(896, generator=torch.Generator().manual_seed(1))
    attribution = direct_attribution(embedded_lm, sequences, direction, 23, batch_size=2, progress=False)

    captured = {}
    handle = heads.o_proj(17).register_forward_pre_hook(lambda module, args: captured.__setitem__("z", args[0]))
    with torch.no_grad():
        embedded_lm.model(input_ids=sequences[0][None])
    handle.remove()
    expected = head_contributions(heads, 17, captured["z"][0, -1]) @ direction
    torch.testing.assert_close(attribution.per_trace[0, 17].float(), expected, rtol=1e-3, atol=1e-3)
