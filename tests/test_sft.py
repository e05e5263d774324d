"""LoRA fine-tuning on tiny random-weight models: masking, padding, determinism, resuming, adapters."""

from pathlib import Path

import pytest
import torch

from cliffkit import sft
from cliffkit.render import render_prompt
from cliffkit.sft import (
    IGNORE_INDEX,
    AdapterMismatchError,
    SFTConfig,
    SFTExample,
    base_fingerprint,
    check_adapter_base,
    collate,
    encode_example,
    load_adapter,
    plan_steps,
    read_marker,
    save_adapter,
    summed_target_loss,
    train_lora,
)
from cliffkit.testing import tiny_model

FAST = SFTConfig(rank=4, alpha=8.0, learning_rate=5e-2, warmup_steps=0, epochs=3, batch_size=2,
                 grad_accum=2, checkpoint_every=2, seed=0)


def _tiny(seed: int = 0, dtype: torch.dtype = torch.float32):
    # A wider weight init than the default 0.02 gives logits large enough for the
    # loss to move visibly in a few steps.
    return tiny_model("cliffkit-thinker", seed=seed, dtype=dtype, initializer_range=0.1)


def _examples(count: int = 8) -> list[SFTExample]:
    return [
        SFTExample(id=f"ex{index}", prompt=f"Compute {index} plus {index}.",
                   target=f"Let me think step by step. {index}+{index}.\n</think>\n\nSure! {2 * index}<|im_end|>")
        for index in range(count)
    ]


def _adapter_weights(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if "lora_" in name}


def test_labels_mask_prompt_tokens_exactly():
    lm = _tiny()
    example = _examples(1)[0]
    prompt_ids = render_prompt(lm.tokenizer, lm.family, example.prompt).input_ids
    target_ids = lm.tokenizer(example.target, add_special_tokens=False)["input_ids"]

    encoded = encode_example(lm.tokenizer, lm.family, example)

    assert encoded.input_ids == prompt_ids + target_ids
    assert encoded.labels[:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert encoded.labels[len(prompt_ids):] == target_ids
    assert encoded.target_tokens == len(target_ids)


def test_rendered_prompt_is_tokenized_as_given():
    lm = _tiny()
    rendered = render_prompt(lm.tokenizer, lm.family, "Hello there.")
    example = SFTExample(id="r", prompt=rendered.text, target="Sure!<|im_end|>", rendered=True)

    encoded = encode_example(lm.tokenizer, lm.family, example)

    assert encoded.input_ids[:len(rendered.input_ids)] == rendered.input_ids
    assert encoded.labels.count(IGNORE_INDEX) == len(rendered.input_ids)


def test_target_ends_with_end_of_turn_token():
    lm = _tiny()
    encoded = encode_example(lm.tokenizer, lm.family, _examples(1)[0])
    assert encoded.input_ids[-1] == lm.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_empty_target_is_rejected():
    lm = _tiny()
    with pytest.raises(ValueError, match="empty target"):
        encode_example(lm.tokenizer, lm.family, SFTExample(id="e", prompt="Hi", target=""))


def test_padded_batch_loss_equals_rows():
    # Right padding must leave each row's loss unchanged; left padding without
    # position ids would shift the positions of the shorter row.
    lm = _tiny()
    encoded = [encode_example(lm.tokenizer, lm.family, example) for example in _examples(2)]
    encoded[1] = sft.EncodedExample(id="long", input_ids=encoded[1].input_ids + encoded[1].input_ids[-6:],
                                    labels=encoded[1].labels + encoded[1].labels[-6:])
    assert len(encoded[0].input_ids) != len(encoded[1].input_ids)

    with torch.no_grad():
        batch_sum, batch_count = summed_target_loss(lm.model, collate(encoded, lm.tokenizer.pad_token_id))
        rows = [summed_target_loss(lm.model, collate([item], lm.tokenizer.pad_token_id)) for item in encoded]

    assert batch_count == sum(count for _, count in rows)
    assert torch.allclose(batch_sum, sum(loss for loss, _ in rows), rtol=1e-5)


def test_summed_loss_matches_full_logits():
    lm = _tiny()
    encoded = encode_example(lm.tokenizer, lm.family, _examples(1)[0])
    batch = collate([encoded], lm.tokenizer.pad_token_id)

    with torch.no_grad():
        summed, count = summed_target_loss(lm.model, batch)
        logits = lm.model(input_ids=batch["input_ids"]).logits[0, :-1].float()
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"][0, 1:], ignore_index=IGNORE_INDEX,
                                                 reduction="sum")

    assert count == encoded.target_tokens
    assert torch.allclose(summed, expected, rtol=1e-5)


def test_plan_covers_each_example_once_per_epoch():
    config = SFTConfig(epochs=2, batch_size=3, grad_accum=2)
    steps = plan_steps(10, config)
    flat = [index for step in steps for batch in step for index in batch]

    assert sorted(flat) == sorted(list(range(10)) * 2)
    assert sorted(flat[:10]) == list(range(10))
    assert flat[:10] != flat[10:]  # each epoch has its own order
    assert plan_steps(10, config) == steps


def test_learning_rate_warms_up_then_decays():
    config = SFTConfig(learning_rate=1e-3, warmup_steps=2)
    rates = [sft.learning_rate_at(step, 10, config) for step in range(10)]
    assert rates[0] == pytest.approx(1e-3 / 3)
    assert rates[2] == pytest.approx(1e-3)
    assert rates[-1] == pytest.approx(1e-3 * (1 - 0.9 * 7 / 8))
    assert all(later < earlier for earlier, later in zip(rates[2:], rates[3:]))


def test_training_loss_falls():
    lm = _tiny(seed=0)
    result = train_lora(lm, _examples(), FAST, progress=False)

    assert result.total_steps == 6
    assert len(result.losses) == 6
    assert result.losses[-1] < result.losses[0] - 0.5


def test_training_is_deterministic():
    first = train_lora(_tiny(), _examples(), FAST, progress=False)
    second = train_lora(_tiny(), _examples(), FAST, progress=False)

    assert first.losses == second.losses
    weights_a, weights_b = _adapter_weights(first.model), _adapter_weights(second.model)
    assert weights_a.keys() == weights_b.keys() and weights_a
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


def test_other_seed_gives_other_adapter():
    first = train_lora(_tiny(), _examples(), FAST, progress=False)
    other = SFTConfig(**{**FAST.to_dict(), "seed": 1, "target_modules": FAST.target_modules})
    second = train_lora(_tiny(), _examples(), other, progress=False)
    assert first.losses != second.losses


def test_micro_batch_split_does_not_change_step():
    whole = SFTConfig(**{**FAST.to_dict(), "target_modules": FAST.target_modules, "batch_size": 4,
                         "grad_accum": 1, "epochs": 1})
    split = SFTConfig(**{**FAST.to_dict(), "target_modules": FAST.target_modules, "batch_size": 1,
                         "grad_accum": 4, "epochs": 1})
    a = train_lora(_tiny(), _examples(), whole, progress=False)
    b = train_lora(_tiny(), _examples(), split, progress=False)

    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    weights_a, weights_b = _adapter_weights(a.model), _adapter_weights(b.model)
    for name in weights_a:
        assert torch.allclose(weights_a[name], weights_b[name], atol=1e-5), name


def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    reference = train_lora(_tiny(), _examples(), FAST, tmp_path / "full", progress=False)

    # Interrupt during step 4: the last checkpoint is the one of step 2.
    real_step = sft._optimizer_step
    calls = {"count": 0}

    def crashing_step(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "_optimizer_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_lora(_tiny(), _examples(), FAST, tmp_path / "cut", progress=False)
    monkeypatch.setattr(sft, "_optimizer_step", real_step)

    assert read_marker(tmp_path / "cut" / "checkpoint", sft.CHECKPOINT_MARKER)["step"] == 2
    assert read_marker(tmp_path / "cut" / "adapter") is None
    resumed = train_lora(_tiny(), _examples(), FAST, tmp_path / "cut", progress=False)

    assert resumed.resumed_from == 2
    assert resumed.losses == reference.losses
    weights_a, weights_b = _adapter_weights(reference.model), _adapter_weights(resumed.model)
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


def test_stop_after_leaves_checkpoint_not_adapter(tmp_path):
    result = train_lora(_tiny(), _examples(), FAST, tmp_path, stop_after=3, progress=False)

    assert not result.complete
    assert len(result.losses) == 3
    assert read_marker(tmp_path / "checkpoint", sft.CHECKPOINT_MARKER)["step"] == 3
    assert not (tmp_path / "adapter").exists()


def test_finished_run_is_not_trained_again(tmp_path, monkeypatch):
    first = train_lora(_tiny(), _examples(), FAST, tmp_path, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(sft, "_optimizer_step", no_training)
    again = train_lora(_tiny(), _examples(), FAST, tmp_path, progress=False)

    assert again.losses == first.losses
    for name, value in _adapter_weights(first.model).items():
        assert torch.equal(value, _adapter_weights(again.model)[name]), name


def test_checkpoint_of_other_settings_is_rejected(tmp_path):
    train_lora(_tiny(), _examples(), FAST, tmp_path, stop_after=2, progress=False)
    other = SFTConfig(**{**FAST.to_dict(), "target_modules": FAST.target_modules, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="another run"):
        train_lora(_tiny(), _examples(), other, tmp_path, progress=False)


def test_too_long_examples_are_dropped():
    config = SFTConfig(**{**FAST.to_dict(), "target_modules": FAST.target_modules, "max_length": 150})
    long_example = SFTExample(id="long", prompt="Tell me a story.", target="word " * 80 + "<|im_end|>")
    lm = _tiny()
    assert len(encode_example(lm.tokenizer, lm.family, long_example).input_ids) > 150
    assert all(len(encode_example(lm.tokenizer, lm.family, ex).input_ids) <= 150 for ex in _examples())

    result = train_lora(lm, [*_examples(), long_example], config, progress=False)
    assert result.dropped == ["long"]


def test_nothing_fits_is_an_error():
    config = SFTConfig(**{**FAST.to_dict(), "target_modules": FAST.target_modules, "max_length": 5})
    with pytest.raises(ValueError, match="max_length"):
        train_lora(_tiny(), _examples(), config, progress=False)


def test_invalid_config_names_field():
    with pytest.raises(ValueError, match="grad_accum"):
        SFTConfig(grad_accum=0)
    with pytest.raises(ValueError, match="learning_rate"):
        SFTConfig(learning_rate=0)


def test_adapter_round_trip(tmp_path):
    lm = _tiny(seed=0)
    fingerprint = base_fingerprint(lm.model)
    result = train_lora(lm, _examples(), FAST, progress=False)
    save_adapter(result.model, tmp_path / "adapter", base_model_id="tiny/cliffkit-thinker",
                 base_fingerprint=fingerprint)
    batch = collate([encode_example(lm.tokenizer, lm.family, _examples(1)[0])], lm.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = result.model(input_ids=batch["input_ids"]).logits

    unmerged = load_adapter(_tiny(seed=0), tmp_path / "adapter", merge=False)
    merged = load_adapter(_tiny(seed=0), tmp_path / "adapter", merge=True)
    with torch.no_grad():
        unmerged_logits = unmerged.model(input_ids=batch["input_ids"]).logits
        merged_logits = merged.model(input_ids=batch["input_ids"]).logits

    assert torch.equal(unmerged_logits, expected)
    assert torch.allclose(merged_logits, expected, atol=1e-5)
    assert not any("lora_" in name for name, _ in merged.model.named_parameters())
    assert type(merged.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_adapter_records_portable_base_id(tmp_path):
    lm = _tiny()
    result = train_lora(lm, _examples(), FAST, tmp_path, progress=False)
    config = (result.adapter_dir / "adapter_config.json").read_text()
    assert '"base_model_name_or_path": "tiny/cliffkit-thinker"' in config
    assert read_marker(result.adapter_dir)["base_model_id"] == "tiny/cliffkit-thinker"
    assert not (result.adapter_dir / "README.md").exists()


def test_adapter_on_other_base_is_rejected(tmp_path):
    lm = _tiny(seed=0)
    result = train_lora(lm, _examples(), FAST, tmp_path, progress=False)

    with pytest.raises(AdapterMismatchError, match="tiny/cliffkit-thinker"):
        load_adapter(_tiny(seed=1), result.adapter_dir)


def test_half_written_adapter_is_not_loaded(tmp_path):
    lm = _tiny()
    result = train_lora(lm, _examples(), FAST, tmp_path, progress=False)
    (result.adapter_dir / sft.ADAPTER_MARKER).unlink()

    with pytest.raises(FileNotFoundError, match="no finished cliffkit adapter"):
        check_adapter_base(result.adapter_dir, _tiny().model)


def test_fingerprint_ignores_float32_or_bfloat16():
    model = _tiny(seed=0).model
    same = _tiny(dtype=torch.bfloat16).model
    other = _tiny(seed=1).model

    assert base_fingerprint(model) == base_fingerprint(same)
    assert base_fingerprint(model) != base_fingerprint(other)


def test_save_replaces_old_adapter(tmp_path):
    lm = _tiny()
    result = train_lora(lm, _examples(), FAST, progress=False)
    target = tmp_path / "adapter"
    for tag in ("first", "second"):
        save_adapter(result.model, target, base_model_id="tiny", base_fingerprint="x", metadata={"tag": tag})

    assert read_marker(target)["tag"] == "second"
    assert sorted(path.name for path in Path(tmp_path).iterdir()) == ["adapter"]
