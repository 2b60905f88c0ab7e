"""The tiny default data, built at first use from this machine's own Python installation.

``tokenizer: bundled`` and ``${bundled:mds}`` (the quick start, the CPU YAMLs, the tests) need a small real corpus,
a tokenizer and MDS shards. The package ships none of them: the corpus is read where Python is installed, and the
tokenizer and shards are built from it once (about 5 s) into a cache folder:

    $MPT_FORGE_CACHE, else $XDG_CACHE_HOME/mpt-forge, else ~/.cache/mpt-forge
        tiny-<fingerprint>/
            corpus/python_reference.jsonl   prose: the topics of Python's reference docs (``pydoc_data.topics``)
            corpus/code/*.py                code: 32 standard-library modules, one document per file
            tokenizer/                      4096-token byte-level BPE trained on the train documents
            mds/train, mds/val              256-token packed samples (uncompressed MDS)
            build.json                      what was built from what; written last (the folder is complete)

The fingerprint hashes the corpus text and this build's recipe, so another Python version gets its own folder and
nothing stale is reused. Documents are in a fixed order (the topics by name, then the code files by name); every
document i with i % 20 == 6 is held out for ``val`` (about 5% of the text). Processes that start together (the
ranks of one run) wait on a file lock while the first one builds.

    python -m llmfoundry.data.bundled            # build now (if needed) and print where everything is
    python -m llmfoundry.data.bundled --corpus   # print only the corpus folder (for the converters)
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from llmfoundry.data import SHARD_HASH, DataError

RECIPE = 2  # bump when the build below changes what it writes
VOCAB_SIZE = 4096
CONCAT_TOKENS = 256
VAL_EVERY, VAL_OFFSET = 20, 6
STDLIB_MODULES = (
    "abc.py", "argparse.py", "base64.py", "bisect.py", "calendar.py", "collections/__init__.py", "colorsys.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "fnmatch.py", "fractions.py",
    "functools.py", "glob.py", "graphlib.py", "heapq.py", "json/decoder.py", "json/encoder.py", "numbers.py",
    "operator.py", "pathlib.py", "pprint.py", "queue.py", "random.py", "sched.py", "shlex.py", "statistics.py",
    "string.py", "textwrap.py", "tokenize.py",
)
_FIX = ("install Python's full standard library (its .py sources and pydoc_data; e.g. Debian's "
        "libpython3.x-stdlib, or a python.org / pyenv / conda build), or train on your own data: "
        "tokenizer: <folder or hub name> and train_loader.local: <MDS folder>")


def cache_root() -> Path:
    """Where built data lives: ``$MPT_FORGE_CACHE``, else ``$XDG_CACHE_HOME/mpt-forge``, else ``~/.cache/mpt-forge``."""
    if os.environ.get("MPT_FORGE_CACHE"):
        return Path(os.environ["MPT_FORGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mpt-forge"


def corpus_sources() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(prose, code): lists of (name, text) read from the running Python's installation, in document order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise DataError(f"the tiny default corpus needs this Python's pydoc_data package ({e}); {_FIX}") from None
    stdlib = sysconfig.get_paths()["stdlib"]
    missing = [m for m in STDLIB_MODULES if not os.path.isfile(os.path.join(stdlib, m))]
    if missing:
        raise DataError(f"the tiny default corpus reads {len(STDLIB_MODULES)} standard-library sources from "
                        f"{stdlib}, and {len(missing)} are missing ({', '.join(missing[:3])}...); {_FIX}")
    prose = [(key, topics[key].strip() + "\n") for key in sorted(topics)]
    code = []
    for module in STDLIB_MODULES:
        with open(os.path.join(stdlib, module), encoding="utf-8") as f:
            code.append((module.replace("/__init__.py", ".py").replace("/", "_"), f.read()))
    return prose, sorted(code)


def corpus_documents() -> list[str]:
    """The corpus as a list of documents: the prose topics, then the code files (the order the splits use)."""
    prose, code = corpus_sources()
    return [text for _, text in prose] + [text for _, text in code]


def split_documents(docs: list[str]) -> dict[str, list[str]]:
    return {"train": [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_OFFSET],
            "val": [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_OFFSET]}


def fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256(f"recipe {RECIPE} vocab {VOCAB_SIZE} concat {CONCAT_TOKENS}\n".encode())
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    return h.hexdigest()[:12]


def write_samples(folder: Path, docs: list[str], tokenizer) -> int:
    """Pack ``docs`` as the converters do (each document's tokens then EOS, back to back, cut every
    ``CONCAT_TOKENS``; the final partial sample dropped) into uncompressed MDS shards; returns the sample count."""
    import numpy as np
    from streaming import MDSWriter

    stream = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    n = len(stream) // CONCAT_TOKENS
    with MDSWriter(out=str(folder), columns={"tokens": "ndarray:int32"}, compression=None,
                   hashes=[SHARD_HASH]) as out:
        for i in range(n):
            out.write({"tokens": np.asarray(stream[i * CONCAT_TOKENS:(i + 1) * CONCAT_TOKENS], dtype=np.int32)})
    return n


def build(folder: Path) -> dict:
    """Write corpus files, tokenizer and MDS shards into ``folder`` (which must not exist); return the summary."""
    from llmfoundry.data.bpe import train_bpe_tokenizer

    prose, code = corpus_sources()
    docs = [t for _, t in prose] + [t for _, t in code]
    (folder / "corpus" / "code").mkdir(parents=True)
    with open(folder / "corpus" / "python_reference.jsonl", "w", encoding="utf-8") as f:
        for key, text in prose:
            f.write(json.dumps({"id": key, "text": text}, ensure_ascii=False) + "\n")
    for name, text in code:
        (folder / "corpus" / "code" / name).write_text(text, encoding="utf-8")

    splits = split_documents(docs)
    tokenizer = train_bpe_tokenizer(splits["train"], VOCAB_SIZE)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    summary = {"python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
               "fingerprint": fingerprint(docs), "documents": len(docs), "vocab_size": len(tokenizer),
               "concat_tokens": CONCAT_TOKENS}
    for split, texts in splits.items():
        summary[f"{split}_samples"] = write_samples(folder / "mds" / split, texts, tokenizer)
    return summary


def ensure_built() -> Path:
    """The built folder for this Python's corpus; built now (under a file lock) when it is not there yet."""
    docs = corpus_documents()
    root = cache_root()
    final = root / f"tiny-{fingerprint(docs)}"
    if (final / "build.json").is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f"{final.name}.lock", "w")
    except OSError as e:
        raise DataError(f"cannot write the tiny default data's cache folder {root} ({e.strerror}); set "
                        f"MPT_FORGE_CACHE to a writable folder") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the ranks of a run wait here while the first one builds
        if (final / "build.json").is_file():
            return final
        shutil.rmtree(final, ignore_errors=True)  # an earlier build that stopped half-way
        partial = root / f"{final.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        print(f"Building the tiny default data from Python {sys.version.split()[0]}'s standard library into "
              f"{final} (once, a few seconds)", file=sys.stderr, flush=True)
        t0 = time.time()
        try:
            summary = build(partial)
            summary["seconds"] = round(time.time() - t0, 1)
            (partial / "build.json").write_text(json.dumps(summary, indent=2) + "\n")
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        print(f"Built the tiny default data in {summary['seconds']} s: {summary['train_samples']} train and "
              f"{summary['val_samples']} val samples of {CONCAT_TOKENS} tokens", file=sys.stderr, flush=True)
    return final


def tokenizer_dir() -> str:
    """``tokenizer: bundled``: the folder of the tiny default tokenizer (built at first use)."""
    return str(ensure_built() / "tokenizer")


def mds_dir() -> str:
    """``${bundled:mds}``: the folder holding ``train/`` and ``val/`` MDS shards (built at first use)."""
    return str(ensure_built() / "mds")


def corpus_dir() -> str:
    """``${bundled:corpus}``: the corpus as files (``python_reference.jsonl``, ``code/*.py``) for the converters."""
    return str(ensure_built() / "corpus")


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description="Build the tiny default data now (if needed) and print where it is.")
    parser.add_argument("--corpus", action="store_true", help="print only the corpus folder")
    parser.add_argument("--tokenizer", action="store_true", help="print only the tokenizer folder")
    parser.add_argument("--mds", action="store_true", help="print only the MDS folder (train/ and val/)")
    args = parser.parse_args(argv)
    paths = {"corpus": corpus_dir(), "tokenizer": tokenizer_dir(), "mds": mds_dir()}
    only = [k for k in paths if getattr(args, k)]
    if only:
        print("\n".join(paths[k] for k in only))
        return
    print((ensure_built() / "build.json").read_text().strip())
    for what, path in paths.items():
        print(f"{what:9s} {path}")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"Error: {e}")
