"""Convert a corpus into packed MDS shards on Apache Spark (pyspark): ``convert_on_spark``. See docs/SPARK.md.

The output holds the single-machine converter's samples (``llmfoundry.data.convert``), sample for sample: the
documents' token stream in input order, each document followed by EOS, cut every ``concat_tokens`` tokens, only
the final partial sample dropped. The input is cut into the same slices (``Source.units()``) and those into the
same contiguous ranges (``convert.contiguous_ranges``) as ``convert(..., processes=N)``; each range is one Spark
task. A sample may straddle two ranges, so the work runs as two Spark stages over one cached RDD:

1. tokenize: task r turns its range into its piece of the token stream (``convert._token_stream``), which Spark
   keeps (memory, then the executor's local disk: 2 bytes a token for vocabularies up to 64K, else 4), and sends
   the driver its token count and its last tokens;
2. write: knowing where each piece starts in the stream, the driver hands task r the tokens that the pieces
   before it left over (fewer than ``concat_tokens``); task r packs them and its piece with ``convert.Packer``
   and writes the samples that end in its range to ``part-NNNNN/`` (ranges where no sample ends write nothing).

The driver then merges the parts' indexes into ``index.json`` at out_root, last of all: an output without
``index.json`` is incomplete, whatever else it holds. A failure removes what was written (as ``convert`` does).
With ``cfg.tokenize`` off, one stage: task r writes the documents of its range as raw text to ``part-NNNNN/``.

Inputs are local paths (the same path on every node of a cluster) or ``s3://`` URLs (``s3a://`` is read as
``s3://``), which the tasks read with boto3 (``S3Files``): no Hadoop S3 connector is needed. ``out_root`` is a
local folder (on a cluster: one that every node and the driver share) or an ``s3://`` URL.

Bad input stops the job with the single-machine converter's message (file and line); it travels from the task to
the driver as one line, not as a Java stack trace.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from llmfoundry.data import DataError
from llmfoundry.data.convert import (ConvertConfig, ConvertSummary, Packer, StorageError, _check_counts,
                                     _compression, _merge_index, _Part, _prepare_output, _s3, _token_stream,
                                     _write_texts, _writer, clear_output, contiguous_ranges, join_out,
                                     separator_ids)
from llmfoundry.data.readers import (JSON_EXTENSIONS, PARQUET_EXTENSIONS, JsonFiles, ParquetFiles, Source,
                                     TextFiles, Unit, find_files)
from llmfoundry.utils.errors import storage_cause, unreached_fix

JAVA_FIX = ("install OpenJDK 17 (Debian/Ubuntu: apt-get install openjdk-17-jre-headless; macOS: brew install "
            "openjdk@17) and put its bin/ on PATH or set JAVA_HOME to it")
NEWEST_JAVA = 21        # the newest Java that Spark 3.5 and 4.0 support
TASKS_PER_CORE = 4      # default partitions: up to this many per core of the cluster, at most one per slice
TASK_ENV = ("S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")  # sent from the driver to the tasks


class SparkSetupError(RuntimeError):
    """Spark cannot run here: pyspark is not installed, or Java is missing, too old or broken. The message names
    the fix; the command line prints it as one ``error:`` line and exits with status 1."""


class SparkTaskError(RuntimeError):
    """A Spark task failed for a reason other than bad input or the object store (a bug, an executor lost).
    ``traceback``: the task's Python traceback, when it has one (without the Java stack around it)."""

    def __init__(self, message: str, traceback: str = ""):
        super().__init__(message)
        self.traceback = traceback


@dataclass
class SparkSummary(ConvertSummary):
    master: str = ""
    cores: int = 1        # the cluster's cores (Spark's default parallelism)
    ui_url: str | None = None

    @property
    def tokens_per_core_second(self) -> float:
        """Tokens per second of wall time per core of the cluster: what sizing a cluster needs."""
        return (self.tokens + self.dropped_tokens) / max(self.seconds * self.cores, 1e-9)

    def __str__(self) -> str:
        if self.column != "tokens":
            return (f"spark: converted {self.documents:,} documents into {self.samples:,} samples of raw text in "
                    f"{self.shards} shards ({self.processes} partitions), {self.seconds:.1f} s on {self.cores} "
                    f"cores ({self.master})\n  output {self.out_root}")
        return (f"spark: converted {self.documents:,} documents into {self.samples:,} samples ({self.tokens:,} "
                f"tokens; {self.dropped_tokens:,} dropped in the final partial sample) in {self.shards} shards "
                f"({self.processes} partitions), {self.seconds:.1f} s: {self.tokens_per_second:,.0f} tokens/s, "
                f"{self.tokens_per_core_second:,.0f} tokens/s per core ({self.cores} cores, {self.master}; "
                f"{self.tokens_per_cpu_second:,.0f} tokens per task CPU-second)\n  output {self.out_root}")


# ------------------------------------------------------------------------------------------- Java and Spark


def java_command() -> str:
    """The java that Spark's launcher will run: ``$JAVA_HOME/bin/java`` when JAVA_HOME is set, else the one on
    PATH; ``SparkSetupError`` naming the fix when there is none."""
    home = os.environ.get("JAVA_HOME")
    if home:
        java = os.path.join(home, "bin", "java")
        if not (os.path.isfile(java) and os.access(java, os.X_OK)):
            raise SparkSetupError(f"JAVA_HOME={home} holds no Java runtime ({java} is missing), and Spark runs "
                                  f"on Java. Fix: point JAVA_HOME at a Java 17 installation (e.g. "
                                  f"/usr/lib/jvm/java-17-openjdk-amd64) or unset it to use the java on PATH; "
                                  f"without one, {JAVA_FIX}")
        return java
    java = shutil.which("java")
    if java is None:
        raise SparkSetupError(f"Java not found: no java on PATH and JAVA_HOME is not set, and Spark runs on Java. "
                              f"Fix: {JAVA_FIX}")
    return java


def java_version(java: str) -> tuple[int, str]:
    """(major version, the ``java -version`` line naming it) of ``java``."""
    try:
        res = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SparkSetupError(f"{java} -version failed ({e}). Fix: {JAVA_FIX}") from None
    out = (res.stderr + res.stdout).strip()
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if res.returncode != 0 or not m:
        first = out.splitlines()[0] if out else f"exit status {res.returncode}"
        raise SparkSetupError(f"{java} -version did not name a Java version ({first}). Fix: {JAVA_FIX}")
    major = int(m.group(1))
    if major == 1 and m.group(2):  # "1.8.0_392" is Java 8
        major = int(m.group(2))
    return major, next(line for line in out.splitlines() if 'version "' in line).strip()


def check_java() -> int:
    """Check that pyspark is installed and that Spark's launcher finds a Java it runs on; return Java's major
    version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pyspark = version("pyspark")
    except PackageNotFoundError:
        raise SparkSetupError("pyspark is not installed. Fix: pip install 'mpt-forge[spark]' (docs/SPARK.md)") from None
    java = java_command()
    major, line = java_version(java)
    oldest = 17 if int(pyspark.split(".")[0]) >= 4 else 8
    if major < oldest:
        raise SparkSetupError(f"{java} is Java {major} ({line}); pyspark {pyspark} needs Java {oldest} or newer. "
                              f"Fix: {JAVA_FIX}")
    if major > NEWEST_JAVA:
        print(f"note: {java} is Java {major}, newer than Spark supports (up to {NEWEST_JAVA}); if Spark fails to "
              f"start, {JAVA_FIX}", file=sys.stderr)
    return major


def _under_spark_submit() -> bool:
    """True when this process was started by spark-submit (its JVM is already running)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _quiet_log4j() -> str:
    """A log4j2 configuration that prints errors only (Spark's default prints a page of warnings at start)."""
    path = os.path.join(tempfile.gettempdir(), f"mpt-forge-spark-log4j2-{os.getuid()}.properties")
    with open(path, "w") as f:
        f.write("rootLogger.level = error\nrootLogger.appenderRef.stderr.ref = console\n"
                "appender.console.type = Console\nappender.console.name = console\n"
                "appender.console.target = SYSTEM_ERR\nappender.console.layout.type = PatternLayout\n"
                "appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n\n"
                # the shell's level (else "Setting default log level to WARN" and warnings are printed)
                "logger.spark.name = org.apache.spark\nlogger.spark.level = error\n"
                # a failed task's Java stack (the error itself reaches the driver as one line)
                "logger.executor.name = org.apache.spark.executor.Executor\nlogger.executor.level = off\n")
    return path


def start_spark(master: str | None = None, conf: dict[str, str] | None = None, progress: bool = True,
                app_name: str = "mpt-forge convert"):
    """A SparkSession: the one spark-submit set up (its --master), else a new one on ``master`` (default
    ``local[*]``: every core of this machine). Java is checked first, so a missing one is one clear error."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise SparkSetupError("pyspark is not installed. Fix: pip install 'mpt-forge[spark]' (docs/SPARK.md)") from None
    settings = {"spark.ui.showConsoleProgress": "true" if progress else "false"}
    if not _under_spark_submit():
        check_java()
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the tasks run this Python (this venv)
        settings["spark.driver.extraJavaOptions"] = f"-Dlog4j2.configurationFile=file:{_quiet_log4j()}"
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    for key, value in {**settings, **(conf or {})}.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as e:  # the JVM did not start: pyspark only says "Java gateway process exited ..."
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SparkSetupError(f"Spark did not start ({first}); its Java output is printed above. If it names "
                              f"Java, {JAVA_FIX}") from None
    spark.sparkContext.setLogLevel("ERROR")
    return spark


# --------------------------------------------------------------------------------------------- s3:// inputs


def is_s3(path: str) -> bool:
    return path.startswith(("s3://", "s3a://"))


def s3_url(path: str) -> str:
    """``s3a://bucket/key`` (Hadoop's spelling) -> ``s3://bucket/key``; other paths as they are."""
    return "s3://" + path[len("s3a://"):] if path.startswith("s3a://") else path


def _s3_object(url: str):
    """(boto3 client, bucket, key) of an s3:// URL (the endpoint from S3_ENDPOINT_URL, bounded waits)."""
    client, bucket, prefix = _s3(url)
    return client, bucket, prefix.rstrip("/")


def _bucket_key(url: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(url)
    return parsed.netloc, parsed.path.strip("/")


@contextlib.contextmanager
def _input_errors(url: str, what: str):
    """A failed request for the input ``url`` as one ``StorageError`` naming the bucket, the endpoint and the fix."""
    from llmfoundry.data.streams import endpoint_description

    try:
        yield
    except DataError:
        raise
    except Exception as e:
        cause = storage_cause(e)
        if cause is None:
            raise
        bucket = urllib.parse.urlparse(url).netloc
        endpoint = endpoint_description(url, None)
        code = getattr(cause, "response", {}).get("Error", {}).get("Code")
        if code == "NoSuchBucket":
            raise StorageError(f"input {url}: bucket '{bucket}' does not exist at {endpoint}. Fix: check the bucket "
                               f"name, and S3_ENDPOINT_URL for a store other than AWS S3") from None
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        fix = unreached_fix(cause, "S3_ENDPOINT_URL", ", then run again") or (
            "check the bucket name, the endpoint (S3_ENDPOINT_URL) and the credentials (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY / AWS_PROFILE; on a cluster, every executor needs them)")
        raise StorageError(f"input {url}: cannot {what} bucket '{bucket}' at {endpoint}: {type(cause).__name__}: "
                           f"{detail}. Fix: {fix}") from None


def _hidden(key: str, prefix: str) -> bool:
    return any(part.startswith(".") for part in key[len(prefix):].split("/"))


def list_s3(url: str, extensions: Sequence[str] = ()) -> list[tuple[str, int]]:
    """(URL, size) of the objects ``url`` names, as ``readers.find_files`` does for local paths: one object, every
    object under a prefix (a folder: sorted, hidden names skipped, filtered by ``extensions``), or the matches of a
    glob pattern (``*`` also matches ``/``)."""
    url = s3_url(url)
    client, bucket, key = _s3_object(url)
    exts = tuple(e if e.startswith(".") else "." + e for e in extensions or ())

    def objects(prefix: str) -> list[tuple[str, int]]:
        found = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [(o["Key"], o["Size"]) for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return sorted(found)

    with _input_errors(url, "list"):
        if any(c in key for c in "*?["):
            start = key[:min(key.index(c) for c in "*?[" if c in key)]
            found = [(k, s) for k, s in objects(start) if fnmatch.fnmatchcase(k, key)]
            if not found:
                raise DataError(f"input {url}: as a glob pattern it matches no objects in bucket '{bucket}'")
            return [(f"s3://{bucket}/{k}", s) for k, s in found]
        if key:
            try:
                return [(url, client.head_object(Bucket=bucket, Key=key)["ContentLength"])]
            except Exception as e:  # 404: not an object; a prefix, perhaps
                if getattr(e, "response", {}).get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                    raise
        prefix = key + "/" if key else ""
        found = [(k, s) for k, s in objects(prefix) if not _hidden(k, prefix) and (not exts or k.endswith(exts))]
        if not found:
            what = f"objects ending in {', '.join(exts)}" if exts else "objects"
            raise DataError(f"input {url} is not an object, and as a folder it holds no {what}; pass an object, a "
                            f"prefix holding input files, or a glob pattern")
        return [(f"s3://{bucket}/{k}", s) for k, s in found]


def _get(client, bucket: str, key: str, start: int, stop: int) -> bytes:
    """Bytes ``start .. stop-1`` of an object."""
    if start >= stop:
        return b""
    return client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}")["Body"].read()


def _put(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _sparse_copy(path: str, size: int) -> str:
    """An empty sparse file of ``size`` bytes: the object's bytes that a reader needs are written into it at their
    own offsets, so the readers (and their byte offsets, row groups) work on it unchanged."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _parquet_footer(client, bucket: str, key: str, size: int, path: str) -> None:
    """Write the head magic and the footer (the metadata) of a parquet object into the sparse copy ``path``."""
    tail = _get(client, bucket, key, max(0, size - (64 << 10)), size)
    _put(path, size - len(tail), tail)
    _put(path, 0, _get(client, bucket, key, 0, min(4, size)))
    if len(tail) >= 8:
        footer = int.from_bytes(tail[-8:-4], "little") + 8
        if footer > len(tail):
            _put(path, max(0, size - footer), _get(client, bucket, key, max(0, size - footer), size - len(tail)))


@dataclass(frozen=True)
class S3Files:
    """A file source (``JsonFiles``, ``ParquetFiles`` or ``TextFiles``) whose paths may be ``s3://`` URLs.

    ``units()`` cuts the objects exactly as the local source cuts files (it runs on sparse local copies holding
    the bytes that cutting reads: the start of a JSON file, a parquet footer); ``read(unit)`` fetches the bytes
    of one slice (a JSON Lines byte range and the rest of its last line, a parquet row group's text column, or the
    whole object) into a sparse local copy and reads it with the local source, so documents, order and error
    messages (with the URL, and the line counted from the start of the object) are the local source's."""
    files: JsonFiles | ParquetFiles | TextFiles
    sizes: tuple[int, ...]  # object sizes, by path (-1 for a local path)

    @property
    def size_unit(self) -> str:
        return self.files.size_unit

    @functools.cached_property
    def _size_of(self) -> dict[str, int]:
        return dict(zip(self.files.paths, self.sizes))

    def units(self) -> list[Unit]:
        from concurrent.futures import ThreadPoolExecutor

        remote = next((p for p in self.files.paths if is_s3(p)), None)
        client = _s3(remote)[0] if remote else None  # one client for all threads (creating them is not thread-safe)
        with tempfile.TemporaryDirectory(prefix="spark-inputs-") as tmp, ThreadPoolExecutor(16) as pool:
            names = [os.path.join(tmp, f"{i}-{os.path.basename(p)}") for i, p in enumerate(self.files.paths)]
            copies = dict(zip(self.files.paths, pool.map(functools.partial(self._head_copy, client=client),
                                                         self.files.paths, self.sizes, names)))
            urls = {copy: p for p, copy in copies.items()}
            try:
                units = dataclasses.replace(self.files, paths=tuple(copies.values())).units()
            except DataError as e:
                raise DataError(_renamed(str(e), urls)) from None
        return [dataclasses.replace(u, path=urls[u.path]) for u in units]

    def _head_copy(self, path: str, size: int, copy: str, client) -> str:
        """What ``files.units()`` reads of ``path``: the local file itself, or a sparse copy of an object."""
        if not is_s3(path):
            return path
        _sparse_copy(copy, size)
        bucket, key = _bucket_key(path)
        with _input_errors(path, "read from"):
            if isinstance(self.files, ParquetFiles):
                _parquet_footer(client, bucket, key, size, copy)
            elif isinstance(self.files, JsonFiles) and not path.endswith(".gz"):
                _put(copy, 0, _get(client, bucket, key, 0, min(size, 64 << 10)))  # JSON list or JSON Lines?
        return copy

    def read(self, unit: Unit) -> Iterator[str]:
        if not is_s3(unit.path):
            yield from self.files.read(unit)
            return
        with tempfile.TemporaryDirectory(prefix="spark-input-") as tmp:
            copy = os.path.join(tmp, os.path.basename(unit.path))
            with _input_errors(unit.path, "read from"):
                self._fetch(unit, copy)
            try:
                yield from self.files.read(dataclasses.replace(unit, path=copy))
            except DataError as e:
                message = _renamed(str(e), {copy: unit.path})
                if isinstance(self.files, JsonFiles) and unit.stop != -1 and unit.start > 0:
                    message = self._line_from_start(message, unit)
                raise DataError(message) from None

    def _fetch(self, unit: Unit, copy: str) -> None:
        """The bytes of ``unit`` that ``files.read`` reads, into the sparse copy ``copy``."""
        client, bucket, key = _s3_object(unit.path)
        size = self._size_of[unit.path]
        if isinstance(self.files, JsonFiles) and unit.stop != -1:  # a byte range of JSON Lines
            _sparse_copy(copy, size)
            start = max(unit.start - 1, 0)  # the reader looks at the byte before the range
            data = _get(client, bucket, key, start, unit.stop)
            _put(copy, start, data)
            at = unit.stop
            while at < size and not data.endswith(b"\n"):  # the last line runs on past the range: to its end
                data = _get(client, bucket, key, at, min(at + (1 << 20), size))
                cut = data.find(b"\n")
                data = data if cut < 0 else data[:cut + 1]
                _put(copy, at, data)
                at += len(data)
        elif isinstance(self.files, ParquetFiles):  # one row group: the footer and the text column's chunk
            _sparse_copy(copy, size)
            _parquet_footer(client, bucket, key, size, copy)
            import pyarrow.parquet as pq

            group = pq.ParquetFile(copy).metadata.row_group(unit.start)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".")[0] == self.files.text_field:
                    offsets = [o for o in (column.dictionary_page_offset, column.data_page_offset) if o]
                    begin = min(offsets)
                    _put(copy, begin, _get(client, bucket, key, begin, begin + column.total_compressed_size))
        else:  # a text file, a .gz or JSON-list file: the whole object
            client.download_file(bucket, key, copy)

    def _line_from_start(self, message: str, unit: Unit) -> str:
        """The sparse copy has no lines before the slice: add those of the object, counted now (an error only)."""
        m = re.match(rf"{re.escape(unit.path)}, line (\d+)", message)
        if not m:
            return message
        client, bucket, key = _s3_object(unit.path)
        newlines, at, stop = 0, 0, unit.start - 1
        while at < stop:
            newlines += _get(client, bucket, key, at, min(at + (16 << 20), stop)).count(b"\n")
            at += 16 << 20
        # the copy counts 1 newline before the slice's first line (the end of the line it starts in); the object
        # has that one and every newline before the slice
        return f"{unit.path}, line {int(m.group(1)) + newlines}{message[m.end():]}"


def _renamed(message: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        message = message.replace(old, new)
    return message


def open_inputs(inputs: Sequence[str], input_format: str | None = None, text_field: str = "text",
                decode_errors: str = "strict", extensions: Sequence[str] | None = None) -> Source:
    """The source for files, folders and glob patterns, local or ``s3://`` / ``s3a://``, in the order given (each
    folder's files sorted): ``input_format`` 'json' (JSON Lines / JSON lists, .gz too), 'parquet' or 'text' (one
    document per file; ``extensions`` filters folders); None: json or parquet, from the file names."""
    if input_format not in (None, "json", "parquet", "text"):
        raise DataError(f"unknown --format '{input_format}'; use json, parquet or text")
    exts = {"json": JSON_EXTENSIONS, "parquet": PARQUET_EXTENSIONS, "text": extensions,
            None: JSON_EXTENSIONS + PARQUET_EXTENSIONS}[input_format]
    found: dict[str, int] = {}
    for item in inputs:
        if is_s3(item):
            found.update((p, found.get(p, s)) for p, s in list_s3(item, exts or ()))
        else:
            found.update((p, -1) for p in find_files([item], exts) if p not in found)
    if not found:
        raise DataError("no inputs given: pass files, folders, glob patterns or s3:// URLs")
    paths = tuple(found)
    if input_format is None:
        input_format = _format_of(paths)
    files = {"json": lambda: JsonFiles(paths, text_field=text_field, decode_errors=decode_errors),
             "parquet": lambda: ParquetFiles(paths, text_field=text_field),
             "text": lambda: TextFiles(paths, decode_errors=decode_errors)}[input_format]()
    if not any(is_s3(p) for p in paths):
        return files
    return S3Files(files, tuple(found.values()))


def _format_of(paths: Sequence[str]) -> str:
    """'json' or 'parquet' when every file's name says so."""
    kinds = {"json" if p.endswith(JSON_EXTENSIONS) else "parquet" if p.endswith(PARQUET_EXTENSIONS) else ""
             for p in paths}
    if kinds in ({"json"}, {"parquet"}):
        return kinds.pop()
    if "" in kinds:
        other = next(p for p in paths if not p.endswith(JSON_EXTENSIONS + PARQUET_EXTENSIONS))
        raise DataError(f"cannot tell the format of {other} from its name (not "
                        f"{', '.join(JSON_EXTENSIONS + PARQUET_EXTENSIONS)}); pass --format json, parquet or text "
                        f"(one document per file)")
    raise DataError("the inputs mix JSON and parquet files; convert them separately")


# ------------------------------------------------------------------------------------------------ the tasks

FAILURE = "mpt-forge task failure: "  # a task's DataError crosses to the driver as this + JSON on one line


@dataclass
class _Piece:
    """What stage 1's task ``index`` tells the driver about its piece of the token stream."""
    index: int
    documents: int
    tokens: int
    last: np.ndarray  # its last tokens (up to concat_tokens - 1): what may carry into the next piece's samples
    cpu_seconds: float


@dataclass(frozen=True)
class _Plan:
    """Stage 2 for one range: its part's name, the tokens carried in from the ranges before, the samples it ends."""
    name: str
    carry: np.ndarray
    samples: int


@dataclass
class _Written:
    index: int
    samples: int
    shards: int
    cpu_seconds: float
    documents: int = 0


def _task_env() -> dict[str, str]:
    """Settings the tasks must share with the driver: the S3 endpoint and region (not credentials: executors get
    those from their own environment, spark.executorEnv.* or an instance profile)."""
    return {k: os.environ[k] for k in TASK_ENV if k in os.environ}


def _in_task(env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per task: Spark runs a task per core


@functools.lru_cache(maxsize=2)
def _tokenizer(name: str):
    """Loaded once per Python worker (Spark reuses workers across tasks)."""
    from llmfoundry.data.tokenizer import load_tokenizer

    return load_tokenizer(name)


def _failure(e: DataError) -> RuntimeError:
    """A bad-input or object-store error as an exception whose last line carries the message to the driver."""
    kind = "storage" if isinstance(e, StorageError) else "data"
    return RuntimeError(FAILURE + json.dumps({"kind": kind, "message": str(e)}))


def _task_done() -> None:
    """Exempt what this worker has loaded (transformers, torch, the tokenizer: millions of objects) from Python's
    garbage collector: pyspark runs a full collection after every task of a reused worker, which would otherwise
    take about half a second of CPU each time."""
    gc.freeze()


def _all(items) -> list:
    """A partition's input, read to its end: pyspark reuses a Python worker (and its imports and tokenizer) only
    for a task that read all of its input."""
    return [x for chunk in items for x in chunk]


def _ignore(*_args, **_kwargs) -> None:
    pass


def _compact(stream: np.ndarray) -> np.ndarray:
    """Token ids below 65536 (a vocabulary up to 64K: gpt-neox's, the bundled one) kept as uint16: half the
    memory and disk that Spark needs to hold the stream between the stages."""
    return stream.astype(np.uint16) if len(stream) and int(stream.max()) < 1 << 16 else stream


def _last_tokens(last: np.ndarray, stream: np.ndarray, keep: int) -> np.ndarray:
    if keep == 0:
        return last[:0]
    return np.concatenate([last, stream[-keep:]])[-keep:]


def _tokenize_range(index: int, items, source_bc, cfg: ConvertConfig, env: dict[str, str]):
    """Stage 1, task ``index``: the token stream of its range of slices, as arrays (kept by Spark), then a _Piece."""
    _in_task(env)
    units = _all(items)
    cpu0 = time.process_time()
    part, last = _Part(), np.zeros(0, np.int32)
    try:
        for stream in _token_stream(source_bc.value, units, cfg, _tokenizer(cfg.tokenizer), part, _ignore):
            yield _compact(stream)
            last = _last_tokens(last, stream, cfg.concat_tokens - 1)
    except DataError as e:
        raise _failure(e) from None
    _task_done()
    yield _Piece(index, part.documents, part.tokens, last, time.process_time() - cpu0)


def _is_piece(item) -> bool:
    return isinstance(item, _Piece)


def _write_range(index: int, items, plans_bc, cfg: ConvertConfig, env: dict[str, str]):
    """Stage 2, task ``index``: the carried-in tokens and its piece, packed; the full samples to its part."""
    plan = plans_bc.value.get(index)
    if plan is None:  # no sample ends in this range: its tokens all carry into the next
        for _ in items:  # read to the end all the same (see _all)
            pass
        _task_done()
        return
    _in_task(env)
    cpu0 = time.process_time()
    out = join_out(cfg.out_root, plan.name)
    packer = Packer(cfg.concat_tokens)
    packer.tail = plan.carry
    written = 0
    try:
        clear_output(out)  # a retried task starts its part again
        with _writer(out, cfg) as writer:
            for item in items:
                if isinstance(item, np.ndarray):
                    for row in packer.add_stream(item):
                        writer.write({"tokens": row})
                        written += 1
    except DataError as e:
        raise _failure(e) from None
    if written != plan.samples:
        raise RuntimeError(f"{plan.name}: {written} samples packed where stage 1 counted {plan.samples}; did the "
                           f"input change while converting?")
    _task_done()
    yield _Written(index, written, len(writer.shards), time.process_time() - cpu0)


def _write_text_range(index: int, items, source_bc, cfg: ConvertConfig, env: dict[str, str]):
    """Raw text (no tokenizing), task ``index``: the documents of its range as they are, to part-NNNNN/."""
    _in_task(env)
    units = _all(items)
    out = join_out(cfg.out_root, f"part-{index:05d}")
    try:
        clear_output(out)
        part = _write_texts(source_bc.value, units, cfg, out, _ignore)
    except DataError as e:
        raise _failure(e) from None
    _task_done()
    yield _Written(index, part.samples, part.shards, part.cpu_seconds, part.documents)


# ----------------------------------------------------------------------------------------------- the driver


def _plans(pieces: Sequence[_Piece], n: int) -> dict[int, _Plan]:
    """Where each piece starts in the stream decides which tokens carry into it and how many samples end in it;
    parts are numbered in order over the ranges where samples end."""
    plans: dict[int, _Plan] = {}
    carry = np.zeros(0, np.int32)
    for piece in pieces:
        samples, left = divmod(len(carry) + piece.tokens, n)
        if samples:
            plans[piece.index] = _Plan(f"part-{len(plans):05d}", carry, samples)
        carry = np.concatenate([carry, piece.last])[len(carry) + len(piece.last) - left:]
    return plans


def _tokens_on_spark(sc, source: Source, units: Sequence[Unit], cfg: ConvertConfig,
                     ranges: Sequence[tuple[int, int]]) -> tuple[_Part, list[str]]:
    from pyspark import StorageLevel

    env, source_bc = _task_env(), sc.broadcast(source)
    sc.setJobDescription("tokenize (stage 1 of 2)")
    pieces_rdd = sc.parallelize([units[a:b] for a, b in ranges], len(ranges)).mapPartitionsWithIndex(
        functools.partial(_tokenize_range, source_bc=source_bc, cfg=cfg, env=env))
    pieces_rdd.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        with _task_failures():
            pieces = sorted(pieces_rdd.filter(_is_piece).collect(), key=lambda p: p.index)
        part = _Part(documents=sum(p.documents for p in pieces), tokens=sum(p.tokens for p in pieces),
                     cpu_seconds=sum(p.cpu_seconds for p in pieces))
        _check_counts(part, units, cfg)
        plans = _plans(pieces, cfg.concat_tokens)
        plans_bc = sc.broadcast(plans)
        sc.setJobDescription("pack and write (stage 2 of 2)")
        with _task_failures():
            written = pieces_rdd.mapPartitionsWithIndex(functools.partial(
                _write_range, plans_bc=plans_bc, cfg=cfg, env=env)).collect()
        plans_bc.unpersist()
    finally:
        pieces_rdd.unpersist()
        source_bc.unpersist()
    part.samples = sum(w.samples for w in written)
    part.shards = sum(w.shards for w in written)
    part.cpu_seconds += sum(w.cpu_seconds for w in written)
    return part, [plan.name for _, plan in sorted(plans.items())]


def _texts_on_spark(sc, source: Source, units: Sequence[Unit], cfg: ConvertConfig,
                    ranges: Sequence[tuple[int, int]]) -> tuple[_Part, list[str]]:
    env, source_bc = _task_env(), sc.broadcast(source)
    sc.setJobDescription("write raw text")
    with _task_failures():
        written = sc.parallelize([units[a:b] for a, b in ranges], len(ranges)).mapPartitionsWithIndex(
            functools.partial(_write_text_range, source_bc=source_bc, cfg=cfg, env=env)).collect()
    part = _Part(documents=sum(w.documents for w in written), samples=sum(w.samples for w in written),
                 shards=sum(w.shards for w in written), cpu_seconds=sum(w.cpu_seconds for w in written))
    if part.documents == 0:
        raise DataError(f"the inputs hold no documents ({len(units)} input slices read, e.g. {units[0]}); check "
                        f"the input paths and --text_field")
    return part, [f"part-{r:05d}" for r in range(len(ranges))]


@contextlib.contextmanager
def _task_failures():
    """A failed Spark job as one exception: a task's bad input or store error re-raised as the DataError /
    StorageError it was (from the line ``_failure`` wrote), anything else as a SparkTaskError naming the task's
    Python error, without the Java stack around it."""
    from py4j.protocol import Py4JJavaError

    try:
        yield
    except Py4JJavaError as e:
        text = str(e)
        m = re.search(re.escape(FAILURE) + r"(\{.*\})", text)
        if m:
            failure = json.loads(m.group(1))
            raise (StorageError if failure["kind"] == "storage" else DataError)(failure["message"]) from None
        raise _task_error(text) from None


def _task_error(text: str) -> SparkTaskError:
    """'a Spark task failed: <the last line of its Python traceback>' (or Spark's reason, e.g. a lost executor),
    with the Python traceback cut out of the Java error around it."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line), None)
    if start is None:
        m = re.search(r"Job aborted due to stage failure: (.*)", text)
        reason = m.group(1).strip() if m else (lines[0] if lines else "unknown error")
        return SparkTaskError(f"a Spark task failed: {reason}. The executor's log has more (Spark UI, Executors "
                              f"tab, stderr)")
    python = ["Traceback (most recent call last):"]
    for line in lines[start + 1:]:
        if line.startswith("\tat ") or line.startswith("Driver stacktrace"):
            break
        python.append(line)
    while python and not python[-1].strip():
        python.pop()
    return SparkTaskError(f"a Spark task failed: {python[-1].strip()}", "\n".join(python))


@contextlib.contextmanager
def _no_partial_output(out_root: str):
    """On failure: remove what the tasks wrote, and say so in the error (index.json is only written at the end)."""
    try:
        yield
    except BaseException as e:
        try:
            clear_output(out_root)
            left = "what the tasks wrote was removed"
        except Exception:
            if not isinstance(e, DataError):
                raise
            left = "remove what the tasks wrote, or run again with --overwrite"
        if isinstance(e, (DataError, SparkTaskError)):
            said = type(e)(f"{e} [nothing was converted: {out_root} has no index.json; {left}]")
            said.__dict__.update(e.__dict__)  # a SparkTaskError's traceback
            raise said from None
        raise


def _merge_parts(out_root: str, names: Sequence[str]) -> None:
    """The parts' indexes, in order, into out_root/index.json: written last, it marks the output complete."""
    try:
        _merge_index(out_root, list(names))
    except FileNotFoundError as e:
        raise DataError(f"{e.filename or names[0]} is missing on the driver: the tasks wrote their parts where the "
                        f"driver cannot see them. On a cluster, --out_root must be s3:// or a folder that every node "
                        f"and the driver share (the same path everywhere)") from None


def default_partitions(slices: int, cores: int) -> int:
    """Up to TASKS_PER_CORE tasks per core (the slack evens out uneven tasks), at most one per slice."""
    return max(1, min(slices, TASKS_PER_CORE * cores))


def convert_on_spark(source: Source, cfg: ConvertConfig, spark=None, *, partitions: int | None = None,
                     master: str | None = None, spark_conf: dict[str, str] | None = None) -> SparkSummary:
    """Convert every document of ``source`` into MDS shards at ``cfg.out_root`` on Spark; print and return a
    summary. The samples are ``convert(source, cfg)``'s, sample for sample (see the module docstring).

    ``source``: any ``readers`` source; ``open_inputs`` makes one of local and ``s3://`` files. ``spark``: a
    SparkSession to use (left running); None starts one on ``master`` (default local[*], or spark-submit's
    --master) with ``spark_conf`` and stops it at the end. ``partitions``: Spark tasks, each a contiguous range of
    the input's slices, as ``convert``'s ``processes`` (default: up to 4 per core, at most one per slice);
    ``cfg.processes`` is not used. ``out_root`` gets one ``part-NNNNN/`` per range and one ``index.json``.
    """
    if spark is None and not _under_spark_submit():
        check_java()  # first: on a new machine, the likeliest problem
    tokenize = cfg.tokenize
    _compression(cfg)
    if cfg.concat_tokens < 1:
        raise DataError(f"--concat_tokens must be at least 1, got {cfg.concat_tokens}")
    if partitions is not None and partitions < 1:
        raise DataError(f"--partitions must be at least 1, got {partitions}")
    if tokenize:
        separator_ids(_tokenizer(cfg.tokenizer), cfg)  # a bad tokenizer fails here, not in every task
    units = source.units()
    if not units:
        paths = list(getattr(getattr(source, "files", source), "paths", ()))
        shown = f" ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})" if paths else ""
        raise DataError(f"the inputs are empty{shown}; nothing was converted and --out_root was left as it is")
    _prepare_output(cfg, units)
    own = spark is None
    t0 = time.perf_counter()
    if own:
        spark = start_spark(master, spark_conf, progress=cfg.progress)
    try:
        sc = spark.sparkContext
        cores = sc.defaultParallelism
        count = min(partitions, len(units)) if partitions else default_partitions(len(units), cores)
        if cfg.progress:
            started = f" (started in {time.perf_counter() - t0:.1f} s)" if own else ""
            print(f"spark: {sc.master}, {cores} cores{started}; UI {sc.uiWebUrl or 'off (spark.ui.enabled)'}\n"
                  f"spark: {len(units)} input slices in {count} partitions", file=sys.stderr)
        if partitions and count < partitions:
            print(f"note: the input is {len(units)} slices: using {count} partitions, not --partitions "
                  f"{partitions} (a task converts whole slices)", file=sys.stderr)
        t1 = time.perf_counter()
        ranges = contiguous_ranges([u.size for u in units], count)
        with _no_partial_output(cfg.out_root):
            part, names = (_tokens_on_spark if tokenize else _texts_on_spark)(sc, source, units, cfg, ranges)
            _merge_parts(cfg.out_root, names)
        tokens = part.samples * cfg.concat_tokens if tokenize else 0
        summary = SparkSummary(out_root=cfg.out_root, documents=part.documents, tokens=tokens,
                               dropped_tokens=part.tokens - tokens, samples=part.samples, shards=part.shards,
                               seconds=time.perf_counter() - t1, processes=count, cpu_seconds=part.cpu_seconds,
                               column="tokens" if tokenize else "text", master=sc.master, cores=cores,
                               ui_url=sc.uiWebUrl)
    finally:
        if own:
            spark.stop()
    if cfg.progress:
        print(summary, file=sys.stderr)
    return summary
