"""Where the training tokens come from: stream configs -> `streaming.Stream` objects.

A stream is one MDS dataset (a directory holding `index.json` and shards written by `streaming.MDSWriter`):
for pretraining with a column `tokens` (`ndarray:int32`) or `text` (`str`; text_loader.py), for finetuning with
`prompt`/`response` or `messages` columns (finetune.py). It is read from `local` if the shards are there, and
otherwise downloaded from `remote` (a directory path, `s3://bucket/prefix`, or any other scheme
mosaicml-streaming supports) into `local`.

`s3://` remotes talk to the endpoint in `s3_endpoint_url` (config) or else the `S3_ENDPOINT_URL`
environment variable or else AWS. Download failures raise `StreamError` naming the stream, the object
and the endpoint, so that a store that is down or a wrong path reads as such instead of as a hang.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass

from streaming import Stream
from streaming.base.storage.download import S3Downloader

from llmfoundry.data import SHARD_HASH
from llmfoundry.utils.errors import storage_cause, unreached_fix


class StreamError(RuntimeError):
    """A data source is missing, unreachable or malformed. The message names it and the fix."""


def user_message(e: BaseException) -> str:
    """The error's own message. A DataLoader worker's error reaches the main process re-raised with the worker's
    whole traceback as its message ("Caught X in DataLoader worker process N. Original Traceback ..."): keep the
    original message, its last line."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        return text.rsplit(f"{type(e).__name__}: ", 1)[-1].strip()
    return text


@dataclass
class StreamConfig:
    """One source of a mixture (YAML: an entry of `streams:`, keyed by the stream's name).

    remote: where the shards live (`s3://bucket/dir`, a directory, ...); None when they are all in `local`.
    local: cache directory the shards are downloaded to (or read from, without remote). When a remote is
        set and local is not, each loader gets its own fresh temporary directory, removed when it is freed.
    split: subdirectory of remote and local (e.g. 'train'); defaults to the loader's `split`; '' = none (the
        shards sit in remote/local itself).
    proportion / repeat / choose: at most one; how much this stream is up/down-sampled per epoch
        (streaming semantics: proportion = share of the epoch, relative to the other streams; repeat =
        multiplier on its samples; choose = exact sample count). Proportions can't mix with the others.
    """
    remote: str | None = None
    local: str | None = None
    split: str | None = None
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None

    def __post_init__(self):
        if not (self.remote or self.local):
            raise ValueError("set 'remote' (where the shards are stored) and/or 'local' (a directory holding them)")
        weights = [k for k in ("proportion", "repeat", "choose") if getattr(self, k) is not None]
        if len(weights) > 1:
            raise ValueError(f"set at most one of proportion/repeat/choose, got {weights}")
        for k in weights:
            if getattr(self, k) < 0:
                raise ValueError(f"'{k}' must be >= 0, got {getattr(self, k)}")


def endpoint_description(remote: str | None, s3_endpoint_url: str | None) -> str:
    """Human-readable name of the server a remote is read from (for error messages)."""
    scheme = urllib.parse.urlparse(remote or "").scheme
    if scheme == "s3":
        return s3_endpoint_url or os.environ.get("S3_ENDPOINT_URL") or "AWS S3 (no S3_ENDPOINT_URL set)"
    return scheme or "local filesystem"


class _S3Downloader(S3Downloader):
    """streaming's S3 downloader with an explicit endpoint and bounded waits.

    streaming only applies `download_timeout` to reads; a host that does not answer would take botocore's
    60 s connect timeout per attempt, so the connect timeout gets the same bound. botocore makes at most 2
    attempts per call; streaming repeats the call `download_retry` times with 1, 2, 4 ... s of backoff.
    """

    def __init__(self, endpoint_url: str | None):
        super().__init__()
        self.endpoint_url = endpoint_url

    def _create_s3_client(self, unsigned: bool = False, timeout: float = 60.0):
        from boto3.session import Session
        from botocore import UNSIGNED
        from botocore.config import Config
        extra = {"signature_version": UNSIGNED} if unsigned else {}
        config = Config(connect_timeout=timeout, read_timeout=timeout,
                        retries={"mode": "standard", "max_attempts": 2}, **extra)
        self._s3_client = Session().client(
            "s3", config=config, endpoint_url=self.endpoint_url or os.environ.get("S3_ENDPOINT_URL"))


class NamedStream(Stream):
    """A `streaming.Stream` that knows its config name and reports failed downloads clearly."""

    def __init__(self, name: str, s3_endpoint_url: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.name = name
        self.s3_endpoint_url = s3_endpoint_url
        if urllib.parse.urlparse(self.remote or "").scheme == "s3":
            self._downloader = _S3Downloader(s3_endpoint_url)

    def describe(self) -> str:
        where = os.path.join(self.remote or self.local, self.split) if self.split else (self.remote or self.local)
        return f"stream '{self.name}' ({where})"

    def get_shards(self, world, allow_unsafe_types: bool):
        """The shards of the index; when every shard has a hash of ``SHARD_HASH`` (our converters write one), each
        is checked against it as it is downloaded or decompressed (``_prepare_shard_part``)."""
        shards = super().get_shards(world, allow_unsafe_types)
        files = [info for shard in shards for pair in shard.file_pairs for info in pair if info is not None]
        if self.validate_hash is None and files and all(SHARD_HASH in (f.hashes or {}) for f in files):
            self.validate_hash = SHARD_HASH
        return shards

    def _prepare_shard_part(self, raw_info, zip_info=None, compression=None) -> int:
        try:
            return super()._prepare_shard_part(raw_info, zip_info, compression)
        except ValueError as e:
            if not str(e).startswith("Checksum failure"):
                raise
            info = zip_info or raw_info
            copy = os.path.join(self.local, self.split or "", info.basename)
            source = os.path.join(self.remote, self.split or "", info.basename) if self.remote else copy
            if self.remote and os.path.exists(copy):
                os.remove(copy)  # the damaged copy in the cache: the next run downloads it again
            raise StreamError(
                f"{self.describe()}: shard {source} is damaged: its {self.validate_hash} hash differs from the one "
                f"index.json records (the same size, different bytes: a bad copy or a disk error). Fix: copy the "
                f"shard again from where the dataset was written, or convert this source again") from None

    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        try:
            return super()._download_file(from_basename, to_basename)
        except Exception as e:
            if self.remote is None:  # nothing to download from: a file of the local dataset is gone
                path = os.path.join(self.local, self.split, from_basename)
                raise StreamError(
                    f"{self.describe()}: {path} is listed in its index.json but missing. Fix: convert this source "
                    f"again (index.json and its shards are written together), or restore the file.") from e
            remote = os.path.join(self.remote, self.split, from_basename)
            endpoint = endpoint_description(self.remote, self.s3_endpoint_url)
            fix = self._download_fix(e, from_basename == "index.json")
            hint = split_hint(self.remote, self.split or "", "remote") if from_basename == "index.json" else ""
            detail = (str(e).strip().splitlines() or [""])[0].rstrip(".")
            raise StreamError(
                f"{self.describe()}: could not download {remote} from {endpoint} "
                f"(download_retry={self.download_retry} attempts, download_timeout={self.download_timeout}s): "
                f"{type(e).__name__}: {detail}. Fix: {fix}.{hint}") from e

    def _download_fix(self, e: BaseException, index: bool) -> str:
        """What to do about a failed download, from the object store's answer."""
        from botocore.exceptions import ClientError
        cause = storage_cause(e)
        fix = unreached_fix(cause, "S3_ENDPOINT_URL or s3_endpoint_url",
                            "; raise download_retry / download_timeout for a slow store")
        if fix:
            return fix
        code = cause.response.get("Error", {}).get("Code") if isinstance(cause, ClientError) else None
        if code in ("403", "AccessDenied"):
            return "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and their access"
        if code in ("404", "NoSuchKey", "NoSuchBucket"):
            bucket = urllib.parse.urlparse(self.remote).netloc
            if self._bucket_missing(bucket):
                return f"bucket '{bucket}' does not exist at this endpoint; correct the bucket name in 'remote'"
            if not index:
                return ("the shard is listed in index.json but missing from the store: convert this source again "
                        "(it writes index.json and its shards together), or restore the file")
            return "point 'remote' at a directory written by streaming.MDSWriter (it holds index.json)"
        if index:
            return ("point 'remote' at a directory written by streaming.MDSWriter (it holds index.json), "
                    "and check that the endpoint is reachable")
        return "check that the object store is up and reachable; raise download_retry / download_timeout for a slow store"

    def _bucket_missing(self, bucket: str) -> bool:
        """Whether the store answers that ``bucket`` does not exist (False when it cannot tell)."""
        probe = _S3Downloader(self.s3_endpoint_url)  # the stream's own client is dropped after a failed download
        try:
            probe._create_s3_client(timeout=self.download_timeout)
            probe._s3_client.head_bucket(Bucket=bucket)
        except Exception as e:  # noqa: BLE001 - any other answer: cannot tell
            return str(getattr(e, "response", {}).get("Error", {}).get("Code")) in ("404", "NoSuchBucket")
        return False


_loader_counter = itertools.count()


def _job_token() -> str:
    """Same string on every rank of one job, different for concurrent jobs: names auto cache dirs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        key = ":".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
        return "job-" + hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"pid-{os.getpid()}"


def auto_cache_root() -> str:
    """A fresh cache directory name for one loader: `$TMPDIR/llmfoundry-mds-cache/<job>-<n>`.

    Every rank of a job builds its loaders in the same order, so the n-th loader of each rank on a node gets
    the same directory (streaming shares the cache between local ranks); different loaders in one process
    and concurrent jobs get different ones.
    """
    return os.path.join(tempfile.gettempdir(), "llmfoundry-mds-cache", f"{_job_token()}-{next(_loader_counter)}")


def split_hint(path: str, split: str, what: str) -> str:
    """A note for a source that names the split folder itself (local=/data/mds/train with split 'train'): the
    split is appended to it, so the loader looks in /data/mds/train/train. Empty when that is not the case."""
    trimmed = path.rstrip("/")
    parent, last = trimmed.rsplit("/", 1) if "/" in trimmed else ("", trimmed)
    if not split or last != split or not parent:
        return ""
    return f" Note: the split ('{split}') is appended to {what}; did you mean {what}={parent}?"


def _check_local_source(name: str, path: str, split: str, what: str) -> None:
    """A dataset on this machine: its folder, its index.json, and every shard file the index lists."""
    directory = os.path.join(path, split) if split else path
    hint = split_hint(path, split, what)
    if split and not hint and os.path.isfile(os.path.join(path, "index.json")):
        hint = (f" Note: {path} holds an index.json itself; to read it without a split folder, set split: '' on "
                f"this stream.")
    if not os.path.isdir(directory):
        raise StreamError(f"stream '{name}': {what} directory {directory} does not exist. "
                          f"Fix: point '{what}' at a directory written by streaming.MDSWriter"
                          + (" (or set 'remote' to download it)" if what == "local" else "") + "." + hint)
    index = os.path.join(directory, "index.json")
    if not os.path.isfile(index):
        raise StreamError(f"stream '{name}': no index.json in {what} directory {directory}. "
                          f"Fix: point '{what}' at a directory written by streaming.MDSWriter "
                          f"(it holds index.json and shard.*.mds files)." + hint)
    missing = missing_shards(index)
    if missing:
        raise StreamError(f"stream '{name}': {len(missing)} shard file(s) listed in {index} are missing, e.g. "
                          f"{os.path.join(directory, missing[0])}. Fix: convert this source again (index.json and "
                          f"its shards are written together), or restore the files.")
    wrong = wrong_size_shards(index)
    if wrong:
        file, size, listed = wrong[0]
        more = f" ({len(wrong)} such files)" if len(wrong) > 1 else ""
        raise StreamError(f"stream '{name}': shard {os.path.join(directory, file)} is {size:,} bytes, {index} lists "
                          f"it as {listed:,}{more}: a copy cut short, or a file of another conversion. Fix: copy the "
                          f"dataset again, or convert this source again.")


def _index_shards(index_path: str) -> list[dict]:
    import json
    try:
        with open(index_path) as f:
            return json.load(f).get("shards", [])
    except (OSError, ValueError, AttributeError) as e:
        raise StreamError(f"{index_path} is not a readable MDS index ({type(e).__name__}: {e}). Fix: convert "
                          f"this source again.") from e


def missing_shards(index_path: str) -> list[str]:
    """Shards listed in an MDS ``index.json`` with neither their raw nor their compressed file beside it."""
    directory = os.path.dirname(index_path)
    missing = []
    for shard in _index_shards(index_path):
        names = [(shard.get(k) or {}).get("basename") for k in ("raw_data", "zip_data")]
        names = [n for n in names if n]
        if names and not any(os.path.isfile(os.path.join(directory, n)) for n in names):
            missing.append(names[0])
    return missing


def wrong_size_shards(index_path: str) -> list[tuple[str, int, int]]:
    """(file, size on disk, size index.json lists) for each present shard file (raw or compressed) whose size is
    not the one its index lists: a truncated copy shows here, before streaming meets it mid-epoch."""
    directory = os.path.dirname(index_path)
    wrong = []
    for shard in _index_shards(index_path):
        for k in ("raw_data", "zip_data"):
            info = shard.get(k) or {}
            path = os.path.join(directory, info.get("basename") or "")
            if info.get("basename") and info.get("bytes") is not None and os.path.isfile(path):
                size = os.path.getsize(path)
                if size != info["bytes"]:
                    wrong.append((info["basename"], size, info["bytes"]))
    return wrong


def compressed_only(directory: str) -> bool:
    """Whether some shard of the MDS folder ``directory`` is there only compressed (streaming would write its
    decompressed copy next to it, into the dataset folder)."""
    for shard in _index_shards(os.path.join(directory, "index.json")):
        raw, zipped = (shard.get(k) or {} for k in ("raw_data", "zip_data"))
        if zipped.get("basename") and not os.path.isfile(os.path.join(directory, raw.get("basename") or "")):
            return True
    return False


def build_streams(named: dict[str, StreamConfig], *, default_split: str | None, download_retry: int,
                  download_timeout: float, s3_endpoint_url: str | None) -> tuple[list[NamedStream], list[str]]:
    """`streaming.Stream` objects for the configured sources, checked for the mistakes that can be seen early.

    Returns the streams and the auto-created cache directories (for removal when the loader is freed).
    """
    streams, root = [], None
    for name, sc in named.items():
        split = sc.split if sc.split is not None else (default_split or "")
        local = sc.local
        remote_scheme = urllib.parse.urlparse(sc.remote or "").scheme
        if sc.remote and not remote_scheme:  # a directory on this machine
            _check_local_source(name, sc.remote, split, "remote")
        remote = sc.remote
        if not sc.remote:
            _check_local_source(name, sc.local, split, "local")
            if compressed_only(os.path.join(sc.local, split) if split else sc.local):
                # read it as a 'remote' folder: the decompressed shards go to a cache, not into the dataset folder
                # (which may be read-only or shared)
                remote, local = sc.local, None
        if remote and not local:
            root = root or auto_cache_root()
            local = os.path.join(root, re.sub(r"[^A-Za-z0-9_.-]", "_", name))
        streams.append(NamedStream(
            name, s3_endpoint_url, remote=remote, local=local, split=split or None,
            proportion=sc.proportion, repeat=sc.repeat, choose=sc.choose,
            download_retry=download_retry, download_timeout=download_timeout))
    return streams, ([root] if root else [])
