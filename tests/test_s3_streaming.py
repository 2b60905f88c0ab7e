"""The text dataloader against a real S3 server (moto, on 127.0.0.1): mixtures, endpoints, failures."""
from __future__ import annotations

import os
import time
import urllib.parse

import numpy as np
import pytest
from conftest import S3Server
from streaming import MDSWriter

from llmfoundry.data.streams import user_message
from llmfoundry.data.text_loader import StreamError, TextLoaderConfig, build_text_dataloader
from llmfoundry.utils.config import from_dict

SEQ = 16


def write_mds(out, num_samples: int, marker: int, samples_per_shard: int = 100):
    """Samples [marker, index, ...]; `out` is a directory or a (local, 's3://...') pair (MDSWriter uploads)."""
    size_limit = samples_per_shard * (SEQ * 4 + 4) + 8
    with MDSWriter(out=out, columns={"tokens": "ndarray:int32"}, size_limit=size_limit) as w:
        for i in range(num_samples):
            tokens = np.full(SEQ, 7, np.int32)
            tokens[0], tokens[1] = marker, i
            w.write({"tokens": tokens})


def upload(client, local_dir, remote: str) -> None:
    url = urllib.parse.urlparse(remote)
    for name in os.listdir(local_dir):
        client.upload_file(os.path.join(local_dir, name), url.netloc, f"{url.path.strip('/')}/{name}")


def markers(batches) -> list[int]:
    return [int(m) for b in batches for m in b["input_ids"][:, 0]]


def test_s3_mixture_follows_proportions(s3_server, s3_bucket, tmp_path):
    """Three sources of 1000 / 400 / 2000 samples mixed 0.5 / 0.3 / 0.2 over a 3000-sample epoch.

    streaming draws exactly round(proportion * epoch_size) samples of each source per epoch, so a full epoch
    must match to the sample. The first half of the (shuffled) epoch is a without-replacement draw of 1500 of the
    3000: if the shuffle mixed perfectly, each share would have a standard deviation below
    sqrt(0.25 * 1500 * 0.5) / 1500 = 0.009; py1e shuffles shard-sized windows, so 0.05 (> 5 sigma) is allowed.
    """
    write_mds(str(tmp_path / "web"), 1000, marker=1)
    write_mds(str(tmp_path / "code"), 400, marker=2)
    upload(s3_server.client(), tmp_path / "web", f"{s3_bucket}/web")
    upload(s3_server.client(), tmp_path / "code", f"{s3_bucket}/code")
    write_mds((str(tmp_path / "books"), f"{s3_bucket}/books"), 2000, marker=3)  # MDSWriter uploads itself
    cfg = from_dict(TextLoaderConfig, {
        "max_seq_len": SEQ, "epoch_size": 3000, "num_workers": 2, "shuffle": True,
        "streams": {"web": {"remote": f"{s3_bucket}/web", "proportion": 0.5},
                    "code": {"remote": f"{s3_bucket}/code", "proportion": 0.3},
                    "books": {"remote": f"{s3_bucket}/books", "proportion": 0.2}}})
    loader = build_text_dataloader(cfg, device_batch_size=10)
    seen = markers(loader)
    assert len(seen) == 3000
    assert [seen.count(m) for m in (1, 2, 3)] == [1500, 900, 600]
    half = seen[:1500]
    for marker, p in [(1, 0.5), (2, 0.3), (3, 0.2)]:
        assert abs(half.count(marker) / 1500 - p) < 0.05, (marker, half.count(marker))


def test_s3_endpoint_from_config(s3_server, s3_bucket, tmp_path, monkeypatch):
    write_mds(str(tmp_path / "d"), 64, marker=4)
    upload(s3_server.client(), tmp_path / "d", f"{s3_bucket}/d")
    monkeypatch.delenv("S3_ENDPOINT_URL")  # only the config key points at the server now
    cfg = TextLoaderConfig(max_seq_len=SEQ, remote=f"{s3_bucket}/d", s3_endpoint_url=s3_server.url, num_workers=1)
    assert markers(build_text_dataloader(cfg, 8)) == [4] * 64


def test_s3_remote_without_index_is_named(s3_server, s3_bucket):
    cfg = from_dict(TextLoaderConfig, {"max_seq_len": SEQ, "streams": {"wiki": {"remote": f"{s3_bucket}/nothing/here"}},
                                       "download_retry": 1, "download_timeout": 5})
    start = time.time()
    with pytest.raises(StreamError) as info:
        build_text_dataloader(cfg, 8)
    message = str(info.value)
    assert "stream 'wiki'" in message and f"{s3_bucket}/nothing/here/index.json" in message
    assert s3_server.url in message and "MDSWriter" in message and "Note" not in message
    assert time.time() - start < 30
    cfg.split = "train"  # remote names the split folder itself: the split is appended to it
    cfg.streams["wiki"].remote = f"{s3_bucket}/mds/train"
    with pytest.raises(StreamError, match=rf"mds/train/train/index\.json.*Note: the split \('train'\) is appended "
                                          rf"to remote; did you mean remote={s3_bucket}/mds\?$"):
        build_text_dataloader(cfg, 8)


def test_s3_missing_bucket_shard_and_credentials_each_get_their_fix(s3_server, s3_bucket, tmp_path, monkeypatch):
    write_mds(str(tmp_path / "d"), 300, marker=6)  # 3 shards
    upload(s3_server.client(), tmp_path / "d", f"{s3_bucket}/d")

    def error(remote: str) -> str:
        cfg = TextLoaderConfig(max_seq_len=SEQ, remote=remote, shuffle=False, download_retry=1, download_timeout=5)
        with pytest.raises(StreamError) as info:
            for _ in build_text_dataloader(cfg, 10):
                pass
        return user_message(info.value)  # a worker's error arrives wrapped with its traceback

    message = error("s3://no-such-bucket/d")
    assert "s3://no-such-bucket/d/index.json" in message and message.endswith(
        "Fix: bucket 'no-such-bucket' does not exist at this endpoint; correct the bucket name in 'remote'."), message
    assert ".." not in message
    bucket = s3_bucket[len("s3://"):]
    s3_server.client().delete_object(Bucket=bucket, Key="d/shard.00001.mds")
    message = error(f"{s3_bucket}/d")
    assert f"{s3_bucket}/d/shard.00001.mds" in message and message.endswith(
        "Fix: the shard is listed in index.json but missing from the store: convert this source again (it writes "
        "index.json and its shards together), or restore the file."), message
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    message = error(f"{s3_bucket}/d")
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)" in message, message


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_s3_server_going_away_is_a_clear_error_not_a_hang(s3_server, tmp_path, num_workers):
    """Shards are fetched as the loader goes (predownload 8); the server dies after two batches."""
    server = S3Server().start()  # our own server, so stopping it does not disturb the other tests
    try:
        bucket = f"s3://{server.make_bucket()}"
        write_mds(str(tmp_path / "src"), 2000, marker=5, samples_per_shard=50)  # 40 shards
        upload(server.client(), tmp_path / "src", f"{bucket}/src")
        cfg = TextLoaderConfig(max_seq_len=SEQ, remote=f"{bucket}/src", s3_endpoint_url=server.url, shuffle=False,
                               predownload=8, download_retry=2, download_timeout=5, num_workers=num_workers)
        loader = build_text_dataloader(cfg, device_batch_size=4)
        it = iter(loader)
        next(it), next(it)
        server.stop()
        start = time.time()
        with pytest.raises(StreamError) as info:
            for _ in it:
                pass
        elapsed = time.time() - start
    finally:
        server.stop()
    message = str(info.value)
    assert elapsed < 60, elapsed
    assert f"{bucket}/src/shard." in message and server.url in message, message
    assert "download_retry=2" in message
