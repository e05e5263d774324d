"""Benchmark the head methods against plain forward passes, side by side in one run.

Targets (ratios of wall time on the same batch):
  direct attribution, all heads, last position   <= 1.1 x one plain forward pass
  exact last-position scan, all heads            >= 50 x faster than one full forward pass per head
  attribution patching, all heads                <= 3 x one plain forward pass
The all-position scan is reported in heads per second with and without prefix
reuse and batching. Every timing is the median of --repeats runs.

Run: python bench/bench_heads.py [--traces runs/heads-dev/traces.jsonl] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

from cliffkit.heads import direct_attribution, head_effects, model_heads, pad_left, trace_token_ids
from cliffkit.heads.forward import run_decoder
from cliffkit.models import load_model
from cliffkit.render import render_prompt, tokenize_trace
from cliffkit.traces import read_traces


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", default="runs/heads-dev/traces.jsonl",
                        help="trace file; without it, rendered prompts with a fixed thinking text are used.")
    parser.add_argument("--n-traces", type=int, default=4, help="traces in the batch (default: 4).")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (default: bfloat16).")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (default: 2).")
    parser.add_argument("--rerun-heads", type=int, default=3,
                        help="heads timed with one full forward pass each, then extrapolated (default: 3).")
    parser.add_argument("--all-layers", default="12,23",
                        help="blocks whose heads the all-position scan variants are timed on (default: 12,23).")
    return parser.parse_args()


def timed(function, repeats: int) -> tuple[float, object]:
    """Return (median seconds, last result) over `repeats` calls."""
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def load_sequences(lm, args) -> tuple[list[torch.Tensor], str]:
    path = Path(args.traces)
    if path.exists():
        traces = [trace for trace in read_traces(path) if trace.harmful][: args.n_traces]
        return trace_token_ids(lm, traces), f"{len(traces)} harmful traces from {path}"
    from cliffkit.datasets import load_prompts

    prompts = load_prompts(["harmbench"], splits=["train"], limit=args.n_traces, seed=0)
    thinking = "Let me think step by step about what the user is asking and whether I should help."
    sequences = [tokenize_trace(lm.tokenizer, lm.family, render_prompt(lm.tokenizer, lm.family, prompt.text).text,
                                thinking, None).input_ids for prompt in prompts]
    return sequences, f"{len(sequences)} rendered harmbench prompts with a fixed thinking text"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def agreement(fast, slow, pairs, dtype: torch.dtype) -> str:
    """Compare two scans on `pairs` against the rounding step of the scores in `dtype`."""
    difference = max(abs(float(fast.effects[l, h] - slow.effects[l, h])) for l, h in pairs)
    # Scores are sums over d_model products; in bfloat16 they carry about 8 significant bits.
    step = float(slow.clean_scores.abs().max()) * torch.finfo(dtype).eps
    return (f"max |difference| {difference:.2e}, rounding step of the scores {step:.2e}: "
            f"{verdict(difference <= 4 * step)}")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    lm = load_model(dtype=args.dtype, device="cpu")
    heads = model_heads(lm.model)
    layer = heads.n_layers - 1
    sequences, described = load_sequences(lm, args)
    batch = pad_left(sequences, lm.tokenizer.pad_token_id).to(lm.device)
    # Speed does not depend on the direction, so a fixed random one serves.
    direction = torch.randn(heads.d_model)
    common = dict(batch_size=len(sequences), progress=False)

    print(f"model {lm.model_id}, dtype {lm.dtype}, torch threads {torch.get_num_threads()}")
    print(f"batch: {described}; lengths {[len(s) for s in sequences]}; {heads.n_total} heads "
          f"({heads.n_layers} layers x {heads.n_heads}); probe at block {layer}\n")

    def plain_forward():
        with torch.no_grad():
            return run_decoder(heads, batch, stop_after=layer, full=True)

    def causal_lm_forward():
        with torch.no_grad():
            return lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids).logits

    plain_forward()  # warm-up
    forward_s, _ = timed(plain_forward, args.repeats)
    causal_s, _ = timed(causal_lm_forward, args.repeats)
    print(f"plain forward (decoder body)      {forward_s:8.3f} s")
    print(f"plain forward (with LM head)      {causal_s:8.3f} s\n")

    # 1. Direct attribution, alternating with plain forwards so that both see the same machine load.
    attribution_s, _ = timed(lambda: direct_attribution(lm, sequences, direction, layer, **common), args.repeats)
    forward_again_s, _ = timed(plain_forward, args.repeats)
    reference_s = min(forward_s, forward_again_s)
    ratio = attribution_s / reference_s
    print(f"1. direct attribution, all heads  {attribution_s:8.3f} s = {ratio:5.2f} x plain forward "
          f"(target <= 1.1: {verdict(ratio <= 1.1)})\n")

    # 2. Exact last-position scan against one full forward pass per head.
    last_s, last = timed(lambda: head_effects(lm, sequences, direction, layer, positions="last", **common), 1)
    step = max(1, heads.n_total // args.rerun_heads)
    subset = [divmod(index, heads.n_heads) for index in range(0, heads.n_total, step)][: args.rerun_heads]
    rerun_s, rerun = timed(lambda: head_effects(lm, sequences, direction, layer, method="rerun", positions="last",
                                                heads=subset, **common), 1)
    rerun_all_s = rerun_s / len(subset) * heads.n_total
    speedup = rerun_all_s / last_s
    print(f"2. exact last-position scan       {last_s:8.3f} s for {heads.n_total} heads")
    print(f"   one full forward per head      {rerun_s:8.3f} s for {len(subset)} heads -> "
          f"{rerun_all_s:8.1f} s extrapolated to {heads.n_total}")
    print(f"   speed-up {speedup:6.1f} x (target >= 50: {verdict(speedup >= 50)})")
    print(f"   same numbers on {subset}: {agreement(last, rerun, subset, lm.dtype)}\n")

    # 3. All-position scan: heads per second with and without prefix reuse and batching.
    blocks = [int(item) for item in args.all_layers.split(",")]
    chosen = [(block, head) for block in blocks for head in range(heads.n_heads)]
    batched_s, batched = timed(lambda: head_effects(lm, sequences, direction, layer, positions="all", heads=chosen,
                                                    **common), 1)
    single_s, _ = timed(lambda: head_effects(lm, sequences, direction, layer, positions="all", heads=chosen,
                                             heads_per_pass=1, **common), 1)
    few = chosen[:: max(1, len(chosen) // args.rerun_heads)][: args.rerun_heads]
    rerun_all_positions_s, rerun_all = timed(lambda: head_effects(lm, sequences, direction, layer, method="rerun",
                                                                  positions="all", heads=few, **common), 1)
    print(f"3. all-position scan on the {len(chosen)} heads of blocks {blocks}:")
    print(f"   prefix reuse + batching        {len(chosen) / batched_s:8.2f} heads/s")
    print(f"   prefix reuse, one head a pass  {len(chosen) / single_s:8.2f} heads/s")
    print(f"   full forward per head          {len(few) / rerun_all_positions_s:8.2f} heads/s")
    print(f"   same numbers on {few}: {agreement(batched, rerun_all, few, lm.dtype)}\n")

    # 4. Attribution patching against plain forwards.
    patching_s, _ = timed(lambda: head_effects(lm, sequences, direction, layer, method="patching", positions="all",
                                               **common), args.repeats)
    forward_third_s, _ = timed(plain_forward, args.repeats)
    ratio = patching_s / min(forward_s, forward_again_s, forward_third_s)
    print(f"4. attribution patching, all heads {patching_s:7.3f} s = {ratio:5.2f} x plain forward "
          f"(target <= 3: {verdict(ratio <= 3)})")


if __name__ == "__main__":
    main()
