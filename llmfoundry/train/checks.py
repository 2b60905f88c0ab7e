"""Checks run before any training work, and translations of errors a user can hit into one clear message.

- batch sizes: the global batch splits evenly over the ranks;
- ``s3://`` save_folder / load_path: the bucket answers (and a save folder accepts writes);
- disk: the (local) save folder has room for a checkpoint of this model;
- errors during training: no space left while saving; a checkpoint of another model shape.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import tempfile
import urllib.parse
import uuid

from llmfoundry.utils.config import ConfigError
from llmfoundry.utils.errors import exception_chain

GB = 1024 ** 3


class TrainError(RuntimeError):
    """A user-facing failure during setup or training. The message names the thing and the fix."""


# ------------------------------------------------------------------------------------------------ batch sizes
def device_batch_size(global_train_batch_size: int, world_size: int) -> int:
    """Samples per rank per optimizer step."""
    if global_train_batch_size % world_size != 0:
        lower = global_train_batch_size // world_size * world_size
        raise ConfigError(
            f"global_train_batch_size = {global_train_batch_size} is not divisible by the number of ranks "
            f"({world_size}); use a multiple of {world_size}, e.g. {max(lower, world_size)} or {lower + world_size}")
    return global_train_batch_size // world_size


def check_microbatch(microbatch, device_batch: int, on_gpu: bool, fsdp_version: int | None):
    """``device_train_microbatch_size`` as composer takes it (None -> the whole device batch)."""
    if microbatch is None:
        return device_batch
    if microbatch == "auto":
        if not on_gpu:
            raise ConfigError("device_train_microbatch_size: auto needs a GPU (it searches for the largest size that "
                              "fits in GPU memory); set an integer on CPU")
        if fsdp_version == 2:
            raise ConfigError("device_train_microbatch_size: auto is not supported by composer's FSDP2; set an "
                              "integer or use fsdp.version: 1")
        return "auto"
    if microbatch > device_batch:
        raise ConfigError(f"device_train_microbatch_size = {microbatch} is larger than the per-device batch "
                          f"({device_batch} = global_train_batch_size / ranks); set it to at most {device_batch}")
    return microbatch


# ------------------------------------------------------------------------------------------------ object stores
def is_remote(path: str | None) -> bool:
    return bool(path) and urllib.parse.urlparse(path).scheme not in ("", "file")


def _s3_client():
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
                        config=Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 2}))


# object stores that composer opens itself (checked here only as far as opening them): what each one needs
OTHER_STORES = {
    "gs": "GCS_KEY and GCS_SECRET (HMAC keys) or Google application default credentials, and google-cloud-storage",
    "oci": "an OCI config file (~/.oci/config) and the oci package",
    "dbfs": "Databricks credentials (DATABRICKS_HOST and DATABRICKS_TOKEN) and databricks-sdk",
}


def _open_other_store(uri: str, key: str) -> str | None:
    """None when composer can open the object store of ``uri`` (a ``gs://``, ``oci://`` or ``dbfs://`` address);
    else one message naming ``key``, what failed and what that store needs (s3:// being the tested path)."""
    from composer.utils import maybe_create_object_store_from_uri
    scheme = urllib.parse.urlparse(uri).scheme
    try:
        maybe_create_object_store_from_uri(uri)
    except Exception as e:  # noqa: BLE001 - each SDK raises its own types for missing packages and credentials
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # its first sentence
        return (f"{key} = {uri!r}: composer could not open the {scheme}:// store ({type(e).__name__}: {first}); it "
                f"needs {OTHER_STORES[scheme]}. Or use a local path or s3://bucket/prefix (S3_ENDPOINT_URL for any "
                f"S3-compatible store)")
    return None


def check_remote(uri: str, key: str, write: bool) -> str | None:
    """None when ``uri`` (an ``s3://`` folder or file) is reachable; else a message naming ``key`` and the fix."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "s3":
        if parsed.scheme in OTHER_STORES:
            return _open_other_store(uri, key)
        return f"{key} = {uri!r}: unsupported scheme '{parsed.scheme}://'; use a local path or s3://bucket/prefix"
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    endpoint = os.environ.get("S3_ENDPOINT_URL") or "AWS S3 (S3_ENDPOINT_URL not set)"
    try:
        client = _s3_client()
        client.head_bucket(Bucket=bucket)
        if write:
            probe = f"{prefix.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}".lstrip("/")
            client.put_object(Bucket=bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=bucket, Key=probe)
    except Exception as e:  # noqa: BLE001 - any failure means unreachable for our purpose
        what = "write to" if write else "read"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"{key} = {uri!r}: cannot {what} bucket '{bucket}' at {endpoint}: {type(e).__name__}: {detail}. "
                f"Fix: check the bucket name, that the endpoint is up (S3_ENDPOINT_URL), and the credentials "
                f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)")
    return None


def latest_s3_checkpoint(save_folder: str) -> str | None:
    """``s3://bucket/key`` of the newest whole-file checkpoint composer uploaded to ``save_folder`` (it writes the
    key into ``<save_folder>/latest-rank0.pt.symlink``), or None when there is none yet."""
    parsed = urllib.parse.urlparse(save_folder)
    prefix = parsed.path.strip("/")
    key = f"{prefix}/latest-rank0.pt.symlink" if prefix else "latest-rank0.pt.symlink"
    client = _s3_client()
    try:
        body = client.get_object(Bucket=parsed.netloc, Key=key)["Body"].read().decode().strip()
    except client.exceptions.NoSuchKey:
        return None
    except Exception as e:  # noqa: BLE001
        if getattr(e, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            return None
        raise
    return f"s3://{parsed.netloc}/{body}"


_S3_CHECKPOINT = re.compile(r"ep(\d+)-ba(\d+)-rank0\.pt$")
_S3_SHARDED = re.compile(r"(ep(\d+)-ba(\d+))/[^/]+$")  # a file of a sharded checkpoint folder


def complete_s3_checkpoints(save_folder: str, sharded: bool = False) -> tuple[str | None, list[tuple[str, str]]]:
    """(``s3://bucket/key`` of the newest complete checkpoint under ``save_folder``, [(uri, why)] for the newer ones
    skipped). Whole-file checkpoints (``ep*-ba*-rank0.pt``) are complete when their ``<key>.complete`` marker
    (written by ``uploads.py`` after a verified upload) holds the object's size; sharded ones (folders
    ``ep*-ba*``, FSDP ``state_dict_type: sharded``) when their ``.metadata`` and every rank file it points into
    are, each at least as long as ``.metadata`` says. A folder whose checkpoints have no markers at all (uploaded
    by an earlier version) falls back to the one ``latest-rank0.pt.symlink`` names, when it exists."""
    parsed = urllib.parse.urlparse(save_folder)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    prefix = f"{prefix}/" if prefix else ""
    client = _s3_client()
    sizes = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        sizes.update({o["Key"][len(prefix):]: o["Size"] for o in page.get("Contents", [])})

    @functools.cache
    def marked(key: str) -> str | None:  # the size a key's marker holds, None without one (one GET per key)
        if key + ".complete" not in sizes:
            return None
        return client.get_object(Bucket=bucket, Key=prefix + key + ".complete")["Body"].read().decode().strip()

    if sharded:
        units = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in map(_S3_SHARDED.fullmatch, sizes) if m}
    else:
        units = {k: tuple(int(x) for x in m.groups()) for k, m in ((k, _S3_CHECKPOINT.fullmatch(k)) for k in sizes)
                 if m}
    if not any(k.endswith(".complete") and (k.split("/")[0] if sharded else k[:-len(".complete")]) in units
               for k in sizes):
        latest = latest_s3_checkpoint(save_folder)
        there = latest and latest[len(f"s3://{bucket}/{prefix}"):] in (set(units) if sharded else sizes)
        return (latest if there else None), []
    skipped = []
    for unit in sorted(units, key=units.get, reverse=True):
        uri = f"s3://{bucket}/{prefix}{unit}"
        why = _s3_sharded_problem(client, bucket, prefix, unit, sizes, marked) if sharded else (
            f"no {unit}.complete marker: its upload did not finish" if marked(unit) is None else
            f"{sizes[unit]} bytes in the bucket, the complete checkpoint has {marked(unit)}"
            if marked(unit) != str(sizes[unit]) else None)
        if why is None:
            return uri, skipped
        skipped.append((uri, why))
    return None, skipped


def _s3_sharded_problem(client, bucket: str, prefix: str, unit: str, sizes: dict, marked) -> str | None:
    """Why the sharded checkpoint folder ``unit`` in the bucket is not complete, or None."""
    from llmfoundry.checkpoint import dcp_file_sizes
    meta = f"{unit}/.metadata"
    if meta not in sizes or marked(meta) != str(sizes[meta]):
        return "its .metadata upload did not finish"
    try:
        needed = dcp_file_sizes(client.get_object(Bucket=bucket, Key=prefix + meta)["Body"].read())
    except ValueError as e:
        return f".metadata: {e}"
    for name, least in sorted(needed.items()):
        key = f"{unit}/{name}"
        if key not in sizes:
            return f"{name} is not in the bucket: its upload did not finish"
        if marked(key) != str(sizes[key]) or sizes[key] < least:
            return f"{name} ({sizes[key]} bytes) is not complete: its upload did not finish"
    return None


def unmark_s3_checkpoint(uri: str) -> int:
    """Delete the ``.complete`` markers of the objects under the sharded checkpoint folder ``uri`` (one skipped as
    incomplete): its files then count as unfinished uploads, which the run's next save of that batch replaces
    (a marked object would be refused as another run's). Returns how many were removed."""
    parsed = urllib.parse.urlparse(uri)
    client = _s3_client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=parsed.netloc, Prefix=parsed.path.strip("/") + "/") for o in page.get("Contents", [])
        if o["Key"].endswith(".complete")]
    for key in keys:
        client.delete_object(Bucket=parsed.netloc, Key=key)
    return len(keys)


# ------------------------------------------------------------------------------------------------ disk space
def checkpoint_bytes(num_params: int, optimizer: str, weights_only: bool = False) -> int:
    """Rough size of one checkpoint: fp32 weights + optimizer state (LION: 1 fp32 buffer, AdamW: 2)."""
    states = 0 if weights_only else {"lion": 1, "adamw": 2}.get(optimizer, 2)
    return int(num_params * 4 * (1 + states) * 1.02) + (1 << 20)


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def missing_folders(folder: str | None) -> list[str]:
    """The levels of a local ``folder`` that do not exist yet, deepest first: what this process would create
    (``remove_empty_folders`` takes them back after a failed start). Empty for remote folders and on local ranks
    other than 0 (one process per machine tidies up)."""
    from composer.utils import dist
    if not folder or is_remote(folder) or dist.get_local_rank() != 0:
        return []
    missing, path = [], os.path.abspath(folder)
    while not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


@contextlib.contextmanager
def removing_created_folders(folder: str | None):
    """On a failure inside the ``with``, remove the levels of ``folder`` that did not exist before it and are still
    empty (``missing_folders`` / ``remove_empty_folders``); then the failure goes on."""
    created = missing_folders(folder)
    try:
        yield
    except BaseException:
        remove_empty_folders(created)
        raise


def remove_empty_folders(folders: list[str]) -> None:
    """Remove each of ``folders`` (deepest first) that exists and is empty; stops at the first that is not."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            continue
        except OSError:  # not empty (a checkpoint, a file of another process) or not a folder: keep it and above
            return


def save_folder_problem(save_folder: str) -> str | None:
    """None when checkpoints can be written under the local ``save_folder`` (tried for real: a file is created in it,
    or in its nearest existing parent, and removed); else a message naming the folder and the fix."""
    where = _existing_parent(save_folder)
    fix = "point save_folder at a folder this user can write (or an s3:// prefix)"
    if not os.path.isdir(where):
        return f"save_folder {save_folder!r}: {where} is a file, not a folder; {fix}"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        why = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable by this user",
               errno.EPERM: "does not allow new files", errno.ENOENT: "does not accept new files (a virtual file "
               "system such as /proc?)"}.get(e.errno, f"cannot be written ({e.strerror or e})")
        return f"save_folder {save_folder!r}: {where} {why}; {fix}"
    return None


def check_free_disk(save_folder: str, needed: int) -> str | None:
    """None when the filesystem holding ``save_folder`` (or, for remote folders, the local staging dir) has
    ``needed`` bytes free; else a message."""
    local = tempfile.gettempdir() if is_remote(save_folder) else save_folder
    where = _existing_parent(local)
    free = shutil.disk_usage(where).free
    if free >= needed:
        return None
    staging = " (checkpoints are written there before upload)" if is_remote(save_folder) else ""
    return (f"not enough free disk for a checkpoint: {where}{staging} has {free / GB:.2f} GiB free, one checkpoint "
            f"of this model needs about {needed / GB:.2f} GiB. Fix: free space, point save_folder at a bigger disk, "
            f"or set save_num_checkpoints_to_keep to keep fewer (check_free_disk: false skips this check)")


# ------------------------------------------------------------------------------------------------ errors in flight
def is_no_space(e: BaseException) -> bool:
    """True when ``e`` (or its cause) is a full disk (ENOSPC), including torch.save's wrapped write failure."""
    for x in exception_chain(e):
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return True
        text = str(x)
        if "No space left on device" in text or "ENOSPC" in text:
            return True
    return False


def _size(n: float) -> str:
    return f"{n / GB:.2f} GiB" if n >= GB / 10 else f"{n / 2 ** 20:.1f} MiB"


def _kept(save_folder: str | None) -> str:
    """What is left to continue from, for the messages of a save that failed mid-run."""
    if is_remote(save_folder):
        return "the checkpoints already uploaded are complete in the bucket"
    latest = os.path.join(save_folder or ".", "latest-rank0.pt")
    if os.path.islink(latest) and os.path.exists(latest):
        return (f"the checkpoints written before this one are complete, and latest-rank0.pt still names the last "
                f"of them, {os.path.realpath(latest)}")
    return "no checkpoint of this run was complete yet"


def no_space_message(save_folder: str | None, needed: int) -> str:
    local = tempfile.gettempdir() if is_remote(save_folder) else (save_folder or ".")
    where = _existing_parent(local)
    free = shutil.disk_usage(where).free
    return (f"no space left on device while writing a checkpoint under {where} ({_size(free)} free now; one "
            f"checkpoint needs about {_size(needed)}): {_kept(save_folder)}. Fix: free space (or set save_folder "
            f"to a bigger disk / lower save_num_checkpoints_to_keep), then run the same command again with "
            f"autoresume: true to continue from the latest checkpoint (the one cut short is set aside)")


def unwritable_save(e: BaseException, save_folder: str | None) -> OSError | None:
    """The error of a checkpoint write refused by the file system under the local ``save_folder`` (it turned
    read-only, or lost its permissions, during the run), or None."""
    if not save_folder or is_remote(save_folder):
        return None
    here = os.path.realpath(save_folder)
    for x in exception_chain(e):
        if (isinstance(x, OSError) and x.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and x.filename
                and os.path.realpath(str(x.filename)).startswith(here + os.sep)):
            return x
    return None


def unwritable_message(save_folder: str, e: OSError) -> str:
    why = "is read-only now" if e.errno == errno.EROFS else "refuses new files now"
    return (f"cannot write checkpoint {e.filename}: save_folder {save_folder} {why} ({e.strerror}; it was "
            f"writable when the run started): {_kept(save_folder)}. Fix: make {save_folder} writable again (e.g. "
            f"remount it read-write), or copy its checkpoints to a writable folder and point save_folder there; "
            f"then run the same command with autoresume: true to continue from the latest checkpoint")


_COMPRESSED = (".lz4", ".zst", ".gz", ".bz2", ".xz", ".lzma", ".lzo")  # composer's compressed checkpoint names


def load_path_problem(path: str) -> str | None:
    """Why a local ``load_path`` cannot be a composer checkpoint, with the fix; None when it can be (a sharded
    folder with ``.metadata``, or a file that starts like a torch archive). Reads a few bytes, never the tensors."""
    import zipfile
    where = f"load_path = {path!r}"
    if os.path.isdir(path):
        from llmfoundry.checkpoint import folder_checkpoint_problem, is_hf_dir
        if is_hf_dir(path):  # pretrained weights to start from: train/pretrained.py checks and converts them
            import json
            try:
                with open(os.path.join(path, "config.json")) as f:
                    model_type = json.load(f).get("model_type")
            except (OSError, ValueError, AttributeError) as e:
                return f"{where}: its config.json cannot be read ({e})"
            if model_type != "mpt":
                return (f"{where} is a Hugging Face folder of model_type {model_type!r}: only MPT folders "
                        f"(model_type 'mpt', as save_pretrained and convert_composer_to_hf.py write them) can start "
                        f"a run here")
            return None
        hf_fix = (f"convert it first (python scripts/convert_hf_to_composer.py {path} init.pt) and set "
                  "load_path=init.pt load_weights_only=true")
        problem = folder_checkpoint_problem(path, hf_fix=hf_fix)
        return f"{where} {problem}" if problem else None
    if os.path.isfile(path) and not path.endswith(_COMPRESSED) and not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"  # torch's pre-zip format is a pickle stream
        if not legacy:
            return (f"{where} is not a composer checkpoint file (not a torch archive: a truncated copy, or "
                    f"another kind of file); pass a .pt checkpoint written by the trainer")
    return None


def checkpoint_param_shapes(path: str) -> dict[str, tuple] | None:
    """Model parameter shapes stored in a local composer checkpoint (whole ``.pt`` file or sharded folder), read
    without loading the tensors; None when ``path`` is not a local checkpoint."""
    import torch
    if os.path.isdir(path):  # sharded: torch.distributed.checkpoint folder, shapes are in .metadata
        from torch.distributed.checkpoint import FileSystemReader
        try:
            meta = FileSystemReader(path).read_metadata()
        except Exception:  # noqa: BLE001 - not a DCP folder
            return None
        prefix = "state.model."
        return {k[len(prefix):]: tuple(v.size) for k, v in meta.state_dict_metadata.items()
                if k.startswith(prefix) and hasattr(v, "size")}
    if os.path.isfile(path):
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception:  # noqa: BLE001 - unreadable here; composer reports it
            return None
        model = (state.get("state") or {}).get("model") or {}
        return {k: tuple(v.shape) for k, v in model.items() if hasattr(v, "shape")}
    return None


def shape_problem(checkpoint_shapes: dict[str, tuple], model_shapes: dict[str, tuple]) -> str | None:
    """The first difference between a checkpoint's parameters and the model's, in words; None if they match."""
    for k, shape in model_shapes.items():
        if k in checkpoint_shapes and tuple(checkpoint_shapes[k]) != tuple(shape):
            return (f"parameter '{k}' has shape {list(checkpoint_shapes[k])} in the checkpoint but {list(shape)} "
                    f"in this model")
    missing = [k for k in model_shapes if k not in checkpoint_shapes]
    unexpected = [k for k in checkpoint_shapes if k not in model_shapes]
    if missing:
        return (f"{len(missing)} parameters of this model are not in the checkpoint, e.g. '{missing[0]}'")
    if unexpected:
        return (f"{len(unexpected)} parameters in the checkpoint do not exist in this model, e.g. '{unexpected[0]}'")
    return None


def mismatch_message(checkpoint: str, detail: str, model_desc: str) -> str:
    return (f"checkpoint {checkpoint} does not fit this model ({model_desc}): {detail}. Fix: load a checkpoint "
            f"saved with the same model.* settings, or change model.* to the shape it was trained with "
            f"(and use a new save_folder/run_name when starting a different model)")


def _unreadable(e: BaseException) -> bool:
    import pickle
    signs = ("PytorchStreamReader failed", "failed finding central directory", "pickle data was truncated",
             "Ran out of input")
    return isinstance(e, (EOFError, pickle.UnpicklingError)) or any(s in str(e) for s in signs)


def is_unreadable_checkpoint(e: BaseException) -> bool:
    """Whether loading failed because the checkpoint file itself is truncated or corrupt."""
    return any(_unreadable(c) for c in exception_chain(e))


def _continue_from_earlier(path: str) -> str:
    """The fix for a checkpoint (file, or sharded folder) that cannot be read: the commands that continue from the
    newest checkpoint of the same kind before it."""
    import re
    folder, name = os.path.split(path)
    batch = re.compile(r"^ep\d+-ba(\d+)$" if os.path.isdir(path) else r"^ep\d+-ba(\d+)-rank0\.pt$")
    this = int(batch.match(name).group(1)) if batch.match(name) else None
    earlier = sorted((f for f in os.listdir(folder) if batch.match(f) and f != name
                      and (this is None or int(batch.match(f).group(1)) < this)),
                     key=lambda f: int(batch.match(f).group(1)))
    latest = os.path.join(folder, "latest-rank0.pt")
    autoresumed = os.path.islink(latest) and os.path.realpath(latest) == os.path.realpath(path)
    if earlier and autoresumed:
        return (f"move it aside and point latest-rank0.pt at the newest checkpoint before it, then run the same "
                f"command again: mv {path} {path}.bad && ln -sfn {earlier[-1]} {latest}")
    if earlier:
        return f"set load_path to an earlier checkpoint, e.g. {os.path.join(folder, earlier[-1])}"
    return (f"move it aside (mv {path} {path}.bad) and run the same command again to start the run over, or "
            f"set load_path to another checkpoint")


def unreadable_checkpoint_message(path: str, e: BaseException) -> str:
    """Which checkpoint file cannot be read, and how to continue from the newest good one before it."""
    cause = next((c for c in exception_chain(e) if _unreadable(c)), e)
    detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return (f"checkpoint {path} cannot be read ({type(cause).__name__}: {detail}): it is truncated or corrupt, "
            f"e.g. written while the disk filled up or the machine went down. Fix: {_continue_from_earlier(path)}")


def incomplete_checkpoint_message(path: str, why: str) -> str:
    """A sharded checkpoint folder with a file missing or short (``checkpoint.sharded_checkpoint_problem``)."""
    return (f"checkpoint {path} is not complete ({why}): some of its data was lost after it was saved, e.g. a "
            f"rank's file deleted or cut short by a copy. Fix: {_continue_from_earlier(path)}")


def is_shape_mismatch(e: BaseException) -> bool:
    text = str(e)
    return any(s in text for s in ("size mismatch", "Size mismatch", "Missing key(s)", "Unexpected key(s)",
                                   "shape mismatch", "Missing key", "Unexpected key"))


def shape_mismatch_message(e: BaseException, checkpoint: str, model_desc: str) -> str:
    """Which parameter/shape did not fit, which checkpoint, and the fix."""
    import re
    text = str(e)
    m = re.search(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\)) from "
                  r"checkpoint, the shape in current model is (torch\.Size\(\[[\d, ]*\]\))", text)
    if m:
        detail = f"parameter '{m.group(1)}' has shape {m.group(2)} in the checkpoint but {m.group(3)} in this model"
    else:
        m = re.search(r"Missing key\(s\) in state_dict: ([^\n]+)", text) or \
            re.search(r"Unexpected key\(s\) in state_dict: ([^\n]+)", text)
        if m:
            kind = "missing from" if "Missing" in m.group(0) else "unexpected in"
            keys = m.group(1)
            detail = f"parameters {kind} the checkpoint: {keys[:300]}{'...' if len(keys) > 300 else ''}"
        else:
            detail = next((ln.strip() for ln in text.splitlines() if "ize mismatch" in ln or "shape" in ln),
                          text.strip().splitlines()[0] if text.strip() else type(e).__name__)
    return mismatch_message(checkpoint, detail, model_desc)
