"""Generation backends: Hugging Face `generate` (default) and vLLM (optional, for GPUs).

Both implement `GenerationBackend.generate_rows`, so the two-phase budget forcing in
`cliffkit.generate` is written once and writes the same trace schema for either.
"""

from __future__ import annotations

from typing import Any

from cliffkit.backends.base import GeneratedRow, GenerationBackend, cut_at_end, end_token_ids
from cliffkit.backends.devices import input_device, is_sharded, model_devices
from cliffkit.backends.hf import HFBackend
from cliffkit.models import LoadedModel

BACKENDS = ("hf", "vllm")

__all__ = [
    "BACKENDS", "GeneratedRow", "GenerationBackend", "HFBackend", "cut_at_end", "end_token_ids",
    "input_device", "is_sharded", "load_backend", "make_backend", "model_devices",
]


def make_backend(lm: LoadedModel | GenerationBackend, backend: str = "hf", **options: Any) -> GenerationBackend:
    """Return the backend that generates for `lm`.

    A backend object passes through unchanged. A `LoadedModel` gets the backend named
    by `backend`. "hf" runs the loaded weights. "vllm" starts vLLM on the same model id
    and reuses only the tokenizer and family, so prefer `load_backend`, which never
    loads the transformers weights.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. Use one of: {', '.join(BACKENDS)}.")
    if isinstance(lm, LoadedModel):
        if backend == "hf":
            if options:
                raise ValueError(f"Options {sorted(options)} apply to the vllm backend only.")
            return HFBackend(lm)
        from cliffkit.backends.vllm_backend import VLLMBackend

        return VLLMBackend.from_loaded(lm, **options)
    if isinstance(lm, GenerationBackend):
        if backend != "hf" and backend != lm.name:
            raise ValueError(f"backend={backend!r} was requested, but a ready {lm.name!r} backend was passed. "
                             "Pass a LoadedModel to build the requested backend, or drop the backend argument.")
        return lm
    raise TypeError(f"Expected a LoadedModel or a GenerationBackend, got {type(lm).__name__}. "
                    "Load a model with cliffkit.models.load_model or build one with load_backend.")


def load_backend(backend: str, model_id: str, *, family: str | None = None, dtype: str = "auto",
                 device: str = "auto", device_map: str | dict[str, Any] | None = None,
                 **options: Any) -> LoadedModel | GenerationBackend:
    """Load what generation needs for `backend` without loading anything it does not use.

    "hf" returns a `LoadedModel` (its weights on `device`, or sharded by `device_map`);
    "vllm" returns a `VLLMBackend` and never loads the transformers weights. `options`
    go to `VLLMBackend` (tensor_parallel_size, gpu_memory_utilization, max_model_len).
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. Use one of: {', '.join(BACKENDS)}.")
    if backend == "hf":
        from cliffkit.models import load_model

        if options:
            raise ValueError(f"Options {sorted(options)} apply to the vllm backend only.")
        return load_model(model_id, family=family, dtype=dtype, device=device, device_map=device_map)
    from cliffkit.backends.vllm_backend import VLLMBackend

    return VLLMBackend(model_id, family=family, dtype=dtype, **options)
