"""Data: corpus readers, tokenizer loading, conversion to MDS shards, and the bundled offline assets.

This module only names paths so that importing it stays cheap (no torch, streaming or transformers).

- ``BUNDLED_CORPUS``: a small real corpus of prose and code from Python's own docs and stdlib (PSF license).
- ``BUNDLED_TOKENIZER``: a 4096-token byte-level BPE tokenizer trained on it (``<|endoftext|>`` = id 0).
- ``BUNDLED_MDS``: MDS shards of that corpus (``train/`` and ``val/``, 256 tokens per sample).

All three are rebuilt by ``python data_prep/build_bundled.py``.
"""
from __future__ import annotations

import os

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
BUNDLED_CORPUS = os.path.join(ASSETS, "corpus")
BUNDLED_TOKENIZER = os.path.join(ASSETS, "tokenizer")
BUNDLED_MDS = os.path.join(ASSETS, "mds", "tiny")
BUNDLED_CONCAT_TOKENS = 256


class DataError(ValueError):
    """A user-facing data problem. The message names the file (and line) or the option, and the fix."""


__all__ = ["BUNDLED_CORPUS", "BUNDLED_TOKENIZER", "BUNDLED_MDS", "BUNDLED_CONCAT_TOKENS", "DataError"]
