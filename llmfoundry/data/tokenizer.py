"""Tokenizers: load one by name ('bundled', a local directory, or a Hugging Face hub name).

``'bundled'`` is the tiny default tokenizer, built at first use (``llmfoundry/data/bundled.py``) with
``llmfoundry/data/bpe.py``: gpt-neox-20b's conventions at a small size, ``<|endoftext|>`` = id 0.
"""
from __future__ import annotations

import os
import re

from llmfoundry.data import DataError

# Any one of these files makes a directory loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "vocab.txt")
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def load_tokenizer(name_or_path: str = "bundled"):
    """Load a tokenizer: ``'bundled'``, a local directory, or a hub name such as ``EleutherAI/gpt-neox-20b``.

    A hub name is read from the local Hugging Face cache when it is there (no request is made, so nodes without
    network and every rank of a large job load it at once), else downloaded.

    Raises ``DataError`` naming the fix for a missing path, a directory without tokenizer files, or a hub
    name that cannot be fetched (e.g. offline).
    """
    from transformers import AutoTokenizer

    if name_or_path == "bundled":
        from llmfoundry.data.bundled import tokenizer_dir
        name_or_path = tokenizer_dir()
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
            raise DataError(f"tokenizer directory {path} holds no tokenizer files (expected one of "
                            f"{', '.join(TOKENIZER_FILES)}); pass a directory written by save_pretrained, "
                            f"'bundled', or a hub name")
        return AutoTokenizer.from_pretrained(path)
    if os.path.exists(path):
        raise DataError(f"tokenizer {path} is a file; pass the directory that holds it")
    if name_or_path.startswith((".", "/", "~")) or not _HUB_NAME.match(name_or_path):  # a path, not a repo id
        raise DataError(f"tokenizer path {os.path.abspath(path)} does not exist; pass an existing directory, "
                        f"'bundled', or a hub name such as EleutherAI/gpt-neox-20b")
    try:  # the local hub cache first: no request at all (air-gapped nodes, hundreds of ranks loading at once)
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or cached incompletely): ask the hub below
        pass
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # OSError offline or for an unknown repo; others for broken repos
        hint = " (did you mean 'bundled'?)" if name_or_path.lower().startswith("bundle") else ""
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"could not load tokenizer '{name_or_path}' from the Hugging Face hub{hint}: {first_line}\n"
            f"It is not a local directory either ({os.path.abspath(path)} does not exist). Pass a local "
            f"directory holding the tokenizer files, or 'bundled', or allow network access to the hub "
            f"(and unset HF_HUB_OFFLINE)") from e


def padded_vocab_size(tokenizer, multiple: int = 64) -> int:
    """The model vocab size for ``tokenizer``: its length rounded up to a multiple of ``multiple``."""
    return -(-len(tokenizer) // multiple) * multiple
