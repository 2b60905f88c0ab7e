"""A save folder that cannot be written stops the run before any work with one message naming the folder and why
(with check_free_disk: false too), tried on real places: /proc, a path under a file, a read-only mount."""
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
