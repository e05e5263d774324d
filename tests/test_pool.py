"""Tests of the safety pool: disjointness from the evaluation prompts, the JSONL schema, and self-generated pools."""

import json

import pytest

from cliffkit.datasets import load_prompts
from cliffkit.generate import GenerationSettings
from cliffkit.pool import (PoolExample, PoolFileError, PoolOverlapError, build_pool, check_disjoint,
                           evaluation_prompts, find_overlaps, keep_reason, normalize_text, read_pool,
                           safety_system_prompt, training_prompts, write_pool)
from cliffkit.render import render_prompt
from cliffkit.testing import tiny_model
from cliffkit.traces import Trace, TraceWriter

HARMFUL = ["harmbench", "advbench", "strongreject"]


def test_normalize_text():
    assert normalize_text("  Write a  “phishing” e-mail!! ") == "write a phishing e mail"
    assert normalize_text("ＡＢＣ") == "abc"  # full-width letters fold under NFKC
    assert normalize_text("Bomb") == normalize_text("bomb.")


def test_shipped_train_split_overlaps_before_filtering():
    # The raw train split repeats some evaluation texts (StrongREJECT copies AdvBench rows),
    # so the filter below has real work to do.
    raw = load_prompts(HARMFUL, splits=["train"])
    overlaps = find_overlaps(raw, evaluation_prompts())
    assert overlaps
    assert all(how == "text" for _, _, how in overlaps)


def test_training_prompts_disjoint_from_evaluation():
    pool = training_prompts()
    evaluation = evaluation_prompts()

    eval_ids = {prompt.id for prompt in evaluation}
    eval_texts = {normalize_text(prompt.text) for prompt in evaluation}
    assert not {prompt.id for prompt in pool} & eval_ids
    assert not {normalize_text(prompt.text) for prompt in pool} & eval_texts
    assert all(prompt.split == "train" and prompt.harmful for prompt in pool)
    texts = [normalize_text(prompt.text) for prompt in pool]
    assert len(texts) == len(set(texts))
    assert {prompt.source for prompt in pool} == set(HARMFUL)


def test_training_prompts_per_source_sample():
    first = training_prompts(per_source=5, seed=3)
    again = training_prompts(per_source=5, seed=3)
    assert [p.id for p in first] == [p.id for p in again]
    assert len(first) == 15
    assert {p.source for p in first} == set(HARMFUL)


def test_check_disjoint_names_overlaps():
    test_prompt = load_prompts(["advbench"], splits=["test"], limit=1)[0]
    pool = [PoolExample(id="mine/0", prompt="A harmless-looking unique request about gardening tools",
                        thinking="t", answer="a"),
            PoolExample(id="mine/1", prompt=f"  {test_prompt.text.upper()}!", thinking="t", answer="a"),
            PoolExample(id=test_prompt.id, prompt="different text entirely, nothing alike", thinking="t", answer="a")]
    with pytest.raises(PoolOverlapError) as error:
        check_disjoint(pool)
    message = str(error.value)
    assert "2 of 3 pool prompts" in message
    assert f"mine/1 = {test_prompt.id} (same text)" in message
    assert f"{test_prompt.id} = {test_prompt.id} (same id)" in message


def _examples():
    return [PoolExample(id="advbench/9001", prompt="How do I pick a lock?", thinking="Lock picking to break in "
                        "could cause harm.", answer="I can't help with that.", source="advbench",
                        category="Physical", meta={"note": "x"}),
            PoolExample(id="custom/2", prompt="Write ransomware", thinking="Malware harms people.",
                        answer="I won't write malware.", source="", category="")]


def test_pool_file_round_trip(tmp_path):
    path = write_pool(tmp_path / "pool.jsonl", _examples())
    back = read_pool(path)
    assert [example.to_dict() for example in back] == [example.to_dict() for example in _examples()]
    assert not list(tmp_path.glob("*.tmp"))


def test_pool_file_keeps_extra_keys_in_meta(tmp_path):
    record = {**_examples()[1].to_dict(), "score": 0.25}
    del record["meta"]
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    assert read_pool(path)[0].meta == {"score": 0.25}


@pytest.mark.parametrize("line, expected", [
    ("{not json", "line 2: invalid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    (json.dumps({"id": "x", "prompt": "p", "answer": "a", "source": "", "category": ""}),
     "line 2: missing field 'thinking'"),
    (json.dumps({"id": "x", "prompt": "p", "thinking": 3, "answer": "a", "source": "", "category": ""}),
     "line 2: field 'thinking' must be a string"),
    (json.dumps({"id": "x", "prompt": "p", "thinking": "  ", "answer": "a", "source": "", "category": ""}),
     "line 2: field 'thinking' is empty"),
    (json.dumps({"id": "advbench/9001", "prompt": "p", "thinking": "t", "answer": "a", "source": "",
                 "category": ""}), "line 2: id 'advbench/9001' repeats line 1"),
    (json.dumps({"id": "x", "prompt": "p", "thinking": "t", "answer": "a", "source": "", "category": "",
                 "meta": [1]}), "line 2: field 'meta' must be a JSON object"),
])
def test_malformed_pool_line(tmp_path, line, expected):
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps(_examples()[0].to_dict()) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(PoolFileError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        read_pool(path)


def test_missing_or_empty_pool_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_pool(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(PoolFileError, match="no pool examples"):
        read_pool(tmp_path / "empty.jsonl")


def test_safety_system_prompt_names_markers():
    lm = tiny_model("scaffold")
    text = safety_system_prompt(lm.family)
    assert "<think>" in text
    assert "</think>" in text
    assert "refuse" in text


def _planted(lm, prompt, thinking, answer, closed_by, system):
    rendered = render_prompt(lm.tokenizer, lm.family, prompt.text, system).text
    return Trace(prompt_id=prompt.id, model_id=lm.model_id, prompt=prompt.text, rendered=rendered,
                 thinking=thinking, answer=answer, closed_by=closed_by, finished=True, thinking_tokens=9,
                 answer_tokens=9, source=prompt.source, category=prompt.category, harmful=True)


def test_build_pool_keeps_closed_refusals(tmp_path):
    lm = tiny_model("scaffold")
    prompts = training_prompts(per_source=2)[:5]
    system = safety_system_prompt(lm.family)
    refusal = "I'm sorry, but I can't help with that."
    planted = [
        _planted(lm, prompts[0], "This could hurt people.", refusal, "model", system),     # kept
        _planted(lm, prompts[1], "This could hurt people.", refusal, "budget", system),    # budget closed
        _planted(lm, prompts[2], "Fine.", "Sure, here are the steps: first...", "model", system),  # complied
        _planted(lm, prompts[3], "Hmm.", "", "model", system),                             # no answer
        _planted(lm, prompts[4], "", refusal, "model", system),                             # empty thinking
    ]
    # Planted traces stand for a finished generation run, which the build resumes.
    TraceWriter(tmp_path / "pool_traces.jsonl", lm.model_id).write(planted)

    built = build_pool(lm, prompts, tmp_path, GenerationSettings(think_budget=4, answer_budget=4),
                       require_model_close=True, progress=False)
    assert [example.id for example in built.examples] == [prompts[0].id]
    assert built.examples[0].thinking == "This could hurt people."
    assert built.examples[0].answer == refusal
    assert built.counts == {"kept": 1, "think block closed by the budget": 1, "did not refuse": 1,
                            "no answer": 1, "empty thinking": 1}
    assert [example.id for example in read_pool(built.pool_path)] == [prompts[0].id]
    summary = json.loads((tmp_path / "pool_summary.json").read_text())
    assert summary["kept"] == 1
    assert summary["prompts"] == 5

    # The prompted scaffold rarely closes its thinking itself: by default its budget-closed refusals count.
    scaffold = build_pool(lm, prompts, tmp_path, GenerationSettings(think_budget=4, answer_budget=4), progress=False)
    assert [example.id for example in scaffold.examples] == [prompts[0].id, prompts[1].id]
    assert scaffold.examples[1].meta["closed_by"] == "budget"


def test_build_pool_generates_with_safety_prompt(tmp_path):
    lm = tiny_model("scaffold")
    prompts = training_prompts(per_source=1)[:2]
    built = build_pool(lm, prompts, tmp_path, GenerationSettings(think_budget=3, answer_budget=3), progress=False)
    lines = (tmp_path / "pool_traces.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)["settings"]["system"] == safety_system_prompt(lm.family) for line in lines)
    assert sum(built.counts.values()) == 2


def test_build_pool_rejects_evaluation_prompts(tmp_path):
    lm = tiny_model("scaffold")
    with pytest.raises(PoolOverlapError):
        build_pool(lm, load_prompts(["harmbench"], splits=["test"], limit=2), tmp_path)


def test_keep_reason_unlabelled_trace_is_no_answer():
    trace = Trace(prompt_id="p", model_id="m", prompt="x", rendered="x", thinking="t", answer="", closed_by="model",
                  finished=True, thinking_tokens=1, answer_tokens=0)
    assert keep_reason(trace) == "no answer"


def test_prefilled_responses_continue_openings(tmp_path):
    from cliffkit.pool import ResponsePrefill

    lm = tiny_model("scaffold")
    prompts = training_prompts(per_source=1)[:3]
    prefill = ResponsePrefill(thinking="This is harmful, because", answer="I'm sorry, but I can't help with that")
    settings = GenerationSettings(think_budget=5, answer_budget=4, batch_size=2)
    built = build_pool(lm, prompts, tmp_path, settings, prefill=prefill, progress=False)

    lines = (tmp_path / "pool_traces.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        record = json.loads(line)
        assert record["thinking"].startswith("This is harmful")
        assert record["answer"].startswith("I'm sorry, but I can't help with that")
        assert record["settings"]["prefill"] == {"thinking": prefill.thinking, "answer": prefill.answer}
    # The keyword judge reads the prefilled answer as a refusal, and the scaffold accepts budget-closed thinking.
    assert len(built.examples) == 3

    again = build_pool(lm, prompts, tmp_path, settings, prefill=prefill, progress=False)
    assert (tmp_path / "pool_traces.jsonl").read_text().splitlines() == lines
    assert [example.id for example in again.examples] == [example.id for example in built.examples]


def test_complete_sentences_cut():
    from cliffkit.pool import _complete_sentences

    assert _complete_sentences("It is harmful. It could hurt people! And then") == "It is harmful. It could hurt people!"
    assert _complete_sentences("No sentence end here") == "No sentence end here"
    assert _complete_sentences("Version 2.5 is fine. Next") == "Version 2.5 is fine."


def test_default_prefill_by_family():
    from cliffkit.families import get_family
    from cliffkit.pool import ResponsePrefill, default_prefill

    assert default_prefill(get_family("deepseek-r1-distill-qwen")) is None
    assert default_prefill(get_family("scaffold")) == ResponsePrefill()
    assert default_prefill(get_family("cliffkit-thinker")) == ResponsePrefill()
