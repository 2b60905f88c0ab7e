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


def converted(tmp_path, compression: str | None, processes: int = 1) -> str:
    """The tiny default corpus's first documents converted by our converter (256-token samples, small shards)."""
    from llmfoundry.data.bundled import corpus_documents
    from llmfoundry.data.convert import ConvertConfig, convert
    from llmfoundry.data.readers import TextList
    out = str(tmp_path / f"mds-{compression}-{processes}")
    convert(TextList(tuple(corpus_documents()[:30])),
            ConvertConfig(out_root=out, concat_tokens=256, compression=compression, processes=processes,
                          shard_size_limit=1 << 16, progress=False))
    return out


@pytest.mark.parametrize("processes", [1, 2])
def test_converters_write_a_hash_of_every_shard(tmp_path, processes):
    import json

    from streaming.base.hashing import get_hash
    out = converted(tmp_path, "zstd", processes)
    shards = json.load(open(os.path.join(out, "index.json")))["shards"]
    assert len(shards) > 2
    for shard in shards:
        for info in (shard["raw_data"], shard["zip_data"]):
            assert set(info["hashes"]) == {"xxh3_64"}
        path = os.path.join(out, shard["zip_data"]["basename"])
        assert get_hash("xxh3_64", open(path, "rb").read()) == shard["zip_data"]["hashes"]["xxh3_64"]


def damage(path: str) -> None:
    """Flip a few bytes in the middle of ``path``: the same size, different content."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(4)
        f.seek(-4, 1)
        f.write(bytes(x ^ 0xFF for x in b))


def read_all(remote: str, local: str) -> int:
    cfg = from_dict(TextLoaderConfig, {"remote": remote, "local": local, "max_seq_len": 256, "num_workers": 0,
                                       "shuffle": False})
    return sum(len(b["input_ids"]) for b in build_text_dataloader(cfg, device_batch_size=8))


@pytest.mark.parametrize("compression", ["zstd", None])
def test_a_damaged_shard_is_named_when_it_is_downloaded_and_not_kept(tmp_path, compression):
    """A shard of the same size but other bytes (not caught by the size check) is caught by its hash when the
    loader copies it from the remote (or decompresses it); the damaged copy is not left in the cache, so the same
    run, once the shard is copied again, reads everything."""
    import shutil
    out = converted(tmp_path, compression)
    n = read_all(out, str(tmp_path / "cache0"))
    good = str(tmp_path / "good")
    shutil.copytree(out, good)
    name = "shard.00001.mds" + (".zstd" if compression else "")
    damage(os.path.join(out, name))
    cache = tmp_path / "cache"
    with pytest.raises(StreamError) as e:
        read_all(out, str(cache))
    msg = str(e.value)
    assert f"shard {os.path.join(out, name)} is damaged: its xxh3_64 hash differs from the one index.json records" \
        in msg and "copy the shard again" in msg
    assert not (cache / name).exists()
    shutil.copy(os.path.join(good, name), os.path.join(out, name))
    assert read_all(out, str(cache)) == n
