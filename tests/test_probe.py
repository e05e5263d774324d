"""Probes: planted directions, raw-space direction and intercept, splits, tasks, save/load, transfer."""

import numpy as np
import pandas as pd
import pytest
import torch

from cliffkit.probe import (
    DEFAULT_CS,
    LinearProbe,
    UnjudgedTracesError,
    best_layer,
    binary_metrics,
    check_class_counts,
    fit_probe,
    get_task,
    mean_difference_directions,
    split_by_prompt,
    sweep_layers,
    task_labels,
    transfer_by_distance,
    transfer_by_segment,
)
from cliffkit.traces import Trace


def planted_data(n=240, d=24, seed=0, strength=1.5):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    y = rng.integers(0, 2, size=n)
    # A large common offset makes the scaler's mean matter for the intercept.
    X = rng.normal(size=(n, d)) + 5.0 + strength * np.outer(2 * y - 1, direction)
    groups = np.array([f"prompt{i}" for i in range(n)], dtype=object)
    return X, y, groups, direction


def make_trace(prompt_id, harmful, refused="unset"):
    labels = {} if refused == "unset" else {"refused": refused}
    return Trace(prompt_id=prompt_id, model_id="m", prompt="p", rendered="r", thinking="t", answer="a",
                 closed_by="model", finished=True, thinking_tokens=1, answer_tokens=1, harmful=harmful,
                 labels=labels)


def test_probe_recovers_planted_direction():
    X, y, groups, planted = planted_data(n=1000)
    probe = fit_probe(X, y, groups, layer=3, model_id="m", task="refusal")
    direction = probe.direction(torch.float64).numpy()
    cosine = direction @ planted / np.linalg.norm(direction)
    assert cosine > 0.9
    assert probe.metrics["test"]["auroc"] > 0.9
    assert probe.metrics["test"]["n"] > 0


def test_direction_intercept_reproduce_sklearn():
    X, y, groups, _ = planted_data(seed=1)
    probe = fit_probe(X, y, groups)
    expected = probe.pipeline.decision_function(X)
    np.testing.assert_allclose(probe.score_logit(X), expected, rtol=1e-9, atol=1e-9)

    manual = X @ probe.direction(torch.float64).numpy() + probe.intercept()
    np.testing.assert_allclose(manual, expected, rtol=1e-9, atol=1e-9)

    as_torch = probe.score_logit(torch.tensor(X, dtype=torch.float32))
    np.testing.assert_allclose(as_torch.numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(probe.score(X), probe.pipeline.predict_proba(X)[:, 1], rtol=1e-9)


def test_probe_save_load_round_trip(tmp_path):
    X, y, groups, _ = planted_data(seed=2)
    probe = fit_probe(X, y, groups, layer=7, model_id="org/model", task="paper")
    path = probe.save(tmp_path / "probes" / "layer_07")
    loaded = LinearProbe.load(path)

    assert (loaded.layer, loaded.model_id, loaded.task, loaded.C) == (7, "org/model", "paper", probe.C)
    assert loaded.class_weight == "balanced"
    assert loaded.positive == "harmful-refused" and loaded.negative == "benign-complied"
    torch.testing.assert_close(loaded.direction(torch.float64), probe.direction(torch.float64))
    assert loaded.intercept() == pytest.approx(probe.intercept(), abs=1e-12)
    assert loaded.metrics["test"]["auroc"] == pytest.approx(probe.metrics["test"]["auroc"])
    np.testing.assert_allclose(loaded.score_logit(X), probe.score_logit(X), rtol=1e-12)


def test_probe_load_rejects_pickle(tmp_path):
    X, y, groups, _ = planted_data(seed=3)
    path = fit_probe(X, y, groups).save(tmp_path / "probe")
    np.savez(path, weight=np.array([{"evil": 1}], dtype=object), bias=np.array(0.0),
             mean=np.zeros(1), scale=np.ones(1))
    with pytest.raises(ValueError, match="pickled objects"):
        LinearProbe.load(path)


def test_probe_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="probe file"):
        LinearProbe.load(tmp_path / "absent")


def test_split_keeps_prompts_whole():
    groups = np.array([f"p{i // 3}" for i in range(90)], dtype=object)  # three traces per prompt
    y = np.array([(i // 3) % 2 for i in range(90)])
    split = split_by_prompt(groups, y, seed=5)
    parts = {name: set(groups[getattr(split, name)]) for name in ("train", "val", "test")}

    assert not parts["train"] & parts["val"]
    assert not parts["train"] & parts["test"]
    assert not parts["val"] & parts["test"]
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(90))
    for name in ("train", "val", "test"):
        assert set(y[getattr(split, name)]) == {0, 1}, f"{name} lacks a class"
    assert len(split.test) == 18  # 20% of 15 prompts per class = 3 prompts x 3 traces x 2 classes


def test_split_is_seeded():
    groups = np.array([f"p{i}" for i in range(40)], dtype=object)
    y = np.arange(40) % 2
    first, second = split_by_prompt(groups, y, seed=1), split_by_prompt(groups, y, seed=1)
    assert first.test.tolist() == second.test.tolist()
    assert split_by_prompt(groups, y, seed=2).test.tolist() != first.test.tolist()


def test_split_too_small_class():
    groups = np.array(["a", "b", "c", "d", "e", "f", "g"], dtype=object)
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="class 1 has 3 prompts"):
        split_by_prompt(groups, y)


def test_task_labels_controls():
    traces = [make_trace("hr", True, True), make_trace("hc", True, False), make_trace("hn", True, None),
              make_trace("br", False, True), make_trace("bc", False, False)]

    refusal = task_labels(traces, "refusal")
    assert refusal.indices.tolist() == [0, 1] and refusal.y.tolist() == [1, 0]
    assert refusal.excluded == {"no_answer": 1, "other_class": 2}

    harmfulness = task_labels(traces, "harmfulness")
    assert harmfulness.indices.tolist() == [0, 1, 2, 3, 4] and harmfulness.y.tolist() == [1, 1, 1, 0, 0]

    paper = task_labels(traces, "paper")
    assert paper.indices.tolist() == [0, 4] and paper.y.tolist() == [1, 0]
    assert "harmfulness alone" in get_task("paper").caveat
    assert paper.groups.tolist() == ["hr", "bc"]


def test_task_labels_need_judge():
    traces = [make_trace("a", True, True), make_trace("b", True)]
    with pytest.raises(UnjudgedTracesError, match="cliffkit judge"):
        task_labels(traces, "refusal")
    assert task_labels(traces, "harmfulness").y.tolist() == [1, 1], "harmfulness needs no judge"


def test_class_count_error_names_counts():
    with pytest.raises(ValueError, match="got 10 'harmful-refused' and 3 'harmful-complied'"):
        check_class_counts(np.array([1] * 10 + [0] * 3), get_task("refusal"))
    check_class_counts(np.array([1] * 8 + [0] * 8), get_task("refusal"))


def test_unknown_task():
    with pytest.raises(ValueError, match="Known tasks: refusal, harmfulness, paper"):
        get_task("vibes")


def test_sweep_finds_planted_layer():
    X1, y, groups, _ = planted_data(seed=4)
    rng = np.random.default_rng(9)
    X0 = rng.normal(size=X1.shape)  # layer 0 carries no signal
    X = np.stack([X0, X1], axis=1)
    sweep, probes = sweep_layers(X, y, groups, [0, 5], model_id="m")
    assert set(probes) == {0, 5}
    assert best_layer(sweep) == 5
    signal = sweep.set_index("layer")
    assert signal.loc[5, "test_auroc"] > 0.9
    assert abs(signal.loc[0, "test_auroc"] - 0.5) < 0.25
    with pytest.raises(ValueError, match="n_layers=3"):
        sweep_layers(X, y, groups, [0, 1, 2])


def test_mean_difference_hand_computed():
    X = np.array([[[1.0, 2.0]], [[3.0, 4.0]], [[10.0, 10.0]]])  # (n=3, n_layers=1, d=2)
    y = np.array([1, 1, 0])
    directions = mean_difference_directions(X, y)
    assert directions.dtype == np.float64
    np.testing.assert_array_equal(directions, [[2.0 - 10.0, 3.0 - 10.0]])
    with pytest.raises(ValueError, match="class 0"):
        mean_difference_directions(X, np.array([1, 1, 1]))


def test_binary_metrics_one_class():
    metrics = binary_metrics(np.array([1, 1]), np.array([0.5, -0.5]))
    assert metrics["accuracy"] == 0.5
    assert np.isnan(metrics["auroc"])
    assert np.isnan(metrics["balanced_accuracy"])


def test_binary_metrics_imbalanced():
    y = np.array([1, 0, 0, 0])
    metrics = binary_metrics(y, np.array([-1.0, -2.0, -3.0, -4.0]))  # predicts 0 everywhere
    assert metrics["accuracy"] == 0.75
    assert metrics["balanced_accuracy"] == 0.5
    assert metrics["auroc"] == 1.0


def test_transfer_by_distance_hand_computed():
    logits = [np.array([-1.0, 2.0, 3.0]), np.array([5.0, -4.0]), np.array([-2.0, -3.0, 1.0])]
    y = np.array([1, 0, 1])
    table = transfer_by_distance(logits, y, max_distance=5).set_index("distance")
    # distance 0: logits 3, -4, 1 -> all correct; distance 1: 2, 5, -3 -> trace 1 and 2 wrong.
    assert table.loc[0, "accuracy"] == 1.0 and table.loc[0, "auroc"] == 1.0
    assert table.loc[1, "accuracy"] == pytest.approx(1 / 3)
    # distance 2 has only the two positive traces: no AUROC, and the short trace is not filled.
    assert table.loc[2, "n"] == 2 and np.isnan(table.loc[2, "auroc"])
    assert table.loc[2, "accuracy"] == 0.0
    assert list(table.index) == [0, 1, 2]


def test_transfer_by_segment_hand_computed():
    logits = [np.array([1.0, 3.0, -1.0]), np.array([-2.0, -4.0, 1.0])]
    segments = [np.array([0, 1, 2]), np.array([0, 1, 1])]
    table = transfer_by_segment(logits, segments, np.array([1, 0])).set_index("segment")
    assert table.loc["thinking", "accuracy"] == 1.0  # means 3.0 and -1.5
    assert table.loc["close", "n"] == 1
    assert "answer" not in table.index


def test_best_layer_ties_use_log_loss():
    sweep = pd.DataFrame({"layer": [0, 1, 2], "val_auroc": [1.0, 1.0, 0.9], "val_log_loss": [0.6, 0.2, 0.1]})
    assert best_layer(sweep) == 1


def test_c_choice_on_separable_data():
    X, y, groups, _ = planted_data(seed=6, strength=4.0)
    probe = fit_probe(X, y, groups)
    # AUROC would tie at 1.0 for every C and keep the smallest; log loss prefers confident probabilities.
    assert probe.C > min(DEFAULT_CS)
    assert probe.metrics["test"]["log_loss"] < 0.2
