"""Tests of LoRA safety repair on tiny random-weight models: training, adapter files, loading and lineage."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from cliffkit.pool import PoolExample, PoolOverlapError
from cliffkit.render import render_prompt
from cliffkit.repair import (DEFAULT_REPAIR_CONFIG, IncompleteRepairError, base_model_id, load_repaired,
                             read_repair_record, repair, repair_target, sft_examples)
from cliffkit.sft import ADAPTER_MARKER, AdapterMismatchError, read_marker
from cliffkit.testing import tiny_model

CONFIG = replace(DEFAULT_REPAIR_CONFIG, epochs=4, learning_rate=5e-3, grad_accum=2, checkpoint_every=8)
# One epoch (2 optimizer steps) where a test needs a finished adapter, not a trained one.
FAST = replace(CONFIG, epochs=1)


def _pool(n: int = 4) -> list[PoolExample]:
    return [PoolExample(id=f"custom/{i}", prompt=f"Please explain mischief plan number {i}",
                        thinking="That plan would hurt people, so I should not help.",
                        answer="I can't help with that.", source="custom", category="test") for i in range(n)]


def _target_nll(lm, pool) -> float:
    """Mean cross-entropy (nats) of the assistant tokens, computed here without cliffkit.sft."""
    total, count = 0.0, 0
    for example in pool:
        prompt_ids = render_prompt(lm.tokenizer, lm.family, example.prompt).input_ids
        target_ids = lm.tokenizer(repair_target(example, lm), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + target_ids])
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0].double()
        start = len(prompt_ids)
        predicted = logits[start - 1:-1]  # position t predicts token t + 1
        total += float(torch.nn.functional.cross_entropy(predicted, ids[0, start:], reduction="sum"))
        count += len(target_ids)
    return total / count


def _logits(lm) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 33, 2, 90, 41]])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def test_repair_target_format():
    lm = tiny_model("scaffold")
    example = _pool(1)[0]
    assert repair_target(example, lm) == ("That plan would hurt people, so I should not help.\n</think>\n\n"
                                          "I can't help with that.<|im_end|>")
    pair = sft_examples([example], lm)[0]
    assert pair.prompt == example.prompt  # rendered later with the family's own system prompt
    assert not pair.rendered


def test_repair_lowers_target_loss(tmp_path):
    pool = _pool()
    before = _target_nll(tiny_model("scaffold"), pool)
    result = repair(tiny_model("scaffold"), pool, tmp_path / "r", CONFIG, progress=False)
    after = _target_nll(load_repaired(tmp_path / "r", base=tiny_model("scaffold")), pool)
    assert after < before - 0.05
    assert result.losses[-1] < result.losses[0]


def test_adapter_round_trip_and_wrong_base(tmp_path):
    trained = tiny_model("scaffold")
    result = repair(trained, _pool(), tmp_path / "r", FAST, name="safety", progress=False)
    expected = _logits(trained)

    unmerged = load_repaired(tmp_path / "r", base=tiny_model("scaffold"), merge=False)
    assert torch.equal(_logits(unmerged), expected)
    merged = load_repaired(tmp_path / "r", base=tiny_model("scaffold"))  # float32: "auto" merges
    assert torch.allclose(_logits(merged), expected, atol=1e-5)
    assert not torch.allclose(_logits(tiny_model("scaffold")), expected, atol=1e-5)  # the adapter did something

    assert merged.model_id == result.model_id == f"tiny/scaffold+lora:{result.record['adapter_id']}"
    assert result.record["adapter_id"].startswith("safety-")
    assert base_model_id(merged.model_id) == "tiny/scaffold"
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        load_repaired(tmp_path / "r", base=tiny_model("scaffold", seed=1))


def test_stacked_repair_records_chain(tmp_path):
    # The first adapter stands for the thinker's think-format adapter merged into the base.
    repair(tiny_model("scaffold"), _pool(), tmp_path / "first", FAST, progress=False)
    stacked_base = load_repaired(tmp_path / "first", base=tiny_model("scaffold"))
    second = repair(stacked_base, _pool()[:2], tmp_path / "second", FAST, progress=False)

    record = read_repair_record(tmp_path / "second")
    kinds = [link["kind"] for link in record["lineage"]]
    assert kinds == ["model", "repair adapter"]
    assert record["lineage"][1]["adapter_id"] == read_repair_record(tmp_path / "first")["adapter_id"]
    assert base_model_id(second.model_id) == "tiny/scaffold"
    assert second.model_id.count("+lora:") == 2

    with pytest.raises(AdapterMismatchError):
        load_repaired(tmp_path / "second", base=tiny_model("scaffold"))  # the plain base lacks the first adapter
    again = load_repaired(tmp_path / "second", base=load_repaired(tmp_path / "first", base=tiny_model("scaffold")))
    assert again.model_id == second.model_id
    assert [link["kind"] for link in again.model.cliffkit_lineage] == ["model", "repair adapter", "repair adapter"]


def test_interrupted_repair_resumes_to_same_adapter(tmp_path):
    two_epochs = replace(CONFIG, epochs=2)  # 4 optimizer steps, interrupted after 2
    with pytest.raises(IncompleteRepairError, match="Rerun the same repair to resume"):
        repair(tiny_model("scaffold"), _pool(), tmp_path / "r", two_epochs, stop_after=2, progress=False)
    assert read_marker(tmp_path / "r" / "adapter") is None
    assert not (tmp_path / "r" / "repair.json").exists()
    with pytest.raises(FileNotFoundError, match="interrupted run"):
        load_repaired(tmp_path / "r", base=tiny_model("scaffold"))

    resumed = repair(tiny_model("scaffold"), _pool(), tmp_path / "r", two_epochs, progress=False)
    straight = repair(tiny_model("scaffold"), _pool(), tmp_path / "s", two_epochs, progress=False)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    weights = load_file(str(tmp_path / "r" / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(tmp_path / "s" / "adapter" / "adapter_model.safetensors"))
    assert weights.keys() == reference.keys()
    assert all(torch.allclose(weights[key], reference[key], atol=1e-6) for key in weights)


def test_crash_while_saving_leaves_no_complete_adapter(tmp_path, monkeypatch):
    from peft import PeftModel

    original = PeftModel.save_pretrained

    def crash_in_final_save(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)  # the adapter weights land in the staging folder ...
        if ".adapter.tmp" in str(folder):
            raise OSError("disk full")  # ... and the process dies before the marker is written

    monkeypatch.setattr(PeftModel, "save_pretrained", crash_in_final_save)
    with pytest.raises(OSError, match="disk full"):
        repair(tiny_model("scaffold"), _pool(), tmp_path / "r", FAST, progress=False)

    assert not (tmp_path / "r" / "adapter").exists()
    assert read_marker(tmp_path / "r" / "adapter", ADAPTER_MARKER) is None
    with pytest.raises(FileNotFoundError, match="not a finished repair"):
        read_repair_record(tmp_path / "r")


def test_repair_rejects_overlapping_or_empty_pool(tmp_path):
    from cliffkit.datasets import load_prompts

    test_prompt = load_prompts(["strongreject"], splits=["test"], limit=1)[0]
    leaked = [PoolExample(id="custom/leak", prompt=test_prompt.text, thinking="t", answer="a")]
    with pytest.raises(PoolOverlapError, match="custom/leak"):
        repair(tiny_model("scaffold"), leaked, tmp_path / "r", FAST, progress=False)
    with pytest.raises(ValueError, match="no training examples"):
        repair(tiny_model("scaffold"), [], tmp_path / "r", FAST, progress=False)


def test_repair_record_contents(tmp_path):
    selection = {"method": "cliff (final)", "pool_size": 10, "k": 4}
    repair(tiny_model("scaffold"), _pool(), tmp_path / "r", FAST, selection=selection, progress=False)
    record = json.loads((tmp_path / "r" / "repair.json").read_text())
    assert record["examples"] == [example.id for example in _pool()]
    assert record["selection"] == selection
    assert record["base_model_id"] == "tiny/scaffold"
    assert record["base_family"] == "scaffold"
    assert record["sft_config"]["rank"] == CONFIG.rank
    assert len(record["losses"]) == 2  # 4 examples, 2 per optimizer step, 1 epoch
