"""A lost node (llmfoundry/train/nodes.py): two composer "nodes" of two processes each on this host, streaming
their data from the test S3 server, one of them killed (SIGKILL to its launcher's process group) or frozen
(SIGSTOP) mid-run.

Two nodes on one host share what real nodes do not: /dev/shm (streaming registers each node's datasets there, under
names that collide) and the temporary folder (streaming's locks, the loaders' caches). So each node here runs in
its own mount namespace with its own folder bind-mounted on /dev/shm, and its own TMPDIR; both folders outlive a
killed node, as a real node's would. This needs ``unshare -m`` (root, or CAP_SYS_ADMIN): the tests skip without it.
The save folder is shared, as on a network file system.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import S3_ENV, assert_same_weights, checkpoint_state

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "yamls" / "tiny-cpu.yaml")
N = 12  # batches
TIMEOUT = 20  # peers.timeout_s
LOST = 69  # nodes.LOST_PEERS_EXIT_CODE


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_unshare = pytest.mark.skipif(not _can_unshare(), reason="two nodes on one host need a mount namespace each "
                                   "(unshare -m: root or CAP_SYS_ADMIN) for their own /dev/shm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_data(s3_server) -> str:
    """The tiny default data's train split in a bucket of the test S3 server: ``s3://.../mds`` (split 'train')."""
    from llmfoundry.data import bundled
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    root = Path(bundled.mds_dir())
    for f in sorted((root / "train").iterdir()):
        client.upload_file(str(f), bucket, f"mds/train/{f.name}")
    return f"s3://{bucket}/mds"


def run_args(folder: Path, data: str, *extra: str) -> list[str]:
    """tiny-cpu for N batches of 4 samples (1 per rank), streamed from ``data``; a checkpoint every 3 batches."""
    return [TINY, f"save_folder={folder}", "global_train_batch_size=4", "device_train_microbatch_size=1",
            f"max_duration={N}ba", "eval_loader=null", "save_interval=3ba", "save_num_checkpoints_to_keep=-1",
            "console_log_interval=1ba", "callbacks.speed_monitor.window_size=2", "scheduler.t_warmup=2ba",
            f"scheduler.t_max={N}ba", f"train_loader.remote={data}", "train_loader.local=null",
            f"peers.timeout_s={TIMEOUT}", *extra]


class TwoNodes:
    """``composer --world_size 4 --nproc 2 --node_rank 0|1 --master_addr 127.0.0.1 --master_port P`` twice, each
    launcher the leader of its own process group (the node), with its own /dev/shm and TMPDIR under ``tmp``."""

    def __init__(self, tmp: Path, args: list[str], port: int | None = None):
        self.tmp, self.args, self.port = tmp, args, port or _free_port()
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}

    def command(self, node: int, logs: Path) -> list[str]:
        shm = self.tmp / f"shm-node{node}"
        shm.mkdir(exist_ok=True)
        launcher = [sys.executable, "-m", "composer.cli.launcher", "--world_size", "4", "--nproc", "2",
                    "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(self.port),
                    "--stdout", str(logs / "rank{rank}.out"), "--stderr", str(logs / "rank{rank}.err"),
                    str(REPO / "scripts" / "train.py"), *self.args]
        return ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /dev/shm && exec "$@"', str(shm), *launcher]

    def env(self, node: int) -> dict:
        tmpdir = self.tmp / f"tmp-node{node}"
        tmpdir.mkdir(exist_ok=True)
        e = {**os.environ, **S3_ENV, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir)}
        e.pop("RUN_NAME", None)
        return e

    def start(self, name: str) -> "TwoNodes":
        for node in (0, 1):
            logs = self.tmp / f"{name}-node{node}"
            logs.mkdir()
            self.logs[node] = logs
            with open(logs / "launcher.log", "w") as out:
                self.procs[node] = subprocess.Popen(self.command(node, logs), cwd=REPO, env=self.env(node),
                                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def output(self, node: int) -> str:
        """The launcher's output (its local rank 0's too), then its other rank's files."""
        logs = self.logs[node]
        return "".join(f.read_text(errors="replace") for f in [logs / "launcher.log", *sorted(logs.glob("rank*"))]
                       if f.exists())

    def wait_for(self, marker: str, node: int = 0, timeout: float = 300) -> None:
        end = time.time() + timeout
        while marker not in (self.logs[node] / "launcher.log").read_text(errors="replace"):
            assert time.time() < end and all(p.poll() is None for p in self.procs.values()), \
                f"no {marker!r} in node {node}'s log\n" + self.explain()
            time.sleep(0.02)

    def signal(self, node: int, sig: int) -> None:
        os.killpg(self.procs[node].pid, sig)

    def wait(self, node: int, timeout: float) -> int | None:
        try:
            return self.procs[node].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)

    def explain(self) -> str:
        return "".join(f"\n=== node {n}\n{self.output(n)[-4000:]}" for n in self.procs)


def finish(cluster: TwoNodes, timeout: float = 400) -> dict[int, int | None]:
    """Wait for both launchers; kill what is left. {node: exit status}."""
    status = {n: cluster.wait(n, timeout) for n in (0, 1)}
    cluster.kill_all()
    return status


@pytest.fixture(scope="module")
def uninterrupted(s3_data, tmp_path_factory):
    """Both nodes for N batches in one go: the reference."""
    tmp = tmp_path_factory.mktemp("full")
    cluster = TwoNodes(tmp, run_args(tmp / "ck", s3_data)).start("run")
    assert finish(cluster) == {0: 0, 1: 0}, cluster.explain()
    return checkpoint_state(tmp / "ck", N)


LOST_LINE = re.compile(r"^error: (.+?) stopped answering after batch (\d+): (.+?) \(peers\.timeout_s = 20(?:; this "
                       r"rank's collective had failed: [^\n]*)?\)\. The other ranks stop too \(exit status 69\); (.*)$",
                       re.MULTILINE)


def lost_message(out: str) -> tuple[str, int, str, str]:
    """(who, batch, why, advice) of the last 'stopped answering' line in ``out``."""
    found = LOST_LINE.findall(out)
    assert found, out[-4000:]
    who, batch, why, advice = found[-1]
    return who, int(batch), why, advice


def kill_mid_run(tmp: Path, data: str, node: int, sig: int = signal.SIGKILL) -> tuple[TwoNodes, float, int | None]:
    """Start both nodes, send ``sig`` to every process of ``node`` once rank 0 finished batch 5; (the cluster, the
    seconds the other node took to exit after that, its exit status)."""
    cluster = TwoNodes(tmp, run_args(tmp / "ck", data)).start("kill")
    try:
        cluster.wait_for(f"[batch=5/{N}]", node=0 if node == 1 else 1)
        killed = time.time()
        cluster.signal(node, sig)
        status = cluster.wait(1 - node, timeout=300)
        took = time.time() - killed
        print(f"node {1 - node} exited with {status} {took:.1f} s after node {node} got {signal.Signals(sig).name}")
        return cluster, took, status
    finally:
        cluster.kill_all()


@needs_unshare
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_killed_node_stops_the_other_with_a_message_and_the_relaunch_resumes(uninterrupted, s3_data, tmp_path):
    """SIGKILL to node 1 (both its ranks and its launcher) after batch 5: node 0's ranks see their all-reduce fail
    (connection reset), the heartbeats of ranks 2 and 3 stay silent, and node 0 exits 69 well within 90 s, naming
    them, the last checkpoint and the command; the same two commands then resume from that checkpoint and end with
    the uninterrupted run's weights and LION momenta, bit for bit (llmfoundry/train/ddp_sums.py)."""
    cluster, took, status = kill_mid_run(tmp_path, s3_data, node=1)
    out = cluster.output(0)
    assert status == LOST, cluster.explain()
    assert took < 90, f"node 0 took {took:.0f} s to stop\n{cluster.explain()}"
    who, batch, why, advice = lost_message(out)
    assert who == "ranks 2, 3 (node 1)" and 5 <= batch < N, out[-3000:]
    assert "this rank's collective had failed" in out  # the fast path: 4 silent heartbeats, not the full timeout
    saved = 3 * (batch // 3)
    ckpt = tmp_path / "ck" / f"ep0-ba{saved}-rank0.pt"
    assert advice == f"the last checkpoint is {ckpt}; relaunch every node with the same command to resume from it"
    assert os.path.realpath(tmp_path / "ck" / "latest-rank0.pt") == str(ckpt)
    assert "Traceback" not in out, out[-3000:]
    assert not list((tmp_path / "ck").glob("*rank[123]*")), "only global rank 0 writes whole-file checkpoints"

    rerun = TwoNodes(tmp_path, cluster.args, port=cluster.port).start("rerun")
    assert finish(rerun) == {0: 0, 1: 0}, rerun.explain()
    again = rerun.output(0)
    assert f"[batch={saved + 1}/{N}]" in again and f"[batch={saved}/{N}]" not in again, again[-3000:]
    assert_same_weights(checkpoint_state(tmp_path / "ck", N), uninterrupted)  # LION's momenta too


@needs_unshare
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_node0_takes_the_store_with_it_and_node1_names_it(s3_data, tmp_path):
    """Node 0 killed: the rendezvous store (in rank 0's process) goes with it, so node 1's ranks find both their
    all-reduce and the store dead, name ranks 0 and 1 (node 0) and exit 69."""
    cluster, took, status = kill_mid_run(tmp_path, s3_data, node=0)
    out = cluster.output(1)
    assert status == LOST, cluster.explain()
    assert took < 90, f"node 1 took {took:.0f} s to stop\n{cluster.explain()}"
    who, batch, why, advice = lost_message(out)
    assert who == "ranks 0, 1 (node 0)", out[-3000:]
    assert why.startswith("the rendezvous store in rank 0's process (127.0.0.1:"), why
    assert advice.startswith(f"the last checkpoint is {tmp_path / 'ck'}/ep0-ba"), advice


@needs_unshare
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_frozen_node_is_lost_after_the_timeout(s3_data, tmp_path):
    """Node 1 frozen (SIGSTOP: a host that stops answering without closing its connections, as at a power loss or
    a network partition): node 0's all-reduce raises nothing (gloo would wait dist_timeout, 600 s), but ranks 2 and
    3 send no heartbeat, and after peers.timeout_s node 0 exits 69 naming them."""
    cluster, took, status = kill_mid_run(tmp_path, s3_data, node=1, sig=signal.SIGSTOP)
    out = cluster.output(0)
    assert status == LOST, cluster.explain()
    assert TIMEOUT <= took < TIMEOUT + 40, f"node 0 took {took:.0f} s to stop\n{cluster.explain()}"
    who, batch, why, advice = lost_message(out)
    assert who == "ranks 2, 3 (node 1)" and why == f"no heartbeat for {TIMEOUT} s", out[-3000:]


# --- the pieces, without processes ---------------------------------------------------------------------------

def test_describe_ranks_groups_them_by_node():
    from llmfoundry.train.nodes import describe_ranks
    nodes = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2}
    assert describe_ranks([3, 2], nodes) == "ranks 2, 3 (node 1)"
    assert describe_ranks([3], nodes) == "rank 3 (node 1)"
    assert describe_ranks([4, 0, 1], nodes) == "ranks 0, 1 (node 0) and rank 4 (node 2)"


def test_resume_advice_names_the_command():
    from llmfoundry.train.nodes import resume_advice
    assert resume_advice("/ck/ep0-ba6-rank0.pt", "/ck", True) == (
        "the last checkpoint is /ck/ep0-ba6-rank0.pt; relaunch every node with the same command to resume from it")
    assert "load_path=/ck/ep0-ba6-rank0.pt" in resume_advice("/ck/ep0-ba6-rank0.pt", "/ck", False)
    assert resume_advice(None, "/ck", True).startswith("no checkpoint was saved yet")
    assert resume_advice(None, None, False).startswith("there is no save_folder")


def test_communication_errors_are_recognised():
    import torch.distributed as td

    from llmfoundry.train.nodes import is_communication_error
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:525] Read error [127.0.0.1]:2483: "
                        "Connection reset by peer")
    assert is_communication_error(gloo)
    assert is_communication_error(td.DistBackendError("NCCL communicator was aborted"))
    wrapped = ValueError("while saving")
    wrapped.__cause__ = gloo
    assert is_communication_error(wrapped)
    assert not is_communication_error(RuntimeError("CUDA out of memory"))
    assert not is_communication_error(ValueError("loss is nan"))


def test_intervals_follow_the_timeout():
    from llmfoundry.train.nodes import beat_interval, evident_after
    assert (beat_interval(300), evident_after(300)) == (5.0, 20.0)
    assert (beat_interval(20), evident_after(20)) == (2.0, 8.0)
    assert (beat_interval(5), evident_after(5)) == (0.5, 2.0)


def test_node_signal_file_is_per_node(monkeypatch):
    """composer broadcasts rank 0's '._signal_file_node0_XXXXXX' to every node; each node gets its own name."""
    from composer.utils import dist

    from llmfoundry.train.nodes import node_local_signal_files
    monkeypatch.setattr(dist, "get_node_signal_file_name", lambda rng=None: "._signal_file_node0_AbC123")
    monkeypatch.setattr(dist, "get_node_rank", lambda: 1)
    node_local_signal_files()
    node_local_signal_files()  # idempotent
    assert dist.get_node_signal_file_name() == "._signal_file_node1_AbC123"


def test_peers_config():
    from llmfoundry.train import load_config
    from llmfoundry.utils.config import ConfigError
    assert load_config(TINY).peers.timeout_s == 300
    assert load_config(TINY, ["peers=null"]).peers is None
    with pytest.raises(ConfigError, match="timeout_s"):
        load_config(TINY, ["peers.timeout_s=1"])


def _watches(monkeypatch, n: int = 2, timeout_s: float = 5):
    """Ranks 0..n-1 (rank r on node r) watching each other through a store in this process; no exits."""
    import datetime

    import torch.distributed as td

    from llmfoundry.train.nodes import PeerWatch
    monkeypatch.setattr(PeerWatch, "_exit_now", staticmethod(lambda: None))
    server = td.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=5), wait_for_workers=False)
    watches = [PeerWatch(("127.0.0.1", server.port), rank, n, node=rank, local_rank=0, timeout_s=timeout_s,
                         batch=lambda: 7, checkpoint=(lambda: "/ck/ep0-ba6-rank0.pt") if rank == 0 else (lambda: None),
                         save_folder="/ck", autoresume=True, local_world_size=1) for rank in range(n)]
    for w in watches:
        w.announce()
    for w in watches:
        w.start()
    return server, watches


def test_a_silent_rank_is_named_once_the_collective_failed(monkeypatch):
    """Rank 1's heartbeat stops (its process gone); rank 0's all-reduce raised: 4 silent heartbeats (2 s here)
    later rank 0 has the verdict, with the batch, the checkpoint and the command."""
    server, (w0, w1) = _watches(monkeypatch)
    try:
        time.sleep(1.5)
        w1._stop.set()  # silent, not 'exited'
        start = time.monotonic()
        verdict = w0.after_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
        took = time.monotonic() - start
        assert verdict is not None and verdict.lost == [1] and 1.5 < took < 6, (verdict, took)
        assert verdict.message == (
            "rank 1 (node 1) stopped answering after batch 7: no heartbeat for 2 s (peers.timeout_s = 5; this "
            "rank's collective had failed: RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection closed by "
            "peer). The other ranks stop too (exit status 69); the last checkpoint is /ck/ep0-ba6-rank0.pt; "
            "relaunch every node with the same command to resume from it")
    finally:
        w0._stop.set()
        w1._stop.set()


def test_ranks_that_stopped_a_moment_apart_are_named_together(monkeypatch):
    """Ranks 1 and 2 go silent 0.3 s apart (a node's processes die one after the other; a heartbeat is 0.5 s here):
    the verdict that rank 2's silence triggers names rank 1 too, not only the first one past the limit."""
    server, watches = _watches(monkeypatch, n=3)
    try:
        time.sleep(1.5)
        watches[2]._stop.set()
        time.sleep(0.3)
        watches[1]._stop.set()
        verdict = watches[0].after_failure(RuntimeError("gloo: Connection reset by peer"))
        assert verdict is not None and verdict.lost == [1, 2], verdict
        assert verdict.message.startswith("rank 1 (node 1) and rank 2 (node 2) stopped answering after batch 7")
    finally:
        for w in watches:
            w._stop.set()


def test_a_peer_that_stopped_on_its_own_error_is_not_called_lost(monkeypatch):
    """Rank 1 ended its run itself (``fit`` raised): its beat says 'exited', and rank 0's failed collective is
    re-raised as it is, within a heartbeat or two."""
    server, (w0, w1) = _watches(monkeypatch)
    try:
        time.sleep(1.0)
        w1.stop(finished=True)
        start = time.monotonic()
        assert w0.after_failure(RuntimeError("gloo: Connection reset by peer")) is None
        assert time.monotonic() - start < 3
        assert w0.verdict is None
    finally:
        w0._stop.set()


def test_a_store_gone_with_its_process_makes_node0_lost(monkeypatch):
    """The store's process (rank 0's) killed: rank 1's calls fail, and 4 heartbeats later (its collective had
    failed) it names node 0's ranks, from the store's silence."""
    import datetime

    import torch.distributed as td

    from llmfoundry.train.nodes import PeerWatch
    monkeypatch.setattr(PeerWatch, "_exit_now", staticmethod(lambda: None))
    server = subprocess.Popen([sys.executable, "-c", "import datetime, time, torch.distributed as td\n"
                               "s = td.TCPStore('127.0.0.1', 0, None, True, datetime.timedelta(seconds=5), "
                               "wait_for_workers=False)\nprint(s.port, flush=True)\ntime.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        rank0 = td.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=5), wait_for_workers=False)
        for key, value in [("beat/0", "0 0 1"), ("verdict", ""), ("checkpoint", "/ck/ep0-ba3-rank0.pt")]:
            rank0.set(f"llmfoundry/peers/{key}", value)
        watch = PeerWatch(("127.0.0.1", port), 1, 2, node=1, local_rank=0, timeout_s=5, batch=lambda: 4,
                          checkpoint=lambda: None, save_folder="/ck", autoresume=True, local_world_size=1)
        watch.announce()
        watch.start()
        time.sleep(1.5)
        server.kill()
        verdict = watch.after_failure(RuntimeError("[gloo/transport/tcp/pair.cc:525] Connection reset by peer"))
        assert verdict is not None and verdict.lost == [0], verdict
        assert verdict.message.startswith(f"rank 0 (node 0) stopped answering after batch 4: the rendezvous store "
                                          f"in rank 0's process (127.0.0.1:{port}) did not answer for 2 s")
        assert "the last checkpoint is /ck/ep0-ba3-rank0.pt" in verdict.message
    finally:
        server.kill()
        server.wait()
