"""Device lookups for models that may be sharded: the input device and every device used.

A model loaded with `device_map="auto"` is split layer by layer over several GPUs
(and maybe the CPU) by accelerate. Its inputs must go to the device of the input
embedding, and tensors read from different layers live on different devices.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def input_device(model: PreTrainedModel) -> torch.device:
    """Return the device of the input embedding, where `input_ids` must be placed.

    For a model on one device this is that device. For a sharded model the first
    parameter found by `model.parameters()` need not be the embedding, so it is
    looked up directly.
    """
    embedding = model.get_input_embeddings()
    if embedding is not None and getattr(embedding, "weight", None) is not None:
        return embedding.weight.device
    return next(model.parameters()).device


def model_devices(model: PreTrainedModel) -> list[torch.device]:
    """Return the distinct devices that hold the model's parameters, in first-use order."""
    devices: list[torch.device] = []
    for parameter in model.parameters():
        if parameter.device not in devices:
            devices.append(parameter.device)
    return devices


def is_sharded(model: PreTrainedModel) -> bool:
    """Return True when the model's parameters are spread over more than one device."""
    return len(model_devices(model)) > 1
