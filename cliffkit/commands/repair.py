"""Commands `cliffkit select` (Cliff-as-a-Judge and baselines), `cliffkit repair` (LoRA SFT) and `cliffkit evaluate`."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from cliffkit.cli import add_generation_options, add_model_options, settings_from_args, split_list

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    from cliffkit.pool import POOL_SCHEMA_HELP

    select = subparsers.add_parser(
        "select", help="build or read a safety pool, score it with the refusal probe, and write the "
                       "Cliff-as-a-Judge selection and its baselines.",
        description="Writes <run-dir>/pool/ (when the pool is built here) and <run-dir>/select/. "
                    f"A pool file given with --pool has {POOL_SCHEMA_HELP}")
    add_model_options(select)
    add_generation_options(select)
    select.add_argument("--run-dir", required=True, help="run folder that receives every artifact.")
    select.add_argument("--pool", default=None,
                        help="safety pool as JSON Lines (default: build one from the harmful train prompts, "
                             "with responses the model writes under a safety system prompt).")
    select.add_argument("--per-source", type=int, default=32,
                        help="harmful train prompts per source when the pool is built here (default: 32).")
    select.add_argument("--sources", default="harmbench,advbench,strongreject",
                        help="comma-separated harmful sources of a built pool (default: all three).")
    select.add_argument("--categories", default=None, help="comma-separated categories of a built pool (default: all).")
    select.add_argument("--pool-think-budget", type=int, default=None,
                        help="thinking tokens of the safe responses of a built pool (default: --think-budget).")
    select.add_argument("--pool-answer-budget", type=int, default=None,
                        help="answer tokens of the safe responses of a built pool (default: --answer-budget).")
    select.add_argument("--prefill", choices=("auto", "on", "off"), default="auto",
                        help="build the pool from responses that continue fixed openings of the thinking "
                             "('This request could cause harm, because') and the answer ('I'm sorry, but I "
                             "can't help with that'): 'auto' does so for prompted instruct models (the scaffold "
                             "family) and for models that ignore the safety system prompt, such as the "
                             "default thinker (default: auto).")
    select.add_argument("--probe", default=None,
                        help="refusal probe saved by cliffkit.probe (path of its .npz); without it only the "
                             "random, keyword-rule and full-pool selections are written.")
    count = select.add_mutually_exclusive_group(required=True)
    count.add_argument("--k", type=int, help="number of examples to select.")
    count.add_argument("--percent", type=float, help="share of the pool to select, in percent, in (0, 100].")
    select.add_argument("--by", choices=("final", "cliff"), default="final",
                        help="Cliff-as-a-Judge ranking: lowest final refusal score first (as the authors' "
                             "selection script) or largest cliff, plateau minus final (as the abstract) "
                             "(default: final).")
    select.add_argument("--random-seeds", default="0,1,2",
                        help="comma-separated seeds of the random baselines (default: 0,1,2).")
    select.add_argument("--exclude-last", type=int, default=8,
                        help="thinking tokens left out of the plateau at its end (default: 8).")
    select.set_defaults(handler=cmd_select)

    repair = subparsers.add_parser(
        "repair", help="fine-tune a LoRA repair adapter on selected safe responses (thinking + refusal).",
        description="Writes <run-dir>/repairs/<name>/ with adapter/, checkpoint/ and repair.json. "
                    "A rerun resumes an interrupted training run.")
    add_model_options(repair)
    repair.add_argument("--run-dir", required=True, help="run folder; the adapter goes to <run-dir>/repairs/<name>/.")
    repair.add_argument("--train", required=True,
                        help=f"training examples: a selection written by `cliffkit select` or any pool file with "
                             f"{POOL_SCHEMA_HELP}")
    repair.add_argument("--name", default=None, help="adapter name (default: the file name of --train).")
    repair.add_argument("--epochs", type=int, default=3, help="passes over the examples (default: 3).")
    repair.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: 2e-4).")
    repair.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8); alpha is twice the rank.")
    repair.add_argument("--grad-accum", type=int, default=4,
                        help="examples per optimizer step (default: 4).")
    repair.add_argument("--lora-layers", default="upper",
                        help="decoder blocks that get LoRA: 'upper' (the upper half, which also spares the "
                             "backward pass through the lower half), 'all', or comma-separated indices "
                             "(default: upper).")
    repair.add_argument("--max-length", type=int, default=512,
                        help="maximum example length in tokens; longer ones are dropped with a warning (default: 512).")
    repair.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many optimizer steps, leaving a checkpoint to resume (default: run "
                             "to the end).")
    repair.set_defaults(handler=cmd_repair)

    evaluate = subparsers.add_parser(
        "evaluate", help="measure ASR, over-refusal, benign refusal and arithmetic accuracy of a model or a repair.",
        description="Writes <run-dir>/eval/<method>/ (resumable trace files per group, report.csv, result.json) "
                    "and rebuilds <run-dir>/results.csv and results.json from every evaluation in the run.")
    add_model_options(evaluate)
    evaluate.add_argument("--run-dir", required=True, help="run folder that receives every artifact.")
    evaluate.add_argument("--repair", default=None,
                          help="repair folder written by `cliffkit repair`; its base model is loaded "
                               "(default: evaluate --model without repair).")
    evaluate.add_argument("--method", default=None,
                          help="row label (default: from the repair's selection, or 'no repair').")
    evaluate.add_argument("--probe", default=None,
                          help="refusal probe (.npz) for the final score and cliff on harmful traces (default: none).")
    evaluate.add_argument("--harmful-per-source", type=int, default=8,
                          help="held-out harmful prompts per source (default: 8).")
    evaluate.add_argument("--harmful-sources", default="harmbench,advbench,strongreject",
                          help="comma-separated harmful sources (default: all three).")
    evaluate.add_argument("--overrefusal", type=int, default=8, help="over-refusal probes (default: 8).")
    evaluate.add_argument("--benign", type=int, default=8, help="benign prompts (default: 8).")
    evaluate.add_argument("--arithmetic", type=int, default=16, help="arithmetic problems (default: 16).")
    evaluate.add_argument("--split", default="test", choices=("val", "test"), help="held-out split (default: test).")
    evaluate.add_argument("--think-budget", type=int, default=128,
                          help="thinking tokens for refusal prompts (default: 128).")
    evaluate.add_argument("--answer-budget", type=int, default=64,
                          help="answer tokens for refusal prompts (default: 64).")
    evaluate.add_argument("--arithmetic-think-budget", type=int, default=256,
                          help="thinking tokens for arithmetic problems (default: 256).")
    evaluate.add_argument("--arithmetic-answer-budget", type=int, default=32,
                          help="answer tokens for arithmetic problems (default: 32).")
    evaluate.add_argument("--batch-size", type=int, default=32,
                          help="prompts per generation batch; large batches cost less CPU time per trace "
                               "(default: 32).")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the prompt sample and batches (default: 0).")
    evaluate.set_defaults(handler=cmd_evaluate)


# --------------------------------------------------------------------------- select

def cmd_select(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cliffkit.models import load_model
    from cliffkit.pool import ResponsePrefill, build_pool, default_prefill, read_pool, training_prompts
    from cliffkit.probe import LinearProbe
    from cliffkit.select import (natural_traces, resolve_count, score_pool, select_full, select_random, select_rule,
                                 select_top, write_selection)

    run_dir = Path(args.run_dir)
    seeds = [int(seed) for seed in split_list(args.random_seeds) or []]
    probe = LinearProbe.load(args.probe) if args.probe else None
    settings = settings_from_args(args)
    lm = load_model(args.model, family=args.family, dtype=args.dtype, device=args.device)
    if probe is not None and probe.model_id and probe.model_id != lm.model_id:
        raise ValueError(f"the probe {args.probe} was fitted on {probe.model_id!r}, not on --model {lm.model_id!r}. "
                         "Fit a probe on this model's traces (`cliffkit probe`).")

    if args.pool:
        pool = read_pool(args.pool)
    else:
        prompts = training_prompts(split_list(args.sources) or [], per_source=args.per_source,
                                   categories=split_list(args.categories), seed=args.seed)
        prefill = {"on": ResponsePrefill(), "off": None}.get(args.prefill, default_prefill(lm.family))
        pool_settings = replace(settings, think_budget=args.pool_think_budget or settings.think_budget,
                                answer_budget=args.pool_answer_budget or settings.answer_budget)
        pool = build_pool(lm, prompts, run_dir / "pool", pool_settings,
                          prefill=prefill).examples
        if not pool:
            raise RuntimeError(f"none of the model's responses to {len(prompts)} pool prompts is a usable refusal "
                               f"(see {run_dir / 'pool' / 'pool_summary.json'}), so the pool is empty. Raise "
                               "--think-budget, pass --prefill on, or supply a pool with --pool.")
    count = resolve_count(len(pool), args.k, args.percent)

    out = run_dir / "select"
    traces = natural_traces(lm, pool, out / "natural_traces.jsonl", settings)
    written = {}
    if probe is not None:
        scores = score_pool(lm, traces, probe, exclude_last=args.exclude_last)
    else:
        import pandas as pd

        logger.warning("no --probe: writing only the random, keyword-rule and full-pool selections")
        scores = pd.DataFrame([{"id": t.prompt_id, "source": t.source, "category": t.category,
                                "refused": t.labels.get("refused"), "closed_by": t.closed_by} for t in traces])
    scores.to_csv(out / "scores.csv", index=False)

    base = {"pool_size": len(pool), "k": count, "percent": args.percent, "model_id": lm.model_id}
    if probe is not None:
        name = f"cliff-{args.by}-k{count}"
        written[name] = write_selection(select_top(scores, k=count, by=args.by), pool, out, name,
                                        {**base, "method": f"cliff ({args.by})", "by": args.by,
                                         "probe": str(args.probe), "layer": probe.layer})
    for seed in seeds:
        name = f"random-s{seed}-k{count}"
        written[name] = write_selection(select_random(scores, k=count, seed=seed), pool, out, name,
                                        {**base, "method": f"random (seed {seed})", "seed": seed})
    rule = select_rule(scores, k=count, seed=args.seed)
    name = f"rule-k{count}"
    written[name] = write_selection(rule, pool, out, name, {**base, "k": len(rule), "method": "keyword rule",
                                                            "candidates": len(select_rule(scores))})
    written["full"] = write_selection(select_full(scores), pool, out, "full",
                                      {**base, "k": len(pool), "percent": 100.0, "method": "full pool"})

    summary = {"pool_size": len(pool), "k": count, "by": args.by, "natural_refused": _count_labels(traces),
               "selections": {name: str(path) for name, path in written.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"Pool of {len(pool)} examples; the model's own answers: {summary['natural_refused']}.")
    for name, path in written.items():
        print(f"  {name}: {path}")
    return 0


def _count_labels(traces) -> dict[str, int]:
    from collections import Counter

    names = {True: "refused", False: "complied", None: "no answer"}
    return dict(Counter(names[trace.labels.get("refused")] for trace in traces))


# --------------------------------------------------------------------------- repair

def cmd_repair(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cliffkit.models import load_model
    from cliffkit.pool import read_pool
    from cliffkit.repair import DEFAULT_REPAIR_CONFIG, repair

    train_path = Path(args.train)
    examples = read_pool(train_path)
    name = args.name or train_path.stem
    _check_name(name)
    info_path = train_path.with_suffix(".json")
    selection = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    selection.pop("ids", None)

    lm = load_model(args.model, family=args.family, dtype=args.dtype, device=args.device)
    config = replace(DEFAULT_REPAIR_CONFIG, epochs=args.epochs, learning_rate=args.lr, rank=args.rank,
                     alpha=2.0 * args.rank, grad_accum=args.grad_accum, max_length=args.max_length,
                     layers=_lora_layers(args.lora_layers, lm))
    result = repair(lm, examples, Path(args.run_dir) / "repairs" / name, config, name=name, selection=selection,
                    stop_after=args.stop_after)
    print(f"Repair {result.model_id}: {len(result.record['examples'])} examples, {len(result.losses)} steps, "
          f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}.\nAdapter: {result.adapter_dir}")
    return 0


def _lora_layers(value: str, lm) -> tuple[int, ...] | None:
    from cliffkit.repair import upper_half_layers

    if value == "all":
        return None
    if value == "upper":
        return upper_half_layers(lm)
    try:
        return tuple(int(item) for item in split_list(value) or [])
    except ValueError:
        raise ValueError(f"--lora-layers must be 'upper', 'all' or comma-separated integers, got {value!r}.") from None


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"invalid name {name!r}: use letters, digits, '.', '_' and '-' only, since it names a folder.")


# --------------------------------------------------------------------------- evaluate

def cmd_evaluate(args: argparse.Namespace) -> int:
    from cliffkit.evaluate import EvalConfig, collect_results, evaluate_model, write_results_table
    from cliffkit.models import load_model
    from cliffkit.probe import LinearProbe
    from cliffkit.repair import load_repaired, read_repair_record

    config = EvalConfig(harmful_sources=tuple(split_list(args.harmful_sources) or ()),
                        harmful_per_source=args.harmful_per_source, overrefusal=args.overrefusal,
                        benign=args.benign, arithmetic=args.arithmetic, split=args.split,
                        think_budget=args.think_budget, answer_budget=args.answer_budget,
                        arithmetic_think_budget=args.arithmetic_think_budget,
                        arithmetic_answer_budget=args.arithmetic_answer_budget, batch_size=args.batch_size,
                        seed=args.seed)
    probe = LinearProbe.load(args.probe) if args.probe else None

    k = pool_size = None
    if args.repair:
        record = read_repair_record(args.repair)
        lm = load_repaired(args.repair, dtype=args.dtype, device=args.device)
        selection = record.get("selection", {})
        method = args.method or selection.get("method") or record["name"]
        k, pool_size = len(record["examples"]), selection.get("pool_size")
        folder = record["name"]
    else:
        lm = load_model(args.model, family=args.family, dtype=args.dtype, device=args.device)
        method = args.method or "no repair"
        folder = re.sub(r"[^A-Za-z0-9._-]+", "-", method).strip("-") or "model"

    run_dir = Path(args.run_dir)
    result = evaluate_model(lm, config, run_dir / "eval" / folder, method=method, k=k, pool_size=pool_size,
                            probe=probe)
    table = collect_results(run_dir / "eval")
    csv_path, _ = write_results_table(table, run_dir)
    print(json.dumps({key: value for key, value in result.row.items() if value is not None}, indent=2, default=str))
    print(f"Results table of the run: {csv_path}")
    return 0
