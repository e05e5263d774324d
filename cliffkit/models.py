"""Load causal language models, by Hugging Face id, local folder or embedded name.

`load_model()` returns the model with its tokenizer and family, ready for batched
generation (left padding) and for hooks. With no argument it loads the embedded
default, which needs no network.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cliffkit.embedded import EMBEDDED_INSTRUCT, ensure_embedded_model
from cliffkit.families import Family, detect_family, get_family
from cliffkit.merged import ensure_merged_model

logger = logging.getLogger(__name__)

# The embedded base with the distilled think-format LoRA adapter merged in; the plain
# instruct model stays available as the "before" model of the distillation.
EMBEDDED_THINKER = "cliffkit/qwen2.5-coder-0.5b-think"
DEFAULT_MODEL = EMBEDDED_THINKER
# Embedded name -> family. Every embedded name loads the same converted base folder.
EMBEDDED_MODELS = {EMBEDDED_INSTRUCT: "scaffold", EMBEDDED_THINKER: "cliffkit-thinker"}
# Embedded name -> adapter folder under cliffkit/adapters/, merged into the base at load time.
EMBEDDED_ADAPTERS = {EMBEDDED_THINKER: "thinker"}


@dataclass
class LoadedModel:
    """A model with its tokenizer, family and the id it was loaded by."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: Family
    model_id: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(device: str | None = "auto") -> str:
    """Return "cuda" when a GPU is visible and `device` is "auto" or None, else `device` or "cpu"."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Pick the compute dtype.

    "auto" gives bfloat16 on CPU (measured on 2 cores with the default model: about
    1.9x faster than float32 and half the peak memory) and on GPUs that support it,
    float16 on older GPUs. Pass "float32" for exact numerics.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"Unknown dtype {dtype!r}. Use one of: auto, {', '.join(sorted(names))}.")
    return names[dtype]


def resolve_source(model_id: str) -> str:
    """Map an embedded model name to its converted folder; other ids pass through unchanged."""
    if model_id in EMBEDDED_MODELS:
        return str(ensure_embedded_model())
    return model_id


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _not_found_error(model_id: str, error: Exception) -> ValueError:
    where = "while offline (HF_HUB_OFFLINE=1)" if _offline() else "on the Hugging Face Hub"
    return ValueError(
        f"Model {model_id!r} is not a local folder and was not found in the Hugging Face cache {where}: "
        f"{error}. Pass a local folder, download it first on a machine with network "
        f"(`hf download {model_id}`), or use the embedded default {DEFAULT_MODEL!r}."
    )


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer set up for batched generation: left padding and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    # Left padding keeps every row's last real token at index -1, which both
    # generation and last-position probes rely on.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_id: str = DEFAULT_MODEL,
    *,
    family: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    max_memory: dict[int | str, int | str] | None = None,
) -> LoadedModel:
    """Load a causal LM with its tokenizer and family.

    Args:
        model_id: a Hugging Face id, a local folder, or an embedded name such as
            "cliffkit/qwen2.5-coder-0.5b-think" (the default).
        family: a family name from `cliffkit.families.FAMILIES`; detected from the id
            and config when None.
        dtype: "auto", "float32", "bfloat16" or "float16", or a torch dtype.
        device: "auto", "cpu", "cuda", "cuda:1", ... Ignored when `device_map` is set.
        device_map: passed to transformers and accelerate: "auto" (or "balanced",
            "balanced_low_0", "sequential") shards the layers over all visible GPUs,
            a device name puts the whole model there, and a dict maps module names to
            devices, e.g. {"": "cpu"}. A sharded model takes its inputs on the device
            of the input embedding (`cliffkit.backends.input_device`), and code that
            reads activations must move each layer's tensors to the CPU itself.
        trust_remote_code: stays off unless the caller sets it.
        max_memory: with `device_map`, the memory each device may hold, e.g.
            {0: "70GiB", 1: "70GiB", "cpu": "100GiB"}.

    Example:
        >>> lm = load_model()                      # doctest: +SKIP
        >>> lm.family.name                         # doctest: +SKIP
        'cliffkit-thinker'
    """
    source = resolve_source(model_id)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(source, trust_remote_code)
    except OSError as error:
        raise _not_found_error(model_id, error) from error

    resolved_family = _pick_family(model_id, config.model_type, family)

    placement = _placement_kwargs(device_map, max_memory)
    logger.info("Loading %s (%s, family %s) on %s", model_id, torch_dtype, resolved_family.name,
                device_map or device)
    if model_id in EMBEDDED_ADAPTERS and device_map is None:
        model = _load_embedded_merged(model_id, source, tokenizer, resolved_family, torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **placement,
        )
        if model_id in EMBEDDED_ADAPTERS:
            model = _merge_embedded_adapter(model, tokenizer, resolved_family, model_id)
    if device_map is None:
        model.to(device)
    else:
        _log_placement(model_id, model)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, family=resolved_family, model_id=model_id)


def embedded_adapter_path(model_id: str) -> Path:
    """Return the folder of the LoRA adapter shipped for an embedded name such as EMBEDDED_THINKER."""
    return Path(str(resources.files("cliffkit"))) / "adapters" / EMBEDDED_ADAPTERS[model_id]


def _load_embedded_merged(model_id: str, source: str, tokenizer: PreTrainedTokenizerBase, family: Family,
                          dtype: torch.dtype) -> PreTrainedModel:
    """Return the embedded base with its shipped adapter merged, in `dtype`.

    The adapter is merged into float32 weights, so the sum is rounded to `dtype` once,
    not added to weights that were already rounded. A 16-bit result is cached on disk
    (`cliffkit.merged`), so only the first load pays the float32 peak.
    """
    def build() -> PreTrainedModel:
        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        return _merge_embedded_adapter(base, tokenizer, family, model_id).to(dtype)

    if dtype == torch.float32:
        return build()
    folder = ensure_merged_model(model_id, _shipped_adapter(model_id), dtype, build)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


def _shipped_adapter(model_id: str) -> Path:
    """Return the adapter folder of an embedded name, or raise FileNotFoundError with the fix."""
    from cliffkit.sft import read_marker

    folder = embedded_adapter_path(model_id)
    if read_marker(folder) is None:
        raise FileNotFoundError(
            f"The adapter of {model_id!r} is missing from {folder}. Reinstall cliffkit, or rebuild it with "
            f"`cliffkit distil-thinker --out {folder}`; {EMBEDDED_INSTRUCT!r} loads without it."
        )
    return folder


def _merge_embedded_adapter(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: Family,
                            model_id: str) -> PreTrainedModel:
    from cliffkit.sft import load_adapter

    folder = _shipped_adapter(model_id)
    base = LoadedModel(model=model, tokenizer=tokenizer, family=family, model_id=EMBEDDED_INSTRUCT)
    return load_adapter(base, folder, merge=True, model_id=model_id).model


# device_map strings that ask accelerate to plan the split; any other string names one device.
SHARDING_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement_kwargs(device_map: str | dict[str, Any] | None,
                      max_memory: dict[int | str, int | str] | None) -> dict[str, Any]:
    """Check `device_map` and `max_memory` and return them as `from_pretrained` keyword arguments."""
    if device_map is None:
        if max_memory is not None:
            raise ValueError("max_memory needs device_map (for example device_map='auto'); "
                             "without a device map the whole model goes to one device.")
        return {"device_map": None}
    if isinstance(device_map, dict):
        if not device_map:
            raise ValueError("device_map is an empty dict. Map module names to devices, e.g. {'': 'cpu'}, "
                             "or pass device_map='auto'.")
    elif isinstance(device_map, str):
        if device_map not in SHARDING_STRATEGIES:
            try:
                torch.device(device_map)
            except RuntimeError as error:
                strategies = ", ".join(SHARDING_STRATEGIES)
                raise ValueError(f"Invalid device_map {device_map!r}: {error}. Use one of {strategies}, "
                                 "a device such as 'cuda:0', or a dict.") from None
    else:
        raise ValueError(f"device_map must be a string or a dict, got {type(device_map).__name__}.")
    kwargs: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    return kwargs


def _log_placement(model_id: str, model: PreTrainedModel) -> None:
    """Log where accelerate put the layers, and warn when some went to the CPU or disk."""
    # accelerate sets hf_device_map only when it splits the model over several devices.
    placement = getattr(model, "hf_device_map", None) or {}
    mapped = {str(device) for device in placement.values()}
    # Parameters offloaded to disk sit on the "meta" device until accelerate loads them.
    used = {str(parameter.device) for parameter in model.parameters()} - {"meta"}
    devices = sorted(mapped | used)
    logger.info("%s is placed on: %s", model_id, ", ".join(devices))
    offloaded = {"cpu", "disk"} & set(devices)
    if offloaded and len(devices) > 1:
        logger.warning("%s: some layers are offloaded to %s, which makes generation much slower. "
                       "Use more GPUs, a smaller dtype, or raise max_memory.", model_id, " and ".join(sorted(offloaded)))


def _pick_family(model_id: str, model_type: str, family: str | None) -> Family:
    if family is not None:
        return get_family(family)
    if model_id in EMBEDDED_MODELS:
        return get_family(EMBEDDED_MODELS[model_id])
    # The whole path is matched, so a Hub cache folder such as
    # models--deepseek-ai--DeepSeek-R1-Distill-Qwen-7B/snapshots/<hash> still selects its family.
    return detect_family(model_id, model_type)


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: str | Family,
               model_id: str | None = None) -> LoadedModel:
    """Wrap an already loaded model and tokenizer, for example a tiny test model."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    resolved = get_family(family) if isinstance(family, str) else family
    name = model_id or getattr(model.config, "name_or_path", "") or "unnamed-model"
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, family=resolved, model_id=name)
