"""A save folder that cannot be written stops the run before any work with one message naming the folder and why
(with check_free_disk: false too), tried on real places: /proc, a path under a file, a read-only mount; and a disk
that fills up or turns read-only mid-run (real tmpfs mounts)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _train(*overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUN_NAME", None)
    return subprocess.run([sys.executable, "scripts/train.py", "yamls/tiny-cpu.yaml", "max_duration=1ba",
                           "eval_loader=null", *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    return line


@pytest.mark.parametrize("check_free_disk", ["true", "false"])
def test_a_virtual_file_system(check_free_disk):
    line = _error_line(_train("save_folder=/proc/mpt-forge-test/ck", f"check_free_disk={check_free_disk}"))
    assert "save_folder '/proc/mpt-forge-test/ck': /proc does not accept new files" in line


def test_a_path_under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    line = _error_line(_train(f"save_folder={tmp_path}/notes.txt/ck"))
    assert f"{tmp_path}/notes.txt is a file, not a folder" in line


def test_a_read_only_mount(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only tmpfs needs root with mount rights")
    try:
        line = _error_line(_train(f"save_folder={mnt}/ck"))
        assert f"save_folder '{mnt}/ck': {mnt} is on a read-only file system" in line
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ------------------------------------------------------------------------------------------------ found mid-run
def _mount_tmpfs(mnt: Path, size: str) -> None:
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root with mount rights")


@pytest.fixture()
def small_disk(tmp_path):
    """A 12 MiB tmpfs: room for one checkpoint of tiny-cpu (7 MiB: fp32 weights and LION state), not two."""
    _mount_tmpfs(tmp_path / "disk", "12m")
    yield tmp_path / "disk"
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=False)


@pytest.fixture()
def disk(tmp_path):
    """A 256 MiB tmpfs, to be remounted read-only."""
    _mount_tmpfs(tmp_path / "disk", "256m")
    yield tmp_path / "disk"
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=False)


SAVE_EVERY_2 = ["save_interval=2ba", "save_num_checkpoints_to_keep=-1", "autoresume=true"]


def test_disk_fills_up_mid_run_then_the_same_command_resumes(small_disk):
    """A real full disk at the second checkpoint: one message naming the folder, the sizes and the checkpoint kept;
    batch 2's checkpoint stays complete and linked. With room again the same command sets aside the file cut short
    and continues after batch 2."""
    ck = small_disk / "ck"
    args = [f"save_folder={ck}", "max_duration=6ba", *SAVE_EVERY_2]
    line = _error_line(_train(*args))
    assert line.startswith(f"error: no space left on device while writing a checkpoint under {ck} ("), line
    assert (f"MiB): the checkpoints written before this one are complete, and latest-rank0.pt still names the "
            f"last of them, {ck}/ep0-ba2-rank0.pt. Fix: free space") in line, line
    assert os.path.realpath(ck / "latest-rank0.pt") == f"{ck}/ep0-ba2-rank0.pt"
    import torch
    assert torch.load(ck / "ep0-ba2-rank0.pt", map_location="cpu", weights_only=False)["state"]["timestamp"]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    r = _train(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"autoresume: {ck}/ep0-ba4-rank0.pt is not a complete checkpoint (" in r.stderr
    assert f"autoresume: continuing from the newest complete checkpoint, {ck}/ep0-ba2-rank0.pt" in r.stderr
    assert "[batch=3/6]" in r.stdout + r.stderr and "[batch=2/6]" not in r.stdout + r.stderr


def test_save_folder_turns_read_only_mid_run(disk):
    """The save folder's file system remounted read-only while the run trains (a disk error makes ext4 do this):
    the next save stops the run with one message naming the file, the folder and the last complete checkpoint;
    once writable again the same command continues from that checkpoint."""
    import signal
    import time
    ck = disk / "ck"
    args = [f"save_folder={ck}", "max_duration=40ba", "eval_loader=null", "scheduler.t_max=40ba", *SAVE_EVERY_2]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUN_NAME", None)
    proc = subprocess.Popen([sys.executable, "scripts/train.py", "yamls/tiny-cpu.yaml", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 120
        while not os.path.islink(ck / "latest-rank0.pt") and proc.poll() is None and time.time() < end:
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)  # hold it while the mount changes
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = _error_line(r)
    kept = os.path.realpath(ck / "latest-rank0.pt")
    assert line.startswith(f"error: cannot write checkpoint {ck}/ep0-ba"), line
    assert (f": save_folder {ck} is read-only now (Read-only file system; it was writable when the run started): "
            f"the checkpoints written before this one are complete, and latest-rank0.pt still names the last of "
            f"them, {kept}. Fix: make {ck} writable again") in line, line
    subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    r = _train(*args)
    batch = int(kept.rsplit("-ba", 1)[1].split("-")[0])
    assert r.returncode == 0 and f"autoresume: continuing from {kept}" in r.stderr, r.stderr[-3000:]
    assert f"[batch={batch + 1}/40]" in r.stdout + r.stderr and f"[batch={batch}/40]" not in r.stdout + r.stderr
