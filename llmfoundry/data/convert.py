"""Convert documents into MDS shards of packed token samples.

Each document becomes ``[bos] tokens [eos]``; the documents' streams are concatenated in input order (files in
the order given / found, records in file order) and the result is cut into samples of exactly
``concat_tokens`` tokens (MDS column ``tokens``, ``ndarray:int32``). A document that does not fit carries into
the next sample. Read in index order, the samples are that one stream: every EOS is followed by the start of
the next document. The only tokens dropped are the final partial sample: fewer than ``concat_tokens`` tokens,
the end of the last document(s). The samples, and their order, are the same for any ``processes``.

With ``processes == 1`` the stream is packed as it is tokenized, into shards at ``out_root``. With more, the
work runs in two phases: (1) each process tokenizes a contiguous range of the input's slices (see
``readers``) into a raw int32 file (4 bytes per token, under ``out_root/.staged-tokens/`` for a local
``out_root``, else in the temp folder), then (2) each process writes an equal, consecutive share of the
samples, cut from those files read as one stream, to ``part-NNNNN/``; one ``index.json`` at ``out_root``
lists the parts in order. So no partial sample is lost where one process's range ends and the next begins.

Raw text instead (``tokenize=False``, CLI ``--no_tokenize``): each document, as it is, becomes one sample in an
MDS column ``text`` (``str``), in input order (empty documents skipped), and nothing is tokenized here: the
training loader tokenizes each sample with the run's tokenizer (llmfoundry/data/text_loader.py). With more
processes, each writes the documents of a contiguous range of slices to its ``part-NNNNN/``.

Processes tokenize whole slices, so ``processes`` is capped at the number of slices; when that cap lowers it,
one line on stderr says so (e.g. one small JSON Lines file is one slice). ``out_root`` may be an ``s3://`` URL
(the endpoint comes from ``S3_ENDPOINT_URL``); shards upload as they are written.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
import traceback
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from llmfoundry.data import SHARD_HASH, DataError
from llmfoundry.data.readers import BLOCK_BYTES, Source, Unit
from llmfoundry.utils.errors import storage_cause, unreached_fix

COLUMNS = {"tokens": "ndarray:int32"}  # packed token samples
TEXT_COLUMNS = {"text": "str"}        # one document per sample, tokenized by the loader


@dataclass
class ConvertConfig:
    out_root: str                     # local folder or s3://bucket/prefix
    tokenizer: str = "bundled"        # 'bundled', a local folder, or a hub name
    concat_tokens: int = 2048         # tokens per sample
    tokenize: bool = True             # False: each document as raw text (column 'text'); tokenizer, eos/bos unused
    eos_text: str | None = None       # after each document; None: the tokenizer's EOS token, '': none
    bos_text: str | None = None       # before each document; None or '': none
    compression: str | None = "zstd"  # any mosaicml-streaming compression, or None / 'none'
    processes: int = 1
    overwrite: bool = False           # replace a non-empty out_root instead of refusing
    shard_size_limit: int = 1 << 26   # bytes per shard before compression
    batch_docs: int = 256             # documents per tokenizer call
    progress: bool = True


@dataclass
class ConvertSummary:
    out_root: str
    documents: int
    tokens: int          # tokens written (samples * concat_tokens)
    dropped_tokens: int  # the final partial sample
    samples: int
    shards: int
    seconds: float
    processes: int
    cpu_seconds: float = 0.0  # CPU time of reading, tokenizing, packing and writing, summed over processes
    column: str = "tokens"    # the column(s) written; other than 'tokens': nothing tokenized (token counts are 0)
    what: str = "documents"   # what the input records are, for the summary

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens + self.dropped_tokens) / max(self.seconds, 1e-9)

    @property
    def tokens_per_cpu_second(self) -> float:
        return (self.tokens + self.dropped_tokens) / max(self.cpu_seconds, 1e-9)

    def __str__(self) -> str:
        if self.column != "tokens":
            return (f"converted {self.documents:,} {self.what} into {self.samples:,} samples of raw text (columns "
                    f"{self.column}; the training loader tokenizes them)\n"
                    f"  shards {self.shards}  processes {self.processes}  {self.seconds:.1f} s  "
                    f"({self.cpu_seconds:.1f} CPU s)\n  output {self.out_root}")
        return (f"converted {self.documents:,} documents into {self.samples:,} samples "
                f"({self.tokens:,} tokens; {self.dropped_tokens:,} dropped in the final partial sample)\n"
                f"  shards {self.shards}  processes {self.processes}  {self.seconds:.1f} s  "
                f"{self.tokens_per_second:,.0f} tokens/s  ({self.cpu_seconds:.1f} CPU s)\n  output {self.out_root}")


# -------------------------------------------------------------------------------------------------- packing


def flatten(docs: Iterable[Sequence[int]], bos_ids: Sequence[int] = (), eos_ids: Sequence[int] = ()) -> np.ndarray:
    """The token stream ``[bos] doc [eos] [bos] doc [eos] ...`` of ``docs``, as one int32 array."""
    flat: list[int] = []
    for ids in docs:
        flat += bos_ids
        flat += ids
        flat += eos_ids
    return np.asarray(flat, dtype=np.int32)


class Packer:
    """Packs token lists into rows of exactly ``n`` tokens: ``[bos] doc [eos] [bos] doc [eos] ...``.

    ``add(docs)`` (or ``add_stream(tokens)`` for an already flattened stream) returns the completed rows as an
    ``(k, n)`` int32 array; what is left (fewer than ``n`` tokens) stays in ``tail`` and starts the next row.
    """

    def __init__(self, n: int, bos_ids: Sequence[int] = (), eos_ids: Sequence[int] = ()):
        if n < 1:
            raise DataError(f"concat_tokens must be at least 1, got {n}")
        self.n, self.bos, self.eos = n, list(bos_ids), list(eos_ids)
        self.tail = np.zeros(0, np.int32)
        self.tokens = 0  # stream tokens seen, separators included

    def add(self, docs: Iterable[Sequence[int]]) -> np.ndarray:
        return self.add_stream(flatten(docs, self.bos, self.eos))

    def add_stream(self, tokens: np.ndarray) -> np.ndarray:
        self.tokens += len(tokens)
        stream = np.concatenate([self.tail, tokens.astype(np.int32, copy=False)])
        k = len(stream) // self.n
        self.tail = stream[k * self.n:].copy()
        return stream[:k * self.n].reshape(k, self.n)


def pack(docs: Iterable[Sequence[int]], n: int, bos_ids: Sequence[int] = (),
         eos_ids: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """All full rows of ``n`` tokens and the leftover partial row."""
    packer = Packer(n, bos_ids, eos_ids)
    return packer.add(docs), packer.tail


def separator_ids(tokenizer, cfg: ConvertConfig) -> tuple[list[int], list[int]]:
    """Token ids of (bos, eos) from ``cfg.bos_text`` / ``cfg.eos_text`` (default EOS: the tokenizer's)."""
    eos_text = tokenizer.eos_token if cfg.eos_text is None else cfg.eos_text
    if cfg.eos_text is None and eos_text is None:
        raise DataError(f"tokenizer '{cfg.tokenizer}' has no EOS token; pass --eos_text (e.g. '</s>') "
                        f"or --eos_text '' with --bos_text")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in (cfg.bos_text, eos_text)]
    if not ids[0] and not ids[1]:
        raise DataError("documents would run together with no separator: pass --eos_text or --bos_text")
    return ids[0], ids[1]


# --------------------------------------------------------------------------------------------------- output


def join_out(root: str, *parts: str) -> str:
    """``os.path.join`` for local folders and URLs alike."""
    if urllib.parse.urlparse(root).scheme:
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


class StorageError(DataError):
    """The object store of ``--out_root`` cannot be reached, or refuses the request (credentials, bucket).

    A data_prep script prints it as one ``error:`` line and exits with status 1 (an environment problem, like the
    train and eval entry points), where other ``DataError``s exit with 2 (bad arguments or input)."""


def storage_message(url: str, what: str, e: BaseException) -> str:
    """One line for a failed request to the object store of ``url``: the URL, the endpoint, the error and the fix
    (worded as ``llmfoundry.train.checks.check_remote`` words a save_folder / load_path it cannot reach)."""
    from llmfoundry.data.streams import endpoint_description

    bucket = urllib.parse.urlparse(url).netloc
    endpoint = endpoint_description(url, None)
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    fix = unreached_fix(e, "S3_ENDPOINT_URL", ", then run again") or (
        "check the bucket name (it must exist), that the endpoint is up (S3_ENDPOINT_URL), and the credentials "
        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)")
    return f"--out_root {url}: cannot {what} bucket '{bucket}' at {endpoint}: {type(e).__name__}: {detail}. Fix: {fix}"


@contextlib.contextmanager
def _storage_errors(url: str, what: str):
    """Turn a failed object-store request under ``url`` into a ``StorageError`` (one line, exit status 1)."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        cause = storage_cause(e)
        if cause is None or not urllib.parse.urlparse(url).scheme:
            raise
        raise StorageError(storage_message(url, what, cause)) from e


def _s3(url: str):
    import boto3
    from botocore.config import Config

    obj = urllib.parse.urlparse(url)
    # bounded waits, as llmfoundry.data.streams: a store that is down fails in seconds, not minutes of retries
    config = Config(connect_timeout=10, read_timeout=60, retries={"mode": "standard", "max_attempts": 2})
    client = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None, config=config)
    prefix = obj.path.strip("/")
    return client, obj.netloc, prefix + "/" if prefix else ""


def existing_output(out_root: str, limit: int = 5) -> list[str]:
    """Up to ``limit`` names already under ``out_root`` (empty when it is absent or empty)."""
    scheme = urllib.parse.urlparse(out_root).scheme
    if not scheme:
        if os.path.isfile(out_root):
            raise DataError(f"--out_root {out_root} is a file; pass a folder")
        return sorted(os.listdir(out_root))[:limit] if os.path.isdir(out_root) else []
    if scheme == "s3":
        with _storage_errors(out_root, "list"):
            client, bucket, prefix = _s3(out_root)
            try:
                resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=limit)
            except client.exceptions.NoSuchBucket:
                raise DataError(f"bucket '{bucket}' of --out_root {out_root} does not exist (endpoint "
                                f"{os.environ.get('S3_ENDPOINT_URL') or 'AWS'}); create it first") from None
        return [o["Key"][len(prefix):] for o in resp.get("Contents", [])]
    from streaming.base.storage.upload import CloudUploader

    uploader = CloudUploader.get(out_root, exist_ok=True)
    shutil.rmtree(uploader.local, ignore_errors=True)
    return sorted(uploader.list_objects() or [])[:limit]


def clear_output(out_root: str) -> None:
    """Delete everything under ``out_root`` (local folder or s3 prefix)."""
    scheme = urllib.parse.urlparse(out_root).scheme
    if not scheme:
        shutil.rmtree(out_root, ignore_errors=True)
    elif scheme == "s3":
        with _storage_errors(out_root, "delete from"):
            client, bucket, prefix = _s3(out_root)
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    else:
        raise DataError(f"--overwrite can clear local and s3:// outputs only; empty {out_root} yourself")


def _check_local_output(out_root: str, units: Sequence[Unit]) -> None:
    """Refuse inputs inside a local ``out_root`` (--overwrite would delete them); create it, or say why not."""
    if os.path.isfile(out_root):
        raise DataError(f"--out_root {out_root} is a file; pass a folder")
    root = os.path.abspath(out_root)
    for path in dict.fromkeys(u.path for u in units):
        if os.path.isfile(path) and os.path.commonpath([root, os.path.abspath(path)]) == root:
            raise DataError(f"input {path} lies inside --out_root {out_root}; choose an --out_root outside the inputs")
    try:
        os.makedirs(out_root, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --out_root {out_root} ({e.strerror}); pass a folder you can write to") from None
    if not os.access(out_root, os.W_OK | os.X_OK):
        raise DataError(f"--out_root {out_root} is not writable; pass a folder you can write to")


def _prepare_output(cfg: ConvertConfig, units: Sequence[Unit] = ()) -> None:
    if not urllib.parse.urlparse(cfg.out_root).scheme:
        _check_local_output(cfg.out_root, units)
    names = existing_output(cfg.out_root)
    if names and not cfg.overwrite:
        shown = ", ".join(names) + (", ..." if len(names) >= 5 else "")
        raise DataError(f"output {cfg.out_root} is not empty (holds {shown}); pass --overwrite to replace it "
                        f"or choose an empty --out_root")
    if names:
        clear_output(cfg.out_root)


def _compression(cfg: ConvertConfig) -> str | None:
    from streaming.base.compression import get_compressions, is_compression

    algo = cfg.compression
    if algo in (None, "", "none"):
        return None
    if not is_compression(algo):
        raise DataError(f"unknown --compression '{algo}'; use none or one of "
                        f"{', '.join(sorted(get_compressions()))}")
    return algo


@contextlib.contextmanager
def _writer(out: str, cfg: ConvertConfig, columns: dict[str, str] | None = None):
    """An ``MDSWriter`` at ``out``, as a context manager; a failed upload to a remote ``out`` raises a
    ``StorageError`` naming the error, where streaming would only say "One of the threads failed".
    ``columns``: default ``tokens`` (or ``text`` when ``cfg.tokenize`` is off)."""
    from streaming import MDSWriter

    failed: list[BaseException] = []
    with _storage_errors(out, "upload to"):
        try:
            columns = columns or (COLUMNS if cfg.tokenize else TEXT_COLUMNS)
            writer = MDSWriter(out=out, columns=columns, compression=_compression(cfg),
                               size_limit=cfg.shard_size_limit, hashes=[SHARD_HASH],
                               exist_ok=False)  # out_root was checked empty; True would log a warning and rmtree it
            uploader = getattr(writer, "cloud_writer", None)
            if uploader is not None:  # uploads run in threads, which streaming only logs the error of: keep it
                upload = uploader.upload_file

                def upload_file(filename: str):
                    try:
                        return upload(filename)
                    except BaseException as e:
                        failed.append(e)
                        raise

                uploader.upload_file = upload_file
            with writer:
                yield writer
        except DataError:
            raise
        except Exception as e:
            if failed and storage_cause(e) is None:
                raise failed[0] from e
            raise


# ---------------------------------------------------------------------------------------------- conversion

STAGED = ".staged-tokens"    # phase 1's token files, under a local out_root (removed when the conversion ends)
READ_TOKENS = 1 << 22        # phase 2 reads the staged stream this many tokens at a time


@dataclass
class _Part:
    """What one process (or one phase of it) did."""
    documents: int = 0
    tokens: int = 0  # stream tokens, separators included
    samples: int = 0
    shards: int = 0
    cpu_seconds: float = 0.0


def _batches(texts: Iterable[str], max_docs: int, max_chars: int = 4 << 20):
    batch, chars = [], 0
    for text in texts:
        if not text:
            continue  # empty documents are skipped
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _token_stream(source: Source, units: Sequence[Unit], cfg: ConvertConfig, tokenizer, part: _Part,
                  report: Callable[..., None]) -> Iterator[np.ndarray]:
    """The token stream of ``units`` in input order, one tokenizer batch at a time; counts into ``part``.

    ``report(size, docs, tokens)`` is called after each batch, and with the unit's size when a unit is done."""
    bos, eos = separator_ids(tokenizer, cfg)
    for unit in units:
        for batch in _batches(source.read(unit), cfg.batch_docs):
            ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
            stream = flatten(ids, bos, eos)
            part.documents += len(batch)
            part.tokens += len(stream)
            report(0, len(batch), len(stream))
            yield stream
        report(unit.size)


def _check_counts(part: _Part, units: Sequence[Unit], cfg: ConvertConfig) -> None:
    if part.documents == 0:
        raise DataError(f"the inputs hold no documents ({len(units)} input slices read"
                        f"{', e.g. ' + str(units[0]) if units else ''}); check the input paths and --text_field")
    if part.tokens < cfg.concat_tokens:
        raise DataError(f"the inputs hold {part.tokens:,} tokens, fewer than one sample of "
                        f"--concat_tokens {cfg.concat_tokens}; nothing was written")


def _convert_here(source: Source, units: Sequence[Unit], cfg: ConvertConfig, tokenizer, report) -> _Part:
    """One process: pack the stream as it is tokenized into one writer at out_root."""
    cpu0 = time.process_time()
    part, packer = _Part(), Packer(cfg.concat_tokens)
    with _writer(cfg.out_root, cfg) as writer:
        for stream in _token_stream(source, units, cfg, tokenizer, part, report):
            for row in packer.add_stream(stream):
                writer.write({"tokens": row})
                part.samples += 1
        _check_counts(part, units, cfg)
    part.shards = len(writer.shards)
    part.cpu_seconds = time.process_time() - cpu0
    return part


def _write_texts(source: Source, units: Sequence[Unit], cfg: ConvertConfig, out: str, report) -> _Part:
    """Raw text: each non-empty document of ``units`` (in order) as one sample of a writer at ``out``."""
    cpu0 = time.process_time()
    part = _Part()
    with _writer(out, cfg) as writer:
        for unit in units:
            for batch in _batches(source.read(unit), cfg.batch_docs):
                for text in batch:
                    writer.write({"text": text})
                part.documents += len(batch)
                report(0, len(batch))
            report(unit.size)
    part.samples = part.documents
    part.shards = len(writer.shards)
    part.cpu_seconds = time.process_time() - cpu0
    return part


def _texts_in_processes(source: Source, units: Sequence[Unit], cfg: ConvertConfig, processes: int) -> _Part:
    """Raw text, one process per contiguous range of units, each to part-NNNNN/; one merged index in order."""
    ranges = contiguous_ranges([u.size for u in units], processes)
    names = [f"part-{r:05d}" for r in range(processes)]
    with _progress(cfg.progress, "converting", sum(u.size for u in units), _size_unit(source)) as report:
        parts = _run_processes([(_write_texts, (source, units[a:b], cfg, join_out(cfg.out_root, name)))
                                for (a, b), name in zip(ranges, names)], report)
    _merge_index(cfg.out_root, names)
    return _Part(documents=sum(p.documents for p in parts), samples=sum(p.samples for p in parts),
                 shards=sum(p.shards for p in parts), cpu_seconds=sum(p.cpu_seconds for p in parts))


def _convert_texts(source: Source, units: Sequence[Unit], cfg: ConvertConfig, processes: int) -> _Part:
    if processes == 1:
        with _progress(cfg.progress, "converting", sum(u.size for u in units), _size_unit(source)) as report:
            part = _write_texts(source, units, cfg, cfg.out_root, report)
    else:
        part = _texts_in_processes(source, units, cfg, processes)
    if part.documents == 0:
        raise DataError(f"the inputs hold no documents ({len(units)} input slices read, e.g. {units[0]}); check "
                        f"the input paths and --text_field")
    return part


# Phase 1 and 2 of a conversion in processes (see the module docstring).


def _tokenize_to_file(source: Source, units: Sequence[Unit], cfg: ConvertConfig, path: str, report) -> _Part:
    """Phase 1: the token stream of ``units`` (in order) into ``path`` as raw int32."""
    from llmfoundry.data.tokenizer import load_tokenizer

    cpu0 = time.process_time()
    part = _Part()
    tokenizer = load_tokenizer(cfg.tokenizer)
    with open(path, "wb") as f:
        for stream in _token_stream(source, units, cfg, tokenizer, part, report):
            stream.tofile(f)
    part.cpu_seconds = time.process_time() - cpu0
    return part


@dataclass(frozen=True)
class StagedStream:
    """The token stream as phase 1 left it: raw int32 files holding consecutive pieces of it, in order."""
    paths: tuple[str, ...]
    lengths: tuple[int, ...]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start .. stop-1`` of the whole stream."""
        pieces, offset = [], 0
        for path, length in zip(self.paths, self.lengths):
            a, b = max(start - offset, 0), min(stop - offset, length)
            if a < b:
                pieces.append(np.fromfile(path, np.int32, count=b - a, offset=4 * a))
            offset += length
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def _write_samples(stream: StagedStream, first: int, stop: int, cfg: ConvertConfig, out: str, report) -> _Part:
    """Phase 2: samples ``first .. stop-1`` of the staged stream into a writer at ``out``."""
    cpu0 = time.process_time()
    n = cfg.concat_tokens
    step = max(1, READ_TOKENS // n)
    with _writer(out, cfg) as writer:
        for a in range(first, stop, step):
            b = min(a + step, stop)
            for row in stream.read(a * n, b * n).reshape(b - a, n):
                writer.write({"tokens": row})
            report(b - a)
    return _Part(samples=stop - first, shards=len(writer.shards), cpu_seconds=time.process_time() - cpu0)


def contiguous_ranges(sizes: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cut ``len(sizes)`` items into ``parts`` non-empty consecutive ranges ``(start, stop)`` of about equal
    total size (``1 <= parts <= len(sizes)``)."""
    prefix = np.concatenate([[0], np.cumsum(sizes, dtype=np.float64)])
    bounds = [0]
    for r in range(1, parts):
        j = int(np.argmin(np.abs(prefix - prefix[-1] * r / parts)))
        bounds.append(min(max(j, bounds[-1] + 1), len(sizes) - (parts - r)))
    bounds.append(len(sizes))
    return list(zip(bounds[:-1], bounds[1:]))


def _worker(rank: int, job: Callable[..., _Part], args: tuple, q, env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)  # the caller's environment now (credentials, S3_ENDPOINT_URL), not the forkserver's
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: processes share the cores
    try:
        q.put(("done", rank, job(*args, report=lambda *a: q.put(("progress", rank, *a)))))
    except StorageError as e:
        q.put(("storage_error", rank, str(e)))
    except DataError as e:
        q.put(("data_error", rank, str(e)))
    except BaseException:
        q.put(("error", rank, traceback.format_exc()))


def _mp_context():
    """A forkserver (spawn where there is none) that imports the heavy modules once for all processes."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["llmfoundry.data.convert", "streaming", "transformers.models.auto.tokenization_auto"])
    return ctx


def _run_processes(jobs: list[tuple[Callable[..., _Part], tuple]], report) -> list[_Part]:
    """Run ``job(*args, report=...)`` for each of ``jobs`` in its own process; their results, in order."""
    ctx = _mp_context()
    q = ctx.Queue()
    env = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, job, args, q, env)) for r, (job, args) in enumerate(jobs)]
    for p in procs:
        p.start()
    parts: dict[int, _Part] = {}
    try:
        while len(parts) < len(procs):
            try:
                kind, rank, *payload = q.get(timeout=1.0)
            except queue.Empty:
                for r, p in enumerate(procs):
                    if r not in parts and not p.is_alive():
                        raise RuntimeError(f"conversion process {r} stopped before finishing (exit code "
                                           f"{p.exitcode}; -9 is usually out of memory; any error is printed above)")
                continue
            if kind == "progress":
                report(*payload)
            elif kind == "done":
                parts[rank] = payload[0]
            elif kind == "data_error":
                raise DataError(payload[0])
            elif kind == "storage_error":
                raise StorageError(payload[0])
            else:
                raise RuntimeError(f"conversion process {rank} failed:\n{payload[0]}")
    finally:
        for p in procs:
            if p.is_alive() and len(parts) < len(procs):
                p.terminate()
            p.join()
    return [parts[r] for r in range(len(procs))]


def _merge_index(out_root: str, part_names: list[str]) -> None:
    from streaming.base.util import merge_index

    remote = bool(urllib.parse.urlparse(out_root).scheme)
    urls = [join_out(out_root, name, "index.json") for name in part_names]
    logging.disable(logging.WARNING)  # merge_index logs a warning about its temporary folder
    try:
        with _storage_errors(out_root, "upload to"):
            merge_index(urls, out_root, keep_local=not remote)
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _scratch_folder(out_root: str):
    """Where phase 1 stages the token stream: inside a local out_root (the disk the output goes to), else a
    temp folder; removed at the end."""
    if urllib.parse.urlparse(out_root).scheme:
        folder = tempfile.mkdtemp(prefix="convert-tokens-")
    else:
        folder = os.path.join(out_root, STAGED)
        os.makedirs(folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _convert_in_processes(source: Source, units: Sequence[Unit], cfg: ConvertConfig, processes: int) -> _Part:
    """Phase 1 (tokenize contiguous ranges of units to files), then phase 2 (write equal shares of the samples
    to part-NNNNN/), then one merged index listing the parts in order."""
    n = cfg.concat_tokens
    with _scratch_folder(cfg.out_root) as scratch:
        ranges = contiguous_ranges([u.size for u in units], processes)
        paths = [os.path.join(scratch, f"tokens-{r:05d}.bin") for r in range(processes)]
        with _progress(cfg.progress, "tokenizing", sum(u.size for u in units), _size_unit(source)) as report:
            tokenized = _run_processes([(_tokenize_to_file, (source, units[a:b], cfg, path))
                                        for (a, b), path in zip(ranges, paths)], report)
        part = _Part(documents=sum(p.documents for p in tokenized), tokens=sum(p.tokens for p in tokenized),
                     cpu_seconds=sum(p.cpu_seconds for p in tokenized))
        _check_counts(part, units, cfg)
        stream = StagedStream(tuple(paths), tuple(p.tokens for p in tokenized))
        samples = part.tokens // n
        writers = min(processes, samples)
        bounds = [samples * r // writers for r in range(writers + 1)]
        names = [f"part-{r:05d}" for r in range(writers)]
        with _progress(cfg.progress, "writing", samples, " samples") as report:
            written = _run_processes([(_write_samples, (stream, bounds[r], bounds[r + 1], cfg,
                                                        join_out(cfg.out_root, name)))
                                      for r, name in enumerate(names)], report)
    _merge_index(cfg.out_root, names)
    part.samples, part.shards = samples, sum(p.shards for p in written)
    part.cpu_seconds += sum(p.cpu_seconds for p in written)
    return part


def _size_unit(source: Source) -> str:
    """What the units' sizes count, for the progress bar: 'B' (bytes), ' docs', ' shards' ..."""
    return getattr(source, "size_unit", " slices")


@contextlib.contextmanager
def _progress(enabled: bool, desc: str, total: int, unit: str):
    """A tqdm bar to ``total``; yields ``report(amount, docs=0, tokens=0)`` (documents and tokens, when given,
    are counted alongside)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, dynamic_ncols=True,
               file=sys.stderr)
    counts = [0, 0]

    def report(amount: int, docs: int = 0, tokens: int = 0) -> None:
        if docs or tokens:
            counts[0] += docs
            counts[1] += tokens
            bar.set_postfix_str(f"{counts[0]:,} docs" + (f", {counts[1]:,} tokens" if counts[1] else ""),
                                refresh=False)
        bar.update(amount)

    try:
        yield report
    finally:
        bar.close()


def processes_note(units: Sequence[Unit], requested: int, used: int) -> str:
    """The line printed when the input has fewer units than ``--processes``: what the input is, and the fix."""
    paths = list(dict.fromkeys(u.path for u in units))
    if all(os.path.isfile(p) for p in paths):
        what = f"{len(paths)} input file{'s' * (len(paths) != 1)}"
        what += f" in {len(units)} slices" if len(units) != len(paths) else ""
    else:
        what = f"the input is {len(units)} slice{'s' * (len(units) != 1)}"
    return (f"note: {what}: using {used} process{'es' * (used != 1)}, not --processes {requested} (a process "
            f"converts whole slices: a file, {BLOCK_BYTES >> 20} MiB of JSON Lines, a parquet row group or a "
            f"dataset shard); split the corpus into more files to convert in parallel")


def convert(source: Source, cfg: ConvertConfig) -> ConvertSummary:
    """Convert every document of ``source`` into MDS shards at ``cfg.out_root``; print and return a summary.

    The samples, in index order, are the documents' token stream in input order cut every ``concat_tokens``
    tokens; only the final partial sample (fewer than ``concat_tokens`` tokens) is dropped, whatever
    ``processes`` is. With ``cfg.tokenize`` off, they are the documents themselves (column ``text``). A conversion
    that fails (bad input, interrupted) removes what it wrote, so it can simply be run again. With ``processes > 1`` the workers are fresh processes (forkserver/spawn): a script that calls
    this must do so under ``if __name__ == "__main__":``.
    """
    from llmfoundry.data.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    _compression(cfg)
    if cfg.processes < 1:
        raise DataError(f"--processes must be at least 1, got {cfg.processes}")
    if cfg.concat_tokens < 1:
        raise DataError(f"--concat_tokens must be at least 1, got {cfg.concat_tokens}")
    tokenizer = None
    if cfg.tokenize:
        tokenizer = load_tokenizer(cfg.tokenizer)
        separator_ids(tokenizer, cfg)  # fail early, before anything is written
    units = source.units()
    if not units:
        paths = list(getattr(source, "paths", ()))
        shown = f" ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})" if paths else ""
        raise DataError(f"the inputs are empty{shown}; nothing was converted and --out_root was left as it is")
    _prepare_output(cfg, units)
    processes = max(1, min(cfg.processes, len(units)))
    if processes < cfg.processes:
        print(processes_note(units, cfg.processes, processes), file=sys.stderr)
    with _cleared_on_failure(cfg.out_root):
        if not cfg.tokenize:
            part = _convert_texts(source, units, cfg, processes)
        elif processes == 1:
            with _progress(cfg.progress, "converting", sum(u.size for u in units), _size_unit(source)) as report:
                part = _convert_here(source, units, cfg, tokenizer, report)
        else:
            part = _convert_in_processes(source, units, cfg, processes)
    tokens = part.samples * cfg.concat_tokens if cfg.tokenize else 0
    summary = ConvertSummary(out_root=cfg.out_root, documents=part.documents, tokens=tokens,
                             dropped_tokens=part.tokens - tokens, samples=part.samples, shards=part.shards,
                             seconds=time.perf_counter() - t0, processes=processes, cpu_seconds=part.cpu_seconds,
                             column="tokens" if cfg.tokenize else "text")
    if cfg.progress:
        print(summary, file=sys.stderr)
    return summary


@contextlib.contextmanager
def _cleared_on_failure(out_root: str):
    """Remove what was written under ``out_root`` when the block fails (so the conversion can simply run again)."""
    try:
        yield
    except BaseException as e:
        try:
            clear_output(out_root)
        except StorageError:
            if not isinstance(e, StorageError):
                raise
            # the store already failed; its error (the one to show) is the first, not this one
        raise


def write_samples(samples: Iterable[dict], columns: dict[str, str], cfg: ConvertConfig, inputs: Sequence[str] = (),
                  what: str = "examples") -> ConvertSummary:
    """Write ``samples`` (dicts with ``columns``, MDS encodings), in order, into one MDS dataset at ``cfg.out_root``,
    with ``convert``'s output checks (``inputs``: files that must not lie inside a local out_root), compression and
    removal on failure. Nothing is tokenized; ``what`` names the samples in the progress bar and summary."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    _compression(cfg)
    _prepare_output(cfg, [Unit(p) for p in inputs])
    count = 0
    with _cleared_on_failure(cfg.out_root), _progress(cfg.progress, "writing", None, f" {what}") as report:
        with _writer(cfg.out_root, cfg, columns) as writer:
            for sample in samples:
                writer.write(sample)
                count += 1
                report(1)
    summary = ConvertSummary(out_root=cfg.out_root, documents=count, tokens=0, dropped_tokens=0, samples=count,
                             shards=len(writer.shards), seconds=time.perf_counter() - t0, processes=1,
                             cpu_seconds=time.process_time() - cpu0, column=", ".join(columns), what=what)
    if cfg.progress:
        print(summary, file=sys.stderr)
    return summary


# --------------------------------------------------------------------------------------------- command line


def add_convert_args(parser) -> None:
    """The flags every data_prep/convert_* script shares."""
    parser.add_argument("--out_root", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--tokenizer", default="bundled",
                        help="'bundled' (default: the tiny byte-level BPE tokenizer built at first use, "
                             "llmfoundry/data/bundled.py), a local tokenizer folder, or a hub name "
                             "(e.g. EleutherAI/gpt-neox-20b)")
    parser.add_argument("--concat_tokens", type=int, default=None,
                        help="tokens per sample (default 2048): the documents, each followed by --eos_text, are "
                             "packed back to back in input order; only the final partial sample (fewer than "
                             "concat_tokens tokens, the end of the last document) is dropped")
    parser.add_argument("--no_tokenize", action="store_true",
                        help="write each document as it is, one sample per document (MDS column 'text') instead "
                             "of packed tokens; the training loader tokenizes it with the run's tokenizer, cuts it "
                             "at max_seq_len and pads it (as llm-foundry's converters do without --concat_tokens)")
    parser.add_argument("--eos_text", default=None,
                        help="text after each document (default: the tokenizer's EOS token; '' for none)")
    parser.add_argument("--bos_text", default=None, help="text before each document (default: none)")
    parser.add_argument("--add_bos", action="store_true", help="put the tokenizer's BOS token before each document")
    parser.add_argument("--compression", default="zstd", help="shard compression: zstd (default), none, gz, ...")
    parser.add_argument("--processes", type=int, default=1,
                        help="parallel conversion processes (default 1); the samples are the same for any number. "
                             "With more than 1, the token stream is staged on disk first: 4 bytes per token, in "
                             "a local --out_root, else in the temp folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out_root")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar or summary")


def config_from_args(args) -> ConvertConfig:
    if args.no_tokenize:
        return _text_config_from_args(args)
    bos_text = args.bos_text
    if args.add_bos:
        if bos_text:
            raise DataError("pass either --add_bos or --bos_text, not both")
        from llmfoundry.data.tokenizer import load_tokenizer

        bos_text = load_tokenizer(args.tokenizer).bos_token
        if not bos_text:
            raise DataError(f"tokenizer '{args.tokenizer}' has no BOS token; pass --bos_text instead of --add_bos")
    concat_tokens = 2048 if args.concat_tokens is None else args.concat_tokens
    return ConvertConfig(out_root=args.out_root, tokenizer=args.tokenizer, concat_tokens=concat_tokens,
                         eos_text=args.eos_text, bos_text=bos_text, compression=args.compression,
                         processes=args.processes, overwrite=args.overwrite, progress=not args.no_progress)


def _text_config_from_args(args) -> ConvertConfig:
    """--no_tokenize: the flags that only apply to tokenizing are refused, each with the reason."""
    if args.concat_tokens is not None:
        raise DataError("pass either --concat_tokens N (packed token samples, column 'tokens') or --no_tokenize "
                        "(one raw-text sample per document, column 'text'), not both")
    given = [flag for flag, value in (("--eos_text", args.eos_text), ("--bos_text", args.bos_text),
                                      ("--add_bos", args.add_bos or None)) if value is not None]
    if args.tokenizer != "bundled":
        given.insert(0, "--tokenizer")
    if given:
        raise DataError(f"{', '.join(given)} only apply when tokenizing; with --no_tokenize the text is stored as "
                        f"it is and the training run's tokenizer (YAML tokenizer:) tokenizes it while loading. "
                        f"Remove {'them' if len(given) > 1 else 'it'}, or drop --no_tokenize to write packed tokens")
    return ConvertConfig(out_root=args.out_root, tokenize=False, compression=args.compression,
                         processes=args.processes, overwrite=args.overwrite, progress=not args.no_progress)


def run_cli(main: Callable[[], object]) -> None:
    """Run a data_prep script's ``main``; a ``DataError`` prints as one line and exits with status 2 (1 for a
    ``StorageError``: the object store of --out_root cannot be reached, as the train and eval entry points do)."""
    try:
        main()
    except DataError as e:
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        sys.exit(1 if isinstance(e, StorageError) else 2)
