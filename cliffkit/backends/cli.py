"""Command-line options that choose the generation backend and how the model is spread over GPUs.

Commands that generate call `add_backend_options(parser)` next to the model options
and `engine_from_args(args)` in place of `load_model(...)`; the result goes straight
to `generate_traces`.
"""

from __future__ import annotations

import argparse
from typing import Any

from cliffkit.backends import BACKENDS, load_backend

# Tokens reserved for the rendered prompt when the vLLM context length is derived
# from the budgets; the prompts shipped with cliffkit are far shorter.
PROMPT_ALLOWANCE = 2048


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    """Add --backend, --device-map, --tensor-parallel-size, --gpu-memory-utilization and --max-model-len."""
    parser.add_argument("--backend", choices=BACKENDS, default="hf",
                        help="generation engine: hf (transformers, any device) or vllm (GPUs, needs "
                             "pip install 'cliffkit[gpu]') (default: hf).")
    parser.add_argument("--device-map", default=None,
                        help="hf backend only: 'auto' shards the model over all visible GPUs with "
                             "accelerate (default: the whole model on --device).")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="vllm backend only: number of GPUs each layer is split over (default: 1).")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="vllm backend only: share of each GPU's memory vLLM may reserve (default: 0.9).")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="vllm backend only: longest prompt plus generation in tokens (default: "
                             f"{PROMPT_ALLOWANCE} + think budget + answer budget).")


def engine_from_args(args: argparse.Namespace) -> Any:
    """Load the engine named by `--backend`: a `LoadedModel` for hf, a `VLLMBackend` for vllm.

    Needs the options of `cliffkit.cli.add_model_options`, `add_generation_options`
    and `add_backend_options` on `args`.
    """
    if args.backend == "hf":
        if args.tensor_parallel_size != 1:
            raise ValueError("--tensor-parallel-size applies to --backend vllm. With --backend hf, "
                             "use --device-map auto to shard the model over several GPUs.")
        return load_backend("hf", args.model, family=args.family, dtype=args.dtype, device=args.device,
                            device_map=args.device_map)

    if args.device_map is not None:
        raise ValueError("--device-map applies to --backend hf. With --backend vllm, "
                         "use --tensor-parallel-size to split the model over several GPUs.")
    max_model_len = args.max_model_len or PROMPT_ALLOWANCE + args.think_budget + args.answer_budget
    return load_backend("vllm", args.model, family=args.family, dtype=args.dtype,
                        tensor_parallel_size=args.tensor_parallel_size,
                        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=max_model_len)
