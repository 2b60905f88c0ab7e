"""What a run keeps in its save folder across launches, and reads back when it resumes.

- ``ConfigCopy``: the resolved config as ``config.yaml`` next to the checkpoints, written when the first batch
  starts (a launch that fails before training leaves none); a changed config gets a time-stamped copy.
- ``BatchShapeRecorder`` + ``warn_batch_shape_changes``: ``global_train_batch_size``, ``max_seq_len`` and
  ``max_duration`` travel in every checkpoint; a resume with other values gets one warning line per value (the run
  goes on; for ``max_duration``, only when the schedule is measured in ``dur``).
- ``earlier_checkpoints`` + ``PruneEarlierCheckpoints``: ``save_num_checkpoints_to_keep`` also counts the
  checkpoints earlier launches of the run wrote (composer prunes only its own process's).
- ``check_local_checkpoints``: a checkpoint cut short while written (a process killed mid-save: composer writes the
  file, or each rank's file of a sharded folder, in place, then moves ``latest-rank0.pt`` to it) is renamed
  ``<name>.incomplete`` before autoresume, which then continues from the newest complete checkpoint
  (``latest-rank0.pt``) and says which; complete checkpoints that no link names stop the launch with the command
  that continues from the newest.
"""
from __future__ import annotations

import logging
import os
import re

from composer.core import Callback

from llmfoundry import checkpoint
from llmfoundry.train import checks
from llmfoundry.train.config import TrainConfig, config_to_yaml, run_name_of

log = logging.getLogger(__name__)


def save_dir(cfg: TrainConfig) -> str | None:
    """``save_folder`` with ``{run_name}`` filled in: the folder composer writes to (None when not saving)."""
    return cfg.save_folder.replace("{run_name}", run_name_of(cfg)) if cfg.save_folder else None


class ConfigCopy(Callback):
    """Writes the config copy (``save_config_copy``) when this process's first batch starts: a launch that stops
    before training (a config, data or checkpoint error, a save-folder conflict) leaves no config file behind.
    ``path``: where to write it (``config_copy_path``, decided when the run starts and named in its summary)."""

    def __init__(self, cfg: TrainConfig, path: str | None = None):
        self.cfg = cfg
        self.path = path
        self.written = False

    def batch_start(self, state, logger) -> None:
        if not self.written:
            self.written = True
            save_config_copy(self.cfg, self.path)


def config_copy_path(cfg: TrainConfig) -> str | None:
    """Where the resolved config goes (local save folders): ``config.yaml``, or a time-stamped name when an earlier
    launch left a different one (nothing is overwritten). None when there is no local save folder."""
    import time
    if not cfg.save_folder or checks.is_remote(cfg.save_folder):
        return None
    path = os.path.join(save_dir(cfg), "config.yaml")
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != config_to_yaml(cfg):
                path = os.path.join(save_dir(cfg), f"config-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    return path


def save_config_copy(cfg: TrainConfig, path: str | None = None) -> None:
    """Write the resolved config next to the checkpoints (local save folders, rank 0) at ``path`` (default:
    ``config_copy_path``); a file there with the same text is left as it is."""
    from composer.utils import dist
    path = path or config_copy_path(cfg)
    if path is None or dist.get_global_rank() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = config_to_yaml(cfg)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


class BatchShapeRecorder(Callback):
    """Records ``global_train_batch_size``, ``train_loader.max_seq_len`` and ``max_duration`` in every checkpoint;
    after a resume, ``previous`` holds those of the run that wrote the loaded checkpoint (None on a fresh start, or
    for a checkpoint written before this record existed).

    The checkpoint, not the newest ``config-*.yaml`` next to it, is the source of the previous values: the record
    belongs to exactly the checkpoint composer resumed (whole file or sharded, local or ``s3://``), whereas config
    copies are local only, are written only when the config changed (so the newest one need not be the last
    launch's), and can be edited or deleted by hand."""

    def __init__(self, cfg: TrainConfig):
        self.current = {"global_train_batch_size": cfg.global_train_batch_size,
                        "max_seq_len": cfg.train_loader.max_seq_len, "max_duration": str(cfg.max_duration)}
        self.previous: dict | None = None

    def state_dict(self) -> dict:
        return dict(self.current)

    def load_state_dict(self, state: dict) -> None:
        self.previous = dict(state)


def _warn_schedule_stretch(cfg: TrainConfig, old: str | None, batch: int, where: str) -> None:
    """A resume with another ``max_duration`` moves the end of a schedule measured in ``dur``: say so once."""
    sched = cfg.scheduler
    in_dur = [k for k in ("t_warmup", "t_max") if str(getattr(sched, k)).endswith("dur")]
    if not old or old == str(cfg.max_duration) or sched.name == "constant" or not in_dur:
        return
    fix = "set scheduler.t_warmup in batches"
    if "t_max" in in_dur:
        from composer.core import Time
        end = Time.from_timestring(old)
        fix = f"set scheduler.t_max={round(end.value * float(str(sched.t_max)[:-3]))}{end.unit.value}"
    log.warning("max_duration is %s but the run resumed from %s (batch %d) was scheduled for %s: scheduler.%s is a "
                "fraction of max_duration, so the %s schedule is recomputed over %s and the learning rate jumps "
                "to that schedule's value at batch %d instead of continuing the old one. To keep the old schedule, "
                "%s", cfg.max_duration, where, batch, old, "/".join(in_dur), sched.name, cfg.max_duration, batch, fix)


def warn_batch_shape_changes(cfg: TrainConfig, previous: dict | None, state, where: str) -> None:
    """One warning line per training shape that differs from the resumed run's (the run goes on)."""
    from llmfoundry.data.finetune import FinetuneLoaderConfig
    previous = previous or {}
    old, new = previous.get("global_train_batch_size"), cfg.global_train_batch_size
    batch, sample = int(state.timestamp.batch), int(state.timestamp.sample)
    if old and old != new:
        if isinstance(cfg.train_loader, FinetuneLoaderConfig):  # composer skips batches of the new size
            skipped, seen = int(state.timestamp.batch_in_epoch) * new, int(state.timestamp.sample_in_epoch)
            data = (f"the data resumes after {skipped} samples of this epoch, not the {seen} already seen (this "
                    f"loader's position is counted in batches)")
        else:
            data = f"the data continues at sample {sample} (the streaming loader's position is counted in samples)"
        log.warning("global_train_batch_size is %d but the run resumed from %s (batch %d, sample %d) trained with %d: "
                    "%s, while max_duration, the LR schedule and the save/eval intervals count batches, so each "
                    "remaining batch takes %d samples instead of %d. Set global_train_batch_size=%d to continue the "
                    "run as it was", new, where, batch, sample, old, data, new, old, old)
    try:  # a checkpoint at or past max_duration trains nothing (train.py says why): no schedule to warn about
        finished = state.timestamp.get(state.max_duration.unit) >= state.max_duration
    except (ValueError, KeyError, AttributeError):
        finished = False
    if not finished:
        _warn_schedule_stretch(cfg, previous.get("max_duration"), batch, where)
    old, new = previous.get("max_seq_len"), cfg.train_loader.max_seq_len
    if old and old != new:
        log.warning("train_loader.max_seq_len is %d but the run resumed from %s trained with %d: each sample now "
                    "has %d tokens instead of %d, so token counts (and any duration or schedule in tok) change; the "
                    "data position is kept. Set train_loader.max_seq_len=%d to continue the run as it was",
                    new, where, old, new, old, old)


_WHOLE_FILE = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")  # composer's default save_filename for rank 0
_SHARDED = re.compile(r"^ep(\d+)-ba(\d+)$")  # the folder of a sharded checkpoint (FSDP state_dict_type: sharded)


def _incomplete(path: str, sharded: bool) -> str | None:
    """Why the checkpoint at ``path`` is not complete (a few words), or None when it is."""
    if sharded:
        return checkpoint.sharded_checkpoint_problem(path)
    if checks.load_path_problem(path) is None:
        return None
    return f"{os.path.getsize(path)} bytes; cut short while it was written"


def _free_name(path: str) -> str:
    """``path``, or ``path.1``, ``path.2``, ... when taken (a batch cut short in two launches)."""
    n, free = 0, path
    while os.path.lexists(free):
        n += 1
        free = f"{path}.{n}"
    return free


def newer_checkpoint_message(folder: str, latest: str, newer: str) -> str:
    """A complete checkpoint newer than the one ``latest-rank0.pt`` names: both ways to go on."""
    return (f"save_folder {folder} holds a checkpoint newer than {os.path.realpath(latest)}, the one "
            f"latest-rank0.pt names and autoresume continues from: {newer}. If it is this run's (a process killed "
            f"after writing it, before moving the link), continue from it: ln -sfn {os.path.basename(newer)} "
            f"{latest}; to continue from the linked one instead, move the newer one aside: mv {newer} {newer}.bad")


def unlinked_checkpoint_message(folder: str, latest: str, newest: str) -> str:
    """Complete checkpoints but no ``latest-rank0.pt``: autoresume would start over beside them. Both ways on."""
    return (f"save_folder {folder} holds checkpoints but no latest-rank0.pt, the link autoresume continues from (a "
            f"process killed after its first save, before linking it, leaves this); the newest complete one is "
            f"{newest}. To continue from it: ln -sfn {os.path.basename(newest)} {latest}; to start over, move the "
            f"checkpoints aside (mv {folder} {folder}.old) or set another save_folder")


def check_local_checkpoints(cfg: TrainConfig, sharded: bool) -> str | None:
    """Before an autoresume from a local save folder (rank 0): what would stop it, or None.

    Each checkpoint (a rank-0 file, or a sharded folder) newer than the one ``latest-rank0.pt`` names (any, when
    there is no link yet) that is not complete (a 0-byte or truncated file, a folder without ``.metadata`` or with
    a rank's file short: a process killed while saving) is renamed ``<name>.incomplete``, and the log says which
    checkpoint the run continues from; composer would otherwise refuse the launch (whole files: "a future
    checkpoint") or leave the remains beside the new save (folders). The problems returned, for the caller to
    raise on every rank: a newer checkpoint that is complete (``latest-rank0.pt`` may have been moved back on
    purpose: the user chooses; for whole files composer's own check finds it, see ``train._save_conflict_message``),
    a linked sharded checkpoint that is incomplete (which one to continue from instead), and complete checkpoints
    with no link at all (composer would start over beside them; unless ``save_overwrite``)."""
    folder = save_dir(cfg)
    if not cfg.autoresume or not folder or checks.is_remote(folder) or not os.path.isdir(folder):
        return None
    name = _SHARDED if sharded else _WHOLE_FILE
    latest = os.path.join(folder, "latest-rank0.pt")
    linked = os.path.basename(os.path.realpath(latest)) if os.path.islink(latest) else None
    resumed_at = int(name.match(linked).group(2)) if linked and name.match(linked) else -1
    moved, newer = [], []
    for f in sorted(os.listdir(folder), key=lambda f: int(name.match(f).group(2)) if name.match(f) else -1):
        path = os.path.join(folder, f)
        m = name.match(f)
        is_unit = os.path.isdir(path) if sharded else os.path.isfile(path)
        if not m or int(m.group(2)) <= resumed_at or os.path.islink(path) or not is_unit:
            continue
        why = _incomplete(path, sharded)
        if why is None:
            newer.append(path)
            continue
        aside = _free_name(path + ".incomplete")
        os.replace(path, aside)
        moved.append(aside)
        log.warning("autoresume: %s is not a complete checkpoint (%s): renamed to %s", path, why,
                    os.path.basename(aside))
    if not linked and newer and not cfg.save_overwrite:
        return unlinked_checkpoint_message(folder, latest, newer[-1])
    if moved:
        log.warning("autoresume: continuing from the newest complete checkpoint, %s", os.path.realpath(latest)
                    if linked else f"none (no complete checkpoint in {folder}): starting from the beginning")
    if sharded and linked:
        why = _incomplete(os.path.realpath(latest), sharded)
        if why:
            return checks.incomplete_checkpoint_message(os.path.realpath(latest), why)
        if newer:
            return newer_checkpoint_message(folder, latest, newer[-1])
    return None


def _checkpoint_unit(path: str, sharded: bool) -> str:
    """What one checkpoint is on disk: the file, or for sharded checkpoints the folder of its ranks' files."""
    return os.path.dirname(path) if sharded else path


def earlier_checkpoints(cfg: TrainConfig, trainer, sharded: bool) -> list[str]:
    """Checkpoints in the local save folder that earlier launches of this run wrote, oldest first, up to the resumed
    one: whole-file checkpoints, or sharded checkpoint folders (``.metadata`` + one file per rank). Composer's
    CheckpointSaver records every checkpoint the run saved inside each checkpoint. Only on rank 0 (which prunes, as
    composer does) and only when ``save_num_checkpoints_to_keep`` >= 1; anything outside the run's save folder is
    never listed."""
    from composer.callbacks import CheckpointSaver
    from composer.utils import dist
    folder = save_dir(cfg)
    if (not folder or checks.is_remote(folder) or cfg.save_num_checkpoints_to_keep < 1
            or dist.get_global_rank() != 0):
        return []
    savers = [cb for cb in trainer.state.callbacks if isinstance(cb, CheckpointSaver)]
    if not savers:
        return []
    here, resumed_at = os.path.realpath(folder), int(trainer.state.timestamp.batch)
    found = {}
    for path, ts in savers[0].all_saved_checkpoints_to_timestamp.items():
        unit = _checkpoint_unit(path, sharded)
        exists = (os.path.isfile(os.path.join(unit, ".metadata")) if sharded else os.path.isfile(unit))
        if (int(ts.batch) <= resumed_at and exists and not os.path.islink(unit)
                and os.path.dirname(os.path.realpath(unit)) == here):
            found[unit] = int(ts.batch)
    return sorted(found, key=found.get)


class PruneEarlierCheckpoints(Callback):
    """``save_num_checkpoints_to_keep`` over the checkpoints of earlier launches of this run too (composer prunes
    only those its own process wrote): once this process has saved a checkpoint, the oldest earlier ones beyond
    the limit are deleted (files, or sharded folders). Appended after composer's CheckpointSaver, so it runs right
    after each save; the checkpoint resumed from stays until a newer one exists."""

    def __init__(self, trainer, earlier: list[str], keep: int, sharded: bool = False):
        self.trainer, self.earlier, self.keep, self.sharded = trainer, list(earlier), keep, sharded

    def _prune(self) -> None:
        import shutil
        written = list(dict.fromkeys(os.path.realpath(_checkpoint_unit(p, self.sharded))
                                     for p in self.trainer.saved_checkpoints))
        excess = len(self.earlier) + len(written) - self.keep
        if not written or excess <= 0:
            return
        for path in self.earlier[:excess]:
            if os.path.realpath(path) in written:
                continue
            try:
                shutil.rmtree(path) if self.sharded else os.remove(path)
                log.info("save_num_checkpoints_to_keep=%d: removed %s (written by an earlier launch of this run)",
                         self.keep, path)
            except FileNotFoundError:
                pass
        self.earlier = self.earlier[excess:]

    def batch_checkpoint(self, state, logger) -> None:
        self._prune()

    def epoch_checkpoint(self, state, logger) -> None:
        self._prune()

    def iteration_checkpoint(self, state, logger) -> None:
        self._prune()


class RestoreRNG(Callback):
    """A run resumed in the middle of an epoch continues with the random state its checkpoint saved.

    composer 0.32.1 restores a checkpoint's RNG state only at an epoch's first batch or while it skips batches of a
    dataloader; a streaming loader resumes by its own state (no skipping), so mid-epoch composer never restores it
    and dropout (and anything else random) diverges from an uninterrupted run. Here the saved state is loaded right
    after the first batch of the resumed run is fetched: the point at which an uninterrupted run, having just saved
    that checkpoint, fetched its next batch."""

    def __init__(self, trainer):
        self.trainer = trainer

    def after_dataloader(self, state, logger) -> None:
        rng = getattr(self.trainer, "_rng_state", None)  # composer keeps the loaded checkpoint's state here
        if rng is not None:
            from composer.utils import reproducibility
            reproducibility.load_rng_state(rng)
            self.trainer._rng_state = None
