"""convert_on_spark on real Spark in local mode: the single-machine converter's samples, s3:// in and out, errors.

One SparkSession (local[2], no UI) serves the file; it starts after the S3 test server, so its Python workers have
the server's endpoint and credentials in their environment, as executors on a cluster would.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pyspark")

from llmfoundry.data import DataError, bundled  # noqa: E402
from llmfoundry.data.convert import ConvertConfig, StorageError, convert  # noqa: E402
from llmfoundry.data.readers import JsonFiles, TextFiles, find_files  # noqa: E402
from llmfoundry.data.spark import (S3Files, SparkSetupError, SparkTaskError, _plans, _Piece,  # noqa: E402
                                   convert_on_spark, java_command, open_inputs, start_spark)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 128  # tokens per sample


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return bundled.corpus_documents()


@pytest.fixture(scope="module")
def spark(s3_server):
    session = start_spark("local[2]", {"spark.ui.enabled": "false", "spark.driver.memory": "512m"}, progress=False)
    yield session
    session.stop()


def cfg(out, **kw) -> ConvertConfig:
    return ConvertConfig(out_root=str(out), concat_tokens=kw.pop("concat_tokens", N), progress=False, **kw)


def read_mds(out, cache=None, column="tokens") -> list:
    """The samples of the MDS dataset at ``out`` (local, or s3:// through the cache folder), in index order."""
    from streaming import StreamingDataset

    remote = str(out) if str(out).startswith("s3://") else None
    ds = StreamingDataset(local=str(cache if remote else out), remote=remote, shuffle=False, batch_size=1)
    return [ds[i][column] for i in range(len(ds))]


def same_samples(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def write_jsonl(folder, docs, files=3) -> list[str]:
    """``docs`` in ``files`` JSON Lines files of different lengths."""
    os.makedirs(folder, exist_ok=True)
    cuts = [0, len(docs) // 6, len(docs) // 2, len(docs)][:files + 1]
    paths = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        path = os.path.join(folder, f"part{i}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"text": d, "id": k}) + "\n" for k, d in enumerate(docs[a:b]))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------- the same samples, in order


def test_carried_tokens_make_the_one_stream():
    """Pieces of any length (empty, shorter than a sample, several samples): packing each piece after the tokens
    the pieces before it left over gives the samples of the whole stream."""
    from llmfoundry.data.convert import Packer, pack

    rng = np.random.default_rng(0)
    lengths = [0, 3, 300, 1, 0, 127, 128, 5, 700, 2]
    stream = rng.integers(1, 1000, size=sum(lengths)).astype(np.int32)
    bounds = np.cumsum([0] + lengths)
    pieces = [_Piece(r, 0, n, stream[a:b][-(N - 1):], 0.0) for r, (n, a, b) in
              enumerate(zip(lengths, bounds, bounds[1:]))]
    plans = _plans(pieces, N)
    rows = []
    for r, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if r in plans:
            packer = Packer(N)
            packer.tail = plans[r].carry
            got = packer.add_stream(stream[a:b])
            assert len(got) == plans[r].samples
            rows.append(got)
    assert [p.name for p in plans.values()] == [f"part-{i:05d}" for i in range(len(plans))]
    expected, _ = pack([stream.tolist()], N)
    assert np.array_equal(np.concatenate(rows), expected)


@pytest.mark.parametrize("partitions", [1, 2])
def test_json_files_give_the_single_machine_samples(spark, tmp_path, docs, partitions):
    """Three JSON Lines files cut into 64 KiB slices; Spark with 1 and 2 partitions against --processes 1 and 2."""
    source = JsonFiles(tuple(write_jsonl(tmp_path / "in", docs)), block_bytes=64 << 10)
    assert len(source.units()) > 4
    alone = convert(source, cfg(tmp_path / "alone", processes=partitions))
    s = convert_on_spark(source, cfg(tmp_path / "spark"), spark, partitions=partitions)
    assert same_samples(read_mds(tmp_path / "spark"), read_mds(tmp_path / "alone"))
    assert (s.documents, s.samples, s.tokens, s.dropped_tokens) == \
           (alone.documents, alone.samples, alone.tokens, alone.dropped_tokens)
    parts = [f"part-{r:05d}" for r in range(partitions)]
    assert sorted(os.listdir(tmp_path / "spark")) == ["index.json", *parts] and s.processes == partitions
    assert s.cores == 2 and s.tokens_per_core_second > 0 and "tokens/s per core" in str(s)


@pytest.mark.parametrize("partitions", [1, 2, 9])
def test_text_folder_gives_the_single_machine_samples(spark, tmp_path, partitions):
    """Six bundled code files and three tiny ones: with a partition per file (9), ranges shorter than a sample
    carry all their tokens on to the next."""
    folder = tmp_path / "code"
    folder.mkdir()
    for path in find_files([os.path.join(bundled.corpus_dir(), "code")])[:6]:
        shutil.copy(path, folder)
    for name in ("a_tiny.py", "m_tiny.py", "n_tiny.py"):
        (folder / name).write_text("x = 1\n")
    source = TextFiles(tuple(find_files([str(folder)])))
    assert len(source.units()) == 9
    alone = convert(source, cfg(tmp_path / "alone", processes=min(partitions, 2)))
    s = convert_on_spark(source, cfg(tmp_path / "spark"), spark, partitions=partitions)
    assert same_samples(read_mds(tmp_path / "spark"), read_mds(tmp_path / "alone"))
    assert s.samples == alone.samples and s.dropped_tokens == alone.dropped_tokens and s.processes == partitions


def test_raw_text_gives_the_single_machine_samples(spark, tmp_path, docs):
    source = JsonFiles(tuple(write_jsonl(tmp_path / "in", docs)))
    text_cfg = dict(tokenize=False)
    convert(source, cfg(tmp_path / "alone", processes=2, **text_cfg))
    s = convert_on_spark(source, cfg(tmp_path / "spark", **text_cfg), spark, partitions=2)
    assert read_mds(tmp_path / "spark", column="text") == read_mds(tmp_path / "alone", column="text") == \
           [d for d in docs if d]
    assert s.column == "text" and s.samples == len(docs)


# ------------------------------------------------------------------------------------------------------ s3


def upload(client, bucket: str, key: str, path) -> None:
    client.upload_file(str(path), bucket, key)


def test_s3_inputs_and_output(spark, s3_server, tmp_path, docs):
    """JSON Lines and parquet read from s3:// (s3a:// spelled too), shards written to s3://, read back: the samples
    of the single-machine converter on the same files held locally."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    client, bucket = s3_server.client(), s3_server.make_bucket()
    local = write_jsonl(tmp_path / "in", docs)
    for path in local:
        upload(client, bucket, f"corpus/json/{os.path.basename(path)}", path)
    upload(client, bucket, "corpus/json/.hidden/skip.jsonl", local[0])
    upload(client, bucket, "corpus/json/notes.txt", local[0])
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), parquet, row_group_size=20)
    upload(client, bucket, "corpus/pq/docs.parquet", parquet)

    source = open_inputs([f"s3a://{bucket}/corpus/json/"])
    assert isinstance(source, S3Files) and source.files.paths == tuple(
        f"s3://{bucket}/corpus/json/{os.path.basename(p)}" for p in local)
    source = dataclasses.replace(source, files=dataclasses.replace(source.files, block_bytes=64 << 10))
    local_source = JsonFiles(tuple(local), block_bytes=64 << 10)
    assert [(u.start, u.stop) for u in source.units()] == [(u.start, u.stop) for u in local_source.units()]
    out = f"s3://{bucket}/mds/json"
    s = convert_on_spark(source, cfg(out), spark, partitions=2)
    convert(local_source, cfg(tmp_path / "alone"))
    assert same_samples(read_mds(out, tmp_path / "cache"), read_mds(tmp_path / "alone"))
    assert s.documents == len(docs)

    pq_source = open_inputs([f"s3://{bucket}/corpus/pq/*.parquet"], text_field="content")
    assert len(pq_source.units()) == -(-len(docs) // 20)
    convert_on_spark(pq_source, cfg(f"s3://{bucket}/mds/pq"), spark, partitions=3)
    assert same_samples(read_mds(f"s3://{bucket}/mds/pq", tmp_path / "cache2"), read_mds(tmp_path / "alone"))

    with pytest.raises(DataError, match=rf"output {out} is not empty \(holds index.json, part-00000/"):
        convert_on_spark(source, cfg(out), spark)


def test_s3_bad_record_names_the_object_and_its_line(s3_server, tmp_path):
    """A bad line in the third 100-byte slice of an object: the line is counted from the start of the object."""
    client, bucket = s3_server.client(), s3_server.make_bucket()
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(b'{"text": "line %02d"}\n' % i for i in range(1, 12)) + b'{"text": 5}\n')
    upload(client, bucket, "in/bad.jsonl", path)
    source = open_inputs([f"s3://{bucket}/in/bad.jsonl"])
    source = dataclasses.replace(source, files=dataclasses.replace(source.files, block_bytes=100))
    with pytest.raises(DataError, match=rf"^s3://{bucket}/in/bad.jsonl, line 12: field 'text' holds int '5'"):
        for unit in source.units():
            list(source.read(unit))


def test_s3_missing_bucket_and_unreachable_endpoint_name_bucket_and_endpoint(s3_server, monkeypatch):
    with pytest.raises(StorageError, match=rf"^input s3://no-such-bucket/c4/: bucket 'no-such-bucket' does not "
                                           rf"exist at {s3_server.url}\. Fix: check the bucket name"):
        open_inputs(["s3://no-such-bucket/c4/"])
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("S3_ENDPOINT_URL", dead)
    with pytest.raises(StorageError, match=rf"^input s3://corpus/c4/: cannot list bucket 'corpus' at {dead}: "
                                           rf"EndpointConnectionError: .*Fix: check that the endpoint is up"):
        open_inputs(["s3://corpus/c4/"])


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_json_record_is_one_message_with_file_and_line_and_no_index(spark, tmp_path, docs):
    paths = write_jsonl(tmp_path / "in", docs)
    with open(paths[1], "a") as f:
        f.write('{"text": "fine"}\n{"text": "oops",}\n')
    bad_line = sum(1 for _ in open(paths[1]))
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        convert_on_spark(JsonFiles(tuple(paths)), cfg(out), spark, partitions=3)
    message = str(info.value)
    assert message.startswith(f"{paths[1]}, line {bad_line}: not valid JSON (Expecting property name"), message
    assert message.endswith(f"[nothing was converted: {out} has no index.json; what the tasks wrote was removed]")
    assert "\n" not in message and "at org.apache" not in message
    assert not out.exists() or not os.listdir(out)  # the parts written by the other tasks are gone too


def test_unexpected_task_error_is_one_line_with_its_python_traceback(spark, tmp_path):
    """A failure that is not bad input (here a folder passed as a text file): the task's Python error in one line,
    its Python traceback kept apart, no Java stack, no index.json."""
    folder = tmp_path / "folder"
    folder.mkdir()
    out = tmp_path / "out"
    with pytest.raises(SparkTaskError) as info:
        convert_on_spark(TextFiles((str(folder),)), cfg(out), spark)
    message = str(info.value)
    assert message.startswith(f"a Spark task failed: IsADirectoryError: [Errno 21] Is a directory: '{folder}' "
                              f"[nothing was converted: {out} has no index.json"), message
    assert info.value.traceback.startswith("Traceback (most recent call last):")
    assert "readers.py" in info.value.traceback and "\tat " not in info.value.traceback
    assert not out.exists()


# -------------------------------------------------------------------------------------------- command line


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "data_prep/convert_spark.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def test_cli_converts_with_local_spark_and_prints_progress_and_summary(tmp_path, docs):
    paths = write_jsonl(tmp_path / "in", docs)
    out = tmp_path / "out"
    res = run_cli(str(tmp_path / "in"), "--out_root", str(out), "--concat_tokens", str(N), "--master", "local[2]",
                  "--partitions", "2", "--conf", "spark.ui.enabled=false", "--conf", "spark.driver.memory=512m")
    assert res.returncode == 0, res.stderr
    err = res.stderr
    assert "spark: local[2], 2 cores (started in" in err and "UI off" in err, err
    assert f"spark: converted {len(docs):,} documents into " in err and " tokens/s per core (2 cores, local[2]" in err
    assert not re.search(r"\bWARN\b", err) and "Setting default log level" not in err, err  # Spark's log: quiet
    convert(JsonFiles(tuple(paths)), cfg(tmp_path / "alone"))
    assert same_samples(read_mds(out), read_mds(tmp_path / "alone"))
    res = run_cli(str(tmp_path / "in"), "--out_root", str(out), "--processes", "4")
    assert res.returncode == 2 and "on Spark pass --partitions N" in res.stderr


def without_java(tmp_path, **extra) -> dict[str, str]:
    """This environment, with a PATH that holds no java and no JAVA_HOME."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "PYSPARK_GATEWAY_PORT")}
    return {**env, "PATH": str(bin_dir), **extra}


def test_java_missing_or_not_java_is_one_line_naming_the_fix(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "some text"}\n')
    args = (str(tmp_path / "a.jsonl"), "--out_root", str(tmp_path / "out"))
    res = run_cli(*args, env=without_java(tmp_path))
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("error: Java not found: no java on PATH and JAVA_HOME is not set"), res.stderr
    assert "install OpenJDK 17" in res.stderr
    res = run_cli(*args, env=without_java(tmp_path, JAVA_HOME=str(tmp_path)))
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: JAVA_HOME={tmp_path} holds no Java runtime ({tmp_path}/bin/java is "
                                 f"missing)"), res.stderr
    assert "install OpenJDK 17" in res.stderr and not (tmp_path / "out").exists()


def test_java_too_old_names_the_version_and_the_fix(tmp_path, monkeypatch):
    java_home = tmp_path / "jdk8"
    (java_home / "bin").mkdir(parents=True)
    fake = java_home / "bin" / "java"
    fake.write_text('#!/bin/sh\necho \'java version "1.7.0_80"\' >&2\n')
    fake.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(java_home))
    assert java_command() == str(fake)
    with pytest.raises(SparkSetupError, match=r"is Java 7 \(java version \"1.7.0_80\"\); pyspark .* needs Java "
                                              r"(8|17) or newer\. Fix: install OpenJDK 17"):
        start_spark("local[1]")


def test_inputs_listing_and_format(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"cannot tell the format of .*a.txt from its name .* pass --format json, "
                                        r"parquet or text"):
        open_inputs([str(tmp_path / "a.txt")])
    assert isinstance(open_inputs([str(tmp_path / "a.txt")], "text"), TextFiles)
    assert [u.path for u in open_inputs([str(tmp_path)], "text").units()] == [str(tmp_path / "a.txt")]
