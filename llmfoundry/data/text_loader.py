"""The text dataloader: pre-tokenized MDS shards -> batches for causal-LM training.

YAML (`train_loader:` / `eval_loader:`) is read into `TextLoaderConfig`; `build_text_dataloader` returns a
`streaming.StreamingDataLoader` whose batches are

    {'input_ids': LongTensor (B, S), 'labels': LongTensor (B, S), 'sequence_id': LongTensor (B, S)}

with B the device batch size and S = `max_seq_len`.

* Samples are read from the `tokens` column (`ndarray:int32`). Longer samples are truncated to their first
  S tokens; shorter ones are an error naming the stream (packed data is fixed-length, nothing is padded).
* `labels` equal `input_ids`; the model shifts them (position i is trained to predict labels[i + 1]).
  No label is masked, so the token after an EOS is predicted from the previous document, as in plain
  concatenated-document pretraining.
* `sequence_id` is present only when `eos_token_id` is given (pass it when the model's attention uses
  sequence ids). Convention: ids count documents from 0 within each row; the token right after an EOS
  starts a new document; the EOS itself belongs to the document it ends. For
  `[a, b, EOS, c, EOS, EOS, d]` the ids are `[0, 0, 0, 1, 1, 2, 3]`.
* Every rank calls the builder (streaming reads RANK / WORLD_SIZE / LOCAL_WORLD_SIZE from the environment)
  and gets a disjoint share of each global batch.
* Resumption: `loader.state_dict()` (or composer's `dataset.state_dict(samples_seen, True)`) and
  `load_state_dict` on a freshly built loader continue at the exact next sample. The global sample order
  depends neither on `num_workers` nor on the number of ranks per node: resuming with another world size
  and the same global batch (device batch x ranks) continues the same sequence, sample j of each global
  batch going to rank j % world_size. `num_canonical_nodes` is stored in the state; to also change the
  number of nodes, set it to a multiple of every node count you will use.
"""
from __future__ import annotations

import atexit
import gc
import os
import shutil
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.dataset import TICK, _ShardState
from streaming.base.shared import SharedMemory
from streaming.base.shared.prefix import _get_path
from streaming.base.world import World

from llmfoundry.data.streams import StreamConfig, StreamError, build_streams

__all__ = ["StreamConfig", "TextLoaderConfig", "StreamError", "TextStreamingDataset", "TextCollator",
           "sequence_ids", "build_text_dataloader"]


@dataclass
class TextLoaderConfig:
    """Text dataloader settings (YAML `train_loader:` / `eval_loader:`); device batch size comes from the trainer.

    Sources: either `streams` (name -> StreamConfig, a mixture) or one top-level `remote` and/or `local`.
    `split`: subdirectory of every source (e.g. 'train', 'val'), unless a stream sets its own ('' = none).
    `epoch_size`: samples per epoch when streams are weighted by proportion (default: all samples).
    Shuffling (streaming semantics): `shuffle`, `shuffle_algo`, `shuffle_seed`, `shuffle_block_size`.
    `num_canonical_nodes`: fixes the sample order independently of the number of nodes (default: streaming's,
        the initial number of nodes for py1e; a resumed run takes it from the checkpoint).
    Downloads: `predownload` (samples per worker fetched ahead; default 8 x batch), `download_retry` (total
        attempts per file, >= 1), `download_timeout` (seconds per attempt, also the S3 connect timeout),
        `cache_limit` (bytes or '10gb'; least recently used shards are evicted above it),
        `s3_endpoint_url` (for s3:// remotes; default: the S3_ENDPOINT_URL environment variable).
    torch DataLoader: `num_workers`, `prefetch_factor`, `pin_memory` (only applied when CUDA is available),
        `persistent_workers`, `drop_last`.
    """
    max_seq_len: int
    streams: dict[str, StreamConfig] | None = None
    remote: str | None = None
    local: str | None = None
    split: str | None = None
    epoch_size: int | None = None
    shuffle: bool = True
    shuffle_algo: Literal["py1e", "py1br", "py1b", "py1s", "py2s", "naive"] = "py1e"
    shuffle_seed: int = 9176
    shuffle_block_size: int | None = None
    num_canonical_nodes: int | None = None
    predownload: int | None = None
    download_retry: int = 2
    download_timeout: float = 60.0
    cache_limit: int | str | None = None
    s3_endpoint_url: str | None = None
    num_workers: int = 2
    prefetch_factor: int | None = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    drop_last: bool = True

    def __post_init__(self):
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.streams is not None and (self.remote or self.local):
            raise ValueError("set either 'streams' or a top-level 'remote'/'local', not both "
                             "(move the top-level source into 'streams' as one more entry)")
        if self.streams is None and not (self.remote or self.local):
            raise ValueError("no data source: set 'streams' (a mapping name -> {remote, local, proportion, ...}) "
                             "or a top-level 'remote' and/or 'local'")
        if self.streams is not None:
            if not self.streams:
                raise ValueError("'streams' is empty: give at least one stream")
            with_prop = [n for n, s in self.streams.items() if s.proportion is not None]
            if with_prop and len(with_prop) != len(self.streams):
                missing = [n for n in self.streams if n not in with_prop]
                raise ValueError(f"streams {with_prop} set 'proportion' but {missing} do not: proportions are "
                                 f"relative, so either every stream sets one or none does")
        for name, low in [("download_retry", 1), ("num_workers", 0), ("shuffle_seed", 0)]:
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ["predownload", "prefetch_factor", "shuffle_block_size", "num_canonical_nodes", "epoch_size"]:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or null for the default), got {getattr(self, name)}")
        if self.download_timeout <= 0:
            raise ValueError(f"download_timeout must be > 0 seconds, got {self.download_timeout}")

    def named_streams(self) -> dict[str, StreamConfig]:
        if self.streams is not None:
            return self.streams
        return {"default": StreamConfig(remote=self.remote, local=self.local)}


class _SharedFailure:
    """The first data-loading error, shared by all workers and local ranks of one dataset.

    Stands in for streaming's per-process `threading.Event` (`is_set` / `set`): streaming's threads stop as
    soon as it is set, so a download failure in one worker stops the others too instead of leaving them
    waiting forever for a shard that another process failed to fetch.
    """
    SIZE = 4096

    def __init__(self, name: str):
        self.name = name
        self.shm = SharedMemory(name=name, create=None, size=self.SIZE)

    def __getstate__(self):
        return {"name": self.name}

    def __setstate__(self, state):
        self.name = state["name"]
        self.shm = SharedMemory(name=self.name, create=False, size=self.SIZE, auto_cleanup=False)

    def is_set(self) -> bool:
        return self.shm.buf[0] != 0

    def set(self, message: str | None = None) -> None:
        if self.is_set():
            return
        data = (message or "a data-loading thread failed (see the worker's traceback)").encode()[: self.SIZE - 1]
        self.shm.buf[1:1 + len(data)] = data
        self.shm.buf[0] = 1

    def message(self) -> str:
        return bytes(self.shm.buf[1:]).split(b"\0", 1)[0].decode(errors="replace")

    def error(self) -> StreamError:
        return StreamError(f"data loading stopped: {self.message()}")


class TextStreamingDataset(StreamingDataset):
    """`StreamingDataset` yielding the first `max_seq_len` tokens of each sample, with clear errors."""

    def __init__(self, *, max_seq_len: int, vocab_size: int | None = None, **kwargs):
        try:
            super().__init__(**kwargs)
        except ValueError as e:
            if "Reused local directory" not in str(e):
                raise
            raise StreamError(
                f"a local cache directory of this loader is in use by another live StreamingDataset (in this or "
                f"another process on this machine), or registered in shared memory by a run that crashed: {e}. "
                f"Fix: give each loader its own 'local' (or leave 'local' unset to get a fresh temporary one); if "
                f"no other job runs on this machine, clear stale registrations with "
                f"`python -c 'from streaming.base.util import clean_stale_shared_memory as c; c()'`.") from None
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self._warned_truncation = False
        self._check_columns()
        self._event = _SharedFailure(_get_path(self._shm_prefix_int, "llmf_failure"))

    def _check_columns(self) -> None:
        for shard_id, shard in enumerate(self.shards):
            names = list(getattr(shard, "column_names", []))
            encodings = dict(zip(names, getattr(shard, "column_encodings", [])))
            enc = encodings.get("tokens", "")
            if not enc.startswith("ndarray"):
                stream = self.streams[self.stream_per_shard[shard_id]]
                found = ", ".join(f"{n}: {e}" for n, e in encodings.items())
                raise StreamError(
                    f"{stream.describe()}: shards need a column 'tokens' of type 'ndarray:int32', found {{{found}}}. "
                    f"Fix: convert the corpus with llmfoundry's converters (MDSWriter(columns={{'tokens': "
                    f"'ndarray:int32'}}, ...)).")

    def _stream_of(self, sample_id: int):
        shard_id, index_in_shard = self.spanner[sample_id]
        return self.streams[self.stream_per_shard[shard_id]], shard_id, index_in_shard

    def _sample_name(self, sample_id: int) -> str:
        """"stream '...' (...): sample i of shard shard.NNNNN.mds", for messages."""
        stream, shard_id, index_in_shard = self._stream_of(sample_id)
        shard = self.shards[shard_id].file_pairs[0][0].basename
        return f"{stream.describe()}: sample {index_in_shard} of shard {shard}"

    def get_item(self, sample_id: int, retry: int = 7) -> np.ndarray:
        if self._event.is_set():
            raise self._event.error()
        try:
            sample = super().get_item(sample_id, retry)
        except Exception as e:
            stream, shard_id, _ = self._stream_of(sample_id)
            message = str(e) if isinstance(e, StreamError) else \
                f"{stream.describe()}, shard {self.shards[shard_id].file_pairs[0][0].basename}: {e}"
            self._event.set(message)
            raise StreamError(message) from e
        tokens = sample["tokens"]
        if len(tokens) < self.max_seq_len:
            raise StreamError(
                f"{self._sample_name(sample_id)} has {len(tokens)} tokens, fewer than max_seq_len={self.max_seq_len}. "
                f"The loader reads fixed-length packed samples and does not pad. Fix: lower max_seq_len to at most "
                f"the converter's concat_tokens, or re-convert this source with concat_tokens >= {self.max_seq_len}.")
        if len(tokens) > self.max_seq_len and not self._warned_truncation:
            self._warned_truncation = True
            stream, _, _ = self._stream_of(sample_id)
            warnings.warn(f"{stream.describe()}: samples have {len(tokens)} tokens; using the first "
                          f"max_seq_len={self.max_seq_len} of each (the rest is dropped)")
        tokens = tokens[: self.max_seq_len]  # int32 view; the collator converts the whole batch at once
        if self.vocab_size is not None and len(tokens):
            self._check_ids(tokens, sample_id)
        return tokens

    def _check_ids(self, tokens: np.ndarray, sample_id: int) -> None:
        """Token ids must index the model's embedding: [0, vocab_size)."""
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            bad = high if high >= self.vocab_size else low
            raise StreamError(
                f"{self._sample_name(sample_id)} holds token id {bad}, outside the model's vocabulary of "
                f"{self.vocab_size} ids (model.vocab_size): these shards were tokenized with another "
                f"tokenizer than the run's. Fix: re-convert this source with the run's tokenizer, or (if that "
                f"tokenizer is the one you want) set model.vocab_size above {max(bad, 0)} and tokenizer to it.")

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's, except that waiting for a shard that another thread or worker is fetching gives up once a
        download has failed: a failed shard stays 'preparing', and streaming's own wait would never end."""
        super().prepare_shard(shard_id, blocking=False)  # fetches it here when nobody else is
        while blocking and self._shard_states[shard_id] == _ShardState.PREPARING:
            if self._event.is_set():
                raise self._event.error()
            time.sleep(TICK)

    def on_exception(self, future) -> None:
        """Record a failed download/ready thread for every worker (streaming would only log it)."""
        exc = future.exception()
        if exc is not None:
            self._event.set(str(exc) if isinstance(exc, StreamError) else f"{type(exc).__name__}: {exc}")

    def __iter__(self):
        if self._event.is_set():
            raise self._event.error()
        yield from super().__iter__()
        if self._event.is_set():  # streaming ends the epoch quietly when a thread failed; make it loud
            raise self._event.error()

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        _track(self, self._resume_shm)


def sequence_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Document index of each token: starts at 0 per row, +1 after every EOS (the EOS ends its document)."""
    is_eos = (input_ids == eos_token_id).long()
    return torch.cumsum(is_eos, dim=-1) - is_eos


@dataclass
class TextCollator:
    """Stacks samples into {'input_ids', 'labels'} (+ 'sequence_id' when eos_token_id is set)."""
    eos_token_id: int | None = None

    def __call__(self, samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
        input_ids = torch.from_numpy(np.stack(samples)).long()
        batch = {"input_ids": input_ids, "labels": input_ids.clone()}
        if self.eos_token_id is not None:
            batch["sequence_id"] = sequence_ids(input_ids, self.eos_token_id)
        return batch


# --- freeing a dataset's shared memory and temporary cache when it is garbage-collected ---------------------
# streaming keeps every dataset's shared memory until the process exits (atexit). Tests, notebooks and
# train-then-eval runs build several loaders per process, so each dataset releases its own segments when it is
# collected. (streaming.base.util.clean_stale_shared_memory would also unlink the memory of live datasets, in
# this process and in other jobs on the machine, so the loader never calls it.)

@dataclass
class _Owned:
    pid: int  # forked DataLoader workers inherit the finalizer; only the process that built the loader releases
    shms: list = field(default_factory=list)
    dirs: list = field(default_factory=list)
    loader: Any = None  # weakref to the StreamingDataLoader, to stop its workers before removing their cache


_owned: dict[int, _Owned] = {}


def _track(dataset: StreamingDataset, shm) -> None:
    if id(dataset) in _owned and shm not in _owned[id(dataset)].shms:
        _owned[id(dataset)].shms.append(shm)


def _release(key: int) -> None:
    """Unlink a dataset's shared memory and remove its temporary cache (when collected, or at exit)."""
    owned = _owned.pop(key, None)
    if owned is None or owned.pid != os.getpid():
        return
    loader = owned.loader() if owned.loader is not None else None
    if loader is not None and loader._iterator is not None:  # at interpreter exit: stop workers first
        loader._iterator._shutdown_workers()
    for shm in owned.shms:
        atexit.unregister(shm.cleanup)
        try:
            shm.cleanup()  # unlinks segments this process created, closes the others
        except Exception:  # noqa: BLE001 - best effort; nothing to do about a segment already gone
            pass
    for d in owned.dirs:
        shutil.rmtree(d, ignore_errors=True)


def _own(dataset: TextStreamingDataset, auto_dirs: list[str], loader: StreamingDataLoader) -> None:
    shms = [dataset._locals_shm, dataset._shared_barrier._arr.shm, dataset._next_epoch.arr.shm,
            dataset._cache_usage.arr.shm, dataset._shard_states.shm, dataset._shard_access_times.shm,
            dataset._event.shm]
    dirs = auto_dirs if World.detect().is_local_leader else []
    _owned[id(dataset)] = _Owned(os.getpid(), shms, dirs, weakref.ref(loader))
    weakref.finalize(dataset, _release, id(dataset))


def build_text_dataloader(cfg: TextLoaderConfig, device_batch_size: int, eos_token_id: int | None = None,
                          vocab_size: int | None = None) -> StreamingDataLoader:
    """Build the loader for one rank. `device_batch_size`: samples per batch on this rank.

    `eos_token_id`: when given, batches carry 'sequence_id' (see the module docstring for the convention).
    `vocab_size`: when given, a sample holding a token id outside [0, vocab_size) is a `StreamError` naming its
    stream and shard (an embedding lookup would fail on it with a bare index error, or a device assert on GPU).
    """
    if device_batch_size < 1:
        raise ValueError(f"device_batch_size must be >= 1, got {device_batch_size}")
    gc.collect()  # frees loaders of earlier runs in this process, releasing their local-dir registrations
    streams, auto_dirs = build_streams(cfg.named_streams(), default_split=cfg.split,
                                       download_retry=cfg.download_retry, download_timeout=cfg.download_timeout,
                                       s3_endpoint_url=cfg.s3_endpoint_url)
    try:
        dataset = TextStreamingDataset(
            # each stream carries its own split (resolved by build_streams; '' = none); a dataset-wide split
            # would replace a stream's '' (streaming treats '' as unset)
            max_seq_len=cfg.max_seq_len, vocab_size=vocab_size, streams=streams, split=None,
            epoch_size=cfg.epoch_size,
            batch_size=device_batch_size, shuffle=cfg.shuffle, shuffle_algo=cfg.shuffle_algo,
            shuffle_seed=cfg.shuffle_seed, shuffle_block_size=cfg.shuffle_block_size,
            num_canonical_nodes=cfg.num_canonical_nodes, predownload=cfg.predownload,
            download_retry=cfg.download_retry, download_timeout=cfg.download_timeout, cache_limit=cfg.cache_limit)
    except BaseException:
        if World.detect().is_local_leader:
            for d in auto_dirs:
                shutil.rmtree(d, ignore_errors=True)
        raise
    workers = cfg.num_workers > 0
    loader = StreamingDataLoader(
        dataset, batch_size=device_batch_size, collate_fn=TextCollator(eos_token_id),
        num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=cfg.persistent_workers and workers, drop_last=cfg.drop_last,
        pin_memory=cfg.pin_memory and torch.cuda.is_available())
    _own(dataset, auto_dirs, loader)
    return loader
