"""Checkpoint uploads to an object store that may fail: retries with backoff, and 'latest' only for complete objects.

composer 0.32.1 uploads each checkpoint in a worker process (``RemoteUploader``) and uploads
``latest-rank0.pt.symlink`` once a poll (every 30 s) finds the checkpoint object. Its own retry covers only
``ObjectStoreTransientError``: a stopped server (``EndpointConnectionError``) gets botocore's 3 quick attempts, then
the run dies at the next batch with a traceback. Here the same uploader, executor and ``S3ObjectStore`` are kept and
only the per-file upload and the 'latest' gate are replaced:

- every upload is tried ``checkpoint_upload.attempts`` times (default 6), waiting ``checkpoint_upload.backoff_s`` *
  2**k seconds between attempts (default 2 s: 2, 4, 8, 16, 32), one warning line per retry; each attempt is one
  HTTP request (botocore's own retries off, so the waits are ours and logged);
- after the PUT, a HEAD of the object must give the local file's size; then ``<key>.complete`` (the size, as text)
  is written. 'latest' is uploaded only once HEAD and the marker agree with the local size;
- when the attempts run out the run stops (a ``TrainError``: exit status 1) naming the bucket/key and the newest
  checkpoint known complete; the same command, once the store is back, resumes from the newest complete checkpoint
  in the bucket (``checks.complete_s3_checkpoints``).
"""
from __future__ import annotations

import logging
import os
import random
import sys
import time

from composer.utils.remote_uploader import RemoteFilesExistingCheckStatus, RemoteUploader

from llmfoundry.train.checks import TrainError

log = logging.getLogger(__name__)

MARKER = ".complete"


class UploadFailed(TrainError):
    """A checkpoint (or 'latest') upload that failed every attempt."""


def _worker_logging() -> None:
    """Upload workers are spawned processes: give their warnings the run's log format on stderr."""
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s: upload[%(process)d]: %(levelname)s: %(name)s: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _store(backend_name: str, backend_kwargs: dict):
    from composer.utils.object_store.utils import build_remote_backend
    kwargs = dict(backend_kwargs)
    if backend_name == "s3" and "client_config" not in kwargs:  # one HTTP request per attempt: we retry, and say so
        kwargs["client_config"] = {"retries": {"mode": "standard", "total_max_attempts": 1},
                                   "connect_timeout": 10, "read_timeout": 60}
    return build_remote_backend(backend_name, kwargs)


def remote_size(store, name: str) -> int:
    """Size of ``name`` in the store from a HEAD request (FileNotFoundError when absent)."""
    from composer.utils.object_store import S3ObjectStore
    if not isinstance(store, S3ObjectStore):
        return store.get_object_size(name)
    try:
        return store.client.head_object(Bucket=store.bucket, Key=store.get_key(name))["ContentLength"]
    except Exception as e:  # noqa: BLE001
        if getattr(e, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(store.get_uri(name)) from e
        raise


def _why(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _is_complete(store, name: str) -> bool:
    """Whether ``name`` and its marker are in the store (an object without one, a cut-short upload, is replaced)."""
    try:
        remote_size(store, name)
        remote_size(store, name + MARKER)
    except Exception:  # noqa: BLE001 - absent, or the store is unreachable: the attempts that follow say so
        return False
    return True


def _put_checked(store, name: str, path: str, expected: int) -> None:
    store.upload_object(object_name=name, filename=path)
    size = remote_size(store, name)
    if size != expected:
        raise OSError(f"{store.get_uri(name)} holds {size} bytes after the upload, the local file {expected}")
    if not name.endswith(".symlink"):
        marker = f"{path}{MARKER}"
        with open(marker, "w") as f:
            f.write(str(expected))
        try:
            store.upload_object(object_name=name + MARKER, filename=marker)
        finally:
            os.remove(marker)


def upload_with_retries(backend_name: str, backend_kwargs: dict, remote_file_name: str, local_file_path: str,
                        overwrite: bool, attempts: int, backoff: float) -> int:
    """Upload one file (runs in composer's upload worker process); raises ``UploadFailed`` after ``attempts``."""
    _worker_logging()
    store = _store(backend_name, backend_kwargs)
    uri = store.get_uri(remote_file_name)
    expected = os.path.getsize(local_file_path)
    if not overwrite and not remote_file_name.endswith(".symlink") and _is_complete(store, remote_file_name):
        raise FileExistsError(f"Object {uri} already exists, but overwrite was set to False. Please set "
                              "`save_overwrite` to `True` in Trainer to overwrite the existing file.")
    for attempt in range(1, attempts + 1):
        try:
            _put_checked(store, remote_file_name, local_file_path, expected)
            break
        except Exception as e:  # noqa: BLE001 - any failure of the store is retried
            if attempt == attempts:
                log.error("upload of %s failed %d times, giving up: %s", uri, attempts, _why(e))
                raise UploadFailed(f"checkpoint upload to {uri} (bucket '{getattr(store, 'bucket', '?')}', key "
                                   f"'{store.get_key(remote_file_name)}') failed {attempts} times "
                                   f"(checkpoint_upload.attempts), last error {_why(e)}") from None
            wait = backoff * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
            log.warning("upload of %s: attempt %d/%d failed (%s); retrying in %.1f s", uri, attempt, attempts,
                        _why(e), wait)
            time.sleep(wait)
    if attempt > 1:
        log.warning("upload of %s succeeded at attempt %d/%d", uri, attempt, attempts)
    os.remove(local_file_path)
    return 0


def wait_complete(backend_name: str, backend_kwargs: dict, sizes: dict[str, int | None], main_pid: int, failed,
                  timeout: float, poll: float) -> RemoteFilesExistingCheckStatus:
    """EXIST once every object in ``sizes`` has that size (HEAD) and its marker says so; ERROR when an upload
    failed or the main process is gone; TIMEOUT after ``timeout`` seconds."""
    store, start = _store(backend_name, backend_kwargs), time.time()
    for name, size in sizes.items():
        while True:
            if failed.is_set():
                return RemoteFilesExistingCheckStatus.ERROR
            try:
                os.kill(main_pid, 0)
            except OSError:
                return RemoteFilesExistingCheckStatus.ERROR
            try:
                found = remote_size(store, name)
                if (size is None or found == size) and (name.endswith(".symlink") or
                                                        remote_size(store, name + MARKER) == len(str(found))):
                    break
            except Exception:  # noqa: BLE001 - not there yet, or the store is down: the upload retries
                pass
            if time.time() - start > timeout:
                return RemoteFilesExistingCheckStatus.TIMEOUT
            time.sleep(poll)
    return RemoteFilesExistingCheckStatus.EXIST


class CheckedUploader(RemoteUploader):
    """composer's ``RemoteUploader`` with ``upload_with_retries`` as its upload and ``wait_complete`` as the gate of
    'latest'. Set on the CheckpointSaver's uploader by ``install``."""

    def upload_file_async(self, remote_file_name, file_path, overwrite):
        import shutil
        import uuid
        copied = os.path.join(self._upload_staging_folder, str(uuid.uuid4()))
        os.makedirs(self._upload_staging_folder, exist_ok=True)
        shutil.copy2(file_path, copied)
        self.expected_sizes[remote_file_name] = os.path.getsize(copied)
        future = self.upload_executor.submit(upload_with_retries, self.remote_backend_name, self.backend_kwargs,
                                             remote_file_name, copied, overwrite, self.attempts, self.backoff)
        self.futures.append(future)
        if not remote_file_name.endswith(".symlink"):
            self.uploads.append((future, remote_file_name))
        return future

    def check_remote_files_exist_async(self, remote_checkpoint_file_names, max_wait_time_in_seconds=3600,
                                       wait_before_next_try_in_seconds=30):
        # sizes of this rank's files; another rank's (sharded checkpoints) are checked against their markers
        sizes = {n: self.expected_sizes.get(n) for n in remote_checkpoint_file_names}
        future = self.check_remote_files_exist_executor.submit(
            wait_complete, self.remote_backend_name, self.backend_kwargs, sizes, self.pid,
            self.is_remote_upload_failed, max_wait_time_in_seconds, min(wait_before_next_try_in_seconds, 0.5))
        return future

    def _last_complete(self) -> str | None:
        """The newest file whose upload finished: its size was checked with a HEAD and its marker written."""
        done = [name for f, name in self.uploads if f.done() and not f.cancelled() and f.exception() is None]
        return self.remote_backend.get_uri(done[-1]) if done else None

    def _stop(self, e: UploadFailed):
        for f in self.futures:  # uploads still queued would fail the same way: drop them, say it once
            f.cancel()
        self.futures = []
        self.is_remote_upload_failed.set()
        last = self._last_complete()
        where = (f"the newest checkpoint known complete in the bucket is {last}" if last else
                 "no checkpoint of this launch reached the bucket complete")
        raise UploadFailed(f"{e}. The run stops here: {where}. Fix: bring the object store back (S3_ENDPOINT_URL, "
                           f"credentials), then run the same command: autoresume continues from the newest complete "
                           f"checkpoint in the bucket") from None

    def check_workers(self):
        try:
            super().check_workers()
        except UploadFailed as e:
            self._stop(e)

    def wait(self):
        try:
            super().wait()
        except UploadFailed as e:
            self._stop(e)


def install(trainer, attempts: int = 6, backoff_s: float = 2.0) -> None:
    """Make the Trainer's checkpoint uploads retried (``attempts`` tries, waits from ``backoff_s`` doubling) and
    checked (a no-op for local save folders)."""
    saver = getattr(trainer, "_checkpoint_saver", None)
    uploader = getattr(saver, "remote_uploader", None)
    if uploader is None or type(uploader) is not RemoteUploader:
        return
    uploader.__class__ = CheckedUploader
    uploader.attempts, uploader.backoff = attempts, backoff_s
    uploader.expected_sizes, uploader.uploads = {}, []
