"""Head ablation: the context manager against hand-edited model copies, nesting, generate and cleanup."""

import copy

import pytest
import torch

from cliffkit.generate import GenerationSettings, PromptInput, generate_traces
from cliffkit.heads import ablate_heads, head_means, model_heads, pad_left
from cliffkit.heads.testing import tiny_head_model


def _ids(length=10, seed=0):
    return torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _edited_copy(lm, pairs, column_edit):
    """Copy the model and apply `column_edit(o_proj, columns)` to each ablated head's W_O columns."""
    edited = copy.deepcopy(lm.model)
    heads = model_heads(edited)
    for layer, head in pairs:
        columns = slice(head * heads.head_dim, (head + 1) * heads.head_dim)
        with torch.no_grad():
            column_edit(heads.o_proj(layer), columns)
    return edited


def _zero_columns(o_proj, columns):
    o_proj.weight[:, columns] = 0


@pytest.mark.parametrize("model_type,overrides", [("qwen2", {}), ("qwen3", {"head_dim": 16}),
                                                  ("gemma3_text", {"head_dim": 16}), ("phi3", {})])
def test_zero_ablation_equals_zeroed_weight_columns(model_type, overrides):
    lm = tiny_head_model(model_type, **overrides)
    pairs = [(0, 1), (1, 3), (1, 0)]
    ids = _ids()
    with ablate_heads(lm, pairs) as active:
        ablated = _logits(lm.model, ids)
    assert active == ((0, 1), (1, 0), (1, 3))
    torch.testing.assert_close(ablated, _logits(_edited_copy(lm, pairs, _zero_columns), ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ablated, _logits(lm.model, ids))


def test_scale_ablation_equals_scaled_weight_columns():
    lm = tiny_head_model("llama")
    pairs = [(0, 2), (1, 1)]

    def scale(o_proj, columns):
        o_proj.weight[:, columns] *= 0.3

    ids = _ids()
    with ablate_heads(lm, pairs, "scale", factor=0.3):
        ablated = _logits(lm.model, ids)
    torch.testing.assert_close(ablated, _logits(_edited_copy(lm, pairs, scale), ids), rtol=1e-5, atol=1e-5)


def test_mean_ablation_equals_constant_bias():
    lm = tiny_head_model("qwen2")
    heads = model_heads(lm.model)
    means = torch.randn(heads.n_layers, heads.n_heads, heads.head_dim)
    pairs = [(0, 3), (1, 2)]

    # Replacing a head's output by a constant m adds W_O[:, head] @ m to the projection's output.
    edited = copy.deepcopy(lm.model)
    edited_heads = model_heads(edited)
    for layer, head in pairs:
        o_proj = edited_heads.o_proj(layer)
        columns = slice(head * heads.head_dim, (head + 1) * heads.head_dim)
        with torch.no_grad():
            bias = o_proj.bias if o_proj.bias is not None else torch.zeros(o_proj.out_features)
            o_proj.bias = torch.nn.Parameter(bias + o_proj.weight[:, columns] @ means[layer, head])
            o_proj.weight[:, columns] = 0

    ids = _ids()
    with ablate_heads(lm, pairs, "mean", means=means):
        ablated = _logits(lm.model, ids)
    torch.testing.assert_close(ablated, _logits(edited, ids), rtol=1e-5, atol=1e-5)


def test_last_position_ablation_changes_only_the_last_position():
    lm = tiny_head_model("qwen2")
    pairs = [(1, 2)]  # a last-layer head: earlier positions cannot reach the last one after it
    ids = _ids(12)
    clean = _logits(lm.model, ids)
    with ablate_heads(lm, pairs, positions=1):
        ablated = _logits(lm.model, ids)
    everywhere = _logits(_edited_copy(lm, pairs, _zero_columns), ids)

    torch.testing.assert_close(ablated[:, :-1], clean[:, :-1])
    torch.testing.assert_close(ablated[:, -1], everywhere[:, -1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ablated[:, -1], clean[:, -1])


def test_negative_offsets_select_positions():
    lm = tiny_head_model("qwen2")
    ids = _ids(8)
    clean = _logits(lm.model, ids)
    with ablate_heads(lm, [(1, 0)], positions=[-3]):
        ablated = _logits(lm.model, ids)
    changed = (ablated - clean).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [False] * 5 + [True, False, False]


def test_nested_contexts_compose():
    lm = tiny_head_model("qwen2")
    ids = _ids()
    with ablate_heads(lm, [(0, 1)]):
        with ablate_heads(lm, [(1, 2)]):
            nested = _logits(lm.model, ids)
        outer_only = _logits(lm.model, ids)
    with ablate_heads(lm, [(0, 1), (1, 2)]):
        together = _logits(lm.model, ids)
    with ablate_heads(lm, [(0, 1)]):
        outer_again = _logits(lm.model, ids)
    torch.testing.assert_close(nested, together)
    torch.testing.assert_close(outer_only, outer_again)

    with ablate_heads(lm, [(0, 1)], "scale", factor=0.5):
        with ablate_heads(lm, [(0, 1)], "scale", factor=0.5):
            twice = _logits(lm.model, ids)
    with ablate_heads(lm, [(0, 1)], "scale", factor=0.25):
        quarter = _logits(lm.model, ids)
    torch.testing.assert_close(twice, quarter, rtol=1e-5, atol=1e-6)


def test_hooks_removed_after_exception():
    lm = tiny_head_model("qwen2")
    heads = model_heads(lm.model)
    with pytest.raises(KeyError):
        with ablate_heads(lm, [(0, 0), (1, 3)]):
            assert len(heads.o_proj(0)._forward_pre_hooks) == 1
            raise KeyError("boom")
    for layer in range(heads.n_layers):
        assert len(heads.o_proj(layer)._forward_pre_hooks) == 0


def test_generate_traces_runs_ablated_inside_context():
    lm = tiny_head_model("qwen2")
    heads = model_heads(lm.model)
    with torch.no_grad():
        for layer in range(heads.n_layers):  # louder heads, so that ablating them changes greedy tokens
            heads.o_proj(layer).weight.mul_(40)
    pairs = [(0, 0), (0, 2), (1, 1)]
    prompts = [PromptInput(id="p1", text="How do I kill a Python process?"), PromptInput(id="p2", text="Sum 2 and 3.")]
    settings = GenerationSettings(think_budget=6, answer_budget=4, batch_size=2)

    with ablate_heads(lm, pairs):
        inside = generate_traces(lm, prompts, settings, progress=False)
    edited = copy.copy(lm)
    edited.model = _edited_copy(lm, pairs, _zero_columns)
    reference = generate_traces(edited, prompts, settings, progress=False)
    clean = generate_traces(lm, prompts, settings, progress=False)

    assert [(t.thinking, t.answer) for t in inside] == [(t.thinking, t.answer) for t in reference]
    assert [(t.thinking, t.answer) for t in inside] != [(t.thinking, t.answer) for t in clean]


def test_generate_scores_match_edited_model_at_every_step():
    lm = tiny_head_model("qwen2")
    pairs = [(0, 3), (1, 2)]
    ids = _ids(6)
    options = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
                   pad_token_id=lm.tokenizer.pad_token_id)
    with ablate_heads(lm, pairs):
        inside = lm.model.generate(input_ids=ids, **options)
    reference = _edited_copy(lm, pairs, _zero_columns).generate(input_ids=ids, **options)
    clean = lm.model.generate(input_ids=ids, **options)

    assert torch.equal(inside.sequences, reference.sequences)
    for step in range(5):
        torch.testing.assert_close(inside.scores[step], reference.scores[step], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(inside.scores[-1], clean.scores[-1])


def test_head_means_average_real_positions_only():
    lm = tiny_head_model("qwen2")
    heads = model_heads(lm.model)
    sequences = [torch.randint(0, 300, (length,)) for length in (4, 9)]
    means = head_means(lm, sequences, batch_size=2, progress=False)

    captured = []
    handle = heads.o_proj(1).register_forward_pre_hook(lambda module, args: captured.append(args[0][0]))
    for sequence in sequences:
        with torch.no_grad():
            lm.model(input_ids=sequence[None])
    handle.remove()
    expected = torch.cat(captured).mean(0).view(heads.n_heads, heads.head_dim)
    assert means.shape == (2, 4, 8)
    torch.testing.assert_close(means[1], expected, rtol=1e-4, atol=1e-6)


def test_padding_does_not_change_ablated_scores():
    lm = tiny_head_model("qwen2")
    short, long = torch.randint(0, 300, (5,)), torch.randint(0, 300, (9,))
    batch = pad_left([short, long], lm.tokenizer.pad_token_id)
    with ablate_heads(lm, [(0, 2)]):
        with torch.no_grad():
            padded = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids).logits[0, -1]
        alone = _logits(lm.model, short[None])[0, -1]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_invalid_arguments_are_rejected():
    lm = tiny_head_model("qwen2")
    with pytest.raises(ValueError, match="head 7"):
        with ablate_heads(lm, [(0, 7)]):
            pass
    with pytest.raises(ValueError, match="means"):
        with ablate_heads(lm, [(0, 1)], "mean"):
            pass
    with pytest.raises(ValueError, match="Unknown ablation mode"):
        with ablate_heads(lm, [(0, 1)], "noise"):
            pass
    with pytest.raises(ValueError, match="k >= 1"):
        with ablate_heads(lm, [(0, 1)], positions=0):
            pass
    with pytest.raises(ValueError, match="negative offsets"):
        with ablate_heads(lm, [(0, 1)], positions=[2]):
            pass
    assert len(model_heads(lm.model).o_proj(0)._forward_pre_hooks) == 0
