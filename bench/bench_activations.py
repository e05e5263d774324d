"""Benchmark activation scoring against plain forward passes, and the peak memory of a long capture.

Speed: scores every position at every layer with `iter_projections` (one probe
direction per layer) and compares with plain forward passes over the same batches,
rounds interleaved so that load from other processes hits both alike. Target: at most
1.2x the plain decoder forward.

Memory: in a fresh child process, captures all-position float16 activations of
64 traces of 512 tokens at one layer with batch size 4 (the default), keeping them
all, and reads the process's peak resident set size (VmHWM). The high-water mark is
reset after the model is loaded, so the load peak and the capture peak are reported
apart. Target: under 2 GB.

Usage:
    python bench/bench_activations.py                 # both parts, default model in bfloat16
    python bench/bench_activations.py --part speed --traces 8 --tokens 256 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from cliffkit.activations import (  # noqa: E402
    decoder_layers,
    encode_traces,
    iter_activations,
    iter_projections,
    length_sorted_batches,
    pad_left,
    position_ids_from_mask,
)
from cliffkit.models import load_model  # noqa: E402
from cliffkit.render import render_prompt  # noqa: E402
from cliffkit.traces import Trace  # noqa: E402

FILLER = ("Let me think about this request step by step. First I should understand what the user wants, "
          "then consider whether answering is safe, and finally decide how to respond in a helpful way. ")


def synthetic_traces(lm, count: int, tokens: int) -> list[Trace]:
    """Build traces whose prompt + thinking + closing marker is exactly `tokens` long (the thinking is cut to fit)."""
    traces = []
    filler_ids = lm.tokenizer(FILLER * (tokens // 20 + 4), add_special_tokens=False)["input_ids"]
    for index in range(count):
        prompt = f"Question {index}: explain how a hash table resizes itself."
        rendered = render_prompt(lm.tokenizer, lm.family, prompt).text
        base = encode_traces(lm, [_trace(lm, index, prompt, rendered, "")])[0]
        budget = tokens - len(base.input_ids)
        if budget < 1:
            raise ValueError(f"--tokens {tokens} is shorter than the prompt ({len(base.input_ids)} tokens).")
        thinking = lm.tokenizer.decode(filler_ids[:budget])
        trace = _trace(lm, index, prompt, rendered, thinking)
        # Decoding and re-encoding can merge tokens differently; trim until the length fits.
        while len(encode_traces(lm, [trace])[0].input_ids) > tokens:
            budget -= 1
            trace = _trace(lm, index, prompt, rendered, lm.tokenizer.decode(filler_ids[:budget]))
        traces.append(trace)
    return traces


def _trace(lm, index: int, prompt: str, rendered: str, thinking: str) -> Trace:
    return Trace(prompt_id=f"bench-{index}", model_id=lm.model_id, prompt=prompt, rendered=rendered,
                 thinking=thinking, answer="", closed_by="budget", finished=False, thinking_tokens=0,
                 answer_tokens=0)


def plain_forward(lm, encoded, batch_size: int, with_head: bool) -> None:
    """Run the same left-padded batches without hooks: the decoder body, or the whole model with its LM head."""
    for indices in length_sorted_batches([len(t.input_ids) for t in encoded], batch_size):
        ids, mask, _ = pad_left([encoded[i].input_ids for i in indices], lm.tokenizer.pad_token_id)
        with torch.inference_mode():
            module = lm.model if with_head else lm.model.model
            module(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)


def score_all(lm, encoded, batch_size: int, directions) -> None:
    for _ in iter_projections(lm, encoded, directions, batch_size=batch_size, progress=False):
        pass


def bench_speed(args) -> None:
    lm = load_model(dtype=args.dtype, device="cpu")
    encoded = encode_traces(lm, synthetic_traces(lm, args.traces, args.tokens))
    n_layers = len(decoder_layers(lm))
    generator = torch.Generator().manual_seed(0)
    directions = {layer: torch.randn(lm.model.config.hidden_size, generator=generator) for layer in range(n_layers)}

    runs = {"plain body": lambda: plain_forward(lm, encoded, args.batch_size, with_head=False),
            "plain with LM head": lambda: plain_forward(lm, encoded, args.batch_size, with_head=True),
            "score all layers": lambda: score_all(lm, encoded, args.batch_size, directions)}
    runs["plain body"]()  # warm-up, not timed
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"speed: {args.traces} traces x {args.tokens} tokens, batch size {args.batch_size}, {lm.dtype}, "
          f"{n_layers} layers, torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds (median)")
    for name, value in medians.items():
        print(f"  {name:>20}: {value:7.2f} s   (rounds: {', '.join(f'{v:.2f}' for v in times[name])})")
    print(f"  ratio score / plain body        = {medians['score all layers'] / medians['plain body']:.3f} "
          "(target <= 1.2)")
    print(f"  ratio score / plain with LM head = {medians['score all layers'] / medians['plain with LM head']:.3f}")


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status; this measurement needs Linux.")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # "5" resets the peak RSS counter (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_child(args) -> None:
    """Run in a fresh process: load, reset the peak, capture, and print the peaks as JSON."""
    lm = load_model(dtype=args.dtype, device="cpu")
    traces = synthetic_traces(lm, args.memory_traces, args.memory_tokens)
    load_peak = _vm_hwm_mb()
    reset = _reset_hwm()

    kept = []
    start = time.perf_counter()
    for batch in iter_activations(lm, traces, [args.layer], positions="all", batch_size=args.batch_size,
                                  dtype=torch.float16, progress=False):
        kept.extend(batch.trace(row).clone() for row in range(len(batch.indices)))
    elapsed = time.perf_counter() - start
    kept_mb = sum(t.numel() * t.element_size() for t in kept) / 2**20
    print(json.dumps({"load_peak_mb": load_peak, "capture_peak_mb": _vm_hwm_mb(), "peak_reset": reset,
                      "kept_activations_mb": kept_mb, "seconds": elapsed, "traces": len(kept),
                      "positions": sum(t.shape[1] for t in kept)}))


def bench_memory(args) -> None:
    command = [sys.executable, __file__, "--part", "memory-child", "--dtype", args.dtype,
               "--batch-size", str(args.batch_size), "--layer", str(args.layer),
               "--memory-traces", str(args.memory_traces), "--memory-tokens", str(args.memory_tokens)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    result = json.loads(output)
    print(f"memory: {result['traces']} traces x {args.memory_tokens} tokens ({result['positions']} positions), "
          f"layer {args.layer}, batch size {args.batch_size}, {args.dtype}, all positions kept in float16 "
          f"({result['kept_activations_mb']:.0f} MB)")
    print(f"  peak RSS while loading the model: {result['load_peak_mb']:.0f} MB")
    label = "peak RSS during capture" if result["peak_reset"] else "peak RSS (load and capture, reset failed)"
    print(f"  {label}: {result['capture_peak_mb']:.0f} MB (target < 2048 MB); capture took "
          f"{result['seconds']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["speed", "memory", "both", "memory-child"], default="both")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--traces", type=int, default=8, help="traces in the speed part (default: 8)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per trace in the speed part (default: 256)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds in the speed part (default: 3)")
    parser.add_argument("--layer", type=int, default=12, help="layer captured in the memory part (default: 12)")
    parser.add_argument("--memory-traces", type=int, default=64)
    parser.add_argument("--memory-tokens", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    if args.part == "memory-child":
        memory_child(args)
        return
    if args.part in ("speed", "both"):
        bench_speed(args)
    if args.part in ("memory", "both"):
        bench_memory(args)


if __name__ == "__main__":
    main()
