"""The merged-model cache: built once, keyed by adapter and dtype, never left half-written."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from cliffkit import merged
from cliffkit.testing import tiny_model


@pytest.fixture
def adapter_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIFFKIT_HOME", str(tmp_path / "home"))
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / merged.ADAPTER_WEIGHTS).write_bytes(b"adapter weights, version 1")
    return folder


class CountingBuild:
    def __init__(self, dtype=torch.bfloat16):
        self.calls = 0
        self.model = tiny_model("cliffkit-thinker").model.to(dtype)

    def __call__(self):
        self.calls += 1
        return self.model


def test_merge_is_built_once(adapter_dir):
    build = CountingBuild()
    first = merged.ensure_merged_model("tiny/think", adapter_dir, torch.bfloat16, build)
    second = merged.ensure_merged_model("tiny/think", adapter_dir, torch.bfloat16, build)

    assert first == second
    assert build.calls == 1
    assert (first / merged.MARKER_FILE).is_file()


def test_cached_weights_equal_built_weights(adapter_dir):
    build = CountingBuild()
    folder = merged.ensure_merged_model("tiny/think", adapter_dir, torch.bfloat16, build)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)

    expected = build.model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name]), name


def test_new_adapter_gets_new_folder(adapter_dir):
    first = merged.merged_path("tiny/think", adapter_dir, torch.bfloat16)
    (adapter_dir / merged.ADAPTER_WEIGHTS).write_bytes(b"adapter weights, version 2")
    second = merged.merged_path("tiny/think", adapter_dir, torch.bfloat16)
    third = merged.merged_path("tiny/think", adapter_dir, torch.float16)

    assert len({first, second, third}) == 3


def test_interrupted_build_leaves_nothing_finished(adapter_dir):
    def failing_build():
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        merged.ensure_merged_model("tiny/think", adapter_dir, torch.bfloat16, failing_build)
    target = merged.merged_path("tiny/think", adapter_dir, torch.bfloat16)
    assert not target.exists()
    assert not list(target.parent.glob(".merge-*"))

    build = CountingBuild()
    merged.ensure_merged_model("tiny/think", adapter_dir, torch.bfloat16, build)
    assert build.calls == 1


def test_unmarked_folder_is_rebuilt(adapter_dir):
    target = merged.merged_path("tiny/think", adapter_dir, torch.bfloat16)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"truncated")

    build = CountingBuild()
    merged.ensure_merged_model("tiny/think", adapter_dir, torch.bfloat16, build)
    assert build.calls == 1
    assert merged.is_merged(target, merged.adapter_sha256(adapter_dir), torch.bfloat16)


def test_build_in_wrong_dtype_is_rejected(adapter_dir):
    with pytest.raises(ValueError, match="expected torch.bfloat16"):
        merged.ensure_merged_model("tiny/think", adapter_dir, torch.bfloat16, CountingBuild(torch.float32))
    with pytest.raises(ValueError, match="16-bit"):
        merged.ensure_merged_model("tiny/think", adapter_dir, torch.float32, CountingBuild(torch.float32))


def test_missing_adapter_weights_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved LoRA adapter"):
        merged.adapter_sha256(tmp_path)


@pytest.mark.slow
def test_thinker_cache_equals_float32_merge(tmp_path, monkeypatch):
    from cliffkit.models import EMBEDDED_THINKER, load_model

    reference = load_model(EMBEDDED_THINKER, dtype="float32", device="cpu").model.to(torch.bfloat16).state_dict()
    # A fresh merge cache; the converted base stays where it is.
    monkeypatch.setattr(merged, "models_dir", lambda: tmp_path / "models")
    cached = load_model(EMBEDDED_THINKER, dtype="bfloat16", device="cpu").model

    assert any(tmp_path.glob("models/*-merged-*-bfloat16"))
    for name, tensor in cached.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
