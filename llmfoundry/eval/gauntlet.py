"""The gauntlet: one aggregate score over groups (categories) of ICL benchmarks.

Configured as ``eval_gauntlet:`` in a training YAML (logged as ``icl/gauntlet/<name>`` at every in-run ICL
evaluation, ``llmfoundry/train/callbacks/icl_eval.py``) or an eval YAML (``scripts/eval.py``: a ``gauntlet`` section in the
results file and a few rows in the table). The definition, with a worked example: ``docs/GAUNTLET.md``. In short:

* a **benchmark** is one ICL task (its ``label``) at one ``num_fewshot``. Its score is its accuracy ``a`` against
  the accuracy of guessing ``b`` (``random_baseline``; default: the task's own, ``icl_tasks.random_baseline``:
  the mean of ``1 / number of options`` for multiple choice and schema, 0 for language modeling and generation):
  ``a - b`` with ``subtract_random_baseline``, then divided by ``1 - b`` with ``rescale_accuracy``. So 0 is
  chance and 1 is every example right; a model worse than chance scores below 0 (not clamped: clamping would
  lift a chance-level model's expected score above 0, since its noise would only count upwards);
* a **category** scores the weighted mean of its benchmarks (``weighting``: ``equal``; ``sample_sz``, by the
  number of examples evaluated; ``log_sample_sz``, by its base-2 log, at least 1);
* ``average`` is the plain mean over categories; ``averages`` adds named means over chosen categories.

Everything here is plain data and arithmetic (no model, no torch): ``check_gauntlet`` (config against the ICL
tasks), ``gauntlet_scores`` (result rows -> scores) and ``gauntlet_metrics`` (scores -> metric names).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

WEIGHTINGS = ("equal", "sample_sz", "log_sample_sz")
AVERAGE = "average"  # the mean over every category, always reported
METRIC_PREFIX = "icl/gauntlet"


@dataclass
class GauntletBenchmark:
    """``eval_gauntlet.categories.N.benchmarks.M``: ICL task ``name`` (an ``icl_tasks`` label) at ``num_fewshot``
    shots; ``random_baseline``: the accuracy of guessing, in [0, 1) (default: the task's own)."""
    name: str
    num_fewshot: int = 0
    random_baseline: Optional[float] = None

    def __post_init__(self):
        if isinstance(self.num_fewshot, bool) or self.num_fewshot < 0:
            raise ValueError(f"gauntlet benchmark '{self.name}': num_fewshot = {self.num_fewshot!r} must be an integer "
                             ">= 0, one of the task's num_fewshot")
        b = self.random_baseline
        if b is not None and not (0.0 <= b < 1.0):
            raise ValueError(f"gauntlet benchmark '{self.name}': random_baseline = {b} must be in [0, 1) (the accuracy "
                             f"of guessing, e.g. 0.25 for four choices); leave it out to use the task's own")


@dataclass
class GauntletCategory:
    """``eval_gauntlet.categories.N``: a named group of benchmarks, scored as their weighted mean."""
    name: str
    benchmarks: list[GauntletBenchmark]

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"gauntlet category name {self.name!r} must be non-empty and without '/' (it becomes part "
                             "of a metric name)")
        if not self.benchmarks:
            raise ValueError(f"gauntlet category '{self.name}' has no benchmarks; list at least one, or remove it")
        seen = [(b.name, b.num_fewshot) for b in self.benchmarks]
        dup = sorted({s for s in seen if seen.count(s) > 1})
        if dup:
            raise ValueError(f"gauntlet category '{self.name}' lists the same benchmark twice: "
                             f"{', '.join(f'{n} ({k}-shot)' for n, k in dup)}; keep one")


@dataclass
class GauntletConfig:
    """``eval_gauntlet:``. See the module docstring and docs/GAUNTLET.md."""
    categories: list[GauntletCategory]
    weighting: Literal["equal", "sample_sz", "log_sample_sz"] = "equal"
    subtract_random_baseline: bool = True
    rescale_accuracy: bool = True
    averages: dict[str, list[str]] = field(default_factory=dict)  # name -> categories; 'average' (all) is always there

    def __post_init__(self):
        if not self.categories:
            raise ValueError("no categories; give at least one {name, benchmarks}")
        names = [c.name for c in self.categories]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"category names must be unique; repeated: {dup}")
        if self.rescale_accuracy and not self.subtract_random_baseline:
            raise ValueError("rescale_accuracy: true needs subtract_random_baseline: true (dividing an "
                             "accuracy that still holds the chance share by 1 - baseline can pass 1); set "
                             "rescale_accuracy: false or subtract_random_baseline: true")
        for avg, cats in self.averages.items():
            if avg == AVERAGE or avg in names or not avg or "/" in avg:
                raise ValueError(f"averages: the name {avg!r} is taken (by a category, or 'average', "
                                 "the mean over all categories, always reported) or not usable in a metric name; "
                                 "rename it")
            unknown = [c for c in cats if c not in names]
            if not cats or unknown:
                raise ValueError(f"averages.{avg} must list names of categories "
                                 f"({', '.join(names)}); " + (f"unknown: {unknown}" if unknown else "it is empty"))

    def average_groups(self) -> dict[str, list[str]]:
        """``{'average': every category, **averages}``."""
        return {AVERAGE: [c.name for c in self.categories], **self.averages}


def check_gauntlet(cfg: GauntletConfig, tasks: Sequence[Any], where: str = "eval_gauntlet") -> None:
    """Every benchmark must name an ICL task's ``label`` and one of that task's ``num_fewshot``: one ``ValueError``
    listing each one that does not, with the fix. ``tasks``: ``ICLTaskConfig``-like (``label``, ``num_fewshot``)."""
    shots = {t.label: list(t.num_fewshot) for t in tasks}
    problems = []
    for i, cat in enumerate(cfg.categories):
        for j, b in enumerate(cat.benchmarks):
            p = f"{where}.categories[{i}].benchmarks[{j}]"
            if b.name not in shots:
                labels = ", ".join(shots) or "none: icl_tasks is empty"
                problems.append(f"{p}: '{b.name}' (category '{cat.name}') is not the label of an icl_tasks entry "
                                f"(labels: {labels}); add that task to icl_tasks or remove the benchmark")
            elif b.num_fewshot not in shots[b.name]:
                problems.append(f"{p}: '{b.name}' at num_fewshot={b.num_fewshot} is not evaluated (the task's "
                                f"num_fewshot: {shots[b.name]}); add {b.num_fewshot} to that task's num_fewshot or "
                                f"use one of them")
    if problems:
        raise ValueError("; ".join(problems))


def benchmark_score(accuracy: float, random_baseline: float, subtract: bool = True, rescale: bool = True) -> float:
    """``accuracy - random_baseline`` (``subtract``), over ``1 - random_baseline`` (``rescale``): 0 = chance,
    1 = all correct, below 0 = worse than chance."""
    score = accuracy
    if subtract:
        score -= random_baseline
        if rescale:
            score /= 1.0 - random_baseline
    return score


def benchmark_weight(weighting: str, num_examples: int) -> float:
    """A benchmark's weight in its category: 1, its number of examples, or max(1, log2 of it)."""
    if weighting == "equal":
        return 1.0
    if weighting == "sample_sz":
        return float(num_examples)
    if weighting == "log_sample_sz":
        return max(1.0, math.log2(max(num_examples, 1)))
    raise ValueError(f"eval_gauntlet.weighting = {weighting!r}: use one of {list(WEIGHTINGS)}")


def gauntlet_scores(cfg: GauntletConfig, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Scores from ICL result rows (``task``, ``num_fewshot``, ``accuracy``, ``num_examples``, ``random_baseline``:
    the task's chance accuracy, used where a benchmark gives none), as JSON-ready data::

        {"categories": {name: {"score": s, "benchmarks": [{name, num_fewshot, accuracy, random_baseline, score,
                                                           weight, num_examples}, ...]}},
         "averages": {"average": s, **named}, "groups": {average name: [its categories]},
         "weighting": ..., "subtract_random_baseline": ..., "rescale_accuracy": ...}
    """
    by_key = {(r["task"], r["num_fewshot"]): r for r in rows}
    categories: dict[str, Any] = {}
    for cat in cfg.categories:
        benchmarks = []
        for b in cat.benchmarks:
            row = by_key.get((b.name, b.num_fewshot))
            if row is None:
                raise ValueError(f"eval_gauntlet: no result for '{b.name}' at {b.num_fewshot} shots (category "
                                 f"'{cat.name}'); evaluate that task at that num_fewshot")
            base = row["random_baseline"] if b.random_baseline is None else b.random_baseline
            benchmarks.append({
                "name": b.name, "num_fewshot": b.num_fewshot, "accuracy": row["accuracy"], "random_baseline": base,
                "score": benchmark_score(row["accuracy"], base, cfg.subtract_random_baseline, cfg.rescale_accuracy),
                "weight": benchmark_weight(cfg.weighting, row["num_examples"]), "num_examples": row["num_examples"]})
        total = sum(x["weight"] for x in benchmarks)
        categories[cat.name] = {"score": sum(x["score"] * x["weight"] for x in benchmarks) / total,
                                "benchmarks": benchmarks}
    averages = {name: sum(categories[c]["score"] for c in cats) / len(cats)
                for name, cats in cfg.average_groups().items()}
    return {"categories": categories, "averages": averages, "groups": cfg.average_groups(),
            "weighting": cfg.weighting, "subtract_random_baseline": cfg.subtract_random_baseline,
            "rescale_accuracy": cfg.rescale_accuracy}


def gauntlet_metrics(scores: Mapping[str, Any], prefix: str = METRIC_PREFIX) -> dict[str, float]:
    """``{prefix/<category>: score, prefix/average: score, prefix/<named average>: score}``."""
    out = {f"{prefix}/{name}": c["score"] for name, c in scores["categories"].items()}
    out.update({f"{prefix}/{name}": s for name, s in scores["averages"].items()})
    return out


def format_gauntlet_rows(scores: Mapping[str, Any], model_cell: str = "") -> list[str]:
    """Markdown table rows (``| gauntlet | - | <name> | score | n |``) for ``evaluate.format_table``."""
    lines = []
    for name, c in scores["categories"].items():
        n = len(c["benchmarks"])
        lines.append(f"{model_cell}| gauntlet | - | {name} | {c['score']:.4f} | {n} benchmark{'s' * (n != 1)} |")
    for name, s in scores["averages"].items():
        n = len(scores["groups"][name])
        lines.append(f"{model_cell}| gauntlet | - | {name} | {s:.4f} | {n} categor{'ies' if n != 1 else 'y'} |")
    return lines


__all__ = ["GauntletBenchmark", "GauntletCategory", "GauntletConfig", "WEIGHTINGS", "AVERAGE", "check_gauntlet",
           "benchmark_score", "benchmark_weight", "gauntlet_scores", "gauntlet_metrics", "format_gauntlet_rows"]
