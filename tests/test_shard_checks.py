"""Shards that are not what their index.json lists are named before training, and compressed-only datasets are
decompressed into a cache, never into the dataset folder (real MDS shards, written with streaming's MDSWriter)."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from streaming import MDSWriter

from llmfoundry.data.text_loader import StreamError, TextLoaderConfig, build_text_dataloader
from llmfoundry.utils.config import from_dict


def write_mds(path, compression=None, num_samples=120, seq_len=12) -> str:
    with MDSWriter(out=str(path), columns={"tokens": "ndarray:int32"}, compression=compression,
                   size_limit=50 * (seq_len * 4 + 4) + 8) as w:
        for i in range(num_samples):
            w.write({"tokens": np.arange(i, i + seq_len, dtype=np.int32)})
    return str(path)


def first_tokens(local: str) -> list[int]:
    cfg = from_dict(TextLoaderConfig, {"local": local, "max_seq_len": 12, "num_workers": 0, "shuffle": False})
    return [int(row[0]) for batch in build_text_dataloader(cfg, device_batch_size=40) for row in batch["input_ids"]]


def test_a_truncated_shard_is_named_with_both_sizes(tmp_path):
    folder = write_mds(tmp_path / "mds")
    shard = os.path.join(folder, "shard.00001.mds")
    listed = os.path.getsize(shard)
    os.truncate(shard, 1000)
    with pytest.raises(StreamError) as e:
        first_tokens(folder)
    assert f"shard {shard} is 1,000 bytes, {folder}/index.json lists it as {listed:,}" in str(e.value)
    assert "copy the dataset again" in str(e.value)


def test_a_truncated_compressed_shard_is_named_too(tmp_path):
    folder = write_mds(tmp_path / "mds", compression="zstd")
    shard = os.path.join(folder, "shard.00000.mds.zstd")
    os.truncate(shard, 10)
    with pytest.raises(StreamError, match=r"shard .*shard\.00000\.mds\.zstd is 10 bytes"):
        first_tokens(folder)


def test_compressed_shards_are_read_through_a_cache(tmp_path):
    folder = write_mds(tmp_path / "mds", compression="zstd")
    before = sorted(os.listdir(folder))
    assert first_tokens(folder) == list(range(120))
    assert sorted(os.listdir(folder)) == before  # no decompressed shard.*.mds written beside the dataset


def test_compressed_shards_on_a_read_only_mount(tmp_path):
    src = write_mds(tmp_path / "mds", compression="zstd")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", src, str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("a read-only bind mount needs root with mount rights")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], check=False, capture_output=True)
        with pytest.raises(OSError):
            open(mnt / "probe", "w")
        assert first_tokens(str(mnt)) == list(range(120))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
