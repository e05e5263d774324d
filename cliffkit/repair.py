"""LoRA safety repair: fine-tune a model on selected safe responses (thinking + refusal answer) and load the result.

Training goes through `cliffkit.sft.train_lora` with the loss on the assistant part only.
A repair folder contains `adapter/` (written by `cliffkit.sft`, complete only with its
marker file), the resumable `checkpoint/`, and `repair.json`, written last through a
temporary file and a rename. A folder without `repair.json` is no finished repair. The record
names the whole base chain, so loading the adapter on another base raises.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from cliffkit.models import LoadedModel
from cliffkit.pool import PoolExample, check_disjoint
from cliffkit.sft import (ADAPTER_MARKER, AdapterMismatchError, SFTConfig, SFTExample, base_fingerprint,
                          check_adapter_base, read_marker, train_lora)

logger = logging.getLogger(__name__)

REPAIR_RECORD = "repair.json"
# A repaired model's id is "<base id>+lora:<adapter id>"; a probe of the base is read on it unchanged.
REPAIRED_MARK = "+lora:"

# Rank 8 and a few epochs keep a repair of the 0.5B default model on k = 8-16 examples CPU-sized.
DEFAULT_REPAIR_CONFIG = SFTConfig(rank=8, alpha=16.0, learning_rate=2e-4, warmup_steps=2, epochs=3,
                                  batch_size=1, grad_accum=4, max_length=512, checkpoint_every=4)


@dataclass
class RepairResult:
    """A finished repair: where its adapter lies, the id the repaired model gets, and the loss curve."""

    repair_dir: Path
    adapter_dir: Path
    model_id: str
    record: dict[str, Any]
    losses: list[float]


class IncompleteRepairError(RuntimeError):
    """Training stopped before its last step, so the repair folder contains a checkpoint but no adapter."""


# --------------------------------------------------------------------------- data

def repair_target(example: PoolExample, lm: LoadedModel) -> str:
    """Return what the model should write after the rendered prompt: thinking, closing marker, answer, end of turn.

    The closing marker is written as `family.forced_close`, the same text that
    `tokenize_trace` and budget forcing put after the thinking.
    """
    end_of_turn = lm.tokenizer.eos_token or ""
    return f"{example.thinking.strip()}{lm.family.forced_close}{example.answer.strip()}{end_of_turn}"


def sft_examples(pool: Sequence[PoolExample], lm: LoadedModel) -> list[SFTExample]:
    """Turn pool examples into SFT pairs; the prompt is rendered later with the family's default system prompt.

    The safety system prompt used to write the responses is NOT part of the training
    prompt: the model learns to answer safely as it is prompted in normal use.
    """
    return [SFTExample(id=example.id, prompt=example.prompt, target=repair_target(example, lm)) for example in pool]


def upper_half_layers(lm: LoadedModel) -> tuple[int, ...]:
    """Return the indices of the upper half of the decoder blocks, e.g. 12..23 of 24.

    LoRA on these blocks only also spares the backward pass through the lower half,
    the main saving when training on a CPU.
    """
    total = lm.model.config.num_hidden_layers
    return tuple(range(total // 2, total))


# --------------------------------------------------------------------------- lineage

def base_model_id(model_id: str) -> str:
    """Return the id of the model at the bottom of a repair chain ("a+lora:x+lora:y" -> "a")."""
    return model_id.split(REPAIRED_MARK, 1)[0]


def lineage(lm: LoadedModel) -> list[dict[str, Any]]:
    """Return the chain of models and adapters that `lm` was built from, oldest first.

    A model loaded by `load_repaired` carries its chain on `model.cliffkit_lineage`.
    Adapters merged at load time and listed in the config (`cliffkit_adapters`) come
    first. Any other model is one link: its id and family.
    """
    recorded = getattr(lm.model, "cliffkit_lineage", None)
    if recorded:
        return list(recorded)
    links: list[dict[str, Any]] = []
    for adapter in getattr(lm.model.config, "cliffkit_adapters", None) or []:
        links.append({"kind": "merged adapter", **dict(adapter)})
    links.append({"kind": "model", "model_id": lm.model_id, "family": lm.family.name})
    return links


def _adapter_id(name: str, identity: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{name}-{digest[:10]}"


# --------------------------------------------------------------------------- training

def repair(
    lm: LoadedModel,
    pool: Sequence[PoolExample],
    out_dir: str | Path,
    config: SFTConfig = DEFAULT_REPAIR_CONFIG,
    *,
    name: str | None = None,
    selection: dict[str, Any] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> RepairResult:
    """Train a LoRA repair adapter on the safe responses of `pool` and record it in `out_dir`.

    A rerun resumes from the last checkpoint, or returns at once when the adapter is
    finished. With `stop_after` (optimizer steps) the run stops early and raises
    `IncompleteRepairError`, leaving a checkpoint and no adapter. `lm.model` is changed
    in place (LoRA layers are injected), so load a fresh base for the next repair.

    Args:
        pool: the selected training examples (e.g. `read_pool(".../cliff-k16.jsonl")`).
        name: the adapter's name (default: the folder name); the repaired model id is
            "<lm.model_id>+lora:<name>-<hash>".
        selection: facts about how the examples were chosen, stored in the record.
    """
    pool = list(pool)
    if not pool:
        raise ValueError("no training examples: the selection is empty. Select at least one pool example.")
    check_disjoint(pool)
    out = Path(out_dir)
    name = name or out.name

    fingerprint = base_fingerprint(lm.model)
    chain = lineage(lm)
    logger.info("repairing %s on %d examples into %s", lm.model_id, len(pool), out)
    result = train_lora(lm, sft_examples(pool, lm), config, run_dir=out, stop_after=stop_after, progress=progress)
    if not result.complete:
        raise IncompleteRepairError(
            f"training stopped after step {len(result.losses)} of {result.total_steps}, so {out / 'checkpoint'} "
            "contains the training state and no adapter was written. Rerun the same repair to resume."
        )

    dropped = set(result.dropped)
    identity = {"base_fingerprint": fingerprint, "data_hash": result.data_hash, "config": config.to_dict()}
    adapter_id = _adapter_id(name, identity)
    record = {
        "name": name,
        "adapter_id": adapter_id,
        "model_id": f"{lm.model_id}{REPAIRED_MARK}{adapter_id}",
        "base_model_id": lm.model_id,
        "base_family": lm.family.name,
        "base_fingerprint": fingerprint,
        "lineage": chain,
        "examples": [example.id for example in pool if example.id not in dropped],
        "dropped": result.dropped,
        "losses": result.losses,
        "target_tokens": result.target_tokens,
        "data_hash": result.data_hash,
        "sft_config": config.to_dict(),
        "selection": selection or {},
        "train_seconds": round(result.seconds, 1),
    }
    _write_record(out / REPAIR_RECORD, record)
    logger.info("repair %s finished: loss %.4f -> %.4f", adapter_id, result.losses[0], result.losses[-1])
    return RepairResult(repair_dir=out, adapter_dir=out / "adapter", model_id=record["model_id"], record=record,
                        losses=result.losses)


def _write_record(path: Path, record: dict[str, Any]) -> None:
    temporary = path.with_suffix(".json.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# --------------------------------------------------------------------------- loading

def read_repair_record(repair_dir: str | Path) -> dict[str, Any]:
    """Return the record of a finished repair; raise FileNotFoundError when the folder contains none."""
    folder = Path(repair_dir)
    path = folder / REPAIR_RECORD
    if not path.is_file() or read_marker(folder / "adapter", ADAPTER_MARKER) is None:
        state = "a checkpoint of an interrupted run" if (folder / "checkpoint").exists() else "no finished adapter"
        raise FileNotFoundError(f"{str(folder)!r} contains {state}, not a finished repair ({REPAIR_RECORD} and "
                                f"adapter/{ADAPTER_MARKER} are written last). Rerun `cliffkit repair` into it.")
    return json.loads(path.read_text(encoding="utf-8"))


def load_repaired(
    repair_dir: str | Path,
    base: LoadedModel | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    merge: bool | Literal["auto"] = "auto",
) -> LoadedModel:
    """Load the base model of a repair (or take `base`) and apply the repair adapter.

    Raises `AdapterMismatchError` when `base` is not the model the adapter was trained
    on (compared by weight fingerprint, which covers adapters merged into the base,
    such as the thinker's), and FileNotFoundError for an unfinished repair. `base` is
    changed in place.

    merge: True adds the LoRA update into the weights, False keeps the LoRA layers
        beside them, "auto" merges only float32 models.
        NOTE: merging into bfloat16 weights rounds each updated weight to 8 mantissa
        bits, which erases most of a small repair update, hence "auto".
    """
    from peft import PeftModel

    record = read_repair_record(repair_dir)
    if base is None:
        from cliffkit.models import load_model

        base = load_model(record["base_model_id"], family=record["base_family"], dtype=dtype, device=device)
    elif base.model_id != record["base_model_id"]:
        logger.warning("applying a repair of %s to a model loaded as %s; the weight fingerprint decides",
                       record["base_model_id"], base.model_id)

    adapter_dir = Path(repair_dir) / "adapter"
    check_adapter_base(adapter_dir, base.model, base.model_id)
    if record.get("base_fingerprint") not in (None, read_marker(adapter_dir)["base_fingerprint"]):
        raise AdapterMismatchError(f"{repair_dir}: {REPAIR_RECORD} and the adapter record name different base "
                                   "models; the folder mixes two runs. Rerun the repair into an empty folder.")

    should_merge = base.dtype == torch.float32 if merge == "auto" else bool(merge)
    peft_model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    # Without merging, the inner transformers model (with LoRA layers injected) is kept, so
    # hooks find decoder blocks at the family's usual module paths.
    model = peft_model.merge_and_unload() if should_merge else peft_model.base_model.model
    model.eval()
    model.cliffkit_lineage = [*record.get("lineage", []),
                              {"kind": "repair adapter", "adapter_id": record["adapter_id"],
                               "base_fingerprint": record["base_fingerprint"], "merged": should_merge}]
    return replace(base, model=model, model_id=record["model_id"])
