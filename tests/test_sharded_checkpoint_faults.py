"""Sharded checkpoints (FSDP2 over gloo on CPU, ``state_dict_type: sharded``: a folder ``ep0-baN`` with each rank's
``__{rank}_0.distcp`` and DCP's ``.metadata``) cut short, locally and in an ``s3://`` bucket: autoresume continues
from the newest complete one and says which; what it cannot decide is one message with the commands.

Each launch is ``composer -n 2 scripts/train.py yamls/tiny-cpu.yaml fsdp.version=2 ...`` (real processes, real DCP
files, the moto S3 server of conftest)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_same_weights
from test_train_multiprocess import N, TINY, explain, fast, launch

FSDP2 = ["fsdp.version=2", "fsdp.mixed_precision=FULL", "fsdp.state_dict_type=sharded"]


def sharded_state(folder: Path) -> dict:
    """The whole ``state`` of a sharded checkpoint folder (model and LION state gathered from every rank's file)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = folder.parent / f"{folder.name}.whole.pt"
    dcp_to_torch_save(str(folder), str(out))
    state = torch.load(out, map_location="cpu", weights_only=False)["state"]
    out.unlink()
    return state


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """N batches in one go, FSDP2 sharded: the reference."""
    tmp = tmp_path_factory.mktemp("sharded-full")
    r = launch(2, [TINY, *fast(tmp / "ck"), *FSDP2], tmp / "logs")
    assert r.returncode == 0, explain(r, tmp / "logs")
    return sharded_state(tmp / "ck" / f"ep0-ba{N}")


@pytest.mark.slow
def test_sharded_checkpoint_cut_short_is_set_aside_and_the_run_resumes_from_the_newest_complete(uninterrupted,
                                                                                                tmp_path):
    """What a kill during a sharded save leaves: a folder with one rank's file half written and no ``.metadata``
    (and one whose ``.metadata`` points past the end of a rank's file). The same command renames both
    ``*.incomplete``, says so, continues from the complete checkpoint before them and ends bit for bit as the run
    that never stopped. Then: a complete checkpoint newer than the one ``latest-rank0.pt`` names stops the launch
    with both ways to go on; a linked checkpoint that lost part of a rank's file stops it with the commands that
    continue from the one before."""
    ck = tmp_path / "ck"
    first = launch(2, [TINY, *fast(ck), *FSDP2, "max_duration=3ba"], tmp_path / "logs-1")
    assert first.returncode == 0, explain(first, tmp_path / "logs-1")
    good = ck / "ep0-ba3"
    assert os.path.realpath(ck / "latest-rank0.pt") == str(good)
    killed = ck / "ep0-ba4"  # rank 0 was writing its file when the job died; DCP writes .metadata last
    killed.mkdir()
    (killed / "__0_0.distcp").write_bytes((good / "__0_0.distcp").read_bytes()[:1000])
    damaged = ck / "ep0-ba5"
    shutil.copytree(good, damaged)
    whole = (damaged / "__1_0.distcp").stat().st_size
    truncate(damaged / "__1_0.distcp")

    r = launch(2, [TINY, *fast(ck), *FSDP2], tmp_path / "logs-2")
    out = r.stdout + r.stderr
    assert r.returncode == 0, explain(r, tmp_path / "logs-2")
    assert (f"autoresume: {killed} is not a complete checkpoint (no .metadata: its save did not finish): renamed to "
            f"ep0-ba4.incomplete") in out
    assert (f"autoresume: {damaged} is not a complete checkpoint (__1_0.distcp holds {whole // 2} bytes, .metadata "
            f"expects at least {whole}): renamed to ep0-ba5.incomplete") in out
    assert f"autoresume: continuing from the newest complete checkpoint, {good}" in out
    assert f"[batch=4/{N}]" in out and f"[batch=3/{N}]" not in out
    assert (ck / "ep0-ba4.incomplete").is_dir() and (ck / "ep0-ba5.incomplete").is_dir()
    assert os.path.realpath(ck / "latest-rank0.pt") == str(ck / f"ep0-ba{N}")
    assert_same_weights(sharded_state(ck / f"ep0-ba{N}"), uninterrupted)

    # the link moved back by hand: a complete ep0-ba6 is newer than the checkpoint it names
    (ck / "latest-rank0.pt").unlink()
    (ck / "latest-rank0.pt").symlink_to("ep0-ba3")
    r = launch(2, [TINY, *fast(ck), *FSDP2, "max_duration=8ba"], tmp_path / "logs-3")
    lines = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 1 and any(
        line.startswith(f"error: save_folder {ck} holds a checkpoint newer than {good}") and
        f"ln -sfn ep0-ba{N} {ck}/latest-rank0.pt" in line and f"mv {ck}/ep0-ba{N} {ck}/ep0-ba{N}.bad" in line
        for line in lines), explain(r, tmp_path / "logs-3")
    assert (ck / f"ep0-ba{N}" / ".metadata").exists()  # nothing moved or deleted

    # the linked checkpoint lost the end of rank 1's file (a copy cut short)
    (ck / "latest-rank0.pt").unlink()
    (ck / "latest-rank0.pt").symlink_to(f"ep0-ba{N}")
    truncate(ck / f"ep0-ba{N}" / "__1_0.distcp")
    r = launch(2, [TINY, *fast(ck), *FSDP2, "max_duration=8ba"], tmp_path / "logs-4")
    lines = (r.stdout + r.stderr).splitlines()
    linked = ck / f"ep0-ba{N}"
    assert r.returncode == 1 and any(
        line.startswith(f"error: checkpoint {linked} is not complete (__1_0.distcp holds ") and
        f"mv {linked} {linked}.bad && ln -sfn ep0-ba3 {ck}/latest-rank0.pt" in line
        for line in lines), explain(r, tmp_path / "logs-4")
    assert "Traceback" not in r.stdout + r.stderr

    # no link at all, complete folders (a kill after the first save, before linking it): not a fresh start
    shutil.move(linked, f"{linked}.bad")
    (ck / "latest-rank0.pt").unlink()
    before = sorted(os.listdir(ck))
    r = launch(2, [TINY, *fast(ck), *FSDP2, "max_duration=8ba"], tmp_path / "logs-5")
    lines = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 1 and any(
        line.startswith(f"error: save_folder {ck} holds checkpoints but no latest-rank0.pt") and
        f"newest complete one is {good}. To continue from it: ln -sfn ep0-ba3 {ck}/latest-rank0.pt" in line
        for line in lines), explain(r, tmp_path / "logs-5")
    assert sorted(os.listdir(ck)) == before  # nothing written, renamed or deleted


def _dcp_folder(folder: Path) -> None:
    """A real one-process DCP checkpoint: ``.metadata`` and ``__0_0.distcp``."""
    import torch.distributed.checkpoint as dcp
    dcp.save({"w": torch.arange(4096, dtype=torch.float32)}, checkpoint_id=str(folder), no_dist=True)


def test_what_counts_as_a_complete_sharded_folder(tmp_path):
    from llmfoundry.checkpoint import sharded_checkpoint_problem
    good = tmp_path / "ep0-ba2"
    _dcp_folder(good)
    assert sorted(os.listdir(good)) == [".metadata", "__0_0.distcp"] and sharded_checkpoint_problem(str(good)) is None
    whole = (good / "__0_0.distcp").stat().st_size
    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    truncate(cut / "__0_0.distcp")
    assert sharded_checkpoint_problem(str(cut)) == (f"__0_0.distcp holds {whole // 2} bytes, .metadata expects at "
                                                    f"least {whole}")
    (cut / "__0_0.distcp").unlink()
    assert sharded_checkpoint_problem(str(cut)) == "__0_0.distcp is missing"
    (cut / ".metadata").write_bytes(b"\x80\x04")  # a pickle header, then nothing
    assert sharded_checkpoint_problem(str(cut)) == ".metadata: it cannot be read (EOFError)"  # cut short
    (cut / ".metadata").unlink()
    assert sharded_checkpoint_problem(str(cut)) == "no .metadata: its save did not finish"


def test_a_batch_cut_short_in_two_launches_keeps_both_remains(tmp_path, caplog):
    """The second launch's remains of the same batch go beside the first's (``.incomplete.1``), not over them."""
    from llmfoundry.train import load_config
    from llmfoundry.train.resume import check_local_checkpoints
    ck = tmp_path / "ck"
    ck.mkdir()
    _dcp_folder(ck / "ep0-ba2")
    (ck / "latest-rank0.pt").symlink_to("ep0-ba2")
    for _ in range(2):
        (ck / "ep0-ba4").mkdir()
        (ck / "ep0-ba4" / "__0_0.distcp").write_bytes(b"partial")
        cfg = load_config(TINY, [f"save_folder={ck}", "autoresume=true", *FSDP2])
        assert check_local_checkpoints(cfg, sharded=True) is None
    assert sorted(p.name for p in ck.iterdir()) == ["ep0-ba2", "ep0-ba4.incomplete", "ep0-ba4.incomplete.1",
                                                    "latest-rank0.pt"]
    assert f"autoresume: continuing from the newest complete checkpoint, {ck}/ep0-ba2" in caplog.text


def _keys(s3_server, bucket: str) -> dict[str, int]:
    got = s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: o["Size"] for o in got}


@pytest.mark.slow
def test_s3_sharded_checkpoint_partial_in_the_bucket_is_skipped(s3_server, s3_bucket, tmp_path):
    """An ``s3://`` save folder: every rank's file and ``.metadata`` land with their ``.complete`` markers. A newer
    checkpoint whose rank-1 upload did not finish (a part of the file, no marker) is skipped by name, the run
    continues from the newest complete one, although 'latest' names the partial one, and the save of that batch
    replaces the partial files."""
    bucket = s3_bucket[5:]
    args = [TINY, *fast(f"{s3_bucket}/runs/{{run_name}}", "eval_loader=null", "save_interval=2ba"), *FSDP2]
    r = launch(2, [*args, "max_duration=4ba"], tmp_path / "logs-1")
    assert r.returncode == 0, explain(r, tmp_path / "logs-1")
    keys = _keys(s3_server, bucket)
    for batch in (2, 4):
        for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
            key = f"runs/tiny-cpu/ep0-ba{batch}/{name}"
            assert keys[key] > 0 and keys[key + ".complete"] == len(str(keys[key])), sorted(keys)
    client = s3_server.client()
    partial = "runs/tiny-cpu/ep0-ba4/__1_0.distcp"  # rank 1's upload died a third of the way, before its marker
    body = client.get_object(Bucket=bucket, Key=partial)["Body"].read()
    client.put_object(Bucket=bucket, Key=partial, Body=body[: len(body) // 3])
    client.delete_object(Bucket=bucket, Key=partial + ".complete")
    assert client.get_object(Bucket=bucket, Key="runs/tiny-cpu/latest-rank0.pt.symlink")["Body"].read() == \
        b"runs/tiny-cpu/ep0-ba4"

    r = launch(2, args, tmp_path / "logs-2")
    out = r.stdout + r.stderr
    assert r.returncode == 0, explain(r, tmp_path / "logs-2")
    assert (f"autoresume: skipping {s3_bucket}/runs/tiny-cpu/ep0-ba4: __1_0.distcp ({len(body) // 3} bytes) is not "
            f"complete: its upload did not finish") in out
    assert f"autoresume: continuing from {s3_bucket}/runs/tiny-cpu/ep0-ba2 (the newest complete checkpoint" in out
    assert f"[batch=3/{N}]" in out and f"[batch=2/{N}]" not in out
    keys = _keys(s3_server, bucket)
    for batch in (4, N):  # batch 4 saved again over the partial files, then the last batch
        for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
            key = f"runs/tiny-cpu/ep0-ba{batch}/{name}"
            assert keys.get(key + ".complete") == len(str(keys[key])), sorted(keys)
    assert keys[partial] == len(body)
    assert client.get_object(Bucket=bucket, Key="runs/tiny-cpu/latest-rank0.pt.symlink")["Body"].read() == \
        f"runs/tiny-cpu/ep0-ba{N}".encode()
