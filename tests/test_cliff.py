"""Trajectories and cliff metrics on hand-made curves, scoring with a tiny model, and the probe/cliff commands."""

import json
import logging

import numpy as np
import pandas as pd
import pytest

from cliffkit.activations import last_position_activations
from cliffkit.cli import main
from cliffkit.cliff import (
    Trajectories,
    bootstrap_band,
    cliff_metrics,
    group_summary,
    layer_tail_matrix,
    metrics_frame,
    outcome_of,
    resample_thinking,
    score_traces,
    tail_align,
    tail_frame,
    tail_mean,
    thinking_frame,
)
from cliffkit.models import load_model
from cliffkit.probe import LinearProbe
from cliffkit.render import render_prompt
from cliffkit.testing import tiny_model
from cliffkit.traces import Trace, read_traces, write_traces_atomic

# ---------------------------------------------------------------- alignment


def test_tail_mean_ragged_no_zero_fill():
    sequences = [np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0]), np.array([9.0])]
    mean, count = tail_mean(sequences)
    # distance 0: (3 + 5 + 9) / 3; distance 1: (2 + 4) / 2; distance 2: only the first sequence.
    np.testing.assert_allclose(mean, [17 / 3, 3.0, 1.0])
    assert count.tolist() == [3, 2, 1]


def test_tail_align_layout_and_cut():
    aligned = tail_align([np.array([1.0, 2.0, 3.0]), np.array([4.0])], max_distance=1)
    assert aligned.shape == (2, 2)
    np.testing.assert_array_equal(aligned[0], [3.0, 2.0])
    assert aligned[1, 0] == 4.0 and np.isnan(aligned[1, 1])


def test_bootstrap_band_properties():
    constant = tail_align([np.full(4, 0.7), np.full(3, 0.7), np.full(2, 0.7)])
    low, high = bootstrap_band(constant, n_boot=200, seed=0)
    np.testing.assert_allclose(low, 0.7)
    np.testing.assert_allclose(high, 0.7)

    rng = np.random.default_rng(0)
    noisy = tail_align([rng.random(20) for _ in range(30)])
    low, high = bootstrap_band(noisy, n_boot=300, seed=3)
    mean, _ = tail_mean([row[::-1] for row in noisy])
    assert np.all(low <= mean) and np.all(mean <= high)
    assert np.all(high - low > 0)
    again = bootstrap_band(noisy, n_boot=300, seed=3)
    np.testing.assert_array_equal(again[0], low)


def test_resample_thinking_stays_in_unit_range():
    segments = np.array([0, 1, 1, 1, 1, 2])
    values = np.array([0.5, 0.0, 1.0, 0.0, 1.0, 0.2])
    resampled = resample_thinking(values, segments, n_points=7)
    assert resampled.min() >= 0.0 and resampled.max() <= 1.0
    assert resampled[0] == 0.0 and resampled[-1] == 1.0
    # Position 0.5 lies halfway between thinking tokens 2 and 3 (values 1 and 0).
    assert resampled[3] == pytest.approx(0.5)

    logits = resample_thinking(np.array([0, -3.0, 5.0, 0]), np.array([0, 1, 1, 2]), n_points=3, clip=None)
    np.testing.assert_allclose(logits, [-3.0, 1.0, 5.0])
    assert np.isnan(resample_thinking(np.array([0.1, 0.2]), np.array([0, 2]))).all()


# ---------------------------------------------------------------- metrics


def test_cliff_metrics_hand_computed():
    segments = np.array([0, 0] + [1] * 10 + [2, 2])
    scores = np.array([0.5, 0.5] + [0.9] * 6 + [0.8, 0.6, 0.3, 0.2] + [0.1, 0.1])
    metrics = cliff_metrics(scores, segments, exclude_last=4)
    assert metrics["plateau"] == pytest.approx(0.9)
    assert metrics["final"] == pytest.approx(0.1)
    assert metrics["cliff"] == pytest.approx(0.8)
    assert metrics["max_drop"] == pytest.approx(0.8)
    # Threshold 0.5: the last score at or above it is 0.6 at position 9, so the drop starts
    # at position 10, which is 14 - 1 - 10 = 3 tokens before the end.
    assert metrics["drop_start"] == 3
    assert metrics["n_thinking"] == 10


def test_cliff_metrics_plateau_window():
    segments = np.array([1, 1, 1, 1, 2])
    scores = np.array([0.2, 0.4, 0.9, 1.0, 0.5])
    assert cliff_metrics(scores, segments, exclude_last=2)["plateau"] == pytest.approx(0.3)
    # A thinking of exclude_last tokens or fewer uses the whole thinking.
    assert cliff_metrics(scores, segments, exclude_last=4)["plateau"] == pytest.approx(0.625)


def test_cliff_metrics_no_drop_and_no_thinking():
    rising = cliff_metrics(np.array([0.1, 0.2, 0.3, 0.9]), np.array([0, 1, 1, 2]), exclude_last=0)
    assert rising["cliff"] == pytest.approx(0.25 - 0.9)
    assert np.isnan(rising["drop_start"])

    empty = cliff_metrics(np.array([0.4, 0.1]), np.array([0, 2]))
    assert np.isnan(empty["plateau"]) and empty["final"] == pytest.approx(0.1) and empty["n_thinking"] == 0


def test_cliff_metrics_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="equal non-empty 1-D"):
        cliff_metrics(np.zeros(3), np.zeros(4))


def test_outcome_of():
    def trace(harmful, labels):
        return Trace(prompt_id="x", model_id="m", prompt="", rendered="", thinking="", answer="",
                     closed_by="model", finished=True, thinking_tokens=0, answer_tokens=0, harmful=harmful,
                     labels=labels)

    assert outcome_of(trace(True, {"refused": True})) == "refused"
    assert outcome_of(trace(True, {"refused": False})) == "complied"
    assert outcome_of(trace(True, {"refused": None})) == "no answer"
    assert outcome_of(trace(True, {})) == "unjudged"
    assert outcome_of(trace(False, {"refused": True})) == "benign"


def hand_trajectories():
    logits = [np.array([[0.0, 2.0, 2.0, -2.0]]), np.array([[1.0, 1.0, 1.0]]), np.array([[3.0, -1.0]])]
    segments = [np.array([0, 1, 1, 2]), np.array([0, 1, 2]), np.array([1, 2])]
    meta = pd.DataFrame({"prompt_id": ["a", "b", "c"], "outcome": ["complied", "refused", "complied"],
                         "source": ["s1", "s1", "s2"], "category": ["x", "y", "x"], "model_id": ["m"] * 3})
    return Trajectories((4,), logits, segments, meta)


def test_tail_frame_groups_match_tail_mean():
    trajectories = hand_trajectories()
    frame = tail_frame(trajectories, 4, "outcome", kind="logit", n_boot=50)
    complied = frame[frame["group"] == "complied"].set_index("distance")
    np.testing.assert_allclose(complied["mean"].to_numpy(), [(-2 - 1) / 2, (2 + 3) / 2, 2.0, 0.0])
    assert complied["count"].tolist() == [2, 2, 1, 1]
    assert set(frame["group"]) == {"complied", "refused"}

    curve = thinking_frame(trajectories, 4, "outcome", n_points=3, n_boot=20)
    assert curve["mean"].between(0, 1).all()


def test_metrics_frame_and_summary():
    trajectories = hand_trajectories()
    metrics = metrics_frame(trajectories, 4, kind="logit", exclude_last=0)
    assert metrics["cliff"].tolist() == pytest.approx([4.0, 0.0, 4.0])
    summary = group_summary(metrics, "outcome").set_index("outcome")
    assert summary.loc["complied", "n"] == 2
    assert summary.loc["complied", "cliff_mean"] == pytest.approx(4.0)
    assert group_summary(metrics, ["source", "category"])["n"].sum() == 3
    with pytest.raises(ValueError, match="cannot group by"):
        group_summary(metrics, "dataset")


def test_layer_tail_matrix():
    trajectories = hand_trajectories()
    matrix, count = layer_tail_matrix(trajectories, [0, 2], kind="logit", max_distance=1)
    np.testing.assert_allclose(matrix, [[-1.5, 2.5]])
    assert count.tolist() == [2, 2]


def test_trajectories_save_load(tmp_path):
    trajectories = hand_trajectories()
    trajectories.save(tmp_path / "scores")
    loaded = Trajectories.load(tmp_path / "scores")
    assert loaded.layers == (4,)
    for a, b in zip(loaded.logits, trajectories.logits):
        np.testing.assert_array_equal(a, b.astype(np.float32))
    assert loaded.meta["prompt_id"].tolist() == ["a", "b", "c"]
    with pytest.raises(ValueError, match="layer 3 was not scored"):
        loaded.values(3)


# ---------------------------------------------------------------- scoring with a tiny model

OUTCOME_TEXTS = {
    "refused": ("I must not help with this. It is harmful.", "I'm sorry, but I can't help with that request."),
    "complied": ("Let me think step by step about the question.", "Sure! Here is a short answer."),
    "benign": ("First, compute the total. Then divide.", "Sure! Here is a short answer with numbers 1 2 3."),
}


def labelled_traces(lm, per_outcome=10, model_id=None):
    traces = []
    for outcome, (thinking, answer) in OUTCOME_TEXTS.items():
        for i in range(per_outcome):
            prompt = f"Question {i} about {outcome}: the quick brown fox {i * 'jumps '}"
            traces.append(Trace(
                prompt_id=f"{outcome}-{i}", model_id=model_id or lm.model_id, prompt=prompt,
                rendered=render_prompt(lm.tokenizer, lm.family, prompt).text, thinking=thinking + f" {i}" * i,
                answer=answer, closed_by="budget" if i % 3 else "model", finished=True, thinking_tokens=0,
                answer_tokens=0, source="bench" if outcome != "benign" else "benign", category=f"c{i % 2}",
                harmful=outcome != "benign", labels={"refused": outcome == "refused", "judge": "test"}))
    return traces


@pytest.fixture(scope="module")
def scaffold():
    return tiny_model("scaffold")


def fixed_probe(layer, seed):
    rng = np.random.default_rng(seed)
    return LinearProbe(weight=rng.normal(size=32), bias=0.3, mean=rng.normal(size=32), scale=rng.random(32) + 0.5,
                       layer=layer, model_id="tiny/scaffold", task="refusal")


def test_score_traces_equals_last_position_probe(scaffold):
    traces = labelled_traces(scaffold, per_outcome=2)
    probes = {0: fixed_probe(0, 1), 1: fixed_probe(1, 2)}
    trajectories = score_traces(scaffold, traces, probes, batch_size=4, progress=False)
    last = last_position_activations(scaffold, traces, [0, 1], progress=False)
    for k, layer in enumerate((0, 1)):
        finals = np.array([values[-1] for values in trajectories.values(layer, "logit")])
        np.testing.assert_allclose(finals, probes[layer].score_logit(last[:, k]), rtol=1e-4, atol=1e-4)
    assert trajectories.meta["outcome"].tolist()[:2] == ["refused", "refused"]
    assert all(len(s) == v.shape[1] for s, v in zip(trajectories.segments, trajectories.logits))


def test_score_traces_rejects_other_model(scaffold):
    probe = fixed_probe(0, 1)
    probe.model_id = "another/model"
    with pytest.raises(ValueError, match="fitted on 'another/model'"):
        score_traces(scaffold, labelled_traces(scaffold, 1), probe, progress=False)


# ---------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, scaffold):
    folder = tmp_path_factory.mktemp("tiny-model")
    scaffold.model.save_pretrained(folder)
    scaffold.tokenizer.save_pretrained(folder)
    return folder


def cli_args(command, traces_path, run_dir, model_folder, *extra):
    return [command, "--traces", str(traces_path), "--run-dir", str(run_dir), "--model", str(model_folder),
            "--family", "scaffold", "--dtype", "float32", "--device", "cpu", "--batch-size", "8", *extra]


def test_cliff_command_end_to_end(tmp_path, tiny_folder, scaffold, monkeypatch):
    traces_path = tmp_path / "traces.jsonl"
    write_traces_atomic(traces_path, labelled_traces(scaffold, model_id=str(tiny_folder)))
    run_dir = tmp_path / "run"

    assert main(cli_args("cliff", traces_path, run_dir, tiny_folder, "--n-boot", "50")) == 0

    probe_summary = json.loads((run_dir / "probe" / "summary.json").read_text())
    assert set(probe_summary["tasks"]) == {"refusal", "harmfulness", "paper"}
    assert probe_summary["label_counts"] == {"refused": 10, "complied": 10, "benign": 10}
    sweep = pd.read_csv(run_dir / "probe" / "sweep.csv")
    assert len(sweep) == 6 and set(sweep["layer"]) == {0, 1}
    for task in ("refusal", "harmfulness", "paper"):
        assert (run_dir / "probe" / task / "layer_01.npz").exists()
        assert (run_dir / "probe" / task / "mean_difference_directions.safetensors").exists()
        split = json.loads((run_dir / "probe" / task / "split.json").read_text())
        assert not set(split["train"]) & set(split["test"])
    assert probe_summary["transfer"]["by_distance"][0]["distance"] == 0
    assert (run_dir / "probe" / "transfer.png").exists() and (run_dir / "probe" / "sweep.png").exists()

    cliff_dir = run_dir / "cliff"
    for name in ("trajectory.png", "trajectory_thinking.png", "cliff_distribution.png", "heatmap_refused.png",
                 "heatmap_complied.png", "heatmap_benign.png", "metrics.csv", "scores.npz"):
        assert (cliff_dir / name).exists(), name
    summary = json.loads((cliff_dir / "summary.json").read_text())
    metrics = pd.read_csv(cliff_dir / "metrics.csv")
    assert len(metrics) == 30 and set(metrics["split"]) <= {"train", "val", "test", "not in task"}
    by_outcome = {row["outcome"]: row for row in summary["by_outcome"]}
    assert by_outcome["refused"]["cliff_mean"] == pytest.approx(
        metrics[metrics["outcome"] == "refused"]["cliff"].mean())
    assert summary["layer"] == probe_summary["tasks"]["refusal"]["best_layer"]

    # The final score in the trajectories equals the saved probe applied to cached activations.
    probe = LinearProbe.load(run_dir / "probe" / "refusal" / f"layer_{summary['layer']:02d}")
    trajectories = Trajectories.load(cliff_dir / "scores")
    traces = read_traces(traces_path)
    # Load the folder as the command did: the saved tokenizer reloads as another class.
    lm = load_model(str(tiny_folder), family="scaffold", dtype="float32", device="cpu")
    last = last_position_activations(lm, traces, [summary["layer"]], progress=False)[:, 0]
    finals = np.array([v[-1] for v in trajectories.values(summary["layer"], "logit")])
    np.testing.assert_allclose(finals, probe.score_logit(last), rtol=1e-4, atol=1e-4)

    # A second run resumes from the saved parts instead of scoring again.
    def no_scoring(*args, **kwargs):
        raise AssertionError("scores should come from the saved parts")

    monkeypatch.setattr("cliffkit.cliff.score_traces", no_scoring)
    assert main(cli_args("cliff", traces_path, run_dir, tiny_folder, "--n-boot", "20", "--layer", "0")) == 0
    assert json.loads((cliff_dir / "summary.json").read_text())["layer"] == 0


def test_probe_command_needs_judged_traces(tmp_path, tiny_folder, scaffold, caplog):
    traces = labelled_traces(scaffold, per_outcome=2, model_id=str(tiny_folder))
    traces[1].labels = {}
    traces_path = tmp_path / "traces.jsonl"
    write_traces_atomic(traces_path, traces)
    with caplog.at_level(logging.ERROR):
        assert main(cli_args("probe", traces_path, tmp_path / "run", tiny_folder)) == 2
    assert "cliffkit judge" in caplog.text


def test_probe_command_rejects_other_model(tmp_path, tiny_folder, scaffold, caplog):
    traces_path = tmp_path / "traces.jsonl"
    write_traces_atomic(traces_path, labelled_traces(scaffold, per_outcome=2, model_id="someone/else"))
    with caplog.at_level(logging.ERROR):
        assert main(cli_args("probe", traces_path, tmp_path / "run", tiny_folder)) == 2
    assert "'someone/else'" in caplog.text and "--model" in caplog.text


def test_probe_command_too_few_examples(tmp_path, tiny_folder, scaffold, caplog):
    traces_path = tmp_path / "traces.jsonl"
    write_traces_atomic(traces_path, labelled_traces(scaffold, per_outcome=3, model_id=str(tiny_folder)))
    with caplog.at_level(logging.ERROR):
        assert main(cli_args("probe", traces_path, tmp_path / "run", tiny_folder, "--layers", "1")) == 2
    assert "got 3 'harmful-refused' and 3 'harmful-complied'" in caplog.text


def test_probe_command_bad_layers(tmp_path, tiny_folder, scaffold, caplog):
    traces_path = tmp_path / "traces.jsonl"
    write_traces_atomic(traces_path, labelled_traces(scaffold, per_outcome=1, model_id=str(tiny_folder)))
    with caplog.at_level(logging.ERROR):
        assert main(cli_args("probe", traces_path, tmp_path / "run", tiny_folder, "--layers", "1,x")) == 2
    assert "--layers must be 'all'" in caplog.text
