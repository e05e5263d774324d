"""Harmful, benign, over-refusal and arithmetic prompts for the refusal experiments, shipped offline.

Sources and licences are listed in `data/NOTICE.md` and `data/provenance.json`.
"""

from cliffkit.datasets.arithmetic import ArithmeticProblem, extract_final_number, generate_problems, is_correct
from cliffkit.datasets.loaders import list_categories, list_sources, load_prompts, prompts_to_frame, sample_prompts
from cliffkit.datasets.provenance import find_checksum_mismatches, load_provenance
from cliffkit.datasets.records import BENIGN_SOURCES, HARMFUL_SOURCES, SOURCES, SPLITS, Prompt
from cliffkit.datasets.splits import DEFAULT_FRACTIONS, split_of

__all__ = [
    "BENIGN_SOURCES",
    "DEFAULT_FRACTIONS",
    "HARMFUL_SOURCES",
    "SOURCES",
    "SPLITS",
    "ArithmeticProblem",
    "Prompt",
    "extract_final_number",
    "find_checksum_mismatches",
    "generate_problems",
    "is_correct",
    "list_categories",
    "list_sources",
    "load_prompts",
    "load_provenance",
    "prompts_to_frame",
    "sample_prompts",
    "split_of",
]
