"""Command `distil-thinker`: rebuild the thinker adapter that gives the embedded model a think format."""

from __future__ import annotations

import argparse
import json
import logging

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Rebuild the LoRA adapter behind cliffkit/qwen2.5-coder-0.5b-think in four resumable stages:
(1) the embedded instruct model writes thinking data from safe TRAIN prompts only:
arithmetic problems (rejection sampling, only traces that reach the gold answer) and
benign instructions (a plan, then the answer); (2) LoRA SFT on
<think> thinking </think> answer, with the loss on the assistant part only;
(3) evaluation of the instruct model (scaffold family) and the thinker on held-out TEST
prompts: format following, arithmetic accuracy, refusal rate and ASR (KeywordJudge);
(4) the adapter is copied to --out with training.json, data_sha256.txt and PROVENANCE.md.
Rerun the same command after an interruption to resume.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distil-thinker", help="rebuild the thinker adapter: thinking data, LoRA SFT, evaluation.",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: cliffkit distil-thinker --run-dir runs/thinker --out cliffkit/adapters/thinker "
               "--seed 0 --examples 192",
    )
    parser.add_argument("--run-dir", default="runs/thinker",
                        help="run folder for data, checkpoints, traces and timings (default: runs/thinker).")
    parser.add_argument("--out", default=None,
                        help="folder to write the finished adapter to (default: the adapter folder "
                             "inside the installed package, cliffkit/adapters/thinker).")
    parser.add_argument("--seed", type=int, default=0, help="seed of data sampling and training (default: 0).")
    parser.add_argument("--examples", type=int, default=192,
                        help="training examples, half arithmetic and half benign (default: 192).")
    parser.add_argument("--train-dtype", default="bfloat16",
                        help="dtype of the frozen base weights during data generation and training; "
                             "LoRA weights stay float32 (default: bfloat16).")
    parser.add_argument("--skip-eval", action="store_true", help="train and ship without the before/after evaluation.")
    parser.set_defaults(handler=cmd_distil_thinker)


def cmd_distil_thinker(args: argparse.Namespace) -> int:
    from cliffkit.distil import results_table, run_distillation
    from cliffkit.models import EMBEDDED_THINKER, embedded_adapter_path

    if args.examples < 2:
        raise ValueError(f"--examples must be at least 2 (one arithmetic, one benign), got {args.examples}.")
    out = args.out or str(embedded_adapter_path(EMBEDDED_THINKER))
    record = run_distillation(args.run_dir, out, seed=args.seed, examples=args.examples,
                              evaluate=not args.skip_eval, train_dtype=args.train_dtype)

    print(json.dumps({"adapter": out, "data_sha256": record["data"]["sha256"],
                      "first_loss": record["losses"][0], "last_loss": record["losses"][-1],
                      "timings": record["timings"]}, indent=2))
    if record["evaluation"]:
        print(results_table(record["evaluation"]))
    return 0
