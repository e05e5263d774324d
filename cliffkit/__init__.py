"""cliffkit: study, teach and reproduce the refusal cliff in reasoning models.

The library behind the book. Modules are named by concept: `models` and `families`
load models and know their think format, `render` builds exact inputs, `generate`
writes reasoning traces, `judge` labels them, and `datasets` ships the prompts.
"""

__version__ = "0.1.0"
