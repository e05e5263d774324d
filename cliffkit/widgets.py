"""A notebook viewer that colours each token of a trace by its refusal score.

`trace_html` builds the HTML and runs without a browser, and `trace_viewer` wraps it in
ipywidgets with a trace dropdown. The answer of a trace is redacted unless the
reader switches it on, because answers to harmful prompts can contain harmful text.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex

from cliffkit.models import LoadedModel
from cliffkit.render import ANSWER, SEGMENT_NAMES, tokenize_trace
from cliffkit.traces import Trace

REDACTED_NOTE = "answer redacted ({count} tokens): tick 'show answer' to display it"
ANSWER_WARNING = ("Warning: the answer below is shown as the model wrote it and may contain harmful "
                  "instructions.")
_COLORMAP = colormaps["coolwarm"]


def score_color(score: float) -> str:
    """Return the background colour of a score in [0, 1]: blue for 0, white near 0.5, red for 1, grey for NaN."""
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return "#dddddd"
    return to_hex(_COLORMAP(float(np.clip(score, 0.0, 1.0))))


def token_strings(tokenizer, input_ids: Sequence[int]) -> list[str]:
    """Decode each token id on its own, so that every position gets its own text."""
    return [tokenizer.decode([int(token)], skip_special_tokens=False) for token in input_ids]


def _token_span(text: str, score: float, position: int) -> str:
    shown = html.escape(text).replace("\n", "↵<br>")
    tip = f"position {position}, score {score:.3f}" if not math.isnan(score) else f"position {position}, no score"
    return (f'<span title="{tip}" style="background:{score_color(score)};padding:0 1px;'
            f'white-space:pre-wrap">{shown}</span>')


def _segment_marker(segment: int) -> str:
    name = SEGMENT_NAMES.get(int(segment), str(segment))
    return (f'<span class="ck-segment" style="border-left:3px solid #333;margin:0 3px;padding-left:3px;'
            f'font-size:75%;color:#333;font-weight:bold">{name}</span>')


def trace_html(tokens: Sequence[str], scores: Sequence[float], segments: Sequence[int], *,
               show_answer: bool = False, answer_text: str | None = None, title: str | None = None) -> str:
    """Return HTML spans of the tokens coloured by score, with a marker at each segment start.

    Tokens of the ANSWER segment, and `answer_text` (an answer that was not scored, e.g.
    for traces tokenized until the closing marker), are replaced by a redaction note
    unless `show_answer` is True. A shown answer is preceded by a warning.

    Args:
        tokens: per position, the decoded token text.
        scores: per position, the refusal score in [0, 1] (NaN for none).
        segments: per position, the segment label (PROMPT..ANSWER).
    """
    if not len(tokens) == len(scores) == len(segments):
        raise ValueError(f"tokens, scores and segments differ in length: {len(tokens)}, {len(scores)}, "
                         f"{len(segments)}.")
    parts = ['<div class="ck-trace" style="font-family:monospace;line-height:1.6">']
    if title:
        parts.append(f"<div style='font-weight:bold;margin-bottom:4px'>{html.escape(title)}</div>")
    parts.append(_legend())

    answer_count = int(sum(int(s) == ANSWER for s in segments))
    has_answer = answer_count > 0 or bool(answer_text)
    if show_answer and has_answer:
        parts.append(f"<div class='ck-warning' style='color:#a00;font-weight:bold'>{ANSWER_WARNING}</div>")

    previous = None
    for position, (text, score, segment) in enumerate(zip(tokens, scores, segments)):
        segment = int(segment)
        if segment != previous:
            parts.append(_segment_marker(segment))
            if segment == ANSWER and not show_answer:
                parts.append(_redaction(answer_count))
        previous = segment
        if segment == ANSWER and not show_answer:
            continue
        parts.append(_token_span(text, float(score), position))

    if answer_text:
        parts.append(_segment_marker(ANSWER) + " (not scored)")
        if show_answer:
            parts.append(f"<span style='white-space:pre-wrap'>{html.escape(answer_text)}</span>")
        else:
            parts.append(_redaction(len(answer_text.split()), unit="words"))
    parts.append("</div>")
    return "".join(parts)


def _redaction(count: int, unit: str = "tokens") -> str:
    note = REDACTED_NOTE.format(count=count).replace("tokens", unit)
    return f"<span class='ck-redacted' style='background:#000;color:#fff;padding:0 4px'>[{note}]</span>"


def _legend() -> str:
    stops = " ".join(f"<span style='background:{score_color(v)};padding:0 6px'>{v:.1f}</span>"
                     for v in (0.0, 0.25, 0.5, 0.75, 1.0))
    return f"<div style='font-size:80%;margin-bottom:4px'>refusal score: {stops}</div>"


def trace_viewer(lm: LoadedModel, traces: Sequence[Trace], trajectories, layer: int, *, until: str = "close"):
    """Build an ipywidgets viewer: a trace dropdown, a 'show answer' toggle and the coloured tokens.

    Args:
        trajectories: `cliffkit.cliff.Trajectories` scored on the same traces, in the same order.
        until: the `tokenize_trace` mode used for scoring. With "close" the answer is shown
            (or redacted) as unscored text after the closing marker.
    """
    import ipywidgets as widgets

    if len(traces) != len(trajectories):
        raise ValueError(f"got {len(traces)} traces but {len(trajectories)} trajectories. Pass the traces that were scored.")
    probabilities = trajectories.values(layer, "probability")
    options = [(f"{trace.prompt_id} · {trajectories.meta.iloc[i]['outcome']} · {trace.source}", i)
               for i, trace in enumerate(traces)]
    dropdown = widgets.Dropdown(options=options, description="trace")
    toggle = widgets.Checkbox(value=False, description="show answer (may contain harmful text)")
    output = widgets.HTML()

    def render(_=None) -> None:
        index = dropdown.value
        trace = traces[index]
        tokens = tokenize_trace(lm.tokenizer, lm.family, trace.rendered, trace.thinking, trace.answer, until=until)
        if len(tokens.input_ids) != len(probabilities[index]):
            raise ValueError(f"trace {trace.prompt_id!r} has {len(tokens.input_ids)} tokens but "
                             f"{len(probabilities[index])} scores. Pass the `until` used for scoring (now {until!r}).")
        output.value = trace_html(token_strings(lm.tokenizer, tokens.input_ids.tolist()), probabilities[index],
                                  tokens.segments.tolist(), show_answer=toggle.value,
                                  answer_text=trace.answer if until == "close" else None,
                                  title=f"{trace.prompt_id} ({trace.source}, layer {layer})")

    dropdown.observe(render, names="value")
    toggle.observe(render, names="value")
    render()
    return widgets.VBox([widgets.HBox([dropdown, toggle]), output])
