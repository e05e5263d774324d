"""Figures return Figure objects with the expected content; the trace viewer redacts answers by default."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from cliffkit.cliff import Trajectories
from cliffkit.plots import (
    plot_cliff_distribution,
    plot_layer_heatmap,
    plot_layer_sweep,
    plot_trajectories,
    plot_transfer,
    save_figure,
)
from cliffkit.render import ANSWER, CLOSE, PROMPT, THINKING, render_prompt, tokenize_trace
from cliffkit.testing import tiny_model
from cliffkit.traces import Trace
from cliffkit.widgets import REDACTED_NOTE, score_color, token_strings, trace_html, trace_viewer


def curves():
    distance = np.arange(5)
    return pd.concat([
        pd.DataFrame({"group": "refused", "distance": distance, "mean": 0.8, "low": 0.7, "high": 0.9, "count": 4}),
        pd.DataFrame({"group": "complied", "distance": distance, "mean": 0.2, "low": 0.1, "high": 0.3, "count": 3}),
    ])


def test_trajectory_plot_lines_and_bands(tmp_path):
    figure = plot_trajectories(curves())
    assert isinstance(figure, Figure)
    ax = figure.axes[0]
    assert len(ax.lines) == 2
    assert len(ax.collections) == 2  # one band per group
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), -np.arange(5))  # the end is on the right
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["refused (n=4)", "complied (n=3)"]
    path = save_figure(figure, tmp_path / "fig" / "trajectory.png")
    assert path.stat().st_size > 1000


def test_trajectory_plot_thinking_axis():
    frame = curves().rename(columns={"distance": "position"})
    frame["position"] = frame["position"] / 4
    ax = plot_trajectories(frame).axes[0]
    assert "thinking" in ax.get_xlabel()
    np.testing.assert_allclose(ax.lines[0].get_xdata(), np.linspace(0, 1, 5))


def test_layer_heatmap_orientation():
    matrix = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])  # column d = d tokens before the end
    figure = plot_layer_heatmap(matrix, [10, 11])
    image = figure.axes[0].images[0]
    # Flipped so that the last position (distance 0) is the rightmost column.
    np.testing.assert_array_equal(image.get_array(), matrix[:, ::-1])
    assert len(figure.axes) == 2  # heatmap and colour bar
    with pytest.raises(ValueError, match="3 layers"):
        plot_layer_heatmap(matrix, [1, 2, 3])


def test_cliff_distribution_counts():
    metrics = pd.DataFrame({"outcome": ["refused", "refused", "complied", "benign"], "cliff": [0.5, 0.3, np.nan, 0.1]})
    figure = plot_cliff_distribution(metrics)
    ticks = [tick.get_text() for tick in figure.axes[0].get_xticklabels()]
    assert ticks == ["benign\n(n=1)", "refused\n(n=2)"]  # the NaN row is left out
    with pytest.raises(ValueError, match="'size'"):
        plot_cliff_distribution(metrics, metric="size")


def test_layer_sweep_and_transfer_plots():
    sweep = pd.DataFrame({"task": ["refusal"] * 3 + ["paper"] * 3, "layer": [0, 1, 2] * 2,
                          "val_accuracy": 0.7, "val_auroc": 0.8, "test_accuracy": 0.6, "test_auroc": 0.75})
    figure = plot_layer_sweep(sweep)
    assert len(figure.axes) == 2
    assert len(figure.axes[0].lines) == 2 * 2 + 1  # two tasks x (val, test), plus the chance line
    transfer = pd.DataFrame({"distance": [0, 1, 2], "accuracy": [1.0, 0.8, 0.5], "auroc": [1.0, 0.9, 0.6]})
    assert len(plot_transfer(transfer).axes[0].lines) == 3


# ---------------------------------------------------------------- widget HTML

TOKENS = ["<|im_start|>", "user", "Think", " hard", "</think>", "Step", " one:", " <script>"]
SEGMENTS = [PROMPT, PROMPT, THINKING, THINKING, CLOSE, ANSWER, ANSWER, ANSWER]
SCORES = [0.5, 0.5, 0.9, 0.8, 0.1, 0.1, 0.1, float("nan")]


def test_trace_html_redacts_answer_by_default():
    page = trace_html(TOKENS, SCORES, SEGMENTS)
    assert "Step" not in page and " one:" not in page
    assert REDACTED_NOTE.format(count=3) in page
    assert "Warning" not in page
    assert "Think" in page and "&lt;/think&gt;" in page


def test_trace_html_shows_answer_with_warning():
    page = trace_html(TOKENS, SCORES, SEGMENTS, show_answer=True)
    assert "Step" in page and "Warning" in page
    assert "<script>" not in page and "&lt;script&gt;" in page  # token text is escaped
    assert page.index("Warning") < page.index("Step")


def test_trace_html_unscored_answer_text():
    hidden = trace_html(TOKENS[:5], SCORES[:5], SEGMENTS[:5], answer_text="Mix the chemicals")
    assert "Mix the chemicals" not in hidden and "3 words" in hidden
    shown = trace_html(TOKENS[:5], SCORES[:5], SEGMENTS[:5], answer_text="Mix the chemicals", show_answer=True)
    assert "Mix the chemicals" in shown and "Warning" in shown


def test_trace_html_marks_segments():
    page = trace_html(TOKENS, SCORES, SEGMENTS, show_answer=True)
    assert page.count('class="ck-segment"') == 4
    assert page.index(">thinking<") < page.index("Think") < page.index(">close<")


def test_trace_html_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        trace_html(TOKENS, SCORES[:3], SEGMENTS)


def test_score_colors():
    assert score_color(0.0) != score_color(1.0)
    assert score_color(float("nan")) == "#dddddd"
    assert score_color(2.0) == score_color(1.0)


def test_trace_viewer_redacts_and_toggles():
    lm = tiny_model("scaffold")
    rendered = render_prompt(lm.tokenizer, lm.family, "How do I kill a Python process?").text
    trace = Trace(prompt_id="p0", model_id=lm.model_id, prompt="q", rendered=rendered, thinking="Let me think.",
                  answer="Use the kill command.", closed_by="model", finished=True, thinking_tokens=0,
                  answer_tokens=0, harmful=True, labels={"refused": False}, source="harmbench")
    tokens = tokenize_trace(lm.tokenizer, lm.family, rendered, trace.thinking, trace.answer)
    length = len(tokens.input_ids)
    trajectories = Trajectories((0,), [np.linspace(-2, 2, length)[None]], [tokens.segments.numpy()],
                                pd.DataFrame({"prompt_id": ["p0"], "outcome": ["complied"]}))
    assert "".join(token_strings(lm.tokenizer, tokens.input_ids.tolist())).startswith(rendered[:20])

    viewer = trace_viewer(lm, [trace], trajectories, layer=0)
    controls, output = viewer.children
    toggle = controls.children[1]
    assert "Use the kill command" not in output.value and "redacted" in output.value
    toggle.value = True
    assert "Use the kill command" in output.value and "Warning" in output.value
