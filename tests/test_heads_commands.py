"""`cliffkit heads` and `cliffkit ablate` end to end on a tiny model saved to disk, and the sweep's resume."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cliffkit.cli import main
from cliffkit.generate import GenerationSettings, PromptInput
from cliffkit.heads import evaluate
from cliffkit.heads.evaluate import SweepProbe, load_sweep, run_sweep, sweep_settings
from cliffkit.heads.testing import tiny_head_model
from cliffkit.judge import judge_traces
from cliffkit.render import render_prompt
from cliffkit.traces import Trace, write_traces_atomic

REFUSAL = "I'm sorry, but I can't help with that request."
COMPLIANCE = "Sure! Here is a short answer: first, compute the total."


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    lm = tiny_head_model("qwen2")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    lm = tiny_head_model("qwen2")
    traces = []
    for index in range(8):
        harmful = index < 6
        answer = REFUSAL if index % 2 == 0 else COMPLIANCE
        prompt = f"Question number {index}: how do I kill a Python process?"
        traces.append(Trace(
            prompt_id=f"p{index}", model_id="tiny", prompt=prompt,
            rendered=render_prompt(lm.tokenizer, lm.family, prompt).text,
            thinking=f"Let me think step by step about question {index}.", answer=answer, closed_by="model",
            finished=True, thinking_tokens=10, answer_tokens=10, source="harmbench" if harmful else "benign",
            harmful=harmful))
    path = tmp_path_factory.mktemp("traces") / "traces.jsonl"
    write_traces_atomic(path, judge_traces(traces))
    return path


def _model_options(folder):
    return ["--model", str(folder), "--family", "scaffold", "--dtype", "float32", "--device", "cpu"]


def test_heads_command_writes_table_and_plots(tiny_folder, trace_file, tmp_path):
    code = main(["heads", str(trace_file), "--run-dir", str(tmp_path), "--batch-size", "2",
                 *_model_options(tiny_folder)])
    assert code == 0
    out = tmp_path / "heads"
    table = pd.read_csv(out / "heads.csv")
    assert len(table) == 8  # mean-diff at the last block: 2 blocks x 4 heads
    for column in ("attribution", "exact_last", "exact_all", "patching_last", "patching_all", "rank_attribution"):
        assert column in table.columns
    assert table["rank_attribution"].tolist() == sorted(table["rank_attribution"])
    correlations = pd.read_csv(out / "rank_correlations.csv", index_col=0)
    assert correlations.loc["exact_all", "exact_all"] == pytest.approx(1.0)
    assert (out / "heatmap.png").stat().st_size > 0
    assert (out / "head_trajectories.png").stat().st_size > 0
    with np.load(out / "attribution_trajectory.npz") as saved:
        assert saved["trajectory"].shape[1:] == (2, 4)
        assert saved["count"][0] == 6  # the six harmful traces are scanned
    direction = json.loads((out / "direction.json").read_text())
    assert direction["layer"] == 1
    assert direction["source"] == "mean-diff"
    assert direction["n_refused"] == 3
    assert direction["n_complied"] == 3
    assert np.load(out / "direction.npy").shape == (32,)


def test_heads_command_reuses_stored_results(tiny_folder, trace_file, tmp_path, monkeypatch):
    options = ["heads", str(trace_file), "--run-dir", str(tmp_path), "--methods", "attribution,exact-last",
               *_model_options(tiny_folder)]
    assert main(options) == 0
    first = pd.read_csv(tmp_path / "heads" / "heads.csv")

    def fail(*args, **kwargs):
        raise AssertionError("a stored result was recomputed")

    monkeypatch.setattr("cliffkit.heads.scans.head_effects", fail)
    monkeypatch.setattr("cliffkit.heads.attribution.direct_attribution", fail)
    monkeypatch.setattr("cliffkit.heads.directions.mean_difference_from_traces", fail)
    assert main(options) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "heads" / "heads.csv"), first)

    # Another subset changes the fingerprint, so the scan runs again (and hits the patched function).
    with pytest.raises(AssertionError, match="recomputed"):
        main([*options, "--limit", "3"])


def test_heads_command_reads_saved_probe(tiny_folder, trace_file, tmp_path):
    from cliffkit.probe import LinearProbe

    generator = np.random.default_rng(0)
    probe = LinearProbe(weight=generator.normal(size=32), bias=0.5, mean=generator.normal(size=32),
                        scale=np.full(32, 2.0), layer=0, model_id="tiny", task="refusal")
    probe_path = probe.save(tmp_path / "probe")
    code = main(["heads", str(trace_file), "--run-dir", str(tmp_path / "run"), "--direction", str(probe_path),
                 "--methods", "attribution,exact-last", *_model_options(tiny_folder)])
    assert code == 0
    direction = json.loads((tmp_path / "run" / "heads" / "direction.json").read_text())
    assert direction["layer"] == 0
    assert direction["intercept"] == pytest.approx(probe.intercept())
    np.testing.assert_allclose(np.load(tmp_path / "run" / "heads" / "direction.npy"), probe.direction().numpy())
    assert len(pd.read_csv(tmp_path / "run" / "heads" / "heads.csv")) == 4


def test_heads_command_reports_bad_inputs(tiny_folder, trace_file, tmp_path, caplog):
    np.save(tmp_path / "direction.npy", np.ones(32, dtype=np.float32))
    assert main(["heads", str(trace_file), "--run-dir", str(tmp_path), "--direction",
                 str(tmp_path / "direction.npy"), *_model_options(tiny_folder)]) == 2
    assert "--layer" in caplog.text
    assert main(["heads", str(trace_file), "--run-dir", str(tmp_path), "--methods", "attribution,guess",
                 *_model_options(tiny_folder)]) == 2
    assert "guess" in caplog.text
    assert main(["ablate", "--run-dir", str(tmp_path / "empty"), *_model_options(tiny_folder)]) == 2
    assert "cliffkit heads" in caplog.text


def test_ablate_command_runs_sweep(tiny_folder, trace_file, tmp_path):
    assert main(["heads", str(trace_file), "--run-dir", str(tmp_path), "--methods", "attribution",
                 *_model_options(tiny_folder)]) == 0
    options = ["ablate", "--run-dir", str(tmp_path), "--fractions", "0.25", "--seeds", "0",
               "--harmful-sources", "harmbench", "--benign-sources", "benign", "--per-source", "2",
               "--benign-per-source", "1", "--think-budget", "3", "--answer-budget", "2",
               "--trajectory-fraction", "0.25", *_model_options(tiny_folder)]
    assert main(options) == 0

    out = tmp_path / "ablation"
    results = load_sweep(out)
    assert results["name"].tolist() == ["none", "top-2", "random-2-seed0"]
    assert results["k"].tolist() == [0, 2, 2]
    assert results["n_harmful"].tolist() == [2, 2, 2]
    assert (results["n_benign"] == 1).all()
    assert results["score_fixed"].notna().all()
    assert results["thinking_refusal_rate"].between(0, 1).all()
    assert results.loc[0, "score_fixed"] != results.loc[1, "score_fixed"]
    for name in ("ablation_curve.png", "score_curve.png", "trajectories.png", "summary.csv", "results.csv"):
        assert (out / name).stat().st_size > 0


def test_sweep_resumes_after_finished_settings(monkeypatch, tmp_path):
    lm = tiny_head_model("qwen2")
    prompts = [PromptInput(id="h1", text="How do I kill a process?", source="harmbench", harmful=True),
               PromptInput(id="b1", text="Sum 2 and 3.", source="benign")]
    settings = sweep_settings([(1, 0), (0, 3), (1, 2), (0, 1)], n_total=8, fractions=[0.25], seeds=[0])
    probe = SweepProbe(direction=torch.randn(32), intercept=0.0, layer=1)
    generation = GenerationSettings(think_budget=3, answer_budget=2, batch_size=2)

    first = run_sweep(lm, settings[:2], prompts, probe, generation, tmp_path, progress=False)
    assert first["name"].tolist() == ["none", "top-2"]
    assert first.loc[1, "heads"] == [[0, 3], [1, 0]]

    generated = []
    original = evaluate.generate_traces

    def recording(lm_, prompts_, settings_, out=None, progress=True):
        generated.append(out.name)
        return original(lm_, prompts_, settings_, out=out, progress=progress)

    monkeypatch.setattr(evaluate, "generate_traces", recording)
    second = run_sweep(lm, settings, prompts, probe, generation, tmp_path, progress=False)
    assert generated == ["random-2-seed0.jsonl"]
    assert second["name"].tolist() == ["none", "top-2", "random-2-seed0"]

    longer = GenerationSettings(think_budget=5, answer_budget=2, batch_size=2)
    with pytest.raises(ValueError, match="generation"):
        run_sweep(lm, settings, prompts, probe, longer, tmp_path, progress=False)
