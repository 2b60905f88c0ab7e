"""The text dataloader: MDS shards (pre-tokenized or raw text) -> batches for causal-LM training.

YAML (`train_loader:` / `eval_loader:`) is read into `TextLoaderConfig`; `build_text_dataloader` returns a
`streaming.StreamingDataLoader` whose batches are

    {'input_ids': LongTensor (B, S), 'labels': LongTensor (B, S), 'sequence_id': LongTensor (B, S)}

with B the device batch size and S = `max_seq_len` (+ 'attention_mask' when a stream holds raw text, below).

Each stream's column is read from its index.json (`column_names` / `column_encodings`), per shard:

* `tokens` (`ndarray:int32`; the converters' packed samples, `--concat_tokens N`): longer samples are truncated
  to their first S tokens; shorter ones are an error naming the stream (packed data is fixed-length).
* `text` (`str`; one document per sample, as the converters' `--no_tokenize` and llm-foundry's converters
  without `--concat_tokens` write): tokenized while loading with the run's tokenizer (the special tokens it
  adds itself, e.g. a BOS for some; nothing else is appended), cut to its first S tokens, and right-padded to S
  with the tokenizer's pad token (else EOS). Padding has label -100 and attention_mask 0; so one sample is one
  document, as in llm-foundry's text dataset without concatenation.
* A shard with both columns is read as `tokens`; one with neither is an error naming the stream, its columns
  and the fix. Streams of both kinds mix in one loader (rows of either kind in any batch).

* `labels` equal `input_ids` (except -100 on padding); the model shifts them (position i is trained to predict
  labels[i + 1]). No other label is masked, so in packed samples the token after an EOS is predicted from the
  previous document, as in plain concatenated-document pretraining.
* `attention_mask` (1 on real tokens, 0 on padding) is present in every batch of a loader with a `text` stream,
  and absent otherwise (packed rows have no padding). Padding only ever follows a row's real tokens.
* `sequence_id` is present only when `eos_token_id` is given (pass it when the model's attention uses
  sequence ids). Convention: ids count documents from 0 within each row; the token right after an EOS
  starts a new document; the EOS itself belongs to the document it ends. For
  `[a, b, EOS, c, EOS, EOS, d]` the ids are `[0, 0, 0, 1, 1, 2, 3]`. A padded row's padding takes the id
  after its last real token's (padding EOS tokens start no documents).
* Every rank calls the builder (streaming reads RANK / WORLD_SIZE / LOCAL_WORLD_SIZE from the environment)
  and gets a disjoint share of each global batch.
* Resumption: `loader.state_dict()` (or composer's `dataset.state_dict(samples_seen, True)`) and
  `load_state_dict` on a freshly built loader continue at the exact next sample (text streams too: a sample's
  tokens depend only on the sample and the tokenizer). The global sample order
  depends neither on `num_workers` nor on the number of ranks per node: resuming with another world size
  and the same global batch (device batch x ranks) continues the same sequence, sample j of each global
  batch going to rank j % world_size. `num_canonical_nodes` is stored in the state; to also change the
  number of nodes, set it to a multiple of every node count you will use.
* A curriculum (`curriculum`: the mixture changes at given points of the run) is curriculum.py's: each phase is
  drawn as one or more of the dataset's epochs, and the position saved as above resumes it exactly.
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import shutil
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.dataset import TICK, _ShardState
from streaming.base.shared import SharedMemory
from streaming.base.shared.prefix import _get_path
from streaming.base.world import World

from llmfoundry.data import curriculum
from llmfoundry.data.curriculum import CurriculumPoint
from llmfoundry.data.streams import StreamConfig, StreamError, build_streams

__all__ = ["StreamConfig", "TextLoaderConfig", "StreamError", "MDSDataset", "TextStreamingDataset", "TextCollator",
           "sequence_ids", "build_text_dataloader", "read_mds_samples"]

IGNORE_INDEX = -100  # the label of padding: the loss skips it
log = logging.getLogger(__name__)


@dataclass
class TextLoaderConfig:
    """Text dataloader settings (YAML `train_loader:` / `eval_loader:`); device batch size comes from the trainer.

    Sources: either `streams` (name -> StreamConfig, a mixture) or one top-level `remote` and/or `local`.
    `split`: subdirectory of every source (e.g. 'train', 'val'), unless a stream sets its own ('' = none).
    `epoch_size`: samples per epoch when streams are weighted by proportion (default: all samples).
    `curriculum` (training loader): points of the run where the mixture changes, each {at, proportions}:
        `at` a fraction of max_duration (0 <= at < 1) or 'Nba' / 'Nsp' / 'Ntok'; `proportions` every stream's
        share from there on (data/curriculum.py). With it, a phase longer than `epoch_size` is drawn as several
        epochs of that size, and max_duration is in batches, samples or tokens.
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
    curriculum: list[CurriculumPoint] | None = None
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
        if self.curriculum is not None:
            curriculum.check_points(self.curriculum, list(self.named_streams()))

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


TOKENS, TEXT = "tokens", "text"  # the columns a pretraining stream may hold
FINETUNE_COLUMNS = ("prompt", "response", "messages")


class MDSDataset(StreamingDataset):
    """`StreamingDataset` with clear errors: a failed download or a missing shard stops every worker with one
    message naming the stream and shard; `read(sample_id)` returns the sample's columns."""

    def __init__(self, **kwargs):
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
        self._event = _SharedFailure(_get_path(self._shm_prefix_int, "llmf_failure"))

    def shard_columns(self, shard_id: int) -> dict[str, str]:
        """{column name: MDS encoding} of one shard, as its stream's index.json lists them."""
        shard = self.shards[shard_id]
        return dict(zip(getattr(shard, "column_names", []), getattr(shard, "column_encodings", [])))

    def stream_of_shard(self, shard_id: int):
        return self.streams[self.stream_per_shard[shard_id]]

    def _stream_of(self, sample_id: int):
        shard_id, index_in_shard = self.spanner[sample_id]
        return self.stream_of_shard(shard_id), shard_id, index_in_shard

    def _sample_name(self, sample_id: int) -> str:
        """"stream '...' (...): sample i of shard shard.NNNNN.mds", for messages."""
        stream, shard_id, index_in_shard = self._stream_of(sample_id)
        shard = self.shards[shard_id].file_pairs[0][0].basename
        return f"{stream.describe()}: sample {index_in_shard} of shard {shard}"

    def read(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        """The sample's columns; a failure is a `StreamError` naming the stream and shard (for every worker)."""
        if self._event.is_set():
            raise self._event.error()
        try:
            return super().get_item(sample_id, retry)
        except Exception as e:
            stream, shard_id, _ = self._stream_of(sample_id)
            message = str(e) if isinstance(e, StreamError) else \
                f"{stream.describe()}, shard {self.shards[shard_id].file_pairs[0][0].basename}: {e}"
            self._event.set(message)
            raise StreamError(message) from e

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        return self.read(sample_id, retry)

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


def column_kind(columns: dict[str, str]) -> str | None:
    """'tokens' (packed token samples), 'text' (raw text, tokenized while loading) or None (neither)."""
    if columns.get(TOKENS, "").startswith("ndarray"):
        return TOKENS
    if columns.get(TEXT) == "str":
        return TEXT
    return None


def no_column_message(where: str, columns: dict[str, str]) -> str:
    """The error for a pretraining stream whose shards have neither column: what it has, and the fix."""
    found = ", ".join(f"{n}: {e}" for n, e in columns.items())
    hint = ""
    if TOKENS in columns:
        hint = (f" Its 'tokens' column is '{columns[TOKENS]}' (an older llm-foundry encoding); the loader reads "
                f"'ndarray:int32'.")
    elif any(c in columns for c in FINETUNE_COLUMNS):
        hint = (" These look like finetuning examples: read them with train_loader.name: finetune and this folder "
                "as its remote/local.")
    return (f"{where}: its shards have neither a 'tokens' column (ndarray:int32: packed token samples) nor a 'text' "
            f"column (str: one document per sample, tokenized while loading); found {{{found}}}.{hint} Fix: convert "
            f"the corpus with data_prep/convert_dataset_json.py (or convert_dataset_hf.py, convert_dataset_parquet.py, "
            f"convert_text_to_mds.py): --concat_tokens N writes 'tokens', --no_tokenize writes 'text'.")


class TextStreamingDataset(MDSDataset):
    """Yields each sample's tokens as an int32 array: a packed `tokens` sample's first `max_seq_len`, or a `text`
    sample tokenized and cut to at most `max_seq_len` (the collator pads it). Clear errors otherwise."""

    def __init__(self, *, max_seq_len: int, vocab_size: int | None = None, tokenizer=None, **kwargs):
        super().__init__(**kwargs)
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self._warned_truncation: set[int] = set()  # streams already warned about
        self.curriculum_schedule: curriculum.Schedule | None = None  # set by use_curriculum
        try:
            self.text_shards = self._check_columns()
        except BaseException:  # free this dataset's shared memory now (it would keep its local dir registered)
            _own(self, [], None)
            _release(id(self))
            raise

    def _check_columns(self) -> np.ndarray:
        """Per shard: whether it holds raw text (else packed tokens). Errors name the stream and the fix."""
        is_text = np.zeros(len(self.shards), dtype=bool)
        for shard_id in range(len(self.shards)):
            columns = self.shard_columns(shard_id)
            kind = column_kind(columns)
            stream = self.stream_of_shard(shard_id)
            if kind is None:
                raise StreamError(no_column_message(stream.describe(), columns))
            if kind == TEXT and self.tokenizer is None:
                raise StreamError(
                    f"{stream.describe()}: its shards hold raw text (column 'text'), which is tokenized while "
                    f"loading, but no tokenizer was given. Fix: pass tokenizer= to build_text_dataloader (the "
                    f"run's tokenizer; scripts/train.py passes it), or convert the corpus to packed tokens "
                    f"(data_prep/convert_*.py --concat_tokens N).")
            is_text[shard_id] = kind == TEXT
        return is_text

    @property
    def has_text(self) -> bool:
        return bool(self.text_shards.any())

    def use_curriculum(self, phases: list[curriculum.Phase]) -> None:
        """Draw each epoch as the curriculum's phases say (call before the loader is first iterated)."""
        global_batch = self.batch_size * self._parallel_rank_world.num_ranks
        self.curriculum_schedule = curriculum.build_schedule(
            phases, [s.name for s in self.streams], [s.proportion for s in self.streams], self.epoch_size,
            global_batch)

    def _get_work(self, epoch: int, sample_in_epoch: int) -> np.ndarray:
        if self.curriculum_schedule is not None:  # this epoch's mixture and size, in every worker
            curriculum.apply_epoch(self, self.curriculum_schedule, epoch)
        return super()._get_work(epoch, sample_in_epoch)

    def __len__(self) -> int:
        if self.curriculum_schedule is not None:  # composer then iterates each epoch to its end
            raise TypeError("a dataset with a curriculum has no fixed length: its epochs differ in size")
        return super().__len__()

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        state = super().state_dict(num_samples, from_beginning)
        if self.curriculum_schedule is not None:
            state["curriculum"] = self.curriculum_schedule.signature()
        return state

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        mine = self.curriculum_schedule.signature() if self.curriculum_schedule is not None else None
        if obj.get("curriculum") != mine:
            saved = "with another curriculum plan" if obj.get("curriculum") else "without a curriculum"
            log.warning("resuming a loader position saved %s (the curriculum's points or proportions, max_duration, "
                        "global_train_batch_size or max_seq_len changed): the run continues at epoch %s, sample %s "
                        "of this plan, not the sequence the checkpoint's run would have drawn", saved,
                        obj.get("epoch"), obj.get("sample_in_epoch"))
        elif mine and obj.get("sample_in_epoch") == self.curriculum_schedule.at_epoch(obj.get("epoch", 0))[0]:
            # saved exactly at a change of mixture: composer resumes in the epoch that just ended, gets no batch from
            # it (and would warn so), then goes on to the next epoch's mixture
            warnings.filterwarnings("ignore", message="No batches were trained for global rank")
        super().load_state_dict(obj)

    def get_item(self, sample_id: int, retry: int = 7) -> np.ndarray:
        sample = self.read(sample_id, retry)
        shard_id, _ = self.spanner[sample_id]
        if self.text_shards[shard_id]:
            tokens = self._tokenize(sample[TEXT], sample_id)
        else:
            tokens = self._packed(sample[TOKENS], sample_id)
        if self.vocab_size is not None and len(tokens):
            self._check_ids(tokens, sample_id)
        return tokens

    def _packed(self, tokens: np.ndarray, sample_id: int) -> np.ndarray:
        if len(tokens) < self.max_seq_len:
            raise StreamError(
                f"{self._sample_name(sample_id)} has {len(tokens)} tokens, fewer than max_seq_len={self.max_seq_len}. "
                f"The loader reads fixed-length packed samples and does not pad. Fix: lower max_seq_len to at most "
                f"the converter's concat_tokens, or re-convert this source with concat_tokens >= {self.max_seq_len}.")
        if len(tokens) > self.max_seq_len:
            self._warn_truncation(sample_id, f"samples have {len(tokens)} tokens; using the first "
                                             f"max_seq_len={self.max_seq_len} of each (the rest is dropped)")
        return tokens[: self.max_seq_len]  # int32 view; the collator converts the whole batch at once

    def _tokenize(self, text: str, sample_id: int) -> np.ndarray:
        ids = self.tokenizer(text, verbose=False)["input_ids"]
        if len(ids) > self.max_seq_len:
            self._warn_truncation(sample_id, f"text samples longer than max_seq_len={self.max_seq_len} tokens are "
                                             f"cut there (the rest of the document is dropped; packed 'tokens' "
                                             f"samples, --concat_tokens, keep every token)")
        return np.asarray(ids[: self.max_seq_len], dtype=np.int32)

    def _warn_truncation(self, sample_id: int, what: str) -> None:
        stream, _, _ = self._stream_of(sample_id)
        key = self.stream_per_shard[self.spanner[sample_id][0]]
        if key not in self._warned_truncation:
            self._warned_truncation.add(key)
            warnings.warn(f"{stream.describe()}: {what}")

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


def sequence_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Document index of each token: starts at 0 per row, +1 after every EOS (the EOS ends its document)."""
    is_eos = (input_ids == eos_token_id).long()
    return torch.cumsum(is_eos, dim=-1) - is_eos


@dataclass
class TextCollator:
    """Stacks samples into {'input_ids', 'labels'} (+ 'sequence_id' when eos_token_id is set).

    With `pad_token_id` set (a loader with a text stream), rows shorter than `max_seq_len` are right-padded:
    input_ids `pad_token_id`, labels -100, 'attention_mask' 0, sequence_id one past the row's last real token's.
    """
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    max_seq_len: int | None = None

    def __call__(self, samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
        if self.pad_token_id is None:
            input_ids = torch.from_numpy(np.stack(samples)).long()
            batch = {"input_ids": input_ids, "labels": input_ids.clone()}
            if self.eos_token_id is not None:
                batch["sequence_id"] = sequence_ids(input_ids, self.eos_token_id)
            return batch
        return self._padded(samples)

    def _padded(self, samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
        b, s = len(samples), self.max_seq_len
        input_ids = torch.full((b, s), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, s), dtype=torch.long)
        for i, tokens in enumerate(samples):
            n = len(tokens)
            input_ids[i, :n] = labels[i, :n] = torch.from_numpy(tokens.astype(np.int64))
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if self.eos_token_id is not None:
            seq = sequence_ids(input_ids, self.eos_token_id)
            for i, tokens in enumerate(samples):
                n = len(tokens)
                seq[i, n:] = int(seq[i, n - 1]) + 1 if n else 0
            batch["sequence_id"] = seq
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


def _own(dataset: MDSDataset, auto_dirs: list[str], loader: StreamingDataLoader | None) -> None:
    shms = [dataset._locals_shm, dataset._shared_barrier._arr.shm, dataset._next_epoch.arr.shm,
            dataset._cache_usage.arr.shm, dataset._shard_states.shm, dataset._shard_access_times.shm,
            dataset._event.shm]
    dirs = auto_dirs if World.detect().is_local_leader else []
    _owned[id(dataset)] = _Owned(os.getpid(), shms, dirs, weakref.ref(loader) if loader is not None else None)
    weakref.finalize(dataset, _release, id(dataset))
    if loader is not None:  # a loader dropped mid-epoch: stop the dataset's prefetch threads, which hold it alive
        weakref.finalize(loader, _stop_iteration, weakref.ref(dataset))


def _stop_iteration(dataset_ref) -> None:
    dataset = dataset_ref()
    iterator = getattr(dataset, "_iterator", None) if dataset is not None else None
    if iterator is not None:
        iterator.non_blocking_exit()


def _remove_dirs(auto_dirs: list[str]) -> None:
    if World.detect().is_local_leader:
        for d in auto_dirs:
            shutil.rmtree(d, ignore_errors=True)


def _pad_id(tokenizer) -> int:
    """The id that pads text rows: the tokenizer's pad token, else its EOS, else 0 (labels mask it anyway)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def build_text_dataloader(cfg: TextLoaderConfig, device_batch_size: int, eos_token_id: int | None = None,
                          vocab_size: int | None = None, tokenizer=None,
                          max_duration: str | None = None) -> StreamingDataLoader:
    """Build the loader for one rank. `device_batch_size`: samples per batch on this rank.

    `eos_token_id`: when given, batches carry 'sequence_id' (see the module docstring for the convention).
    `vocab_size`: when given, a sample holding a token id outside [0, vocab_size) is a `StreamError` naming its
    stream and shard (an embedding lookup would fail on it with a bare index error, or a device assert on GPU).
    `tokenizer` (a Hugging Face tokenizer, or a name for `load_tokenizer`): tokenizes the streams whose shards
    hold raw text (column 'text'); needed only for those.
    `max_duration` (composer's, e.g. '10000ba'): the run's length, needed with a `curriculum` (its points).
    """
    if device_batch_size < 1:
        raise ValueError(f"device_batch_size must be >= 1, got {device_batch_size}")
    if isinstance(tokenizer, str):
        from llmfoundry.data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer)
    phases = None
    if cfg.curriculum:
        if max_duration is None:
            raise ValueError("a loader with a curriculum needs the run's max_duration (its points are placed in it): "
                             "pass max_duration= to build_text_dataloader")
        phases = curriculum.plan_phases(cfg.curriculum, max_duration, device_batch_size * World.detect().num_ranks,
                                        cfg.max_seq_len)
    gc.collect()  # frees loaders of earlier runs in this process, releasing their local-dir registrations
    streams, auto_dirs = build_streams(cfg.named_streams(), default_split=cfg.split,
                                       download_retry=cfg.download_retry, download_timeout=cfg.download_timeout,
                                       s3_endpoint_url=cfg.s3_endpoint_url)
    try:
        dataset = TextStreamingDataset(
            # each stream carries its own split (resolved by build_streams; '' = none); a dataset-wide split
            # would replace a stream's '' (streaming treats '' as unset)
            max_seq_len=cfg.max_seq_len, vocab_size=vocab_size, tokenizer=tokenizer, streams=streams, split=None,
            epoch_size=cfg.epoch_size,
            batch_size=device_batch_size, shuffle=cfg.shuffle, shuffle_algo=cfg.shuffle_algo,
            shuffle_seed=cfg.shuffle_seed, shuffle_block_size=cfg.shuffle_block_size,
            num_canonical_nodes=cfg.num_canonical_nodes, predownload=cfg.predownload,
            download_retry=cfg.download_retry, download_timeout=cfg.download_timeout, cache_limit=cfg.cache_limit)
    except BaseException:
        _remove_dirs(auto_dirs)
        raise
    if phases is not None:
        dataset.use_curriculum(phases)
        if World.detect().rank == 0:
            log.info("curriculum: %s", curriculum.describe(phases))
    workers = cfg.num_workers > 0
    pad = _pad_id(tokenizer) if dataset.has_text else None
    loader = StreamingDataLoader(
        dataset, batch_size=device_batch_size, collate_fn=TextCollator(eos_token_id, pad, cfg.max_seq_len),
        num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=cfg.persistent_workers and workers, drop_last=cfg.drop_last,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        # its own generator: starting an epoch's iterator draws a seed from it, not from torch's global RNG, which
        # a resumed run has just restored (dropout masks then match an uninterrupted run's)
        generator=torch.Generator().manual_seed(cfg.shuffle_seed))
    _own(dataset, auto_dirs, loader)
    return loader


def read_mds_samples(named: dict[str, StreamConfig], *, split: str | None, download_retry: int,
                     download_timeout: float, s3_endpoint_url: str | None,
                     check_columns=None) -> Iterator[tuple[dict[str, Any], str]]:
    """Every sample of the streams, in order (stream by stream, each in index order), as (columns, where) with
    `where` = "stream 'name' (path): sample i of shard shard.NNNNN.mds" for messages. Every rank reads them all
    (local ranks share the download cache; its temporary folder is removed once every rank has read it).

    `check_columns(where, {column: encoding})`, when given, is called for each shard before any sample is read.
    """
    gc.collect()
    streams, auto_dirs = build_streams(named, default_split=split, download_retry=download_retry,
                                       download_timeout=download_timeout, s3_endpoint_url=s3_endpoint_url)
    try:
        dataset = MDSDataset(streams=streams, split=None, shuffle=False, batch_size=1,
                             download_retry=download_retry, download_timeout=download_timeout)
    except BaseException:
        _remove_dirs(auto_dirs)
        raise
    _own(dataset, auto_dirs, None)
    try:
        for shard_id in range(len(dataset.shards)) if check_columns else ():
            check_columns(dataset.stream_of_shard(shard_id).describe(), dataset.shard_columns(shard_id))
        for sample_id in range(dataset.num_samples):
            yield dataset.read(sample_id), dataset._sample_name(sample_id)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no local leader removes the shared cache while another rank reads it
        _release(id(dataset))
