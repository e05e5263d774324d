"""Causal head scans: the fast exact scans against brute-force reruns, and attribution patching against exact effects."""

import copy

import pytest
import torch

from cliffkit.heads import Ablation, ablate_heads, head_effects, model_heads
from cliffkit.heads.testing import tiny_head_model

ARCHITECTURES = [
    ("qwen2", {}),
    ("qwen2", {"attn_implementation": "eager"}),
    ("qwen3", {"head_dim": 16}),
    ("llama", {"num_key_value_heads": 1}),
    ("mistral", {}),
    ("gemma2", {"head_dim": 16, "sliding_window": 3}),  # windows shorter than the sequences
    ("gemma3_text", {"head_dim": 16, "sliding_window": 3}),
    ("phi3", {}),
]


def _sequences(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (length,), generator=generator) for length in lengths]


def _block_output(model, ids, layer):
    """Residual stream at `layer`, last position, from a plain forward pass of one unpadded sequence."""
    heads = model_heads(model)
    captured = {}
    handle = heads.layer(layer).register_forward_hook(
        lambda module, args, output: captured.__setitem__("x", output[0] if isinstance(output, tuple) else output))
    with torch.no_grad():
        model(input_ids=ids[None])
    handle.remove()
    return captured["x"][0, -1]


def _zeroed_copy(model, layer, head):
    edited = copy.deepcopy(model)
    heads = model_heads(edited)
    with torch.no_grad():
        heads.o_proj(layer).weight[:, head * heads.head_dim:(head + 1) * heads.head_dim] = 0
    return edited


def _brute_force(lm, sequences, direction, layer, positions):
    """Ablate one head at a time and rerun the whole model on each sequence alone."""
    heads = model_heads(lm.model)
    effects = torch.zeros(len(sequences), layer + 1, heads.n_heads, dtype=torch.float64)
    for index, ids in enumerate(sequences):
        clean = _block_output(lm.model, ids, layer) @ direction
        for ablated_layer in range(layer + 1):
            for head in range(heads.n_heads):
                if positions == "last":
                    with ablate_heads(lm, [(ablated_layer, head)], positions=1):
                        score = _block_output(lm.model, ids, layer) @ direction
                else:
                    score = _block_output(_zeroed_copy(lm.model, ablated_layer, head), ids, layer) @ direction
                effects[index, ablated_layer, head] = float(score - clean)
    return effects


@pytest.mark.parametrize("model_type,overrides", ARCHITECTURES)
@pytest.mark.parametrize("positions", ["last", "all"])
def test_exact_scan_equals_brute_force(model_type, overrides, positions):
    lm = tiny_head_model(model_type, **overrides)
    sequences = _sequences([7, 12, 5])
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1))

    fast = head_effects(lm, sequences, direction, layer=1, positions=positions, batch_size=2, progress=False)
    expected = _brute_force(lm, sequences, direction, 1, positions)

    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(fast.per_trace, expected, rtol=1e-4, atol=1e-5 * float(scale))


@pytest.mark.parametrize("positions", ["last", "all"])
def test_exact_scan_equals_rerun_for_mean_ablation(positions):
    lm = tiny_head_model("qwen2")
    heads = model_heads(lm.model)
    means = torch.randn(heads.n_layers, heads.n_heads, heads.head_dim)
    sequences = _sequences([6, 10, 8])
    direction = torch.randn(32)
    options = dict(positions=positions, ablation=Ablation("mean", means=means), batch_size=3, progress=False)
    fast = head_effects(lm, sequences, direction, 1, method="exact", **options)
    rerun = head_effects(lm, sequences, direction, 1, method="rerun", **options)
    torch.testing.assert_close(fast.per_trace, rerun.per_trace, rtol=1e-4, atol=1e-6)


def test_clean_scores_include_intercept_and_match_plain_forward():
    lm = tiny_head_model("qwen2")
    sequences = _sequences([6, 9])
    direction = torch.randn(32)
    result = head_effects(lm, sequences, direction, 1, intercept=2.5, batch_size=2, progress=False)
    expected = torch.stack([_block_output(lm.model, ids, 1) @ direction for ids in sequences]).double() + 2.5
    torch.testing.assert_close(result.clean_scores, expected, rtol=1e-5, atol=1e-5)


def test_chunking_keeps_results():
    lm = tiny_head_model("qwen2")
    sequences = _sequences([4, 11, 7, 9])
    direction = torch.randn(32)
    for positions in ("last", "all"):
        one = head_effects(lm, sequences, direction, 1, positions=positions, batch_size=1, heads_per_pass=1,
                           progress=False)
        many = head_effects(lm, sequences, direction, 1, positions=positions, batch_size=4, progress=False)
        torch.testing.assert_close(one.per_trace, many.per_trace, rtol=1e-4, atol=1e-6)


def test_head_subset_leaves_others_nan():
    lm = tiny_head_model("qwen2")
    result = head_effects(lm, _sequences([6, 8]), torch.randn(32), 1, heads=[(0, 2), (1, 1)], progress=False)
    scanned = ~torch.isnan(result.effects)
    assert scanned.sum() == 2
    assert scanned[0, 2]
    assert scanned[1, 1]


def test_heads_after_the_probe_layer_are_rejected():
    lm = tiny_head_model("qwen2")
    with pytest.raises(ValueError, match="cannot change"):
        head_effects(lm, _sequences([6]), torch.randn(32), 0, heads=[(1, 0)], progress=False)


def test_sequences_need_two_tokens():
    lm = tiny_head_model("qwen2")
    with pytest.raises(ValueError, match="shorter than 2"):
        head_effects(lm, _sequences([1, 5]), torch.randn(32), 1, progress=False)


@pytest.mark.parametrize("positions", ["last", "all"])
def test_patching_matches_exact_for_small_ablations(positions):
    # Scaling a head by 0.999 is a small step, so the first-order estimate must agree
    # with the exact change up to second-order terms, through every later block.
    lm = tiny_head_model("qwen2", dtype=torch.float64)
    sequences = _sequences([6, 10, 8])
    direction = torch.randn(32, dtype=torch.float64)
    options = dict(positions=positions, ablation=Ablation("scale", factor=0.999), batch_size=3, progress=False)

    exact = head_effects(lm, sequences, direction, 1, method="exact", **options)
    patched = head_effects(lm, sequences, direction, 1, method="patching", **options)

    scale = float(exact.per_trace.abs().max())
    assert scale > 0
    torch.testing.assert_close(patched.per_trace, exact.per_trace, rtol=0, atol=2e-3 * scale)
    torch.testing.assert_close(patched.clean_scores, exact.clean_scores)


def test_patching_is_exact_without_later_nonlinearity():
    # With the MLPs switched off and the probe reading block 0, the score is linear in block 0's
    # head outputs, so the estimate of zero ablation is exact.
    lm = tiny_head_model("llama")
    with torch.no_grad():
        for layer in lm.model.model.layers:
            layer.mlp.down_proj.weight.zero_()
    sequences = _sequences([5, 9])
    direction = torch.randn(32)
    exact = head_effects(lm, sequences, direction, 0, positions="all", progress=False)
    patched = head_effects(lm, sequences, direction, 0, method="patching", positions="all", progress=False)
    torch.testing.assert_close(patched.per_trace, exact.per_trace, rtol=1e-4, atol=1e-6)


def test_patching_leaves_parameters_trainable_and_hooks_removed():
    lm = tiny_head_model("qwen2")
    heads = model_heads(lm.model)
    head_effects(lm, _sequences([6]), torch.randn(32), 1, method="patching", progress=False)
    assert all(parameter.requires_grad for parameter in lm.model.parameters())
    assert all(parameter.grad is None for parameter in lm.model.parameters())
    assert len(heads.o_proj(0)._forward_pre_hooks) == 0
    assert len(lm.model.get_input_embeddings()._forward_hooks) == 0


def test_effects_frame_named_by_method():
    lm = tiny_head_model("qwen2")
    result = head_effects(lm, _sequences([6]), torch.randn(32), 1, positions="all", progress=False)
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "head", "exact_all"]
    assert len(frame) == 8
