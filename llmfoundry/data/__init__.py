"""Data: corpus readers, tokenizer loading, conversion to MDS shards, loaders, and the tiny default data.

Importing this module stays cheap (no torch, streaming or transformers). The tiny default corpus, tokenizer and
MDS shards (``tokenizer: bundled``, ``${bundled:mds}``) are built at first use from this machine's own Python
installation: ``llmfoundry/data/bundled.py``. What the package itself ships in ``llmfoundry/assets`` is written
for this project: finetuning examples and tiny ICL tasks.
"""
from __future__ import annotations

import os

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


# The hash of every MDS shard our converters write into index.json; loaders check it when they download or
# decompress a shard (data/streams.py).
SHARD_HASH = "xxh3_64"


class DataError(ValueError):
    """A user-facing data problem. The message names the file (and line) or the option, and the fix."""


__all__ = ["ASSETS", "SHARD_HASH", "DataError"]
