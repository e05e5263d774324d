"""Helpers behind the book: chapter settings per profile, the run-folder steps that chapters share,
exercise checks, and the machinery that executes the chapters and builds the Jupyter Book site.

A chapter calls `settings_for(profile, ...)` in its parameters cell, then `ensure_*` helpers that
reuse what earlier chapters left in the run folder or build it when missing, so each chapter runs
on its own. `execute_chapters` runs the notebooks with papermill and `build_book` renders the
executed copies without running them again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- profiles

# The profiles a chapter's `profile` parameter accepts; each is a file in `cliffkit.profiles`.
PROFILES = ("ci", "laptop", "gpu", "multi-gpu")
_SIZE_NAMES = ("n_per_source", "think_budget", "answer_budget", "batch_size", "forward_batch_size")


@dataclass(frozen=True)
class BookSettings:
    """Sizes and places that every chapter shares, read from a run profile and overridable one by one.

    `n_per_source` prompts are drawn from each harmful source (HarmBench, AdvBench,
    StrongREJECT) and from the benign source, so a run has 4 * n_per_source traces.
    Budgets count new tokens. `batch_size` is the generation batch (an int, or "auto"
    to fit the free memory) and `forward_batch_size` the number of traces per forward
    pass when reading activations. `config` is the whole `cliffkit.profiles.Profile`,
    whose `heads` and `repair` sections size chapters 4 to 6.
    """

    profile: str
    model: str
    run_dir: Path
    seed: int
    n_per_source: int
    think_budget: int
    answer_budget: int
    batch_size: int | str
    forward_batch_size: int
    temperature: float = 0.0
    top_p: float = 1.0
    dtype: str = "auto"
    family: str | None = None
    device: str = "auto"
    config: Any = dataclasses.field(default=None, repr=False, compare=False)

    def generation(self, lm=None, **overrides: Any):
        """Return the `GenerationSettings` of this profile, with `overrides` applied.

        A batch size of "auto" is resolved from the free memory, which needs the loaded model `lm`.
        """
        from cliffkit.generate import GenerationSettings

        values = dict(think_budget=self.think_budget, answer_budget=self.answer_budget,
                      temperature=self.temperature, top_p=self.top_p, batch_size=self.batch_size, seed=self.seed)
        values.update(overrides)
        if values["batch_size"] == "auto":
            if lm is None:
                raise ValueError(f"Profile {self.profile!r} sets batch_size 'auto', which needs the loaded model: "
                                 "call settings.generation(lm).")
            from cliffkit.memory import resolve_batch_size

            # NOTE: 1024 tokens is an assumed bound on a rendered prompt, not measured per prompt.
            longest = 1024 + values["think_budget"] + values["answer_budget"]
            values["batch_size"] = resolve_batch_size("auto", lm.model.config, lm.dtype, longest, [lm.device])
        return GenerationSettings(**values)

    def path(self, *parts: str) -> Path:
        """Return a path inside the run folder, creating the folders above it."""
        target = self.run_dir.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target


def settings_for(profile: str = "ci", *, model: str | None = None, run_dir: str | Path = "runs/book",
                 seed: int | None = None, **sizes: Any) -> BookSettings:
    """Return the chapter settings of a run profile, with any size given in `sizes` replacing the profile's.

    `profile` is a name from `cliffkit.profiles` ("ci", "laptop", "gpu", "multi-gpu")
    or the path of a profile JSON file. A size passed as None keeps the profile's value,
    so a parameters cell can list every size with None and override only some.

    Example:
        >>> settings_for("ci").think_budget
        96
        >>> settings_for("ci", think_budget=64, n_per_source=None).think_budget
        64
    """
    from cliffkit.profiles import load_profile

    config = load_profile(profile)
    values: dict[str, Any] = dict(
        n_per_source=int(config.per_source.get("harmbench", max(config.per_source.values()))),
        think_budget=config.generation["think_budget"], answer_budget=config.generation["answer_budget"],
        batch_size=config.generation["batch_size"], forward_batch_size=config.activations["forward_batch_size"],
    )
    for name, value in sizes.items():
        if name not in _SIZE_NAMES:
            raise ValueError(f"Unknown book setting {name!r}. Known settings: {', '.join(_SIZE_NAMES)}.")
        if value is not None:
            values[name] = value
    for name, value in values.items():
        if name == "batch_size" and value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    return BookSettings(
        profile=config.name, model=model or config.model, run_dir=Path(run_dir),
        seed=int(config.generation.get("seed", 0) if seed is None else seed),
        temperature=float(config.generation.get("temperature", 0.0)), top_p=float(config.generation.get("top_p", 1.0)),
        dtype=config.dtype, family=config.family if model is None else None, config=config, **values,
    )


def load_chapter_model(settings: BookSettings):
    """Load the model of the settings with the profile's dtype, family and device."""
    from cliffkit.models import load_model

    return load_model(settings.model, family=settings.family, dtype=settings.dtype, device=settings.device)


# --------------------------------------------------------------------------- display helpers

REDACTED = "[redacted]"


def redact(text: str, show: bool = False, words: int = 6) -> str:
    """Return the first `words` words of `text` followed by "[redacted]", or all of it with `show`.

    Answers to harmful prompts are data for the experiments. Chapters show only their
    opening words by default, which is enough to see whether the model refused.
    """
    if show:
        return text
    parts = text.split()
    if len(parts) <= words:
        return text
    return " ".join(parts[:words]) + " " + REDACTED


def show_figure(figure, run_dir: str | Path | None = None, name: str | None = None, dpi: int = 110):
    """Display a matplotlib figure as a PNG image and save it as run_dir/figures/<name>.png when both are given.

    The library builds figures without pyplot, so they are shown as images here; the
    PNG lands in the executed notebook and in the book.
    """
    import io

    from IPython.display import Image, display

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    data = buffer.getvalue()
    if run_dir is not None and name is not None:
        target = Path(run_dir) / "figures" / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    display(Image(data=data))


def show_image(path: str | Path):
    """Display a PNG written by the library (for example a figure saved by a pipeline step)."""
    from IPython.display import Image, display

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Figure {path} not found; the step that writes it has not run in this run folder.")
    display(Image(filename=str(path)))


STRICT_CHECKS_VARIABLE = "CLIFFKIT_BOOK_STRICT"


def run_check(name: str, check: Callable[..., Any], *args: Any) -> bool:
    """Run an exercise check and print whether the answer is right.

    A wrong answer raises the check's AssertionError, whose message says what differs.
    An exercise still raising NotImplementedError prints a reminder and returns False,
    unless $CLIFFKIT_BOOK_STRICT is set (as `cliffkit reproduce` does), where it raises.
    """
    try:
        check(*args)
    except NotImplementedError:
        if os.environ.get(STRICT_CHECKS_VARIABLE):
            raise
        print(f"{name}: not attempted yet. Fill in the function above, run its cell, then run this check again.")
        return False
    print(f"{name}: correct.")
    return True


# --------------------------------------------------------------------------- run-folder steps

HARMFUL_SOURCES = ("harmbench", "advbench", "strongreject")
BENIGN_SOURCES = ("benign",)
TRACES_FILE = "traces.jsonl"


def chapter_prompts(settings: BookSettings) -> list:
    """Return `n_per_source` harmful train prompts from each harmful source and as many benign ones, seeded.

    The harmful prompts come from `cliffkit.pool.training_prompts`, which leaves out
    train prompts whose text matches a val/test prompt. So the traces never share a
    prompt with the evaluations of chapters 4 and 6, and chapter 5's safety pool,
    drawn the same way, reuses them as the model's natural traces.
    """
    from cliffkit.datasets import load_prompts
    from cliffkit.pool import training_prompts

    prompts = training_prompts(HARMFUL_SOURCES, per_source=settings.n_per_source, seed=settings.seed)
    for source in BENIGN_SOURCES:
        prompts += load_prompts([source], splits=["train"], limit=settings.n_per_source, seed=settings.seed)
    return prompts


_RECORDED_SETTINGS = ("think_budget", "answer_budget", "temperature", "top_p", "seed")


def ensure_traces(settings: BookSettings, lm, name: str = TRACES_FILE) -> list:
    """Return the judged traces of the run folder, generating and judging whatever is missing.

    The trace file resumes: prompts already in it are skipped. Raises ValueError when
    the file contains traces made with other budgets or sampling settings, because mixing
    them would blur every later measurement.
    """
    from cliffkit.generate import generate_traces
    from cliffkit.judge import judge_traces
    from cliffkit.traces import read_traces, write_traces_atomic

    path = settings.path(name)
    generation = settings.generation(lm)
    if path.exists():
        _check_trace_settings(path, read_traces(path), generation)

    prompts = chapter_prompts(settings)
    generate_traces(lm, prompts, generation, out=path)
    traces = read_traces(path)
    wanted = {prompt.id for prompt in prompts}
    traces = [trace for trace in traces if trace.prompt_id in wanted]

    if any("refused" not in trace.labels for trace in traces):
        traces = judge_traces(traces)
        write_traces_atomic(path, traces)
    return traces


def _check_trace_settings(path: Path, traces: Sequence, generation) -> None:
    expected = dataclasses.asdict(generation)
    for trace in traces:
        different = {key: trace.settings.get(key) for key in _RECORDED_SETTINGS
                     if trace.settings.get(key) != expected[key]}
        if different:
            raise ValueError(
                f"{path} contains traces made with {different}, but this chapter requests "
                f"{ {key: expected[key] for key in different} }. Use another run_dir, or delete {path}."
            )


PROBE_DIR = "probe"


FALLBACK_TASK = "harmfulness"


def main_probe_task(traces: Sequence) -> str:
    """Return the probe task the chapters build on: "refusal" when the traces allow it, else "harmfulness".

    The refusal task (harmful-refused against harmful-complied) needs
    `cliffkit.probe.MIN_PER_CLASS` traces of each outcome. A model that refuses almost
    nothing, such as the small default model on the ci sizes, leaves too few refused
    traces; the chapters then use the harmfulness probe and say so.
    """
    from cliffkit.probe import MIN_PER_CLASS, task_labels

    data = task_labels(traces, "refusal")
    refused, complied = int((data.y == 1).sum()), int((data.y == 0).sum())
    if min(refused, complied) >= MIN_PER_CLASS:
        return "refusal"
    logger.warning("only %d refused and %d complied harmful traces, fewer than %d per class: the chapters use "
                   "the %s probe instead of the refusal probe", refused, complied, MIN_PER_CLASS, FALLBACK_TASK)
    return FALLBACK_TASK


def probe_task_note(summary: Mapping[str, Any]) -> str:
    """Return a Markdown note on which probe the chapter reads, warning when it is not the refusal probe."""
    task = summary["main_task"]
    layer = summary["tasks"][task]["best_layer"]
    if task == "refusal":
        return f"The chapter reads the **refusal** probe (harmful-refused against harmful-complied) at layer {layer}."
    counts = summary.get("label_counts", {})
    return (f"**Note.** This run has {counts.get('refused', 0)} refused and {counts.get('complied', 0)} complied "
            f"harmful traces, too few to fit a refusal probe (8 per class are needed). The chapter reads the "
            f"**{task}** probe (harmful against benign prompts) at layer {layer} instead, so its scores measure how "
            "harmful the model takes the prompt to be, not whether it intends to refuse. A model that refuses more "
            "often, or more prompts (`n_per_source`), gives the refusal probe.")


def ensure_probes(settings: BookSettings, lm, traces: Sequence, task: str | None = None) -> dict[str, Any]:
    """Return the probe summary of the run folder, fitting per-layer probes of every task when missing or stale.

    The probes, the layer sweep, the controls and the transfer check are written under
    run_dir/probe by `cliffkit.commands.probing.run_probe_stage`, the step behind
    `cliffkit probe`. `task` is the main task (default: `main_probe_task(traces)`), and
    `summary["main_task"]` names it. A summary made from another number of traces,
    another model or another main task counts as stale and is rebuilt.
    """
    task = task or main_probe_task(traces)
    summary_path = settings.path(PROBE_DIR, "summary.json")
    if summary_path.exists():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if (summary.get("n_traces") == len(traces) and summary.get("model_id") == lm.model_id
                and summary.get("main_task") == task):
            return summary
        logger.info("%s was made from other traces, model or task: fitting the probes again", summary_path)

    from cliffkit.commands.probing import run_probe_stage

    return run_probe_stage(lm, traces, settings.run_dir, "all", task, settings.forward_batch_size, settings.seed)


def main_probe(settings: BookSettings, lm, traces: Sequence):
    """Return (summary, probe) of the main task at its best layer, fitting the probes when missing."""
    summary = ensure_probes(settings, lm, traces)
    task = summary["main_task"]
    layer = summary["tasks"][task]["best_layer"]
    return summary, load_probes(settings, task)[layer]


def load_probes(settings: BookSettings, task: str = "refusal") -> dict[int, Any]:
    """Return {layer: LinearProbe} of one task from run_dir/probe/<task>."""
    from cliffkit.probe import LinearProbe

    files = sorted(settings.path(PROBE_DIR, task).glob("layer_*.npz"))
    if not files:
        raise FileNotFoundError(f"No {task} probes in {settings.run_dir / PROBE_DIR / task}. "
                                "Run chapter 1, or call book.ensure_probes first.")
    return {probe.layer: probe for probe in (LinearProbe.load(path) for path in files)}


CLIFF_DIR = "cliff"


def ensure_trajectories(settings: BookSettings, lm, traces: Sequence, probes: Mapping[int, Any]):
    """Return per-token probe scores of the traces at the probes' layers, scoring them when missing or stale.

    The scores are saved as run_dir/cliff/scores (`Trajectories.save`), where
    `cliffkit cliff` writes them too. Saved scores count as stale when their traces
    or layers differ from the ones given.
    """
    from cliffkit.cliff import Trajectories, score_traces

    stem = settings.path(CLIFF_DIR, "scores")
    wanted_ids = [trace.prompt_id for trace in traces]
    if stem.with_suffix(".npz").exists():
        saved = Trajectories.load(stem)
        if list(saved.meta["prompt_id"]) == wanted_ids and set(saved.layers) == set(probes):
            return saved
        logger.info("%s contains scores of other traces or layers: scoring again", stem)

    trajectories = score_traces(lm, traces, dict(probes), batch_size=settings.forward_batch_size)
    trajectories.save(stem)
    return trajectories


def probe_split_of(settings: BookSettings, prompt_ids: Iterable[str], task: str = "refusal") -> list[str]:
    """Return the probe split part ("train", "val", "test") of each prompt id, or "not in task"."""
    path = settings.path(PROBE_DIR, task, "split.json")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; fit the probes first (chapter 1, or book.ensure_probes).")
    parts = json.loads(path.read_text(encoding="utf-8"))
    part_of = {prompt_id: part for part, ids in parts.items() for prompt_id in ids}
    return [part_of.get(prompt_id, "not in task") for prompt_id in prompt_ids]


HEADS_DIR = "heads"


def evaluation_prompts(settings: BookSettings, per_source: int, split: str = "test") -> list:
    """Return held-out prompts: `per_source` from each harmful source, and half as many (at least 4) benign
    and over-refusal prompts, seeded."""
    from cliffkit.datasets import load_prompts

    prompts = []
    for source in HARMFUL_SOURCES:
        prompts += load_prompts([source], splits=[split], limit=per_source, seed=settings.seed)
    for source in ("benign", "overrefusal"):
        prompts += load_prompts([source], splits=[split], limit=max(4, per_source // 2), seed=settings.seed)
    return prompts


def refusal_direction(settings: BookSettings, lm, traces: Sequence):
    """Return the main probe (see `main_probe_task`) at its best layer as a `cliffkit.heads.directions.Direction`.

    The direction is the probe's weight in raw residual-stream space, at the layer with
    the best validation AUROC, with the probe's intercept.
    """
    import torch

    from cliffkit.heads.directions import Direction

    _, probe = main_probe(settings, lm, traces)
    return Direction(vector=probe.direction(torch.float32), layer=probe.layer, intercept=probe.intercept(),
                     source=f"{probe.task} probe at layer {probe.layer}",
                     meta={"task": probe.task, "traces": str(settings.path(TRACES_FILE).resolve())})


def scan_positions(settings: BookSettings) -> str:
    """Return where the causal head scan ablates: "all" positions (as Yin et al. 2025 do) on GPU profiles, else "last".

    The all-position scan reruns the blocks after each head at every position, which
    is too slow for 2 CPU cores; the last-position scan recomputes only the final token.
    """
    return "all" if settings.profile in ("gpu", "multi-gpu") else "last"


def ensure_head_table(settings: BookSettings, lm, traces: Sequence):
    """Return the ranked head table of the run folder, computing it when missing.

    The table has one row per head of blocks 0..layer with its direct attribution onto
    the refusal direction and its causal effect on the final probe score, ranked by the
    profile's `heads.rank_by` column. It is written with the direction to run_dir/heads,
    the layout that `cliffkit heads` writes and `cliffkit ablate` reads.
    """
    import pandas as pd

    table_path = settings.path(HEADS_DIR, "heads.csv")
    if table_path.exists() and settings.path(HEADS_DIR, "direction.npy").exists():
        return pd.read_csv(table_path)

    from cliffkit.heads import direct_attribution, head_effects, trace_token_ids

    direction = refusal_direction(settings, lm, traces)
    sequences = trace_token_ids(lm, [trace for trace in traces if trace.harmful])
    attribution = direct_attribution(lm, sequences, direction.vector, direction.layer,
                                     batch_size=settings.forward_batch_size)
    effects = head_effects(lm, sequences, direction.vector, direction.layer, method="exact",
                           positions=scan_positions(settings), intercept=direction.intercept,
                           batch_size=settings.forward_batch_size)
    return write_head_table(settings, direction, [attribution.to_frame("attribution"), effects.to_frame()])


def write_head_table(settings: BookSettings, direction, frames: Sequence):
    """Merge per-method head frames, rank them by the profile's `heads.rank_by`, and write them with the direction."""
    from cliffkit.heads.table import merge_head_frames, rank_heads

    table = merge_head_frames(frames)
    rank_by = settings.config.heads.get("rank_by", "attribution")
    ranked = rank_heads(table, rank_by if rank_by in table.columns else "attribution")
    ranked.to_csv(settings.path(HEADS_DIR, "heads.csv"), index=False)
    direction.save(settings.path(HEADS_DIR, "direction"))
    return ranked


POOL_DIR = "pool"
SELECT_DIR = "select"
SELECTIONS_FILE = "book_selections.json"


def pool_per_source(settings: BookSettings) -> int:
    """Return how many harmful train prompts per source the safety pool draws.

    On the ci profile it is `n_per_source`. The pool's prompts are then the harmful
    prompts of the shared traces, so their natural traces need no new generation.
    Other profiles use `repair.pool_per_source`.
    """
    if settings.profile == "ci":
        return settings.n_per_source
    return int(settings.config.repair.get("pool_per_source", settings.n_per_source))


def ensure_pool(settings: BookSettings, lm, per_source: int | None = None):
    """Return the safety pool (`cliffkit.pool.PoolBuild`), building the missing safe responses.

    `cliffkit.pool.build_pool` resumes from run_dir/pool/pool_traces.jsonl. Raises
    RuntimeError when the model refused none of the prompts with a think block it
    closed itself, because an empty pool leaves nothing to select.
    """
    from cliffkit.pool import build_pool, default_prefill, training_prompts

    count = pool_per_source(settings) if per_source is None else per_source
    prompts = training_prompts(HARMFUL_SOURCES, per_source=count, seed=settings.seed)
    built = build_pool(lm, prompts, settings.path(POOL_DIR), settings.generation(lm),
                       prefill=default_prefill(lm.family))
    if not built.examples:
        raise RuntimeError(
            f"The safety pool is empty: of {len(prompts)} prompts, {built.counts}. The pool keeps only refusals "
            f"whose think block the model closed itself; model {lm.model_id!r} rarely closes it. Use a model that "
            "writes its own closing think marker (a reasoning model, or the embedded thinker), or raise think_budget."
        )
    return built


def seed_natural_traces(settings: BookSettings, pool: Sequence, out: Path) -> int:
    """Copy the shared traces of pool prompts into the natural-trace file `out`; return how many were copied.

    The shared traces were generated with the same settings and the family's own
    system prompt, so they are the model's natural traces of those prompts and
    `cliffkit.select.natural_traces` need not generate them again.
    """
    from cliffkit.traces import TraceWriter, read_traces

    shared = settings.path(TRACES_FILE)
    if not shared.exists():
        return 0
    wanted = {example.id for example in pool}
    existing = {trace.prompt_id for trace in read_traces(out)} if out.exists() else set()
    copies = [trace for trace in read_traces(shared) if trace.prompt_id in wanted - existing]
    if copies:
        writer = TraceWriter(out, copies[0].model_id)
        writer.write(copies)
    return len(copies)


def write_selections(settings: BookSettings, scores, pool: Sequence, percents: Sequence[float], by: str,
                     seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Write the Cliff-as-a-Judge selection and its baselines for each percent; return one record per selection.

    For each percent: the top examples by `by`, a random subset per seed and the keyword
    rule (prompts whose natural answer complied); then the full pool. Each selection is
    written by `cliffkit.select.write_selection` to run_dir/select/<name>.jsonl, and the
    records to run_dir/select/book_selections.json.
    """
    from cliffkit.select import resolve_count, select_full, select_random, select_rule, select_top, write_selection

    out = settings.path(SELECT_DIR)
    records = []

    def add(name: str, method: str, percent: float, frame) -> None:
        info = {"method": method, "percent": percent, "k": len(frame), "pool_size": len(pool), "by": by}
        path = write_selection(frame, pool, out, name, info)
        records.append({"name": name, "path": str(path), **info})

    for percent in percents:
        if percent >= 100:
            continue
        k = resolve_count(len(scores), percent=percent)
        add(f"cliff-{by}-p{percent:g}", f"Cliff-as-a-Judge ({by})", percent, select_top(scores, k=k, by=by))
        for seed in seeds:
            add(f"random-s{seed}-p{percent:g}", f"random (seed {seed})", percent,
                select_random(scores, k=k, seed=seed))
        rule = select_rule(scores, k=k, seed=settings.seed)
        if len(rule):
            add(f"rule-p{percent:g}", "keyword rule", percent, rule)
    add("full", "full pool", 100.0, select_full(scores))
    (out / SELECTIONS_FILE).write_text(json.dumps(records, indent=2), encoding="utf-8")
    return records


def selection_settings(settings: BookSettings) -> tuple[list[float], str, list[int]]:
    """Return (percents, ranking, random seeds) of the selection step from the profile's `repair` section.

    The ranking is "final" or "cliff" (see `cliffkit.select.rank_pool`). The ci profile
    keeps one random seed.
    """
    repair_config = settings.config.repair
    percents = [float(value) for value in repair_config.get("percents", [1.7, 100])]
    seeds = list(settings.config.seeds) if repair_config.get("random_baseline", True) else []
    return percents, repair_config.get("rank_by", "final"), seeds[:1] if settings.profile == "ci" else seeds


def ensure_selections(settings: BookSettings, lm, traces: Sequence) -> list[dict[str, Any]]:
    """Return the selection records of the run folder, building pool, natural traces, scores and selections when missing."""
    records_path = settings.path(SELECT_DIR, SELECTIONS_FILE)
    if records_path.exists():
        return json.loads(records_path.read_text(encoding="utf-8"))

    from cliffkit.select import natural_traces, score_pool

    built = ensure_pool(settings, lm)
    out = settings.path(SELECT_DIR, "natural_traces.jsonl")
    seed_natural_traces(settings, built.examples, out)
    natural = natural_traces(lm, built.examples, out, settings.generation(lm))
    _, probe = main_probe(settings, lm, traces)
    scores = score_pool(lm, natural, probe, batch_size=settings.forward_batch_size)
    scores.to_csv(settings.path(SELECT_DIR, "scores.csv"), index=False)
    percents, by, seeds = selection_settings(settings)
    return write_selections(settings, scores, built.examples, percents, by, seeds)


REPAIRS_DIR = "repairs"
EVAL_DIR = "eval"


def evaluation_config(settings: BookSettings, lm, per_source: int | None = None):
    """Return the `cliffkit.evaluate.EvalConfig` of the book: held-out test prompts with the profile's budgets.

    `per_source` harmful prompts from each harmful source (default: the profile's
    `heads.eval_per_source`), half as many (at least 4) over-refusal and benign prompts,
    and `per_source` arithmetic problems with twice the thinking budget.
    """
    from cliffkit.evaluate import EvalConfig

    count = int(settings.config.heads.get("eval_per_source", 8)) if per_source is None else int(per_source)
    small = max(4, count // 2)
    return EvalConfig(harmful_sources=HARMFUL_SOURCES, harmful_per_source=count, overrefusal=small, benign=small,
                      arithmetic=count, split="test", think_budget=settings.think_budget,
                      answer_budget=settings.answer_budget, arithmetic_think_budget=2 * settings.think_budget,
                      arithmetic_answer_budget=32, batch_size=settings.generation(lm).batch_size,
                      temperature=settings.temperature, seed=settings.seed)


def seed_base_evaluation(settings: BookSettings, config, out_dir: Path) -> int:
    """Copy chapter 4's unablated traces of the evaluation prompts into the base model's evaluation folder.

    Chapter 4 generates with the same prompts and budgets (`evaluation_prompts` draws what
    `EvalConfig.prompts` draws), so `cliffkit.evaluate.evaluate_model` finds those traces
    and generates only the rest. Only traces made with the group's budgets and sampling
    settings are copied. Returns how many were copied.
    """
    from cliffkit.traces import TraceWriter, read_traces

    source = settings.run_dir / "ablation" / "traces" / "none.jsonl"
    if not source.exists():
        return 0
    available = {trace.prompt_id: trace for trace in read_traces(source)}
    copied = 0
    for group, prompts in config.prompts().items():
        expected = dataclasses.asdict(config.settings(group))
        path = Path(out_dir) / f"{group}.jsonl"
        existing = {trace.prompt_id for trace in read_traces(path)} if path.exists() else set()
        copies = [available[prompt.id] for prompt in prompts
                  if prompt.id in available and prompt.id not in existing
                  and all(available[prompt.id].settings.get(key) == expected[key] for key in _RECORDED_SETTINGS)]
        if copies:
            TraceWriter(path, copies[0].model_id).write(copies)
            copied += len(copies)
    return copied


def sft_config(settings: BookSettings):
    """Return the `cliffkit.sft.SFTConfig` of the profile's `repair.sft` section (alpha = 2 x rank)."""
    from cliffkit.repair import DEFAULT_REPAIR_CONFIG

    values = dict(settings.config.repair.get("sft", {}))
    rank = int(values.get("rank", DEFAULT_REPAIR_CONFIG.rank))
    return dataclasses.replace(
        DEFAULT_REPAIR_CONFIG, rank=rank, alpha=2.0 * rank,
        learning_rate=float(values.get("learning_rate", DEFAULT_REPAIR_CONFIG.learning_rate)),
        epochs=int(values.get("epochs", DEFAULT_REPAIR_CONFIG.epochs)),
        batch_size=int(values.get("batch_size", DEFAULT_REPAIR_CONFIG.batch_size)),
        grad_accum=int(values.get("grad_accum", DEFAULT_REPAIR_CONFIG.grad_accum)),
        max_length=int(values.get("max_length", DEFAULT_REPAIR_CONFIG.max_length)), seed=settings.seed)


def ensure_repair(settings: BookSettings, record: Mapping[str, Any]) -> Path:
    """Return the repair folder of one selection, training its LoRA adapter on a fresh base model when missing.

    The base is loaded only when training is needed, and released afterwards, because
    `cliffkit.repair.repair` changes the model it trains in place.
    """
    from cliffkit.pool import read_pool
    from cliffkit.repair import read_repair_record, repair

    folder = settings.path(REPAIRS_DIR, record["name"])
    try:
        read_repair_record(folder)
        return folder
    except FileNotFoundError:
        pass
    base = load_chapter_model(settings)
    repair(base, read_pool(record["path"]), folder, sft_config(settings), name=record["name"],
           selection=dict(record))
    del base
    return folder


# --------------------------------------------------------------------------- chapters and execution

CHAPTER_GLOB = "[0-9][0-9]_*.ipynb"
MANIFEST = "executed.json"
DEFAULT_CELL_TIMEOUT = 3600


@dataclass(frozen=True)
class Chapter:
    """One chapter notebook: `number` is its two-digit prefix, such as "03"."""

    path: Path

    @property
    def number(self) -> str:
        return self.path.name[:2]

    @property
    def name(self) -> str:
        return self.path.stem


def find_chapters(notebooks_dir: str | Path) -> list[Chapter]:
    """Return the chapter notebooks (NN_name.ipynb) of a folder in order."""
    folder = Path(notebooks_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"Chapter folder {folder} not found. Run from the repository root, "
                                "or pass the folder that contains the NN_name.ipynb chapters.")
    chapters = [Chapter(path) for path in sorted(folder.glob(CHAPTER_GLOB))]
    if not chapters:
        raise FileNotFoundError(f"No chapter notebooks (NN_name.ipynb) in {folder}.")
    return chapters


class ChapterError(RuntimeError):
    """A chapter failed: the message shows the failing cell's source and the error."""

    def __init__(self, chapter: Chapter, cell_index: int | None, source: str, error: str, executed: Path):
        self.chapter = chapter
        self.cell_index = cell_index
        self.source = source
        self.error = error
        self.executed = executed
        where = f"cell {cell_index} (counting from 0)" if cell_index is not None else "an unknown cell"
        shown = "\n".join("    " + line for line in source.strip().splitlines()) or "    (no source)"
        super().__init__(
            f"Chapter {chapter.name} failed at {where}:\n{shown}\n{error}\n"
            f"The executed copy with the error is {executed}. Fix the cause, then resume with "
            f"`cliffkit reproduce --from {chapter.number}`."
        )


@dataclass
class ChapterRun:
    """The outcome of one chapter in `execute_chapters`: "executed" or "skipped" (already done).

    `cpu_seconds` is the user + system time of the chapter's kernel, which on a busy
    machine measures the cost better than the wall-clock `seconds`.
    """

    chapter: Chapter
    status: str
    seconds: float
    executed: Path
    cpu_seconds: float = 0.0


def _children_cpu_seconds() -> float:
    """Return the user + system time of this process's finished child processes (the kernels)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> None:
    temporary = out_dir / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(temporary, out_dir / MANIFEST)


def _is_done(entry: Mapping[str, Any] | None, chapter: Chapter, parameters: Mapping[str, Any], executed: Path) -> bool:
    return (entry is not None and entry.get("status") == "ok" and executed.exists()
            and entry.get("source_sha256") == file_sha256(chapter.path)
            and entry.get("parameters") == dict(parameters))


def execute_chapters(
    notebooks_dir: str | Path,
    out_dir: str | Path,
    parameters: Mapping[str, Any],
    *,
    start: str | None = None,
    force: bool = False,
    kernel_name: str | None = None,
    cell_timeout: int = DEFAULT_CELL_TIMEOUT,
    log: Callable[[str], None] | None = None,
) -> list[ChapterRun]:
    """Execute the chapters in order with papermill, stopping at the first failing cell.

    Executed copies go to `out_dir`, with the injected-parameters cell hidden from the
    book. A chapter is skipped when `out_dir/executed.json` records a successful run of
    the same notebook with the same parameters, unless `force` is set or an earlier
    chapter ran in this call (a later chapter reads what it wrote). With `start`
    (a chapter number such as "03"), earlier chapters are not run at all.

    Raises `ChapterError`, naming the cell and the error, when a chapter fails or a cell
    runs longer than `cell_timeout` seconds.
    """
    chapters = [Chapter(chapter.path.resolve()) for chapter in find_chapters(notebooks_dir)]
    if start is not None:
        numbers = [chapter.number for chapter in chapters]
        if start not in numbers:
            raise ValueError(f"No chapter {start!r}; chapters are {', '.join(numbers)}.")
        chapters = chapters[numbers.index(start):]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    report = log or logger.info
    runs = []
    for chapter in chapters:
        executed = (out / chapter.path.name).resolve()
        earlier_ran = any(run.status == "executed" for run in runs)
        if not force and not earlier_ran and _is_done(manifest.get(chapter.name), chapter, parameters, executed):
            report(f"{chapter.name}: already executed with these parameters, skipped")
            runs.append(ChapterRun(chapter, "skipped", 0.0, executed))
            continue

        report(f"{chapter.name}: executing")
        # Hashed before the run, so an edit made while the chapter runs forces a rerun next time.
        source_sha256 = file_sha256(chapter.path)
        began, cpu_began = time.monotonic(), _children_cpu_seconds()
        try:
            _execute_one(chapter, executed, parameters, kernel_name, cell_timeout)
        except ChapterError:
            manifest[chapter.name] = {"status": "failed", "source_sha256": source_sha256,
                                      "parameters": dict(parameters), "seconds": time.monotonic() - began}
            _write_manifest(out, manifest)
            raise
        seconds, cpu_seconds = time.monotonic() - began, _children_cpu_seconds() - cpu_began
        manifest[chapter.name] = {"status": "ok", "source_sha256": source_sha256,
                                  "parameters": dict(parameters), "seconds": round(seconds, 1),
                                  "cpu_seconds": round(cpu_seconds, 1),
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_manifest(out, manifest)
        report(f"{chapter.name}: done in {seconds:.0f} s ({cpu_seconds:.0f} CPU seconds in the kernel)")
        runs.append(ChapterRun(chapter, "executed", seconds, executed, cpu_seconds))
    return runs


def _execute_one(chapter: Chapter, executed: Path, parameters: Mapping[str, Any], kernel_name: str | None,
                 cell_timeout: int) -> None:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    # Exercise checks raise on a missing solution instead of printing a reminder. TQDM_DISABLE
    # silences the bars whose caller leaves `disable` unset; drop_progress_outputs removes the rest.
    os.environ[STRICT_CHECKS_VARIABLE] = "1"
    previous_tqdm = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        papermill.execute_notebook(str(chapter.path), str(executed), parameters=dict(parameters),
                                   kernel_name=kernel_name, cwd=str(chapter.path.parent), progress_bar=False,
                                   execution_timeout=cell_timeout)
    except PapermillExecutionError as error:
        hide_injected_parameters(executed)
        cell_index = _cell_index_without_markers(executed, error.cell_index)
        raise ChapterError(chapter, cell_index, error.source, f"{error.ename}: {error.evalue}", executed) from error
    except Exception as error:  # noqa: BLE001 - a timeout or a dead kernel: report the cell that was running
        if not executed.exists():
            raise ChapterError(chapter, None, "", f"{type(error).__name__}: {error}", executed) from error
        hide_injected_parameters(executed)
        cell_index, source = _running_cell(executed)
        raise ChapterError(chapter, cell_index, source, f"{type(error).__name__}: {_first_line(error)}",
                           executed) from error
    finally:
        os.environ.pop(STRICT_CHECKS_VARIABLE, None)
        if previous_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous_tqdm
    hide_injected_parameters(executed)
    drop_progress_outputs(executed)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _cell_index_without_markers(executed: Path, papermill_index: int) -> int:
    """Map papermill's cell index to the source notebook's cell index.

    Papermill counts the cells of the executed copy before it adds its error markers,
    so its index includes the injected-parameters cell; the source notebook has no such cell.
    """
    import nbformat

    notebook = nbformat.read(executed, as_version=4)
    cells = [cell for cell in notebook.cells if "papermill-error-cell-tag" not in _tags(cell)]
    injected_before = sum(INJECTED_TAG in _tags(cell) for cell in cells[:papermill_index])
    return papermill_index - injected_before


def _running_cell(executed: Path) -> tuple[int | None, str]:
    """Return (index, source) of the cell that stopped the run: the first with an error output, else the last started."""
    import nbformat

    notebook = nbformat.read(executed, as_version=4)
    cells = [cell for cell in notebook.cells
             if not {"papermill-error-cell-tag", "injected-parameters"} & set(cell.metadata.get("tags", []))]
    for index, cell in enumerate(cells):
        if cell.cell_type == "code" and any(output.get("output_type") == "error" for output in cell.get("outputs", [])):
            return index, cell.source
    started = [index for index, cell in enumerate(cells)
               if cell.metadata.get("papermill", {}).get("status") in ("running", "completed")]
    if started:
        return started[-1], cells[started[-1]].source
    return None, ""


# --------------------------------------------------------------------------- notebook transforms

SOLUTION_TAG = "solution"
INJECTED_TAG = "injected-parameters"
REMOVE_TAG = "remove-cell"


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def hide_injected_parameters(path: str | Path) -> int:
    """Tag each papermill injected-parameters cell of a notebook "remove-cell", in place; return how many."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    count = 0
    for cell in notebook.cells:
        tags = _tags(cell)
        if INJECTED_TAG in tags and REMOVE_TAG not in tags:
            cell.metadata["tags"] = tags + [REMOVE_TAG]
            count += 1
    if count:
        nbformat.write(notebook, path)
    return count


WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def drop_progress_outputs(path: str | Path) -> int:
    """Remove progress-bar outputs from an executed notebook, in place; return how many were removed.

    A static page cannot run widgets, so a tqdm widget shows only its first frame ("0%"),
    and a text progress bar on stderr is a trail of carriage returns. Both are removed.
    """
    import re

    import nbformat

    text_bar = re.compile(r"\d+%\|")
    notebook = nbformat.read(path, as_version=4)
    removed = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            is_widget = WIDGET_MIME in output.get("data", {})
            is_text_bar = (output.get("output_type") == "stream" and output.get("name") == "stderr"
                           and text_bar.search(output.get("text", "")) is not None)
            if is_widget or is_text_bar:
                removed += 1
            else:
                kept.append(output)
        cell.outputs = kept
    if removed:
        nbformat.write(notebook, path)
    return removed


def student_copy(notebook):
    """Return a copy of a notebook without its solution cells and without outputs.

    Cells tagged "solution" (code or markdown) are removed. Everything else, the
    exercise stubs and their checks included, is kept with outputs cleared.
    """
    import copy

    result = copy.deepcopy(notebook)
    result.cells = [cell for cell in result.cells
                    if SOLUTION_TAG not in _tags(cell) and INJECTED_TAG not in _tags(cell)]
    for cell in result.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    result.metadata.pop("papermill", None)
    return result


def write_student_copies(notebooks_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write a student copy (no solutions, no outputs) of every chapter into `out_dir`; return the paths."""
    import nbformat

    out = Path(out_dir)
    chapters = find_chapters(notebooks_dir)
    if out.resolve() == Path(notebooks_dir).resolve():
        raise ValueError(f"--out {out} is the chapter folder itself; student copies would overwrite the "
                         "chapters. Pass another folder.")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for chapter in chapters:
        notebook = nbformat.read(chapter.path, as_version=4)
        target = out / chapter.path.name
        nbformat.write(student_copy(notebook), target)
        written.append(target)
    return written


# --------------------------------------------------------------------------- building the site

BOOK_FILES = ("_config.yml", "_toc.yml")
BOOK_FOLDERS = ("book",)


def stage_book(repo_root: str | Path, executed_dir: str | Path, stage_dir: str | Path) -> Path:
    """Copy the book sources into `stage_dir`, with the executed chapters in place of the source notebooks.

    The staged tree has the repository's layout, so launch buttons point at the
    chapters' paths in the repository. Pages named in the toc but missing from the
    tree (such as reports not written yet) are dropped from the staged toc with a
    warning. Raises FileNotFoundError when a chapter has no executed copy.
    """
    import yaml

    root, executed, stage = Path(repo_root), Path(executed_dir), Path(stage_dir)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for name in BOOK_FILES:
        shutil.copy2(root / name, stage / name)
    for name in BOOK_FOLDERS:
        if (root / name).exists():
            shutil.copytree(root / name, stage / name)

    missing = []
    notebooks = stage / "notebooks"
    notebooks.mkdir()
    for chapter in find_chapters(root / "notebooks"):
        copy = executed / chapter.path.name
        if not copy.exists():
            missing.append(chapter.path.name)
            continue
        shutil.copy2(copy, notebooks / chapter.path.name)
    if missing:
        raise FileNotFoundError(f"No executed copy of {', '.join(missing)} in {executed}. "
                                "Run `cliffkit reproduce` (it executes the chapters, then builds).")

    toc_path = stage / "_toc.yml"
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    toc_path.write_text(yaml.safe_dump(_prune_toc(toc, stage), sort_keys=False), encoding="utf-8")
    return stage


def _page_exists(stage: Path, name: str) -> bool:
    return any((stage / f"{name}{suffix}").exists() for suffix in ("", ".md", ".ipynb"))


def _prune_toc(node: Any, stage: Path) -> Any:
    """Drop toc entries whose file is missing, and parts or sections left empty."""
    if isinstance(node, list):
        kept = [_prune_toc(item, stage) for item in node]
        return [item for item in kept if item is not None]
    if not isinstance(node, dict):
        return node
    if "file" in node and not _page_exists(stage, node["file"]):
        logger.warning("The toc names %s, which does not exist yet: left out of this build", node["file"])
        return None
    if "glob" in node and not list(stage.glob(node["glob"] + "*")):
        logger.warning("The toc glob %s matches no page yet: left out of this build", node["glob"])
        return None
    result = {key: _prune_toc(value, stage) for key, value in node.items()}
    for key in ("chapters", "sections", "parts"):
        if key in result and not result[key]:
            if key == "parts" or "file" not in result:
                return None
            del result[key]
    return result


def build_book(repo_root: str | Path, executed_dir: str | Path, build_dir: str | Path,
               builder: str = "html") -> Path:
    """Build the site from the executed chapters without executing them; return the HTML folder.

    The book sources are staged under `build_dir/site-src`. `jupyter-book build`
    writes the site to `build_dir/html` when `build_dir` is named "_build", else to
    `build_dir/_build/html`. Raises RuntimeError with the tail of the
    build log when jupyter-book fails.
    """
    build = Path(build_dir).resolve()
    stage = stage_book(repo_root, executed_dir, build / "site-src")
    # jupyter-book writes to <path-output>/_build/<builder>.
    path_output = build.parent if build.name == "_build" else build
    command = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
               "build", str(stage), "--path-output", str(path_output), "--builder", builder]
    logger.info("Building the book: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, cwd=str(stage))
    log_path = build / "jupyter-book.log"
    log_path.write_text(result.stdout + "\n" + result.stderr, encoding="utf-8")
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
        raise RuntimeError(f"jupyter-book build failed (exit {result.returncode}); full log in {log_path}:\n{tail}")
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    if warnings:
        logger.warning("jupyter-book reported %d warnings (see %s); first: %s", len(warnings), log_path, warnings[0])
    html = path_output / "_build" / builder
    logger.info("Site built: %s", html / "index.html")
    return html


def find_repo_root(start: str | Path | None = None) -> Path | None:
    """Return the nearest folder at or above `start` (default: the working directory) with the book's _toc.yml."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").exists() and (folder / "notebooks").is_dir():
            return folder
    return None


def iter_json(paths: Iterable[Path]) -> Iterable[tuple[Path, Any]]:
    """Yield (path, data) for each readable JSON file, logging and skipping malformed ones."""
    for path in paths:
        try:
            yield path, json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("Skipping %s: %s", path, error)
