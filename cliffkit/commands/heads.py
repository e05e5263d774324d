"""Commands for attention heads: `cliffkit heads` (attribution and causal scans) and `cliffkit ablate` (sweep)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from cliffkit.cli import add_generation_options, add_model_options, settings_from_args, split_list

logger = logging.getLogger(__name__)

METHODS = ("attribution", "exact-last", "exact-all", "patching-last", "patching-all")
SUBSETS = ("harmful", "complied", "refused", "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    heads = subparsers.add_parser(
        "heads", help="rank attention heads by direct attribution and causal scans against a refusal direction.")
    add_model_options(heads)
    heads.add_argument("traces", help="judged trace file (JSON Lines) from `cliffkit generate` + `cliffkit judge`.")
    heads.add_argument("--run-dir", required=True, help="run folder; results go to <run-dir>/heads/.")
    heads.add_argument("--direction", default="mean-diff",
                       help="'mean-diff' (refused minus complied traces, computed here), a probe .npz saved by "
                            "cliffkit.probe, or a .npy vector of d_model floats (default: mean-diff).")
    heads.add_argument("--layer", type=int, default=None,
                       help="decoder block whose output the direction reads (default: the probe's layer, "
                            "or the last block for mean-diff).")
    heads.add_argument("--intercept", type=float, default=None,
                       help="probe intercept for a .npy direction (default: 0; a probe or mean-diff sets its own).")
    heads.add_argument("--contrast", choices=("harmful", "all"), default="harmful",
                       help="mean-diff classes: refused vs complied among harmful prompts, or among all "
                            "prompts (default: harmful).")
    heads.add_argument("--subset", choices=SUBSETS, default="harmful",
                       help="traces to scan: harmful prompts, harmful-complied, harmful-refused, or all "
                            "(default: harmful).")
    heads.add_argument("--limit", type=int, default=None, help="scan at most this many traces (default: all).")
    heads.add_argument("--exact-all-limit", type=int, default=None,
                       help="scan at most this many of those traces with exact-all, the costliest method "
                            "(default: all of them).")
    heads.add_argument("--methods", default=",".join(METHODS),
                       help=f"comma-separated methods out of {', '.join(METHODS)} (default: all of them).")
    heads.add_argument("--ablation", choices=("zero", "mean"), default="zero",
                       help="ablation for the causal scans; mean uses each head's mean output over the "
                            "scanned traces (default: zero).")
    heads.add_argument("--rank-by", default="attribution",
                       help="column the table is sorted by, e.g. attribution or exact_all (default: attribution).")
    heads.add_argument("--batch-size", type=int, default=4, help="traces per forward pass (default: 4).")
    heads.set_defaults(handler=cmd_heads)

    ablate = subparsers.add_parser(
        "ablate", help="ablate the top suppression heads and random heads; measure refusal, ASR and probe scores.")
    add_model_options(ablate)
    add_generation_options(ablate)
    ablate.add_argument("--run-dir", required=True, help="run folder holding heads/ from `cliffkit heads`.")
    ablate.add_argument("--out-dir", default=None,
                        help="folder for the sweep's traces, results and plots (default: <run-dir>/ablation); "
                             "give each ranking its own folder, since a rerun resumes the settings found there.")
    ablate.add_argument("--rank-by", default="attribution",
                        help="head-table column that picks the top heads (default: attribution).")
    ablate.add_argument("--fractions", default="0.005,0.01,0.03,0.05,0.1",
                        help="comma-separated shares of all heads to ablate (default: 0.005,0.01,0.03,0.05,0.1).")
    ablate.add_argument("--seeds", default="0,1,2", help="seeds of the random-head controls (default: 0,1,2).")
    ablate.add_argument("--harmful-sources", default="harmbench,advbench,strongreject",
                        help="held-out harmful prompt sources (default: harmbench,advbench,strongreject).")
    ablate.add_argument("--benign-sources", default="benign,overrefusal",
                        help="benign prompt sources for compliance (default: benign,overrefusal).")
    ablate.add_argument("--split", default="test", help="prompt split to evaluate on (default: test).")
    ablate.add_argument("--per-source", type=int, default=8, help="prompts per harmful source (default: 8).")
    ablate.add_argument("--benign-per-source", type=int, default=8, help="prompts per benign source (default: 8).")
    ablate.add_argument("--positions", default="all",
                        help="'all' ablates every position; an integer k ablates the last k positions of "
                             "each forward call (default: all).")
    ablate.add_argument("--reference-limit", type=int, default=None,
                        help="harmful traces of the heads run whose probe score is read under every setting "
                             "(default: all of them).")
    ablate.add_argument("--trajectory-fraction", type=float, default=0.03,
                        help="share of heads ablated in the trajectory plot (default: 0.03).")
    ablate.set_defaults(handler=cmd_ablate)


# --------------------------------------------------------------------------- cliffkit heads

def cmd_heads(args: argparse.Namespace) -> int:
    from cliffkit.heads.ablation import Ablation, head_means
    from cliffkit.heads.inputs import trace_token_ids
    from cliffkit.heads.layout import model_heads
    from cliffkit.models import load_model
    from cliffkit.traces import read_traces

    methods = _parse_methods(args.methods)
    out_dir = Path(args.run_dir) / "heads"
    out_dir.mkdir(parents=True, exist_ok=True)

    traces = read_traces(args.traces)
    lm = load_model(args.model, family=args.family, dtype=args.dtype, device=args.device)
    bound = model_heads(lm.model)
    direction = _resolve_direction(args, lm, traces, bound.n_layers, out_dir)
    direction.save(out_dir / "direction")

    scanned = _select_traces(traces, args.subset, args.limit)
    sequences = trace_token_ids(lm, scanned)
    logger.info("Scanning %d traces (subset %s) at layer %d: %d heads in blocks 0..%d", len(scanned), args.subset,
                direction.layer, (direction.layer + 1) * bound.n_heads, direction.layer)

    ablation = Ablation()
    if args.ablation == "mean" and any(method != "attribution" for method in methods):
        ablation = Ablation(mode="mean", means=head_means(lm, sequences, args.batch_size))

    results = {}
    for method in methods:
        chosen = scanned[: args.exact_all_limit] if method == "exact-all" else scanned
        context = _MethodContext(lm, direction, [trace.prompt_id for trace in chosen], args.ablation, ablation,
                                 args.batch_size)
        results[method] = _run_method(method, context, sequences[: len(chosen)], out_dir / "methods")

    _write_heads_outputs(args, lm, direction, scanned, results, out_dir)
    return 0


class _MethodContext:
    """Everything a method's result depends on, and the fingerprint that names it on disk."""

    def __init__(self, lm, direction, prompt_ids: list[str], ablation_name: str, ablation, batch_size: int):
        import hashlib

        self.lm, self.direction, self.ablation, self.batch_size = lm, direction, ablation, batch_size
        digest = hashlib.sha256()
        digest.update(direction.vector.float().numpy().tobytes())
        digest.update(json.dumps([lm.model_id, str(lm.dtype), direction.layer, direction.intercept, prompt_ids,
                                  ablation_name]).encode())
        self.fingerprint = digest.hexdigest()


def _run_method(method: str, context: _MethodContext, sequences: list, store: Path) -> dict:
    """Run one method, or load its stored result when the same inputs were scanned before.

    Returns a dict with "per_trace" (n_traces, layer + 1, n_heads), "clean_scores",
    "seconds" and, for attribution, "trajectory" and "count".
    """
    import numpy as np

    from cliffkit.heads.attribution import direct_attribution
    from cliffkit.heads.scans import head_effects

    meta_path, arrays_path = store / f"{method}.json", store / f"{method}.npz"
    if meta_path.exists() and arrays_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("fingerprint") == context.fingerprint:
            logger.info("%s: reusing the result stored in %s", method, arrays_path)
            with np.load(arrays_path, allow_pickle=False) as arrays:
                return {**{key: arrays[key] for key in arrays.files}, "seconds": meta["seconds"]}

    started = time.perf_counter()
    direction = context.direction
    if method == "attribution":
        # Every position, for the per-head trajectories; the last-position table is part of it.
        result = direct_attribution(context.lm, sequences, direction.vector, direction.layer, positions="all",
                                    batch_size=context.batch_size)
        arrays = {"per_trace": result.per_trace.numpy(), "clean_scores": np.zeros(0),
                  "trajectory": result.trajectory.numpy(), "count": result.trajectory_count.numpy()}
    else:
        kind, positions = method.split("-")
        result = head_effects(context.lm, sequences, direction.vector, direction.layer, method=kind,
                              positions=positions, intercept=direction.intercept, ablation=context.ablation,
                              batch_size=context.batch_size)
        arrays = {"per_trace": result.per_trace.numpy(), "clean_scores": result.clean_scores.numpy()}
    seconds = time.perf_counter() - started
    logger.info("%s took %.1f s", method, seconds)

    store.mkdir(parents=True, exist_ok=True)
    np.savez(arrays_path, **arrays)
    meta_path.write_text(json.dumps({"fingerprint": context.fingerprint, "seconds": seconds}), encoding="utf-8")
    return {**arrays, "seconds": seconds}


def _write_heads_outputs(args: argparse.Namespace, lm, direction, scanned, results: dict, out_dir: Path) -> None:
    import numpy as np
    import torch

    from cliffkit.heads.attribution import scores_frame
    from cliffkit.heads.plots import plot_head_heatmap, plot_head_trajectories
    from cliffkit.heads.table import merge_head_frames, rank_correlations, rank_heads, top_heads

    grids = {method.replace("-", "_"): torch.from_numpy(result["per_trace"]).mean(dim=0)
             for method, result in results.items()}
    table = merge_head_frames([scores_frame(grid, column) for column, grid in grids.items()])
    rank_by = args.rank_by if args.rank_by in table.columns else table.columns[2]
    ranked = rank_heads(table, rank_by)
    ranked.to_csv(out_dir / "heads.csv", index=False)
    correlations = rank_correlations(table)
    correlations.to_csv(out_dir / "rank_correlations.csv")
    plot_head_heatmap(grids, out_dir / "heatmap.png",
                      title=f"{lm.model_id}: heads vs direction at layer {direction.layer} "
                            "(attribution: negative = against; effects: positive = against)")

    if "attribution" in results:
        np.savez(out_dir / "attribution_trajectory.npz", trajectory=results["attribution"]["trajectory"],
                 count=results["attribution"]["count"])
        plot_head_trajectories(results["attribution"]["trajectory"], top_heads(table, "attribution", 5),
                               out_dir / "head_trajectories.png",
                               title="Direct projection of the top 5 heads by attribution, mean over traces")

    summary = {
        "model_id": lm.model_id, "dtype": str(lm.dtype), "layer": direction.layer, "direction": direction.source,
        "traces": len(scanned), "subset": args.subset, "ablation": args.ablation,
        "seconds": {method: result["seconds"] for method, result in results.items()},
        "traces_per_method": {method: len(result["per_trace"]) for method, result in results.items()},
        "mean_clean_score": {method: float(result["clean_scores"].mean()) for method, result in results.items()
                             if len(result["clean_scores"])},
        "top_heads": {column: top_heads(table, column, 10) for column in grids},
        "rank_correlations": json.loads(correlations.to_json()),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(ranked.head(15).to_string(index=False))
    print("\nSpearman rank correlations (signs aligned: higher = works more against the direction):")
    print(correlations.round(3).to_string())
    print(f"\nResults in {out_dir}")


def _parse_methods(value: str) -> list[str]:
    methods = split_list(value) or []
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise ValueError(f"Unknown methods {unknown or value!r}. Choose from {', '.join(METHODS)}.")
    return methods


def _resolve_direction(args: argparse.Namespace, lm, traces, n_layers: int, out_dir: Path):
    from cliffkit.heads.directions import Direction, mean_difference_from_traces, read_direction_file

    traces_path = str(Path(args.traces).resolve())
    if args.direction != "mean-diff":
        direction = read_direction_file(args.direction, args.layer, args.intercept)
    else:
        layer = n_layers - 1 if args.layer is None else args.layer
        if not 0 <= layer < n_layers:
            raise ValueError(f"--layer {layer} is out of range: the model has decoder blocks 0..{n_layers - 1}.")
        stored = out_dir / "direction.json"
        if stored.exists():
            previous = Direction.load(out_dir / "direction")
            wanted = {"traces": traces_path, "contrast": args.contrast, "model_id": lm.model_id,
                      "dtype": str(lm.dtype)}
            if (previous.source == "mean-diff" and previous.layer == layer
                    and all(previous.meta.get(key) == value for key, value in wanted.items())):
                logger.info("Reusing the difference-of-means direction in %s", stored)
                return previous
        direction = mean_difference_from_traces(lm, traces, layer, args.contrast, args.batch_size)
    direction.meta.update(traces=traces_path, model_id=lm.model_id, dtype=str(lm.dtype))
    return direction


def _select_traces(traces, subset: str, limit: int | None):
    if subset == "all":
        chosen = list(traces)
    else:
        chosen = [trace for trace in traces if trace.harmful]
        if subset in ("complied", "refused"):
            if any("refused" not in trace.labels for trace in chosen):
                raise ValueError(f"--subset {subset} needs judged traces; run `cliffkit judge` on the trace file.")
            chosen = [trace for trace in chosen if trace.labels["refused"] is (subset == "refused")]
    if limit is not None:
        chosen = chosen[:limit]
    if not chosen:
        raise ValueError(f"No traces left with --subset {subset}; pick another subset or add traces.")
    return chosen


# --------------------------------------------------------------------------- cliffkit ablate

def cmd_ablate(args: argparse.Namespace) -> int:
    import pandas as pd

    from cliffkit.heads.directions import Direction
    from cliffkit.heads.evaluate import SweepProbe, heads_for_fraction, run_sweep, summarize_sweep, sweep_settings
    from cliffkit.heads.inputs import trace_token_ids
    from cliffkit.heads.layout import model_heads
    from cliffkit.heads.plots import plot_ablation_curve
    from cliffkit.heads.table import top_heads
    from cliffkit.models import load_model
    from cliffkit.traces import read_traces

    heads_dir = Path(args.run_dir) / "heads"
    table_path = heads_dir / "heads.csv"
    if not table_path.exists():
        raise FileNotFoundError(f"{table_path} not found. Run `cliffkit heads ... --run-dir {args.run_dir}` first.")
    table = pd.read_csv(table_path)
    if args.rank_by not in table.columns:
        raise ValueError(f"--rank-by {args.rank_by!r} is not a column of {table_path}; "
                         f"it has {', '.join(table.columns)}.")
    direction = Direction.load(heads_dir / "direction")
    positions = _parse_positions(args.positions)

    lm = load_model(args.model, family=args.family, dtype=args.dtype, device=args.device)
    bound = model_heads(lm.model)
    ranking = top_heads(table, args.rank_by, len(table))
    settings = sweep_settings(ranking, bound.n_total, _floats(args.fractions, "--fractions"),
                              [int(seed) for seed in split_list(args.seeds) or []])

    prompts = _eval_prompts(args)
    reference = [trace for trace in read_traces(direction.meta["traces"]) if trace.harmful][: args.reference_limit]
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.run_dir) / "ablation"
    probe = SweepProbe(direction.vector, direction.intercept, direction.layer)
    results = run_sweep(lm, settings, prompts, probe, settings_from_args(args), out_dir,
                        reference=trace_token_ids(lm, reference), positions=positions)

    results.drop(columns=["heads"]).to_csv(out_dir / "results.csv", index=False)
    summary = summarize_sweep(results)
    summary.to_csv(out_dir / "summary.csv", index=False)
    plot_ablation_curve(results, out_dir / "ablation_curve.png", metric="asr")
    plot_ablation_curve(results, out_dir / "score_curve.png", metric="score_fixed")
    k = heads_for_fraction(args.trajectory_fraction, bound.n_total)
    _plot_trajectories(lm, trace_token_ids(lm, reference), probe, ranking[:k], settings, k, positions,
                       out_dir / "trajectories.png")

    columns = [column for column in ("name", "k", "score_fixed", "score_fresh", "refusal_rate", "asr",
                                     "thinking_refusal_rate", "complied_benign", "complied_overrefusal")
               if column in results.columns]
    print(results[columns].to_string(index=False))
    print(f"\nResults in {out_dir}")
    return 0


def _floats(value: str, option: str) -> list[float]:
    try:
        return [float(item) for item in split_list(value) or []]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {value!r}.") from None


def _parse_positions(value: str) -> int | None:
    if value == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        raise ValueError(f"--positions takes 'all' or an integer k >= 1, got {value!r}.") from None
    if k < 1:
        raise ValueError(f"--positions k must be at least 1, got {k}.")
    return k


def _eval_prompts(args: argparse.Namespace) -> list:
    from cliffkit.datasets import load_prompts

    prompts = []
    for source in split_list(args.harmful_sources) or []:
        prompts += load_prompts([source], splits=[args.split], limit=args.per_source, seed=args.seed)
    for source in split_list(args.benign_sources) or []:
        prompts += load_prompts([source], splits=[args.split], limit=args.benign_per_source, seed=args.seed)
    if not prompts:
        raise ValueError("No evaluation prompts selected; check --harmful-sources, --benign-sources and --split.")
    return prompts


def _plot_trajectories(lm, sequences, probe, top, settings, k, positions, path: Path) -> None:
    from cliffkit.heads.ablation import ablate_heads
    from cliffkit.heads.plots import plot_trajectories
    from cliffkit.heads.scores import score_trajectories

    random_setting = next((setting for setting in settings if setting.kind == "random" and len(setting.heads) == k),
                          None)
    curves = {"no ablation": score_trajectories(lm, sequences, probe.direction, probe.layer, probe.intercept)}
    with ablate_heads(lm, top, positions=positions):
        curves[f"top {k} heads ablated"] = score_trajectories(lm, sequences, probe.direction, probe.layer,
                                                              probe.intercept)
    if random_setting is not None:
        with ablate_heads(lm, random_setting.heads, positions=positions):
            curves[f"{k} random heads ablated"] = score_trajectories(lm, sequences, probe.direction, probe.layer,
                                                                     probe.intercept)
    plot_trajectories(curves, path, title=f"Probe score at layer {probe.layer}, harmful reference traces")
