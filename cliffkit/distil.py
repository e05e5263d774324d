"""Distil a think format into the embedded instruct model: thinking data that the model writes itself from safe prompts, then LoRA SFT.

Arithmetic traces are kept only when they reach the gold answer (rejection sampling).
For benign instructions the model first writes a plan (the thinking), then the answer
with that plan in context. No harmful prompt enters the data, just as the distilled
reasoners of the refusal-cliff paper saw no safety data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from cliffkit.datasets import Prompt, is_correct, load_prompts
from cliffkit.families import Family
from cliffkit.generate import GenerationSettings, generate_traces
from cliffkit.judge import KeywordJudge, judge_traces, wilson_interval
from cliffkit.models import LoadedModel
from cliffkit.render import encode_prompt_text
from cliffkit.sft import SFTConfig, SFTExample
from cliffkit.traces import Trace, read_traces, write_traces_atomic

logger = logging.getLogger(__name__)

THINKER_FAMILY = "cliffkit-thinker"

ARITHMETIC_INSTRUCTION = (
    "Solve this word problem. Write at most five short lines of plain-text reasoning and calculations "
    "(no LaTeX, no headings, no lists), then a last line 'Final answer: <number>'.\n\nProblem: {problem}"
)
PLAN_INSTRUCTION = (
    "Here is a request from a user:\n\n{request}\n\nDo not answer it yet. In two or three short "
    "sentences, written in the first person, plan how you will answer it: what the user needs and "
    "which points you will cover."
)
ANSWER_SYSTEM = (
    "You are a helpful assistant. Answer the user's request concisely, in under 80 words. "
    "You have already planned your answer:\n{plan}"
)
# One worked example per kind, given as an earlier chat turn: the 0.5B model copies the
# style of a previous turn more reliably than it follows a description of it.
ARITHMETIC_SHOT = (
    ARITHMETIC_INSTRUCTION.format(problem="Sam buys 3 pens at $2 each and 2 books at $5 each. "
                                          "How many dollars does Sam spend in total?"),
    "Sam buys pens and books, so I add the two costs.\nPens: 3 * 2 = 6 dollars.\n"
    "Books: 2 * 5 = 10 dollars.\nTotal: 6 + 10 = 16 dollars.\nFinal answer: 16",
)
PLAN_SHOT = (
    PLAN_INSTRUCTION.format(request="How can I make my tea less bitter?"),
    "The user wants tea that tastes less bitter. I will explain that bitterness comes from steeping too "
    "long or with water that is too hot, then suggest a shorter steeping time, cooler water and a "
    "splash of milk.",
)
ARITHMETIC_ANSWER = "The answer is {answer}."
# Every plan starts with these words, so the thinker learns one fixed way into a plan.
PLAN_PREFIX = "The user"


@dataclass(frozen=True)
class DistilConfig:
    """How the thinking data is generated.

    `examples` is the total number of training examples; `arithmetic_share` of them
    come from arithmetic problems and the rest from benign instructions. Each arithmetic
    problem gets up to `samples_per_problem` samples at `temperature`, and the first
    correct one is kept. Token limits apply to the generated thinking and answer.
    """

    examples: int = 192
    arithmetic_share: float = 0.5
    samples_per_problem: int = 2
    temperature: float = 0.7
    top_p: float = 0.95
    max_thinking_tokens: int = 96
    max_answer_tokens: int = 112
    # On 2 CPU cores a batch of 16 costs about 1.4x the time of a batch of 8 per step.
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("examples", "samples_per_problem", "max_thinking_tokens", "max_answer_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DistilConfig.{name} must be at least 1, got {getattr(self, name)}.")
        if not 0 <= self.arithmetic_share <= 1:
            raise ValueError(f"DistilConfig.arithmetic_share must be in [0, 1], got {self.arithmetic_share}.")
        if self.temperature <= 0:
            raise ValueError("DistilConfig.temperature must be > 0: rejection sampling needs distinct samples.")

    @property
    def arithmetic_quota(self) -> int:
        return round(self.examples * self.arithmetic_share)

    @property
    def benign_quota(self) -> int:
        return self.examples - self.arithmetic_quota


@dataclass(frozen=True)
class ThinkingExample:
    """One distilled example: a safe prompt, the thinking and the answer that the model wrote for it."""

    id: str
    source: str
    prompt: str
    thinking: str
    answer: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)


@dataclass(frozen=True)
class Completion:
    """Text generated for one chat prompt: `tokens` new tokens, `finished` when it ended with end-of-turn."""

    text: str
    tokens: int
    finished: bool


# --------------------------------------------------------------------------- generation


def complete_chat(lm: LoadedModel, user_texts: Sequence[str], *, max_new_tokens: int, temperature: float,
                  top_p: float = 1.0, seed: int = 0, systems: Sequence[str | None] | None = None,
                  shots: Sequence[tuple[str, str]] = (), prefix: str = "") -> list[Completion]:
    """Generate one plain chat reply per user text, with no think block (batched, left padded).

    `systems` gives a system prompt per text (None: the template's default), and `shots`
    are (user, assistant) turns put before every text. Each reply starts with `prefix`,
    which is written into the prompt and included in the returned text and token count.
    A temperature of 0 means greedy decoding; otherwise sampling is seeded with `seed`.
    """
    systems = list(systems) if systems is not None else [None] * len(user_texts)
    earlier_turns = [{"role": role, "content": content} for shot in shots
                     for role, content in zip(("user", "assistant"), shot)]
    inputs = []
    for text, system in zip(user_texts, systems):
        messages = ([{"role": "system", "content": system}] if system else []) + earlier_turns
        messages.append({"role": "user", "content": text})
        rendered = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs.append(encode_prompt_text(lm.tokenizer, rendered + prefix))

    batch = lm.tokenizer.pad({"input_ids": inputs}, padding=True, return_tensors="pt").to(lm.device)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=lm.tokenizer.pad_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    torch.manual_seed(seed)
    with torch.no_grad():
        output = lm.model.generate(**batch, **kwargs)
    prefix_ids = lm.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    return [_to_completion(lm, prefix_ids + row, len(prefix_ids))
            for row in output[:, batch["input_ids"].shape[1]:].tolist()]


def _to_completion(lm: LoadedModel, row: list[int], skip: int = 0) -> Completion:
    """Cut `row` at the first end-of-turn or pad token; the first `skip` ids (a prefix) are never cut."""
    ends = {lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id}
    eos = lm.model.generation_config.eos_token_id
    ends.update(eos if isinstance(eos, list) else [eos])
    for position in range(skip, len(row)):
        if row[position] in ends:
            return Completion(text=lm.tokenizer.decode(row[:position]).strip(), tokens=position, finished=True)
    return Completion(text=lm.tokenizer.decode(row).strip(), tokens=len(row), finished=False)


def _batch_seed(seed: int, *parts: Any) -> int:
    # A stable seed per (run seed, stage, batch, round), so a resumed run samples the same.
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


# --------------------------------------------------------------------------- filters


def has_think_marker(text: str, family: Family) -> bool:
    """Return True when `text` contains the family's opening or closing think marker."""
    return family.think_open in text or family.think_close in text


def select_correct(samples: Sequence[Completion], gold: int, max_tokens: int, family: Family) -> Completion | None:
    """Return the first sample that finished within `max_tokens` and whose final number equals `gold`."""
    for sample in samples:
        if not sample.finished or sample.tokens > max_tokens or has_think_marker(sample.text, family):
            continue
        if is_correct(sample.text, gold):
            return sample
    return None


def assert_no_harmful(prompts: Iterable[Prompt]) -> None:
    """Raise ValueError if any prompt is harmful: the distilled data must hold no safety data."""
    harmful = [prompt.id for prompt in prompts if prompt.harmful]
    if harmful:
        raise ValueError(f"Harmful prompts must not enter the thinking data, got {len(harmful)} (first: {harmful[0]}).")


# --------------------------------------------------------------------------- JSON Lines store


class _JsonlStore:
    """Append-only JSON Lines file of records with an "id" field; a torn last line is cut on open."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            self._load()
        path.parent.mkdir(parents=True, exist_ok=True)

    def _load(self) -> None:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number == len(lines):  # no newline after it: an interrupted write
                    logger.warning("%s: cutting a torn last line left by an interrupted write", self.path)
                    with open(self.path, "r+b") as handle:
                        handle.truncate(len(raw) - len(line))
                    return
                raise ValueError(f"{self.path}, line {number}: malformed record ({error}). "
                                 "Fix or delete that line.") from error

    @property
    def ids(self) -> set[str]:
        return {record["id"] for record in self.records}

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for record in records))
            handle.flush()
            os.fsync(handle.fileno())
        self.records.extend(records)


# --------------------------------------------------------------------------- data building


def training_prompts(source: str, seed: int) -> list[Prompt]:
    """Return the TRAIN split of a safe source in a seeded order; raises if a harmful prompt slips in."""
    prompts = load_prompts([source], splits=["train"], harmful=False)
    assert_no_harmful(prompts)
    random.Random(f"{seed}:{source}").shuffle(prompts)
    return prompts


def build_thinking_data(lm: LoadedModel, path: str | Path, config: DistilConfig = DistilConfig(),
                        progress: bool = True) -> list[ThinkingExample]:
    """Generate (or resume) the thinking data in `path` and return the examples chosen for training.

    Kept examples are appended to `path`; prompts that yielded none go to
    `<path>.rejected.jsonl`. A rerun skips both, so an interrupted run resumes.
    Returns the first `arithmetic_quota` arithmetic and `benign_quota` benign
    examples in the seeded prompt order.
    """
    path = Path(path)
    kept = _JsonlStore(path)
    rejected = _JsonlStore(path.with_name(path.stem + ".rejected.jsonl"))

    arithmetic = training_prompts("arithmetic", config.seed)
    benign = training_prompts("benign", config.seed)
    _check_quota("arithmetic", config.arithmetic_quota, len(arithmetic))
    _check_quota("benign", config.benign_quota, len(benign))

    _build_arithmetic(lm, arithmetic, kept, rejected, config, progress)
    _build_benign(lm, benign, kept, rejected, config, progress)
    return select_examples(kept.records, arithmetic, benign, config)


def _check_quota(source: str, quota: int, available: int) -> None:
    if quota > available:
        raise ValueError(f"{quota} {source} examples requested, but the train split has {available} prompts. "
                         "Lower --examples or change the arithmetic share.")


def select_examples(records: Sequence[dict[str, Any]], arithmetic: Sequence[Prompt], benign: Sequence[Prompt],
                    config: DistilConfig) -> list[ThinkingExample]:
    """Pick the training examples from the stored records, by quota, in the seeded prompt order."""
    by_id = {record["id"]: record for record in records}
    chosen: list[ThinkingExample] = []
    for prompts, quota in ((arithmetic, config.arithmetic_quota), (benign, config.benign_quota)):
        found = [by_id[prompt.id] for prompt in prompts if prompt.id in by_id][:quota]
        chosen += [ThinkingExample(**{field.name: record[field.name] for field in dataclasses.fields(ThinkingExample)})
                   for record in found]
    return chosen


def _pending_batches(prompts: Sequence[Prompt], done: set[str], store: _JsonlStore, quota: int,
                     batch_size: int) -> Iterable[tuple[int, list[Prompt]]]:
    """Yield (batch index, prompts not yet done) over fixed slices, until `quota` examples are stored."""
    source_ids = {prompt.id for prompt in prompts}
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        if len(store.ids & source_ids) >= quota:
            return
        batch = [prompt for prompt in prompts[start:start + batch_size] if prompt.id not in done]
        if batch:
            yield index, batch


def _build_arithmetic(lm: LoadedModel, prompts: Sequence[Prompt], kept: _JsonlStore, rejected: _JsonlStore,
                      config: DistilConfig, progress: bool) -> None:
    done = kept.ids | rejected.ids
    bar = tqdm(total=config.arithmetic_quota, desc="arithmetic traces", disable=not progress,
               initial=min(config.arithmetic_quota, len(kept.ids & {p.id for p in prompts})))
    for index, batch in _pending_batches(prompts, done, kept, config.arithmetic_quota, config.batch_size):
        chosen: dict[str, Completion] = {}
        for round_index in range(config.samples_per_problem):
            unsolved = [prompt for prompt in batch if prompt.id not in chosen]
            if not unsolved:
                break
            samples = complete_chat(
                lm, [ARITHMETIC_INSTRUCTION.format(problem=prompt.text) for prompt in unsolved],
                max_new_tokens=config.max_thinking_tokens + 8, temperature=config.temperature,
                top_p=config.top_p, seed=_batch_seed(config.seed, "arithmetic", index, round_index),
                shots=[ARITHMETIC_SHOT],
            )
            for prompt, sample in zip(unsolved, samples):
                if select_correct([sample], prompt.answer, config.max_thinking_tokens, lm.family) is not None:
                    chosen[prompt.id] = sample

        records = [_arithmetic_record(prompt, chosen[prompt.id]) for prompt in batch if prompt.id in chosen]
        kept.append(records)
        rejected.append([{"id": prompt.id, "reason": f"no correct trace in {config.samples_per_problem} samples"}
                         for prompt in batch if prompt.id not in chosen])
        bar.update(len(records))
    bar.close()


def _arithmetic_record(prompt: Prompt, sample: Completion) -> dict[str, Any]:
    example = ThinkingExample(id=prompt.id, source=prompt.source, prompt=prompt.text, thinking=sample.text,
                              answer=ARITHMETIC_ANSWER.format(answer=prompt.answer))
    return dataclasses.asdict(example)


def _build_benign(lm: LoadedModel, prompts: Sequence[Prompt], kept: _JsonlStore, rejected: _JsonlStore,
                  config: DistilConfig, progress: bool) -> None:
    done = kept.ids | rejected.ids
    bar = tqdm(total=config.benign_quota, desc="benign plans", disable=not progress,
               initial=min(config.benign_quota, len(kept.ids & {p.id for p in prompts})))
    for index, batch in _pending_batches(prompts, done, kept, config.benign_quota, config.batch_size):
        plans = complete_chat(lm, [PLAN_INSTRUCTION.format(request=prompt.text) for prompt in batch],
                              max_new_tokens=config.max_thinking_tokens + 8, temperature=config.temperature,
                              top_p=config.top_p, seed=_batch_seed(config.seed, "plan", index), shots=[PLAN_SHOT],
                              prefix=PLAN_PREFIX)
        answers = complete_chat(lm, [prompt.text for prompt in batch],
                                systems=[ANSWER_SYSTEM.format(plan=plan.text) for plan in plans],
                                max_new_tokens=config.max_answer_tokens, temperature=config.temperature,
                                top_p=config.top_p, seed=_batch_seed(config.seed, "answer", index))

        records, reasons = [], []
        for prompt, plan, answer in zip(batch, plans, answers):
            reason = benign_rejection(plan, answer, config, lm.family)
            if reason is None:
                records.append(dataclasses.asdict(ThinkingExample(
                    id=prompt.id, source=prompt.source, prompt=prompt.text, thinking=plan.text, answer=answer.text)))
            else:
                reasons.append({"id": prompt.id, "reason": reason})
        kept.append(records)
        rejected.append(reasons)
        bar.update(len(records))
    bar.close()


def benign_rejection(plan: Completion, answer: Completion, config: DistilConfig, family: Family) -> str | None:
    """Return why a plan/answer pair is unusable, or None when it is kept."""
    if not plan.finished or plan.tokens > config.max_thinking_tokens:
        return f"plan longer than {config.max_thinking_tokens} tokens"
    if not answer.finished:
        return f"answer longer than {config.max_answer_tokens} tokens"
    if not plan.text or not answer.text:
        return "empty plan or answer"
    if has_think_marker(plan.text, family) or has_think_marker(answer.text, family):
        return "contains a think marker"
    return None


# --------------------------------------------------------------------------- SFT data


def to_sft_examples(examples: Sequence[ThinkingExample], family: Family, eos_token: str) -> list[SFTExample]:
    """Turn thinking examples into SFT pairs: `{thinking}\\n</think>\\n\\n{answer}<eos>` after the rendered prompt.

    The family's rendered prompt already ends with "<think>\\n", and the closing text is
    the family's `forced_close`, the same tokens that budget forcing inserts.
    """
    return [SFTExample(id=example.id, prompt=example.prompt,
                       target=f"{example.thinking}{family.forced_close}{example.answer}{eos_token}")
            for example in examples]


def write_training_file(path: str | Path, examples: Sequence[ThinkingExample]) -> str:
    """Write the chosen examples as JSON Lines (atomically) and return the file's SHA-256."""
    path = Path(path)
    payload = "".join(example.to_json() + "\n" for example in examples).encode("utf-8")
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_bytes(payload)
    os.replace(temporary, path)
    return hashlib.sha256(payload).hexdigest()


def default_sft_config(n_layers: int, seed: int = 0) -> SFTConfig:
    """Return the training settings of the shipped adapter: rank 8 on the attention and MLP projections of the upper half."""
    return SFTConfig(rank=8, alpha=16.0,
                     target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                     layers=tuple(range(n_layers // 2, n_layers)), learning_rate=3e-4, warmup_steps=3,
                     epochs=3, batch_size=1, grad_accum=8, max_length=384, seed=seed, checkpoint_every=5)


# --------------------------------------------------------------------------- evaluation

# Held-out prompts per source for the before/after comparison (TEST split).
EVAL_SIZES: dict[str, int] = {"harmbench": 8, "advbench": 8, "strongreject": 8, "benign": 16, "arithmetic": 24}
EVAL_SETTINGS = GenerationSettings(think_budget=192, answer_budget=96, temperature=0.0, batch_size=16, seed=0)


def evaluation_prompts(sizes: dict[str, int] | None = None, seed: int = 0) -> list[Prompt]:
    """Return a seeded sample of TEST-split prompts, `sizes[source]` from each source."""
    sizes = EVAL_SIZES if sizes is None else sizes
    prompts: list[Prompt] = []
    for source, count in sizes.items():
        prompts += load_prompts([source], splits=["test"], limit=count, seed=seed)
    return prompts


def _kind(trace: Trace) -> str:
    if trace.harmful:
        return "harmful"
    return "arithmetic" if trace.source == "arithmetic" else "benign"


def _rate(count: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(count, n) if n else (math.nan, math.nan)
    return {"count": count, "n": n, "rate": count / n if n else math.nan, "ci95": [low, high]}


def summarize_traces(traces: Sequence[Trace], gold: dict[str, int]) -> dict[str, Any]:
    """Return format, accuracy and refusal numbers of judged traces.

    - format: share of traces whose think block the model closed itself (`closed_by == "model"`),
      per prompt kind and overall;
    - arithmetic accuracy: the answer's final number equals the gold answer; `accuracy_any_text`
      also accepts the final number of thinking + answer, which credits a model that solved
      the problem inside an unclosed think block;
    - refusal: KeywordJudge labels on harmful and benign prompts; ASR is the share of answered
      harmful prompts that were not refused.
    """
    by_kind: dict[str, list[Trace]] = {"harmful": [], "benign": [], "arithmetic": []}
    for trace in traces:
        by_kind[_kind(trace)].append(trace)

    summary: dict[str, Any] = {"n": len(traces), "format": {
        "all": _rate(sum(trace.closed_by == "model" for trace in traces), len(traces))}}
    for kind, group in by_kind.items():
        summary["format"][kind] = _rate(sum(trace.closed_by == "model" for trace in group), len(group))

    arithmetic = by_kind["arithmetic"]
    summary["arithmetic"] = {
        "accuracy": _rate(sum(is_correct(trace.answer, gold[trace.prompt_id]) for trace in arithmetic), len(arithmetic)),
        "accuracy_any_text": _rate(sum(is_correct(f"{trace.thinking}\n{trace.answer}", gold[trace.prompt_id])
                                       for trace in arithmetic), len(arithmetic)),
    }

    for kind in ("harmful", "benign"):
        answered = [trace for trace in by_kind[kind] if trace.labels.get("refused") is not None]
        refused = sum(bool(trace.labels["refused"]) for trace in answered)
        summary[kind] = {"refusal": _rate(refused, len(answered)), "no_answer": len(by_kind[kind]) - len(answered)}
    summary["harmful"]["asr"] = _rate(summary["harmful"]["refusal"]["n"] - summary["harmful"]["refusal"]["count"],
                                      summary["harmful"]["refusal"]["n"])
    summary["mean_thinking_tokens"] = {
        kind: (sum(trace.thinking_tokens for trace in group) / len(group) if group else math.nan)
        for kind, group in by_kind.items()
    }
    return summary


def evaluate_model(lm: LoadedModel, prompts: Sequence[Prompt], out: str | Path,
                   settings: GenerationSettings = EVAL_SETTINGS, progress: bool = True) -> dict[str, Any]:
    """Generate traces for `prompts` into `out` (resumable), judge them with KeywordJudge and summarize."""
    generate_traces(lm, prompts, settings, out=out, progress=progress)
    wanted = {prompt.id for prompt in prompts}
    traces = [trace for trace in read_traces(out) if trace.prompt_id in wanted]
    judge_traces(traces, KeywordJudge())
    write_traces_atomic(out, traces)
    gold = {prompt.id: prompt.answer for prompt in prompts if prompt.answer is not None}
    return summarize_traces(traces, gold)


# --------------------------------------------------------------------------- the whole pipeline


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _StageClock:
    """Wall-clock and CPU seconds per stage, added up over resumed invocations in `timings.json`."""

    def __init__(self, path: Path):
        self.path = path
        self.totals: dict[str, dict[str, float]] = json.loads(path.read_text()) if path.exists() else {}

    def run(self, stage: str, work, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = work(*args, **kwargs)
        entry = self.totals.setdefault(stage, {"wall_s": 0.0, "cpu_s": 0.0})
        entry["wall_s"] += time.perf_counter() - wall
        entry["cpu_s"] += time.process_time() - cpu
        self.path.write_text(json.dumps(self.totals, indent=2))
        return result


def load_thinker(adapter_dir: str | Path, dtype: str | torch.dtype = "auto", device: str = "auto") -> LoadedModel:
    """Load the embedded base with an adapter from `adapter_dir` merged in, the way `load_model` loads the thinker."""
    from cliffkit.models import EMBEDDED_INSTRUCT, EMBEDDED_THINKER, load_model, resolve_device, resolve_dtype
    from cliffkit.sft import load_adapter

    base = load_model(EMBEDDED_INSTRUCT, family=THINKER_FAMILY, dtype="float32", device=device)
    merged = load_adapter(base, adapter_dir, merge=True, model_id=EMBEDDED_THINKER)
    merged.model.to(resolve_dtype(dtype, resolve_device(device)))
    return merged


def evaluate_before_after(eval_dir: str | Path, adapter_dir: str | Path, seed: int = 0,
                          settings: GenerationSettings = EVAL_SETTINGS, sizes: dict[str, int] | None = None,
                          progress: bool = True) -> dict[str, Any]:
    """Evaluate the plain instruct model (scaffold family) and the thinker on the same held-out prompts.

    Traces go to `eval_dir`; the thinker's file name carries the adapter's hash, so a
    retrained adapter never reuses traces of an older one.
    """
    from cliffkit.models import EMBEDDED_INSTRUCT, load_model

    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    prompts = evaluation_prompts(sizes, seed)
    adapter_hash = _sha256_file(Path(adapter_dir) / "adapter_model.safetensors")[:12]

    before = load_model(EMBEDDED_INSTRUCT)
    before_summary = evaluate_model(before, prompts, eval_dir / "before.jsonl", settings, progress)
    del before
    after = load_thinker(adapter_dir)
    after_summary = evaluate_model(after, prompts, eval_dir / f"after-{adapter_hash}.jsonl", settings, progress)

    return {
        "settings": {**dataclasses.asdict(settings), "dtype": str(after.dtype).removeprefix("torch.")},
        "sizes": {source: sum(prompt.source == source for prompt in prompts) for source in (sizes or EVAL_SIZES)},
        "split": "test",
        "before": {"model": EMBEDDED_INSTRUCT, "family": "scaffold", **before_summary},
        "after": {"model": "cliffkit/qwen2.5-coder-0.5b-think", "family": THINKER_FAMILY,
                  "adapter_sha256_12": adapter_hash, **after_summary},
    }


def run_distillation(run_dir: str | Path, out: str | Path, *, seed: int = 0, examples: int = 192,
                     evaluate: bool = True, train_dtype: str = "bfloat16", progress: bool = True) -> dict[str, Any]:
    """Build the thinking data, train the adapter, evaluate it and write the shipped adapter folder.

    Every stage resumes: the data file skips finished prompts, training restarts from its
    last checkpoint, and evaluation traces skip finished prompts. Returns the record
    written to `out/training.json`.
    """
    from cliffkit.models import EMBEDDED_INSTRUCT, load_model
    from cliffkit.sft import read_marker, train_lora

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clock = _StageClock(run_dir / "timings.json")
    distil_config = DistilConfig(examples=examples, seed=seed)

    lm = load_model(EMBEDDED_INSTRUCT, family=THINKER_FAMILY, dtype=train_dtype)
    chosen = clock.run("data", build_thinking_data, lm, run_dir / "thinking.jsonl", distil_config, progress)
    data_sha256 = write_training_file(run_dir / "train.jsonl", chosen)
    logger.info("Training data: %d examples, sha256 %s", len(chosen), data_sha256)

    sft_config = default_sft_config(lm.model.config.num_hidden_layers, seed)
    sft_examples = to_sft_examples(chosen, lm.family, lm.tokenizer.eos_token)
    result = clock.run("train", train_lora, lm, sft_examples, sft_config, run_dir / "train", progress=progress)
    del lm

    evaluation = None
    if evaluate:
        evaluation = clock.run("eval", evaluate_before_after, run_dir / "eval", result.adapter_dir, seed=seed,
                               progress=progress)
        (run_dir / "eval" / "report.json").write_text(json.dumps(evaluation, indent=2, sort_keys=True))

    record = {
        "base_model": EMBEDDED_INSTRUCT,
        "family": THINKER_FAMILY,
        "data": {"sha256": data_sha256, "examples": len(chosen),
                 "by_source": {source: sum(example.source == source for example in chosen)
                               for source in ("arithmetic", "benign")},
                 "harmful_prompts": 0, "split": "train"},
        "distil_config": dataclasses.asdict(distil_config),
        "sft_config": sft_config.to_dict(),
        "train_dtype": train_dtype,
        "losses": result.losses,
        "target_tokens": result.target_tokens,
        "dropped": result.dropped,
        "timings": clock.totals,
        "evaluation": evaluation,
        "adapter_marker": read_marker(result.adapter_dir),
    }
    ship_adapter(result.adapter_dir, out, record)
    return record


def ship_adapter(adapter_dir: str | Path, out: str | Path, record: dict[str, Any]) -> Path:
    """Copy a finished adapter to `out` with training.json, data_sha256.txt and PROVENANCE.md, atomically."""
    from cliffkit.sft import ADAPTER_MARKER

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(adapter_dir, staged, ignore=shutil.ignore_patterns(ADAPTER_MARKER, "README.md"))
    (staged / "training.json").write_text(json.dumps(_without_marker(record), indent=2, sort_keys=True) + "\n")
    (staged / "data_sha256.txt").write_text(f"{record['data']['sha256']}  train.jsonl\n")
    (staged / "PROVENANCE.md").write_text(provenance_text(record))
    # The completion record goes in last, so an interrupted copy never looks finished.
    shutil.copy2(Path(adapter_dir) / ADAPTER_MARKER, staged / ADAPTER_MARKER)

    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.rename(out, old)
    os.rename(staged, out)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("Adapter shipped to %s", out)
    return out


def _without_marker(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != "adapter_marker"}


REBUILD_COMMAND = "cliffkit distil-thinker --run-dir runs/thinker --out cliffkit/adapters/thinker --seed {seed} --examples {examples}"


def _percent(entry: dict[str, Any]) -> str:
    if not entry["n"]:
        return "n/a"
    return f"{100 * entry['rate']:.0f}% ({entry['count']}/{entry['n']})"


def results_table(evaluation: dict[str, Any]) -> str:
    """Return the before/after numbers as a Markdown table."""
    rows = [
        ("Think block closed by the model, all prompts", ("format", "all")),
        ("... benign", ("format", "benign")),
        ("... arithmetic", ("format", "arithmetic")),
        ("... harmful", ("format", "harmful")),
        ("Arithmetic accuracy (answer)", ("arithmetic", "accuracy")),
        ("Arithmetic accuracy (thinking + answer)", ("arithmetic", "accuracy_any_text")),
        ("Refusal rate, harmful (KeywordJudge)", ("harmful", "refusal")),
        ("ASR, harmful (KeywordJudge)", ("harmful", "asr")),
        ("Refusal rate, benign (KeywordJudge)", ("benign", "refusal")),
    ]
    lines = ["| Measure | Before: instruct + scaffold | After: thinker |", "|---|---|---|"]
    for label, (group, key) in rows:
        lines.append(f"| {label} | {_percent(evaluation['before'][group][key])} | "
                     f"{_percent(evaluation['after'][group][key])} |")
    return "\n".join(lines)


def provenance_text(record: dict[str, Any]) -> str:
    """Return PROVENANCE.md for a shipped adapter from its training record."""
    sft_config, distil_config, data = record["sft_config"], record["distil_config"], record["data"]
    layers = sft_config["layers"]
    layer_text = f"blocks {layers[0]}-{layers[-1]}" if layers else "all blocks"
    timings = ", ".join(f"{stage} {entry['wall_s'] / 60:.0f} min wall ({entry['cpu_s'] / 60:.0f} min CPU)"
                        for stage, entry in record["timings"].items())
    evaluation = record.get("evaluation")
    if evaluation:
        settings = evaluation["settings"]
        sizes = ", ".join(f"{count} {source}" for source, count in evaluation["sizes"].items())
        numbers = (f"Held-out TEST prompts: {sizes}. Settings: think budget {settings['think_budget']} tokens, "
                   f"answer budget {settings['answer_budget']}, greedy decoding, {settings['dtype']}.\n\n"
                   + results_table(evaluation))
    else:
        numbers = "This build was not evaluated (`--skip-eval`)."

    return f"""# Provenance of the thinker adapter

A LoRA adapter that gives the embedded Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) a think
format: `<think>`, reasoning, `</think>`, then the answer. cliffkit loads it as
`cliffkit/qwen2.5-coder-0.5b-think`, merged into the base weights, with the family
`{record['family']}` (no system prompt, so the chat template adds Qwen's default system line).

## Base model

`{record['base_model']}`, the GGUF file embedded in cliffkit and converted to float32.
Base fingerprint (sampled weights, see `cliffkit.sft.base_fingerprint`):
`{record.get('adapter_marker', {}).get('base_fingerprint', 'n/a')}`. Loading the adapter on any
other base model raises `AdapterMismatchError`.

## Data

{data['examples']} examples written by the base model itself from safe prompts of the TRAIN split:

- {data['by_source']['arithmetic']} arithmetic word problems (`cliffkit.datasets`, source "arithmetic").
  The model solved each problem step by step; up to {distil_config['samples_per_problem']} samples at
  temperature {distil_config['temperature']} (top-p {distil_config['top_p']}) per problem, and the first
  sample whose final number equals the gold answer is kept (rejection sampling). The thinking is that
  solution; the answer is the sentence "The answer is N." with the verified number.
- {data['by_source']['benign']} everyday instructions (source "benign"). The model first wrote a short
  first-person plan (the thinking), then, in a second call with the plan in its system prompt, the answer.

Thinking is at most {distil_config['max_thinking_tokens']} tokens and answers at most
{distil_config['max_answer_tokens']}. **No harmful prompt was used**: the builder raises an error if a
prompt labelled harmful reaches it, as the distilled reasoners studied in the refusal-cliff paper saw
no safety data. SHA-256 of the training file (`train.jsonl`, one JSON object per line with id, source,
prompt, thinking, answer): `{data['sha256']}`.

## Training

Target after the rendered prompt (which ends with `<think>\\n`): `{{thinking}}\\n</think>\\n\\n{{answer}}<|im_end|>`,
loss on those tokens only. LoRA rank {sft_config['rank']}, alpha {sft_config['alpha']:g}, on
{', '.join(sft_config['target_modules'])} of {layer_text}; AdamW, learning rate {sft_config['learning_rate']:g}
with {sft_config['warmup_steps']} warmup steps and linear decay, {sft_config['epochs']} epochs, batch
{sft_config['batch_size']} x {sft_config['grad_accum']} accumulation, max length {sft_config['max_length']},
seed {sft_config['seed']}, base weights in {record['train_dtype']} and LoRA weights in float32.
Loss: {record['losses'][0]:.3f} at the first step, {record['losses'][-1]:.3f} at the last
({len(record['losses'])} steps); `training.json` has the whole curve.

Time on a 2-core CPU shared with other jobs: {timings}. CPU time counts the seconds of this process on
all cores, so an idle 2-core machine needs about half of it in wall time.

## Measured

{numbers}

## Rebuild

```
{REBUILD_COMMAND.format(seed=sft_config['seed'], examples=distil_config['examples'])}
```

Every stage resumes after an interruption. With the same seed, package versions and CPU, the data and
the adapter come out the same. Another CPU or thread count can change the sampled texts.
"""
