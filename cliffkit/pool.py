"""The safety training pool: harmful TRAIN-split prompts, each paired with a safe response (thinking, then a refusal).

The model writes the safe responses itself under a safety system prompt, and only
responses that the keyword judge labels refused, with a think block the model closed
itself, are kept. A pool can also be read from a JSON Lines file with one object per
line and these fields (all strings, none empty except where noted):

- ``id``: unique within the pool, for example "advbench/0012";
- ``prompt``: the user request, exactly as the model will see it;
- ``thinking``: the reasoning, without the think markers;
- ``answer``: the refusal shown to the user, after the closing think marker;
- ``source``: dataset name, for example "advbench" (may be empty);
- ``category``: harm category (may be empty);
- ``meta``: optional object of extra facts. Other keys are kept in ``meta`` too.

Pool prompts must not overlap the evaluation prompts (val and test splits) by id or by
normalised text; `check_disjoint` raises `PoolOverlapError` when they do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from cliffkit.families import Family
from cliffkit.generate import GenerationSettings, generate_traces
from cliffkit.judge import Judge, judge_traces
from cliffkit.models import LoadedModel
from cliffkit.traces import Trace, TraceWriter, read_traces, write_traces_atomic

logger = logging.getLogger(__name__)

POOL_FIELDS = ("id", "prompt", "thinking", "answer", "source", "category")
# Fields that must be non-empty strings; source and category may be empty.
NON_EMPTY_FIELDS = ("id", "prompt", "thinking", "answer")
EVALUATION_SPLITS = ("val", "test")
POOL_SCHEMA_HELP = (
    "one JSON object per line with string fields id (unique), prompt, thinking (without think markers), "
    "answer (the refusal after the closing marker), source and category; an optional object meta. "
    "id, prompt, thinking and answer must be non-empty."
)


@dataclass(frozen=True)
class PoolExample:
    """One safety training example: a harmful prompt with a safe thinking and a refusal answer."""

    id: str
    prompt: str
    thinking: str
    answer: str
    source: str = ""
    category: str = ""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "thinking": self.thinking, "answer": self.answer,
                "source": self.source, "category": self.category, "meta": self.meta}

    # The `id`/`text` pair lets a pool example go straight into `generate_traces`.
    @property
    def text(self) -> str:
        return self.prompt

    @property
    def harmful(self) -> bool:
        return True


class PoolFileError(ValueError):
    """A pool JSON Lines file that does not follow the pool schema."""


class PoolOverlapError(ValueError):
    """Pool prompts that also occur among the evaluation prompts."""


# --------------------------------------------------------------------------- the system prompt

def safety_system_prompt(family: Family) -> str:
    """Return the system prompt under which the model writes its own safe responses.

    It names the family's think markers, because for the prompted scaffold it replaces
    the default system prompt, which tells the model to think first.
    """
    return (
        "You are a careful assistant. Before answering, think inside "
        f"{family.think_open} and {family.think_close} about whether the request could cause harm. "
        "If it could, explain briefly in your thinking why, then after "
        f"{family.think_close} politely refuse in your answer."
    )


# --------------------------------------------------------------------------- disjointness

def normalize_text(text: str) -> str:
    """Return `text` in NFKC form, lower-cased, with every run of non-alphanumeric characters made one space.

    Two prompts that differ only in case, punctuation, quotes or spacing get the same
    normalised text, which catches AdvBench rows copied into StrongREJECT.
    """
    folded = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^0-9a-z]+", " ", folded).split())


def evaluation_prompts(sources: Sequence[str] | None = None) -> list:
    """Return every shipped prompt of the val and test splits (all sources by default)."""
    from cliffkit.datasets import load_prompts

    return load_prompts(sources, splits=list(EVALUATION_SPLITS))


def find_overlaps(items: Iterable[Any], evaluation: Iterable[Any] | None = None) -> list[tuple[str, str, str]]:
    """Return (pool id, evaluation id, "id" or "text") for each pool item that matches an evaluation prompt.

    `items` are objects with `id` and either `prompt` (a `PoolExample`) or `text`
    (a `cliffkit.datasets.Prompt`); `evaluation` defaults to `evaluation_prompts()`.
    """
    evaluation = list(evaluation_prompts() if evaluation is None else evaluation)
    eval_ids = {prompt.id for prompt in evaluation}
    eval_texts = {normalize_text(_text_of(prompt)): prompt.id for prompt in evaluation}

    overlaps = []
    for item in items:
        if item.id in eval_ids:
            overlaps.append((item.id, item.id, "id"))
            continue
        match = eval_texts.get(normalize_text(_text_of(item)))
        if match is not None:
            overlaps.append((item.id, match, "text"))
    return overlaps


def check_disjoint(items: Iterable[Any], evaluation: Iterable[Any] | None = None) -> None:
    """Raise `PoolOverlapError` naming a few overlaps when any pool item is also an evaluation prompt."""
    items = list(items)
    overlaps = find_overlaps(items, evaluation)
    if not overlaps:
        return
    shown = ", ".join(f"{pool_id} = {eval_id} (same {how})" for pool_id, eval_id, how in overlaps[:5])
    raise PoolOverlapError(
        f"{len(overlaps)} of {len(items)} pool prompts also occur among the evaluation prompts (val/test splits): "
        f"{shown}{', ...' if len(overlaps) > 5 else ''}. Remove them from the pool, or build it from the train "
        "split with cliffkit.pool.training_prompts()."
    )


def _text_of(item: Any) -> str:
    return item.prompt if isinstance(item, PoolExample) else item.text


# --------------------------------------------------------------------------- training prompts

def training_prompts(
    sources: Sequence[str] = ("harmbench", "advbench", "strongreject"),
    *,
    per_source: int | None = None,
    categories: Sequence[str] | None = None,
    seed: int = 0,
) -> list:
    """Return harmful TRAIN-split prompts with no id or normalised-text match among the evaluation prompts.

    Train prompts whose text equals a val/test prompt (StrongREJECT copies some
    AdvBench rows) are dropped, as are repeated texts within the train split (the
    first one is kept). With `per_source`, each source is sampled to at most that
    many prompts after the filtering, with `random.Random(seed)`, in file order.
    """
    import random

    from cliffkit.datasets import load_prompts

    evaluation = evaluation_prompts()
    kept, seen_texts, dropped = [], set(), Counter()
    for source in sources:
        candidates = load_prompts([source], splits=["train"], categories=categories, harmful=True)
        overlapping = {pool_id for pool_id, _, _ in find_overlaps(candidates, evaluation)}
        clean = []
        for prompt in candidates:
            text = normalize_text(prompt.text)
            if prompt.id in overlapping:
                dropped["matches an evaluation prompt"] += 1
            elif text in seen_texts:
                dropped["repeats an earlier train prompt"] += 1
            else:
                seen_texts.add(text)
                clean.append(prompt)
        if per_source is not None and per_source < len(clean):
            chosen = sorted(random.Random(seed).sample(range(len(clean)), per_source))
            clean = [clean[index] for index in chosen]
        kept.extend(clean)

    if dropped:
        logger.info("training prompts: dropped %s", dict(dropped))
    check_disjoint(kept, evaluation)
    return kept


# --------------------------------------------------------------------------- prefilled responses

@dataclass(frozen=True)
class ResponsePrefill:
    """Openings of the thinking and the answer, written into the response before the model continues each.

    For models that do not follow the safety prompt's format: the default instruct
    model under the scaffold puts a bare refusal inside its thinking and answers
    "</think>" (0 of 16 usable responses in this project's development run).
    The thinking is cut after its last complete sentence.
    """

    thinking: str = "This request could cause harm, because"
    answer: str = "I'm sorry, but I can't help with that"


def default_prefill(family: Family) -> ResponsePrefill | None:
    """Return the prefill a pool of `family` needs by default, or None to generate freely.

    The prompted scaffold and models that ignore a safety system prompt
    (`Family.follows_system_prompt`) need one; native reasoners that follow it do not.
    """
    if family.is_native_reasoner and family.follows_system_prompt:
        return None
    return ResponsePrefill()


def generate_prefilled(
    lm: LoadedModel,
    prompts: Sequence[Any],
    settings: GenerationSettings,
    out: str | Path,
    prefill: ResponsePrefill = ResponsePrefill(),
    progress: bool = True,
) -> None:
    """Generate one response per prompt that continues `prefill.thinking`, then `prefill.answer`; resumable.

    Writes traces to `out` batch by batch, skipping ids already there, like
    `generate_traces`. Each trace's settings record the prefill.
    """
    import torch
    from tqdm.auto import tqdm

    from cliffkit.backends import make_backend
    from cliffkit.render import render_prompt

    engine = make_backend(lm)
    writer = TraceWriter(out, engine.model_id)
    tokenizer, family = engine.tokenizer, engine.family
    think_ids = tokenizer(prefill.thinking, add_special_tokens=False)["input_ids"]
    bridge_ids = tokenizer(family.forced_close + prefill.answer, add_special_tokens=False)["input_ids"]
    recorded = {**dataclasses.asdict(settings), "family": family.name, "dtype": engine.dtype_name,
                "backend": engine.name, "prefill": dataclasses.asdict(prefill)}

    batches = [prompts[start:start + settings.batch_size] for start in range(0, len(prompts), settings.batch_size)]
    for index, batch in enumerate(tqdm(batches, desc="prefilled responses", disable=not progress)):
        if all(prompt.id in writer.done for prompt in batch):
            continue
        batch_settings = replace(settings, seed=settings.seed + index)
        torch.manual_seed(batch_settings.seed)
        rendered = [render_prompt(tokenizer, family, prompt.text, settings.system) for prompt in batch]

        thinking_rows = engine.generate_rows([r.input_ids + think_ids for r in rendered], settings.think_budget,
                                             batch_settings, stop=[family.think_close])
        thinkings = []
        for row in thinking_rows:
            continuation = tokenizer.decode(row.ids, skip_special_tokens=False).split(family.think_close)[0]
            thinkings.append(_complete_sentences(prefill.thinking + continuation))
        # The answer continues from the cleaned thinking, so the trace is exactly what the model sees.
        prefixes = [r.input_ids + tokenizer(thinking, add_special_tokens=False)["input_ids"] + bridge_ids
                    for r, thinking in zip(rendered, thinkings)]
        answer_rows = engine.generate_rows(prefixes, settings.answer_budget, batch_settings, stop=())

        traces = []
        for prompt, r, thinking, thinking_row, answer_row in zip(batch, rendered, thinkings, thinking_rows,
                                                                 answer_rows):
            closed = family.think_close in tokenizer.decode(thinking_row.ids, skip_special_tokens=False)
            answer = prefill.answer + tokenizer.decode(answer_row.ids, skip_special_tokens=False)
            traces.append(Trace(
                prompt_id=prompt.id, model_id=engine.model_id, prompt=prompt.text, rendered=r.text,
                thinking=thinking, answer=answer.strip(), closed_by="model" if closed else "budget",
                finished=answer_row.hit_eos, thinking_tokens=len(thinking_row.ids),
                answer_tokens=len(answer_row.ids), source=getattr(prompt, "source", ""),
                category=getattr(prompt, "category", ""), harmful=True, settings=recorded,
            ))
        writer.write([trace for trace in traces if trace.prompt_id not in writer.done])


def _complete_sentences(text: str) -> str:
    """Cut `text` after its last sentence end (".", "!" or "?"); return it stripped, whole when it has none."""
    ends = [match.end() for match in re.finditer(r"[.!?](?=\s|$)", text)]
    return (text[:ends[-1]] if ends else text).strip()


# --------------------------------------------------------------------------- building a pool from the model

@dataclass
class PoolBuild:
    """A self-generated pool and the counts behind it."""

    examples: list[PoolExample]
    traces_path: Path
    pool_path: Path
    counts: dict[str, int]


def keep_reason(trace: Trace, require_model_close: bool = True) -> str:
    """Return "kept", or why a judged trace is not a usable safe response."""
    refused = trace.labels.get("refused")
    if refused is None:
        return "no answer"
    if not refused:
        return "did not refuse"
    if require_model_close and trace.closed_by != "model":
        return "think block closed by the budget"
    if not trace.thinking.strip():
        return "empty thinking"
    return "kept"


def examples_from_traces(traces: Sequence[Trace],
                         require_model_close: bool = True) -> tuple[list[PoolExample], dict[str, int]]:
    """Turn judged traces into pool examples, keeping refusals with a non-empty think block.

    With `require_model_close`, the model must have written the closing marker itself.
    """
    examples, counts = [], Counter()
    for trace in traces:
        reason = keep_reason(trace, require_model_close)
        counts[reason] += 1
        if reason != "kept":
            continue
        examples.append(PoolExample(
            id=trace.prompt_id, prompt=trace.prompt, thinking=trace.thinking.strip(), answer=trace.answer.strip(),
            source=trace.source, category=trace.category,
            meta={"generated_by": trace.model_id, "judge": trace.labels.get("judge"),
                  "matched": trace.labels.get("matched"), "closed_by": trace.closed_by,
                  "answer_finished": trace.finished},
        ))
    return examples, dict(counts)


def build_pool(
    lm: LoadedModel,
    prompts: Sequence[Any],
    out_dir: str | Path,
    settings: GenerationSettings | None = None,
    judge: Judge | None = None,
    require_model_close: bool | None = None,
    prefill: ResponsePrefill | None = None,
    progress: bool = True,
) -> PoolBuild:
    """Generate the model's own safe responses to `prompts` and keep the judged refusals.

    Traces go to `out_dir/pool_traces.jsonl`, appended batch by batch, so an
    interrupted build resumes; the kept examples are written to `out_dir/pool.jsonl`
    and the counts to `out_dir/pool_summary.json`. `settings.system` defaults to
    `safety_system_prompt(lm.family)`.

    `require_model_close` (default: True for native reasoners, False for the prompted
    scaffold) keeps only traces whose closing think marker the model wrote itself.
    NOTE: the scaffold rarely closes its thinking itself (1 of 48 traces of the
    default instruct model in this project's development runs, think budget 64-96).
    For it, a thinking closed by budget forcing is accepted, cut where the budget ran out.

    With `prefill`, the responses continue fixed openings (`generate_prefilled`) instead
    of being generated freely, which the judge then only checks for an answer.

    Raises `PoolOverlapError` when a prompt is also an evaluation prompt.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to build a pool from. Pass harmful train prompts, e.g. training_prompts().")
    check_disjoint(prompts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or GenerationSettings()
    if settings.system is None:
        settings = replace(settings, system=safety_system_prompt(lm.family))

    traces_path = out / "pool_traces.jsonl"
    if prefill is None:
        generate_traces(lm, prompts, settings, out=traces_path, progress=progress)
    else:
        generate_prefilled(lm, prompts, settings, traces_path, prefill, progress=progress)
    wanted = {prompt.id for prompt in prompts}
    traces = [trace for trace in read_traces(traces_path) if trace.prompt_id in wanted]
    judged = judge_traces(traces, judge)
    write_traces_atomic(traces_path, judged)

    if require_model_close is None:
        require_model_close = lm.family.is_native_reasoner
    examples, counts = examples_from_traces(judged, require_model_close)
    pool_path = write_pool(out / "pool.jsonl", examples)
    summary = {"model_id": lm.model_id, "family": lm.family.name, "prompts": len(prompts),
               "kept": len(examples), "reasons": counts, "require_model_close": require_model_close,
               "prefill": None if prefill is None else dataclasses.asdict(prefill),
               "system": settings.system,
               "think_budget": settings.think_budget, "answer_budget": settings.answer_budget}
    (out / "pool_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    logger.info("pool: kept %d of %d self-generated responses (%s)", len(examples), len(prompts), counts)
    return PoolBuild(examples=examples, traces_path=traces_path, pool_path=pool_path, counts=counts)


# --------------------------------------------------------------------------- the JSON Lines file

def write_pool(path: str | Path, examples: Iterable[PoolExample | dict[str, Any]]) -> Path:
    """Write pool examples (or dicts with the pool fields plus extras) as JSON Lines, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for example in examples:
            record = example.to_dict() if isinstance(example, PoolExample) else example
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def read_pool(path: str | Path) -> list[PoolExample]:
    """Read and validate a pool JSON Lines file.

    Raises `PoolFileError` naming the line and field for malformed JSON, a missing or
    empty field, a non-string field or a repeated id, and FileNotFoundError for a
    missing file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Pool file {str(path)!r} not found. Build one with `cliffkit select --build-pool` "
                                f"or write it yourself: {POOL_SCHEMA_HELP}")
    examples, first_line = [], {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            example = parse_pool_line(line, number, path)
            if example.id in first_line:
                raise PoolFileError(f"{path}, line {number}: id {example.id!r} repeats line "
                                    f"{first_line[example.id]}. Pool ids must be unique.")
            first_line[example.id] = number
            examples.append(example)
    if not examples:
        raise PoolFileError(f"{path} contains no pool examples. Expected {POOL_SCHEMA_HELP}")
    return examples


def parse_pool_line(line: str, number: int, path: str | Path = "<pool>") -> PoolExample:
    """Parse one pool line into a `PoolExample`, raising `PoolFileError` with the line number on bad input."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise PoolFileError(f"{path}, line {number}: invalid JSON ({error.msg} at column {error.colno}). "
                            f"Expected {POOL_SCHEMA_HELP}") from None
    if not isinstance(record, dict):
        raise PoolFileError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")

    for name in POOL_FIELDS:
        if name not in record:
            raise PoolFileError(f"{path}, line {number}: missing field {name!r}. Expected {POOL_SCHEMA_HELP}")
        if not isinstance(record[name], str):
            raise PoolFileError(f"{path}, line {number}: field {name!r} must be a string, "
                                f"got {type(record[name]).__name__}.")
    for name in NON_EMPTY_FIELDS:
        if not record[name].strip():
            raise PoolFileError(f"{path}, line {number}: field {name!r} is empty. Every example needs a "
                                "non-empty id, prompt, thinking and answer.")

    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise PoolFileError(f"{path}, line {number}: field 'meta' must be a JSON object, got {type(meta).__name__}.")
    extras = {key: value for key, value in record.items() if key not in POOL_FIELDS and key != "meta"}
    return PoolExample(**{name: record[name] for name in POOL_FIELDS}, meta={**meta, **extras})
