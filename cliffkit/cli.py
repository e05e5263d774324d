"""The `cliffkit` command line: generate, judge, info and the quick sample pipeline."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("cliffkit")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from cliffkit.models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"Hugging Face id, local folder or embedded name (default: {DEFAULT_MODEL}).")
    parser.add_argument("--family", default=None,
                        help="model family from cliffkit.families (default: detected from the id and config).")
    parser.add_argument("--dtype", default="auto",
                        help="auto, float32, bfloat16 or float16 (default: auto = bfloat16, or float16 on old GPUs).")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto).")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--think-budget", type=int, default=256,
                        help="maximum new tokens of thinking before budget forcing closes it (default: 256).")
    parser.add_argument("--answer-budget", type=int, default=128,
                        help="maximum new tokens of answer (default: 128).")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 means greedy decoding (default: 0).")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0).")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default: 8).")
    parser.add_argument("--seed", type=int, default=0, help="seed; batch i uses seed + i (default: 0).")


def _add_prompt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sources", default="harmbench,benign",
                        help="comma-separated prompt sources (default: harmbench,benign). "
                             "See `cliffkit info` for the list.")
    parser.add_argument("--categories", default=None, help="comma-separated categories to keep (default: all).")
    parser.add_argument("--split", default="test", help="train, val or test (default: test).")
    parser.add_argument("--per-source", type=int, default=None,
                        help="number of prompts drawn from each source, seeded (default: all).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cliffkit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="show the model, device, family and cache paths.")
    _add_model_options(info)
    info.add_argument("--load", action="store_true", help="also load the model (converts the embedded one if needed).")

    generate = commands.add_parser("generate", help="generate reasoning traces into a JSON Lines file.")
    _add_model_options(generate)
    _add_prompt_options(generate)
    _add_generation_options(generate)
    generate.add_argument("--out", required=True, help="trace file to write or resume (JSON Lines).")

    judge = commands.add_parser("judge", help="label traces refused/complied and print rates.")
    judge.add_argument("traces", help="trace file written by `cliffkit generate`.")
    judge.add_argument("--by", default="source", help="comma-separated grouping columns (default: source).")
    judge.add_argument("--max-chars", type=int, default=None,
                       help="characters of each answer the keyword judge reads (default: the judge's own).")

    sample = commands.add_parser("sample", help="generate and judge a small sample: the quick main job.")
    _add_model_options(sample)
    _add_generation_options(sample)
    sample.add_argument("--sources", default="harmbench,advbench,strongreject,benign,overrefusal",
                        help="comma-separated prompt sources (default: all harmful and benign sources).")
    sample.add_argument("--per-source", type=int, default=8, help="prompts per source (default: 8).")
    sample.add_argument("--run-dir", default="runs/sample", help="run folder (default: runs/sample).")
    return parser


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
        "embedded_model": str(converted_path()),
        "embedded_converted": is_converted(),
        "prompt_sources": list_sources(),
    }
    if args.load:
        from cliffkit.models import load_model

        lm = load_model(args.model, family=args.family, dtype=args.dtype, device=args.device)
        facts.update(family=lm.family.name, think_open=lm.family.think_open, think_close=lm.family.think_close,
                     layers=lm.model.config.num_hidden_layers, parameters=sum(p.numel() for p in lm.model.parameters()))
    print(json.dumps(facts, indent=2))
    return 0


def _settings(args: argparse.Namespace):
    from cliffkit.generate import GenerationSettings

    return GenerationSettings(think_budget=args.think_budget, answer_budget=args.answer_budget,
                              temperature=args.temperature, top_p=args.top_p,
                              batch_size=args.batch_size, seed=args.seed)


def _split_list(value: str | None) -> list[str] | None:
    return [item.strip() for item in value.split(",") if item.strip()] if value else None


def cmd_generate(args: argparse.Namespace) -> int:
    from cliffkit.datasets import load_prompts
    from cliffkit.generate import generate_traces
    from cliffkit.models import load_model

    settings = _settings(args)
    prompts = []
    for source in _split_list(args.sources) or []:
        prompts += load_prompts([source], categories=_split_list(args.categories), splits=[args.split],
                                limit=args.per_source, seed=args.seed)
    lm = load_model(args.model, family=args.family, dtype=args.dtype, device=args.device)
    generate_traces(lm, prompts, settings, out=args.out)
    logger.info("Traces are in %s", args.out)
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from cliffkit.judge import KeywordJudge, judge_traces, refusal_report
    from cliffkit.traces import read_traces, write_traces_atomic

    traces = read_traces(args.traces)
    judge = KeywordJudge(max_chars=args.max_chars) if args.max_chars else KeywordJudge()
    judged = judge_traces(traces, judge)
    write_traces_atomic(args.traces, judged)
    report = refusal_report(judged, by=tuple(_split_list(args.by) or ["source"]))
    print(report.to_string(index=False))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from cliffkit.datasets import load_prompts
    from cliffkit.generate import generate_traces
    from cliffkit.judge import judge_traces, refusal_report
    from cliffkit.models import load_model
    from cliffkit.traces import read_traces, write_traces_atomic

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "traces.jsonl"

    prompts = []
    for source in _split_list(args.sources) or []:
        prompts += load_prompts([source], splits=["test"], limit=args.per_source, seed=args.seed)
    lm = load_model(args.model, family=args.family, dtype=args.dtype, device=args.device)
    generate_traces(lm, prompts, _settings(args), out=out)

    judged = judge_traces(read_traces(out))
    write_traces_atomic(out, judged)
    report = refusal_report(judged, by=("source",))
    report.to_csv(run_dir / "refusal_by_source.csv", index=False)
    closed = sum(trace.closed_by == "model" for trace in judged)
    print(f"Model {lm.model_id} ({lm.family.name}), {len(judged)} traces; the model closed its "
          f"think block itself in {closed} of them.")
    print(report.to_string(index=False))
    print(f"Traces: {out}\nReport: {run_dir / 'refusal_by_source.csv'}")
    return 0


COMMANDS = {"info": cmd_info, "generate": cmd_generate, "judge": cmd_judge, "sample": cmd_sample}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
