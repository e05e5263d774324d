"""The head table and the sweep settings: sign alignment, rankings, correlations and head counts."""

import pandas as pd
import pytest

from cliffkit.heads.evaluate import heads_for_fraction, sweep_settings
from cliffkit.heads.table import merge_head_frames, rank_correlations, rank_heads, suppression_score, top_heads


def _table():
    return pd.DataFrame({
        "layer": [0, 0, 1, 1],
        "head": [0, 1, 0, 1],
        "attribution": [-3.0, 1.0, -1.0, 0.5],  # negative = writes against refusal
        "exact_all": [2.0, -0.5, 1.0, 0.1],  # positive = ablation raises the refusal score
    })


def test_suppression_score_negates_attribution_only():
    table = _table()
    assert suppression_score(table, "attribution").tolist() == [3.0, -1.0, 1.0, -0.5]
    assert suppression_score(table, "exact_all").tolist() == [2.0, -0.5, 1.0, 0.1]


def test_top_heads_and_ranking_agree():
    table = _table()
    assert top_heads(table, "attribution", 2) == [(0, 0), (1, 0)]
    assert top_heads(table, "exact_all", 3) == [(0, 0), (1, 0), (1, 1)]
    ranked = rank_heads(table, "attribution")
    assert ranked[["layer", "head"]].values.tolist()[0] == [0, 0]
    assert ranked["rank_attribution"].tolist() == [1, 2, 3, 4]
    assert ranked.loc[0, "rank_exact_all"] == 1


def test_rank_correlations_are_sign_aligned():
    table = _table()
    correlations = rank_correlations(table)
    # The rankings by suppression score are identical, so Spearman's rho is exactly 1.
    assert correlations.loc["attribution", "exact_all"] == pytest.approx(1.0)
    table["reversed"] = -table["exact_all"]
    assert rank_correlations(table).loc["exact_all", "reversed"] == pytest.approx(-1.0)


def test_merge_joins_on_layer_and_head():
    left = _table()[["layer", "head", "attribution"]]
    right = _table()[["layer", "head", "exact_all"]].iloc[::-1]
    merged = merge_head_frames([left, right])
    assert merged.equals(_table())


def test_rank_heads_rejects_unknown_column():
    with pytest.raises(ValueError, match="'missing'"):
        rank_heads(_table(), "missing")


def test_heads_for_fraction_counts_all_heads():
    assert heads_for_fraction(0.03, 336) == 10
    assert heads_for_fraction(0.005, 336) == 2
    assert heads_for_fraction(0.001, 336) == 1
    with pytest.raises(ValueError, match="fraction"):
        heads_for_fraction(0.0, 336)


def test_sweep_settings_top_and_random():
    ranking = [(layer, head) for layer in range(4) for head in range(5)][::-1]
    settings = sweep_settings(ranking, n_total=20, fractions=[0.1, 0.25], seeds=[0, 1])
    assert [setting.name for setting in settings] == [
        "none", "top-2", "random-2-seed0", "random-2-seed1", "top-5", "random-5-seed0", "random-5-seed1"]
    assert settings[0].heads == ()
    assert settings[1].heads == tuple(sorted(ranking[:2]))
    assert len(set(settings[5].heads)) == 5
    assert set(settings[5].heads) <= set(ranking)
    again = sweep_settings(ranking, n_total=20, fractions=[0.1, 0.25], seeds=[0, 1])
    assert again == settings  # seeded, so a resumed sweep draws the same random heads
    assert settings[2].heads != settings[3].heads


def test_sweep_settings_reject_too_many_heads():
    with pytest.raises(ValueError, match="only 3"):
        sweep_settings([(0, 0), (0, 1), (0, 2)], n_total=100, fractions=[0.05], seeds=[0])
