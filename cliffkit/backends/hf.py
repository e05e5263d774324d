"""The Hugging Face `generate` backend: runs on CPU, one GPU, or a model sharded by `device_map`.

It pads each batch on the left, places it on the device of the input embedding,
and halves the batch and retries when a GPU runs out of memory.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import torch

from cliffkit.backends.base import GeneratedRow, cut_at_end, end_token_ids
from cliffkit.backends.devices import input_device
from cliffkit.models import LoadedModel

if TYPE_CHECKING:
    from cliffkit.generate import GenerationSettings

logger = logging.getLogger(__name__)


class HFBackend:
    """Generate with `model.generate` from transformers.

    Sampling draws from torch's global generator, which `cliffkit.generate` seeds
    once per batch, so a batch is reproduced exactly on the same hardware.
    """

    name = "hf"

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.model_id = lm.model_id
        self.tokenizer = lm.tokenizer
        self.family = lm.family
        self.dtype_name = str(lm.dtype).removeprefix("torch.")
        # The largest number of rows that fitted in memory so far; None until a
        # batch runs out of memory.
        self.max_rows: int | None = None

    @torch.no_grad()
    def generate_rows(self, token_id_lists: list[list[int]], max_new_tokens: int,
                      settings: "GenerationSettings", stop: Sequence[str] = ()) -> list[GeneratedRow]:
        """Generate for every prompt in `token_id_lists`; see `GenerationBackend.generate_rows`."""
        if not token_id_lists:
            return []
        if self.max_rows is not None and len(token_id_lists) > self.max_rows:
            return self._in_chunks(token_id_lists, self.max_rows, max_new_tokens, settings, stop)
        try:
            return self._generate(token_id_lists, max_new_tokens, settings, stop)
        except torch.OutOfMemoryError as error:
            return self._after_out_of_memory(error, token_id_lists, max_new_tokens, settings, stop)

    def _after_out_of_memory(self, error: Exception, token_id_lists: list[list[int]], max_new_tokens: int,
                             settings: "GenerationSettings", stop: Sequence[str]) -> list[GeneratedRow]:
        if len(token_id_lists) == 1:
            raise RuntimeError(
                f"Out of memory generating {max_new_tokens} tokens for a single prompt of "
                f"{len(token_id_lists[0])} tokens with {self.model_id}: {error}. Lower the think or "
                "answer budget, use a smaller dtype, or shard the model over more GPUs (device_map='auto')."
            ) from error
        torch.cuda.empty_cache()
        half = (len(token_id_lists) + 1) // 2
        # NOTE: rows generated in smaller chunks draw a different random stream when
        # sampling, so a run that ran out of memory is reproducible only on hardware
        # that runs out at the same batch.
        logger.warning("Out of memory with %d rows; retrying in chunks of %d rows", len(token_id_lists), half)
        self.max_rows = half
        return self._in_chunks(token_id_lists, half, max_new_tokens, settings, stop)

    def _in_chunks(self, token_id_lists: list[list[int]], size: int, max_new_tokens: int,
                   settings: "GenerationSettings", stop: Sequence[str]) -> list[GeneratedRow]:
        rows: list[GeneratedRow] = []
        for start in range(0, len(token_id_lists), size):
            rows.extend(self.generate_rows(token_id_lists[start:start + size], max_new_tokens, settings, stop))
        return rows

    def _generate(self, token_id_lists: list[list[int]], max_new_tokens: int,
                  settings: "GenerationSettings", stop: Sequence[str]) -> list[GeneratedRow]:
        model, tokenizer = self.lm.model, self.tokenizer
        # Left padding keeps every prompt's last token at the same index, where generation continues.
        batch = tokenizer.pad({"input_ids": token_id_lists}, padding=True, return_tensors="pt")
        # A model sharded with device_map takes its inputs on the device of the embedding layer.
        batch = batch.to(input_device(model))

        output = model.generate(**batch, **self._generate_kwargs(max_new_tokens, settings, stop))
        new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
        ends = end_token_ids(tokenizer, model.generation_config.eos_token_id)
        return [cut_at_end(row, ends) for row in new_tokens]

    def _generate_kwargs(self, max_new_tokens: int, settings: "GenerationSettings",
                         stop: Sequence[str]) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        else:
            # Explicit None values override sampling defaults of the model's generation config.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        return kwargs
