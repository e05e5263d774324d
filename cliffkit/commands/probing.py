"""Commands `cliffkit probe` (per-layer probes with controls) and `cliffkit cliff` (trajectories and cliff metrics)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from cliffkit.cli import add_model_options, split_list

logger = logging.getLogger(__name__)

CONTROL_TASKS = ("refusal", "harmfulness", "paper")
SUMMARY_DISTANCES = (0, 1, 2, 4, 8, 16, 32, 64)


def register(subparsers: argparse._SubParsersAction) -> None:
    probe = subparsers.add_parser("probe", help="fit refusal probes at each layer, with controls, on judged traces.")
    _add_shared_options(probe)
    probe.set_defaults(handler=cmd_probe)

    cliff = subparsers.add_parser("cliff", help="score every token of every trace and measure the refusal cliff. "
                                                "Fits the probes first when the run folder has none.")
    _add_shared_options(cliff)
    cliff.add_argument("--layer", type=int, default=None,
                       help="layer of the trajectory plot and cliff metrics (default: the probe layer with the "
                            "best validation AUROC).")
    cliff.add_argument("--max-distance", type=int, default=64,
                       help="tokens before the end shown in plots and heatmaps (default: 64).")
    cliff.add_argument("--exclude-last", type=int, default=8,
                       help="thinking tokens left out of the plateau at its end (default: 8).")
    cliff.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the bands (default: 1000).")
    cliff.set_defaults(handler=cmd_cliff)


def _add_shared_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traces", required=True, help="judged trace file (JSON Lines) from `cliffkit generate`.")
    parser.add_argument("--run-dir", required=True, help="run folder that receives every artifact.")
    add_model_options(parser)
    parser.add_argument("--layers", default="all",
                        help="decoder layers to probe: 'all' or comma-separated indices such as 12,16,20 "
                             "(default: all).")
    parser.add_argument("--task", default="refusal", choices=CONTROL_TASKS,
                        help="probe task used for the trajectories: 'refusal' (harmful-refused vs harmful-complied, "
                             "the default), 'harmfulness' (harmful vs benign) or 'paper' (harmful-refused vs "
                             "benign-complied, which confounds harmfulness with refusal).")
    parser.add_argument("--batch-size", type=int, default=4, help="traces per forward pass (default: 4).")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, folds and bootstrap (default: 0).")
    parser.add_argument("--min-per-class", type=int, default=8,
                        help="minimum traces per class for a probe task (default: 8). Lower it only to explore "
                             "small runs: held-out metrics then rest on a few traces.")
    parser.add_argument("--cache-dir", default=None,
                        help="activation cache folder, shareable between run folders of the same model "
                             "(default: RUN_DIR/cache/activations).")


# --------------------------------------------------------------------------- shared steps

def _load_inputs(args: argparse.Namespace):
    from cliffkit.models import load_model
    from cliffkit.probe import require_judged
    from cliffkit.traces import read_traces

    traces = read_traces(args.traces)
    if not traces:
        raise ValueError(f"{args.traces} contains no traces. Run `cliffkit generate` first.")
    models = sorted({trace.model_id for trace in traces})
    if models != [args.model]:
        raise ValueError(f"{args.traces} contains traces of {', '.join(repr(m) for m in models)}, but --model is "
                         f"{args.model!r}. Pass --model with the model that wrote the traces.")
    require_judged(traces)
    lm = load_model(args.model, family=args.family, dtype=args.dtype, device=args.device)
    return traces, lm


def _parse_layers(value: str) -> Sequence[int] | str:
    if value.strip().lower() == "all":
        return "all"
    try:
        return [int(item) for item in split_list(value) or []]
    except ValueError:
        raise ValueError(f"--layers must be 'all' or comma-separated integers, got {value!r}.") from None


def _write_json(path: Path, data: Any) -> None:
    from cliffkit.probe import to_jsonable

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=2), encoding="utf-8")


# --------------------------------------------------------------------------- probe

def run_probe_stage(lm, traces, run_dir: str | Path, layers: Sequence[int] | str = "all", task: str = "refusal",
                    batch_size: int = 4, seed: int = 0, *, min_per_class: int | None = None,
                    cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Fit the per-layer probes of every task that has enough data, and write them with the sweep and the controls.

    This is the step behind `cliffkit probe`. Artifacts go to run_dir/probe, and
    last-position activations are cached in `cache_dir` (run_dir/cache/activations by
    default). Returns the summary also written to run_dir/probe/summary.json.
    """
    import pandas as pd

    from cliffkit.activations import last_position_activations, resolve_layers
    from cliffkit.plots import plot_layer_sweep, save_figure
    from cliffkit.probe import MIN_PER_CLASS

    run_dir = Path(run_dir)
    min_per_class = MIN_PER_CLASS if min_per_class is None else min_per_class
    out = run_dir / "probe"
    layer_tuple = resolve_layers(lm, layers)
    cache_dir = Path(cache_dir) if cache_dir else run_dir / "cache" / "activations"
    X = last_position_activations(lm, traces, layer_tuple, batch_size=batch_size, cache_dir=cache_dir)
    if min_per_class < MIN_PER_CLASS:
        logger.warning("min_per_class %d is below %d: held-out metrics may rest on one or two traces per class",
                       min_per_class, MIN_PER_CLASS)

    summary: dict[str, Any] = {"model_id": lm.model_id, "n_traces": len(traces), "layers": list(layer_tuple),
                               "main_task": task, "min_per_class": min_per_class,
                               "label_counts": _label_counts(traces), "tasks": {}}
    sweeps, splits = [], {}
    for name in [task] + [t for t in CONTROL_TASKS if t != task]:
        try:
            sweep, data, split, info = _fit_task(name, traces, X, layer_tuple, lm.model_id, out, min_per_class,
                                                 seed)
        except ValueError as error:
            if name == task:
                raise
            logger.warning("control %s skipped: %s", name, error)
            summary["tasks"][name] = {"skipped": str(error)}
            continue
        sweeps.append(sweep)
        splits[name] = (data, split)
        summary["tasks"][name] = info

    sweep_table = pd.concat(sweeps, ignore_index=True)
    sweep_table.to_csv(out / "sweep.csv", index=False)
    save_figure(plot_layer_sweep(sweep_table, title=f"Probe accuracy and AUROC by layer ({lm.model_id})"),
                out / "sweep.png")

    summary["transfer"] = _transfer_check(lm, traces, splits[task], summary["tasks"][task]["best_layer"], task,
                                          out, batch_size)
    _write_json(out / "summary.json", summary)
    return summary


def _fit_task(name: str, traces, X, layer_tuple, model_id: str, out: Path, min_per_class: int, seed: int):
    """Fit and save one task's probes at every layer, its split and its difference-of-means directions."""
    import torch
    from safetensors.torch import save_file

    from cliffkit.probe import (TASKS, best_layer, check_class_counts, mean_difference_directions,
                                split_by_prompt, sweep_layers, task_labels)

    data = task_labels(traces, name)
    check_class_counts(data.y, data.task, min_per_class)
    split = split_by_prompt(data.groups, data.y, seed=seed)

    sweep, probes = sweep_layers(X[data.indices], data.y, data.groups, layer_tuple, split=split,
                                 model_id=model_id, task=name, seed=seed)
    sweep.insert(0, "task", name)
    for layer, probe in probes.items():
        probe.save(out / name / f"layer_{layer:02d}")
    directions = mean_difference_directions(X[data.indices], data.y)
    save_file({"directions": torch.from_numpy(directions), "layers": torch.tensor(layer_tuple)},
              str(out / name / "mean_difference_directions.safetensors"))
    _write_json(out / name / "split.json", {part: sorted(set(data.groups[getattr(split, part)].tolist()))
                                             for part in ("train", "val", "test")})

    chosen = best_layer(sweep)
    info = {
        "description": TASKS[name].description, "caveat": TASKS[name].caveat,
        "class_1": TASKS[name].positive, "class_0": TASKS[name].negative,
        "n_class_1": int(data.y.sum()), "n_class_0": int((data.y == 0).sum()), "excluded": data.excluded,
        "split_sizes": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "best_layer": chosen, "best_layer_rule": "highest validation AUROC, then lowest validation log loss, then depth",
        "at_best_layer": sweep[sweep["layer"] == chosen].iloc[0].to_dict(),
        "sweep": sweep.drop(columns=["task"]).to_dict(orient="records"),
    }
    return sweep, data, split, info


def _probe_from_args(lm, traces, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    return run_probe_stage(lm, traces, run_dir, _parse_layers(args.layers), args.task, args.batch_size, args.seed,
                           min_per_class=args.min_per_class, cache_dir=args.cache_dir)


def _label_counts(traces) -> dict[str, int]:
    from cliffkit.cliff import outcome_of

    return dict(Counter(outcome_of(trace) for trace in traces))


def _transfer_check(lm, traces, task_split, layer: int, task: str, out: Path, batch_size: int) -> dict[str, Any]:
    """Read the last-position probe at every position of the held-out traces (validation and test prompts).

    The validation prompts chose the layer, not the probe weights, so they count as held out here.
    """
    import numpy as np

    from cliffkit.cliff import score_traces
    from cliffkit.plots import plot_transfer, save_figure
    from cliffkit.probe import LinearProbe, transfer_by_distance, transfer_by_segment

    data, split = task_split
    rows = np.concatenate([split.val, split.test])
    held_out = [traces[int(data.indices[row])] for row in rows]
    probe = LinearProbe.load(out / task / f"layer_{layer:02d}")
    trajectories = score_traces(lm, held_out, probe, batch_size=batch_size)
    logits = trajectories.values(layer, "logit")
    y = data.y[rows]

    by_distance = transfer_by_distance(logits, y, max_distance=64)
    by_segment = transfer_by_segment(logits, trajectories.segments, y)
    by_distance.to_csv(out / "transfer_by_distance.csv", index=False)
    by_segment.to_csv(out / "transfer_by_segment.csv", index=False)
    save_figure(plot_transfer(by_distance, title=f"{task} probe, layer {layer}: read before the last position "
                                                  f"(held-out, n={len(rows)})"), out / "transfer.png")
    shown = by_distance[by_distance["distance"].isin(SUMMARY_DISTANCES)]
    return {"task": task, "layer": layer, "n_held_out": int(len(rows)), "n_class_1": int(np.sum(y)),
            "by_distance": shown.to_dict(orient="records"), "by_segment": by_segment.to_dict(orient="records")}


def cmd_probe(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    traces, lm = _load_inputs(args)
    summary = _probe_from_args(lm, traces, run_dir, args)
    _print_probe_summary(summary)
    print(f"Probe artifacts: {run_dir / 'probe'}")
    return 0


def _print_probe_summary(summary: dict[str, Any]) -> None:
    print(f"Outcomes: {summary['label_counts']}")
    for name, info in summary["tasks"].items():
        if "skipped" in info:
            print(f"[{name}] skipped: {info['skipped']}")
            continue
        best = info["at_best_layer"]
        sizes = info["split_sizes"]
        print(f"[{name}] {info['class_1']} (n={info['n_class_1']}) vs {info['class_0']} (n={info['n_class_0']}), "
              f"split {sizes['train']}/{sizes['val']}/{sizes['test']}. Best layer {info['best_layer']}: test "
              f"accuracy {best['test_accuracy']:.3f}, balanced {best['test_balanced_accuracy']:.3f}, "
              f"AUROC {best['test_auroc']:.3f}")
        for row in info["sweep"]:
            print(f"    layer {row['layer']:>2}: val acc {row['val_accuracy']:.3f} bal {row['val_balanced_accuracy']:.3f} "
                  f"AUROC {row['val_auroc']:.3f} | test acc {row['test_accuracy']:.3f} "
                  f"bal {row['test_balanced_accuracy']:.3f} AUROC {row['test_auroc']:.3f} (C={row['C']:g})")
    transfer = summary["transfer"]
    print(f"Transfer of the {transfer['task']} probe (layer {transfer['layer']}) to earlier positions of "
          f"{transfer['n_held_out']} held-out traces:")
    for row in transfer["by_distance"]:
        print(f"    {row['distance']:>2} tokens before the end: accuracy {row['accuracy']:.3f}, balanced "
              f"{row['balanced_accuracy']:.3f}, AUROC {row['auroc']:.3f} (n={row['n']})")


# --------------------------------------------------------------------------- cliff

def _load_task_probes(run_dir: Path, task: str):
    from cliffkit.probe import LinearProbe

    folder = run_dir / "probe" / task
    files = sorted(folder.glob("layer_*.npz"))
    return {probe.layer: probe for probe in (LinearProbe.load(path) for path in files)}


def _score_resumable(lm, traces, probes, parts_dir: Path, batch_size: int, chunk_size: int = 16):
    """Score traces in chunks saved as they finish, so an interrupted run resumes at the first missing chunk."""
    from cliffkit.cliff import Trajectories, score_traces

    digest = hashlib.sha256()
    for layer in sorted(probes):
        digest.update(probes[layer].direction().numpy().tobytes())
    for trace in traces:
        digest.update((trace.prompt_id + trace.rendered + trace.thinking).encode())
    key = digest.hexdigest()[:16]

    parts = []
    for start in range(0, len(traces), chunk_size):
        path = parts_dir / f"{key}-{start:06d}"
        chunk = traces[start:start + chunk_size]
        if path.with_suffix(".npz").exists():
            parts.append(Trajectories.load(path))
            continue
        part = score_traces(lm, chunk, probes, batch_size=batch_size)
        part.save(path)
        parts.append(part)

    import pandas as pd

    return Trajectories(parts[0].layers, [x for p in parts for x in p.logits], [x for p in parts for x in p.segments],
                        pd.concat([p.meta for p in parts], ignore_index=True), parts[0].task)


def cmd_cliff(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    traces, lm = _load_inputs(args)
    probes = _load_task_probes(run_dir, args.task)
    summary_path = run_dir / "probe" / "summary.json"
    if not probes or not summary_path.exists():
        logger.info("no %s probes in %s: fitting them first", args.task, run_dir / "probe")
        probe_summary = _probe_from_args(lm, traces, run_dir, args)
        _print_probe_summary(probe_summary)
        probes = _load_task_probes(run_dir, args.task)
    probe_summary = json.loads(summary_path.read_text(encoding="utf-8"))

    task_info = probe_summary["tasks"].get(args.task, {"skipped": "the probe stage did not fit it"})
    if "skipped" in task_info:
        raise ValueError(f"{run_dir / 'probe'} has no {args.task!r} probes: {task_info['skipped']}")
    layer = args.layer if args.layer is not None else task_info["best_layer"]
    if layer not in probes:
        raise ValueError(f"no {args.task} probe at layer {layer} in {run_dir / 'probe' / args.task}; probed layers: "
                         f"{sorted(probes)}. Run `cliffkit probe --layers ...` including it.")

    out = run_dir / "cliff"
    trajectories = _score_resumable(lm, traces, probes, out / "parts", args.batch_size)
    trajectories.meta["split"] = _split_column(run_dir, args.task, trajectories.meta["prompt_id"])
    trajectories.save(out / "scores")
    summary = write_cliff_artifacts(trajectories, layer, out, args, lm.model_id)
    _print_cliff_summary(summary)
    print(f"Cliff artifacts: {out}")
    return 0


def _split_column(run_dir: Path, task: str, prompt_ids) -> list[str]:
    split = json.loads((run_dir / "probe" / task / "split.json").read_text(encoding="utf-8"))
    part_of = {prompt_id: part for part, ids in split.items() for prompt_id in ids}
    return [part_of.get(prompt_id, "not in task") for prompt_id in prompt_ids]


def write_cliff_artifacts(trajectories, layer: int, out: Path, args: argparse.Namespace, model_id: str) -> dict:
    """Write metrics tables, figures and the summary of the trajectories at one layer."""
    from cliffkit.cliff import group_summary, layer_tail_matrix, metrics_frame, tail_frame, thinking_frame
    from cliffkit.plots import (plot_cliff_distribution, plot_layer_heatmap, plot_trajectories, save_figure)

    metrics = metrics_frame(trajectories, layer, exclude_last=args.exclude_last)
    metrics.to_csv(out / "metrics.csv", index=False)
    summaries = {by: group_summary(metrics, by) for by in ("outcome", "source", "category", "model_id")}
    for by, table in summaries.items():
        table.to_csv(out / f"metrics_by_{by}.csv", index=False)
    # NOTE: the final score of a train-split trace is in-sample, because the probe was fitted at that
    # position, so the held-out summary uses validation and test prompts only.
    held_out = metrics[metrics["split"].isin(["val", "test"])]
    held_out_summary = group_summary(held_out, "outcome") if len(held_out) else None

    curves = tail_frame(trajectories, layer, "outcome", max_distance=args.max_distance, n_boot=args.n_boot,
                        seed=args.seed)
    curves.to_csv(out / "trajectory_by_outcome.csv", index=False)
    save_figure(plot_trajectories(curves, title=f"Refusal score before the answer, layer {layer} ({model_id})"),
                out / "trajectory.png")
    thinking = thinking_frame(trajectories, layer, "outcome", n_boot=args.n_boot, seed=args.seed)
    thinking.to_csv(out / "trajectory_thinking_axis.csv", index=False)
    save_figure(plot_trajectories(thinking, title=f"Refusal score over the thinking, layer {layer}"),
                out / "trajectory_thinking.png")
    save_figure(plot_cliff_distribution(metrics, "outcome", "cliff",
                                        title=f"Cliff size (plateau − final), layer {layer}"),
                out / "cliff_distribution.png")

    heatmaps = {}
    for outcome in sorted(trajectories.meta["outcome"].unique()):
        rows = trajectories.meta.index[trajectories.meta["outcome"] == outcome].to_numpy()
        matrix, count = layer_tail_matrix(trajectories, rows, max_distance=args.max_distance)
        name = f"heatmap_{outcome.replace(' ', '_')}.png"
        save_figure(plot_layer_heatmap(matrix, trajectories.layers,
                                       title=f"Refusal score by layer and position: {outcome} (n={len(rows)}), "
                                             "one probe per layer"), out / name)
        heatmaps[outcome] = {"file": name, "final_by_layer": dict(zip(trajectories.layers, matrix[:, 0]))}

    tail_points = curves[curves["distance"].isin(SUMMARY_DISTANCES)]
    summary = {
        "model_id": model_id, "layer": layer, "task": trajectories.task, "n_traces": len(trajectories),
        "closed_by": dict(Counter(trajectories.meta["closed_by"])),
        "metric_rules": {
            "plateau": f"mean over the thinking without its last {args.exclude_last} tokens",
            "final": "score at the last position (closing think marker)",
            "cliff": "plateau - final", "max_drop": "max over the thinking - final",
            "drop_start": "distance from the end of the first position from which every score stays below "
                          "(plateau + final) / 2; NaN when there is no drop"},
        "by_outcome": summaries["outcome"].to_dict(orient="records"),
        "by_outcome_held_out": None if held_out_summary is None else held_out_summary.to_dict(orient="records"),
        "by_source": summaries["source"].to_dict(orient="records"),
        "tail_means": tail_points.to_dict(orient="records"),
        "heatmaps": heatmaps,
        "note": "Scores of traces in the probe's train split are in-sample at the last position; "
                "by_outcome_held_out uses only validation and test prompts.",
    }
    _write_json(out / "summary.json", summary)
    return summary


def _print_cliff_summary(summary: dict[str, Any]) -> None:
    print(f"Cliff at layer {summary['layer']} ({summary['task']} probe), {summary['n_traces']} traces, "
          f"closed by {summary['closed_by']}:")
    for row in summary["by_outcome"]:
        print(f"    {row['outcome']:>9} (n={row['n']:>3}): plateau {row['plateau_mean']:.3f}, final "
              f"{row['final_mean']:.3f}, cliff {row['cliff_mean']:+.3f} (median {row['cliff_median']:+.3f}), "
              f"max drop {row['max_drop_mean']:+.3f}, drop start {row['drop_start_median']:.1f} tokens before "
              "the end (median)")
