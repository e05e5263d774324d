"""Run profiles: the parameters of every step of the refusal-cliff pipeline, sized for a machine.

Each profile is a JSON file in this package (ci, laptop, gpu, multi-gpu) naming the
model, prompt counts per source, budgets, batch sizes, layers to probe, the head
ablation sweep, the repair set sizes and the seeds. `load_profile` reads and checks
one; a path to a JSON file of the same shape works too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from cliffkit.backends import BACKENDS

PROFILE_NAMES = ("ci", "laptop", "gpu", "multi-gpu")

_REQUIRED = ("name", "description", "hardware", "estimated_runtime", "model", "dtype", "backend",
             "prompts", "generation", "activations", "probe", "cliff", "heads", "repair", "seeds")
_OPTIONAL = ("family", "device_map", "tensor_parallel_size")
_GENERATION_KEYS = {"think_budget", "answer_budget", "temperature", "top_p", "batch_size", "seed"}


@dataclass(frozen=True)
class Profile:
    """One run profile. The nested sections are plain dicts, documented in `cliffkit/profiles/README.md`.

    `generation["batch_size"]` is an int or "auto" (see `cliffkit.memory.resolve_batch_size`).
    `estimated_runtime` is an estimate in words, not a measurement.
    """

    name: str
    description: str
    hardware: str
    estimated_runtime: str
    model: str
    dtype: str
    backend: str
    prompts: dict[str, Any]
    generation: dict[str, Any]
    activations: dict[str, Any]
    probe: dict[str, Any]
    cliff: dict[str, Any]
    heads: dict[str, Any]
    repair: dict[str, Any]
    seeds: list[int]
    family: str | None = None
    device_map: str | None = None
    tensor_parallel_size: int = 1
    source: str = field(default="", compare=False)

    @property
    def per_source(self) -> dict[str, int]:
        """Number of prompts drawn from each prompt source."""
        return dict(self.prompts["per_source"])

    def generation_settings(self, batch_size: int | None = None, **overrides: Any):
        """Return `GenerationSettings` for this profile.

        A profile with `batch_size: "auto"` needs `batch_size` here, for example from
        `cliffkit.memory.resolve_batch_size` once the model is loaded.
        """
        from cliffkit.generate import GenerationSettings

        values = dict(self.generation)
        if batch_size is not None:
            values["batch_size"] = batch_size
        if values["batch_size"] == "auto":
            raise ValueError(f"Profile {self.name!r} sets batch_size 'auto'; pass batch_size=... resolved "
                             "with cliffkit.memory.resolve_batch_size after loading the model.")
        values.update(overrides)
        return GenerationSettings(**values)


def load_profile(name_or_path: str | Path) -> Profile:
    """Read and check a profile by name ("ci", "laptop", "gpu", "multi-gpu") or from a JSON file.

    Example:
        >>> load_profile("ci").backend
        'hf'
    """
    text, source = _read(name_or_path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"Profile {source} is not valid JSON: {error}.") from error
    return _from_dict(data, source)


def _read(name_or_path: str | Path) -> tuple[str, str]:
    if str(name_or_path) in PROFILE_NAMES:
        name = str(name_or_path)
        return resources.files("cliffkit.profiles").joinpath(f"{name}.json").read_text(encoding="utf-8"), name
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return path.read_text(encoding="utf-8"), str(path)
    raise ValueError(f"Unknown profile {str(name_or_path)!r}. Use one of {', '.join(PROFILE_NAMES)}, "
                     "or the path of a JSON file shaped like cliffkit/profiles/gpu.json.")


def _from_dict(data: Mapping[str, Any], source: str) -> Profile:
    if not isinstance(data, Mapping):
        raise ValueError(f"Profile {source} must be a JSON object, got {type(data).__name__}.")
    missing = [key for key in _REQUIRED if key not in data]
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if missing:
        raise ValueError(f"Profile {source} lacks the keys {missing}.")
    if unknown:
        raise ValueError(f"Profile {source} has unknown keys {unknown}. Known keys: "
                         f"{', '.join(_REQUIRED + _OPTIONAL)}.")
    _check(data, source)
    return Profile(**{key: data[key] for key in _REQUIRED + _OPTIONAL if key in data}, source=source)


def _check(data: Mapping[str, Any], source: str) -> None:
    if data["backend"] not in BACKENDS:
        raise ValueError(f"Profile {source}: backend {data['backend']!r} is not one of {', '.join(BACKENDS)}.")
    if data["backend"] == "hf" and data.get("tensor_parallel_size", 1) != 1:
        raise ValueError(f"Profile {source}: tensor_parallel_size needs backend 'vllm'; "
                         "the hf backend shards with device_map instead.")

    per_source = data["prompts"].get("per_source")
    if not isinstance(per_source, Mapping) or not per_source:
        raise ValueError(f"Profile {source}: prompts.per_source must map prompt sources to counts.")
    for name, count in per_source.items():
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"Profile {source}: prompts.per_source.{name} must be a positive integer, got {count!r}.")

    generation = data["generation"]
    unknown = sorted(set(generation) - _GENERATION_KEYS)
    if unknown:
        raise ValueError(f"Profile {source}: unknown generation keys {unknown}; known: {sorted(_GENERATION_KEYS)}.")
    batch_size = generation.get("batch_size")
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"Profile {source}: generation.batch_size must be a positive integer or 'auto', "
                         f"got {batch_size!r}.")

    fractions = data["heads"].get("fractions", [])
    if any(not isinstance(value, (int, float)) or not 0 < value <= 1 for value in fractions):
        raise ValueError(f"Profile {source}: heads.fractions must lie in (0, 1], got {fractions}.")
    percents = data["repair"].get("percents", [])
    if any(not isinstance(value, (int, float)) or not 0 < value <= 100 for value in percents):
        raise ValueError(f"Profile {source}: repair.percents must lie in (0, 100] (1.7 means 1.7%), "
                         f"got {percents}.")
    if not data["seeds"] or any(not isinstance(seed, int) for seed in data["seeds"]):
        raise ValueError(f"Profile {source}: seeds must be a non-empty list of integers.")
