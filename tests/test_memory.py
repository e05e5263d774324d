"""Memory estimates and adaptive batch sizes, checked against hand computations; run profiles."""

import json
from importlib import resources

import pytest
import torch
from transformers import AutoConfig

from cliffkit.generate import GenerationSettings, PromptInput, generate_traces
from cliffkit.memory import (
    activation_bytes_per_token, estimate_memory, free_memory_bytes, kv_cache_bytes_per_token, pick_batch_size,
    resolve_batch_size,
)
from cliffkit.profiles import PROFILE_NAMES, load_profile
from cliffkit.testing import tiny_model

# Sizes of DeepSeek-R1-Distill-Qwen-7B's config.json (Qwen2; the same numbers as
# Skywork-OR1-Math-7B, which is trained from it).
R1_QWEN_7B = AutoConfig.for_model("qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
# A Qwen3-style config whose head_dim (128) differs from hidden_size / heads (80).
QWEN3_LIKE = AutoConfig.for_model("qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936)
# A mixture-of-experts config: 8 experts of width 768 per token.
MOE_LIKE = AutoConfig.for_model("qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                                num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                                moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)


def test_kv_bytes_hand_computed():
    # 2 (K and V) x 28 layers x 4 KV heads x 128 head_dim x 2 bytes = 57,344 bytes per token.
    assert kv_cache_bytes_per_token(R1_QWEN_7B, torch.bfloat16) == 57_344
    assert kv_cache_bytes_per_token(R1_QWEN_7B, torch.float32) == 114_688
    # 2 x 36 x 8 x 128 x 2 = 147,456: head_dim comes from the config, not 2560 / 32.
    assert kv_cache_bytes_per_token(QWEN3_LIKE, torch.bfloat16) == 147_456


def test_activation_bytes_hand_computed():
    # 2 bytes x (2 x 3584 + (28 + 2 x 4) x 128 + 3584 + 3 x 18944) = 2 x 72,192.
    assert activation_bytes_per_token(R1_QWEN_7B, torch.bfloat16) == 144_384
    # Experts: 3 x (8 x 768) = 18,432 in place of 3 x 6144 for the dense width.
    # 2 x (2 x 2048 + (32 + 8) x 128 + 2048 + 18,432) = 2 x 29,696.
    assert activation_bytes_per_token(MOE_LIKE, torch.bfloat16) == 59_392


def test_estimate_bytes_for_batch():
    estimate = estimate_memory(R1_QWEN_7B, torch.bfloat16)
    assert estimate.per_sequence_bytes == 2 * 152_064 * 4
    expected = 16 * (4096 * (57_344 + 144_384) + 2 * 152_064 * 4)
    assert estimate.bytes_for(16, 4096) == expected


def test_kv_estimate_matches_real_cache():
    # Independent check: the bytes of the KV cache a forward pass actually builds.
    lm = tiny_model("qwen3-thinking", dtype=torch.float32)
    seq_len = 11
    output = lm.model(torch.randint(0, 100, (1, seq_len)), use_cache=True)
    cache = output.past_key_values
    cached = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                 for layer in cache.layers)
    assert cached == seq_len * kv_cache_bytes_per_token(lm.model.config, torch.float32)


def test_pick_batch_size_boundaries():
    one = estimate_memory(R1_QWEN_7B, torch.bfloat16).bytes_for(1, 3000)
    assert pick_batch_size(R1_QWEN_7B, torch.bfloat16, 3000, free_bytes=10 * one, headroom=1.0) == 10
    assert pick_batch_size(R1_QWEN_7B, torch.bfloat16, 3000, free_bytes=10 * one - 1, headroom=1.0) == 9
    assert pick_batch_size(R1_QWEN_7B, torch.bfloat16, 3000, free_bytes=10 * one, headroom=0.5) == 5
    assert pick_batch_size(R1_QWEN_7B, torch.bfloat16, 3000, free_bytes=10 * one, headroom=1.0,
                           max_batch_size=4) == 4


def test_pick_batch_size_too_little_memory():
    with pytest.raises(ValueError, match="One sequence of 3000 tokens needs about .* GiB"):
        pick_batch_size(R1_QWEN_7B, torch.bfloat16, 3000, free_bytes=1000)
    with pytest.raises(ValueError, match="seq_len must be at least 1"):
        pick_batch_size(R1_QWEN_7B, torch.bfloat16, 0, free_bytes=10 ** 12)
    with pytest.raises(ValueError, match="headroom"):
        pick_batch_size(R1_QWEN_7B, torch.bfloat16, 10, free_bytes=10 ** 12, headroom=0)


def test_free_memory_cpu():
    import psutil

    measured = free_memory_bytes("cpu")
    assert measured > 0
    assert abs(measured - psutil.virtual_memory().available) < 2 * 1024 ** 3
    assert free_memory_bytes([torch.device("cpu")]) > 0
    with pytest.raises(ValueError, match="Cannot measure free memory on device 'meta'"):
        free_memory_bytes("meta")


def test_resolve_batch_size_values(monkeypatch):
    assert resolve_batch_size(6, R1_QWEN_7B, torch.bfloat16, 100, [torch.device("cpu")]) == 6
    for bad in (0, "big", True):
        with pytest.raises(ValueError, match="batch_size"):
            resolve_batch_size(bad, R1_QWEN_7B, torch.bfloat16, 100, [torch.device("cpu")])

    one = estimate_memory(R1_QWEN_7B, torch.bfloat16).bytes_for(1, 500)
    monkeypatch.setattr("cliffkit.memory.free_memory_bytes", lambda devices: int(7 * one / 0.8) + 1)
    assert resolve_batch_size("auto", R1_QWEN_7B, torch.bfloat16, 500, [torch.device("cpu")]) == 7
    assert resolve_batch_size("auto", R1_QWEN_7B, torch.bfloat16, 500, [torch.device("cpu")],
                              max_batch_size=3) == 3


def test_auto_batch_size_reuses_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr("cliffkit.memory.free_memory_bytes", lambda devices: 10 ** 15)
    lm = tiny_model("scaffold")
    path = tmp_path / "t.jsonl"
    generate_traces(lm, [PromptInput(id="a", text="Hi")], GenerationSettings(think_budget=2, answer_budget=2,
                                                                              batch_size=5), out=path, progress=False)
    size = resolve_batch_size("auto", lm.model.config, lm.dtype, 100, [torch.device("cpu")], out=path)
    assert size == 5


# --------------------------------------------------------------------------- profiles

@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_profiles_load(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.estimated_runtime.startswith("estimate:")
    assert set(profile.per_source) <= {"harmbench", "advbench", "strongreject", "benign", "overrefusal", "arithmetic"}
    assert profile.seeds


def test_profile_scales_increase():
    ci, laptop, gpu, multi = (load_profile(name) for name in PROFILE_NAMES)
    assert ci.backend == laptop.backend == "hf"
    assert gpu.backend == multi.backend == "vllm"
    assert multi.tensor_parallel_size > gpu.tensor_parallel_size == 1
    budgets = [profile.generation["think_budget"] for profile in (ci, laptop, gpu, multi)]
    assert budgets == sorted(budgets)


def test_profile_generation_settings():
    settings = load_profile("ci").generation_settings()
    assert settings == GenerationSettings(think_budget=96, answer_budget=40, temperature=0.0, top_p=1.0,
                                          batch_size=8, seed=0)
    gpu = load_profile("gpu")
    with pytest.raises(ValueError, match="batch_size 'auto'"):
        gpu.generation_settings()
    assert gpu.generation_settings(batch_size=24).batch_size == 24


def write_profile(tmp_path, **changes):
    data = json.loads(resources.files("cliffkit.profiles").joinpath("ci.json").read_text())
    data.update(changes)
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, message", [
    (dict(backend="tgi"), "backend 'tgi'"),
    (dict(tensor_parallel_size=2), "tensor_parallel_size needs backend 'vllm'"),
    (dict(colour="blue"), r"unknown keys \['colour'\]"),
    (dict(prompts={"per_source": {"harmbench": 0}}), "per_source.harmbench must be a positive integer"),
    (dict(generation={"think_budget": 8, "batch_size": -1}), "generation.batch_size"),
    (dict(generation={"think_budget": 8, "batch_size": 2, "beam": 3}), r"unknown generation keys \['beam'\]"),
    (dict(heads={"fractions": [0.03, 3]}), r"heads.fractions must lie in \(0, 1\]"),
    (dict(repair={"percents": [1.7, 170]}), r"repair.percents must lie in \(0, 100\]"),
    (dict(seeds=[]), "seeds must be a non-empty list"),
])
def test_bad_profiles_rejected(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_profile(write_profile(tmp_path, **changes))


def test_profile_missing_key_and_unknown_name(tmp_path):
    path = write_profile(tmp_path)
    data = json.loads(path.read_text())
    del data["heads"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"lacks the keys \['heads'\]"):
        load_profile(path)
    with pytest.raises(ValueError, match="Unknown profile 'huge'"):
        load_profile("huge")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_profile(path)


def test_custom_profile_file_loads(tmp_path):
    profile = load_profile(write_profile(tmp_path, model="my-org/my-model"))
    assert profile.model == "my-org/my-model"
    assert profile.source == str(tmp_path / "custom.json")
