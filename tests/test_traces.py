"""The trace file: whole-line writes, torn-line repair, malformed lines and model mismatch."""

import json

import pytest

from cliffkit.traces import Trace, TraceFileError, TraceWriter, read_traces, write_traces_atomic


def make_trace(prompt_id: str, model_id: str = "m") -> Trace:
    return Trace(prompt_id=prompt_id, model_id=model_id, prompt="p", rendered="r", thinking="t",
                 answer="a", closed_by="model", finished=True, thinking_tokens=3, answer_tokens=1)


def test_round_trip(tmp_path):
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path, "m")
    writer.write([make_trace("a"), make_trace("b")])
    assert [t.prompt_id for t in read_traces(path)] == ["a", "b"]
    assert read_traces(path)[0] == make_trace("a")


def test_torn_last_line_is_repaired(tmp_path):
    path = tmp_path / "t.jsonl"
    TraceWriter(path, "m").write([make_trace("a")])
    with open(path, "a") as handle:
        handle.write(make_trace("b").to_json()[:25])  # killed mid-write
    assert [t.prompt_id for t in read_traces(path)] == ["a"]

    writer = TraceWriter(path, "m")  # reopening cuts the torn tail
    assert writer.done == {"a"}
    writer.write([make_trace("b")])
    assert [t.prompt_id for t in read_traces(path)] == ["a", "b"]


def test_malformed_middle_line_names_line(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [make_trace("a").to_json(), "{not json", make_trace("b").to_json()]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFileError, match="line 2"):
        read_traces(path)
    with pytest.raises(TraceFileError, match="line 2"):
        TraceWriter(path, "m")
    assert path.read_text().count("\n") == 3  # nothing was cut


def test_record_missing_fields(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt_id": "a"}) + "\n")
    with pytest.raises(TraceFileError, match="required fields"):
        read_traces(path)


def test_other_model_is_rejected(tmp_path):
    path = tmp_path / "t.jsonl"
    TraceWriter(path, "model-a").write([make_trace("a", "model-a")])
    with pytest.raises(TraceFileError, match="model-a"):
        TraceWriter(path, "model-b")
    assert len(read_traces(path)) == 1


def test_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="cliffkit generate"):
        read_traces(tmp_path / "none.jsonl")


def test_atomic_rewrite_keeps_labels(tmp_path):
    path = tmp_path / "t.jsonl"
    trace = make_trace("a")
    trace.labels = {"refused": True}
    write_traces_atomic(path, [trace])
    assert read_traces(path)[0].labels == {"refused": True}
    assert not (tmp_path / "t.jsonl.tmp").exists()
