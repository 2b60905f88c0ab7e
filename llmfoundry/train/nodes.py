"""Runs over several nodes: a lost node stops the others within ``peers.timeout_s`` (and two heartbeats), with a
message naming it.

What happens without this (measured: ``composer --world_size 4 --nproc 2`` twice on one host, DDP over gloo)
------------------------------------------------------------------------------------------------------------
- A node (or one rank) killed outright (SIGKILL, the OOM killer): its kernel closes its sockets, so the
  survivors' next all-reduce raises at once (gloo: ``Connection reset by peer`` / ``Connection closed by peer``);
  each survivor exits with a traceback that names no rank, and its launcher with whatever status the first rank
  had (1, or 241 for a rank its launcher had sent SIGTERM).
- A node that stops answering without closing its connections (power loss, a network partition, a frozen host;
  on one host: SIGSTOP): the survivors wait inside the collective for ``dist_timeout`` (600 s here; composer's
  default is 300 s, torch's own 30 minutes) and then exit with ``Timed out waiting ... for recv operation``.
  NCCL waits likewise until its watchdog aborts the process after ``dist_timeout``.

What happens with it (``peers:``, on by default with several processes)
--------------------------------------------------------------------------
Every rank runs a heartbeat thread that talks to the rendezvous store (the ``TCPStore`` composer's launcher
points every rank at, ``MASTER_ADDR:MASTER_PORT``, served from global rank 0's process) through its own client.
Every ``interval`` seconds (``timeout_s / 10``, at most 5 s) it writes its own beat (a counter, its node rank and
pid) and reads everyone's in the same request. Each request is given up after ``store_timeout`` (2 intervals):
torch's client waits without a limit on a store that accepted the connection and then froze. A rank whose beat has
not changed for ``timeout_s`` is lost: two heartbeats later the verdict names it and every other rank whose beat
has not changed since that moment (a live one beats at every interval; ranks of one node that died a moment apart
are named together); so is every rank of node 0 when the store itself has not answered for that long (it lives
in rank 0's process). Once this rank's own collective has failed (gloo's connection errors above, a timeout, an
NCCL error), the loss is evident, and ``4 * interval`` of silence is enough.

The first rank to decide writes the verdict into the store; every rank reads it at its next beat, so all of them
print the same message, e.g. ``ranks 2, 3 (node 1) stopped answering after batch 7 ... the last checkpoint is
.../ep0-ba6-rank0.pt; relaunch every node with the same command to resume from it``, and exit with status 69
(``LOST_PEERS_EXIT_CODE``, ``EX_UNAVAILABLE``). A rank waiting in a collective exits from the heartbeat thread
(``os._exit``, after flushing); a rank whose collective raised leaves through ``LostPeers`` (``main`` prints it)
and a normal exit. The order matters: global rank 0 waits for the others to have read the verdict (its exit takes
the store with it), and on every node local rank 0 exits before the others, because composer's launcher reports
the status of its first rank and SIGTERMs the rest as soon as one exits. Measured, two nodes of two processes on
one host, ``peers.timeout_s = 20``: a node killed, the other stops 9-19 s later; a node frozen, 22-25 s later.

``dist_timeout`` stays what it is: it bounds every collective, including the legitimate long waits (a rank
saving or uploading a checkpoint while the others wait at a barrier), while the heartbeat bounds only silence.

A rank that ends its part of the run (``fit`` returned or raised) marks its beat ``exited``: the others do not
call it lost, and a collective that fails because a peer stopped on its own error is re-raised as it is (that
peer's log says why). SIGTERM (``preemption.py``) is untouched: the heartbeats go on while the ranks save, and
each rank marks itself ``exited`` before it leaves with status 75.

Several nodes on one host share /dev/shm, the temporary folder and the save folder, which real nodes do not;
see docs/FAULTS.md (each node needs its own /dev/shm and ``TMPDIR``). composer's node signal file is made per
node here (``node_local_signal_files``): on a save folder shared by the nodes composer would otherwise have every
node write and remove the same file.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

LOST_PEERS_EXIT_CODE = 69  # os.EX_UNAVAILABLE: a peer of this run is gone; relaunch every node
KEY = "llmfoundry/peers/"
EXITED = "exited"
CONFIRM_BEATS = 2  # once a rank is past the limit, this many heartbeats more to see which others are silent too
EXIT_GUARD_S = 30.0  # a local rank 0 told to stop that is still alive this much later is ended with os._exit
# what a collective raises when a peer is gone (gloo's RuntimeError texts; NCCL's and the store's errors)
_COMMUNICATION_ERROR = re.compile(r"gloo|nccl|c10d|ProcessGroup", re.IGNORECASE)


class LostPeers(Exception):
    """Some ranks of the run stopped answering; this rank stopped too. The same command on every node resumes."""
    exit_code = LOST_PEERS_EXIT_CODE


@dataclass
class Verdict:
    lost: list[int]
    message: str

    def to_json(self) -> str:
        return json.dumps({"lost": self.lost, "message": self.message})

    @staticmethod
    def from_json(text: str) -> "Verdict":
        data = json.loads(text)
        return Verdict(list(data["lost"]), data["message"])


def beat_interval(timeout_s: float) -> float:
    """Seconds between two heartbeats: a tenth of the timeout, between 0.5 and 5 s."""
    return min(5.0, max(0.5, timeout_s / 10))


def evident_after(timeout_s: float) -> float:
    """Seconds of silence that make a peer lost once this rank's own collective has failed."""
    return min(timeout_s, 4 * beat_interval(timeout_s))


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) is what a collective raises when a peer is gone."""
    import torch.distributed as td
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, td.DistError) or (isinstance(error, RuntimeError)
                                               and _COMMUNICATION_ERROR.search(str(error))):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def describe_ranks(ranks: list[int], node_of: dict[int, int]) -> str:
    """'rank 3 (node 1)', 'ranks 2, 3 (node 1)', 'ranks 2, 3 (node 1) and rank 4 (node 2)'."""
    by_node: dict[int, list[int]] = {}
    for r in sorted(ranks):
        by_node.setdefault(node_of[r], []).append(r)
    parts = [f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} (node {n})" for n, rs in by_node.items()]
    return " and ".join(parts)


def resume_advice(checkpoint: str | None, save_folder: str | None, autoresume: bool) -> str:
    """Where the run can continue from, and the command that continues it."""
    if not save_folder:
        return "there is no save_folder, so nothing was saved; relaunch every node to start again"
    if checkpoint is None:
        return "no checkpoint was saved yet; relaunch every node with the same command to start again"
    if autoresume:
        return f"the last checkpoint is {checkpoint}; relaunch every node with the same command to resume from it"
    return (f"the last checkpoint is {checkpoint}; relaunch every node with autoresume=true (or "
            f"load_path={checkpoint}) to resume from it")


def store_client(address: tuple[str, int], timeout_s: float):
    """A new connection to the rendezvous store at ``address`` (``MASTER_ADDR``, ``MASTER_PORT``), so that the
    heartbeat never waits behind torch's use of it. Connecting and waiting for a key give up after ``timeout_s``; a
    call to a store that stopped answering does not (``PeerWatch.call`` bounds those)."""
    import torch.distributed as td
    return td.TCPStore(address[0], address[1], None, False, datetime.timedelta(seconds=timeout_s),
                       wait_for_workers=False)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


class PeerWatch:
    """This rank's heartbeat and its view of the others' (see the module docstring). ``batch()`` is the number of
    batches this rank finished; ``checkpoint()`` (rank 0) the newest checkpoint this launch saved. ``address``: the
    rendezvous store's (host, port)."""

    VERDICT, CHECKPOINT = KEY + "verdict", KEY + "checkpoint"

    def __init__(self, address: tuple[str, int], rank: int, world_size: int, node: int, local_rank: int,
                 timeout_s: float, batch, checkpoint, save_folder: str | None, autoresume: bool,
                 local_world_size: int):
        self.address, self.rank, self.world_size = address, rank, world_size
        self.node, self.local_rank = node, local_rank
        self.timeout_s, self.interval = timeout_s, beat_interval(timeout_s)
        self.store_timeout = store_timeout(timeout_s)
        self.batch, self.checkpoint = batch, checkpoint
        self.save_folder, self.autoresume = save_folder, autoresume
        self.node_of = {r: r // max(1, local_world_size) for r in range(world_size)}  # until their beats say
        self.pid_of: dict[int, int] = {}
        self.verdict: Verdict | None = None
        self.evidence: str | None = None  # this rank's collective failed: what it raised
        self.exited_peers: set[int] = set()
        self._client = None
        self._generation = 0
        self._failing = False
        self._beats = 0
        self._seen: dict[int, str] = {}
        self._changed = {r: time.monotonic() for r in range(world_size)}
        self._suspected: float | None = None  # when a rank was first silent past the limit
        self._store_ok = time.monotonic()
        self._published_checkpoint: str | None = None
        self._known_checkpoint: str | None = checkpoint()
        self._main_waits = False
        self._woken = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def beat_key(rank: int) -> str:
        return f"{KEY}beat/{rank}"

    @staticmethod
    def ack_key(rank: int) -> str:
        return f"{KEY}ack/{rank}"

    # --- the store, every call bounded ------------------------------------------------------------------------
    def call(self, fn):
        """``fn(client)`` in a helper thread, given up after ``store_timeout`` seconds: a store whose process is
        frozen accepts the connection and never answers, and torch's client waits on it without a limit. After a
        failure the client is dropped (a stuck helper is left behind, a daemon thread) and the next call first
        tries a plain TCP connection, so that a store that is gone costs no more of torch's multi-line warnings."""
        result, generation, failing = {}, self._generation, self._failing

        def work():
            try:
                client = self._client
                if client is None:
                    if failing:
                        socket.create_connection(self.address, timeout=self.store_timeout).close()
                    client = store_client(self.address, self.store_timeout)
                result["value"] = fn(client)
                if generation == self._generation:
                    self._client = client
            except Exception as e:  # noqa: BLE001 - handed to the caller
                result["error"] = e

        helper = threading.Thread(target=work, name="peer-heartbeat-store", daemon=True)
        helper.start()
        helper.join(self.store_timeout)
        if helper.is_alive() or "error" in result:
            self._generation += 1
            self._client, self._failing = None, True
            raise result.get("error") or TimeoutError(f"no answer within {self.store_timeout:g} s")
        self._failing = False
        return result["value"]

    # --- life cycle -------------------------------------------------------------------------------------------
    def announce(self) -> None:
        """This rank's first beat (and on rank 0 the empty verdict and checkpoint); every rank calls this, then a
        barrier, before ``start``: from then on every key the beat reads exists."""
        def first(client):
            client.set(self.beat_key(self.rank), self._beat_value())
            if self.rank == 0:
                client.set(self.VERDICT, "")
                client.set(self.CHECKPOINT, self._known_checkpoint or "")
        self.call(first)
        self._published_checkpoint = self._known_checkpoint

    def start(self) -> None:
        now = time.monotonic()
        self._changed = {r: now for r in range(self.world_size)}
        self._store_ok = now
        self._thread = threading.Thread(target=self._run, name="peer-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, finished: bool = True) -> None:
        """This rank is done with the run: ``fit`` returned or raised an exception (``finished``: the others no
        longer wait for its beat), or a signal ends the process (SystemExit, KeyboardInterrupt: its beat stops, and
        the others call it lost once it is silent for long enough)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.store_timeout + 1)  # at most one store call under way
        if self.verdict is None and finished:
            with contextlib.suppress(Exception):
                self.call(lambda client: client.set(self.beat_key(self.rank), EXITED))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - a bug here must not stop training; say it once
                log.warning("peers: the heartbeat thread failed (%s: %s); lost nodes are not detected from here "
                            "on", type(e).__name__, e)
                return

    # --- one beat ---------------------------------------------------------------------------------------------
    def window(self) -> float:
        return evident_after(self.timeout_s) if self.evidence else self.timeout_s

    def _beat_value(self) -> str:
        return f"{self._beats} {self.node} {os.getpid()}"

    def tick(self) -> None:
        others = [r for r in range(self.world_size) if r != self.rank]
        self._beats += 1
        beat, checkpoint = self._beat_value(), self.checkpoint() if self.rank == 0 else None

        def exchange(client):
            client.set(self.beat_key(self.rank), beat)
            if checkpoint and checkpoint != self._published_checkpoint:
                client.set(self.CHECKPOINT, checkpoint)
                self._published_checkpoint = checkpoint
            keys = [self.VERDICT, self.CHECKPOINT] + [self.beat_key(r) for r in others]
            return [v.decode() for v in client.multi_get(keys)]

        try:
            values = self.call(exchange)
        except Exception as e:  # noqa: BLE001 - the store did not answer (it lives in global rank 0's process)
            self._store_silent(time.monotonic(), e)
            return
        now = time.monotonic()
        self._store_ok = now
        verdict, checkpoint, beats = values[0], values[1], dict(zip(others, values[2:]))
        self._known_checkpoint = checkpoint or self._known_checkpoint
        if verdict:
            self.decide(Verdict.from_json(verdict), published=True)
            return
        for r, value in beats.items():
            if value == EXITED:
                self.exited_peers.add(r)
            elif value != self._seen.get(r):
                self._seen[r], self._changed[r] = value, now
                _, node, pid = value.split()
                self.node_of[r], self.pid_of[r] = int(node), int(pid)
        quiet = {r: now - self._changed[r] for r in others if r not in self.exited_peers}
        if self._suspected is None and any(q > self.window() for q in quiet.values()):
            self._suspected = now
        if self._suspected is not None and now - self._suspected >= CONFIRM_BEATS * self.interval:
            # every rank whose beat has not changed since then: a live rank beats at every interval, and ranks of
            # one node that stopped a moment apart are named together (their last beats are up to a heartbeat
            # apart, and so is when this rank read them)
            lost = [r for r in quiet if self._changed[r] <= self._suspected]
            self._suspected = None
            if lost:  # else the silent one beat again meanwhile (a pause, not a loss)
                self.decide(self._verdict(lost, f"no heartbeat for {self.window():.0f} s"), published=False)

    def _store_silent(self, now: float, error: Exception) -> None:
        if now - self._store_ok <= self.window():
            return
        where = f"{self.address[0]}:{self.address[1]}"
        node0 = [r for r in range(self.world_size) if self.node_of[r] == 0 and r != self.rank]
        silence = (f"the rendezvous store in rank 0's process ({where}) did not answer for {self.window():.0f} s "
                   f"({type(error).__name__})")
        self.decide(self._verdict(node0 or [0], silence), published=None)

    def _verdict(self, lost: list[int], why: str) -> Verdict:
        because = f"; this rank's collective had failed: {self.evidence}" if self.evidence else ""
        advice = resume_advice(self.checkpoint() or self._known_checkpoint, self.save_folder, self.autoresume)
        message = (f"{describe_ranks(lost, self.node_of)} stopped answering after batch {self.batch()}: {why} "
                   f"(peers.timeout_s = {self.timeout_s:g}{because}). The other ranks stop too (exit status "
                   f"{LOST_PEERS_EXIT_CODE}); {advice}")
        return Verdict(lost, message)

    # --- the verdict ------------------------------------------------------------------------------------------
    def decide(self, verdict: Verdict, published: bool | None) -> None:
        """Stop this rank for ``verdict`` (from the heartbeat thread). ``published``: read from the store (True),
        decided here (False: the first verdict in the store wins), decided here without a store (None).

        The order of the exits matters: rank 0's exit takes the store with it, so it waits for the others to have
        read the verdict; and composer's launcher reports the status of its first rank and SIGTERMs the others as
        soon as one exits, so on every node the local rank 0 exits first, the others once it is gone. Then the main
        thread is woken (``after_failure`` raises ``LostPeers``) or, when it is stuck in a collective, the process
        ends here."""
        if published is False:
            with contextlib.suppress(Exception):
                winner = self.call(lambda client: client.compare_set(self.VERDICT, "", verdict.to_json()))
                verdict = Verdict.from_json(winner.decode())
        self.verdict = verdict
        self._stop.set()
        # whatever hangs from here on; the other local ranks later than their local rank 0
        guard = threading.Timer(EXIT_GUARD_S + (10 if self.local_rank else 0), self._exit_now)
        guard.daemon = True
        guard.start()
        if published is not None:
            self._acknowledge()
        if self.local_rank != 0:
            self._wait_for_local_rank0()
        if self._main_waits:
            self._woken.set()
            return
        print(f"error: {verdict.message}", file=sys.stderr)
        self._exit_now()

    def _acknowledge(self) -> None:
        if self.rank != 0:
            with contextlib.suppress(Exception):
                self.call(lambda client: client.set(self.ack_key(self.rank), "1"))
            return
        waiting = [self.ack_key(r) for r in range(1, self.world_size)
                   if r not in self.verdict.lost and r not in self.exited_peers]
        deadline = time.monotonic() + 2 * self.interval + 5
        while waiting and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                waiting = [k for k in waiting if not self.call(lambda client, k=k: client.check([k]))]
            time.sleep(0.1)

    def _wait_for_local_rank0(self) -> None:
        pid = self.pid_of.get(self.rank - self.local_rank)
        deadline = time.monotonic() + EXIT_GUARD_S + 5  # by then its guard has ended it
        while pid and _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    @staticmethod
    def _exit_now() -> None:
        _flush()
        os._exit(LOST_PEERS_EXIT_CODE)

    # --- the main thread, after its collective raised -----------------------------------------------------------
    def after_failure(self, error: BaseException) -> Verdict | None:
        """The main thread's collective raised ``error``: wait (bounded) for the heartbeat to name the lost ranks.
        None when none is lost (a peer that marked itself ``exited`` stopped on its own error): re-raise then."""
        self.evidence = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        self._main_waits = True
        deadline = time.monotonic() + self.window() + 3 * (self.interval + self.store_timeout) + 30
        while time.monotonic() < deadline and not self._woken.is_set():
            if self.verdict is None and (self.exited_peers or not self._thread_alive()):
                return None
            self._woken.wait(0.2)
        return self.verdict

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, exited but not yet reaped by its launcher, does not)."""
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def store_timeout(timeout_s: float) -> float:
    """Seconds one call to the store may take before it counts as unanswered."""
    return max(2.0, 2 * beat_interval(timeout_s))


def exit_lost_peers() -> None:
    """End this process with ``LOST_PEERS_EXIT_CODE`` at once (main thread, after ``LostPeers`` was reported), as
    the heartbeat thread does: Python's own teardown can wait in C++ destructors for long with the peers gone
    (measured: more than 18 s on a rank whose store had gone, long enough for its launcher's SIGTERM to end it
    with -15), and the atexit handlers free streaming's shared memory under its still running threads (tracebacks).
    The shared memory stays behind; a relaunch on the same host skips it (docs/FAULTS.md). SIGTERM is ignored from
    here: composer's launcher sends it to the node's other ranks as soon as one of them exits."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.shutdown()
    _flush()
    os._exit(LOST_PEERS_EXIT_CODE)


def node_local_signal_files() -> None:
    """Give composer's node signal file a per-node name (idempotent).

    composer 0.32.1 (``dist.get_node_signal_file_name``) broadcasts global rank 0's file name, ``node0`` included,
    so on every node local rank 0 writes ``<save_folder>/._signal_file_node0_XXXXXX`` at autoresume (and next to a
    downloaded checkpoint), the node's other ranks wait for it, and local rank 0 removes it. Nodes that share the
    save folder (a network file system, or two nodes on one host) write and remove the same file, and the second
    removal fails with FileNotFoundError before training starts (mosaicml/llm-foundry#1736). Here each node's
    name carries its own node rank: the same on every rank of a node, different between nodes."""
    from composer.utils import dist
    original = dist.get_node_signal_file_name
    if getattr(original, "per_node", False):
        return

    def per_node(rng=None) -> str:
        name = original(rng)
        return name.replace("._signal_file_node0_", f"._signal_file_node{dist.get_node_rank()}_", 1)

    per_node.per_node = True
    dist.get_node_signal_file_name = per_node


def _checkpoint_reader(trainer, save_folder: str | None):
    """A function returning the newest checkpoint this launch saved (rank 0), else the one it resumed from."""
    from composer.callbacks import CheckpointSaver

    from llmfoundry.train.checks import is_remote
    savers = [cb for cb in trainer.state.callbacks if isinstance(cb, CheckpointSaver)]
    latest = os.path.join(save_folder, "latest-rank0.pt") if save_folder and not is_remote(save_folder) else None
    load_path = str(trainer.state.load_path or "")
    resumed = load_path if save_folder and load_path.startswith(save_folder) else None

    def newest() -> str | None:
        saved = savers[0].saved_checkpoints if savers else []  # DDP: rank 0's only
        if saved:
            path = saved[-1]
            name = os.path.basename(os.path.dirname(path) if trainer.state.fsdp_sharded_state_dict_enabled else path)
            return f"{save_folder.rstrip('/')}/{name}" if save_folder else path
        if latest and os.path.exists(latest):  # the save folder is shared with rank 0 (a network file system)
            return os.path.realpath(latest)
        return resumed

    return newest


@contextlib.contextmanager
def watching(cfg, trainer):
    """Around ``fit`` (every rank enters it at the same point): start this rank's heartbeat; a collective that
    fails because ranks were lost becomes ``LostPeers``. Nothing happens with ``peers: null``, one process, or no
    ``MASTER_ADDR``/``MASTER_PORT`` (a process group not started from the environment)."""
    from composer.utils import dist

    from llmfoundry.train.resume import save_dir
    if (cfg.peers is None or dist.get_world_size() < 2 or not dist.is_initialized()
            or not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT")):
        yield None
        return
    timeout_s = cfg.peers.timeout_s
    state = trainer.state
    address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    watch = PeerWatch(address, dist.get_global_rank(), dist.get_world_size(), dist.get_node_rank(),
                      dist.get_local_rank(), timeout_s, batch=lambda: int(state.timestamp.batch),
                      checkpoint=_checkpoint_reader(trainer, save_dir(cfg)), save_folder=save_dir(cfg),
                      autoresume=cfg.autoresume, local_world_size=dist.get_local_world_size())
    watch.announce()
    dist.barrier()  # every rank's first beat is in the store
    watch.start()
    finished = False
    try:
        yield watch
        finished = True
    except Exception as e:
        if is_communication_error(e):
            verdict = watch.after_failure(e)
            if verdict is not None:
                raise LostPeers(verdict.message) from e
        finished = True
        raise
    finally:
        watch.stop(finished)
