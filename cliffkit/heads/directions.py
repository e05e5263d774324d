"""The direction that head scans project onto: a saved cliffkit probe, a .npy vector, or a difference of means.

Every direction lives in the raw residual stream at its `layer` (the output of
decoder block `layer`, before the final norm), as cliffkit probes do.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from cliffkit.heads.inputs import trace_token_ids
from cliffkit.heads.scores import last_position_residuals, mean_difference_direction
from cliffkit.models import LoadedModel
from cliffkit.traces import Trace

logger = logging.getLogger(__name__)

Contrast = Literal["harmful", "all"]


@dataclass
class Direction:
    """A direction (d_model,) at `layer` with its intercept; the score is direction · x + intercept."""

    vector: torch.Tensor
    layer: int
    intercept: float = 0.0
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, stem: str | Path) -> Path:
        """Write <stem>.npy (float32 vector) and <stem>.json (layer, intercept, source); return the .npy path."""
        stem = Path(stem).with_suffix("")
        stem.parent.mkdir(parents=True, exist_ok=True)
        np.save(stem.with_suffix(".npy"), self.vector.float().numpy())
        meta = {"layer": self.layer, "intercept": self.intercept, "source": self.source,
                "space": "residual stream at the output of decoder block `layer`, before the final norm",
                "d_model": int(self.vector.numel()), **self.meta}
        stem.with_suffix(".json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return stem.with_suffix(".npy")

    @classmethod
    def load(cls, stem: str | Path) -> "Direction":
        """Read a direction written by `save`."""
        stem = Path(stem).with_suffix("")
        meta = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        vector = torch.from_numpy(np.load(stem.with_suffix(".npy"), allow_pickle=False)).float()
        extra = {key: value for key, value in meta.items()
                 if key not in ("layer", "intercept", "source", "space", "d_model")}
        return cls(vector=vector, layer=int(meta["layer"]), intercept=float(meta["intercept"]),
                   source=meta.get("source", ""), meta=extra)


def read_direction_file(path: str | Path, layer: int | None = None, intercept: float | None = None) -> Direction:
    """Read a probe saved by `cliffkit.probe.LinearProbe.save` (.npz + .json) or a plain .npy direction.

    A probe brings its own layer and intercept; `layer`, when given, must match it.
    A .npy file needs `layer`; its intercept is `intercept` or 0.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Direction file {str(path)!r} not found.")

    if path.suffix == ".npz":
        from cliffkit.probe import LinearProbe

        probe = LinearProbe.load(path)
        if layer is not None and layer != probe.layer:
            raise ValueError(f"--layer {layer} does not match the probe's layer {probe.layer}; omit --layer.")
        return Direction(vector=probe.direction(torch.float32), layer=probe.layer,
                         intercept=probe.intercept() if intercept is None else intercept,
                         source=f"probe {path}", meta={"task": probe.task, "probe_model_id": probe.model_id})

    if path.suffix == ".npy":
        if layer is None:
            raise ValueError(f"{path} contains a bare direction without its layer; pass the layer it was fitted at "
                         "(--layer).")
        vector = np.load(path, allow_pickle=False)
        if vector.ndim != 1:
            raise ValueError(f"{path} contains an array of shape {vector.shape}, expected one vector (d_model,).")
        return Direction(vector=torch.from_numpy(vector).float(), layer=layer, intercept=intercept or 0.0,
                         source=f"file {path}")

    raise ValueError(f"Unknown direction file type {path.suffix!r} ({path}). Use a probe .npz saved by "
                     "cliffkit.probe, a .npy vector, or 'mean-diff'.")


def mean_difference_from_traces(lm: LoadedModel, traces: Sequence[Trace], layer: int,
                                contrast: Contrast = "harmful", batch_size: int = 8,
                                min_per_class: int = 2) -> Direction:
    """Fit a difference-of-means direction: refused traces minus complied traces, at the closing marker.

    contrast="harmful" uses harmful prompts only (refused versus complied), which
    separates the intention to refuse from "the prompt is harmful". "all" pools
    every judged trace; harmful-refused versus benign-complied traces then
    dominate, which mixes "harmful prompt" into the direction.
    """
    if contrast not in ("harmful", "all"):
        raise ValueError(f"contrast must be 'harmful' or 'all', got {contrast!r}.")
    pool = [trace for trace in traces if contrast == "all" or trace.harmful]
    refused = [trace for trace in pool if trace.labels.get("refused") is True]
    complied = [trace for trace in pool if trace.labels.get("refused") is False]
    if len(refused) < min_per_class or len(complied) < min_per_class:
        raise ValueError(
            f"A difference of means with contrast={contrast!r} needs at least {min_per_class} refused and "
            f"{min_per_class} complied judged traces; found {len(refused)} and {len(complied)}. "
            "Judge the traces (`cliffkit judge`), add traces, or use --contrast all."
        )

    positive = last_position_residuals(lm, trace_token_ids(lm, refused), layer, batch_size)
    negative = last_position_residuals(lm, trace_token_ids(lm, complied), layer, batch_size)
    vector, intercept = mean_difference_direction(positive, negative)
    logger.info("Difference of means at layer %d from %d refused and %d complied traces (contrast %s)",
                layer, len(refused), len(complied), contrast)
    return Direction(vector=vector, layer=layer, intercept=intercept, source="mean-diff",
                     meta={"contrast": contrast, "n_refused": len(refused), "n_complied": len(complied)})
