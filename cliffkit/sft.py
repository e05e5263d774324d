"""LoRA supervised fine-tuning on prompt -> target pairs, with the loss on the target tokens only.

`train_lora` is deterministic for a seed and checkpoints every few optimizer steps, so an
interrupted run resumes where it stopped. Saved adapters record the base model they were
trained on, and `load_adapter` refuses to apply one to another base model.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cliffkit.families import Family
from cliffkit.models import LoadedModel
from cliffkit.render import encode_prompt_text, render_prompt

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions without loss, as in torch.nn.functional.cross_entropy
ADAPTER_MARKER = "cliffkit_adapter.json"
CHECKPOINT_MARKER = "cliffkit_checkpoint.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_FINGERPRINT_SAMPLES = 4096


class AdapterMismatchError(ValueError):
    """An adapter applied to a base model other than the one it was trained on."""


@dataclass(frozen=True)
class SFTExample:
    """One training pair: a prompt and the text the model should write after it.

    `prompt` is user text that `train_lora` renders through the model's family with
    `render_prompt`, exactly as generation renders it. With `rendered=True` it is the
    final prompt text, tokenized as it is. `target` is the assistant text that
    follows the rendered prompt, including the end-of-turn token if the model should
    learn to stop.
    """

    id: str
    prompt: str
    target: str
    rendered: bool = False


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of prompt + target, with labels equal to the ids on the target and -100 on the prompt."""

    id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class SFTConfig:
    """LoRA shape and optimisation settings of one fine-tuning run.

    An optimizer step sums the loss of `grad_accum` micro-batches of `batch_size`
    examples, and divides by the number of target tokens in all of them, so the step
    does not depend on how the examples are split into micro-batches. `layers`
    restricts LoRA to those decoder blocks (None: all). Adapting only the upper blocks
    also spares the backward pass through the lower ones, which is most of the
    saving on a CPU.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    layers: tuple[int, ...] | None = None
    learning_rate: float = 2e-4
    warmup_steps: int = 2
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 1
    batch_size: int = 1
    grad_accum: int = 8
    max_length: int = 384
    seed: int = 0
    checkpoint_every: int = 10
    system: str | None = None

    def __post_init__(self) -> None:
        for name in ("rank", "epochs", "batch_size", "grad_accum", "max_length", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} must be at least 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"SFTConfig.learning_rate must be positive, got {self.learning_rate}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"SFTConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.warmup_steps < 0:
            raise ValueError(f"SFTConfig.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if not self.target_modules:
            raise ValueError("SFTConfig.target_modules is empty: name at least one module, e.g. 'q_proj'.")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-ready values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SFTConfig":
        values = dict(data)
        values["target_modules"] = tuple(values["target_modules"])
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        return cls(**values)


@dataclass
class SFTResult:
    """The trained model and its loss curve.

    `losses[i]` is the mean target-token cross-entropy of optimizer step i+1, in nats.
    `resumed_from` is the step restored from a checkpoint (0 for a fresh run), and
    `complete` is False when `stop_after` ended the run early.
    """

    model: Any  # peft.PeftModel wrapping the caller's model
    losses: list[float]
    total_steps: int
    target_tokens: int
    dropped: list[str] = field(default_factory=list)
    resumed_from: int = 0
    complete: bool = True
    seconds: float = 0.0
    data_hash: str = ""
    base_fingerprint: str = ""
    adapter_dir: Path | None = None


# --------------------------------------------------------------------------- encoding


def encode_example(tokenizer: PreTrainedTokenizerBase, family: Family, example: SFTExample,
                   system: str | None = None) -> EncodedExample:
    """Tokenize one example: the prompt as generation would render it, then the target on its own.

    The target is tokenized separately, so the prompt/target boundary matches generation,
    which starts from the prompt's last token.
    """
    if example.rendered:
        prompt_ids = encode_prompt_text(tokenizer, example.prompt)
    else:
        prompt_ids = render_prompt(tokenizer, family, example.prompt, system).input_ids
    target_ids = tokenizer(example.target, add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise ValueError(f"Example {example.id!r} has an empty target; every example needs text to learn.")
    return EncodedExample(id=example.id, input_ids=list(prompt_ids) + list(target_ids),
                          labels=[IGNORE_INDEX] * len(prompt_ids) + list(target_ids))


def collate(batch: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a micro-batch on the right: input_ids, attention_mask and labels, each (batch, seq).

    Right padding keeps every row's real tokens at positions 0..n-1, so the default
    position ids are right without passing them. (The tokenizer pads on the left for
    generation, so the padding here is done by hand.)
    """
    length = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(example.labels)
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def summed_target_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Return the summed cross-entropy over target tokens (a scalar, float32) and their count.

    Position t predicts token t+1, so only positions whose next token is a target get
    logits: the vocabulary projection is skipped on the prompt and on padding.
    """
    labels = batch["labels"]
    next_labels = labels[:, 1:]  # (batch, seq-1)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = next_labels != IGNORE_INDEX
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep, use_cache=False)
    logits = output.logits.float()  # (n_targets, vocab): float32 for a stable log-softmax
    targets = next_labels[next_labels != IGNORE_INDEX]
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


# --------------------------------------------------------------------------- data order


def plan_steps(n_examples: int, config: SFTConfig) -> list[list[list[int]]]:
    """Return the example indices of every optimizer step: steps -> micro-batches -> indices.

    Each epoch shuffles the examples with a generator seeded by (seed, epoch), so the
    order is the same on every run and a resumed run skips exactly the finished steps.
    """
    steps: list[list[list[int]]] = []
    for epoch in range(config.epochs):
        order = list(range(n_examples))
        random.Random(f"{config.seed}:{epoch}").shuffle(order)
        micro = [order[start:start + config.batch_size] for start in range(0, n_examples, config.batch_size)]
        steps += [micro[start:start + config.grad_accum] for start in range(0, len(micro), config.grad_accum)]
    return steps


def learning_rate_at(step: int, total_steps: int, config: SFTConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then linear decay to 10%.

    A pure function of the step, so resuming needs no scheduler state.
    """
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / (config.warmup_steps + 1)
    span = max(1, total_steps - config.warmup_steps)
    progress = (step - config.warmup_steps) / span
    return config.learning_rate * (1.0 - 0.9 * progress)


# --------------------------------------------------------------------------- fingerprints


def base_fingerprint(model: PreTrainedModel) -> str:
    """Return a SHA-256 over parameter names, shapes and an evenly spaced sample of each tensor's values.

    Values are cast to bfloat16 before hashing, so a float32 load and a bfloat16 load of
    the same checkpoint give the same fingerprint.
    NOTE: the values are a sample of up to 4096 per tensor, enough to tell two base models
    apart, but not a proof that no weight changed.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        if not flat.is_floating_point():
            continue
        stride = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
        sample = flat[::stride][:_FINGERPRINT_SAMPLES].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def hash_encoded(encoded: Sequence[EncodedExample]) -> str:
    """Return a SHA-256 of the token ids and labels, which identifies the training data of a run."""
    digest = hashlib.sha256()
    for example in encoded:
        digest.update(json.dumps([example.id, example.input_ids, example.labels]).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- folders


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _replace_folder(staged: Path, target: Path) -> None:
    """Move a finished folder into place; the old one is kept as `.old` until the new one is there."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.rename(target, old)
    os.rename(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def _staging_folder(target: Path) -> Path:
    staged = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    return staged


def read_marker(folder: str | Path, marker: str = ADAPTER_MARKER) -> dict[str, Any] | None:
    """Return the completion record of a folder, or None when the folder is missing or incomplete."""
    path = Path(folder) / marker
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _set_base_name(peft_model: Any, base_model_id: str) -> None:
    # PEFT records config.name_or_path, which for the embedded model is a local cache
    # folder; the portable model id is recorded instead.
    for adapter_config in peft_model.peft_config.values():
        adapter_config.base_model_name_or_path = base_model_id


def save_adapter(peft_model: Any, folder: str | Path, *, base_model_id: str, base_fingerprint: str,
                 metadata: dict[str, Any] | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Save a LoRA adapter with PEFT `save_pretrained`, plus a record of its base model, atomically.

    Everything is written into a temporary folder that is renamed into place after the
    record `cliffkit_adapter.json` (written last) is complete, so a half-written adapter
    is never mistaken for a finished one. `extra_files` maps file names to text.
    """
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = _staging_folder(target)

    _set_base_name(peft_model, base_model_id)
    # No embedding layer is adapted; "auto" would look the base id up on the Hub.
    peft_model.save_pretrained(str(staged), save_embedding_layers=False)
    # PEFT's model card is an empty template naming the local base folder; the record below replaces it.
    (staged / "README.md").unlink(missing_ok=True)
    for name, text in (extra_files or {}).items():
        (staged / name).write_text(text, encoding="utf-8")
    record = {"base_model_id": base_model_id, "base_fingerprint": base_fingerprint, **(metadata or {})}
    _write_json(staged / ADAPTER_MARKER, record)

    _replace_folder(staged, target)
    logger.info("Saved adapter to %s", target)
    return target


def check_adapter_base(folder: str | Path, model: PreTrainedModel, model_id: str = "") -> dict[str, Any]:
    """Return the adapter's record after checking that `model` is the base it was trained on.

    Raises FileNotFoundError for a folder without a finished adapter, and
    AdapterMismatchError when the base model differs.
    """
    record = read_marker(folder)
    if record is None:
        raise FileNotFoundError(
            f"{str(folder)!r} contains no finished cliffkit adapter (no {ADAPTER_MARKER}). "
            "Train one with `cliffkit.sft.train_lora` or rebuild it with `cliffkit distil-thinker`."
        )
    actual = base_fingerprint(model)
    if actual != record["base_fingerprint"]:
        raise AdapterMismatchError(
            f"The adapter in {str(folder)!r} was trained on base model {record['base_model_id']!r} "
            f"(fingerprint {record['base_fingerprint'][:12]}), but the model given"
            f"{' (' + model_id + ')' if model_id else ''} has fingerprint {actual[:12]}. "
            f"Load {record['base_model_id']!r} and apply the adapter to it."
        )
    return record


def load_adapter(lm: LoadedModel, folder: str | Path, *, merge: bool = True, family: Family | None = None,
                 model_id: str | None = None) -> LoadedModel:
    """Apply a saved adapter to `lm`'s model, checking the base model first.

    With `merge=True` the LoRA update is added into the base weights (`merge_and_unload`),
    so hooks and head layouts see plain Linear modules again. The base model is changed
    in place. Returns a LoadedModel with `family` and `model_id` (defaults: those of `lm`).
    """
    from peft import PeftModel

    check_adapter_base(folder, lm.model, lm.model_id)
    model = PeftModel.from_pretrained(lm.model, str(folder))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return LoadedModel(model=model, tokenizer=lm.tokenizer, family=family or lm.family,
                       model_id=model_id or lm.model_id)


# --------------------------------------------------------------------------- checkpoints


@dataclass
class _TrainState:
    step: int
    losses: list[float]


def _identity(config: SFTConfig, data_hash: str, fingerprint: str) -> dict[str, Any]:
    return {"config": config.to_dict(), "data_hash": data_hash, "base_fingerprint": fingerprint}


def _save_checkpoint(run_dir: Path, peft_model: Any, optimizer: torch.optim.Optimizer,
                     params: list[torch.nn.Parameter], state: _TrainState, identity: dict[str, Any]) -> None:
    target = run_dir / "checkpoint"
    staged = _staging_folder(target)
    peft_model.save_pretrained(str(staged), save_embedding_layers=False)

    # The optimizer state goes to safetensors (no pickle), keyed by parameter index.
    tensors: dict[str, torch.Tensor] = {}
    for index, param in enumerate(params):
        for name, value in optimizer.state.get(param, {}).items():
            tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(staged / OPTIMIZER_FILE))

    _write_json(staged / CHECKPOINT_MARKER, {**identity, "step": state.step, "losses": state.losses})
    _replace_folder(staged, target)
    logger.info("Checkpoint at step %d written to %s", state.step, target)


def _find_checkpoint(run_dir: Path) -> Path | None:
    # `.old` is the previous checkpoint, left alone only if a rename was interrupted.
    for candidate in (run_dir / "checkpoint", run_dir / "checkpoint.old"):
        if read_marker(candidate, CHECKPOINT_MARKER) is not None:
            return candidate
    return None


def _restore_checkpoint(folder: Path, peft_model: Any, optimizer: torch.optim.Optimizer,
                        params: list[torch.nn.Parameter], identity: dict[str, Any]) -> _TrainState:
    from peft import set_peft_model_state_dict

    record = read_marker(folder, CHECKPOINT_MARKER) or {}
    if {key: record.get(key) for key in identity} != identity:
        raise ValueError(
            f"The checkpoint in {str(folder)!r} belongs to another run (different settings, data or base "
            "model). Delete that folder to start over, or use another run folder."
        )

    weights = load_file(str(folder / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, weights)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"Checkpoint {folder} has unexpected adapter weights: {result.unexpected_keys[:3]}")

    saved = load_file(str(folder / OPTIMIZER_FILE))
    for index, param in enumerate(params):
        entries = {key.split(".", 1)[1]: value for key, value in saved.items() if key.split(".", 1)[0] == str(index)}
        if entries:
            optimizer.state[param] = {name: value.to(param.device) for name, value in entries.items()}
    return _TrainState(step=int(record["step"]), losses=[float(loss) for loss in record["losses"]])


# --------------------------------------------------------------------------- training


def _lora_config(config: SFTConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        layers_to_transform=list(config.layers) if config.layers is not None else None,
        bias="none", task_type="CAUSAL_LM",
    )


def _encode_all(lm: LoadedModel, examples: Sequence[SFTExample],
                config: SFTConfig) -> tuple[list[EncodedExample], list[str]]:
    ids = [example.id for example in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("Example ids must be unique: the data hash and resuming rely on them.")

    encoded, dropped = [], []
    for example in examples:
        item = encode_example(lm.tokenizer, lm.family, example, config.system)
        if len(item.input_ids) > config.max_length:
            dropped.append(example.id)
            continue
        encoded.append(item)
    if dropped:
        logger.warning("Dropped %d of %d examples longer than max_length=%d tokens (first: %s). "
                       "Raise max_length or shorten them to keep them.",
                       len(dropped), len(examples), config.max_length, dropped[0])
    if not encoded:
        raise ValueError(f"No example fits in max_length={config.max_length} tokens; raise max_length.")
    return encoded, dropped


def train_lora(
    lm: LoadedModel,
    examples: Sequence[SFTExample],
    config: SFTConfig = SFTConfig(),
    run_dir: str | Path | None = None,
    *,
    stop_after: int | None = None,
    progress: bool = True,
) -> SFTResult:
    """Fine-tune LoRA adapters on `examples`, with the loss on the target tokens only.

    With `run_dir`, a checkpoint is written there every `config.checkpoint_every`
    optimizer steps and a rerun resumes from it. The finished adapter is saved to
    `run_dir/adapter`, and a rerun after that trains nothing. `stop_after` ends the run
    after that many optimizer steps (for time-boxed runs), leaving a checkpoint.

    `lm.model` is changed in place: PEFT injects the LoRA layers into it. Use
    `result.model` (a PeftModel) for the adapted model, or `merge_and_unload()` it.
    Examples longer than `config.max_length` tokens are dropped with a warning, and
    their ids are listed in `result.dropped`.
    """
    from peft import get_peft_model

    started = time.perf_counter()
    encoded, dropped = _encode_all(lm, examples, config)
    data_hash = hash_encoded(encoded)
    fingerprint = base_fingerprint(lm.model)
    identity = _identity(config, data_hash, fingerprint)
    run_path = Path(run_dir) if run_dir is not None else None

    # LoRA A matrices get a random init, so the seed is set before PEFT creates them.
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(lm.model, _lora_config(config))
    params = [param for param in peft_model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = plan_steps(len(encoded), config)
    result = SFTResult(model=peft_model, losses=[], total_steps=len(steps),
                       target_tokens=sum(item.target_tokens for item in encoded), dropped=dropped,
                       data_hash=data_hash, base_fingerprint=fingerprint)

    finished = _reuse_finished_adapter(run_path, peft_model, identity, result)
    if finished is not None:
        return finished

    state = _TrainState(step=0, losses=[])
    checkpoint = _find_checkpoint(run_path) if run_path is not None else None
    if checkpoint is not None:
        state = _restore_checkpoint(checkpoint, peft_model, optimizer, params, identity)
        logger.info("Resuming from %s at step %d of %d", checkpoint, state.step, len(steps))
    result.resumed_from = state.step

    last = len(steps) if stop_after is None else min(len(steps), stop_after)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    peft_model.train()
    bar = tqdm(total=len(steps), initial=state.step, desc="sft", unit="step", disable=not progress)
    while state.step < last:
        loss = _optimizer_step(peft_model, optimizer, params, encoded, steps, state.step, pad_id, config)
        state.losses.append(loss)
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        logger.info("step %d/%d loss %.4f lr %.2e", state.step, len(steps), loss,
                    learning_rate_at(state.step - 1, len(steps), config))
        at_checkpoint = state.step % config.checkpoint_every == 0 or state.step == last
        if run_path is not None and at_checkpoint:
            _save_checkpoint(run_path, peft_model, optimizer, params, state, identity)
    bar.close()
    peft_model.eval()

    result.losses = state.losses
    result.complete = state.step == len(steps)
    result.seconds = time.perf_counter() - started
    if run_path is not None and result.complete:
        metadata = {**identity, "losses": state.losses, "target_tokens": result.target_tokens,
                    "examples": len(encoded), "dropped": dropped}
        result.adapter_dir = save_adapter(peft_model, run_path / "adapter", base_model_id=lm.model_id,
                                          base_fingerprint=fingerprint, metadata=metadata)
    return result


def _reuse_finished_adapter(run_path: Path | None, peft_model: Any, identity: dict[str, Any],
                            result: SFTResult) -> SFTResult | None:
    from peft import set_peft_model_state_dict

    if run_path is None:
        return None
    record = read_marker(run_path / "adapter")
    if record is None:
        return None
    if {key: record.get(key) for key in identity} != identity:
        raise ValueError(
            f"{str(run_path / 'adapter')!r} contains an adapter from other settings, data or base model. "
            "Delete it (and the checkpoint folder next to it) to retrain, or use another run folder."
        )
    set_peft_model_state_dict(peft_model, load_file(str(run_path / "adapter" / "adapter_model.safetensors")))
    peft_model.eval()
    logger.info("%s already contains the finished adapter, so training is skipped", run_path / "adapter")
    result.losses = [float(loss) for loss in record["losses"]]
    result.adapter_dir = run_path / "adapter"
    result.resumed_from = result.total_steps
    return result


def _optimizer_step(model: Any, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                    encoded: list[EncodedExample], steps: list[list[list[int]]], step: int,
                    pad_id: int, config: SFTConfig) -> float:
    # Seeding per step makes dropout, if any, the same in a resumed run as in an uninterrupted one.
    torch.manual_seed(config.seed * 1_000_003 + step)
    micro_batches = [[encoded[index] for index in indices] for indices in steps[step]]
    window_tokens = sum(item.target_tokens for batch in micro_batches for item in batch)

    device = next(model.parameters()).device
    total = 0.0  # float64 sum of per-token losses, so the logged mean is not rounded per micro-batch
    for batch in micro_batches:
        tensors = {key: value.to(device) for key, value in collate(batch, pad_id).items()}
        summed, _ = summed_target_loss(model, tensors)
        (summed / window_tokens).backward()
        total += float(summed.detach())

    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate_at(step, len(steps), config)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    loss = total / window_tokens
    if not math.isfinite(loss):
        raise RuntimeError(f"The training loss became {loss} at step {step + 1}; lower learning_rate.")
    return loss
