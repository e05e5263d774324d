"""Ablation sweep: top suppression heads against random heads of the same count, and no ablation.

Each setting generates fresh traces inside the ablation context, judges them, and
reads the final probe score. A setting's traces and its summary row are written
as soon as it finishes, so an interrupted sweep resumes with the next setting
(and `generate_traces` resumes a half-generated one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import pandas as pd
import torch

from cliffkit.generate import GenerationSettings, generate_traces
from cliffkit.heads.ablation import Positions, ablate_heads
from cliffkit.heads.inputs import trace_token_ids
from cliffkit.heads.scores import probe_scores
from cliffkit.judge import KeywordJudge, judge_traces, refusal_report
from cliffkit.judge.base import Judge
from cliffkit.models import LoadedModel
from cliffkit.traces import Trace, read_traces, write_traces_atomic

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class SweepSetting:
    """One ablation setting: no heads, the top-k suppression heads, or k random heads drawn with `seed`."""

    name: str
    kind: Literal["none", "top", "random"]
    fraction: float
    seed: int | None
    heads: tuple[tuple[int, int], ...]


def heads_for_fraction(fraction: float, n_total: int) -> int:
    """Return the head count for a fraction of all `n_total` heads, at least 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    return max(1, round(fraction * n_total))


def sweep_settings(ranking: Sequence[tuple[int, int]], n_total: int, fractions: Sequence[float],
                   seeds: Sequence[int], pool: Sequence[tuple[int, int]] | None = None) -> list[SweepSetting]:
    """Build the settings: no ablation, then per fraction the top-k heads of `ranking` and k random heads per seed.

    k is a fraction of all `n_total` heads of the model. Random heads are drawn
    without replacement from `pool` (default: the heads in `ranking`), so they
    come from the same layers as the ranked ones.
    """
    pool = list(pool if pool is not None else ranking)
    settings = [SweepSetting("none", "none", 0.0, None, ())]
    for fraction in fractions:
        k = heads_for_fraction(fraction, n_total)
        if k > len(ranking) or k > len(pool):
            raise ValueError(f"fraction {fraction} asks for {k} heads, but only {min(len(ranking), len(pool))} "
                             "are ranked; lower the fraction or scan more heads.")
        settings.append(SweepSetting(f"top-{k}", "top", fraction, None, tuple(sorted(ranking[:k]))))
        for seed in seeds:
            drawn = random.Random(seed).sample(pool, k)
            settings.append(SweepSetting(f"random-{k}-seed{seed}", "random", fraction, seed, tuple(sorted(drawn))))
    return settings


@dataclass(frozen=True)
class SweepProbe:
    """The probe read during the sweep: direction (d_model,), intercept and layer."""

    direction: torch.Tensor
    intercept: float
    layer: int


def run_sweep(lm: LoadedModel, settings: Sequence[SweepSetting], prompts: Sequence[Any], probe: SweepProbe,
              generation: GenerationSettings, out_dir: str | Path, reference: Sequence[torch.Tensor] = (),
              judge: Judge | None = None, positions: Positions = None, progress: bool = True) -> pd.DataFrame:
    """Evaluate every setting and return one row per setting (also in `out_dir`/results.jsonl).

    Args:
        prompts: held-out prompts with `id`, `text`, `source`, `harmful` (such as
            `cliffkit.datasets.Prompt`), harmful and benign mixed.
        reference: token ids of fixed traces. Their final probe score is read
            under every setting (`score_fixed`). The tokens stay the same, so
            differences between settings come from the ablation alone.
        positions: where heads are ablated (None: every position).

    Each row contains the probe scores, the refusal rate and ASR on harmful
    prompts, and the complied rate of each benign source.
    """
    out_dir = Path(out_dir)
    (out_dir / "traces").mkdir(parents=True, exist_ok=True)
    _check_sweep_config(out_dir, {
        "generation": asdict(generation), "positions": positions, "layer": probe.layer,
        "intercept": probe.intercept, "direction_sha256": _sha256(probe.direction.float().cpu().numpy().tobytes()),
        "prompt_ids": [prompt.id for prompt in prompts], "reference_sha256": _sha256(
            json.dumps([sequence.tolist() for sequence in reference]).encode()),
    })
    done = _finished_settings(out_dir / RESULTS_FILE)

    for setting in settings:
        if setting.name in done:
            logger.info("Setting %s already evaluated; skipping", setting.name)
            continue
        logger.info("Evaluating setting %s (%d heads)", setting.name, len(setting.heads))
        context = (ablate_heads(lm, setting.heads, positions=positions) if setting.heads
                   else contextlib.nullcontext())
        with context:
            row = _evaluate_setting(lm, setting, prompts, probe, generation, out_dir, reference, judge, progress)
        _append_row(out_dir / RESULTS_FILE, row)

    return load_sweep(out_dir)


def _evaluate_setting(lm: LoadedModel, setting: SweepSetting, prompts: Sequence[Any], probe: SweepProbe,
                      generation: GenerationSettings, out_dir: Path, reference: Sequence[torch.Tensor],
                      judge: Judge | None, progress: bool) -> dict[str, Any]:
    trace_path = out_dir / "traces" / f"{setting.name}.jsonl"
    generate_traces(lm, prompts, generation, out=trace_path, progress=progress)
    wanted = {prompt.id for prompt in prompts}
    traces = [trace for trace in read_traces(trace_path) if trace.prompt_id in wanted]
    judged = judge_traces(traces, judge)
    write_traces_atomic(trace_path, judged)

    harmful = [trace for trace in judged if trace.harmful]
    fresh = _mean_score(lm, trace_token_ids(lm, harmful), probe, progress) if harmful else float("nan")
    fixed = _mean_score(lm, list(reference), probe, progress) if reference else float("nan")
    return {**asdict(setting), "heads": [list(pair) for pair in setting.heads], "k": len(setting.heads),
            "score_fixed": fixed, "score_fresh": fresh, **_rates(judged),
            "thinking_refusal_rate": _thinking_refusal_rate(harmful, judge)}


def _mean_score(lm: LoadedModel, sequences: list[torch.Tensor], probe: SweepProbe, progress: bool) -> float:
    scores = probe_scores(lm, sequences, probe.direction, probe.layer, probe.intercept, progress=progress)
    return float(scores.mean())


def _rates(traces: Sequence[Trace]) -> dict[str, float | int]:
    report = refusal_report(traces, by=("source",))
    rates: dict[str, float | int] = {}
    harmful = report[(report["harmful"]) & (report["source"] == "all")]
    if len(harmful):
        row = harmful.iloc[0]
        rates.update(n_harmful=int(row["n"]), refusal_rate=float(row["refusal_rate"]), asr=float(row["asr"]),
                     asr_ci_low=float(row["asr_ci_low"]), asr_ci_high=float(row["asr_ci_high"]),
                     no_answer_harmful=int(row["no_answer"]))
    for _, row in report[(~report["harmful"]) & (report["source"] != "all")].iterrows():
        rates[f"complied_{row['source']}"] = float(row["complied_rate"])
        rates[f"n_{row['source']}"] = int(row["n"])
    return rates


def _thinking_refusal_rate(harmful: Sequence[Trace], judge: Judge | None) -> float:
    """Return the share of harmful traces whose thinking reads as a refusal to the judge.

    A prompted model may refuse inside the think block and write something else
    after a forced close; the answer-based refusal rate misses that.
    """
    judge = judge if judge is not None else KeywordJudge()
    verdicts = judge.judge([trace.prompt for trace in harmful], [trace.thinking for trace in harmful])
    labelled = [verdict.refused for verdict in verdicts if verdict.refused is not None]
    return sum(labelled) / len(labelled) if labelled else float("nan")


CONFIG_FILE = "sweep.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_sweep_config(out_dir: Path, config: dict[str, Any]) -> None:
    """Record the sweep's inputs on the first run; on a resume, raise ValueError if they changed.

    Resuming skips the prompts and settings already written, so a changed budget,
    probe or prompt list would silently mix two sweeps in one folder.
    """
    path = out_dir / CONFIG_FILE
    config = json.loads(json.dumps(config))  # tuples become lists, as they read back from disk
    if not path.exists():
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(key for key in set(config) | set(previous) if config.get(key) != previous.get(key))
    if changed:
        raise ValueError(f"{out_dir} contains a sweep with other inputs (changed: {', '.join(changed)}). "
                         "Use another output folder, or delete this one to start over.")


def _finished_settings(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {row["name"] for row in _read_rows(path)}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A torn last line comes from an interrupted write; that setting reruns.
            logger.warning("%s, line %d: ignoring an unreadable row (interrupted write?)", path, number)
    return rows


def _append_row(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, allow_nan=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def load_sweep(out_dir: str | Path) -> pd.DataFrame:
    """Read the rows of a sweep folder as a DataFrame, one row per setting (the last one written wins)."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"No sweep results at {path}. Run `cliffkit ablate` first.")
    rows = {row["name"]: row for row in _read_rows(path)}
    return pd.DataFrame(list(rows.values()))


def summarize_sweep(results: pd.DataFrame) -> pd.DataFrame:
    """Return one row per (fraction, kind): top heads, and the mean, min and max over random seeds."""
    metrics = [column for column in ("score_fixed", "score_fresh", "refusal_rate", "asr", "thinking_refusal_rate")
               if column in results]
    metrics += [column for column in results.columns if column.startswith("complied_")]
    grouped = results.groupby(["kind", "fraction", "k"], dropna=False)[metrics]
    summary = grouped.mean().add_suffix("_mean")
    spread = pd.concat([grouped.min().add_suffix("_min"), grouped.max().add_suffix("_max")], axis=1)
    counts = grouped.size().rename("settings")
    return pd.concat([summary, spread, counts], axis=1).reset_index().sort_values(["fraction", "kind"])
