"""Preemption (llmfoundry/train/preemption.py): real ``composer -n 2`` runs (DDP over gloo on CPU), real signals.

A small "scheduler" process (``SCHEDULER`` below) starts composer's launcher, waits for a batch in rank 0's log,
sends the signals, and reaps every process it is left with, as init would (it is a child subreaper: ranks
orphaned by a killed launcher are reaped there, and their exit status is seen).
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_same_weights, checkpoint_state

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "yamls" / "tiny-cpu.yaml")
N = 8
PREEMPTED, KILLED = 75, 143


def run_args(folder, *extra) -> list[str]:
    """tiny-cpu for N batches of 4 samples; no periodic checkpoint before the end (save_interval=100ba)."""
    return [TINY, f"save_folder={folder}", "global_train_batch_size=4", "device_train_microbatch_size=1",
            "device_eval_batch_size=2", f"max_duration={N}ba", "eval_interval=4ba", "eval_subset_num_batches=1",
            "save_interval=100ba", "save_num_checkpoints_to_keep=-1", "console_log_interval=1ba",
            "scheduler.t_warmup=2ba", f"scheduler.t_max={N}ba", "callbacks.speed_monitor.window_size=2", *extra]


def launcher_cmd(nproc: int, args: list[str], logs: Path) -> list[str]:
    """``composer -n nproc scripts/train.py ARGS`` (as ``python -m composer.cli.launcher``: this interpreter)."""
    logs.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "composer.cli.launcher", "-n", str(nproc), "--stdout", str(logs / "rank{rank}.out"),
            "--stderr", str(logs / "rank{rank}.err"), str(REPO / "scripts" / "train.py"), *args]


def env() -> dict:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    e.pop("RUN_NAME", None)
    return e


def launch(args: list[str], logs: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(launcher_cmd(nproc, args, logs), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=600)


SCHEDULER = r'''
import ctypes, json, os, signal, subprocess, sys, time
import psutil

spec = json.loads(sys.argv[1])
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphaned ranks come to this process
log = spec["log"]
with open(log, "w") as out:
    launcher = subprocess.Popen(spec["cmd"], stdout=out, stderr=subprocess.STDOUT, cwd=spec["cwd"],
                                start_new_session=True)  # its own process group: the job


def text():
    with open(log) as f:
        return f.read()


def wait_for(marker, deadline=300):
    end = time.time() + deadline
    while marker not in text():
        if launcher.poll() is not None or time.time() > end:
            print(json.dumps({"error": f"no {marker!r} in the log"}))
            sys.exit(1)
        time.sleep(0.02)


wait_for(spec["marker"])
ranks = {int(p.environ()["RANK"]): p.pid for p in psutil.Process(launcher.pid).children()}
names = {launcher.pid: "launcher", **{pid: f"rank{r}" for r, pid in ranks.items()}}
stopped = ranks[spec["stop"]] if spec["stop"] is not None else None
if stopped:
    os.kill(stopped, signal.SIGSTOP)  # a stuck peer: the other ranks wait for it inside a collective
pid_of = {"launcher": launcher.pid, **{f"rank{r}": pid for r, pid in ranks.items()}}
for name in spec["targets"]:  # 'group': every process of the job (the launcher's process group)
    kill = os.killpg if name == "group" else os.kill
    kill(pid_of["launcher" if name == "group" else name], getattr(signal, spec["signal"]))
target = pid_of.get(spec["targets"][0], launcher.pid)
if spec["second"]:
    wait_for("preemption: SIGTERM;")  # the first one was taken in (while the rank waits in a collective)
    time.sleep(spec["second"])
    os.kill(target, signal.SIGTERM)

status, end = {}, time.time() + 300
while time.time() < end:
    try:
        pid, st = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid:
        if pid in names:
            status[names[pid]] = os.waitstatus_to_exitcode(st)
        continue
    if stopped and not psutil.pid_exists(target) or stopped and "launcher" in status:
        os.kill(stopped, signal.SIGCONT)  # let the stuck rank see its peer gone (or the launcher's SIGTERM)
        stopped = None
    time.sleep(0.05)
print(json.dumps(status))
'''


def schedule(tmp_path: Path, name: str, args: list[str], targets: list[str], sig: str = "SIGTERM",
             stop: int | None = None, second: float = 0.0, marker: str = f"[batch=3/{N}]",
             nproc: int = 2) -> tuple[dict, str]:
    """Start ``composer -n nproc ...``; once rank 0 logged ``marker``, SIGSTOP rank ``stop`` (if any), send ``sig`` to
    each of ``targets`` ('launcher', 'rank0', 'rank1', 'group': every process of the job); with ``second``,
    SIGTERM the first target again that many seconds after it logged the first. Returns ({process: exit status} of the processes the scheduler reaped: the
    launcher, and ranks it left behind; the launcher's output)."""
    log = tmp_path / f"{name}.log"
    spec = {"cmd": launcher_cmd(nproc, args, tmp_path / f"logs-{name}"), "cwd": str(REPO), "log": str(log),
            "marker": marker, "targets": targets, "signal": sig, "stop": stop, "second": second}
    r = subprocess.run([sys.executable, "-c", SCHEDULER, json.dumps(spec)], env=env(), capture_output=True,
                       text=True, timeout=700)
    out = log.read_text() if log.exists() else ""
    assert r.returncode == 0 and r.stdout.strip(), r.stdout + r.stderr + out[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), out


def without_killed_ranks(status: dict) -> dict:
    """``status`` less the ranks the launcher ended with SIGKILL (a stuck rank it could not SIGTERM): when the launcher
    exits before reaping such a rank, the scheduler reaps it (-9); it was ended, not left running."""
    return {k: v for k, v in status.items() if not (k.startswith("rank") and v == -9)}


def explain(out: str, logs: Path) -> str:
    return out[-3000:] + "".join(f"\n--- {f.name}\n" + f.read_text()[-2000:] for f in sorted(logs.glob("rank*")))




def preempted_batch(out: str, folder: Path) -> int:
    """The batch of the checkpoint the preemption saved, from the ``preempted:`` line, which names it."""
    (batch, path) = re.findall(r"^preempted: stopped after batch (\d+) for a SIGTERM and saved (\S+);", out,
                               re.MULTILINE)[-1]
    assert path == str(folder / f"ep0-ba{batch}-rank0.pt")
    assert os.path.realpath(folder / "latest-rank0.pt") == path  # what autoresume picks up
    return int(batch)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``composer -n 2`` for N batches in one go: the reference."""
    tmp = tmp_path_factory.mktemp("full")
    r = launch(run_args(tmp / "ck"), tmp / "logs")
    assert r.returncode == 0, explain(r.stdout + r.stderr, tmp / "logs")
    return checkpoint_state(tmp / "ck", N)


def resume_and_compare(tmp_path: Path, folder: Path, batch: int, reference: dict):
    """The same command again: continues after ``batch`` and ends with the reference's weights, bit for bit."""
    r = launch(run_args(folder), tmp_path / "logs-rerun")
    out = r.stdout + r.stderr
    assert r.returncode == 0, explain(out, tmp_path / "logs-rerun")
    assert f"[batch={batch + 1}/{N}]" in out and f"[batch={batch}/{N}]" not in out
    assert_same_weights(checkpoint_state(folder, N), reference)


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_on_all_and_resumes_bit_exact(uninterrupted, tmp_path):
    """SIGTERM to rank 1 only: both ranks stop after the same batch, the checkpoint is saved, ``composer -n 2``
    exits 75 and says 'preempted'; the same command then ends bit for bit where the uninterrupted run did."""
    folder = tmp_path / "ck"
    status, out = schedule(tmp_path, "rank1", run_args(folder), ["rank1"])
    assert status == {"launcher": PREEMPTED}, explain(out, tmp_path / "logs-rank1")
    batch = preempted_batch(out, folder)
    assert 3 <= batch < N
    rank1 = (tmp_path / "logs-rank1" / "rank1.err").read_text()
    assert "preemption: SIGTERM;" in rank1 and f"stopped after batch {batch}" in rank1
    assert "preemption: another rank was asked to stop" in out  # rank 0 was not signalled itself
    resume_and_compare(tmp_path, folder, batch, uninterrupted)


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_and_resumes_bit_exact(uninterrupted, tmp_path):
    """SIGTERM to the launcher (Kubernetes signals the container's first process): it forwards SIGTERM to the
    ranks, they save after the same batch, and ``composer -n 2`` exits 75; the same command resumes bit-exact."""
    folder = tmp_path / "ck"
    status, out = schedule(tmp_path, "launcher", run_args(folder), ["launcher"])
    assert status == {"launcher": PREEMPTED}, explain(out, tmp_path / "logs-launcher")
    batch = preempted_batch(out, folder)
    assert 3 <= batch < N
    resume_and_compare(tmp_path, folder, batch, uninterrupted)


@pytest.mark.slow
def test_launcher_killed_outright_still_stops_its_ranks_at_a_checkpoint(tmp_path):
    """SIGKILL to the launcher (it forwards nothing): the kernel tells each rank (PR_SET_PDEATHSIG), and the ranks,
    orphaned, save after the same batch and exit 75 by themselves."""
    folder = tmp_path / "ck"
    status, out = schedule(tmp_path, "killed", run_args(folder), ["launcher"], sig="SIGKILL")
    assert status == {"launcher": -9, "rank0": PREEMPTED, "rank1": PREEMPTED}, explain(out, tmp_path / "logs-killed")
    assert "preemption: the composer launcher exited" in out
    assert 3 <= preempted_batch(out, folder) < N


@pytest.mark.slow
def test_second_sigterm_exits_at_once(tmp_path):
    """Rank 1 stuck (SIGSTOP), so rank 0 waits inside a collective and cannot save: its second SIGTERM (3 s after
    the first) ends it at once with 143 (the grace period is long); no checkpoint is written."""
    folder = tmp_path / "ck"
    status, out = schedule(tmp_path, "second", run_args(folder, "preemption.grace_period_s=600"), ["rank0"],
                           stop=1, second=3.0)
    assert without_killed_ranks(status) == {"launcher": KILLED}, explain(out, tmp_path / "logs-second")
    assert "preemption: a second SIGTERM; exiting at once without a checkpoint (status 143)" in out
    assert "preempted:" not in out and not glob.glob(str(folder / "*.pt"))


@pytest.mark.slow
def test_grace_period_runs_out(tmp_path):
    """Rank 1 stuck: rank 0 got one SIGTERM and exits by itself once preemption.grace_period_s has passed."""
    folder = tmp_path / "ck"
    status, out = schedule(tmp_path, "grace", run_args(folder, "preemption.grace_period_s=2"), ["rank0"], stop=1)
    assert without_killed_ranks(status) == {"launcher": KILLED}, explain(out, tmp_path / "logs-grace")
    assert "preemption: no checkpoint within preemption.grace_period_s = 2 s; exiting without one (status 143)" in out
    assert "preempted:" not in out and not glob.glob(str(folder / "*.pt"))


@pytest.mark.slow
def test_s3_save_folder_checkpoint_is_uploaded_before_exit(s3_bucket, tmp_path):
    """``composer -n 1`` with an s3:// save_folder, SIGTERM to every process of the job (composer's upload helper
    processes die too, so the rank uploads itself): the checkpoint and its ``latest-rank0.pt.symlink`` are in the
    bucket when the launcher exits 75, and the same command continues from that checkpoint."""
    import boto3
    args = run_args(f"{s3_bucket}/runs/{{run_name}}", "eval_loader=null")
    status, out = schedule(tmp_path, "s3", args, ["group"], nproc=1)
    assert status == {"launcher": PREEMPTED}, explain(out, tmp_path / "logs-s3")
    (batch, where) = re.findall(r"^preempted: stopped after batch (\d+) for a SIGTERM and saved (\S+);", out,
                                re.MULTILINE)[-1]
    assert where == f"{s3_bucket}/runs/tiny-cpu/ep0-ba{batch}-rank0.pt" and 3 <= int(batch) < N
    # the rank got SIGTERM twice (directly, and from the launcher): one request, not a second SIGTERM
    assert "preemption: a second SIGTERM" not in out
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket[5:])["Contents"]}
    assert {f"runs/tiny-cpu/ep0-ba{batch}-rank0.pt", "runs/tiny-cpu/latest-rank0.pt.symlink"} <= keys, keys
    r = launch(args, tmp_path / "logs-s3-rerun", nproc=1)
    rerun = r.stdout + r.stderr
    assert r.returncode == 0, rerun[-3000:]
    assert f"autoresume: continuing from {where}" in rerun
    assert f"[batch={int(batch) + 1}/{N}]" in rerun and f"[batch={batch}/{N}]" not in rerun


@pytest.mark.slow
def test_checkpoint_cut_short_is_set_aside_and_the_run_resumes_from_the_newest_complete_one(uninterrupted,
                                                                                             tmp_path):
    """What a process killed while saving leaves: a 0-byte newest checkpoint (and here a truncated one too), with
    latest-rank0.pt still on the complete one before. The same command (autoresume) renames them
    ``*.incomplete``, says so and which checkpoint it continues from, and ends bit for bit as the run that never
    stopped. A newer checkpoint that is complete is left alone, and the refusal says what to do about it; so are
    complete checkpoints that no latest-rank0.pt names."""
    folder = tmp_path / "ck"
    first = launch(run_args(folder, "max_duration=3ba"), tmp_path / "logs-first")
    assert first.returncode == 0, explain(first.stdout + first.stderr, tmp_path / "logs-first")
    good = folder / "ep0-ba3-rank0.pt"
    (folder / "ep0-ba6-rank0.pt").write_bytes(b"")  # kill -9 right after composer opened the file
    (folder / "ep0-ba7-rank0.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # ... halfway
    r = launch(run_args(folder), tmp_path / "logs-rerun")
    out = r.stdout + r.stderr
    assert r.returncode == 0, explain(out, tmp_path / "logs-rerun")
    assert (f"autoresume: {folder}/ep0-ba6-rank0.pt is not a complete checkpoint (0 bytes; cut short while it was "
            f"written): renamed to ep0-ba6-rank0.pt.incomplete") in out
    assert f"autoresume: {folder}/ep0-ba7-rank0.pt is not a complete checkpoint (" in out
    assert f"autoresume: continuing from the newest complete checkpoint, {good}" in out
    assert f"[batch=4/{N}]" in out and f"[batch=3/{N}]" not in out
    assert (folder / "ep0-ba6-rank0.pt.incomplete").exists() and (folder / "ep0-ba7-rank0.pt.incomplete").exists()
    assert_same_weights(checkpoint_state(folder, N), uninterrupted)

    (folder / "latest-rank0.pt").unlink()
    (folder / "latest-rank0.pt").symlink_to("ep0-ba3-rank0.pt")  # a complete ep0-ba8 is newer than the link
    r = launch(run_args(folder), tmp_path / "logs-back")
    last = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 1 and any(
        line.startswith(f"error: save_folder {folder} holds a checkpoint newer than {good}") and
        f"ln -sfn ep0-ba8-rank0.pt {folder}/latest-rank0.pt" in line for line in last), "\n".join(last[-20:])

    # no link at all (killed after the first save, before linking it): not a fresh start beside the checkpoints
    (folder / "latest-rank0.pt").unlink()
    r = launch(run_args(folder), tmp_path / "logs-unlinked")
    last = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 1 and any(
        line.startswith(f"error: save_folder {folder} holds checkpoints but no latest-rank0.pt") and
        f"ln -sfn ep0-ba8-rank0.pt {folder}/latest-rank0.pt" in line for line in last), "\n".join(last[-20:])
    (folder / "latest-rank0.pt").symlink_to("ep0-ba8-rank0.pt")  # what the message says
    r = launch(run_args(folder), tmp_path / "logs-linked")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and f"already complete: resumed from {folder}/latest-rank0.pt at 8ba" in out, out[-3000:]


def test_grace_period_must_be_positive():
    from llmfoundry.train import load_config
    from llmfoundry.utils.config import ConfigError
    with pytest.raises(ConfigError, match="grace_period_s"):
        load_config(TINY, ["preemption.grace_period_s=0"])
    assert load_config(TINY, ["preemption=null"]).preemption is None
    assert load_config(TINY).preemption.grace_period_s == 300
