"""QA of ``scripts/train.py`` around starting and resuming runs, each through the real command line on tiny-cpu:
a launch that fails before training leaves nothing new behind, the save-folder conflict names the real folder, a
resume with another batch shape warns once, and ``save_num_checkpoints_to_keep`` holds across resumes."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "yamls" / "tiny-cpu.yaml")


def fast(save_folder, *extra) -> list[str]:
    """tiny-cpu as a few-second run: 4 samples per step in 2 micro-batches, no evaluation."""
    return [f"save_folder={save_folder}", "global_train_batch_size=4", "device_train_microbatch_size=2",
            "max_duration=4ba", "eval_loader=null",
            "save_interval=2ba", "save_num_checkpoints_to_keep=-1", "console_log_interval=1ba",
            "callbacks.speed_monitor.window_size=2", "scheduler.t_warmup=1ba", *extra]


def run_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUN_NAME", None)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def checkpoints(folder) -> list[str]:
    return sorted((os.path.basename(p) for p in glob.glob(os.path.join(str(folder), "ep*-ba*-rank0.pt"))),
                  key=lambda name: int(name.split("-ba")[1].split("-")[0]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-batch run saved under ``<tmp>/{run_name}/ck`` (left unchanged by the tests using it)."""
    root = tmp_path_factory.mktemp("finished")
    ok(run_cli([TINY, *fast(f"{root}/{{run_name}}/ck")]))
    return root, root / "tiny-cpu" / "ck"


# ------------------------------------------------------------------------------------------ 1. failed starts
def test_failed_start_leaves_nothing_behind(finished, tmp_path):
    """A launch that stops before its first batch creates no save folder and writes no config copy: not in a new
    folder (missing data folder, data error at the first batch), not in a finished run's folder (config changed and
    then a data error, a lowered max_duration), and a pre-existing empty folder stays."""
    new = tmp_path / "new"
    r = run_cli([TINY, *fast(f"{new}/{{run_name}}/ck"), f"train_loader.local={tmp_path}/no-data"])
    assert r.returncode == 1 and "no-data/train does not exist" in r.stderr, r.stderr[-2000:]
    assert not new.exists()
    r = run_cli([TINY, *fast(f"{new}/{{run_name}}/ck"), "variables.seq_len=512"])  # fails loading batch 1
    assert r.returncode == 1 and "fewer than max_seq_len=512" in r.stderr, r.stderr[-2000:]
    assert not new.exists()  # composer had created new/tiny-cpu/ck: all three levels are gone again

    mine = tmp_path / "mine"
    mine.mkdir()  # the user's empty folder: not this process's to remove
    r = run_cli([TINY, *fast(mine), "variables.seq_len=512"])
    assert r.returncode == 1 and listing(mine) == []

    _, folder = finished
    before = listing(folder)
    r = run_cli([TINY, *fast(f"{folder.parent.parent}/{{run_name}}/ck"), "variables.seq_len=512",
                 "max_duration=6ba"])  # resumes, then fails loading its first batch
    assert r.returncode == 1 and "fewer than max_seq_len=512" in r.stderr, r.stderr[-2000:]
    r = run_cli([TINY, *fast(f"{folder.parent.parent}/{{run_name}}/ck"), "max_duration=2ba"])
    assert r.returncode == 1 and "past max_duration = 2ba" in r.stderr, r.stderr[-2000:]
    assert listing(folder) == before and not any(name.startswith("config-") for name in before)


def test_config_copy_is_written_once_training_starts(tmp_path):
    """A run that trains records its config: config.yaml, then a time-stamped copy for a changed config."""
    ok(run_cli([TINY, *fast(tmp_path / "ck"), "max_duration=2ba"]))
    assert [n for n in listing(tmp_path / "ck") if n.startswith("config")] == ["config.yaml"]
    ok(run_cli([TINY, *fast(tmp_path / "ck"), "max_duration=4ba"]))
    copies = [n for n in listing(tmp_path / "ck") if n.startswith("config")]
    assert len(copies) == 2 and "max_duration: 4ba" in (tmp_path / "ck" / copies[0]).read_text()


# ------------------------------------------------------------------------------------------ 2. conflict message
def test_save_folder_conflict_names_the_real_folder(finished):
    root, folder = finished
    before = listing(folder)
    r = run_cli([TINY, *fast(f"{root}/{{run_name}}/ck"), "autoresume=false", "optimizer.lr=1e-4"])
    assert r.returncode == 1, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: save_folder {folder} already holds checkpoints of another run (e.g. "
                           f"{folder}/ep0-ba4-rank0.pt). Fix: set autoresume: true"), line
    assert "{run_name}" not in line and "Traceback" not in r.stderr
    assert listing(folder) == before


# ------------------------------------------------------------------------------------------ 3. batch shape on resume
def test_resume_with_another_batch_shape_warns(tmp_path):
    """Resuming with another global_train_batch_size trains on with one warning naming both sizes and what they
    change; the data continues at the sample where the run stopped. A resume that keeps the batch size does not
    warn about it; one that changes max_seq_len warns about that."""
    folder = tmp_path / "ck"
    first = ok(run_cli([TINY, *fast(folder)]))
    assert "trained with" not in first
    out = ok(run_cli([TINY, *fast(folder), "global_train_batch_size=8", "device_train_microbatch_size=4",
                      "max_duration=6ba"]))
    warnings = [ln for ln in out.splitlines() if "global_train_batch_size is" in ln]
    assert len(warnings) == 1, warnings
    assert (f"WARNING: llmfoundry.train.resume: global_train_batch_size is 8 but the run resumed from {folder}/"
            f"ep0-ba4-rank0.pt (batch 4, sample 16) trained with 4: the data continues at sample 16") in warnings[0]
    assert "the LR schedule" in warnings[0] and "Set global_train_batch_size=4 to continue" in warnings[0]
    assert (f"max_duration is 6ba but the run resumed from {folder}/ep0-ba4-rank0.pt (batch 4) was scheduled for "
            "4ba: scheduler.t_max is a fraction of max_duration, so the cosine schedule is recomputed over 6ba") in out
    assert "set scheduler.t_max=4ba" in out
    state = torch.load(folder / "ep0-ba6-rank0.pt", map_location="cpu", weights_only=False)["state"]
    assert state["dataset_state"]["train"]["sample_in_epoch"] == 16 + 2 * 8  # no sample skipped or repeated

    out = ok(run_cli([TINY, *fast(folder), "global_train_batch_size=8", "device_train_microbatch_size=4",
                      "max_duration=7ba", "variables.seq_len=128"]))
    assert "global_train_batch_size is" not in out  # resumed from a checkpoint of the 8-sample run
    assert "max_duration is 7ba but the run resumed" in out
    assert (f"train_loader.max_seq_len is 128 but the run resumed from {folder}/ep0-ba6-rank0.pt trained with 256"
            in out)


# ------------------------------------------------------------------------------------------ 4. checkpoints to keep
def test_checkpoints_to_keep_holds_across_resumes(tmp_path):
    """save_num_checkpoints_to_keep=2 counts the checkpoints earlier launches of the run wrote: they are removed,
    oldest first, once the resumed run has saved newer ones; the one resumed from outlives the first new save; a
    file the run did not write stays."""
    folder = tmp_path / "ck"
    args = fast(folder, "save_num_checkpoints_to_keep=2")
    ok(run_cli([TINY, *args]))
    assert checkpoints(folder) == ["ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt"]
    (folder / "ep0-ba1-rank0.pt").write_bytes((folder / "ep0-ba2-rank0.pt").read_bytes())  # the user's copy

    out = ok(run_cli([TINY, *args, "max_duration=6ba"]))
    assert checkpoints(folder) == ["ep0-ba1-rank0.pt", "ep0-ba4-rank0.pt", "ep0-ba6-rank0.pt"]
    assert f"save_num_checkpoints_to_keep=2: removed {folder}/ep0-ba2-rank0.pt" in out

    ok(run_cli([TINY, *args, "max_duration=10ba"]))
    assert checkpoints(folder) == ["ep0-ba1-rank0.pt", "ep0-ba8-rank0.pt", "ep0-ba10-rank0.pt"]
    assert os.path.realpath(folder / "latest-rank0.pt") == str(folder / "ep0-ba10-rank0.pt")

    ok(run_cli([TINY, *fast(folder, "save_num_checkpoints_to_keep=1"), "max_duration=12ba"]))
    assert checkpoints(folder) == ["ep0-ba1-rank0.pt", "ep0-ba12-rank0.pt"]


def test_truncated_latest_checkpoint_is_named_with_the_way_back(tmp_path):
    """A latest checkpoint cut short (a full disk or a dead machine while it was written): one message naming the
    file and the commands that continue from the checkpoint before it; following them resumes from there."""
    ck = tmp_path / "ck"
    ok(run_cli([TINY, *fast(ck, "save_interval=1ba", "max_duration=3ba")]))
    latest = os.path.realpath(ck / "latest-rank0.pt")
    assert os.path.basename(latest) == "ep0-ba3-rank0.pt"
    with open(latest, "r+b") as f:
        f.truncate(os.path.getsize(latest) // 2)
    r = run_cli([TINY, *fast(ck, "save_interval=1ba", "max_duration=5ba")])
    assert r.returncode != 0
    last = (r.stdout + r.stderr).strip().splitlines()[-1]
    fix = f"mv {latest} {latest}.bad && ln -sfn ep0-ba2-rank0.pt {ck / 'latest-rank0.pt'}"
    assert f"checkpoint {latest} cannot be read (" in last and "truncated or corrupt" in last, last
    assert last.endswith(f"then run the same command again: {fix}"), last
    assert "Traceback" not in r.stderr
    subprocess.run(fix, shell=True, check=True)
    out = ok(run_cli([TINY, *fast(ck, "save_interval=1ba", "max_duration=5ba")]))
    assert "[batch=3/5]" in out and "[batch=5/5]" in out and "[batch=2/5]" not in out


def test_unreadable_load_path_checkpoint_points_at_an_earlier_one(tmp_path):
    """Given as load_path (no latest-rank0.pt link to it), a corrupt checkpoint's fix names the newest earlier one,
    never a later one."""
    from llmfoundry.train.checks import is_unreadable_checkpoint, unreadable_checkpoint_message
    for b in (1, 2, 3, 4):
        (tmp_path / f"ep0-ba{b}-rank0.pt").write_bytes(b"x")
    try:
        torch.load(tmp_path / "ep0-ba3-rank0.pt")
    except Exception as e:  # noqa: BLE001 - whatever torch raises for a non-checkpoint
        error = RuntimeError("loading failed")
        error.__cause__ = e
    assert is_unreadable_checkpoint(error)
    message = unreadable_checkpoint_message(str(tmp_path / "ep0-ba3-rank0.pt"), error)
    assert message.endswith(f"Fix: set load_path to an earlier checkpoint, e.g. {tmp_path / 'ep0-ba2-rank0.pt'}")
    assert "RuntimeError: loading failed" not in message, message  # the reader's own error is shown
