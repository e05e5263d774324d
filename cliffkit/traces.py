"""The trace record and its JSON Lines store, which survives interruption.

One line is one trace. Lines are written whole, flushed and fsynced batch by batch,
so a killed run loses at most the batch in flight. A torn last line (the process
died mid-write) is cut off with a warning when the file is opened again; a malformed
line anywhere else is an error, because silently skipping it would lose data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

logger = logging.getLogger(__name__)

ClosedBy = Literal["model", "budget", "none"]
SCHEMA_VERSION = 1


@dataclass
class Trace:
    """One generated reasoning trace for one prompt.

    `closed_by` is "model" when the model wrote the closing think marker itself,
    "budget" when budget forcing appended it, and "none" when the trace has no
    closing marker (for example a trace imported from elsewhere); such a trace
    has `finished=False` and is kept, never dropped.
    """

    prompt_id: str
    model_id: str
    prompt: str
    rendered: str
    thinking: str
    answer: str
    closed_by: ClosedBy
    finished: bool
    thinking_tokens: int
    answer_tokens: int
    source: str = ""
    category: str = ""
    harmful: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    # Labels added later by a judge, e.g. {"refused": true, "judge": "keyword"}.
    labels: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Trace":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING} - set(data)
        if missing:
            raise ValueError(f"trace record lacks required fields {sorted(missing)}")
        return cls(**{key: value for key, value in data.items() if key in names})


class TraceFileError(ValueError):
    """A trace file that cannot be read or does not match the run."""


def read_traces(path: str | Path) -> list[Trace]:
    """Read every trace of a JSON Lines file. A torn final line is ignored with a warning."""
    return list(_iter_traces(Path(path), repair=False))


def _iter_traces(path: Path, repair: bool) -> Iterator[Trace]:
    if not path.exists():
        raise FileNotFoundError(f"Trace file {str(path)!r} not found. Run `cliffkit generate` first.")

    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = lines[-1] != b""  # a complete file ends with a newline
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        is_last = number == len(lines)
        try:
            yield Trace.from_dict(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as error:
            if is_last and torn:
                logger.warning("%s: ignoring a torn last line (%d bytes), left by an interrupted write",
                               path, len(line))
                if repair:
                    _truncate_torn_tail(path, len(raw) - len(line))
                return
            raise TraceFileError(
                f"{path}, line {number}: malformed trace record ({error}). Fix or delete that line; "
                "the other lines are intact."
            ) from error


def _truncate_torn_tail(path: Path, keep_bytes: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(keep_bytes)
        handle.flush()
        os.fsync(handle.fileno())


class TraceWriter:
    """Append traces to a JSON Lines file, resuming a previous run of the same model.

    Opening checks the existing records: a torn last line is removed, and records of
    another model raise `TraceFileError`, so two models never mix in one file.
    """

    def __init__(self, path: str | Path, model_id: str):
        self.path = Path(path)
        self.model_id = model_id
        self.done: set[str] = set()
        if self.path.exists():
            self._load_existing()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _load_existing(self) -> None:
        for trace in _iter_traces(self.path, repair=True):
            if trace.model_id != self.model_id:
                raise TraceFileError(
                    f"{self.path} holds traces of model {trace.model_id!r}, not {self.model_id!r}. "
                    "Write to another --out file, or pass the model that wrote this one."
                )
            self.done.add(trace.prompt_id)
        logger.info("Resuming %s: %d traces already written", self.path, len(self.done))

    def write(self, traces: Iterable[Trace]) -> None:
        """Append traces as whole lines and fsync, so a crash leaves every written line intact."""
        traces = list(traces)
        payload = "".join(trace.to_json() + "\n" for trace in traces)
        if not payload:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        self.done.update(trace.prompt_id for trace in traces)


def write_traces_atomic(path: str | Path, traces: Iterable[Trace]) -> None:
    """Rewrite a whole trace file through a temporary file and an atomic rename."""
    path = Path(path)
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for trace in traces:
            handle.write(trace.to_json() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
