"""Rebuild the bundled offline assets: tokenizer and tiny MDS dataset (and, with --write_corpus, the corpus).

    python data_prep/build_bundled.py                 # tokenizer + MDS from llmfoundry/assets/corpus
    python data_prep/build_bundled.py --write_corpus  # first re-extract the corpus from this Python's stdlib

Corpus: the language reference topics of Python's documentation (``pydoc_data/topics.py``) as JSON Lines, and
a handful of stdlib modules as code files (PSF license). Every 20th document is held out for ``val``.
Tokenizer: byte-level BPE, 4096 tokens, trained on the train documents. MDS: 256 tokens per sample, zstd.
Each shard is also stored decompressed so that reading the bundled data never writes into the package.
"""
import argparse
import json
import os
import shutil
import sys
import sysconfig

from llmfoundry.data import ASSETS, BUNDLED_CONCAT_TOKENS, DataError
from llmfoundry.data.convert import ConvertConfig, convert, run_cli
from llmfoundry.data.readers import TextList, bundled_documents
from llmfoundry.data.tokenizer import padded_vocab_size, train_bpe_tokenizer

VOCAB_SIZE = 4096
VAL_EVERY, VAL_OFFSET = 20, 6  # documents i with i % 20 == 6 go to val: 5% of documents and of text
STDLIB_MODULES = [
    "abc.py", "argparse.py", "base64.py", "bisect.py", "calendar.py", "collections/__init__.py", "colorsys.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "fnmatch.py", "fractions.py",
    "functools.py", "glob.py", "graphlib.py", "heapq.py", "json/decoder.py", "json/encoder.py", "numbers.py",
    "operator.py", "pathlib.py", "pprint.py", "queue.py", "random.py", "sched.py", "shlex.py", "statistics.py",
    "string.py", "textwrap.py", "tokenize.py",
]

README = """# Bundled corpus

A small real corpus of English prose and Python code, extracted from the Python {version} standard library
by `python data_prep/build_bundled.py --write_corpus`. Both parts are covered by the Python Software
Foundation License (see LICENSE, copied from the same Python installation).

- `python_reference.jsonl`: {topics} documents, one per topic of the Python language reference and library
  docs as shipped in `pydoc_data/topics.py` (fields `id`, `text`).
- `code/*.py`: {modules} stdlib modules, one document per file, unchanged (`collections/__init__.py` is
  saved as `collections.py`, `json/decoder.py` as `json_decoder.py`, `json/encoder.py` as `json_encoder.py`).

`llmfoundry/assets/tokenizer` (trained on the train documents) and `llmfoundry/assets/mds/tiny/{{train,val}}`
are built from these files by `python data_prep/build_bundled.py`. In document order (the JSON Lines records,
then the code files by name), every document i with i % 20 == 6 is held out for `val`: about 5% of the
documents and of the text.
"""


def write_corpus(folder: str) -> None:
    """Extract the corpus from the running Python's stdlib into ``folder``."""
    from pydoc_data.topics import topics

    stdlib = sysconfig.get_paths()["stdlib"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(folder, "code"))
    with open(os.path.join(folder, "python_reference.jsonl"), "w", encoding="utf-8") as f:
        for key in sorted(topics):
            f.write(json.dumps({"id": key, "text": topics[key].strip() + "\n"}, ensure_ascii=False) + "\n")
    for module in STDLIB_MODULES:
        name = module.replace("/__init__.py", ".py").replace("/", "_")
        shutil.copyfile(os.path.join(stdlib, module), os.path.join(folder, "code", name))
    license_file = os.path.join(stdlib, "LICENSE.txt")
    if not os.path.isfile(license_file):
        raise DataError(f"{license_file} is missing (some distributions move it); run with a python.org build")
    shutil.copyfile(license_file, os.path.join(folder, "LICENSE"))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(README.format(version=sys.version.split()[0], topics=len(topics), modules=len(STDLIB_MODULES)))


def store_decompressed(folder: str) -> None:
    """Next to each compressed shard, write its decompressed copy (what a reader would otherwise create)."""
    from streaming.base.compression import decompress

    with open(os.path.join(folder, "index.json")) as f:
        index = json.load(f)
    for shard in index["shards"]:
        if shard.get("zip_data"):
            with open(os.path.join(folder, shard["zip_data"]["basename"]), "rb") as f:
                raw = decompress(shard["compression"], f.read())
            assert len(raw) == shard["raw_data"]["bytes"]
            with open(os.path.join(folder, shard["raw_data"]["basename"]), "wb") as f:
                f.write(raw)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(folder) for n in names)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write_corpus", action="store_true", help="re-extract the corpus from this Python first")
    parser.add_argument("--assets", default=ASSETS, help="assets folder to write into (default: the package's)")
    args = parser.parse_args(argv)
    corpus, tok_dir = os.path.join(args.assets, "corpus"), os.path.join(args.assets, "tokenizer")
    mds = os.path.join(args.assets, "mds", "tiny")
    if args.write_corpus:
        write_corpus(corpus)
    docs = bundled_documents(corpus)
    splits = {"train": [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_OFFSET],
              "val": [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_OFFSET]}

    tokenizer = train_bpe_tokenizer(splits["train"], VOCAB_SIZE)
    shutil.rmtree(tok_dir, ignore_errors=True)
    tokenizer.save_pretrained(tok_dir)
    print(f"tokenizer: {len(tokenizer)} tokens (model vocab_size {padded_vocab_size(tokenizer)}) -> {tok_dir}")

    for split, texts in splits.items():
        out = os.path.join(mds, split)
        cfg = ConvertConfig(out_root=out, tokenizer=tok_dir, concat_tokens=BUNDLED_CONCAT_TOKENS,
                            compression="zstd", overwrite=True, progress=False)
        s = convert(TextList(tuple(texts)), cfg)
        store_decompressed(out)
        print(f"{split}: {s.documents} documents, {s.samples} samples of {BUNDLED_CONCAT_TOKENS} tokens, "
              f"{s.shards} shard(s), {folder_bytes(out) / 1e6:.2f} MB -> {out}")
    print(f"corpus {folder_bytes(corpus) / 1e6:.2f} MB, tokenizer {folder_bytes(tok_dir) / 1e6:.2f} MB, "
          f"mds {folder_bytes(mds) / 1e6:.2f} MB")


if __name__ == "__main__":
    run_cli(main)
