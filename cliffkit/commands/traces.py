"""Commands for traces: info, generate, judge, and the quick `sample` pipeline."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cliffkit.backends.cli import add_backend_options, engine_from_args
from cliffkit.cli import add_generation_options, add_model_options, settings_from_args, split_list

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    info = subparsers.add_parser("info", help="show the model, device, family and cache paths.")
    add_model_options(info)
    info.add_argument("--load", action="store_true",
                      help="also load the model (converts the embedded one on first use).")
    info.set_defaults(handler=cmd_info)

    generate = subparsers.add_parser("generate", help="generate reasoning traces into a JSON Lines file.")
    add_model_options(generate)
    generate.add_argument("--sources", default="harmbench,benign",
                          help="comma-separated prompt sources (default: harmbench,benign); "
                               "`cliffkit info` lists them.")
    generate.add_argument("--categories", default=None, help="comma-separated categories to keep (default: all).")
    generate.add_argument("--split", default="test", help="train, val or test (default: test).")
    generate.add_argument("--per-source", type=int, default=None,
                          help="prompts drawn from each source, seeded (default: all).")
    add_generation_options(generate)
    add_backend_options(generate)
    generate.add_argument("--out", required=True, help="trace file to write or resume (JSON Lines).")
    generate.set_defaults(handler=cmd_generate)

    judge = subparsers.add_parser("judge", help="label traces refused or complied, and print the rates.")
    judge.add_argument("traces", help="trace file written by `cliffkit generate`.")
    judge.add_argument("--by", default="source", help="comma-separated grouping columns (default: source).")
    judge.set_defaults(handler=cmd_judge)

    sample = subparsers.add_parser("sample", help="generate and judge a small sample: the quick main job.")
    add_model_options(sample)
    add_generation_options(sample)
    add_backend_options(sample)
    sample.add_argument("--sources", default="harmbench,advbench,strongreject,benign,overrefusal",
                        help="comma-separated prompt sources (default: every harmful and benign source).")
    sample.add_argument("--per-source", type=int, default=8, help="prompts per source (default: 8).")
    sample.add_argument("--run-dir", default="runs/sample", help="run folder (default: runs/sample).")
    sample.set_defaults(handler=cmd_sample)


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from cliffkit import __version__
    from cliffkit.datasets import list_sources
    from cliffkit.embedded import converted_path, is_converted
    from cliffkit.models import resolve_device, resolve_dtype
    from cliffkit.paths import cliffkit_home

    device = resolve_device(args.device)
    facts = {
        "cliffkit": __version__,
        "torch": torch.__version__,
        "model": args.model,
        "device": device,
        "dtype": str(resolve_dtype(args.dtype, device)).removeprefix("torch."),
        "cliffkit_home": str(cliffkit_home()),
        "embedded_model_folder": str(converted_path()),
        "embedded_model_converted": is_converted(),
        "prompt_sources": list_sources(),
    }
    if args.load:
        from cliffkit.models import load_model

        lm = load_model(args.model, family=args.family, dtype=args.dtype, device=args.device)
        facts.update(family=lm.family.name, think_open=lm.family.think_open, think_close=lm.family.think_close,
                     layers=lm.model.config.num_hidden_layers,
                     parameters=sum(p.numel() for p in lm.model.parameters()))
    print(json.dumps(facts, indent=2))
    return 0


def _load_prompts(sources: list[str], split: str, per_source: int | None, seed: int,
                  categories: list[str] | None = None) -> list:
    from cliffkit.datasets import load_prompts

    prompts = []
    for source in sources:
        prompts += load_prompts([source], categories=categories, splits=[split], limit=per_source, seed=seed)
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from cliffkit.generate import generate_traces

    settings = settings_from_args(args)
    prompts = _load_prompts(split_list(args.sources) or [], args.split, args.per_source, args.seed,
                            split_list(args.categories))
    engine = engine_from_args(args)
    generate_traces(engine, prompts, settings, out=args.out)
    logger.info("Traces are in %s", args.out)
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from cliffkit.judge import judge_traces, refusal_report
    from cliffkit.traces import read_traces, write_traces_atomic

    judged = judge_traces(read_traces(args.traces))
    write_traces_atomic(args.traces, judged)
    print(refusal_report(judged, by=tuple(split_list(args.by) or ["source"])).to_string(index=False))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from cliffkit.generate import generate_traces
    from cliffkit.judge import judge_traces, refusal_report
    from cliffkit.traces import read_traces, write_traces_atomic

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "traces.jsonl"

    prompts = _load_prompts(split_list(args.sources) or [], "test", args.per_source, args.seed)
    engine = engine_from_args(args)
    generate_traces(engine, prompts, settings_from_args(args), out=out)

    judged = judge_traces(read_traces(out))
    write_traces_atomic(out, judged)
    report = refusal_report(judged, by=("source",))
    report.to_csv(run_dir / "refusal_by_source.csv", index=False)

    closed = sum(trace.closed_by == "model" for trace in judged)
    print(f"Model {engine.model_id} (family {engine.family.name}): {len(judged)} traces; the model closed its "
          f"think block itself in {closed} of them, budget forcing closed the rest.")
    print(report.to_string(index=False))
    print(f"Traces: {out}\nReport: {run_dir / 'refusal_by_source.csv'}")
    return 0
