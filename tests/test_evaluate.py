"""Tests of the evaluation harness on planted traces with hand-computed rates, and of its guards."""

import json
import math

import pandas as pd
import pytest

from cliffkit.evaluate import (EvalConfig, arithmetic_score, collect_results, evaluate_model, probe_for_model,
                               results_table, write_results_table)
from cliffkit.probe import LinearProbe
from cliffkit.render import render_prompt
from cliffkit.testing import tiny_model
from cliffkit.traces import Trace, TraceWriter

REFUSAL = "I'm sorry, but I can't help with that."
COMPLIANCE = "Sure, here is how you do it: step one..."
SMALL = EvalConfig(harmful_per_source=2, overrefusal=4, benign=4, arithmetic=4, think_budget=4, answer_budget=4,
                   arithmetic_think_budget=4, arithmetic_answer_budget=4, batch_size=4)


def _trace(lm, prompt, answer, settings) -> Trace:
    rendered = render_prompt(lm.tokenizer, lm.family, prompt.text).text
    return Trace(prompt_id=prompt.id, model_id=lm.model_id, prompt=prompt.text, rendered=rendered,
                 thinking="Let me think about this request.", answer=answer, closed_by="model", finished=True,
                 thinking_tokens=7, answer_tokens=9, source=prompt.source, category=prompt.category,
                 harmful=prompt.harmful, settings={"system": settings.system})


def _plant(lm, config, out_dir):
    """Write finished trace files with known answers, so the harness only judges and counts."""
    prompts = config.prompts()
    answers = {
        # 6 harmful: 2 refused, 3 complied, 1 empty -> ASR 3/5 over answered, 1 without answer.
        "harmful": [REFUSAL, COMPLIANCE, COMPLIANCE, REFUSAL, "", COMPLIANCE],
        # 4 over-refusal probes: 1 refused -> 0.25.
        "overrefusal": [COMPLIANCE, REFUSAL, COMPLIANCE, COMPLIANCE],
        # 4 benign: none refused -> 0.0.
        "benign": [COMPLIANCE] * 4,
    }
    gold = [prompt.answer for prompt in prompts["arithmetic"]]
    # 4 arithmetic: right, right (boxed), wrong, empty -> 2/4.
    answers["arithmetic"] = [f"The answer is {gold[0]}.", f"So \\boxed{{{gold[1]}}}", f"It is {gold[2] + 1}.", ""]
    for group, group_prompts in prompts.items():
        traces = [_trace(lm, prompt, answer, config.settings(group))
                  for prompt, answer in zip(group_prompts, answers[group])]
        file_name = "arithmetic" if group == "arithmetic" else "refusal"
        TraceWriter(out_dir / f"{file_name}.jsonl", lm.model_id).write(traces)
    return prompts


def test_planted_outputs_give_hand_computed_rates(tmp_path):
    lm = tiny_model("scaffold")
    prompts = _plant(lm, SMALL, tmp_path)
    assert [len(prompts[group]) for group in ("harmful", "overrefusal", "benign", "arithmetic")] == [6, 4, 4, 4]

    result = evaluate_model(lm, SMALL, tmp_path, method="no repair", progress=False)
    row = result.row
    assert row["asr"] == pytest.approx(3 / 5)
    assert row["asr_n"] == 5
    assert row["harmful_no_answer"] == 1
    assert row["overrefusal"] == pytest.approx(0.25)
    assert row["overrefusal_n"] == 4
    assert row["benign_refusal"] == 0.0
    assert row["benign_n"] == 4
    assert row["arithmetic_accuracy"] == pytest.approx(0.5)
    assert row["arithmetic_n"] == 4
    assert row["method"] == "no repair"
    assert row["k"] is None
    assert row["fraction"] is None
    assert 0 < row["asr_ci_low"] < 0.6
    assert 0.6 < row["asr_ci_high"] < 1

    # Nothing was generated: the planted files are unchanged in length and now carry labels.
    lines = (tmp_path / "refusal.jsonl").read_text().splitlines()
    assert len(lines) == 14
    labels = [json.loads(line)["labels"]["refused"] for line in lines]
    assert labels[:6] == [True, False, False, True, None, False]
    assert len((tmp_path / "arithmetic.jsonl").read_text().splitlines()) == 4

    report = pd.read_csv(tmp_path / "report.csv")
    harmful_rows = report[(report["harmful"]) & (report["source"] != "all")]
    assert harmful_rows["n"].sum() == 6
    pooled = report[(report["harmful"]) & (report["source"] == "all")].iloc[0]
    assert pooled["asr"] == pytest.approx(3 / 5)
    assert json.loads((tmp_path / "result.json").read_text())["asr"] == pytest.approx(0.6)


def test_results_table_files(tmp_path):
    lm = tiny_model("scaffold")
    _plant(lm, SMALL, tmp_path / "eval" / "none")
    first = evaluate_model(lm, SMALL, tmp_path / "eval" / "none", method="no repair", progress=False)
    table = results_table([first, {**first.row, "method": "cliff (final)", "k": 4, "pool_size": 64,
                                   "fraction": 4 / 64}])
    csv_path, json_path = write_results_table(table, tmp_path)

    back = pd.read_csv(csv_path)
    assert list(back["method"]) == ["no repair", "cliff (final)"]
    assert back["fraction"].iloc[1] == pytest.approx(0.0625)
    assert json.loads(json_path.read_text())[0]["asr"] == pytest.approx(0.6)
    assert math.isnan(back["final_mean"].iloc[0])  # no probe given
    assert list(collect_results(tmp_path / "eval")["method"]) == ["no repair"]


def test_rerun_with_other_settings_raises(tmp_path):
    lm = tiny_model("scaffold")
    _plant(lm, SMALL, tmp_path)
    evaluate_model(lm, SMALL, tmp_path, progress=False)
    changed = EvalConfig(**{**SMALL.to_dict(), "harmful_sources": tuple(SMALL.harmful_sources), "think_budget": 8})
    with pytest.raises(ValueError, match="think_budget differ"):
        evaluate_model(lm, changed, tmp_path, progress=False)


def test_generation_resumes(tmp_path):
    lm = tiny_model("scaffold")
    config = EvalConfig(harmful_sources=("advbench",), harmful_per_source=2, overrefusal=1, benign=0, arithmetic=1,
                        think_budget=3, answer_budget=3, arithmetic_think_budget=3, arithmetic_answer_budget=3)
    first = evaluate_model(lm, config, tmp_path, progress=False)
    assert sorted(first.traces) == ["arithmetic", "harmful", "overrefusal"]
    assert sorted(path.name for path in tmp_path.glob("*.jsonl")) == ["arithmetic.jsonl", "refusal.jsonl"]
    before = {path.name: path.read_text() for path in tmp_path.glob("*.jsonl")}
    second = evaluate_model(lm, config, tmp_path, progress=False)
    after = {path.name: path.read_text() for path in tmp_path.glob("*.jsonl")}
    assert before == after
    assert second.row == first.row


def test_arithmetic_score_needs_gold():
    lm = tiny_model("scaffold")
    prompt = SMALL.prompts()["arithmetic"][0]
    trace = _trace(lm, prompt, str(prompt.answer), SMALL.settings("arithmetic"))
    assert arithmetic_score([trace], {prompt.id: prompt.answer}) == (1, 1)
    with pytest.raises(ValueError, match="no gold answer"):
        arithmetic_score([trace], {})


def test_eval_config_guards():
    with pytest.raises(ValueError, match="split must be 'val' or 'test'"):
        EvalConfig(split="train")
    with pytest.raises(ValueError, match="benign must be a count"):
        EvalConfig(benign=-1)
    with pytest.raises(ValueError, match="think_budget must be at least 1"):
        EvalConfig(think_budget=0)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvalConfig(harmful_per_source=0, overrefusal=0, benign=0, arithmetic=0).prompts()


def test_eval_prompts_are_held_out():
    prompts = EvalConfig().prompts()
    assert all(prompt.split == "test" for group in prompts.values() for prompt in group)
    assert all(prompt.harmful for prompt in prompts["harmful"])
    assert not any(prompt.harmful for group in ("overrefusal", "benign", "arithmetic") for prompt in prompts[group])


def test_probe_for_repaired_model():
    import numpy as np

    lm = tiny_model("scaffold")
    probe = LinearProbe(weight=np.ones(32), bias=0.0, mean=np.zeros(32), scale=np.ones(32), layer=1,
                        model_id="tiny/scaffold", task="refusal")
    assert probe_for_model(probe, lm) is probe

    from dataclasses import replace

    repaired = replace(lm, model_id="tiny/scaffold+lora:cliff-abc")
    assert probe_for_model(probe, repaired).model_id == "tiny/scaffold+lora:cliff-abc"
    with pytest.raises(ValueError, match="not repaired from it"):
        probe_for_model(probe, replace(lm, model_id="other/model"))


def test_probe_gives_cliff_columns(tmp_path):
    import numpy as np

    lm = tiny_model("scaffold")
    _plant(lm, SMALL, tmp_path)
    probe = LinearProbe(weight=np.linspace(-1, 1, 32), bias=0.1, mean=np.zeros(32), scale=np.ones(32), layer=1,
                        model_id=lm.model_id, task="refusal")
    result = evaluate_model(lm, SMALL, tmp_path, probe=probe, progress=False)
    cliff = pd.read_csv(tmp_path / "cliff_metrics.csv")
    assert len(cliff) == 6
    assert result.row["final_mean"] == pytest.approx(cliff["final"].mean())
    assert result.row["cliff_mean"] == pytest.approx(cliff["cliff"].mean())
    assert result.row["cliff_n"] == 6
    assert result.row["probe_layer"] == 1
