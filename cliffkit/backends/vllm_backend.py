"""The vLLM backend: paged-attention generation on one or more GPUs, with tensor parallelism.

vLLM is an optional extra (`pip install 'cliffkit[gpu]'`) and is imported only when
this backend is built. The backend feeds token ids, not text, so the prompts are
exactly the ones `cliffkit.render` built, and it follows the `GenerationBackend`
contract: a stop string stays in the row, and rows are cut at end-of-sequence tokens.
"""

from __future__ import annotations

import importlib
import logging
import zlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, Sequence

import torch
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase

from cliffkit.backends.base import GeneratedRow, cut_at_end, end_token_ids
from cliffkit.families import Family, detect_family, get_family
from cliffkit.models import EMBEDDED_MODELS, LoadedModel, load_tokenizer, resolve_dtype, resolve_source

if TYPE_CHECKING:
    from cliffkit.generate import GenerationSettings

logger = logging.getLogger(__name__)

INSTALL_HINT = ("Install the GPU extra on a machine with a CUDA GPU: pip install 'cliffkit[gpu]' "
                "(it pulls vLLM and a CUDA build of torch), or use --backend hf.")


def import_vllm() -> ModuleType:
    """Import vLLM, or raise an ImportError with the install command."""
    try:
        return importlib.import_module("vllm")
    except ImportError as error:
        raise ImportError(f"The vLLM backend needs the vllm package, which is not installed ({error}). "
                          f"{INSTALL_HINT}") from error


def row_seed(batch_seed: int, row: int, stop: Sequence[str]) -> int:
    """Derive the seed of one request from the batch seed, its row and the phase.

    vLLM samples every request from its own generator, so a row's tokens do not
    depend on which other rows share the batch. The phase (with or without a stop
    string) is mixed in, so that phase 2 does not reuse the random draws of phase 1.
    """
    key = f"{batch_seed}:{row}:{'|'.join(stop)}".encode()
    return zlib.crc32(key) & 0x7FFFFFFF


class VLLMBackend:
    """Generate with `vllm.LLM`, optionally split over GPUs by tensor parallelism.

    Args:
        model_id: a Hugging Face id, a local folder or an embedded name.
        family: family name; detected from the id and config when None.
        dtype: "auto", "bfloat16", "float16" or "float32" (as in `load_model`).
        tensor_parallel_size: number of GPUs that each layer is split over.
        gpu_memory_utilization: share of each GPU's memory vLLM may reserve (weights and KV cache).
        max_model_len: maximum tokens of prompt plus generation, which vLLM reserves KV cache for.
        tokenizer: reuse an already loaded tokenizer instead of loading it again.
        eos_token_id: end-of-sequence ids besides the tokenizer's; read from the
            model's generation_config.json when None.
        llm_options: further keyword arguments for `vllm.LLM`.

    Example:
        >>> backend = VLLMBackend("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
        ...                       tensor_parallel_size=2)          # doctest: +SKIP
        >>> generate_traces(backend, prompts, settings, out="t.jsonl")  # doctest: +SKIP
    """

    name = "vllm"

    def __init__(self, model_id: str, *, family: str | Family | None = None, dtype: str | torch.dtype = "auto",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 eos_token_id: int | list[int] | None = None, trust_remote_code: bool = False,
                 **llm_options: Any):
        _check_parallel_options(tensor_parallel_size, gpu_memory_utilization)
        vllm = import_vllm()
        source = resolve_source(model_id)

        self.model_id = model_id
        self.tokenizer = tokenizer or load_tokenizer(source, trust_remote_code)
        self.family = _resolve_family(model_id, source, family, trust_remote_code)
        self.dtype_name = str(resolve_dtype(dtype, "cuda")).removeprefix("torch.")
        self._ends = end_token_ids(self.tokenizer, eos_token_id if eos_token_id is not None
                                   else _generation_eos(source))
        self._sampling_params = vllm.SamplingParams

        logger.info("Starting vLLM for %s (%s, tensor parallel size %d, family %s)",
                    model_id, self.dtype_name, tensor_parallel_size, self.family.name)
        self.llm = vllm.LLM(model=source, tokenizer=source, dtype=self.dtype_name,
                            tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            trust_remote_code=trust_remote_code, **llm_options)

    @classmethod
    def from_loaded(cls, lm: LoadedModel, **options: Any) -> "VLLMBackend":
        """Build a vLLM backend for the model behind `lm`, reusing its tokenizer and family."""
        options.setdefault("dtype", lm.dtype)
        options.setdefault("eos_token_id", lm.model.generation_config.eos_token_id)
        return cls(lm.model_id, family=lm.family, tokenizer=lm.tokenizer, **options)

    def generate_rows(self, token_id_lists: list[list[int]], max_new_tokens: int,
                      settings: "GenerationSettings", stop: Sequence[str] = ()) -> list[GeneratedRow]:
        """Generate for every prompt in `token_id_lists`; see `GenerationBackend.generate_rows`."""
        if not token_id_lists:
            return []
        prompts = [{"prompt_token_ids": list(ids)} for ids in token_id_lists]
        params = [self._params_for(row, max_new_tokens, settings, stop) for row in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._row(output) for output in outputs]

    def _params_for(self, row: int, max_new_tokens: int, settings: "GenerationSettings",
                    stop: Sequence[str]) -> Any:
        greedy = settings.temperature == 0
        return self._sampling_params(
            n=1,
            temperature=settings.temperature,
            top_p=1.0 if greedy else settings.top_p,
            max_tokens=max_new_tokens,
            stop=list(stop) or None,
            # Keep the stop string, as the transformers backend does, so that
            # budget forcing can see that the model closed the think block itself.
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            seed=row_seed(settings.seed, row, stop),
        )

    def _row(self, output: Any) -> GeneratedRow:
        completion = output.outputs[0]
        row = cut_at_end(list(completion.token_ids), self._ends)
        # vLLM reports an end-of-sequence stop as finish_reason "stop" with no
        # stop_reason (a stop string or stop token id would be named there).
        ended_by_model = completion.finish_reason == "stop" and completion.stop_reason is None
        return GeneratedRow(ids=row.ids, hit_eos=row.hit_eos or ended_by_model)


def _check_parallel_options(tensor_parallel_size: int, gpu_memory_utilization: float) -> None:
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}.")
    if torch.cuda.is_available() and tensor_parallel_size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs that many GPUs, but only "
                         f"{torch.cuda.device_count()} are visible. Lower it or set CUDA_VISIBLE_DEVICES.")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}.")


def _resolve_family(model_id: str, source: str, family: str | Family | None, trust_remote_code: bool) -> Family:
    if isinstance(family, Family):
        return family
    if family is not None:
        return get_family(family)
    if model_id in EMBEDDED_MODELS:
        return get_family(EMBEDDED_MODELS[model_id])
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    return detect_family(model_id, config.model_type)


def _generation_eos(source: str) -> int | list[int] | None:
    try:
        return GenerationConfig.from_pretrained(source).eos_token_id
    except OSError:
        # No generation_config.json: the tokenizer's EOS and pad tokens still end rows.
        return None
