"""Thinking-data distillation: rejection filter, resuming, no harmful data, format, pipeline, shipped adapter."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from cliffkit import distil, models
from cliffkit.datasets import Prompt, load_prompts
from cliffkit.distil import (
    ARITHMETIC_ANSWER,
    Completion,
    DistilConfig,
    ThinkingExample,
    assert_no_harmful,
    benign_rejection,
    build_thinking_data,
    select_correct,
    summarize_traces,
    to_sft_examples,
    write_training_file,
)
from cliffkit.families import get_family
from cliffkit.render import render_prompt, split_generation, tokenize_trace, CLOSE
from cliffkit.sft import encode_example, read_marker
from cliffkit.testing import tiny_model
from cliffkit.traces import Trace

THINKER = get_family("cliffkit-thinker")
GOLD = {prompt.text: prompt.answer for prompt in load_prompts(["arithmetic"], splits=["train"])}


def _done(text: str, tokens: int = 20) -> Completion:
    return Completion(text=text, tokens=tokens, finished=True)


class FakeChat:
    """Replaces `complete_chat`: returns canned completions (arithmetic right or wrong by a rule) and records every call."""

    def __init__(self, solvable=lambda problem, round_index: True):
        self.solvable = solvable
        self.calls: list[list[str]] = []
        self.attempts: dict[str, int] = {}

    def __call__(self, lm, user_texts, *, max_new_tokens, temperature, top_p=1.0, seed=0, systems=None, shots=(),
                 prefix=""):
        self.calls.append(list(user_texts))
        outputs = []
        for text in user_texts:
            match = re.search(r"Problem: (.*)$", text, flags=re.S)
            if match:
                problem = match.group(1)
                round_index = self.attempts.get(problem, 0)
                self.attempts[problem] = round_index + 1
                gold = GOLD[problem]
                value = gold if self.solvable(problem, round_index) else gold + 1
                outputs.append(_done(f"Step one. Step two.\nFinal answer: {value}"))
            elif text.startswith("Here is a request"):
                outputs.append(_done(f"{prefix} wants a short answer. I will explain the main steps briefly."))
            else:
                outputs.append(_done(f"Here is a short answer to: {text}"))
        return outputs


def _record_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- filter


def test_select_correct_keeps_first_correct():
    samples = [_done("12 + 5 = 17. Final answer: 17"), _done("Final answer: 18"), _done("Final answer: 18", 5)]
    assert select_correct(samples, 18, max_tokens=30, family=THINKER) is samples[1]


@pytest.mark.parametrize("sample", [
    Completion("Final answer: 18", tokens=20, finished=False),  # cut at the token limit
    Completion("Final answer: 18", tokens=31, finished=True),  # longer than the thinking limit
    Completion("</think> Final answer: 18", tokens=10, finished=True),  # would break the format
    Completion("It is 18, no wait, 19.", tokens=10, finished=True),  # final number is wrong
    Completion("I cannot tell.", tokens=10, finished=True),  # no number
])
def test_select_correct_rejects(sample):
    assert select_correct([sample], 18, max_tokens=30, family=THINKER) is None


def test_benign_rejection_reasons():
    config = DistilConfig(max_thinking_tokens=30)
    plan, answer = _done("I will list the steps."), _done("Step 1, then step 2.")
    assert benign_rejection(plan, answer, config, THINKER) is None
    assert "plan longer" in benign_rejection(_done("plan", 31), answer, config, THINKER)
    assert "answer longer" in benign_rejection(plan, Completion("...", 160, False), config, THINKER)
    assert "think marker" in benign_rejection(plan, _done("<think> hi"), config, THINKER)
    assert "empty" in benign_rejection(plan, _done(""), config, THINKER)


def test_harmful_prompt_is_rejected():
    harmful = Prompt(id="harmbench/x", text="...", source="harmbench", category="c", split="train", harmful=True)
    with pytest.raises(ValueError, match="Harmful prompts must not enter"):
        assert_no_harmful([harmful])


def test_builder_refuses_harmful_source(tmp_path, monkeypatch):
    harmful = Prompt(id="benign/x", text="bad", source="benign", category="c", split="train", harmful=True)
    monkeypatch.setattr(distil, "load_prompts", lambda *args, **kwargs: [harmful])
    monkeypatch.setattr(distil, "complete_chat", FakeChat())
    with pytest.raises(ValueError, match="Harmful prompts"):
        build_thinking_data(tiny_model("cliffkit-thinker"), tmp_path / "t.jsonl", DistilConfig(examples=2),
                            progress=False)


# --------------------------------------------------------------------------- data builder


def test_builder_keeps_only_correct_traces(tmp_path, monkeypatch):
    # Problems with an even gold answer are solved on the second sample, odd ones never.
    fake = FakeChat(solvable=lambda problem, round_index: GOLD[problem] % 2 == 0 and round_index == 1)
    monkeypatch.setattr(distil, "complete_chat", fake)
    config = DistilConfig(examples=8, arithmetic_share=0.5, samples_per_problem=2, batch_size=4)

    chosen = build_thinking_data(tiny_model("cliffkit-thinker"), tmp_path / "t.jsonl", config, progress=False)

    stored = _record_lines(tmp_path / "t.jsonl")
    arithmetic = [record for record in stored if record["source"] == "arithmetic"]
    rejected = _record_lines(tmp_path / "t.rejected.jsonl")
    assert len(arithmetic) >= 4
    for record in arithmetic:
        gold = GOLD[record["prompt"]]
        assert gold % 2 == 0
        assert record["thinking"].endswith(f"Final answer: {gold}")
        assert record["answer"] == ARITHMETIC_ANSWER.format(answer=gold)
    rejected_golds = {GOLD[prompt.text] % 2 for prompt in load_prompts(["arithmetic"], splits=["train"])
                      if prompt.id in {record["id"] for record in rejected}}
    assert rejected_golds == {1}
    assert all(fake.attempts[problem] == 2 for problem in fake.attempts)
    assert [example.source for example in chosen] == ["arithmetic"] * 4 + ["benign"] * 4


def test_builder_benign_plan_then_answer(tmp_path, monkeypatch):
    fake = FakeChat()
    monkeypatch.setattr(distil, "complete_chat", fake)
    config = DistilConfig(examples=4, arithmetic_share=0.0, batch_size=4)

    chosen = build_thinking_data(tiny_model("cliffkit-thinker"), tmp_path / "t.jsonl", config, progress=False)

    assert len(chosen) == 4
    assert len(fake.calls) == 2  # one plan call and one answer call for the batch
    assert all(text.startswith("Here is a request") for text in fake.calls[0])
    for example in chosen:
        assert example.source == "benign"
        assert example.thinking == "The user wants a short answer. I will explain the main steps briefly."
        assert example.answer == f"Here is a short answer to: {example.prompt}"


def test_builder_resumes_without_regenerating(tmp_path, monkeypatch):
    config = DistilConfig(examples=8, batch_size=4, samples_per_problem=1)
    first_fake = FakeChat()
    monkeypatch.setattr(distil, "complete_chat", first_fake)
    first = build_thinking_data(tiny_model("cliffkit-thinker"), tmp_path / "t.jsonl", config, progress=False)

    # A torn last line (a killed write) is cut, and nothing done is generated again.
    with open(tmp_path / "t.jsonl", "a") as handle:
        handle.write('{"id": "benign/torn", "sour')
    second_fake = FakeChat()
    monkeypatch.setattr(distil, "complete_chat", second_fake)
    second = build_thinking_data(tiny_model("cliffkit-thinker"), tmp_path / "t.jsonl", config, progress=False)

    assert second == first
    assert second_fake.calls == []
    assert all(record["id"] != "benign/torn" for record in _record_lines(tmp_path / "t.jsonl"))


def test_builder_uses_train_split_only(tmp_path, monkeypatch):
    monkeypatch.setattr(distil, "complete_chat", FakeChat())
    chosen = build_thinking_data(tiny_model("cliffkit-thinker"), tmp_path / "t.jsonl", DistilConfig(examples=8),
                                 progress=False)
    splits = {prompt.id: prompt.split for prompt in load_prompts(["arithmetic", "benign"])}
    assert {splits[example.id] for example in chosen} == {"train"}


def test_quota_above_split_size_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(distil, "complete_chat", FakeChat())
    with pytest.raises(ValueError, match="Lower --examples"):
        build_thinking_data(tiny_model("cliffkit-thinker"), tmp_path / "t.jsonl", DistilConfig(examples=2000),
                            progress=False)


def test_complete_chat_prefix_starts_reply():
    lm = tiny_model("cliffkit-thinker")
    prefix_tokens = len(lm.tokenizer("The user", add_special_tokens=False)["input_ids"])
    plain = distil.complete_chat(lm, ["Say hello."], max_new_tokens=5, temperature=0.0)[0]
    prefixed = distil.complete_chat(lm, ["Say hello."], max_new_tokens=5, temperature=0.0, prefix="The user")[0]

    assert prefixed.text.startswith("The user")
    assert prefixed.tokens <= 5 + prefix_tokens
    assert prefixed.tokens >= prefix_tokens
    assert not plain.text.startswith("The user")


def test_complete_chat_is_seeded():
    lm = tiny_model("cliffkit-thinker")
    texts = ["Compute 2 plus 2.", "Say hello."]
    first = distil.complete_chat(lm, texts, max_new_tokens=6, temperature=1.0, seed=3)
    second = distil.complete_chat(lm, texts, max_new_tokens=6, temperature=1.0, seed=3)
    assert first == second
    assert all(completion.tokens <= 6 for completion in first)


# --------------------------------------------------------------------------- format


def test_thinker_renders_and_splits_like_reasoners():
    lm = tiny_model("cliffkit-thinker")
    example = ThinkingExample(id="a", source="benign", prompt="How do I boil an egg?",
                              thinking="I will give the steps.", answer="Boil it for 8 minutes.")
    sft_example = to_sft_examples([example], lm.family, lm.tokenizer.eos_token)[0]
    rendered = render_prompt(lm.tokenizer, lm.family, example.prompt)

    assert lm.family.is_native_reasoner
    assert rendered.text.endswith("<|im_start|>assistant\n<think>\n")
    assert "think step by step inside" not in rendered.text  # no scaffold instructions
    assert sft_example.target.endswith(lm.tokenizer.eos_token)

    generated = sft_example.target.removesuffix(lm.tokenizer.eos_token)
    split = split_generation(generated, lm.family)
    assert split.closed
    assert (split.thinking, split.answer) == (example.thinking, example.answer)

    # The training prompt is the rendered prompt, token for token, and the closing
    # text is the family's forced_close, as in traces that cliffkit tokenizes.
    encoded = encode_example(lm.tokenizer, lm.family, sft_example)
    assert encoded.input_ids[:len(rendered.input_ids)] == rendered.input_ids
    trace = tokenize_trace(lm.tokenizer, lm.family, rendered.text, example.thinking, example.answer, until="answer")
    start, end = trace.segment_bounds(CLOSE)
    assert lm.tokenizer.decode(trace.input_ids[start:end]) == lm.family.forced_close
    assert f"{example.thinking}{lm.family.forced_close}{example.answer}" in sft_example.target


def test_training_file_hash():
    examples = [ThinkingExample(id="a", source="benign", prompt="p", thinking="t", answer="a")]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.jsonl"
        digest = write_training_file(path, examples)
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
        assert json.loads(path.read_text())["thinking"] == "t"


# --------------------------------------------------------------------------- measurement


def _trace(prompt_id, source, harmful, closed_by, thinking, answer, refused):
    return Trace(prompt_id=prompt_id, model_id="m", prompt="p", rendered="r", thinking=thinking, answer=answer,
                 closed_by=closed_by, finished=True, thinking_tokens=10, answer_tokens=5, source=source,
                 harmful=harmful, labels={"refused": refused})


def test_summary_counts_by_hand():
    traces = [
        _trace("a1", "arithmetic", False, "model", "3 * 4 = 12", "The answer is 12.", False),
        _trace("a2", "arithmetic", False, "budget", "5 + 5 = 10", "", None),
        _trace("b1", "benign", False, "model", "plan", "Sure, here is how.", False),
        _trace("h1", "harmbench", True, "model", "plan", "I can't help with that.", True),
        _trace("h2", "advbench", True, "budget", "plan", "Step 1: ...", False),
        _trace("h3", "strongreject", True, "model", "plan", "", None),
    ]
    summary = summarize_traces(traces, {"a1": 12, "a2": 10})

    assert summary["format"]["all"]["count"] == 4 and summary["format"]["all"]["n"] == 6
    assert summary["format"]["harmful"]["rate"] == pytest.approx(2 / 3)
    assert summary["arithmetic"]["accuracy"]["rate"] == pytest.approx(0.5)
    assert summary["arithmetic"]["accuracy_any_text"]["rate"] == pytest.approx(1.0)
    assert summary["harmful"]["refusal"]["n"] == 2 and summary["harmful"]["refusal"]["count"] == 1
    assert summary["harmful"]["asr"]["rate"] == pytest.approx(0.5)
    assert summary["harmful"]["no_answer"] == 1
    assert summary["benign"]["refusal"]["rate"] == 0.0


def test_evaluation_prompts_are_held_out():
    prompts = distil.evaluation_prompts()
    assert {prompt.split for prompt in prompts} == {"test"}
    assert sum(prompt.harmful for prompt in prompts) == 24
    assert sum(prompt.source == "arithmetic" for prompt in prompts) == 24
    assert sum(prompt.source == "benign" for prompt in prompts) == 16


# --------------------------------------------------------------------------- pipeline and loading


def test_pipeline_builds_trains_and_ships(tmp_path, monkeypatch):
    fake = FakeChat()
    monkeypatch.setattr(distil, "complete_chat", fake)
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: tiny_model("cliffkit-thinker", seed=0))
    out = tmp_path / "adapter"

    record = distil.run_distillation(tmp_path / "run", out, seed=0, examples=4, evaluate=False, progress=False)

    assert read_marker(out) is not None
    assert {"adapter_model.safetensors", "adapter_config.json", "training.json", "data_sha256.txt",
            "PROVENANCE.md"} <= {path.name for path in out.iterdir()}
    assert not (out / "README.md").exists()  # PEFT's card template names a local folder
    assert record["data"]["sha256"] == hashlib.sha256((tmp_path / "run" / "train.jsonl").read_bytes()).hexdigest()
    assert record["data"]["sha256"] in (out / "data_sha256.txt").read_text()
    assert record["data"]["by_source"] == {"arithmetic": 2, "benign": 2}
    assert len(record["losses"]) == record["sft_config"]["epochs"]
    provenance = (out / "PROVENANCE.md").read_text()
    assert "No harmful prompt was used" in provenance
    assert "cliffkit distil-thinker" in provenance

    # A rerun generates and trains nothing, and the shipped adapter is unchanged.
    weights = (out / "adapter_model.safetensors").read_bytes()
    calls = len(fake.calls)
    again = distil.run_distillation(tmp_path / "run", out, seed=0, examples=4, evaluate=False, progress=False)
    assert len(fake.calls) == calls
    assert again["losses"] == record["losses"]
    assert (out / "adapter_model.safetensors").read_bytes() == weights


def test_embedded_adapter_merges_into_plain_linear(tmp_path, monkeypatch):
    monkeypatch.setattr(distil, "complete_chat", FakeChat())
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: tiny_model("cliffkit-thinker", seed=0))
    distil.run_distillation(tmp_path / "run", tmp_path / "thinker", examples=4, evaluate=False, progress=False)
    monkeypatch.setattr(models, "embedded_adapter_path", lambda model_id: tmp_path / "thinker")

    base = tiny_model("cliffkit-thinker", seed=0)
    merged = models._merge_embedded_adapter(base.model, base.tokenizer, base.family, models.EMBEDDED_THINKER)

    assert type(merged.model.layers[1].self_attn.q_proj) is torch.nn.Linear
    assert not any("lora_" in name for name, _ in merged.named_parameters())


def test_missing_embedded_adapter_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "embedded_adapter_path", lambda model_id: tmp_path / "nowhere")
    base = tiny_model("cliffkit-thinker")
    with pytest.raises(FileNotFoundError, match="distil-thinker"):
        models._merge_embedded_adapter(base.model, base.tokenizer, base.family, models.EMBEDDED_THINKER)


def test_thinker_is_registered():
    assert models.EMBEDDED_MODELS[models.EMBEDDED_THINKER] == "cliffkit-thinker"
    assert models.EMBEDDED_MODELS[models.EMBEDDED_INSTRUCT] == "scaffold"
    assert models._pick_family(models.EMBEDDED_THINKER, "qwen2", None).name == "cliffkit-thinker"


THINKER_SHIPPED = (Path(models.__file__).parent / "adapters" / "thinker" / "adapter_config.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not THINKER_SHIPPED, reason="no thinker adapter in cliffkit/adapters/thinker yet: "
                    "build it with `cliffkit distil-thinker`")
def test_shipped_adapter_closes_think_block():
    from cliffkit.generate import GenerationSettings, PromptInput, generate_traces

    lm = models.load_model(models.EMBEDDED_THINKER, dtype="float32", device="cpu")
    prompt = PromptInput(id="benign/slow-test", text="How do I keep basil fresh after buying it?")
    settings = GenerationSettings(think_budget=160, answer_budget=32, temperature=0.0, batch_size=1)

    trace = generate_traces(lm, [prompt], settings, progress=False)[0]

    assert lm.family.name == "cliffkit-thinker"
    assert trace.closed_by == "model"
    assert trace.thinking and trace.answer
