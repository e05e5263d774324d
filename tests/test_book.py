"""Tests of the book helpers: settings, checks, student copies, chapter execution and the chapters' structure."""

import ast
import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from cliffkit import book
from cliffkit.commands.book import parse_params

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _cell(kind: str, source: str, tags: tuple[str, ...] = ()):
    cell = new_code_cell(source) if kind == "code" else new_markdown_cell(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def _write(path: Path, cells) -> Path:
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = dict(KERNEL)
    nbformat.write(notebook, path)
    return path


# --------------------------------------------------------------------------- settings and small helpers

def test_settings_profile_defaults_and_overrides():
    from cliffkit.profiles import load_profile

    ci = book.settings_for("ci")
    laptop = book.settings_for("laptop")
    assert ci.n_per_source == load_profile("ci").per_source["harmbench"]
    assert ci.think_budget == load_profile("ci").generation["think_budget"]
    assert ci.model == load_profile("ci").model
    assert laptop.n_per_source > ci.n_per_source
    assert book.settings_for("ci", n_per_source=None).n_per_source == ci.n_per_source
    changed = book.settings_for("ci", think_budget=7, run_dir="x/y", seed=3)
    assert changed.think_budget == 7
    assert changed.run_dir == Path("x/y")
    assert changed.seed == 3
    assert changed.answer_budget == ci.answer_budget
    assert changed.generation().think_budget == 7
    assert changed.generation().seed == 3


@pytest.mark.parametrize("arguments, fragment", [
    ({"profile": "huge"}, "Unknown profile 'huge'"),
    ({"profile": "ci", "n_per_sauce": 3}, "Unknown book setting 'n_per_sauce'"),
    ({"profile": "ci", "batch_size": 0}, "batch_size must be a positive integer"),
])
def test_settings_reject_bad_values(arguments, fragment):
    with pytest.raises(ValueError, match=fragment):
        book.settings_for(**arguments)


def test_redact_keeps_first_words():
    text = "Step one: gather the following items and then proceed"
    assert book.redact(text, words=3) == "Step one: gather [redacted]"
    assert book.redact(text, show=True) == text
    assert book.redact("I cannot help.", words=6) == "I cannot help."


def test_run_check_outcomes(monkeypatch, capsys):
    monkeypatch.delenv(book.STRICT_CHECKS_VARIABLE, raising=False)

    def check(function):
        assert function(2) == 4, "double(2) should be 4"

    def unsolved(x):
        raise NotImplementedError

    assert book.run_check("Exercise 1", check, lambda x: 2 * x) is True
    assert "Exercise 1: correct." in capsys.readouterr().out
    assert book.run_check("Exercise 1", check, unsolved) is False
    assert "not attempted yet" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="should be 4"):
        book.run_check("Exercise 1", check, lambda x: x)

    monkeypatch.setenv(book.STRICT_CHECKS_VARIABLE, "1")
    with pytest.raises(NotImplementedError):
        book.run_check("Exercise 1", check, unsolved)


def test_parse_params_reads_json_then_text():
    assert parse_params(["n_per_source=8", "model=null", "run_dir=runs/x", "flag=true"]) == {
        "n_per_source": 8, "model": None, "run_dir": "runs/x", "flag": True}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_params(["n_per_source"])


# --------------------------------------------------------------------------- notebook transforms

def test_student_copies_strip_solutions_keep_checks(tmp_path):
    source = tmp_path / "chapters"
    source.mkdir()
    cells = [
        _cell("markdown", "# Exercise 1"),
        _cell("code", "def double(x):\n    raise NotImplementedError", ("exercise",)),
        _cell("markdown", "Solution:", ("solution",)),
        _cell("code", "def double(x):\n    return 2 * x", ("solution", "hide-input")),
        _cell("code", "book.run_check('Exercise 1', check_double, double)", ("check",)),
        _cell("code", "print('kept')"),
    ]
    cells[-1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="kept\n")]
    cells[-1].execution_count = 3
    _write(source / "01_demo.ipynb", cells)
    _write(source / "02_other.ipynb", [_cell("code", "x = 1")])
    (source / "notes.ipynb").write_text("not a chapter", encoding="utf-8")

    written = book.write_student_copies(source, tmp_path / "handout")

    assert [path.name for path in written] == ["01_demo.ipynb", "02_other.ipynb"]
    copy = nbformat.read(written[0], as_version=4)
    assert [cell.source for cell in copy.cells] == [
        "# Exercise 1",
        "def double(x):\n    raise NotImplementedError",
        "book.run_check('Exercise 1', check_double, double)",
        "print('kept')",
    ]
    assert "check" in copy.cells[2].metadata["tags"]
    assert copy.cells[3].outputs == []
    assert copy.cells[3].execution_count is None
    original = nbformat.read(source / "01_demo.ipynb", as_version=4)
    assert len(original.cells) == 6


def test_student_copies_refuse_to_overwrite_chapters(tmp_path):
    _write(tmp_path / "01_demo.ipynb", [_cell("code", "x = 1")])
    with pytest.raises(ValueError, match="overwrite the chapters"):
        book.write_student_copies(tmp_path, tmp_path)


def test_injected_parameters_cell_gets_hidden(tmp_path):
    import papermill

    source = _write(tmp_path / "00_params.ipynb", [
        _cell("code", "profile = 'ci'", ("parameters",)),
        _cell("code", "print(profile)"),
    ])
    executed = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(source), str(executed), parameters={"profile": "laptop"}, progress_bar=False)

    assert book.hide_injected_parameters(executed) == 1
    cells = nbformat.read(executed, as_version=4).cells
    injected = [cell for cell in cells if "injected-parameters" in cell.metadata.get("tags", [])]
    assert len(injected) == 1
    assert "remove-cell" in injected[0].metadata["tags"]
    assert "profile = \"laptop\"" in injected[0].source
    parameters_cell = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])][0]
    assert "remove-cell" not in parameters_cell.metadata["tags"]
    assert cells[-1].outputs[0]["text"] == "laptop\n"
    assert book.hide_injected_parameters(executed) == 0


# --------------------------------------------------------------------------- executing chapters

def _three_chapters(folder: Path) -> None:
    folder.mkdir()
    _write(folder / "00_ok.ipynb", [_cell("code", "value = 1", ("parameters",)),
                                    _cell("code", "print(value + 1)")])
    _write(folder / "01_fails.ipynb", [_cell("code", "value = 1", ("parameters",)),
                                       _cell("markdown", "Some narration."),
                                       _cell("code", "total = value * 2\nraise ValueError(f'boom {total}')"),
                                       _cell("code", "print('never reached')")])
    _write(folder / "02_later.ipynb", [_cell("code", "value = 1", ("parameters",))])


def test_execution_stops_at_first_failing_cell(tmp_path):
    chapters, out = tmp_path / "chapters", tmp_path / "executed"
    _three_chapters(chapters)

    with pytest.raises(book.ChapterError) as caught:
        book.execute_chapters(chapters, out, {"value": 5}, log=lambda message: None)

    error = caught.value
    assert error.chapter.name == "01_fails"
    assert error.cell_index == 2
    assert "raise ValueError(f'boom {total}')" in error.source
    assert error.error == "ValueError: boom 10"
    assert "raise ValueError" in str(error)
    assert "--from 01" in str(error)
    assert (out / "00_ok.ipynb").exists()
    assert (out / "01_fails.ipynb").exists()
    assert not (out / "02_later.ipynb").exists()
    manifest = json.loads((out / book.MANIFEST).read_text())
    assert manifest["00_ok"]["status"] == "ok"
    assert manifest["01_fails"]["status"] == "failed"
    failed_cells = nbformat.read(out / "01_fails.ipynb", as_version=4).cells
    injected = [cell for cell in failed_cells if "injected-parameters" in cell.metadata.get("tags", [])]
    assert "remove-cell" in injected[0].metadata["tags"]

    # Fix the failing chapter: the rerun skips 00 and executes 01 and 02.
    _write(chapters / "01_fails.ipynb", [_cell("code", "value = 1", ("parameters",)), _cell("code", "x = 2")])
    runs = book.execute_chapters(chapters, out, {"value": 5}, log=lambda message: None)
    assert [(run.chapter.number, run.status) for run in runs] == [
        ("00", "skipped"), ("01", "executed"), ("02", "executed")]

    # Other parameters make every chapter run again; --from skips the earlier ones.
    runs = book.execute_chapters(chapters, out, {"value": 6}, start="01", log=lambda message: None)
    assert [(run.chapter.number, run.status) for run in runs] == [("01", "executed"), ("02", "executed")]
    with pytest.raises(ValueError, match="No chapter '09'"):
        book.execute_chapters(chapters, out, {"value": 6}, start="09")


def test_reproduce_command_reports_failing_cell(tmp_path, monkeypatch, caplog):
    from cliffkit.cli import main

    chapters = tmp_path / "chapters"
    _three_chapters(chapters)
    monkeypatch.chdir(tmp_path)

    code = main(["reproduce", "--notebooks", str(chapters), "--build-dir", str(tmp_path / "build"),
                 "--run-dir", str(tmp_path / "run"), "--no-build", "--param", "value=2"])

    assert code == 2
    message = "\n".join(record.getMessage() for record in caplog.records)
    assert "Chapter 01_fails failed at cell 2 (counting from 0)" in message
    assert "ValueError: boom 4" in message


def test_cell_timeout_names_the_cell(tmp_path):
    chapters = tmp_path / "chapters"
    chapters.mkdir()
    _write(chapters / "00_slow.ipynb", [_cell("code", "x = 1", ("parameters",)),
                                        _cell("code", "import time\ntime.sleep(60)")])

    with pytest.raises(book.ChapterError) as caught:
        book.execute_chapters(chapters, tmp_path / "out", {}, cell_timeout=3, log=lambda message: None)

    assert caught.value.cell_index == 1
    assert "time.sleep(60)" in caught.value.source
    assert "CellTimeoutError" in caught.value.error


# --------------------------------------------------------------------------- staging the book

def test_stage_book_prunes_missing_pages(tmp_path):
    root = tmp_path / "repo"
    (root / "book").mkdir(parents=True)
    (root / "notebooks").mkdir()
    (root / "book" / "intro.md").write_text("# Intro\n")
    (root / "_config.yml").write_text("title: test\n")
    (root / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nparts:\n"
        "  - caption: Chapters\n    chapters:\n      - file: notebooks/00_a\n      - file: notebooks/01_missing\n"
        "  - caption: Later\n    chapters:\n      - file: book/not_written\n")
    _write(root / "notebooks" / "00_a.ipynb", [_cell("code", "x = 1")])
    executed = tmp_path / "executed"

    with pytest.raises(FileNotFoundError, match="00_a.ipynb"):
        book.stage_book(root, executed, tmp_path / "stage")

    executed.mkdir()
    _write(executed / "00_a.ipynb", [_cell("code", "x = 1")])
    stage = book.stage_book(root, executed, tmp_path / "stage")

    import yaml

    toc = yaml.safe_load((stage / "_toc.yml").read_text())
    assert toc["parts"] == [{"caption": "Chapters", "chapters": [{"file": "notebooks/00_a"}]}]
    assert (stage / "notebooks" / "00_a.ipynb").exists()


# --------------------------------------------------------------------------- run-folder steps

def test_ensure_traces_generates_once_and_checks_settings(tmp_path):
    from cliffkit.testing import tiny_model
    from cliffkit.traces import read_traces

    lm = tiny_model()
    settings = book.settings_for("ci", run_dir=tmp_path, n_per_source=2, think_budget=4)
    settings = book.BookSettings(**{**settings.__dict__, "answer_budget": 4})

    traces = book.ensure_traces(settings, lm)

    assert len(traces) == 2 * (len(book.HARMFUL_SOURCES) + len(book.BENIGN_SOURCES))
    assert all("refused" in trace.labels for trace in traces)
    assert sum(trace.harmful for trace in traces) == 2 * len(book.HARMFUL_SOURCES)
    stored = (tmp_path / book.TRACES_FILE).read_bytes()
    assert [trace.prompt_id for trace in read_traces(tmp_path / book.TRACES_FILE)] == [t.prompt_id for t in traces]

    again = book.ensure_traces(settings, lm)
    assert [trace.to_json() for trace in again] == [trace.to_json() for trace in traces]
    assert (tmp_path / book.TRACES_FILE).read_bytes() == stored

    longer = book.BookSettings(**{**settings.__dict__, "think_budget": 5})
    with pytest.raises(ValueError, match="think_budget"):
        book.ensure_traces(longer, lm)


# --------------------------------------------------------------------------- the chapters themselves

CHAPTER_PATHS = sorted(NOTEBOOKS.glob(book.CHAPTER_GLOB))
PARAMETER_KEYS = {"profile", "model", "run_dir", "seed", "n_per_source", "think_budget", "batch_size", "SHOW_HARMFUL"}
HARMFUL_MARKERS = ("ensure_traces", "harmbench", "advbench", "strongreject", "HARMFUL_SOURCES", "harmful=True",
                   "ensure_pool")


def _tagged(notebook, tag: str):
    return [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]


def test_chapters_exist():
    assert [path.name[:2] for path in CHAPTER_PATHS][:1] == ["00"]


@pytest.mark.parametrize("path", CHAPTER_PATHS, ids=lambda path: path.stem)
def test_chapter_structure(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    markdown = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    code = "\n".join(cell.source for cell in code_cells)

    assert '"google.colab" in sys.modules' in code_cells[0].source, "the first code cell is the Colab set-up"
    assert all(not cell.outputs for cell in code_cells), "chapters are committed without outputs"

    parameters = _tagged(notebook, "parameters")
    assert len(parameters) == 1
    assigned = {target.id for node in ast.parse(parameters[0].source).body if isinstance(node, ast.Assign)
                for target in node.targets}
    assert PARAMETER_KEYS <= assigned

    assert "Learning goals" in markdown
    assert "pitfalls" in markdown.lower()
    if any(marker in code for marker in HARMFUL_MARKERS):
        assert "Content warning" in markdown

    solutions = _tagged(notebook, "solution")
    assert any(cell.cell_type == "code" for cell in solutions)
    assert all("hide-input" in cell.metadata["tags"] for cell in solutions if cell.cell_type == "code")
    checks = _tagged(notebook, "check")
    assert checks and all("book.run_check(" in cell.source for cell in checks)
    stubs = _tagged(notebook, "exercise")
    assert len(stubs) == len(checks)
    assert all("NotImplementedError" in cell.source for cell in stubs)


@pytest.mark.parametrize("path", CHAPTER_PATHS, ids=lambda path: path.stem)
def test_chapter_student_copy_parses(path):
    copy = book.student_copy(nbformat.read(path, as_version=4))
    assert not _tagged(copy, "solution")
    assert len(_tagged(copy, "check")) == len(_tagged(nbformat.read(path, as_version=4), "check"))
    for cell in copy.cells:
        if cell.cell_type == "code":
            ast.parse("\n".join(line for line in cell.source.splitlines() if not line.startswith(("!", "%"))))


def test_seed_base_evaluation_copies_matching_traces(tmp_path):
    from cliffkit.generate import generate_traces
    from cliffkit.testing import tiny_model
    from cliffkit.traces import read_traces

    lm = tiny_model()
    settings = book.settings_for("ci", run_dir=tmp_path, think_budget=4)
    settings = book.BookSettings(**{**settings.__dict__, "answer_budget": 4})
    prompts = book.evaluation_prompts(settings, 2)
    unablated = tmp_path / "ablation" / "traces" / "none.jsonl"
    generate_traces(lm, prompts, settings.generation(lm), out=unablated, progress=False)
    config = book.evaluation_config(settings, lm, 2)
    out = tmp_path / "eval" / "no-repair"

    copied = book.seed_base_evaluation(settings, config, out)

    groups = config.prompts()
    assert copied == len(prompts)
    assert {path.name for path in out.glob("*.jsonl")} == {"harmful.jsonl", "overrefusal.jsonl", "benign.jsonl"}
    for group in ("harmful", "overrefusal", "benign"):
        assert [t.prompt_id for t in read_traces(out / f"{group}.jsonl")] == [p.id for p in groups[group]]
    assert book.seed_base_evaluation(settings, config, out) == 0

    longer = book.evaluation_config(book.BookSettings(**{**settings.__dict__, "think_budget": 5}), lm, 2)
    assert book.seed_base_evaluation(settings, longer, tmp_path / "eval" / "other") == 0


def test_drop_progress_outputs_keeps_results(tmp_path):
    from nbformat.v4 import new_output

    cell = _cell("code", "run()")
    cell.outputs = [
        new_output("display_data", data={book.WIDGET_MIME: {"model_id": "x"}, "text/plain": "traces:   0%|  | 0/64"}),
        new_output("stream", name="stderr", text="\rscoring:  50%|#####     | 1/2\rscoring: 100%|##########| 2/2\n"),
        new_output("stream", name="stderr", text="WARNING only 5 refused traces\n"),
        new_output("stream", name="stdout", text="64 judged traces in 3 s\n"),
        new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}),
    ]
    path = _write(tmp_path / "00_x.ipynb", [cell])

    assert book.drop_progress_outputs(path) == 2

    kept = nbformat.read(path, as_version=4).cells[0].outputs
    assert [output.get("text", "") for output in kept[:2]] == ["WARNING only 5 refused traces\n",
                                                               "64 judged traces in 3 s\n"]
    assert "image/png" in kept[2]["data"]
    assert book.drop_progress_outputs(path) == 0


def test_settings_path_creates_parent_folders(tmp_path):
    settings = book.settings_for("ci", run_dir=tmp_path / "run")
    target = settings.path("heads", "direction")
    assert target == tmp_path / "run" / "heads" / "direction"
    assert target.parent.is_dir()
    assert not target.exists()


def test_rerun_of_early_chapter_reruns_later(tmp_path):
    chapters, out = tmp_path / "chapters", tmp_path / "executed"
    chapters.mkdir()
    for name in ("00_first", "01_second", "02_third"):
        _write(chapters / f"{name}.ipynb", [_cell("code", "value = 1", ("parameters",))])
    runs = book.execute_chapters(chapters, out, {"value": 5}, log=lambda message: None)
    assert [run.status for run in runs] == ["executed"] * 3

    # Editing chapter 01 reruns it and chapter 02, which may read what 01 writes; 00 is skipped.
    _write(chapters / "01_second.ipynb", [_cell("code", "value = 1", ("parameters",)), _cell("code", "x = 3")])
    runs = book.execute_chapters(chapters, out, {"value": 5}, log=lambda message: None)
    assert [(run.chapter.number, run.status) for run in runs] == [
        ("00", "skipped"), ("01", "executed"), ("02", "executed")]

    runs = book.execute_chapters(chapters, out, {"value": 5}, log=lambda message: None)
    assert [run.status for run in runs] == ["skipped"] * 3
