"""One evaluation harness for every chapter: ASR, over-refusal, benign refusal and arithmetic accuracy of a model.

`evaluate_model` generates (resumably) on held-out prompts, judges the answers and
returns one results row. With a probe it also reports the final refusal score and the
cliff on the harmful traces. It takes any `LoadedModel`, so it runs unchanged on a
repaired model or inside a head-ablation context.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cliffkit.datasets import is_correct, load_prompts
from cliffkit.generate import GenerationSettings, generate_traces
from cliffkit.judge import Judge, judge_traces, refusal_report
from cliffkit.models import LoadedModel
from cliffkit.probe import LinearProbe
from cliffkit.traces import Trace, read_traces, write_traces_atomic

logger = logging.getLogger(__name__)

GROUPS: tuple[str, ...] = ("harmful", "overrefusal", "benign", "arithmetic")
JUDGED_GROUPS: tuple[str, ...] = ("harmful", "overrefusal", "benign")
# Trace file -> the groups generated together into it. The judged groups share one file and
# one generation run, so they fill large batches (see EvalConfig.batch_size).
TRACE_FILES: dict[str, tuple[str, ...]] = {"refusal": JUDGED_GROUPS, "arithmetic": ("arithmetic",)}
RESULT_COLUMNS = (
    "method", "k", "pool_size", "fraction", "model_id",
    "asr", "asr_ci_low", "asr_ci_high", "asr_n", "harmful_no_answer",
    "overrefusal", "overrefusal_n", "benign_refusal", "benign_n",
    "arithmetic_accuracy", "arithmetic_n",
    "final_mean", "cliff_mean", "cliff_n", "probe_layer",
)


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate on and how to generate: prompt counts per group, budgets and seed.

    Counts are prompts drawn (seeded) from the held-out `split`: `harmful_per_source`
    from each harmful source, and `overrefusal`, `benign` and `arithmetic` prompts. A
    count of 0 skips that group. Budgets count new tokens; arithmetic gets its own,
    because working out a sum needs more thinking than deciding to refuse.

    `batch_size` is large by default because batched decoding on a CPU is bound by
    reading the weights. With the default model on 2 shared cores, a batch of 24 prompts
    took 3.6 CPU seconds per trace, a batch of 8 took 10.6 (48 new tokens each).
    """

    harmful_sources: tuple[str, ...] = ("harmbench", "advbench", "strongreject")
    harmful_per_source: int = 8
    overrefusal: int = 8
    benign: int = 8
    arithmetic: int = 16
    split: str = "test"
    think_budget: int = 128
    answer_budget: int = 64
    arithmetic_think_budget: int = 256
    arithmetic_answer_budget: int = 32
    batch_size: int = 32
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test' (held-out prompts), got {self.split!r}. "
                             "The train split feeds the safety pool.")
        for name in ("harmful_per_source", "overrefusal", "benign", "arithmetic"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a count >= 0, got {value!r}.")
        if self.harmful_per_source and not self.harmful_sources:
            raise ValueError("harmful_per_source > 0 needs at least one harmful source.")
        # Budgets, batch size and temperature are checked by GenerationSettings.
        for group in GROUPS:
            self.settings(group)

    def settings(self, group: str) -> GenerationSettings:
        """Return the generation settings of one group (the family's own system prompt, no safety prompt)."""
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; groups are {GROUPS}.")
        think, answer = self.think_budget, self.answer_budget
        if group == "arithmetic":
            think, answer = self.arithmetic_think_budget, self.arithmetic_answer_budget
        return GenerationSettings(think_budget=think, answer_budget=answer, temperature=self.temperature,
                                  batch_size=self.batch_size, seed=self.seed)

    def prompts(self) -> dict[str, list]:
        """Return the prompts of each group with a non-zero count, drawn with `seed` from `split`."""
        groups: dict[str, list] = {}
        if self.harmful_per_source:
            groups["harmful"] = [prompt for source in self.harmful_sources
                                 for prompt in load_prompts([source], splits=[self.split],
                                                            limit=self.harmful_per_source, seed=self.seed)]
        for group in ("overrefusal", "benign", "arithmetic"):
            count = getattr(self, group)
            if count:
                groups[group] = load_prompts([group], splits=[self.split], limit=count, seed=self.seed)
        if not groups:
            raise ValueError("every prompt count of the EvalConfig is 0; nothing to evaluate.")
        return groups

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["harmful_sources"] = list(self.harmful_sources)
        return data


@dataclass
class EvalResult:
    """The results row of one evaluated model, with the per-group traces and the refusal report behind it."""

    row: dict[str, Any]
    report: pd.DataFrame
    traces: dict[str, list[Trace]] = field(repr=False)
    cliff: pd.DataFrame | None = field(default=None, repr=False)


# --------------------------------------------------------------------------- the harness

def evaluate_model(
    lm: LoadedModel,
    config: EvalConfig = EvalConfig(),
    out_dir: str | Path = "runs/eval",
    *,
    method: str = "no repair",
    k: int | None = None,
    pool_size: int | None = None,
    probe: LinearProbe | None = None,
    judge: Judge | None = None,
    progress: bool = True,
) -> EvalResult:
    """Generate on the held-out prompts, judge, and summarise safety and capability in one row.

    Traces go to `out_dir/refusal.jsonl` (harmful, over-refusal and benign prompts,
    generated together) and `out_dir/arithmetic.jsonl`, so a rerun resumes. `out_dir` also
    receives `eval_config.json` (a rerun with other settings raises ValueError),
    `report.csv` (refusal and ASR by source and category), `result.json` (the row) and,
    with a probe, `cliff_metrics.csv`.

    Args:
        method, k, pool_size: labels of the row (for a repaired model: the selection
            method, the number of training examples and the pool they came from).
        probe: a refusal probe; a probe fitted on the base model is accepted for a
            model repaired from that base (model id "<base>+lora:...").
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_settings(out / "eval_config.json", {"model_id": lm.model_id, "config": config.to_dict()})

    prompts = config.prompts()
    traces: dict[str, list[Trace]] = {}
    for file_name, groups in TRACE_FILES.items():
        file_prompts = [prompt for group in groups for prompt in prompts.get(group, [])]
        if not file_prompts:
            continue
        path = out / f"{file_name}.jsonl"
        logger.info("evaluating %s (%s): %d prompts into %s", lm.model_id, method, len(file_prompts), path)
        generate_traces(lm, file_prompts, config.settings(groups[0]), out=path, progress=progress)
        file_traces = _traces_for(path, file_prompts)
        if file_name == "refusal":
            file_traces = judge_traces(file_traces, judge)
            write_traces_atomic(path, file_traces)
        by_id = {trace.prompt_id: trace for trace in file_traces}
        for group in groups:
            if group in prompts:
                traces[group] = [by_id[prompt.id] for prompt in prompts[group]]

    cliff = None
    if probe is not None and traces.get("harmful"):
        cliff = harmful_cliff_metrics(lm, traces["harmful"], probe, progress=progress)
        cliff.to_csv(out / "cliff_metrics.csv", index=False)

    gold = {prompt.id: prompt.answer for prompt in prompts.get("arithmetic", [])}
    row = summarize(traces, gold, cliff=cliff, method=method, k=k, pool_size=pool_size, model_id=lm.model_id,
                    probe_layer=None if probe is None else probe.layer)
    report = group_report(traces)
    report.to_csv(out / "report.csv", index=False)
    (out / "result.json").write_text(json.dumps(_jsonable(row), indent=2), encoding="utf-8")
    return EvalResult(row=row, report=report, traces=traces, cliff=cliff)


def _check_run_settings(path: Path, settings: dict[str, Any]) -> None:
    if path.exists():
        existing = json.loads(path.read_text(encoding="utf-8"))
        if existing != settings:
            changed = sorted(key for key in {**existing.get("config", {}), **settings["config"]}
                             if existing.get("config", {}).get(key) != settings["config"].get(key))
            if existing.get("model_id") != settings["model_id"]:
                changed.insert(0, "model_id")
            raise ValueError(f"{path.parent} contains an evaluation with other settings ({', '.join(changed)} differ). "
                             "Evaluate into another folder, or delete this one to start over.")
        return
    path.write_text(json.dumps(settings, indent=2), encoding="utf-8")


def _traces_for(path: Path, prompts: Sequence[Any]) -> list[Trace]:
    """Return the traces of `prompts` from a trace file, in prompt order."""
    by_id = {trace.prompt_id: trace for trace in read_traces(path)}
    missing = [prompt.id for prompt in prompts if prompt.id not in by_id]
    if missing:
        raise RuntimeError(f"{path} lacks traces for {len(missing)} prompts (first: {missing[:3]}); rerun to resume.")
    return [by_id[prompt.id] for prompt in prompts]


# --------------------------------------------------------------------------- summaries (pure, testable on planted traces)

def summarize(
    traces: Mapping[str, Sequence[Trace]],
    gold: Mapping[str, int | None],
    *,
    cliff: pd.DataFrame | None = None,
    method: str = "",
    k: int | None = None,
    pool_size: int | None = None,
    model_id: str = "",
    probe_layer: int | None = None,
) -> dict[str, Any]:
    """Compute the results row from judged traces per group and the arithmetic gold answers.

    Rates count answered traces only (an empty answer is neither a refusal nor a
    compliance, as in `refusal_report`); `harmful_no_answer` counts the rest. Arithmetic
    accuracy counts every trace, and an empty answer is wrong.
    """
    row: dict[str, Any] = {column: None for column in RESULT_COLUMNS}
    row.update(method=method, k=k, pool_size=pool_size, model_id=model_id, probe_layer=probe_layer)
    if k is not None and pool_size:
        row["fraction"] = k / pool_size

    harmful = traces.get("harmful", [])
    if harmful:
        pooled = _pooled_row(harmful)
        row.update(asr=pooled["asr"], asr_ci_low=pooled["asr_ci_low"], asr_ci_high=pooled["asr_ci_high"],
                   asr_n=int(pooled["refused"] + pooled["complied"]), harmful_no_answer=int(pooled["no_answer"]))
    for group, column in (("overrefusal", "overrefusal"), ("benign", "benign_refusal")):
        if traces.get(group):
            pooled = _pooled_row(traces[group])
            row[column] = pooled["refusal_rate"]
            row[f"{group}_n"] = int(pooled["refused"] + pooled["complied"])

    arithmetic = traces.get("arithmetic", [])
    if arithmetic:
        correct, total = arithmetic_score(arithmetic, gold)
        row.update(arithmetic_accuracy=correct / total, arithmetic_n=total)

    if cliff is not None and len(cliff):
        # float64 means: a few dozen probabilities, but the same rule as every other mean here.
        row.update(final_mean=float(np.nanmean(cliff["final"].to_numpy(np.float64))),
                   cliff_mean=float(np.nanmean(cliff["cliff"].to_numpy(np.float64))),
                   cliff_n=int(cliff["cliff"].notna().sum()))
    return row


def _pooled_row(traces: Sequence[Trace]) -> pd.Series:
    """Return the refusal-report row that pools every trace of one group (all of them harmful, or all benign)."""
    kinds = {bool(trace.harmful) for trace in traces}
    if len(kinds) != 1:
        raise ValueError("a group mixes harmful and benign prompts; evaluate them as separate groups.")
    from cliffkit.judge.report import ALL

    report = refusal_report(traces, by=("model_id",))
    return report[report["model_id"] == ALL].iloc[0]


def arithmetic_score(traces: Sequence[Trace], gold: Mapping[str, int | None]) -> tuple[int, int]:
    """Return (correct, total): the final number of each trace's answer compared with its gold answer."""
    missing = [trace.prompt_id for trace in traces if gold.get(trace.prompt_id) is None]
    if missing:
        raise ValueError(f"no gold answer for arithmetic traces {missing[:3]}; pass the prompts' answers.")
    correct = sum(is_correct(trace.answer, int(gold[trace.prompt_id])) for trace in traces)
    return int(correct), len(traces)


def group_report(traces: Mapping[str, Sequence[Trace]]) -> pd.DataFrame:
    """Return the refusal report by source and category of the judged groups (harmful rows carry the ASR)."""
    judged = [trace for group in JUDGED_GROUPS for trace in traces.get(group, [])]
    if not judged:
        return pd.DataFrame()
    return refusal_report(judged, by=("source", "category"))


def harmful_cliff_metrics(lm: LoadedModel, traces: Sequence[Trace], probe: LinearProbe,
                          batch_size: int = 4, progress: bool = True) -> pd.DataFrame:
    """Read the probe along each harmful trace (prompt + thinking + closing marker); one row of cliff metrics per trace."""
    from cliffkit.select import score_pool

    return score_pool(lm, traces, probe_for_model(probe, lm), batch_size=batch_size, progress=progress)


def probe_for_model(probe: LinearProbe, lm: LoadedModel) -> LinearProbe:
    """Return `probe` usable on `lm`: its own model, or a model repaired from the probe's model.

    A repaired model has the id "<base id>+lora:<adapter>". The base model's probe is
    read unchanged on it, so the cliff is compared before and after repair on one scale.
    Raises ValueError for a probe of an unrelated model.
    """
    from cliffkit.repair import base_model_id

    if not probe.model_id or probe.model_id == lm.model_id:
        return probe
    if base_model_id(lm.model_id) == probe.model_id:
        logger.info("reading the probe of %s on the repaired model %s", probe.model_id, lm.model_id)
        return dataclasses.replace(probe, model_id=lm.model_id)
    raise ValueError(f"the probe was fitted on {probe.model_id!r}, but the model is {lm.model_id!r}, which was not "
                     "repaired from it. Pass a probe fitted on this model or on its base.")


# --------------------------------------------------------------------------- the results table

def results_table(rows: Sequence[EvalResult | Mapping[str, Any]]) -> pd.DataFrame:
    """Return one row per evaluated model, columns `RESULT_COLUMNS`, in the given order."""
    records = [dict(item.row if isinstance(item, EvalResult) else item) for item in rows]
    return pd.DataFrame(records, columns=list(RESULT_COLUMNS))


def write_results_table(table: pd.DataFrame, out_dir: str | Path, name: str = "results") -> tuple[Path, Path]:
    """Write the results table as `<name>.csv` and `<name>.json` (a list of row objects) under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    table.to_csv(csv_path, index=False)
    json_path.write_text(json.dumps(_jsonable(table.to_dict(orient="records")), indent=2), encoding="utf-8")
    return csv_path, json_path


def collect_results(eval_dir: str | Path) -> pd.DataFrame:
    """Read every `result.json` below `eval_dir` (one folder per evaluated model) into one table, sorted by folder."""
    paths = sorted(Path(eval_dir).glob("*/result.json"))
    if not paths:
        raise FileNotFoundError(f"no result.json under {eval_dir}; run `cliffkit evaluate` first.")
    return results_table([json.loads(path.read_text(encoding="utf-8")) for path in paths])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
