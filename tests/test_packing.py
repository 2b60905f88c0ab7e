"""The packed stream reads like the corpus: documents in input order, each followed by EOS, for 1 and 2 processes.

Real inputs (a folder of one-document text files, a JSON Lines file) are converted to real MDS shards with the
bundled tokenizer and read back with mosaicml-streaming.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from llmfoundry.data.convert import ConvertConfig, StagedStream, contiguous_ranges, convert
from llmfoundry.data.readers import JsonFiles, TextFiles, find_files

REPO = Path(__file__).resolve().parents[1]
N = 64      # concat_tokens: small, so that most documents span several samples
EOS = 0     # the bundled tokenizer's <|endoftext|>
WORDS = ["apple", "birch", "cedar", "delta", "ember", "fjord", "grove", "harbor", "island", "juniper"]


def document(i: int) -> str:
    """Document i: recognisable at its start and end, 10 to 170 words long (about 30 to 600 tokens)."""
    words = " ".join(f"{WORDS[(i + k) % len(WORDS)]}{i}.{k}" for k in range(10 + (i * 37) % 160))
    return f"Document {i:02d} begins.\n{words}\nDocument {i:02d} ends.\n"


def text_to_mds(argv: list[str]):
    """``data_prep/convert_text_to_mds.py`` run in this process; its ConvertSummary."""
    spec = importlib.util.spec_from_file_location("convert_text_to_mds", REPO / "data_prep" / "convert_text_to_mds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def read_samples(out) -> np.ndarray:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    return np.stack([ds[i]["tokens"] for i in range(len(ds))])


def assert_reads_like_the_corpus(samples: np.ndarray, docs: list[str], tok, summary) -> None:
    """The samples, concatenated, are the documents in order, each followed by EOS; only the last partial
    sample (fewer than N tokens, the end of the last document(s)) is missing."""
    expected = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        expected += [*ids, EOS]
    flat = samples.reshape(-1).tolist()
    assert samples.shape == (len(expected) // N, N)
    assert flat == expected[:len(flat)]
    assert summary.dropped_tokens == len(expected) - len(flat) < N and summary.documents == len(docs)

    # every EOS is followed by the start of the next document, and the pieces between EOS decode to the documents
    pieces = tok.decode(flat).split("<|endoftext|>")
    complete, cut = pieces[:-1], pieces[-1]
    assert complete == docs[:len(complete)]
    assert docs[len(complete)].startswith(cut)
    for piece, doc in zip(complete[1:], docs[1:]):
        assert piece.startswith(doc[:len("Document 00 begins.")])
    assert len(complete) >= len(docs) - 2  # the tail of 64 tokens holds at most the last document and a half


def seam_is_mid_sample(token_counts: list[int], sizes: list[int]) -> bool:
    """True when the first process's range (2 processes) ends inside a sample, not on a sample boundary."""
    (_, stop), _ = contiguous_ranges(sizes, 2)
    return sum(token_counts[:stop]) % N != 0


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    for i in range(14):
        (folder / f"doc{i:02d}.txt").write_text(document(i))
    return folder


def test_documents_of_a_folder_stay_in_order_with_1_and_2_processes(text_folder, tmp_path, tok):
    source = TextFiles(tuple(find_files([str(text_folder)])))
    docs = [document(i) for i in range(14)]
    counts = [len(ids) + 1 for ids in tok(docs, add_special_tokens=False)["input_ids"]]
    assert seam_is_mid_sample(counts, [u.size for u in source.units()])  # the case the tail must carry over
    cfg = dict(concat_tokens=N, progress=False, compression="zstd")
    one = convert(source, ConvertConfig(out_root=str(tmp_path / "one"), processes=1, **cfg))
    two = text_to_mds([str(text_folder), "--out_root", str(tmp_path / "two"), "--concat_tokens", str(N),
                       "--processes", "2", "--no_progress"])  # the command line
    assert sorted(os.listdir(tmp_path / "two")) == ["index.json", "part-00000", "part-00001"]
    samples = read_samples(tmp_path / "one")
    assert_reads_like_the_corpus(samples, docs, tok, one)
    assert_reads_like_the_corpus(read_samples(tmp_path / "two"), docs, tok, two)
    assert np.array_equal(read_samples(tmp_path / "two"), samples)  # same samples, same order
    assert (one.samples, one.dropped_tokens) == (two.samples, two.dropped_tokens) and two.processes == 2


def test_records_of_a_json_lines_file_stay_in_order_with_1_and_2_processes(tmp_path, tok):
    docs = [document(i) for i in range(40)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    source = JsonFiles((str(path),), block_bytes=4096)  # several slices, so 2 processes each take a range
    units = source.units()
    assert len(units) > 4
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        s = convert(source, ConvertConfig(out_root=str(out), concat_tokens=N, processes=processes, progress=False))
        assert s.processes == processes
        assert_reads_like_the_corpus(read_samples(out), docs, tok, s)
    assert np.array_equal(read_samples(tmp_path / "p1"), read_samples(tmp_path / "p2"))


def test_a_range_shorter_than_a_sample_is_carried_through(tmp_path, tok):
    """Three processes, the middle one with a document shorter than a sample: its tokens join the samples
    on both sides, nothing is lost there."""
    folder = tmp_path / "in"
    folder.mkdir()
    docs = [document(5), "Tiny middle document.\n", document(8)]
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d)
    source = TextFiles(tuple(find_files([str(folder)])))
    s = convert(source, ConvertConfig(out_root=str(tmp_path / "out"), concat_tokens=N, processes=3, progress=False))
    assert s.processes == 3
    assert_reads_like_the_corpus(read_samples(tmp_path / "out"), docs, tok, s)


def test_contiguous_ranges_and_the_staged_stream(tmp_path):
    assert contiguous_ranges([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert contiguous_ranges([100, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert contiguous_ranges([1, 1, 1, 100], 3) == [(0, 2), (2, 3), (3, 4)]  # never empty
    assert contiguous_ranges([5], 1) == [(0, 1)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(1, 1000, size=rng.integers(1, 12)).tolist()
        parts = int(rng.integers(1, len(sizes) + 1))
        ranges = contiguous_ranges(sizes, parts)
        assert len(ranges) == parts and ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
        assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    pieces = [np.arange(0, 7, dtype=np.int32), np.zeros(0, np.int32), np.arange(7, 20, dtype=np.int32)]
    paths = []
    for i, p in enumerate(pieces):
        paths.append(str(tmp_path / f"{i}.bin"))
        p.tofile(paths[-1])
    stream = StagedStream(tuple(paths), tuple(len(p) for p in pieces))
    assert stream.read(0, 20).tolist() == list(range(20))
    assert stream.read(5, 9).tolist() == [5, 6, 7, 8] and stream.read(9, 9).tolist() == []
