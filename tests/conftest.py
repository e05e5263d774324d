"""Shared fixtures. Every test runs offline: nothing may reach the Hugging Face Hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def embedded_lm():
    """The real embedded default model in float32, loaded once for the slow tests."""
    from cliffkit.models import load_model

    return load_model(dtype="float32", device="cpu")
