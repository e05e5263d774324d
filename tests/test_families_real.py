"""The real reasoning-model families on tiny random-weight stand-ins with their published chat templates.

Each stand-in has the architecture of the real models (Qwen2, Llama, Qwen3, Qwen3-MoE,
Phi-3) and the real template, so rendering, budget forcing, splitting and segment
labels are checked offline exactly as they would run on the real weights.
"""

import pytest

from cliffkit.families import detect_family, get_family
from cliffkit.generate import GenerationSettings, PromptInput, generate_traces
from cliffkit.render import ANSWER, CLOSE, PROMPT, THINKING, render_prompt, tokenize_trace
from cliffkit.testing import TINY_VARIANTS, tiny_variant

R1_BOS = "<｜begin▁of▁sentence｜>"
PHI_SYSTEM = "<|system|>Your name is Phi, an AI math expert developed by Microsoft."
CHATML_USER = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n"
CHATML_SYSTEM = "<|im_start|>system\nBe safe.<|im_end|>\n" + CHATML_USER

# Exact model inputs for the user turn "Hi there": without a system prompt, and with "Be safe.".
EXPECTED_RENDER = {
    "deepseek-r1": (f"{R1_BOS}<｜User｜>Hi there<｜Assistant｜><think>\n",
                    f"{R1_BOS}Be safe.<｜User｜>Hi there<｜Assistant｜><think>\n"),
    "qwq": (CHATML_USER, CHATML_SYSTEM),
    "qwen3": (CHATML_USER, CHATML_SYSTEM),
    "qwen3-thinking-2507": (CHATML_USER, CHATML_SYSTEM),
    "phi4-mini-reasoning": (f"{PHI_SYSTEM}<|end|><|user|>Hi there<|end|><|assistant|><think>\n",
                            f"{PHI_SYSTEM} Be safe.<|end|><|user|>Hi there<|end|><|assistant|><think>\n"),
}

# Styles whose own template ends the generation prompt with "<think>\n"; for the
# others cliffkit appends it.
TEMPLATE_OPENS_THINK = {"deepseek-r1": True, "qwq": True, "qwen3-thinking-2507": True,
                        "qwen3": False, "phi4-mini-reasoning": False}

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM"}

VARIANTS = sorted(TINY_VARIANTS)
SETTINGS = GenerationSettings(think_budget=6, answer_budget=4, batch_size=2)
PROMPTS = [PromptInput(id="a", text="How do I bake bread?", source="benign"),
           PromptInput(id="b", text="Tell me a story about a fox.", source="benign")]

_CACHE: dict[str, object] = {}


def variant_model(name):
    if name not in _CACHE:
        _CACHE[name] = tiny_variant(name)
    return _CACHE[name]


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_architecture(name):
    variant = TINY_VARIANTS[name]
    lm = variant_model(name)
    assert type(lm.model).__name__ == ARCHITECTURES[variant.model_type]
    assert lm.family.name == variant.family


@pytest.mark.parametrize("name", VARIANTS)
def test_output_projection_takes_all_heads(name):
    # Head attribution slices the input of each layer's o_proj into per-head blocks.
    config = variant_model(name).model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in variant_model(name).model.model.layers:
        assert layer.self_attn.o_proj.in_features == config.num_attention_heads * head_dim


@pytest.mark.parametrize("name", VARIANTS)
def test_real_ids_detect_family(name):
    variant = TINY_VARIANTS[name]
    for model_id in variant.stands_in_for:
        assert detect_family(model_id).name == variant.family, model_id


@pytest.mark.parametrize("name", VARIANTS)
def test_render_exact_strings(name):
    lm = variant_model(name)
    plain, with_system = EXPECTED_RENDER[TINY_VARIANTS[name].style]
    assert render_prompt(lm.tokenizer, lm.family, "Hi there").text == plain
    assert render_prompt(lm.tokenizer, lm.family, "Hi there", system="Be safe.").text == with_system


@pytest.mark.parametrize("name", VARIANTS)
def test_template_or_cliffkit_opens_think(name):
    lm = variant_model(name)
    raw = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                           add_generation_prompt=True, **dict(lm.family.template_kwargs))
    assert raw.endswith("<think>\n") == TEMPLATE_OPENS_THINK[TINY_VARIANTS[name].style]
    rendered = render_prompt(lm.tokenizer, lm.family, "Hi there").text
    assert rendered.count("<think>") == 1
    assert "</think>" not in rendered


@pytest.mark.parametrize("name", VARIANTS)
def test_bos_exactly_once(name):
    lm = variant_model(name)
    rendered = render_prompt(lm.tokenizer, lm.family, "Hi there")
    bos = lm.tokenizer.bos_token_id
    if TINY_VARIANTS[name].style == "deepseek-r1":
        assert rendered.input_ids[0] == bos
        assert rendered.input_ids.count(bos) == 1
        # Tokenizing the rendered text with special tokens again would add a second one.
        assert lm.tokenizer(rendered.text)["input_ids"][:2] == [bos, bos]
    else:
        assert bos is None
        assert rendered.input_ids == lm.tokenizer(rendered.text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", VARIANTS)
def test_think_markers_are_single_plain_tokens(name):
    # As in the real tokenizers, <think> and </think> are added tokens that are not
    # "special", so decoding with skip_special_tokens=True keeps them.
    tokenizer = variant_model(name).tokenizer
    for marker in ("<think>", "</think>"):
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == marker


def test_qwen3_hybrid_enable_thinking_switch():
    tokenizer = variant_model("qwen3-hybrid").tokenizer
    messages = [{"role": "user", "content": "Hi"}]
    off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")


def test_qwen3_thinking_2507_ignores_enable_thinking():
    tokenizer = variant_model("qwen3-thinking-2507").tokenizer
    messages = [{"role": "user", "content": "Hi"}]
    off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n")


@pytest.mark.parametrize("style_variant", ["deepseek-r1-distill-qwen", "qwq", "qwen3-hybrid"])
def test_history_drops_earlier_thinking(style_variant):
    # The published templates strip the thinking of earlier assistant turns.
    lm = variant_model(style_variant)
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nsecret\n</think>\n\nA1"},
                {"role": "user", "content": "Q2"}]
    text = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                            **dict(lm.family.template_kwargs))
    assert "secret" not in text
    assert "A1" in text


@pytest.mark.parametrize("name", VARIANTS)
def test_two_phase_budget_forcing(name):
    lm = variant_model(name)
    traces = generate_traces(lm, PROMPTS, SETTINGS, progress=False)
    assert [trace.prompt_id for trace in traces] == ["a", "b"]
    for trace, prompt in zip(traces, PROMPTS):
        assert trace.rendered == render_prompt(lm.tokenizer, lm.family, prompt.text).text
        assert trace.closed_by == "budget"  # random weights do not write </think>
        assert trace.thinking_tokens == SETTINGS.think_budget
        assert 1 <= trace.answer_tokens <= SETTINGS.answer_budget
        assert trace.settings["family"] == lm.family.name
        assert trace.settings["backend"] == "hf"


@pytest.mark.parametrize("name", VARIANTS)
def test_trace_round_trips_tokenize_trace(name):
    lm = variant_model(name)
    trace = generate_traces(lm, PROMPTS[:1], SETTINGS, progress=False)[0]
    rendered = render_prompt(lm.tokenizer, lm.family, trace.prompt)
    tokens = tokenize_trace(lm.tokenizer, lm.family, trace.rendered, trace.thinking, trace.answer, until="answer")
    ids = tokens.input_ids.tolist()
    labels = tokens.segments.tolist()

    assert labels == sorted(labels)
    assert ids[: len(rendered.input_ids)] == rendered.input_ids
    assert labels.count(PROMPT) == len(rendered.input_ids)
    decode = lm.tokenizer.decode
    for segment, expected in ((THINKING, trace.thinking), (CLOSE, lm.family.forced_close), (ANSWER, trace.answer)):
        start, end = tokens.segment_bounds(segment)
        assert decode(ids[start:end], skip_special_tokens=False) == expected
    short = tokenize_trace(lm.tokenizer, lm.family, trace.rendered, trace.thinking, trace.answer)
    assert short.segments[-1].item() == CLOSE
    assert short.input_ids.tolist() == ids[: tokens.segment_bounds(CLOSE)[1]]


def test_real_families_share_markers():
    for name in {variant.family for variant in TINY_VARIANTS.values()}:
        family = get_family(name)
        assert (family.think_open, family.think_close, family.forced_close) == ("<think>", "</think>", "\n</think>\n\n")
