"""The `cliffkit` command line.

Each module in `cliffkit.commands` adds its own subcommands through a
`register(subparsers)` function and sets `handler` on its parser, so a new
command is one new file. Shared options live here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Sequence

import cliffkit.commands

logger = logging.getLogger("cliffkit")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add --model, --family, --dtype and --device."""
    from cliffkit.models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"Hugging Face id, local folder or embedded name (default: {DEFAULT_MODEL}).")
    parser.add_argument("--family", default=None,
                        help="model family from cliffkit.families (default: detected from the id and config).")
    parser.add_argument("--dtype", default="auto",
                        help="auto, float32, bfloat16 or float16 (default: auto = bfloat16, or float16 on old GPUs).")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto).")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """Add the budget and sampling options of `GenerationSettings`."""
    parser.add_argument("--think-budget", type=int, default=256,
                        help="maximum new tokens of thinking before budget forcing closes it (default: 256).")
    parser.add_argument("--answer-budget", type=int, default=128,
                        help="maximum new tokens of answer (default: 128).")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 means greedy decoding (default: 0).")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0).")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default: 8).")
    parser.add_argument("--seed", type=int, default=0, help="seed; batch i uses seed + i (default: 0).")


def settings_from_args(args: argparse.Namespace):
    """Build `GenerationSettings` from the options of `add_generation_options`."""
    from cliffkit.generate import GenerationSettings

    return GenerationSettings(think_budget=args.think_budget, answer_budget=args.answer_budget,
                              temperature=args.temperature, top_p=args.top_p,
                              batch_size=args.batch_size, seed=args.seed)


def split_list(value: str | None) -> list[str] | None:
    """Split a comma-separated option into stripped items; None for an empty value."""
    return [item.strip() for item in value.split(",") if item.strip()] if value else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cliffkit", description="Study the refusal cliff in reasoning models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_info in sorted(pkgutil.iter_modules(cliffkit.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"cliffkit.commands.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # Library errors already say what failed and what to do; a traceback adds nothing.
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
