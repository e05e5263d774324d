"""Commands `cliffkit reproduce` (execute every chapter, then build the book) and `cliffkit student-copies`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    from cliffkit.book import DEFAULT_CELL_TIMEOUT, PROFILES

    reproduce = subparsers.add_parser(
        "reproduce", help="execute every chapter of the book in order with papermill, then build the site.")
    reproduce.add_argument("--profile", default="ci", choices=PROFILES,
                           help="sizes of the chapters: ci (2 CPU cores, about 20 minutes), laptop or gpu "
                                "(default: ci).")
    reproduce.add_argument("--run-dir", default=None,
                           help="run folder that every chapter reads and writes (default: runs/book-<profile>).")
    reproduce.add_argument("--from", dest="start", default=None, metavar="NN",
                           help="start at chapter NN (such as 03); earlier chapters are not run.")
    reproduce.add_argument("--force", action="store_true",
                           help="execute chapters again even when an earlier run with the same notebook and "
                                "parameters succeeded.")
    reproduce.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                           help="extra chapter parameter, such as n_per_source=8; VALUE is read as JSON when it "
                                "parses, else as a string. Repeat for several.")
    reproduce.add_argument("--cell-timeout", type=int, default=DEFAULT_CELL_TIMEOUT,
                           help=f"seconds one cell may run before the chapter fails (default: {DEFAULT_CELL_TIMEOUT}).")
    reproduce.add_argument("--kernel", default=None,
                           help="Jupyter kernel name (default: the notebooks' own, python3).")
    reproduce.add_argument("--notebooks", default="notebooks", help="folder of the chapters (default: notebooks).")
    reproduce.add_argument("--build-dir", default="_build",
                           help="build folder: executed chapters go to <build-dir>/notebooks and the site to "
                                "<build-dir>/html (default: _build).")
    stages = reproduce.add_mutually_exclusive_group()
    stages.add_argument("--no-build", action="store_true", help="execute the chapters but do not build the site.")
    stages.add_argument("--build-only", action="store_true",
                        help="build the site from the executed copies already in <build-dir>/notebooks.")
    reproduce.set_defaults(handler=cmd_reproduce)

    students = subparsers.add_parser(
        "student-copies", help="write the chapters without their solution cells (tag 'solution'), for handing out.")
    students.add_argument("--out", required=True, help="folder that receives the student notebooks.")
    students.add_argument("--notebooks", default="notebooks", help="folder of the chapters (default: notebooks).")
    students.set_defaults(handler=cmd_student_copies)


def parse_params(items: list[str]) -> dict[str, Any]:
    """Parse NAME=VALUE strings; VALUE is JSON when it parses (8, null, true, "x"), else a plain string."""
    parameters: dict[str, Any] = {}
    for item in items:
        name, separator, raw = item.partition("=")
        if not separator or not name.strip():
            raise ValueError(f"Invalid --param {item!r}: write NAME=VALUE, such as n_per_source=8.")
        try:
            parameters[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            parameters[name.strip()] = raw
    return parameters


def cmd_reproduce(args: argparse.Namespace) -> int:
    from cliffkit.book import build_book, execute_chapters

    build_dir = Path(args.build_dir)
    executed_dir = build_dir / "notebooks"
    if not args.build_only:
        run_dir = Path(args.run_dir or f"runs/book-{args.profile}").resolve()
        parameters = {"profile": args.profile, "run_dir": str(run_dir), **parse_params(args.param)}
        runs = execute_chapters(args.notebooks, executed_dir, parameters, start=args.start, force=args.force,
                                kernel_name=args.kernel, cell_timeout=args.cell_timeout, log=logger.info)
        print(f"Chapters ({args.profile} profile, run folder {run_dir}): wall-clock and kernel CPU seconds")
        for run in runs:
            print(f"    {run.chapter.name:<28} {run.status:<9} {run.seconds:7.0f} s {run.cpu_seconds:7.0f} CPU s")
        total, cpu_total = sum(run.seconds for run in runs), sum(run.cpu_seconds for run in runs)
        print(f"    {'total':<28} {'':<9} {total:7.0f} s {cpu_total:7.0f} CPU s")
    if not args.no_build:
        root = Path(args.notebooks).resolve().parent
        if not (root / "_config.yml").exists() or not (root / "_toc.yml").exists():
            raise FileNotFoundError(f"No _config.yml and _toc.yml in {root}, the folder above --notebooks. "
                                    "Run from the repository root, or pass --no-build.")
        html = build_book(root, executed_dir, build_dir)
        print(f"Book: {html / 'index.html'}")
    return 0


def cmd_student_copies(args: argparse.Namespace) -> int:
    from cliffkit.book import write_student_copies

    written = write_student_copies(args.notebooks, args.out)
    print(f"Wrote {len(written)} student copies without solutions to {args.out}:")
    for path in written:
        print(f"    {path.name}")
    return 0
