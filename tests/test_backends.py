"""Generation backends: one interface, one two-phase logic, one trace schema; device placement."""

import argparse
import dataclasses
import sys
import types

import pytest
import torch
from torch import nn

from cliffkit.backends import GeneratedRow, GenerationBackend, HFBackend, input_device, is_sharded, make_backend
from cliffkit.backends.cli import PROMPT_ALLOWANCE, add_backend_options, engine_from_args
from cliffkit.backends.vllm_backend import row_seed
from cliffkit.families import get_family
from cliffkit.generate import GenerationSettings, PromptInput, generate_traces
from cliffkit.models import LoadedModel, load_model
from cliffkit.render import render_prompt
from cliffkit.testing import tiny_model
from cliffkit.traces import Trace, read_traces

PROMPTS = [PromptInput(id=f"p{i}", text=f"Question number {i} about bread?", source="benign") for i in range(5)]
SETTINGS = GenerationSettings(think_budget=6, answer_budget=4, batch_size=2, seed=7)


class ScriptedBackend:
    """A backend that returns scripted text, so the two-phase logic is checked with known outputs.

    Phase 1 (called with a stop string) returns `thinking[i]`; phase 2 returns `answer[i]`
    followed by EOS. Every call is recorded.
    """

    name = "scripted"

    def __init__(self, lm: LoadedModel, thinking: list[str], answer: list[str]):
        self.model_id = "scripted/" + lm.model_id
        self.tokenizer = lm.tokenizer
        self.family = lm.family
        self.dtype_name = "float32"
        self.thinking, self.answer = thinking, answer
        self.calls: list[dict] = []

    def generate_rows(self, token_id_lists, max_new_tokens, settings, stop):
        self.calls.append(dict(inputs=[list(ids) for ids in token_id_lists], max_new_tokens=max_new_tokens,
                               seed=settings.seed, stop=list(stop)))
        texts = self.thinking if stop else self.answer
        rows = []
        for index in range(len(token_id_lists)):
            ids = self.tokenizer(texts[index % len(texts)], add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(GeneratedRow(ids=ids, hit_eos=not stop))
        return rows


@pytest.fixture(scope="module")
def r1():
    return tiny_model("deepseek-r1-distill-qwen")


def comparable(traces, drop=("settings",)):
    return [{key: value for key, value in dataclasses.asdict(trace).items() if key not in drop} for trace in traces]


def test_backends_satisfy_protocol(r1):
    assert isinstance(HFBackend(r1), GenerationBackend)
    assert isinstance(ScriptedBackend(r1, ["x"], ["y"]), GenerationBackend)
    assert not isinstance(r1, GenerationBackend)


def test_phases_call_backend_as_specified(r1):
    backend = ScriptedBackend(r1, thinking=["Let me think"], answer=["Sure."])
    generate_traces(backend, PROMPTS, SETTINGS, progress=False)

    assert len(backend.calls) == 6  # 3 batches x 2 phases
    phase1, phase2 = backend.calls[0], backend.calls[1]
    assert phase1["stop"] == ["</think>"]
    assert phase1["max_new_tokens"] == SETTINGS.think_budget
    assert phase2["stop"] == []
    assert phase2["max_new_tokens"] == SETTINGS.answer_budget
    assert [call["seed"] for call in backend.calls] == [7, 7, 8, 8, 9, 9]

    rendered = render_prompt(r1.tokenizer, r1.family, PROMPTS[0].text)
    thinking_ids = r1.tokenizer("Let me think", add_special_tokens=False)["input_ids"]
    close_ids = r1.tokenizer("\n</think>\n\n", add_special_tokens=False)["input_ids"]
    assert phase1["inputs"][0] == rendered.input_ids
    assert phase2["inputs"][0] == rendered.input_ids + thinking_ids + close_ids


def test_budget_closed_trace_fields(r1):
    backend = ScriptedBackend(r1, thinking=["Let me think"], answer=["Sure, here it is."])
    settings = GenerationSettings(think_budget=40, answer_budget=40)
    trace = generate_traces(backend, PROMPTS[:1], settings, progress=False)[0]
    assert (trace.closed_by, trace.thinking, trace.answer, trace.finished) == (
        "budget", "Let me think", "Sure, here it is.", True)
    assert trace.thinking_tokens == len(r1.tokenizer("Let me think", add_special_tokens=False)["input_ids"])
    assert trace.settings["backend"] == "scripted"
    assert trace.model_id == "scripted/tiny/deepseek-r1-distill-qwen"


def test_model_closed_trace_is_not_closed_again(r1):
    backend = ScriptedBackend(r1, thinking=["I must refuse.\n</think>"], answer=["\n\nI can't help with that."])
    trace = generate_traces(backend, PROMPTS[:1], GenerationSettings(think_budget=40, answer_budget=40),
                            progress=False)[0]
    assert (trace.closed_by, trace.thinking, trace.answer) == ("model", "I must refuse.", "I can't help with that.")
    prefix = backend.calls[1]["inputs"][0]
    assert r1.tokenizer.decode(prefix).count("</think>") == 1


def test_same_schema_as_hf_backend(r1):
    hf = generate_traces(r1, PROMPTS[:2], SETTINGS, progress=False)
    scripted = generate_traces(ScriptedBackend(r1, ["a b"], ["c"]), PROMPTS[:2], SETTINGS, progress=False)
    for first, second in zip(hf, scripted):
        assert set(dataclasses.asdict(first)) == set(dataclasses.asdict(second))
        assert set(first.settings) == set(second.settings)
        assert first.settings["backend"] == "hf"
        assert isinstance(second, Trace)


def test_resume_skips_finished_batches(r1, tmp_path):
    path = tmp_path / "traces.jsonl"
    first = ScriptedBackend(r1, ["think"], ["answer"])
    generate_traces(first, PROMPTS[:2], SETTINGS, out=path, progress=False)
    second = ScriptedBackend(r1, ["think"], ["answer"])
    generate_traces(second, PROMPTS, SETTINGS, out=path, progress=False)

    assert [trace.prompt_id for trace in read_traces(path)] == [prompt.id for prompt in PROMPTS]
    assert [call["seed"] for call in second.calls] == [8, 8, 9, 9]  # batch 0 was already written


def test_explicit_hf_backend_equals_default(r1):
    default = generate_traces(r1, PROMPTS[:2], SETTINGS, progress=False)
    explicit = generate_traces(HFBackend(r1), PROMPTS[:2], SETTINGS, progress=False)
    assert comparable(default, drop=()) == comparable(explicit, drop=())


def test_make_backend_errors(r1):
    with pytest.raises(ValueError, match="Unknown backend 'tgi'"):
        make_backend(r1, "tgi")
    with pytest.raises(TypeError, match="LoadedModel or a GenerationBackend"):
        make_backend(object())
    with pytest.raises(ValueError, match="ready 'scripted' backend"):
        make_backend(ScriptedBackend(r1, ["a"], ["b"]), "vllm")
    with pytest.raises(ValueError, match="vllm backend only"):
        make_backend(r1, "hf", tensor_parallel_size=2)


# --------------------------------------------------------------------------- out-of-memory back-off

def _equal_length_prompts(n):
    return [PromptInput(id=f"q{i}", text=f"Question {i}") for i in range(n)]


def test_oom_halves_batch_and_matches(monkeypatch):
    lm = tiny_model("qwq")
    prompts = _equal_length_prompts(4)
    settings = GenerationSettings(think_budget=5, answer_budget=3, batch_size=4)
    reference = generate_traces(lm, prompts, settings, progress=False)

    original = lm.model.generate
    seen_rows = []

    def limited(**kwargs):
        seen_rows.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(**kwargs)

    monkeypatch.setattr(lm.model, "generate", limited)
    backend = HFBackend(lm)
    retried = generate_traces(backend, prompts, settings, progress=False)

    assert comparable(retried) == comparable(reference)
    assert backend.max_rows == 2
    assert seen_rows == [4, 2, 2, 2, 2]  # phase 2 starts in chunks right away


def test_oom_on_single_row_raises_clear_error(monkeypatch):
    lm = tiny_model("qwq")

    def always_oom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(lm.model, "generate", always_oom)
    with pytest.raises(RuntimeError, match="single prompt.*device_map='auto'"):
        generate_traces(lm, _equal_length_prompts(1), SETTINGS, progress=False)


# --------------------------------------------------------------------------- devices

class EmbeddingLast(nn.Module):
    """A module whose first parameter is not the input embedding, as in some sharded layouts."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2, device="meta")
        self.embed = nn.Embedding(4, 2)

    def get_input_embeddings(self):
        return self.embed


def test_input_device_follows_embedding():
    module = EmbeddingLast()
    assert next(module.parameters()).device.type == "meta"
    assert input_device(module) == torch.device("cpu")
    assert is_sharded(module)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    lm = tiny_model("deepseek-r1-distill-qwen")
    folder = tmp_path_factory.mktemp("tiny-r1")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}])
def test_load_model_with_device_map(saved_tiny, device_map):
    lm = load_model(str(saved_tiny), family="deepseek-r1-distill-qwen", dtype="float32", device_map=device_map)
    assert {parameter.device for parameter in lm.model.parameters()} == {torch.device("cpu")}
    assert input_device(lm.model) == torch.device("cpu")
    assert not is_sharded(lm.model)
    trace = generate_traces(lm, PROMPTS[:1], SETTINGS, progress=False)[0]
    assert trace.thinking_tokens == SETTINGS.think_budget


@pytest.mark.parametrize("kwargs, message", [
    (dict(device_map="everywhere"), "Invalid device_map 'everywhere'"),
    (dict(device_map={}), "empty dict"),
    (dict(device_map=3), "must be a string or a dict"),
    (dict(max_memory={0: "10GiB"}), "max_memory needs device_map"),
])
def test_load_model_rejects_bad_placement(saved_tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(str(saved_tiny), family="deepseek-r1-distill-qwen", dtype="float32", **kwargs)


# --------------------------------------------------------------------------- command-line options

def parse(*argv):
    from cliffkit.cli import add_generation_options, add_model_options

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    add_generation_options(parser)
    add_backend_options(parser)
    return parser.parse_args(list(argv))


def test_backend_options_defaults():
    args = parse()
    assert (args.backend, args.device_map, args.tensor_parallel_size, args.max_model_len) == ("hf", None, 1, None)


def test_engine_from_args_hf_loads_model(saved_tiny):
    args = parse("--model", str(saved_tiny), "--family", "deepseek-r1-distill-qwen", "--dtype", "float32",
                 "--device", "cpu")
    engine = engine_from_args(args)
    assert isinstance(engine, LoadedModel)


@pytest.mark.parametrize("argv, message", [
    (("--tensor-parallel-size", "2"), "applies to --backend vllm"),
    (("--backend", "vllm", "--device-map", "auto"), "applies to --backend hf"),
])
def test_engine_from_args_rejects_mixed_options(argv, message):
    with pytest.raises(ValueError, match=message):
        engine_from_args(parse(*argv))


# --------------------------------------------------------------------------- vLLM backend

def test_vllm_missing_gives_install_hint(r1, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(ImportError, match=r"pip install 'cliffkit\[gpu\]'"):
        generate_traces(r1, PROMPTS[:1], SETTINGS, progress=False, backend="vllm")


def test_row_seed_is_stable_and_distinct():
    assert row_seed(3, 0, ["</think>"]) == row_seed(3, 0, ["</think>"])
    seeds = {row_seed(seed, row, stop) for seed in (0, 1) for row in range(4) for stop in ([], ["</think>"])}
    assert len(seeds) == 16


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeCompletion:
    def __init__(self, token_ids, finish_reason, stop_reason):
        self.token_ids, self.finish_reason, self.stop_reason = token_ids, finish_reason, stop_reason


class FakeLLM:
    """Stands in for `vllm.LLM`: greedy decoding with a transformers model, one request at a time.

    Outputs follow vLLM's documented conventions. When the model writes EOS, the EOS
    token ends `token_ids`, finish_reason is "stop" and stop_reason is None. A stop
    string gives finish_reason "stop" with that string as stop_reason, and the budget
    gives finish_reason "length".
    """

    lm: LoadedModel | None = None

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        return [types.SimpleNamespace(outputs=[self._complete(prompt, p)]) for prompt, p in zip(prompts, params)]

    def _complete(self, prompt, params):
        lm = self.lm
        ids = torch.tensor([prompt["prompt_token_ids"]])
        kwargs = dict(max_new_tokens=params.max_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                      attention_mask=torch.ones_like(ids))
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=lm.tokenizer)
        new = lm.model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
        text = lm.tokenizer.decode(new)
        if new and new[-1] == lm.tokenizer.eos_token_id:
            return FakeCompletion(new, "stop", None)
        for stop in params.stop or []:
            if stop in text:
                return FakeCompletion(new, "stop", stop)
        return FakeCompletion(new, "length", None)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_backend_matches_hf_greedy(fake_vllm):
    lm = tiny_model("deepseek-r1-distill-llama")
    FakeLLM.lm = lm
    settings = dataclasses.replace(SETTINGS, batch_size=1)
    hf = generate_traces(lm, PROMPTS[:3], settings, progress=False)
    vllm = generate_traces(lm, PROMPTS[:3], settings, progress=False, backend="vllm")

    assert comparable(vllm) == comparable(hf)
    assert [trace.settings["backend"] for trace in vllm] == ["vllm"] * 3
    assert {key: value for key, value in vllm[0].settings.items() if key != "backend"} == \
        {key: value for key, value in hf[0].settings.items() if key != "backend"}


def test_vllm_backend_sampling_params(fake_vllm):
    from cliffkit.backends.vllm_backend import VLLMBackend

    lm = tiny_model("qwen3-thinking")
    FakeLLM.lm = lm
    backend = VLLMBackend.from_loaded(lm, tensor_parallel_size=1, gpu_memory_utilization=0.5, max_model_len=777)
    sampled = dataclasses.replace(SETTINGS, temperature=0.7, top_p=0.9)
    generate_traces(backend, PROMPTS[:2], sampled, progress=False)

    assert backend.llm.kwargs["tensor_parallel_size"] == 1
    assert backend.llm.kwargs["max_model_len"] == 777
    assert backend.llm.kwargs["dtype"] == "float32"
    (prompts1, params1), (prompts2, params2) = backend.llm.calls
    rendered = render_prompt(lm.tokenizer, lm.family, PROMPTS[0].text)
    assert prompts1[0] == {"prompt_token_ids": rendered.input_ids}
    assert [p.stop for p in params1] == [["</think>"]] * 2
    assert [p.stop for p in params2] == [None] * 2
    assert [p.max_tokens for p in params1 + params2] == [6, 6, 4, 4]
    assert all(p.include_stop_str_in_output for p in params1 + params2)
    assert [p.temperature for p in params1] == [0.7, 0.7]
    assert [p.top_p for p in params1] == [0.9, 0.9]
    seeds = [p.seed for p in params1 + params2]
    assert len(set(seeds)) == 4
    assert seeds[0] == row_seed(SETTINGS.seed, 0, ["</think>"])


def test_vllm_backend_rejects_bad_parallel_options(fake_vllm, r1):
    from cliffkit.backends.vllm_backend import VLLMBackend

    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        VLLMBackend.from_loaded(r1, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMBackend.from_loaded(r1, gpu_memory_utilization=1.5)


def test_engine_from_args_vllm_context_length(fake_vllm, saved_tiny):
    args = parse("--model", str(saved_tiny), "--family", "deepseek-r1-distill-qwen", "--backend", "vllm",
                 "--tensor-parallel-size", "1", "--think-budget", "100", "--answer-budget", "20")
    engine = engine_from_args(args)
    assert engine.name == "vllm"
    assert engine.llm.kwargs["max_model_len"] == PROMPT_ALLOWANCE + 120
    assert engine.family is get_family("deepseek-r1-distill-qwen")


def test_vllm_contract(saved_tiny, tmp_path):
    """The real vLLM engine on a tiny model: same schema, budgets and resume as the hf backend."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'cliffkit[gpu]' on a GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from cliffkit.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend(str(saved_tiny), family="deepseek-r1-distill-qwen", dtype="float32",
                          gpu_memory_utilization=0.2, max_model_len=256, enforce_eager=True)
    path = tmp_path / "vllm.jsonl"
    generate_traces(backend, PROMPTS[:2], SETTINGS, out=path, progress=False)
    generate_traces(backend, PROMPTS, SETTINGS, out=path, progress=False)
    traces = read_traces(path)

    assert [trace.prompt_id for trace in traces] == [prompt.id for prompt in PROMPTS]
    hf_fields = set(dataclasses.asdict(generate_traces(tiny_model("deepseek-r1-distill-qwen"), PROMPTS[:1], SETTINGS,
                                                       progress=False)[0]))
    for trace in traces:
        assert set(dataclasses.asdict(trace)) == hf_fields
        assert trace.settings["backend"] == "vllm"
        assert trace.closed_by in ("model", "budget")
        assert trace.thinking_tokens <= SETTINGS.think_budget
        assert trace.answer_tokens <= SETTINGS.answer_budget
