"""``callbacks.profiler``: a torch.profiler trace of a few training batches, and where their time went.

The trace covers whole batches from the start of batch ``start_batch`` to the start of batch ``start_batch +
num_batches`` (so the host work between optimizer steps, the data loading and the trainer's bookkeeping, is in
it), on every rank: ``<folder>/rank<r>.batch<a>-<b>.json.gz``, a gzipped Chrome trace that Perfetto
(ui.perfetto.dev) or chrome://tracing opens (MPT-1B: ~30 MB of JSON for two steps before compression). Rank 0
logs a summary read back from its trace::

    profiler: batches 5-6 on rank 0: wall 4312.0 ms, GPU busy 4250.1 ms (98.6%), idle 61.9 ms (longest gap
    18.2 ms); GPU time by kind: matmul 2780.3, attention 494.1, ...

``GPU busy`` is the union of kernel, memcpy and memset intervals on the GPU. The share of the wall time the GPU
was idle is what the trainer's host side costs (the difference between a training step and the same model's
forward/backward in a bare loop, ``bench/profile_step.py``).
"""
from __future__ import annotations

import gzip
import json
import logging
import time
from pathlib import Path

import torch
from composer.core import Callback

log = logging.getLogger(__name__)

# kind of kernel -> name fragments (checked in this order, case-insensitively)
KERNEL_GROUPS = [
    ("norm", ("layer_norm",)),  # Inductor's (fused with the residual adds) or torch's
    ("attention", ("_fwd_kernel", "_bwd_", "_kmax_kernel", "flex", "attention")),
    ("gelu", ("gelu_",)),  # ours (kernels/gelu.py) or Inductor's fused ones
    ("matmul", ("gemm", "nvjet", "sm90_xmma", "cutlass", "matmul", "_mm_")),
    ("fp8 scaling", ("amax", "clamp")),  # precision amp_fp8: torchao's scale reductions and casts (Inductor's)
    ("communication", ("nccl",)),
    ("optimizer", ("_lion_kernel", "foreach", "multi_tensor")),
    ("loss", ("_ce_kernel", "log_softmax", "nll_loss", "cross_entropy")),
    ("copies", ("copy", "memcpy", "memset", "chunk_cat")),
]
_GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
TOP = 10  # kernels named in the summary, by total GPU time


# Inductor's pointwise, reduction and persistent-reduction kernels: never a matrix product, though their names may
# name the one they feed (``triton_poi_fused__scaled_mm__to_copy_clamp_...``: a cast to float8 for ``_scaled_mm``)
_INDUCTOR_ELEMENTWISE = ("triton_poi_", "triton_red_", "triton_per_")


def kernel_group(name: str) -> str:
    """The kind of a GPU kernel from its name (``other`` when none matches)."""
    low = name.lower()
    for group, keys in KERNEL_GROUPS:
        if group == "matmul" and low.startswith(_INDUCTOR_ELEMENTWISE):
            continue
        if any(k.lower() in low for k in keys):
            return group
    return "other"


def summarize_trace(trace: dict) -> dict:
    """GPU time of a Chrome trace (torch.profiler's export): ``busy_ms`` (the union of GPU intervals over all
    streams), ``span_ms`` (first GPU start to last GPU end), ``longest_gap_ms`` (the longest stretch with no GPU
    work inside the span), ``groups`` (kernel time per ``kernel_group``, ms, overlaps counted per kernel) and
    ``top`` (the ``TOP`` kernels by total time: name -> [ms, calls])."""
    spans, groups, kernels = [], {}, {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or e.get("cat") not in _GPU_CATEGORIES:
            continue
        start, dur = float(e["ts"]), float(e.get("dur", 0.0))
        spans.append((start, start + dur))
        name = e.get("name", "")
        g = kernel_group(name)
        groups[g] = groups.get(g, 0.0) + dur / 1e3
        ms_calls = kernels.setdefault(name, [0.0, 0])
        ms_calls[0] += dur / 1e3
        ms_calls[1] += 1
    if not spans:
        return {"busy_ms": 0.0, "span_ms": 0.0, "longest_gap_ms": 0.0, "groups": {}, "top": {}}
    spans.sort()
    busy = gap = 0.0
    cur_start, cur_end = spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gap = max(gap, start - cur_end)
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    return {"busy_ms": busy / 1e3, "span_ms": (spans[-1][1] - spans[0][0]) / 1e3, "longest_gap_ms": gap / 1e3,
            "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "top": dict(sorted(kernels.items(), key=lambda kv: -kv[1][0])[:TOP])}


def format_summary(summary: dict, wall_ms: float, first: int, last: int, rank: int) -> str:
    busy = summary["busy_ms"]
    text = f"profiler: batches {first}-{last} on rank {rank}: wall {wall_ms:.1f} ms"
    if not summary["groups"]:
        return text + " (no GPU activity recorded)"
    groups = ", ".join(f"{g} {ms:.1f}" for g, ms in summary["groups"].items())
    top = "; ".join(f"{name[:90]} {ms:.1f} x{calls}" for name, (ms, calls) in summary.get("top", {}).items())
    return (f"{text}, GPU busy {busy:.1f} ms ({100 * busy / wall_ms:.1f}%), idle {wall_ms - busy:.1f} ms (longest "
            f"gap {summary['longest_gap_ms']:.1f} ms); GPU time by kind (ms): {groups}; top kernels (ms x calls): "
            f"{top}")


class TraceProfiler(Callback):
    """Profiles ``num_batches`` batches from the first batch >= ``start_batch`` (see the module docstring)."""

    def __init__(self, folder: str, start_batch: int, num_batches: int, record_shapes: bool = False,
                 with_stack: bool = False):
        self.folder, self.start_batch, self.num_batches = folder, start_batch, num_batches
        self.record_shapes, self.with_stack = record_shapes, with_stack
        self._prof = None
        self._first = None
        self._t0 = 0.0
        self.summary: dict | None = None  # rank 0's summary once written (also logged)
        self.trace_path: Path | None = None

    def batch_start(self, state, logger) -> None:
        batch = int(state.timestamp.batch)
        if self._prof is None and self._first is None and batch >= self.start_batch:
            self._begin(batch)
        elif self._prof is not None and batch >= self._first + self.num_batches:
            self._end(state, batch - 1)

    def fit_end(self, state, logger) -> None:
        if self._prof is not None:
            self._end(state, int(state.timestamp.batch) - 1)

    def _begin(self, batch: int) -> None:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self._prof = profile(activities=activities, record_shapes=self.record_shapes, with_stack=self.with_stack)
        self._prof.start()
        self._first, self._t0 = batch, time.perf_counter()

    def _end(self, state, last: int) -> None:
        from composer.utils import dist
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self._t0) * 1e3
        self._prof.stop()
        rank = dist.get_global_rank()
        folder = Path(self.folder.format(run_name=state.run_name))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank{rank}.batch{self._first}-{last}.json.gz"
        self._prof.export_chrome_trace(str(path))
        self._prof = None
        self.trace_path = path
        if rank == 0:
            with gzip.open(path, "rt") as f:
                self.summary = summarize_trace(json.load(f))
            self.summary["wall_ms"] = wall_ms
            log.info("%s; trace: %s", format_summary(self.summary, wall_ms, self._first, last, rank), path)
