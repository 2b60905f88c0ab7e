"""Text dataloader over local MDS shards: batches, sequence ids, errors, exact resumption, shared memory."""
from __future__ import annotations

import gc
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import MDSWriter

from llmfoundry.data.text_loader import (StreamError, TextLoaderConfig, build_text_dataloader, sequence_ids)
from llmfoundry.utils.config import ConfigError, from_dict

REPO = Path(__file__).resolve().parents[1]
# the fixtures store 12 tokens per sample and most tests read 8: truncation is intended here
pytestmark = pytest.mark.filterwarnings("ignore:.*using the first max_seq_len")


def write_mds(path, num_samples: int, seq_len: int, marker: int = 1, samples_per_shard: int = 50):
    """Samples [marker, index, index+1, ...] of seq_len int32 tokens, written the way the converters do."""
    size_limit = samples_per_shard * (seq_len * 4 + 4) + 8
    with MDSWriter(out=str(path), columns={"tokens": "ndarray:int32"}, size_limit=size_limit) as w:
        for i in range(num_samples):
            tokens = np.arange(i, i + seq_len, dtype=np.int32)
            tokens[0] = marker
            w.write({"tokens": tokens})
    return str(path)


def sample_keys(batches) -> list[tuple[int, int]]:
    """(marker, index) of every sample, in order."""
    return [(int(row[0]), int(row[1]) - 1) for b in batches for row in b["input_ids"]]


def take(loader, n: int | None = None) -> list:
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:  # stop right after the n-th batch: it counts as consumed
            break
    return out


def make(data, **kw) -> TextLoaderConfig:
    base = {"max_seq_len": 8, "num_workers": 0}
    base.update(kw)
    if "streams" not in base:
        base["local"] = data
    return from_dict(TextLoaderConfig, base)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mds")
    return {"a": write_mds(root / "a", 300, 12, marker=1), "b": write_mds(root / "b", 120, 12, marker=2),
            "short": write_mds(root / "short", 20, 6, marker=3)}


# --- config -----------------------------------------------------------------------------------------------------

def test_config_is_strict(data):
    with pytest.raises(ConfigError, match="did you mean 'shuffle'"):
        from_dict(TextLoaderConfig, {"max_seq_len": 8, "local": data["a"], "shufle": True})
    with pytest.raises(ConfigError, match=r"streams\.a\.remte.*did you mean 'remote'"):
        from_dict(TextLoaderConfig, {"max_seq_len": 8, "streams": {"a": {"remte": "s3://x"}}})
    with pytest.raises(ConfigError, match="not both"):
        from_dict(TextLoaderConfig, {"max_seq_len": 8, "local": data["a"], "streams": {"a": {"local": data["a"]}}})
    with pytest.raises(ConfigError, match="no data source"):
        from_dict(TextLoaderConfig, {"max_seq_len": 8})
    with pytest.raises(ConfigError, match=r"\['a'\] set 'proportion' but \['b'\]"):
        from_dict(TextLoaderConfig, {"max_seq_len": 8, "streams": {"a": {"local": "x", "proportion": 0.5},
                                                                    "b": {"local": "y"}}})
    with pytest.raises(ConfigError, match="download_retry must be >= 1"):
        from_dict(TextLoaderConfig, {"max_seq_len": 8, "local": "x", "download_retry": 0})
    with pytest.raises(ConfigError, match="at most one of proportion/repeat/choose"):
        from_dict(TextLoaderConfig, {"max_seq_len": 8, "streams": {"a": {"local": "x", "repeat": 2, "choose": 5}}})


# --- batches ----------------------------------------------------------------------------------------------------

def test_batches_are_truncated_tokens_with_labels(data):
    loader = build_text_dataloader(make(data["a"], shuffle=False), device_batch_size=4)
    with pytest.warns(UserWarning, match=r"stream 'default'.*12 tokens; using the first max_seq_len=8"):
        batches = take(loader)
    assert len(batches) == 300 // 4
    b = batches[0]
    assert set(b) == {"input_ids", "labels"}  # no eos_token_id -> no sequence_id
    assert b["input_ids"].shape == (4, 8) and b["input_ids"].dtype == torch.long
    assert torch.equal(b["labels"], b["input_ids"]) and b["labels"].data_ptr() != b["input_ids"].data_ptr()
    expected = np.arange(0, 8)
    expected[0] = 1
    assert b["input_ids"][0].tolist() == expected.tolist()  # first 8 of the 12 stored tokens
    assert sorted(k[1] for k in sample_keys(batches)) == list(range(300))  # one epoch = every sample once


def test_sequence_id_convention():
    eos = 0
    x = torch.tensor([[5, 6, eos, 7, eos, eos, 8], [eos, 1, 2, 3, 4, 5, 6]])
    assert sequence_ids(x, eos).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def test_loader_emits_sequence_id_from_eos(data):
    eos = 10  # samples hold [1, i+1, ..., i+7]: token 10 appears once in rows 3..9
    loader = build_text_dataloader(make(data["a"], shuffle=False), device_batch_size=16, eos_token_id=eos)
    b = next(iter(loader))
    assert torch.equal(b["sequence_id"], sequence_ids(b["input_ids"], eos))
    row = b["input_ids"][5].tolist()  # [1, 6, 7, 8, 9, 10, 11, 12]
    assert row[5] == eos and b["sequence_id"][5].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]


# --- errors users hit -------------------------------------------------------------------------------------------

def test_short_samples_error_names_the_stream(data):
    cfg = make(None, max_seq_len=8, streams={"mine": {"local": data["a"]}, "tiny": {"local": data["short"]}})
    with pytest.raises(StreamError, match=r"stream 'tiny'.*6 tokens, fewer than max_seq_len=8.*concat_tokens"):
        take(build_text_dataloader(cfg, device_batch_size=4))
    cfg.num_workers = 1  # the message survives the trip through a worker process
    with pytest.raises(StreamError, match=r"stream 'tiny'.*fewer than max_seq_len=8"):
        take(build_text_dataloader(cfg, device_batch_size=4))


def test_token_ids_outside_the_vocabulary_are_named(data):
    """Shards tokenized with a bigger vocabulary than the model's: an error naming the stream, shard and id (in
    the main process and through a worker), not an embedding's index error or a device assert."""
    cfg = make(None, streams={"web": {"local": data["a"]}}, shuffle=False)
    assert len(take(build_text_dataloader(cfg, 4, vocab_size=400))) == 75  # ids up to 306: all fit
    for workers in (0, 1):
        cfg.num_workers = workers
        with pytest.raises(StreamError, match=r"stream 'web' .*: sample \d+ of shard shard\.\d+\.mds holds token "
                                              r"id 100, outside the model's vocabulary of 100 ids.*re-convert"):
            take(build_text_dataloader(cfg, 4, vocab_size=100))


def test_missing_sources_are_named(tmp_path, data):
    with pytest.raises(StreamError, match=r"stream 'default'.*local directory .*nope does not exist"):
        build_text_dataloader(make(str(tmp_path / "nope")), 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StreamError, match=r"no index.json in local directory .*empty.*MDSWriter"):
        build_text_dataloader(make(str(tmp_path / "empty")), 4)
    with pytest.raises(StreamError, match=r"stream 'x': remote directory .*gone does not exist"):
        build_text_dataloader(make(None, streams={"x": {"remote": str(tmp_path / "gone")}}), 4)
    with pytest.raises(StreamError, match=r"stream 'default': local directory .*a/val does not exist"):
        build_text_dataloader(make(data["a"], split="val"), 4)


def test_split_folder_given_as_local_gets_a_hint(tmp_path, data):
    """local=<mds>/train with split 'train' looks in <mds>/train/train: the error says the split is appended and
    names the folder meant; a missing folder whose name is not the split gets no such note."""
    write_mds(tmp_path / "mds" / "train", 8, 12)
    with pytest.raises(StreamError) as e:
        build_text_dataloader(make(str(tmp_path / "mds" / "train"), split="train"), 4)
    assert str(e.value).endswith(f"does not exist. Fix: point 'local' at a directory written by streaming.MDSWriter "
                                 f"(or set 'remote' to download it). Note: the split ('train') is appended to local; "
                                 f"did you mean local={tmp_path / 'mds'}?"), str(e.value)
    assert len(take(build_text_dataloader(make(str(tmp_path / "mds"), split="train"), 4))) == 2  # the fix works
    with pytest.raises(StreamError) as e:
        build_text_dataloader(make(data["a"], split="val"), 4)
    assert "is appended" not in str(e.value)


def test_stream_split_empty_reads_the_folder_itself(tmp_path, data):
    """split: '' on one stream means no split folder for it, whatever the loader's split; a folder that holds
    index.json itself, read with a split, gets a note saying so."""
    write_mds(tmp_path / "flat", 40, 12, marker=5)  # shards directly in flat/, no train/ under it
    write_mds(tmp_path / "nested" / "train", 40, 12, marker=6)
    cfg = make(None, split="train", shuffle=False, streams={"flat": {"local": str(tmp_path / "flat"), "split": ""},
                                                            "nested": {"local": str(tmp_path / "nested")}})
    assert sorted(set(m for m, _ in sample_keys(take(build_text_dataloader(cfg, 4))))) == [5, 6]
    cfg.streams["flat"].split = None  # the loader's 'train' again
    with pytest.raises(StreamError) as e:
        build_text_dataloader(cfg, 4)
    assert str(e.value).endswith(f"Note: {tmp_path / 'flat'} holds an index.json itself; to read it without a split "
                                 "folder, set split: '' on this stream."), str(e.value)


def test_missing_shard_files_are_named_before_training(tmp_path):
    src = write_mds(tmp_path / "d", 200, 12, samples_per_shard=50)
    assert len(take(build_text_dataloader(make(src), 4))) == 50
    shard = sorted(f for f in os.listdir(src) if f.startswith("shard."))[1]
    os.remove(os.path.join(src, shard))
    with pytest.raises(StreamError) as e:
        build_text_dataloader(make(src), 4)
    assert str(e.value) == (f"stream 'default': 1 shard file(s) listed in {src}/index.json are missing, e.g. "
                            f"{src}/{shard}. Fix: convert this source again (index.json and its shards are written "
                            f"together), or restore the files.")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_shard_file_removed_during_the_run_is_named(tmp_path, num_workers):
    """A shard that vanishes after the up-front check: the error names the file, not a download from a remote.
    Whichever thread fetches it first fails; one waiting for it gives up too (streaming alone would wait forever
    on a shard left 'preparing')."""
    src = write_mds(tmp_path / "d", 200, 12, samples_per_shard=50)
    loader = build_text_dataloader(make(src, shuffle=False, num_workers=num_workers), 4)
    for name in os.listdir(src):
        if name.startswith("shard."):
            os.remove(os.path.join(src, name))
    with pytest.raises(StreamError) as e:
        take(loader)
    assert re.search(rf"stream 'default' \({re.escape(src)}\): {re.escape(src)}/shard\.\d+\.mds is listed in its "
                     r"index\.json but missing\. Fix: convert this source again", str(e.value)), str(e.value)


def test_wrong_column_is_rejected(tmp_path):
    with MDSWriter(out=str(tmp_path), columns={"content": "str"}) as w:
        w.write({"content": "hello"})
    with pytest.raises(StreamError, match=r"neither a 'tokens' column \(ndarray:int32.*found \{content: str\}"):
        build_text_dataloader(make(str(tmp_path)), 4)


# --- exact resumption -------------------------------------------------------------------------------------------

MIXTURE = {"a": {"proportion": 0.7}, "b": {"proportion": 0.3}}


@pytest.mark.parametrize("num_workers,mixture", [(0, False), (2, False), (2, True)])
def test_resume_continues_at_the_exact_next_sample(data, num_workers, mixture):
    if mixture:  # 'b' is upsampled (120 samples -> 30% of a 600-sample epoch)
        streams = {k: {"local": data[k], **v} for k, v in MIXTURE.items()}
        cfg = make(None, streams=streams, epoch_size=600, num_workers=num_workers, shuffle_block_size=64)
    else:
        cfg = make(data["a"], num_workers=num_workers, shuffle_block_size=64)
    bs, k = 8, 7

    def fresh():
        return build_text_dataloader(cfg, device_batch_size=bs)

    reference = fresh()
    epoch0, epoch1 = sample_keys(take(reference)), sample_keys(take(reference))
    assert epoch0 != epoch1  # reshuffled per epoch
    del reference

    first = fresh()
    head = sample_keys(take(first, k))
    state = first.state_dict()
    assert state["sample_in_epoch"] == k * bs
    assert first.dataset.state_dict(k * bs, True) == state  # what composer saves
    del first
    gc.collect()
    second = fresh()
    second.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    middle = sample_keys(take(second, k))
    state2 = second.state_dict()
    assert state2["sample_in_epoch"] == 2 * k * bs
    del second
    third = fresh()
    third.load_state_dict(state2)
    tail = sample_keys(take(third))
    assert head + middle + tail == epoch0
    assert sample_keys(take(third)) == epoch1  # and the next epoch is the uninterrupted run's next epoch


def test_mixture_counts_are_exact_per_epoch(data):
    streams = {k: {"local": data[k], **v} for k, v in MIXTURE.items()}
    keys = sample_keys(take(build_text_dataloader(make(None, streams=streams, epoch_size=600), 10)))
    markers = [m for m, _ in keys]
    assert (markers.count(1), markers.count(2)) == (420, 180)


# --- several loaders in one process -----------------------------------------------------------------------------

def _shm_names(prefix: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"{prefix:06}_")]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm to inspect shared memory")
def test_loaders_release_shared_memory_and_temporary_cache(data, tmp_path):
    cfg = make(None, streams={"a": {"remote": data["a"]}}, num_workers=1)  # remote set, local not: auto cache
    prefixes, caches = [], []
    for _ in range(3):
        loader = build_text_dataloader(cfg, 8)
        take(loader, 3)
        loader.load_state_dict(loader.state_dict())
        prefixes.append(loader.dataset._shm_prefix_int)
        caches.append(loader.dataset.streams[0].local)
        assert os.path.isdir(caches[-1]) and _shm_names(prefixes[-1])
        del loader
    gc.collect()
    assert len(set(caches)) == 3  # a fresh cache directory per loader ...
    assert not any(os.path.exists(c) for c in caches)  # ... removed with it
    assert not any(_shm_names(p) for p in prefixes)  # shared memory unlinked when the loader is freed

    explicit = make(None, streams={"a": {"remote": data["a"], "local": str(tmp_path / "cache")}})
    for _ in range(3):  # the same explicit local dir, one loader after another: no "Reused local directory"
        assert len(take(build_text_dataloader(explicit, 8), 2)) == 2


# --- resumption at another world size (real processes) ----------------------------------------------------------

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from llmfoundry.data.text_loader import TextLoaderConfig, build_text_dataloader
    data, state_in, out = sys.argv[1:4]
    batch, n, save_at = map(int, sys.argv[4:7])
    if int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("gloo")  # as the trainer does before building its loaders
    cfg = TextLoaderConfig(max_seq_len=8, remote=data, shuffle=True, shuffle_block_size=64, num_workers=1)
    loader = build_text_dataloader(cfg, batch)
    if state_in != "-":
        loader.load_state_dict(json.load(open(state_in)))
    ids, saved = [], None
    for b in loader:
        ids.append(b["input_ids"][:, 1].tolist())
        if len(ids) == save_at:
            saved = loader.state_dict()  # what a checkpoint taken after this batch holds
        if len(ids) == n:
            break
    json.dump({"ids": ids, "saved": saved, "state": loader.state_dict()}, open(out, "w"))
    if dist.is_initialized():
        dist.barrier()  # a rank's exit frees the shared memory it created (as streaming's atexit does)
""")


def _run_world(tmp_path, world: int, data: str, state: str, batch: int, n: int, save_at: int = -1) -> list[dict]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(REPO))
        log = open(tmp_path / f"log{r}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, str(script), data, state, str(tmp_path / f"out{r}.json"),
                                       str(batch), str(n), str(save_at)], env=env, stdout=log, stderr=log))
    for r, p in enumerate(procs):
        assert p.wait(timeout=240) == 0, (tmp_path / f"log{r}.txt").read_text()[-3000:]
    return [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_resume_from_world_1_on_world_2(tmp_path, data):
    """Global batch size 8: one rank x 8, then two ranks x 4. The global sample sequence is unchanged:
    sample j of a global batch goes to rank j % world (position j // world in that rank's batch)."""
    full = _run_world(tmp_path, 1, data["a"], "-", 8, 20, save_at=6)[0]
    (tmp_path / "state.json").write_text(json.dumps(full["saved"]))
    r0, r1 = _run_world(tmp_path, 2, data["a"], str(tmp_path / "state.json"), 4, 14)
    merged = [[x for pair in zip(a, b) for x in pair] for a, b in zip(r0["ids"], r1["ids"])]
    assert merged == full["ids"][6:20]
    assert r0["state"]["sample_in_epoch"] == 20 * 8
