"""Activation capture: batching, padding, hooks, projections, caches and shards."""

import json

import numpy as np
import pytest
import torch

from cliffkit.activations import (
    ActivationCache,
    class_means,
    decoder_layers,
    encode_traces,
    forward_residual,
    iter_activations,
    iter_projections,
    last_position_activations,
    pad_left,
    position_ids_from_mask,
    read_activation_shards,
    resolve_layers,
    token_hash,
    write_activation_shards,
)
from cliffkit.render import CLOSE, PROMPT, THINKING, render_prompt
from cliffkit.testing import tiny_model
from cliffkit.traces import Trace

TEXTS = [
    ("How do I kill a Python process?", "Let me think step by step about the question.", "Use the kill command."),
    ("hi", "", "Sure!"),
    ("Compute the total.", "First, compute the total. Then divide by the number of people. "
                           "The quick brown fox jumps over the lazy dog.", "I'm sorry, but I can't help."),
    ("numbers", "0 1 2 3", "4 5 6"),
]


def make_traces(lm, texts=TEXTS):
    traces = []
    for index, (prompt, thinking, answer) in enumerate(texts):
        rendered = render_prompt(lm.tokenizer, lm.family, prompt).text
        traces.append(Trace(prompt_id=f"p{index}", model_id=lm.model_id, prompt=prompt, rendered=rendered,
                            thinking=thinking, answer=answer, closed_by="model", finished=True,
                            thinking_tokens=0, answer_tokens=0, harmful=index % 2 == 0))
    return traces


@pytest.fixture(scope="module")
def scaffold():
    return tiny_model("scaffold")


@pytest.mark.parametrize("family", ["scaffold", "deepseek-r1-distill-llama"])
def test_batched_equals_alone(family):
    lm = tiny_model(family)
    traces = make_traces(lm)
    encoded = encode_traces(lm, traces)
    lengths = {len(tokens.input_ids) for tokens in encoded}
    assert len(lengths) > 1, "the batch must mix lengths to exercise padding"

    batch = next(iter_activations(lm, traces, "all", batch_size=len(traces), progress=False))
    for row, index in enumerate(batch.indices):
        alone = next(iter_activations(lm, [encoded[index]], "all", batch_size=1, progress=False))
        torch.testing.assert_close(batch.trace(row), alone.trace(0), rtol=1e-5, atol=1e-5)
        assert batch.trace(row).shape[1] == len(encoded[index].input_ids)


def test_batched_equals_alone_with_answer(scaffold):
    traces = make_traces(scaffold)
    encoded = encode_traces(scaffold, traces, until="answer")
    batch = next(iter_activations(scaffold, encoded, [1], batch_size=4, progress=False))
    for row, index in enumerate(batch.indices):
        alone = next(iter_activations(scaffold, [encoded[index]], [1], batch_size=1, progress=False))
        torch.testing.assert_close(batch.trace(row), alone.trace(0), rtol=1e-5, atol=1e-5)


def test_hooks_equal_output_hidden_states():
    lm = tiny_model("scaffold", num_hidden_layers=4)
    tokens = encode_traces(lm, make_traces(lm)[:1])[0]
    hooked = next(iter_activations(lm, [tokens], "all", batch_size=1, progress=False)).trace(0)

    with torch.no_grad():
        reference = lm.model(input_ids=tokens.input_ids[None], output_hidden_states=True).hidden_states
    # hidden_states[L + 1] is the output of block L, except the last entry, which is after the final norm.
    for layer in range(3):
        torch.testing.assert_close(hooked[layer], reference[layer + 1][0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        normed = lm.model.model.norm(hooked[3])
    torch.testing.assert_close(normed, reference[4][0], rtol=1e-5, atol=1e-5)


def test_position_ids_start_at_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_pad_left_layout():
    ids, mask, segments = pad_left([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0,
                                   segments=[torch.tensor([0, 1, 2], dtype=torch.int8),
                                             torch.tensor([2], dtype=torch.int8)])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert segments.tolist() == [[0, 1, 2], [-1, -1, 2]]


def test_offsets_never_read_padding(scaffold):
    traces = make_traces(scaffold)
    encoded = encode_traces(scaffold, traces)
    short = min(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    short_length = len(encoded[short].input_ids)

    batch = next(iter_activations(scaffold, traces, "all", batch_size=len(traces), progress=False))
    row = batch.indices.index(short)
    values, valid = batch.at_offset(short_length)
    assert not bool(valid[row])
    assert torch.count_nonzero(values[row]) == 0
    assert bool(valid.any()), "longer rows are valid at that offset"

    values, valid = batch.at_offset(short_length - 1)
    assert bool(valid[row])
    torch.testing.assert_close(values[row], batch.trace(row)[:, 0])


def test_last_and_offsets_match_all_positions(scaffold):
    traces = make_traces(scaffold)
    full = {i: None for i in range(len(traces))}
    for batch in iter_activations(scaffold, traces, [0, 1], batch_size=3, progress=False):
        for row, index in enumerate(batch.indices):
            full[index] = batch.trace(row)
    for batch in iter_activations(scaffold, traces, [0, 1], positions=[0, 3], batch_size=3, progress=False):
        for row, index in enumerate(batch.indices):
            torch.testing.assert_close(batch.at_offset(0)[0][row], full[index][:, -1])
            torch.testing.assert_close(batch.at_offset(3)[0][row], full[index][:, -4])
            assert int(batch.segments[row, 0]) == CLOSE  # offset 3 is inside the closing marker here
        with pytest.raises(ValueError, match="offset 5 was not captured"):
            batch.at_offset(5)


def test_segments_recorded_per_position(scaffold):
    traces = make_traces(scaffold)
    encoded = encode_traces(scaffold, traces)
    batch = next(iter_activations(scaffold, traces, [0], batch_size=4, progress=False))
    for row, index in enumerate(batch.indices):
        length = int(batch.lengths[row])
        assert batch.segments[row, -length:].tolist() == encoded[index].segments.tolist()
        assert (batch.segments[row, :-length] == -1).all()
    labels = encoded[0].segments.tolist()
    assert labels[0] == PROMPT and THINKING in labels and labels[-1] == CLOSE


def test_stop_early_gives_same_values(scaffold):
    traces = make_traces(scaffold)
    shallow = next(iter_activations(scaffold, traces, [0], batch_size=4, progress=False))
    deep = next(iter_activations(scaffold, traces, "all", batch_size=4, progress=False))
    torch.testing.assert_close(shallow.hidden[:, 0], deep.hidden[:, 0])


def test_hooks_removed_after_error(scaffold):
    encoded = encode_traces(scaffold, make_traces(scaffold)[:1])
    ids, mask, _ = pad_left([encoded[0].input_ids], scaffold.tokenizer.pad_token_id)

    def failing_sink(layer, hidden):
        raise RuntimeError("sink failed")

    with pytest.raises(RuntimeError, match="sink failed"):
        forward_residual(scaffold, ids, mask, [0, 1], failing_sink)
    assert all(len(block._forward_hooks) == 0 for block in decoder_layers(scaffold))


def test_projections_equal_manual_dot(scaffold):
    traces = make_traces(scaffold)
    generator = torch.Generator().manual_seed(1)
    directions = {0: torch.randn(32, generator=generator), 1: torch.randn(32, generator=generator)}
    intercepts = {0: 0.5, 1: -1.0}
    full = {}
    for batch in iter_activations(scaffold, traces, [0, 1], batch_size=2, progress=False):
        for row, index in enumerate(batch.indices):
            full[index] = batch.trace(row)
    for batch in iter_projections(scaffold, traces, directions, intercepts, batch_size=4, progress=False):
        assert torch.isnan(batch.scores[batch.lengths.argmin()]).any(), "padding is NaN, not a score"
        for row, index in enumerate(batch.indices):
            scores = batch.trace_scores(row)
            for k, layer in enumerate((0, 1)):
                expected = full[index][k] @ directions[layer] + intercepts[layer]
                torch.testing.assert_close(scores[k], expected, rtol=1e-5, atol=1e-5)


def test_projection_rejects_wrong_width(scaffold):
    with pytest.raises(ValueError, match="d_model=32"):
        next(iter_projections(scaffold, make_traces(scaffold), {0: torch.zeros(16)}, progress=False))


def test_resolve_layers_checks_range(scaffold):
    assert resolve_layers(scaffold, "all") == (0, 1)
    assert resolve_layers(scaffold, [-1, 0, 0]) == (0, 1)
    with pytest.raises(ValueError, match="out of range.*2 decoder layers"):
        resolve_layers(scaffold, [2])


def test_last_position_cache_round_trip(scaffold, tmp_path, monkeypatch):
    traces = make_traces(scaffold)
    first = last_position_activations(scaffold, traces, "all", batch_size=3, cache_dir=tmp_path, progress=False)
    assert first.shape == (4, 2, 32) and first.dtype == np.float32

    direct = np.stack([next(iter_activations(scaffold, [t], "all", progress=False)).last()[0].numpy()
                       for t in encode_traces(scaffold, traces)])
    np.testing.assert_allclose(first, direct, rtol=1e-5, atol=1e-6)

    def no_forward(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr("cliffkit.activations.iter_activations", no_forward)
    second = last_position_activations(scaffold, traces, [1], cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(second[:, 0], first[:, 1])


def test_cache_miss_when_layer_absent(scaffold, tmp_path):
    tokens = encode_traces(scaffold, make_traces(scaffold)[:1])[0]
    cache = ActivationCache(tmp_path, scaffold)
    cache.put(token_hash(tokens), [0], np.ones((1, 32), dtype=np.float32))
    assert cache.get(token_hash(tokens), [0, 1]) is None
    np.testing.assert_array_equal(cache.get(token_hash(tokens), [0]), np.ones((1, 32)))


def test_class_means_are_float64_means(scaffold):
    traces = make_traces(scaffold)
    labels = [1, 0, 1, 0]
    means = class_means(scaffold, traces, labels, "all", batch_size=3)
    last = last_position_activations(scaffold, traces, "all", progress=False).astype(np.float64)
    assert means[1].dtype == torch.float64
    np.testing.assert_allclose(means[1].numpy(), last[[0, 2]].mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(means[0].numpy(), last[[1, 3]].mean(axis=0), rtol=1e-6, atol=1e-7)


def test_shards_round_trip_and_resume(scaffold, tmp_path):
    traces = make_traces(scaffold)
    index_path = write_activation_shards(scaffold, traces, tmp_path, [1], batch_size=2, dtype=torch.float16)
    index = json.loads(index_path.read_text())
    assert len(index["shards"]) == 2 and index["dtype"] == "float16"

    reference = {}
    for batch in iter_activations(scaffold, traces, [1], batch_size=1, progress=False):
        reference[batch.indices[0]] = batch.trace(0)
    for batch in read_activation_shards(tmp_path):
        assert batch.hidden.dtype == torch.float16
        for row, index_in_traces in enumerate(batch.indices):
            torch.testing.assert_close(batch.trace(row).float(), reference[index_in_traces], rtol=2e-3, atol=2e-3)

    first_shard = tmp_path / "shard_00000.safetensors"
    stamp = first_shard.stat().st_mtime_ns
    write_activation_shards(scaffold, traces, tmp_path, [1], batch_size=2, dtype=torch.float16)
    assert first_shard.stat().st_mtime_ns == stamp, "a resumed run must not rewrite finished shards"

    with pytest.raises(ValueError, match="other settings.*layers"):
        write_activation_shards(scaffold, traces, tmp_path, [0], batch_size=2, dtype=torch.float16)


def test_empty_traces_rejected(scaffold):
    with pytest.raises(ValueError, match="no traces"):
        next(iter_activations(scaffold, [], "all"))


@pytest.mark.slow
def test_real_model_batched_matches_hidden_states(embedded_lm):
    traces = make_traces(embedded_lm, TEXTS[:2])
    encoded = encode_traces(embedded_lm, traces)
    batch = next(iter_activations(embedded_lm, traces, [12], batch_size=2, progress=False))
    for row, index in enumerate(batch.indices):
        with torch.no_grad():
            reference = embedded_lm.model(input_ids=encoded[index].input_ids[None],
                                          output_hidden_states=True).hidden_states[13][0]
        torch.testing.assert_close(batch.trace(row)[0], reference, rtol=1e-4, atol=1e-4)
