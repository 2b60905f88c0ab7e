"""A data curriculum: the stream mixture of the training loader changes at given points of the run.

YAML (``train_loader.curriculum``, a list of points; read into ``CurriculumPoint``)::

    train_loader:
      streams:
        web:  {local: /data/web,  proportion: 0.9}
        code: {local: /data/code, proportion: 0.1}
      curriculum:
        - at: 0.8                                # from 80% of max_duration on ...
          proportions: {web: 0.5, code: 0.5}     # ... half of every batch is code

* Before the first point the streams' own weights apply (``proportion`` / ``repeat`` / ``choose``, or their sizes);
  a point ``at: 0`` replaces them from the start.
* ``at``: a fraction of ``max_duration`` (0 <= at < 1), or a time: ``'5000ba'`` (batches), ``'2000000sp'``
  (samples) or ``'4000000000tok'`` (tokens: every batch counts global_train_batch_size x max_seq_len). A point
  takes effect at a batch boundary: the mixture of ``at: '5000ba'`` is drawn from the 5001st batch on, once 5000
  batches are trained; a point between two batch boundaries moves to the next one. Points must come in order, at
  least one batch apart, and before ``max_duration``.
* ``proportions``: every stream's share from that point on (until the next point, or the end of the run and
  beyond), relative as the streams' ``proportion`` (0.6/0.4 and 3/2 are the same mixture; 0 leaves a stream out).
  Every stream is named in every point, so that each mixture reads whole.
* ``max_duration`` is then in batches, samples or tokens (``ep`` is refused: see epochs below).

How it is drawn. The loader's dataset draws each phase (from one point to the next) as exactly its batches'
samples, from its streams by that phase's mixture (streaming's up/down-sampling per stream, shuffled with
``shuffle_seed`` as usual). A phase is one or more of the dataset's epochs: one longer than an epoch without
curriculum (``epoch_size``, else the streams' samples under their own weights) is cut into epochs of that many
samples (rounded down to whole global batches). After the last point come epochs of that size in the last
mixture. So the sample order depends on the seed, the streams, the points, ``max_duration`` (fractional points)
and ``global_train_batch_size``.

Composer's epoch counter (``ep`` in checkpoint names, ``time/epoch``) counts these epochs: it rises at every
change of mixture.

Resumption. A checkpoint stores the dataset's epoch and the sample within it (as for any text loader), so a run
resumed anywhere, inside a phase or exactly at a change, trains on the same samples as one that never stopped.
Resuming with another plan (points, proportions, ``max_duration`` with fractional points, global batch size or
``max_seq_len`` with token points) is allowed and logged as a warning: the run continues at the saved position of
the new plan, which is not the sequence the old one would have drawn.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from llmfoundry.utils.config import ConfigError, closest

__all__ = ["CurriculumPoint", "Phase", "Schedule", "check_points", "plan_phases", "check_run", "describe"]

TIME_UNITS = {"ba": "batches", "sp": "samples", "tok": "tokens"}


@dataclass
class CurriculumPoint:
    """One entry of ``train_loader.curriculum``: from ``at`` on, the streams are mixed by ``proportions``.

    at: a fraction of max_duration in [0, 1), or 'Nba' / 'Nsp' / 'Ntok'.
    proportions: stream name -> share (relative; >= 0, not all 0), one for every stream.
    """
    at: float | str
    proportions: dict[str, float]

    def __post_init__(self):
        if isinstance(self.at, float):
            if not 0 <= self.at < 1:
                whole = f"'{int(self.at)}ba'" if self.at == int(self.at) else "'5000ba'"
                raise ValueError(f"at = {self.at:g} is read as a fraction of max_duration and must be in [0, 1); "
                                 f"for a number of batches write it with its unit, e.g. {whole}")
        else:
            _split_time(self.at)
        if not self.proportions:
            raise ValueError(f"the point at {self.at!r} gives no proportions: give every stream's share, e.g. "
                             f"proportions: {{web: 0.5, code: 0.5}}")
        for name, p in self.proportions.items():
            if not math.isfinite(p) or p < 0:
                raise ValueError(f"the point at {self.at!r}: proportion {p} of stream '{name}' must be a number >= 0 "
                                 f"(0 leaves the stream out)")
        if sum(self.proportions.values()) <= 0:
            raise ValueError(f"the point at {self.at!r} gives every stream proportion 0: at least one stream needs a "
                             f"share > 0 for batches to be drawn")


def _split_time(at: str) -> tuple[int, str]:
    """'5000ba' -> (5000, 'ba'); a ValueError naming the accepted forms otherwise."""
    for unit in sorted(TIME_UNITS, key=len, reverse=True):
        number = at[: -len(unit)] if at.endswith(unit) else ""
        if number.isdigit():
            return int(number), unit
    raise ValueError(f"at = {at!r} is neither a fraction of max_duration (0 <= at < 1, e.g. 0.8) nor a time in "
                     f"batches, samples or tokens (e.g. '5000ba', '2000000sp', '4000000000tok')")


def check_points(points: list[CurriculumPoint], streams: list[str]) -> None:
    """What can be checked without the run: each point names exactly the loader's streams (ValueError)."""
    if len(streams) < 2:
        raise ValueError("a curriculum changes the mixture of several streams, and this loader has a single source: "
                         "give 'streams' (two or more, name -> {remote/local, ...}), or remove 'curriculum'")
    if not points:
        raise ValueError("'curriculum' is empty: give at least one point {at, proportions}, or remove it")
    for i, point in enumerate(points):
        for name in point.proportions:
            if name not in streams:
                raise ValueError(f"curriculum[{i}] (at {point.at!r}) names stream '{name}', which is not one of the "
                                 f"loader's streams {streams}{closest(name, streams)}")
        missing = [s for s in streams if s not in point.proportions]
        if missing:
            raise ValueError(f"curriculum[{i}] (at {point.at!r}) gives no proportion for {missing}: give every "
                             f"stream's share (0 to leave one out), so that the mixture from that point is explicit")


@dataclass(frozen=True)
class Phase:
    """From batch ``start`` (0-based: ``start`` batches trained before it) on, the streams mixed by ``proportions``
    (stream name -> share; None: the streams' own weights)."""
    start: int
    proportions: dict[str, float] | None


def _batches(value: int, unit: str, global_batch: int, seq_len: int) -> int:
    """A time in ba/sp/tok as a number of whole batches (the batch boundary at or after it)."""
    per_batch = {"ba": 1, "sp": global_batch, "tok": global_batch * seq_len}[unit]
    return -(-value // per_batch)


def _start(at: float | str, total: int, global_batch: int, seq_len: int) -> int:
    """The batch boundary of a point: a fraction of ``total`` batches, or a time."""
    if isinstance(at, float):
        exact = at * total
        return round(exact) if abs(exact - round(exact)) < 1e-6 else math.ceil(exact)
    return _batches(*_split_time(at), global_batch, seq_len)


def plan_phases(points: list[CurriculumPoint], max_duration: str, global_batch: int,
                seq_len: int) -> list[Phase]:
    """The phases of a run: the points as batch boundaries, checked against ``max_duration`` (ConfigError)."""
    from composer.core import Time
    duration = Time.from_timestring(max_duration)
    if duration.unit.value not in TIME_UNITS:
        raise ConfigError(f"train_loader.curriculum needs max_duration in batches, samples or tokens, got "
                          f"{max_duration!r}: with a curriculum composer's epoch ends at every change of mixture, so "
                          f"epochs do not measure the run. Fix: e.g. max_duration: '10000ba'")
    total = _batches(int(duration.value), duration.unit.value, global_batch, seq_len)
    phases, previous = [], None
    for i, point in enumerate(points):
        start = _start(point.at, total, global_batch, seq_len)
        where = f"train_loader.curriculum[{i}] (at {point.at!r}, batch {start})"
        if start >= total:
            raise ConfigError(f"{where} is at or beyond max_duration = {max_duration} ({total} batches of "
                              f"{global_batch} samples): its mixture would never be drawn. Fix: move the point before "
                              f"the end, remove it, or raise max_duration")
        if previous is not None and start <= previous[1]:
            raise ConfigError(f"{where} does not come after curriculum[{previous[0]}] (at {points[previous[0]].at!r}, "
                              f"batch {previous[1]}): points must be in order and at least one batch apart. Fix: sort "
                              f"the points by 'at', or merge the two")
        phases.append(Phase(start, dict(point.proportions)))
        previous = (i, start)
    return phases if phases[0].start == 0 else [Phase(0, None), *phases]


def check_run(train_loader, eval_loader, max_duration: str, global_batch: int) -> None:
    """The run-level checks of ``train_loader.curriculum`` (before any work; ConfigError)."""
    if getattr(eval_loader, "curriculum", None):
        raise ConfigError("eval_loader.curriculum: a curriculum changes the training mixture; the eval loader reads "
                          "its streams as given. Fix: remove eval_loader.curriculum")
    points = getattr(train_loader, "curriculum", None)
    if points:
        plan_phases(points, max_duration, global_batch, train_loader.max_seq_len)


def describe(phases: list[Phase]) -> str:
    """For the log: 'batches 0-3: web 90%, code 10% | from batch 4: web 50%, code 50%'."""
    parts = []
    for i, phase in enumerate(phases):
        if phase.proportions is None:
            mix = "the streams' own weights"
        else:
            whole = sum(phase.proportions.values())
            mix = ", ".join(f"{n} {100 * p / whole:.3g}%" for n, p in phase.proportions.items())
        end = phases[i + 1].start - 1 if i + 1 < len(phases) else None
        parts.append(f"batches {phase.start}-{end}: {mix}" if end is not None else f"from batch {phase.start}: {mix}")
    return " | ".join(parts)


@dataclass
class Schedule:
    """What the dataset draws in each of its epochs: ``epochs[e]`` = (samples, share per stream in the dataset's
    stream order) for the epochs of the phases before the last point; every later epoch draws ``last``."""
    epochs: list[tuple[int, tuple[float, ...]]]
    last: tuple[int, tuple[float, ...]]

    def at_epoch(self, epoch: int) -> tuple[int, tuple[float, ...]]:
        return self.epochs[epoch] if epoch < len(self.epochs) else self.last

    def signature(self) -> str:
        """A short hash of the plan, stored with the loader's position (a resume with another plan is logged)."""
        text = json.dumps([self.epochs, self.last])
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def build_schedule(phases: list[Phase], stream_names: list[str], own_shares: list[float], epoch_size: int,
                   global_batch: int) -> Schedule:
    """Cut the phases into epochs. ``own_shares``: the streams' own weights as shares (streaming's derived
    proportions); ``epoch_size``: samples of an epoch without curriculum (the cut for long phases, and the size
    of the epochs after the last point)."""
    def shares(phase: Phase) -> tuple[float, ...]:
        if phase.proportions is None:
            return tuple(float(p) for p in own_shares)
        return tuple(float(phase.proportions[n]) for n in stream_names)

    cut = max(global_batch, epoch_size // global_batch * global_batch)
    epochs = []
    for phase, following in zip(phases, phases[1:]):
        samples = (following.start - phase.start) * global_batch
        while samples > 0:
            epochs.append((min(cut, samples), shares(phase)))
            samples -= cut
    return Schedule(epochs, (epoch_size, shares(phases[-1])))


def choose_per_stream(samples: int, shares: tuple[float, ...], seed: int) -> np.ndarray:
    """How many samples each stream gives to an epoch of ``samples``: proportional to ``shares``; the few left by
    rounding down go to distinct streams of nonzero share, picked with ``seed``."""
    weights = np.asarray(shares, dtype=np.float64)
    weights = weights / weights.sum()
    choose = np.floor(samples * weights).astype(np.int64)
    shortfall = samples - int(choose.sum())
    if shortfall:
        candidates = np.flatnonzero(weights > 0)
        picked = np.random.default_rng(seed).choice(candidates, min(shortfall, len(candidates)), replace=False)
        choose[picked] += 1
        choose[candidates[0]] += samples - int(choose.sum())  # only when shortfall > streams: cannot happen
    return choose


def apply_epoch(dataset, schedule: Schedule, epoch: int) -> None:
    """Set a streaming dataset's per-stream draws and epoch size for ``epoch`` (before its work is generated)."""
    samples, shares = schedule.at_epoch(epoch)
    choose = choose_per_stream(samples, shares, dataset.shuffle_seed + epoch)
    for stream, n, available in zip(dataset.streams, choose, dataset.samples_per_stream):
        stream.choose = int(n)
        stream.repeat = int(n) / int(available)
        stream.proportion = int(n) / samples
    dataset.epoch_size = samples
    dataset.length = math.ceil(samples / dataset._parallel_rank_world.num_ranks)
