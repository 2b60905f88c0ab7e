"""``preemption:`` (on by default with a ``save_folder``): SIGTERM ends the run at a checkpoint, exit status 75.

Schedulers stop a job with SIGTERM and, some seconds later, SIGKILL (SLURM: every process of the job, 30 s apart
by default; Kubernetes: the container's first process, ``terminationGracePeriodSeconds`` = 30 s; spot instances:
every process at shutdown). Left to itself composer turns SIGTERM into ``sys.exit(143)`` at once, and every batch
since the last periodic checkpoint is lost.

The path of a signal
--------------------
0. To the launcher (``composer -n N``): composer 0.32.1 handles it there too (``sys.exit(143)`` inside its wait
   loop), sends SIGTERM to every rank, waits up to 30 s (``CLEANUP_TIMEOUT``) and then SIGKILLs what is left: the
   batch and the save must fit in those 30 s. A launcher that dies without forwarding (SIGKILL, the OOM killer)
   still stops its ranks: each asked the kernel for ``SIGUSR2`` when its launcher exits (``PR_SET_PDEATHSIG``,
   Linux) and takes that signal as the request.
1. SIGTERM reaches a rank -> ``Preemption.request`` (from a watcher thread, so also while the main thread waits
   inside a collective): the rank notes it and starts the grace timer.
2. At every ``BATCH_END`` the ranks all-reduce (max) their request flags over a gloo group (host memory: no
   wait for the GPU): all of them stop after the same batch,
   the one that was running when the first signal arrived (the next one when an evaluation was running).
3. Each rank saves through composer's own ``CheckpointSaver`` (the usual file name, ``latest-rank0.pt`` moved to
   it, ``save_num_checkpoints_to_keep`` applied; with an ``s3://`` save_folder the upload and the
   ``latest-rank0.pt.symlink`` there are waited for), waits for the other ranks, and stops: ``train`` raises
   ``Preempted``, ``main`` prints ``preempted: ...`` and returns ``PREEMPTED_EXIT_CODE`` (75, ``EX_TEMPFAIL``:
   "temporary failure, run it again"). An evaluation due at that batch is skipped. The same command resumes there
   (``autoresume``), and ends bit for bit where an uninterrupted run would.
4. composer's launcher exits with the first non-zero rank status: 75.

Exits without a new checkpoint (status 143)
-------------------------------------------
- a second SIGTERM, ``SAME_SIGNAL_S`` (2 s) or more after the first (a signal sent to every process reaches a
  rank twice, directly and through the launcher, milliseconds apart: that is one request): ``os._exit(143)``;
- ``preemption.grace_period_s`` after the first signal with the save not finished (a batch, an evaluation or a
  peer that takes too long, a rank stuck in a collective): ``os._exit(143)``.
A request that arrives during the last batch lets the run finish as usual (status 0). Whatever the exit, the next
launch resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from composer.core import Callback

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # os.EX_TEMPFAIL
KILLED_EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a process killed by SIGTERM
# a SIGTERM sent to every process (SLURM, a process group) reaches each rank twice: directly, and forwarded by
# composer's launcher within milliseconds. Only one at least this long after the first counts as a second one.
SAME_SIGNAL_S = 2.0
LAUNCHER_GONE = signal.SIGUSR2  # PR_SET_PDEATHSIG: sent by the kernel when composer's launcher exits
_PR_SET_PDEATHSIG = 1


class Preempted(Exception):
    """The run stopped for a SIGTERM after saving ``checkpoint`` at ``batch``; the same command continues there."""

    def __init__(self, batch: int, checkpoint: str | None):
        self.batch, self.checkpoint = batch, checkpoint
        where = f"saved {checkpoint}" if checkpoint else "rank 0 saved the checkpoint"
        super().__init__(f"stopped after batch {batch} for a SIGTERM and {where}; run the same command again to "
                         f"continue from it (exit status {PREEMPTED_EXIT_CODE})")


@dataclass
class Preemption:
    """This process's view of a preemption: who asked for it, the grace timer, the signal state it replaced.

    Python runs signal handlers in the main thread only, between bytecodes, and that thread can sit for minutes
    inside one C++ call (a backward pass waiting on its gradient all-reduce, a collective waiting on a stuck peer).
    So the handlers here do nothing: the interpreter's C-level handler also writes each signal's number to a
    ``signal.set_wakeup_fd`` pipe, and a watcher thread reads it and acts at once (torch's collectives and
    backward release the GIL): it notes the request, starts the grace timer, ends the process on a second SIGTERM.
    """
    grace_period_s: float
    requested_by: str | None = None
    done: str | None = None  # the message, once every rank holds the checkpoint
    first_sigterm: float | None = None  # time.monotonic() of the first SIGTERM
    _timer: threading.Timer | None = None
    _pipe: tuple[int, int] | None = None
    _previous: dict = field(default_factory=dict)

    def install(self) -> None:
        """Watch SIGTERM and, under composer's launcher, its death (main thread only)."""
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        self._pipe = (read_end, write_end)
        self._previous["wakeup_fd"] = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, LAUNCHER_GONE):
            self._previous[sig] = signal.signal(sig, _noted_by_the_watcher)
        threading.Thread(target=self._watch, args=(read_end,), name="preemption-watcher", daemon=True).start()
        watch_launcher()

    def uninstall(self) -> None:
        """Back to the state found at ``install``, except that SIGTERM stays ignored after a preemption's save."""
        if self._timer is not None:
            self._timer.cancel()
        set_parent_death_signal(0)
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous.pop("wakeup_fd", -1))
        for sig, handler in self._previous.items():
            if not (self.done and sig == signal.SIGTERM):
                signal.signal(sig, handler)
        self._previous.clear()
        os.close(self._pipe[1])  # the watcher reads end-of-file and returns; it closes the read end
        self._pipe = None

    def _watch(self, read_end: int) -> None:
        try:
            while data := os.read(read_end, 64):
                for signum in data:
                    if signum == signal.SIGTERM:
                        self._on_sigterm()
                    elif signum == LAUNCHER_GONE:
                        self.request("the composer launcher exited (it was sent a signal)")
        finally:
            os.close(read_end)

    def _on_sigterm(self) -> None:
        now = time.monotonic()
        if self.done:
            return
        if self.first_sigterm is None:
            self.first_sigterm = now
            self.request("SIGTERM")
        elif now - self.first_sigterm >= SAME_SIGNAL_S:
            log.error("preemption: a second SIGTERM; exiting at once without a checkpoint (status %d); the next "
                      "launch resumes from the newest complete checkpoint", KILLED_EXIT_CODE)
            _flush()
            os._exit(KILLED_EXIT_CODE)

    def request(self, why: str) -> None:
        if self.requested_by is not None:
            return
        self.requested_by = why
        log.warning("preemption: %s; finishing this batch, then saving a checkpoint and exiting with status %d (a "
                    "second SIGTERM, or preemption.grace_period_s = %g s without a save, exits without one)", why,
                    PREEMPTED_EXIT_CODE, self.grace_period_s)
        self._timer = threading.Timer(self.grace_period_s, self._grace_over)
        self._timer.daemon = True
        self._timer.start()

    def _grace_over(self) -> None:
        if self.done:
            return
        log.error("preemption: no checkpoint within preemption.grace_period_s = %g s; exiting without one (status "
                  "%d); the next launch resumes from the newest complete checkpoint", self.grace_period_s,
                  KILLED_EXIT_CODE)
        _flush()
        os._exit(KILLED_EXIT_CODE)

    def saved(self, message: str) -> None:
        """The checkpoint is complete on every rank (main thread). From here on SIGTERM is ignored: this process
        is on its way out with status 75, and composer's launcher sends SIGTERM to the ranks still running once one
        rank has exited (a Python handler would not do: the interpreter resets those to the default, fatal, action
        while it exits). A process that hangs from here gets the scheduler's (or the launcher's) SIGKILL."""
        self.done = message
        if self._timer is not None:
            self._timer.cancel()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _noted_by_the_watcher(signum, frame) -> None:
    """The Python-level handler: nothing to do, ``Preemption._watch`` has acted on the signal already."""


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def set_parent_death_signal(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``: the kernel sends ``sig`` to this process when its parent exits (0 clears)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def is_composer_launcher(pid: int) -> bool:
    """True when ``pid`` runs composer's launcher (the ``composer`` command or ``python -m composer.cli.launcher``)."""
    import psutil
    try:
        cmd = psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):
        return False
    return any(a == "composer.cli.launcher" or os.path.basename(a) == "composer" for a in cmd[:3])


def watch_launcher() -> bool:
    """Under composer's launcher, get ``LAUNCHER_GONE`` when it exits: it forwards SIGTERM, but not a SIGKILL it
    gets itself. Not under a shell or another launcher: a rank whose shell exits (``nohup``) goes on training."""
    parent = os.getppid()
    if not is_composer_launcher(parent) or not set_parent_death_signal(LAUNCHER_GONE):
        return False
    if os.getppid() != parent:  # it exited before the kernel was asked
        os.kill(os.getpid(), LAUNCHER_GONE)
    return True


def cpu_group():
    """A gloo process group over all ranks (the default group itself when that is gloo), made collectively: every
    rank calls this at the same point. The per-batch agreement goes through it, so that it never waits for the GPU
    (an NCCL all-reduce read back with ``.item()`` would stall every step until the GPU drained)."""
    import torch.distributed as td
    return td.group.WORLD if td.get_backend() == "gloo" else td.new_group(backend="gloo")


def agreed(flag: bool, group) -> bool:
    """Whether any rank has ``flag`` set (every rank gets the same answer); ``group`` from ``cpu_group``, None
    for a single process."""
    if group is None:
        return flag
    import torch
    import torch.distributed as td
    t = torch.tensor([int(flag)], dtype=torch.int32)
    td.all_reduce(t, op=td.ReduceOp.MAX, group=group)
    return bool(t.item())


def checkpoint_name(saver, state, save_folder: str) -> str | None:
    """Where rank 0's newest checkpoint is: the local file (or sharded folder), or its ``s3://...`` address."""
    from composer.utils import dist, parse_uri
    if dist.get_global_rank() != 0 or not saver.saved_checkpoints:
        return None
    backend, bucket, _ = parse_uri(save_folder)
    if backend and saver.remote_file_name is not None:
        return f"{backend}://{bucket}/{saver.remote_file_name.format(state).lstrip('/')}"
    path = saver.saved_checkpoints[-1]
    return os.path.dirname(path) if state.fsdp_sharded_state_dict_enabled else path


def wait_for_upload(saver, state, logger) -> None:
    """With an ``s3://`` save_folder: return once this rank's checkpoint and ``latest-rank0.pt.symlink`` are in the
    bucket. composer uploads from helper processes (a process pool, and a multiprocessing manager process for its
    'upload failed' flag) that a SIGTERM sent to every process of the job kills as well; then this process uploads
    both itself (whole-file checkpoints; sharded ones are named by composer's uploader only)."""
    try:
        saver.fit_end(state, logger)  # waits for the upload, then uploads latest-rank0.pt.symlink
        return
    except Exception as e:  # noqa: BLE001 - whatever the dead helper processes left
        uploader = saver.remote_uploader
        if uploader is None or state.fsdp_sharded_state_dict_enabled:
            raise
        log.warning("preemption: composer's upload processes are gone (%s: %s); uploading from this process",
                    type(e).__name__, e)
    from composer.utils.file_helpers import create_symlink_file
    uploader.futures = []  # nothing left to wait for at close
    for executor in (uploader.upload_executor, uploader.check_remote_files_exist_executor):
        executor.shutdown(wait=False, cancel_futures=True)
    if not saver.saved_checkpoints:  # this rank wrote no file (DDP: rank 0 writes the checkpoint)
        return
    remote = saver.remote_file_name.format(state).lstrip("/")
    uploader.remote_backend.upload_object(object_name=remote, filename=saver.saved_checkpoints[-1])
    if saver.latest_remote_file_name is not None:
        link = os.path.join(saver.tmp_dir_for_symlink.name, "preempted.symlink")
        create_symlink_file(remote, link)
        uploader.remote_backend.upload_object(
            object_name=saver.latest_remote_file_name.format(state).lstrip("/") + ".symlink", filename=link)


class SaveAndStopOnPreemption(Callback):
    """At ``BATCH_END`` (after every other callback, before any evaluation of that batch): once any rank was asked
    to stop, save a checkpoint on every rank and raise ``Preempted``. Appended after composer's CheckpointSaver."""

    def __init__(self, preemption: Preemption, save_folder: str, group=None):
        self.preemption, self.save_folder, self.group = preemption, save_folder, group

    def batch_end(self, state, logger) -> None:
        from composer.callbacks import CheckpointSaver
        from composer.utils import dist

        from llmfoundry.train.resume import PruneEarlierCheckpoints
        if not agreed(self.preemption.requested_by is not None, self.group):
            return
        if state.timestamp >= state.max_duration:  # the last batch: the run ends (and saves) as usual
            return
        if self.preemption.requested_by is None:
            self.preemption.requested_by = "another rank"
            log.warning("preemption: another rank was asked to stop; saving a checkpoint after this batch")
        batch = int(state.timestamp.batch)
        savers = [cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)]
        for saver in savers:
            saver._symlink_upload_wait_before_next_try_in_seconds = 0.5  # composer looks every 30 s otherwise
            if saver.last_checkpoint_batch != state.timestamp.batch:
                saver._save_checkpoint(state, logger)
            wait_for_upload(saver, state, logger)
        for cb in state.callbacks:
            if isinstance(cb, PruneEarlierCheckpoints):
                cb.batch_checkpoint(state, logger)
        dist.barrier()  # no rank exits (and has the launcher stop the others) before every rank has saved
        stop = Preempted(batch, checkpoint_name(savers[0], state, self.save_folder) if savers else None)
        self.preemption.saved(str(stop))
        log.warning("preemption: %s", stop)
        raise stop


@contextlib.contextmanager
def handling(cfg, trainer):
    """Around ``fit``: SIGTERM stops the run at a checkpoint (see the module docstring). Nothing changes when
    ``preemption: null``, without a ``save_folder``, or outside the main thread (signal handlers live there)."""
    if cfg.preemption is None or not cfg.save_folder or threading.current_thread() is not threading.main_thread():
        yield None
        return
    from composer.utils import dist

    from llmfoundry.train.resume import save_dir
    preemption = Preemption(cfg.preemption.grace_period_s)
    group = cpu_group() if dist.get_world_size() > 1 else None
    trainer.state.callbacks.append(SaveAndStopOnPreemption(preemption, save_dir(cfg), group))
    preemption.install()
    try:
        yield preemption
    finally:
        preemption.uninstall()
