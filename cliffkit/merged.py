"""A disk cache of embedded models with their shipped adapter merged in, in a 16-bit dtype.

Merging a LoRA adapter needs the float32 base (2.5 GB for the embedded model), so a
load that merges every time peaks near 4 GB, over Binder's 2 GB limit. The merged
weights are therefore built once, cast to the compute dtype and saved. Later loads read
the 16-bit file directly and hold one copy of the weights (1.3 GB in bfloat16).

A folder is keyed by the SHA-256 of the adapter weights and the dtype, so a rebuilt
adapter gets a new folder. Like the embedded conversion, the folder is staged under a
temporary name, its marker is written last, and it is renamed into place under a file
lock: an interrupted build leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock
from transformers import PreTrainedModel

from cliffkit.paths import models_dir

logger = logging.getLogger(__name__)

MARKER_FILE = "cliffkit_merged.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_sha256(adapter_dir: str | Path) -> str:
    """Return the SHA-256 of an adapter folder's weight file."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"Missing {ADAPTER_WEIGHTS} in {adapter_dir}, so it is not a saved LoRA adapter. "
                                "Pass the folder that cliffkit.sft.save_adapter wrote.")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def merged_path(name: str, adapter_dir: str | Path, dtype: torch.dtype) -> Path:
    """Return the cache folder of `name` merged with the adapter in `adapter_dir`, stored in `dtype`."""
    slug = name.replace("/", "--")
    dtype_name = str(dtype).removeprefix("torch.")
    return models_dir() / f"{slug}-merged-{adapter_sha256(adapter_dir)[:12]}-{dtype_name}"


def is_merged(folder: Path, adapter_sha: str, dtype: torch.dtype) -> bool:
    """Return True when `folder` contains a finished merge of that adapter in that dtype."""
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    record = json.loads(marker.read_text(encoding="utf-8"))
    return record.get("adapter_sha256") == adapter_sha and record.get("dtype") == str(dtype)


def ensure_merged_model(name: str, adapter_dir: str | Path, dtype: torch.dtype,
                        build: Callable[[], PreTrainedModel]) -> Path:
    """Return the cached merged model folder, calling `build` to make it when missing.

    `build` returns the model with the adapter already merged and cast to `dtype`.
    When two processes ask at once, only one builds it and the other waits for the lock.
    """
    if dtype == torch.float32:
        raise ValueError(f"Invalid dtype {dtype} for the merged-model cache, which stores 16-bit copies only; "
                         "merge in float32 at load time instead.")
    adapter_sha = adapter_sha256(adapter_dir)
    target = merged_path(name, adapter_dir, dtype)
    if is_merged(target, adapter_sha, dtype):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_merged(target, adapter_sha, dtype):
            return target
        _build_into(target, build, {"name": name, "adapter_sha256": adapter_sha, "dtype": str(dtype)})
    return target


def _build_into(target: Path, build: Callable[[], PreTrainedModel], record: dict[str, str]) -> None:
    logger.info("Merging the adapter of %s once and caching it in %s", record["name"], target)
    staged = Path(tempfile.mkdtemp(prefix=".merge-", dir=target.parent))
    try:
        model = build()
        wrong = {str(parameter.dtype) for parameter in model.parameters()} - {record["dtype"]}
        if wrong:
            raise ValueError(f"build() returned weights in {sorted(wrong)}, expected {record['dtype']}.")
        model.save_pretrained(str(staged))
        (staged / MARKER_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        if target.exists():  # an unmarked folder from an interrupted build
            shutil.rmtree(target)
        os.rename(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
