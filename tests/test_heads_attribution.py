"""Direct attribution: per-head projections checked against hand computations on tiny models."""

import pytest
import torch

from cliffkit.heads import direct_attribution, head_contributions, model_heads, pad_left
from cliffkit.heads.testing import tiny_head_model


def _sequences(lengths, seed=0, vocab=300):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=generator) for length in lengths]


def _o_proj_inputs(lm, ids):
    """Capture each layer's o_proj input for one unpadded sequence with a plain forward pass."""
    heads = model_heads(lm.model)
    captured = {}
    handles = [heads.o_proj(layer).register_forward_pre_hook(
        lambda module, args, layer=layer: captured.__setitem__(layer, args[0])) for layer in range(heads.n_layers)]
    final = {}
    handles.append(heads.layer(heads.n_layers - 1).register_forward_hook(
        lambda module, args, output: final.__setitem__("x", output[0] if isinstance(output, tuple) else output)))
    with torch.no_grad():
        lm.model(input_ids=ids[None])
    for handle in handles:
        handle.remove()
    return captured, final["x"]


@pytest.mark.parametrize("model_type,overrides", [("qwen2", {}), ("qwen3", {"head_dim": 16}), ("phi3", {})])
def test_last_position_matches_hand_projection(model_type, overrides):
    lm = tiny_head_model(model_type, **overrides)
    heads = model_heads(lm.model)
    sequences = _sequences([6, 11, 8])
    direction = torch.randn(heads.d_model)

    result = direct_attribution(lm, sequences, direction, layer=1, batch_size=2, progress=False)

    assert result.per_trace.shape == (3, 2, heads.n_heads)
    for index, sequence in enumerate(sequences):
        inputs, _ = _o_proj_inputs(lm, sequence)
        for layer in range(2):
            expected = head_contributions(heads, layer, inputs[layer][0, -1]) @ direction
            torch.testing.assert_close(result.per_trace[index, layer].float(), expected, rtol=1e-4, atol=1e-5)
    # The mean divides by the number of traces, whatever the batch size.
    torch.testing.assert_close(result.scores, result.per_trace.sum(0) / 3)


def test_batch_size_does_not_change_results():
    lm = tiny_head_model("qwen2")
    sequences = _sequences([4, 13, 7, 9, 5])
    direction = torch.randn(32)
    one = direct_attribution(lm, sequences, direction, layer=1, batch_size=1, progress=False)
    five = direct_attribution(lm, sequences, direction, layer=1, batch_size=5, progress=False)
    torch.testing.assert_close(one.per_trace, five.per_trace, rtol=1e-4, atol=1e-6)


def test_layer_limits_heads_and_normalize_divides_by_norm():
    lm = tiny_head_model("qwen2")
    sequences = _sequences([6, 9])
    direction = torch.randn(32) * 3
    raw = direct_attribution(lm, sequences, direction, layer=0, progress=False)
    unit = direct_attribution(lm, sequences, direction, layer=0, normalize=True, progress=False)
    assert raw.per_trace.shape == (2, 1, 4)
    torch.testing.assert_close(unit.per_trace, raw.per_trace / direction.norm().double(), rtol=1e-5, atol=1e-7)


def test_gemma_heads_add_up_to_normed_attention_output():
    lm = tiny_head_model("gemma2", head_dim=16)
    heads = model_heads(lm.model)
    torch.manual_seed(3)
    with torch.no_grad():
        heads.post_attention_norm(0).weight.normal_()
    sequence = _sequences([10])[0]
    direction = torch.randn(32)

    result = direct_attribution(lm, [sequence], direction, layer=1, progress=False)

    inputs, _ = _o_proj_inputs(lm, sequence)
    written = heads.post_attention_norm(0)(heads.o_proj(0)(inputs[0]))[0, -1]  # what enters the residual stream
    torch.testing.assert_close(result.per_trace[0, 0].sum().float() + result.bias[0].float(), written @ direction,
                               rtol=1e-4, atol=1e-4)


def test_final_norm_space_scales_by_gain_and_rms():
    lm = tiny_head_model("llama")
    heads = model_heads(lm.model)
    torch.manual_seed(4)
    with torch.no_grad():
        heads.final_norm().weight.normal_()
    sequence = _sequences([8])[0]
    direction = torch.randn(32)

    result = direct_attribution(lm, [sequence], direction, layer=1, space="final_norm", progress=False)

    inputs, final = _o_proj_inputs(lm, sequence)
    x = final[0, -1]
    rms = x.pow(2).mean().add(heads.final_norm().variance_epsilon).sqrt()
    expected = head_contributions(heads, 1, inputs[1][0, -1]) @ (direction * heads.final_norm().weight) / rms
    torch.testing.assert_close(result.per_trace[0, 1].float(), expected, rtol=1e-4, atol=1e-5)
    # Summed over every component, the linearisation gives the normed score: check the
    # identity it rests on with the model's own norm module.
    torch.testing.assert_close(heads.final_norm()(x) @ direction, (x * heads.final_norm().weight) @ direction / rms,
                               rtol=1e-5, atol=1e-5)


def test_final_norm_space_needs_last_layer():
    lm = tiny_head_model("qwen2")
    with pytest.raises(ValueError, match="last block"):
        direct_attribution(lm, _sequences([5]), torch.randn(32), layer=0, space="final_norm", progress=False)


def test_trajectory_aligns_positions_from_the_end():
    lm = tiny_head_model("qwen2")
    heads = model_heads(lm.model)
    sequences = _sequences([5, 8])
    direction = torch.randn(32)

    result = direct_attribution(lm, sequences, direction, layer=1, positions="all", batch_size=2, progress=False)

    assert result.trajectory.shape == (8, 2, 4)
    assert result.trajectory_count.tolist() == [2, 2, 2, 2, 2, 1, 1, 1]
    per_sequence = []
    for sequence in sequences:
        inputs, _ = _o_proj_inputs(lm, sequence)
        per_sequence.append((head_contributions(heads, 0, inputs[0][0]) @ direction).flip(0))  # (seq, heads)
    expected_near_end = (per_sequence[0][:5] + per_sequence[1][:5]) / 2
    torch.testing.assert_close(result.trajectory[:5, 0].float(), expected_near_end, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.trajectory[5:, 0].float(), per_sequence[1][5:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.trajectory[0], result.scores)


def test_to_frame_has_one_row_per_head():
    lm = tiny_head_model("qwen2")
    result = direct_attribution(lm, _sequences([6]), torch.randn(32), layer=1, progress=False)
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "head", "attribution"]
    assert len(frame) == 8
    assert frame.loc[(frame["layer"] == 1) & (frame["head"] == 2), "attribution"].item() == pytest.approx(
        float(result.scores[1, 2]))


def test_bad_direction_is_rejected():
    lm = tiny_head_model("qwen2")
    with pytest.raises(ValueError, match="d_model=32"):
        direct_attribution(lm, _sequences([5]), torch.randn(31), layer=1, progress=False)
    with pytest.raises(ValueError, match="non-zero"):
        direct_attribution(lm, _sequences([5]), torch.zeros(32), layer=1, progress=False)


def test_pad_left_keeps_last_token_at_the_end():
    batch = pad_left([[5, 6, 7], [9]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
