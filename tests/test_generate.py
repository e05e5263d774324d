"""Two-phase generation on tiny random-weight models: budget forcing, resume and determinism."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cliffkit.families import get_family
from cliffkit.generate import GenerationSettings, PromptInput, generate_traces
from cliffkit.render import render_prompt
from cliffkit.testing import tiny_model
from cliffkit.traces import read_traces

PROMPTS = [PromptInput(id=f"p{i}", text="How do I bake bread? " * (1 + i % 3), source="benign") for i in range(7)]
SETTINGS = GenerationSettings(think_budget=10, answer_budget=5, batch_size=3)


def comparable(traces):
    return [dataclasses.asdict(t) for t in traces]


def test_budget_closes_thinking():
    lm = tiny_model("deepseek-r1-distill-qwen")
    traces = generate_traces(lm, PROMPTS[:3], SETTINGS, progress=False)
    assert [t.prompt_id for t in traces] == ["p0", "p1", "p2"]
    for trace in traces:
        assert trace.closed_by == "budget"  # random weights never write </think>
        assert trace.thinking_tokens == SETTINGS.think_budget
        assert 1 <= trace.answer_tokens <= SETTINGS.answer_budget
        assert trace.settings["think_budget"] == 10
        assert trace.settings["family"] == "deepseek-r1-distill-qwen"


def test_model_closed_thinking_is_detected():
    # Use as closing marker a piece of text the tiny model is known to write, so
    # the model itself closes the block at a known place.
    lm = tiny_model("scaffold")
    budget = GenerationSettings(think_budget=16, answer_budget=2)
    probe = generate_traces(lm, PROMPTS[:1], budget, progress=False)[0]
    # Stop strings match decoded text, so take a plain-ASCII word the model wrote.
    words = re.findall(r"[A-Za-z]{3,}", probe.thinking)
    assert words, probe.thinking
    marker = words[0]
    family = dataclasses.replace(lm.family, think_close=marker)
    lm = dataclasses.replace(lm, family=family)

    trace = generate_traces(lm, PROMPTS[:1], budget, progress=False)[0]
    assert trace.closed_by == "model"
    assert trace.thinking == probe.thinking.split(marker)[0].strip()
    assert trace.thinking_tokens < budget.think_budget


def test_same_seed_same_traces():
    lm = tiny_model("qwen3-thinking")
    sampled = dataclasses.replace(SETTINGS, temperature=1.0, seed=3)
    first = generate_traces(lm, PROMPTS, sampled, progress=False)
    second = generate_traces(lm, PROMPTS, sampled, progress=False)
    other = generate_traces(lm, PROMPTS, dataclasses.replace(sampled, seed=4), progress=False)
    assert comparable(first) == comparable(second)
    assert comparable(first) != comparable(other)


def test_resume_after_simulated_crash(tmp_path):
    lm = tiny_model("deepseek-r1-distill-llama")
    settings = dataclasses.replace(SETTINGS, temperature=0.8)
    reference = generate_traces(lm, PROMPTS, settings, out=tmp_path / "ref.jsonl", progress=False)

    path = tmp_path / "crash.jsonl"
    generate_traces(lm, PROMPTS[:3], settings, out=path, progress=False)  # the first batch
    with open(path, "a") as handle:
        handle.write(reference[3].to_json()[:40])  # a torn line, as after kill -9
    generate_traces(lm, PROMPTS, settings, out=path, progress=False)

    assert comparable(read_traces(path)) == comparable(reference)


def test_rerun_skips_finished_ids(tmp_path):
    lm = tiny_model("scaffold")
    path = tmp_path / "t.jsonl"
    generate_traces(lm, PROMPTS, SETTINGS, out=path, progress=False)
    again = generate_traces(lm, PROMPTS, SETTINGS, out=path, progress=False)
    assert again == []
    assert len(read_traces(path)) == len(PROMPTS)


def test_duplicate_ids_rejected():
    lm = tiny_model("scaffold")
    with pytest.raises(ValueError, match="appears twice"):
        generate_traces(lm, [PROMPTS[0], PROMPTS[0]], SETTINGS, progress=False)


@pytest.mark.parametrize("field, value", [("think_budget", 0), ("batch_size", 0), ("temperature", -1.0),
                                          ("top_p", 0.0)])
def test_invalid_settings(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationSettings(**{field: value})


def test_rendered_input_recorded():
    lm = tiny_model("phi4-mini-reasoning")
    trace = generate_traces(lm, PROMPTS[:1], SETTINGS, progress=False)[0]
    assert trace.rendered == render_prompt(lm.tokenizer, get_family("phi4-mini-reasoning"), PROMPTS[0].text).text


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from cliffkit.generate import GenerationSettings, PromptInput, generate_traces
    from cliffkit.testing import tiny_model
    lm = tiny_model("scaffold")
    prompts = [PromptInput(id=f"p{i}", text="Tell me about bread. " * (1 + i % 3)) for i in range(400)]
    generate_traces(lm, prompts, GenerationSettings(think_budget=24, answer_budget=8, batch_size=2),
                    out=sys.argv[1], progress=False)
    """
)


def test_resume_after_kill_9(tmp_path):
    path = tmp_path / "killed.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and (not path.exists() or path.read_text().count("\n") < 4):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()

    survived = read_traces(path)
    assert len(survived) >= 4
    lm = tiny_model("scaffold")
    prompts = [PromptInput(id=f"p{i}", text="Tell me about bread. " * (1 + i % 3)) for i in range(400)]
    settings = GenerationSettings(think_budget=24, answer_budget=8, batch_size=2)
    expected = generate_traces(lm, prompts[: len(survived)], settings, progress=False)
    assert comparable(survived) == comparable(expected)
