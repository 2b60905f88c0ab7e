"""Corpus -> MDS conversion: packing exactness, every converter on real files, processes, s3, bad input."""
from __future__ import annotations

import collections
import gzip
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from llmfoundry.data import DataError, bundled
from llmfoundry.data.convert import ConvertConfig, Packer, convert, pack, processes_note, run_cli
from llmfoundry.data.readers import (HFDataset, JsonFiles, ParquetFiles, TextFiles, TextList,
                                     find_files, iter_documents)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = bundled.corpus_dir()  # the tiny default corpus as files (built at first use)
PROSE = os.path.join(CORPUS, "python_reference.jsonl")
CODE = os.path.join(CORPUS, "code")


def cfg(out, **kw) -> ConvertConfig:
    return ConvertConfig(out_root=str(out), concat_tokens=kw.pop("concat_tokens", 128), progress=False, **kw)


def stream_of(tok, docs, bos=(), eos=(0,)) -> list[int]:
    out = []
    for ids in tok(list(docs), add_special_tokens=False)["input_ids"]:
        out += [*bos, *ids, *eos]
    return out


def read_mds(local, remote=None, split=None) -> list[np.ndarray]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(local), remote=remote, split=split, shuffle=False, batch_size=1)
    rows = [ds[i]["tokens"] for i in range(len(ds))]
    assert all(r.dtype == np.int32 for r in rows)
    return rows


def as_multiset(rows) -> collections.Counter:
    return collections.Counter(r.tobytes() for r in rows)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "data_prep", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=180)


# ------------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("bos", [(), (5,)])
def test_packing_is_exact(n, bos):
    rng = np.random.default_rng(n)
    docs = [list(rng.integers(1, 100, size=rng.integers(0, 150))) for _ in range(40)]
    rows, tail = pack(docs, n, bos_ids=bos, eos_ids=(0,))
    stream = [t for d in docs for t in (*bos, *d, 0)]
    k = len(stream) // n
    assert rows.shape == (k, n) and rows.dtype == np.int32
    assert rows.reshape(-1).tolist() == stream[:k * n]  # all samples == the stream minus the final partial one
    assert tail.tolist() == stream[k * n:] and len(tail) < n
    # feeding the documents in several calls carries the remainder across calls
    packer = Packer(n, bos, (0,))
    parts = [packer.add(docs[i:i + 3]) for i in range(0, len(docs), 3)]
    assert np.concatenate(parts).tolist() == rows.tolist() and packer.tail.tolist() == tail.tolist()


def test_json_converter_on_the_bundled_corpus_is_exact(tmp_path, tok):
    """One JSON Lines file (one slice): the samples are exactly the EOS-joined stream minus the last partial one."""
    out = tmp_path / "out"
    s = convert(JsonFiles((PROSE,)), cfg(out, concat_tokens=256))
    docs = list(iter_documents(JsonFiles((PROSE,))))
    stream = stream_of(tok, docs)
    rows = read_mds(out)
    assert s.documents == len(docs) == 79 and s.samples == len(rows) == len(stream) // 256
    assert np.concatenate(rows).tolist() == stream[:len(rows) * 256]
    assert s.dropped_tokens == len(stream) % 256 and s.tokens == 256 * s.samples and s.shards == 1
    # with a BOS text as well
    s = convert(JsonFiles((PROSE,)), cfg(out, concat_tokens=256, bos_text="<|endoftext|>", overwrite=True))
    assert np.concatenate(read_mds(out)).tolist() == stream_of(tok, docs, bos=(0,))[:s.samples * 256]


def test_text_converter_cli_on_bundled_code_and_refusal_of_nonempty_output(tmp_path, tok, capsys):
    out = tmp_path / "code"
    args = ["data_prep/convert_text_to_mds.py", CODE, "--extensions", ".py", "--out_root", str(out),
            "--concat_tokens", "512", "--compression", "none"]
    res = run_script(*args)
    assert res.returncode == 0, res.stderr
    assert "converted 32 documents into" in res.stderr and "tokens/s" in res.stderr
    files = find_files([CODE], [".py"])
    assert find_files([os.path.join(CODE, "*.py")]) == files
    total = len(stream_of(tok, iter_documents(TextFiles(tuple(files)))))
    rows = read_mds(out)
    assert len(rows) == total // 512 and {len(r) for r in rows} == {512}
    assert tok.decode(rows[0]).startswith(open(files[0]).read()[:200])
    with pytest.raises(SystemExit) as exit:  # again, without --overwrite (in this process: quicker)
        run_cli(lambda: load_script("convert_text_to_mds").main(args[1:]))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"error: output {out} is not empty (holds index.json, shard.00000.mds" in err and "--overwrite" in err


def test_parquet_converter(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = bundled.corpus_documents()[:30]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(30)), "content": docs}), path, row_group_size=10)
    source = ParquetFiles((str(path),), text_field="content")
    assert len(source.units()) == 3
    s = convert(source, cfg(tmp_path / "out"))
    total = len(stream_of(tok, docs))
    assert s.documents == 30 and s.samples == total // 128 == len(read_mds(tmp_path / "out"))


def test_hf_converter_on_a_saved_dataset_and_on_local_json(tmp_path, tok):
    import datasets

    docs = bundled.corpus_documents()
    train, val = docs[:60], docs[60:70]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train, "n": list(range(60))}),
                               "validation": datasets.Dataset.from_dict({"text": val, "n": list(range(10))})})
    dd.save_to_disk(str(tmp_path / "saved"))
    hf = load_script("convert_dataset_hf")
    out = tmp_path / "out"
    summaries = hf.main(["--dataset", str(tmp_path / "saved"), "--splits", "train", "validation",
                         "--out_root", str(out), "--concat_tokens", "128", "--no_progress"])
    for split, texts in [("train", train), ("validation", val)]:
        rows = read_mds(out, split=split)
        assert summaries[split].documents == len(texts) and len(rows) == len(stream_of(tok, texts)) // 128

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train[:20]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train[20:40]))
    summaries = hf.main(["--dataset", "json", "--data_files", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                         "--out_root", str(tmp_path / "json"), "--concat_tokens", "128", "--no_progress"])
    assert summaries["train"].documents == 40
    assert len(read_mds(tmp_path / "json", split="train")) == summaries["train"].samples
    with pytest.raises(DataError, match=r"has no split 'test' \(splits: train, validation\)"):
        hf.main(["--dataset", str(tmp_path / "saved"), "--splits", "test", "--out_root", str(tmp_path / "x")])
    with pytest.raises(DataError, match=r"has no field 'content' \(fields: text, n\); pass --text_field"):
        convert(HFDataset(str(tmp_path / "saved"), text_field="content"), cfg(tmp_path / "y"))


# ---------------------------------------------------------------------------------------- processes and s3


def test_two_processes_give_the_same_samples_in_the_same_order_and_one_merged_index(tmp_path, capsys):
    source = JsonFiles((PROSE,), block_bytes=64 << 10)  # 8 byte-range slices of one file
    assert len(source.units()) == 8
    one = convert(source, cfg(tmp_path / "one"))
    two = convert(source, cfg(tmp_path / "two", processes=2))
    assert "note:" not in capsys.readouterr().err  # as many processes as asked for: nothing to explain
    assert one.documents == two.documents == 79 and one.samples == two.samples
    assert one.dropped_tokens == two.dropped_tokens < 128 and two.processes == 2 and two.shards == 2
    assert one.cpu_seconds > 0 and two.cpu_seconds > 0 and one.tokens_per_second > 0
    assert sorted(os.listdir(tmp_path / "two")) == ["index.json", "part-00000", "part-00001"]  # staged tokens gone
    assert np.array_equal(np.stack(read_mds(tmp_path / "one")), np.stack(read_mds(tmp_path / "two")))


def test_progress_bar_has_a_total(tmp_path, capsys):
    """The bar counts the input (bytes of the files) to a known total, documents and tokens alongside."""
    from tqdm import tqdm

    files = tuple(find_files([CODE])[:4])
    convert(TextFiles(files), ConvertConfig(out_root=str(tmp_path / "one"), concat_tokens=128))
    err = capsys.readouterr().err
    total = tqdm.format_sizeof(sum(os.path.getsize(f) for f in files))
    assert "converting: 100%" in err and f"{total}/{total}" in err, err
    assert "4 docs, " in err and "converted 4 documents" in err
    convert(TextFiles(files), ConvertConfig(out_root=str(tmp_path / "two"), concat_tokens=128, processes=2))
    err = capsys.readouterr().err
    assert "tokenizing: 100%" in err and "writing: 100%" in err, err


def test_one_input_file_says_how_many_processes_are_used_and_why(tmp_path, capsys):
    """--processes 8 on one small JSON Lines file (one slice): one process, and one line on stderr saying so."""
    out = tmp_path / "eight"
    run_cli(lambda: load_script("convert_dataset_json").main([PROSE, "--out_root", str(out), "--concat_tokens",
                                                              "128", "--processes", "8", "--no_progress"]))
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: 1 input file: using 1 process, not --processes 8 (a process converts whole slices: a file, "
                   "16 MiB of JSON Lines, a parquet row group or a dataset shard); split the corpus into more files "
                   "to convert in parallel"], err
    assert sorted(os.listdir(out)) == ["index.json", "shard.00000.mds.zstd"]  # written by this one process
    alone = convert(JsonFiles((PROSE,)), cfg(tmp_path / "one"))
    assert read_mds(out) and np.array_equal(np.stack(read_mds(out)), np.stack(read_mds(tmp_path / "one")))
    assert alone.processes == 1 and "note:" not in capsys.readouterr().err
    # one file cut into slices, and several files
    assert processes_note(JsonFiles((PROSE,), block_bytes=64 << 10).units(), 16, 8).startswith(
        "note: 1 input file in 8 slices: using 8 processes, not --processes 16 (")
    code = find_files([CODE])[:3]
    assert processes_note(TextFiles(tuple(code)).units(), 4, 3).startswith("note: 3 input files: using 3 processes,")
    assert processes_note(TextList(("a", "b")).units(), 2, 1).startswith("note: the input is 1 slice: using 1 ")


def test_s3_out_root(tmp_path, s3_bucket):
    out = f"{s3_bucket}/mds/code"
    source = TextFiles(tuple(find_files([CODE])))
    local = convert(source, cfg(tmp_path / "local"))
    remote = convert(source, cfg(out, processes=2))
    assert as_multiset(read_mds(tmp_path / "cache1", remote=out)) == as_multiset(read_mds(tmp_path / "local"))
    assert remote.samples == local.samples
    with pytest.raises(DataError, match=rf"output {out} is not empty \(holds index.json, part-00000/.*--overwrite"):
        convert(source, cfg(out))
    small = convert(TextFiles(tuple(find_files([CODE])[:3])), cfg(out, overwrite=True))
    assert len(read_mds(tmp_path / "cache2", remote=out)) == small.samples < remote.samples
    with pytest.raises(DataError, match="bucket 'no-such-bucket' of --out_root s3://no-such-bucket/x does not exist"):
        convert(source, cfg("s3://no-such-bucket/x"))



def _convert_to_s3_env(tmp_path, env: dict[str, str], out: str = "s3://my-bucket/mds/x/train"):
    """data_prep/convert_text_to_mds.py to ``out`` in a fresh process with ``env`` instead of any AWS settings."""
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "a.txt").write_text("some text " * 200)
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "S3_ENDPOINT_URL"}
    base.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "data_prep/convert_text_to_mds.py", str(tmp_path / "in"), "--out_root", out,
                          "--concat_tokens", "256"], cwd=REPO, env={**base, **env}, capture_output=True, text=True,
                         timeout=120)
    return res, time.monotonic() - t0


def test_s3_out_root_unreachable_endpoint_is_one_line_exit_1(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    res, seconds = _convert_to_s3_env(tmp_path, {"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "dummy",
                                                 "AWS_SECRET_ACCESS_KEY": "dummy", "AWS_DEFAULT_REGION": "us-east-1"})
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: --out_root s3://my-bucket/mds/x/train: cannot list bucket 'my-bucket' at "
                                 f"{endpoint}: EndpointConnectionError: "), res.stderr
    assert "Fix: check that the endpoint is up and reachable from here (S3_ENDPOINT_URL)" in res.stderr
    assert seconds < 60, seconds


def test_s3_out_root_without_credentials_is_one_line_exit_1(tmp_path):
    res, _ = _convert_to_s3_env(tmp_path, {})
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("error: --out_root s3://my-bucket/mds/x/train: cannot list bucket 'my-bucket' at "
                                 "AWS S3 (no S3_ENDPOINT_URL set): NoCredentialsError: Unable to locate credentials. "
                                 "Fix: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), res.stderr


def test_s3_upload_failure_is_one_line_exit_1(s3_bucket, capsys, monkeypatch):
    """The store fails while shards upload (after the out_root check passed): one line naming the real error."""
    from botocore.exceptions import EndpointConnectionError
    from streaming.base.storage.upload import S3Uploader

    def refuse(self, filename):
        raise EndpointConnectionError(endpoint_url=os.environ["S3_ENDPOINT_URL"])

    monkeypatch.setattr(S3Uploader, "upload_file", refuse)
    out = f"{s3_bucket}/mds/x"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: load_script("convert_text_to_mds").main([CODE, "--out_root", out, "--concat_tokens", "64",
                                                                   "--no_progress"]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit.value.code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: --out_root {out}: cannot upload to bucket '{s3_bucket[5:]}' at "
                             f"{os.environ['S3_ENDPOINT_URL']}: EndpointConnectionError: "), err


def test_overwrite_replaces_a_local_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(DataError, match=rf"output {out} is not empty \(holds old.txt\); pass --overwrite"):
        convert(TextList(("some text " * 100,)), cfg(out))
    convert(TextList(("some text " * 100,)), cfg(out, overwrite=True))
    assert sorted(os.listdir(out)) == ["index.json", "shard.00000.mds.zstd"]


# ---------------------------------------------------------------------------------------------- bad input


def lines(*records) -> str:
    return "".join(r if isinstance(r, str) else json.dumps(r) for r in records)


def test_bad_json_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines({"text": "a"}, "\n", {"text": "b"}, "\n", {"content": "c", "id": 3}, "\n"))
    with pytest.raises(DataError, match=rf"{bad}, line 3: no field 'text' \(fields present: content, id\); "
                                        r"pass --text_field content"):
        convert(JsonFiles((str(bad),)), cfg(tmp_path / "o"))
    bad.write_text('{"text": "a"}\n{"text": "b",}\n')
    with pytest.raises(DataError, match=rf"{bad}, line 2: not valid JSON \(Expecting property name"):
        convert(JsonFiles((str(bad),)), cfg(tmp_path / "o"))
    bad.write_text('{"text": "a\tb"}\n')  # a raw tab inside a string: json's message ends in "at" itself
    with pytest.raises(DataError, match=rf"{bad}, line 1: not valid JSON \(Invalid control character at column 12\)"):
        convert(JsonFiles((str(bad),)), cfg(tmp_path / "o"))
    cut = tmp_path / "cut.json"
    cut.write_text('[{"text": "a"}, {"text": "b')
    with pytest.raises(DataError, match=rf"{cut}, line 1: not valid JSON \(Unterminated string starting at column 26"):
        convert(JsonFiles((str(cut),)), cfg(tmp_path / "o"))
    bad.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=rf"{bad}, line 1: field 'text' holds int '5', not a string"):
        convert(JsonFiles((str(bad),)), cfg(tmp_path / "o"))
    # undecodable bytes on line 40, in the third 100-byte slice of the file: the line is still counted right
    bad.write_bytes(b"".join(b'{"text": "line %02d"}\n' % i for i in range(1, 40)) + b'{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=rf"{bad}, line 40: bytes .* are not valid UTF-8.*--decode_errors replace"):
        convert(JsonFiles((str(bad),), block_bytes=100), cfg(tmp_path / "o"))
    s = convert(JsonFiles((str(bad),), decode_errors="replace", block_bytes=100), cfg(tmp_path / "ok", concat_tokens=8))
    assert s.documents == 40
    gz, lst = tmp_path / "bad.json.gz", tmp_path / "list.json"
    with gzip.open(gz, "wt") as f:
        f.write('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(DataError, match=rf"{gz}, line 2: no field 'text' \(fields present: txt\)"):
        convert(JsonFiles((str(gz),)), cfg(tmp_path / "o"))
    lst.write_text(json.dumps([{"text": "a"}, {"body": "b"}]))
    with pytest.raises(DataError, match=rf"{lst}, record 1: no field 'text'"):
        convert(JsonFiles((str(lst),)), cfg(tmp_path / "o"))


def test_bad_text_parquet_and_empty_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"first\nsecond\nthird \xc3\x28 line\n")
    with pytest.raises(DataError, match=rf"{bad}, line 3: bytes b'\\xc3' are not valid UTF-8"):
        convert(TextFiles((str(bad),)), cfg(tmp_path / "o"))
    pq.write_table(pa.table({"content": ["a", "b", None]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet: no column 'text' \(columns: content\); pass --text_field"):
        convert(ParquetFiles((str(tmp_path / "p.parquet"),)), cfg(tmp_path / "o"))
    with pytest.raises(DataError, match=r"p.parquet, row 2: column 'content' holds NoneType"):
        convert(ParquetFiles((str(tmp_path / "p.parquet"),), "content"), cfg(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=rf"folder {tmp_path / 'empty'} holds no files ending in .jsonl"):
        find_files([str(tmp_path / "empty")], [".jsonl"])
    with pytest.raises(DataError, match=r"input .*/\*.nothing is not a file or folder, and as a glob pattern it "
                                        r"matches no files"):
        find_files([str(tmp_path / "*.nothing")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"the inputs are empty \(.*empty.jsonl\); nothing was converted"):
        convert(JsonFiles((str(tmp_path / "empty.jsonl"),)), cfg(tmp_path / "o"))
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="the inputs hold no documents"):
        convert(JsonFiles((str(tmp_path / "blank.jsonl"),)), cfg(tmp_path / "o"))
    with pytest.raises(DataError, match="hold 3 tokens, fewer than one sample of --concat_tokens 128; nothing was"):
        convert(TextList(("two words",)), cfg(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")  # nothing half-written is left behind
    with pytest.raises(DataError, match="unknown --compression 'zstdd'; use none or one of"):
        convert(TextList(("x",)), cfg(tmp_path / "o", compression="zstdd"))
    with pytest.raises(DataError, match="documents would run together with no separator"):
        convert(TextList(("x",)), cfg(tmp_path / "o", eos_text=""))


def cli_error(capsys, script: str, *args: str, logged: int = 0) -> str:
    """Run a data_prep script in this process; it must stop with status 2 and one ``error: ...`` line (after at
    most ``logged`` lines that a library logs itself, when pytest does not capture them)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: load_script(script).main([*args, "--no_progress"]))
    err = capsys.readouterr().err.splitlines()
    assert exit.value.code == 2 and 1 <= len(err) <= logged + 1 and err[-1].startswith("error: "), err
    return err[-1]


def test_cli_errors_name_the_problem_in_one_line_and_keep_old_output(tmp_path, capsys, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good, out = tmp_path / "good.jsonl", tmp_path / "out"
    good.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    err = cli_error(capsys, "convert_dataset_json", str(tmp_path / "*.nothing"), "--out_root", str(out))
    assert "*.nothing is not a file or folder, and as a glob pattern it matches no files" in err
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b" x}\n')
    err = cli_error(capsys, "convert_dataset_json", str(tmp_path / "bad.jsonl"), "--out_root", str(out))
    assert f"error: {tmp_path / 'bad.jsonl'}, line 2: not valid JSON" in err
    pq.write_table(pa.table({"id": [1], "content": ["x"]}), tmp_path / "p.parquet")
    err = cli_error(capsys, "convert_dataset_parquet", str(tmp_path / "p.parquet"), "--out_root", str(out))
    assert "p.parquet: no column 'text' (columns: id, content); pass --text_field" in err

    # an existing empty out_root is used as it is: no "will remove contents" warning from the MDS writer
    out.mkdir()
    with caplog.at_level("WARNING"):
        run_cli(lambda: load_script("convert_dataset_json").main([str(good), "--out_root", str(out),
                                                                  "--concat_tokens", "32", "--no_progress"]))
    assert not [r for r in caplog.records if "remove contents" in r.getMessage()]
    listing = sorted(os.listdir(out))
    assert listing == ["index.json", "shard.00000.mds.zstd"]
    # bad settings or empty inputs stop before --overwrite deletes the existing output
    err = cli_error(capsys, "convert_dataset_json", str(good), "--out_root", str(out), "--overwrite",
                    "--concat_tokens", "0")
    assert "error: --concat_tokens must be at least 1, got 0" in err
    (tmp_path / "empty.jsonl").write_text("")
    err = cli_error(capsys, "convert_dataset_json", str(tmp_path / "empty.jsonl"), "--out_root", str(out),
                    "--overwrite")
    assert f"error: the inputs are empty ({tmp_path / 'empty.jsonl'}); nothing was converted" in err
    assert sorted(os.listdir(out)) == listing
    # inputs inside out_root: --overwrite would delete them
    err = cli_error(capsys, "convert_text_to_mds", str(tmp_path), "--out_root", str(tmp_path), "--overwrite")
    assert f"lies inside --out_root {tmp_path}; choose an --out_root outside the inputs" in err
    assert good.exists() and sorted(os.listdir(out)) == listing
    # an out_root that cannot be created
    err = cli_error(capsys, "convert_dataset_json", str(good), "--out_root", str(good / "sub"))
    assert f"error: cannot create --out_root {good / 'sub'} (Not a directory); pass a folder you can write to" in err


def test_corrupt_and_truncated_gzip_name_the_file(tmp_path, capsys):
    fake, cut = tmp_path / "fake.jsonl.gz", tmp_path / "cut.jsonl.gz"
    fake.write_text('{"text": "not compressed"}\n')
    data = gzip.compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(3000)))
    cut.write_bytes(data[:len(data) // 2])  # an interrupted download
    for path, why in [(fake, "Not a gzipped file"), (cut, "Compressed file ended before")]:
        err = cli_error(capsys, "convert_dataset_json", str(path), "--out_root", str(tmp_path / "o"),
                        "--concat_tokens", "8")
        assert f"error: {path}: not a readable gzip file ({why}" in err and "leave it out" in err
    assert not (tmp_path / "o").exists()


def test_bad_tokenizer_fails_fast_offline_in_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 50)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    hub = "no-such-org/no-such-tokenizer"
    for name, expect in [(str(tmp_path / "no_tok"), f"error: tokenizer path {tmp_path / 'no_tok'} does not exist"),
                         (hub, f"error: could not load tokenizer '{hub}' from the Hugging Face hub")]:
        res = subprocess.run([sys.executable, "data_prep/convert_text_to_mds.py", str(tmp_path / "a.txt"),
                              "--out_root", str(tmp_path / "o"), "--tokenizer", name], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stderr.startswith(expect) and res.stderr.count("\n") == 1, res.stderr
    assert "unset HF_HUB_OFFLINE" in res.stderr and not (tmp_path / "o").exists()


def test_help_names_the_default_tokenizer():
    """--help says what --tokenizer is when not given, and prints the docstring's example commands as written
    (a line ending in a backslash stays a shell continuation)."""
    res = run_script("data_prep/convert_dataset_json.py", "--help")
    assert res.returncode == 0, res.stderr
    flat = " ".join(res.stdout.split())
    assert "--tokenizer TOKENIZER 'bundled' (default: the tiny byte-level BPE tokenizer built at first use, " \
           "llmfoundry/data/bundled.py)" in flat, res.stdout
    assert "--text_field text \\\n        --out_root s3://bucket/mds/mydata" in res.stdout, res.stdout


def test_hf_converter_bad_data_files_and_splits(tmp_path, capsys):
    good, empty, bad = tmp_path / "good.jsonl", tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    empty.write_text("")
    bad.write_text('{"text": "a"}\n{"text": "b" x}\n')
    out = tmp_path / "out"
    err = cli_error(capsys, "convert_dataset_hf", "--dataset", "json", "--data_files", str(tmp_path / "*.nothing"),
                    "--out_root", str(out))
    assert f"holds no records: --data_files {tmp_path / '*.nothing'} matches no files" in err
    json_files = ("convert_dataset_hf", "--dataset", "json", "--data_files")
    err = cli_error(capsys, *json_files, str(empty), "--out_root", str(out))
    assert "error: dataset json split 'train' holds no records: its data files are empty" in err
    # datasets logs "Failed to load JSON from file ..." itself, before our line
    err = cli_error(capsys, *json_files, str(bad), "--out_root", str(out), logged=1)
    assert f"shard 0 (file {bad}), after row 0: could not read the data (JSON parse error" in err
    # a bad split name stops before any split is converted
    err = cli_error(capsys, "convert_dataset_hf", "--dataset", "json", "--data_files", str(good), "--splits",
                    "train", "tset", "--out_root", str(out))
    assert "split 'tset': Bad split: tset. Available splits: ['train']; pass --splits with existing names" in err
    assert not (out / "train").exists()
