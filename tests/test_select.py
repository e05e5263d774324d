"""Tests of Cliff-as-a-Judge selection: ranking, counts, baselines, written files and scores on a tiny model."""

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from cliffkit.generate import GenerationSettings
from cliffkit.pool import PoolExample, PoolOverlapError, read_pool
from cliffkit.probe import LinearProbe
from cliffkit.render import render_prompt
from cliffkit.select import (natural_traces, rank_pool, resolve_count, score_pool, select_full, select_random,
                             select_rule, select_top, write_selection)
from cliffkit.testing import tiny_model
from cliffkit.traces import Trace


def _scores() -> pd.DataFrame:
    # Hand-made: "b" and "a" tie on final (0.10) and on cliff (0.50); "e" has no thinking (NaN).
    rows = [
        ("c", 0.30, 0.90, False),
        ("b", 0.10, 0.60, False),
        ("a", 0.10, 0.60, True),
        ("d", 0.05, 0.20, None),
        ("e", math.nan, math.nan, True),
        ("f", 0.80, 0.85, False),
    ]
    frame = pd.DataFrame([{"id": i, "final": final, "plateau": plateau, "refused": refused}
                          for i, final, plateau, refused in rows])
    frame["cliff"] = frame["plateau"] - frame["final"]
    return frame


def test_rank_by_final_lowest_first_ties_by_id():
    ranked = rank_pool(_scores(), by="final")
    assert list(ranked["id"]) == ["d", "a", "b", "c", "f", "e"]
    assert list(ranked["rank"]) == [1, 2, 3, 4, 5, 6]


def test_rank_by_cliff_largest_first_nan_last():
    # cliffs: c 0.60, a 0.50, b 0.50, d 0.15, f 0.05, e NaN
    ranked = rank_pool(_scores(), by="cliff")
    assert list(ranked["id"]) == ["c", "a", "b", "d", "f", "e"]


def test_rank_ignores_input_order():
    shuffled = _scores().sample(frac=1.0, random_state=3)
    assert list(rank_pool(shuffled, "final")["id"]) == list(rank_pool(_scores(), "final")["id"])


def test_select_top_k_exact_ids():
    assert list(select_top(_scores(), k=3, by="final")["id"]) == ["d", "a", "b"]
    assert list(select_top(_scores(), k=2, by="cliff")["id"]) == ["c", "a"]


def test_select_top_percent_rounds_up():
    # 6 examples: 50% -> 3, 10% -> ceil(0.6) = 1, 100% -> 6.
    assert len(select_top(_scores(), percent=50)) == 3
    assert list(select_top(_scores(), percent=10)["id"]) == ["d"]
    assert len(select_top(_scores(), percent=100)) == 6


def test_resolve_count_errors():
    with pytest.raises(ValueError, match=r"k=7 is larger than the pool \(6 examples\)"):
        resolve_count(6, k=7)
    for percent in (0, -1, 100.5):
        with pytest.raises(ValueError, match=r"percent must be in \(0, 100\]"):
            resolve_count(6, percent=percent)
    with pytest.raises(ValueError, match="exactly one of k and percent"):
        resolve_count(6, k=2, percent=10)
    with pytest.raises(ValueError, match="exactly one of k and percent"):
        resolve_count(6)
    with pytest.raises(ValueError, match="positive integer"):
        resolve_count(6, k=0)
    with pytest.raises(ValueError, match="unknown|by must be"):
        rank_pool(_scores(), by="plateau")


def test_select_random_deterministic_and_order_free():
    frame = pd.DataFrame({"id": [f"p{i:02d}" for i in range(20)], "final": np.linspace(0, 1, 20)})
    first = select_random(frame, k=5, seed=0)
    again = select_random(frame.iloc[::-1].reset_index(drop=True), k=5, seed=0)
    other = select_random(frame, k=5, seed=1)
    assert list(first["id"]) == list(again["id"])
    assert len(set(first["id"])) == 5
    assert set(first["id"]) != set(other["id"])


def test_select_rule_only_non_refusals(caplog):
    rule = select_rule(_scores())
    # Only label False counts: None (an empty answer) is no candidate.
    assert list(rule["id"]) == ["b", "c", "f"]

    two = select_rule(_scores(), k=2, seed=0)
    assert len(two) == 2
    assert set(two["id"]) <= {"b", "c", "f"}

    with caplog.at_level(logging.WARNING, logger="cliffkit.select"):
        short = select_rule(_scores(), k=5)
    assert list(short["id"]) == ["b", "c", "f"]
    assert "fewer than k=5" in caplog.text


def test_select_full_whole_pool():
    assert list(select_full(_scores())["id"]) == ["a", "b", "c", "d", "e", "f"]


def _pool(ids) -> list[PoolExample]:
    return [PoolExample(id=i, prompt=f"Tell me the secret recipe number {i} for mischief", thinking="It is harmful.",
                        answer="I can't help with that.", source="custom", category="test") for i in ids]


def test_write_selection_files(tmp_path):
    pool = _pool("abcdef")
    chosen = select_top(_scores(), k=3, by="final")
    path = write_selection(chosen, pool, tmp_path, "cliff-final-k3", {"method": "cliff (final)", "pool_size": 6})

    back = read_pool(path)
    assert [example.id for example in back] == ["d", "a", "b"]
    assert back[0].meta["selection"]["rank"] == 1
    assert back[1].meta["selection"]["final"] == pytest.approx(0.10)
    assert back[0].thinking == "It is harmful."

    table = pd.read_csv(tmp_path / "cliff-final-k3.csv")
    assert list(table["id"]) == ["d", "a", "b"]
    assert (tmp_path / "cliff-final-k3.json").exists()


def test_write_selection_unknown_id(tmp_path):
    with pytest.raises(ValueError, match="not in the pool"):
        write_selection(select_top(_scores(), k=2), _pool("xyz"), tmp_path, "bad")


_TINY = tiny_model("scaffold")


def _trace(prompt_id: str, thinking: str, refused) -> Trace:
    rendered = render_prompt(_TINY.tokenizer, _TINY.family, f"request {prompt_id}").text
    return Trace(prompt_id=prompt_id, model_id=_TINY.model_id, prompt=f"request {prompt_id}", rendered=rendered,
                 thinking=thinking, answer="an answer", closed_by="model", finished=True, thinking_tokens=5,
                 answer_tokens=2, harmful=True, labels={"refused": refused, "judge": "keyword"})


def test_score_pool_final_matches_last_position():
    from cliffkit.activations import last_position_activations

    generator = torch.Generator().manual_seed(0)
    d_model = _TINY.model.config.hidden_size
    probe = LinearProbe(weight=torch.randn(d_model, generator=generator).numpy().astype(np.float64), bias=0.3,
                        mean=np.zeros(d_model), scale=np.ones(d_model), layer=1, model_id=_TINY.model_id,
                        task="refusal")
    traces = [_trace("x1", "the plan is harmful so I should refuse", True),
              _trace("x2", "sure, let me write it", False),
              _trace("x3", "", None)]
    scores = score_pool(_TINY, traces, probe, exclude_last=2, progress=False)

    # Independent computation: last-position activations at layer 1, then the probe.
    last = last_position_activations(_TINY, traces, [1], progress=False)[:, 0]
    expected = 1.0 / (1.0 + np.exp(-(last.astype(np.float64) @ probe.weight + probe.bias)))
    assert scores["final"].to_numpy() == pytest.approx(expected, abs=1e-5)
    assert list(scores["id"]) == ["x1", "x2", "x3"]
    assert scores["cliff"].to_numpy()[:2] == pytest.approx((scores["plateau"] - scores["final"]).to_numpy()[:2])
    assert math.isnan(scores["cliff"].iloc[2])  # no thinking, no plateau
    assert list(scores["refused"]) == [True, False, None]


def test_natural_traces_guards(tmp_path):
    with pytest.raises(ValueError, match="system"):
        natural_traces(_TINY, _pool("ab"), tmp_path / "n.jsonl", GenerationSettings(system="be safe"))

    from cliffkit.datasets import load_prompts

    test_prompt = load_prompts(["advbench"], splits=["test"], limit=1)[0]
    overlapping = [PoolExample(id="mine/1", prompt=test_prompt.text.upper(), thinking="t", answer="a")]
    with pytest.raises(PoolOverlapError, match="mine/1"):
        natural_traces(_TINY, overlapping, tmp_path / "n.jsonl")


def test_natural_traces_generates_and_judges(tmp_path):
    pool = _pool("ab")
    settings = GenerationSettings(think_budget=4, answer_budget=3, batch_size=2)
    traces = natural_traces(_TINY, pool, tmp_path / "n.jsonl", settings, progress=False)
    assert [trace.prompt_id for trace in traces] == ["a", "b"]
    assert all("refused" in trace.labels for trace in traces)
    assert all(trace.settings["system"] is None for trace in traces)
