"""In-run ICL evaluation: the ``icl_tasks`` of a training YAML, scored during training, with the gauntlet.

``InRunICL`` is a composer callback (``train.py`` adds it when ``icl_tasks`` is non-empty). It evaluates every task
with the scorers ``scripts/eval.py`` uses (``llmfoundry.eval.icl.evaluate_icl_task``: language_modeling,
multiple_choice, schema, generation_task_with_answers), the run's tokenizer and prompts cut to ``icl_seq_len``
(default: ``model.max_seq_len``), and logs, through composer's logger (console, wandb, MLflow, TensorBoard):

- ``icl/<label>/<k>shot``: the task's accuracy at ``k`` shots;
- with ``eval_gauntlet``: ``icl/gauntlet/<category>``, ``icl/gauntlet/average`` and each named average
  (``llmfoundry/eval/gauntlet.py``, docs/GAUNTLET.md).

When: at the points the eval loader is evaluated. With an ``eval_loader`` it runs right after composer's
evaluators (``Event.EVAL_AFTER_ALL``); without one, on composer's own ``eval_interval`` schedule
(``composer.utils.create_interval_scheduler``, as each ``Evaluator`` gets it: every ``eval_interval`` and after the
last batch when that is not already on the interval). With an eval loader its time, like the evaluators', is left
out of the training wall-clock time; without one composer counts it in the next batch's time (that window's
throughput and MFU read lower).

Cost: each evaluation scores every task's evaluated examples. To keep it cheap, give a task ``max_examples`` (its
first N examples), or ``icl_subset_num_batches: N`` for every task: the first ``N x batch size`` examples, where
the batch size is the task's ``batch_size`` or else ``device_eval_batch_size`` (llm-foundry's key of that name);
the smaller limit wins. The chance accuracy the gauntlet uses is that of the examples evaluated.

Training is not perturbed: the model is put in eval mode under ``torch.no_grad`` (and the run's precision
context, as composer's evaluators), its train mode restored after; the Python, NumPy, torch and CUDA random states
are saved before and restored after; no parameter, optimizer, loader or timestamp is touched. A run with in-run ICL
ends with bit-identical weights to the same run without it (tests/test_icl_in_run.py).

Several processes: the network is called directly (inside DDP's wrapper, so no gradient hooks fire).

- DDP (``fsdp: null``): every rank holds the whole model; each evaluates every example by itself (redundant, no
  communication) and rank 0 logs. The cost in time is one rank's evaluation.
- FSDP (v1 and v2): the parameters are sharded and each forward all-gathers them, a collective. So every rank MUST
  run the same forwards in the same order: every rank evaluates every example of every task identically (the
  batches come from the tokenized prompts, the same on every rank) and rank 0 logs. Greedy generation decides
  when to stop from its argmax tokens; so that no rank can decide differently (and hang the others in a
  collective), each decoding step's last-position logits are broadcast from rank 0 (``LockstepNetwork``). The
  network's head is applied inside its forward (whole logits), never on the sharded weights afterwards.

Numbers: on CPU (fp32) the accuracies equal what ``scripts/eval.py`` computes on the checkpoint saved at the same
batch with the same ``device_eval_batch_size`` (tests/test_icl_in_run.py). On GPU with ``precision: amp_bf16`` the
forwards run under bf16 autocast, whereas scripts/eval.py casts the weights to bf16 by default: close, not equal.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from llmfoundry.eval.gauntlet import GauntletConfig, check_gauntlet, gauntlet_metrics, gauntlet_scores
from llmfoundry.eval.icl import evaluate_icl_task
from llmfoundry.eval.icl_tasks import ICLTaskConfig, load_task_examples, random_baseline
from llmfoundry.utils.config import ConfigError

log = logging.getLogger(__name__)

METRIC_PREFIX = "icl"


def metric_name(label: str, num_fewshot: int) -> str:
    """``icl/<label>/<k>shot``."""
    return f"{METRIC_PREFIX}/{label}/{num_fewshot}shot"


def limited_tasks(tasks: Sequence[ICLTaskConfig], subset_num_batches: Optional[int],
                  batch_size: int) -> list[ICLTaskConfig]:
    """The tasks with ``max_examples`` lowered to ``subset_num_batches x`` (task ``batch_size`` or ``batch_size``)
    where that is smaller (``subset_num_batches`` None: the tasks as given)."""
    if subset_num_batches is None:
        return list(tasks)
    out = []
    for t in tasks:
        limit = subset_num_batches * (t.batch_size or batch_size)
        out.append(dataclasses.replace(t, max_examples=min(limit, t.max_examples or limit)))
    return out


def check_task_files(tasks: Sequence[ICLTaskConfig]) -> None:
    """Read every task file (each mistake is one message naming the file and line) and check that it has enough
    examples for the largest ``num_fewshot``; before training, not at the first evaluation."""
    for i, task in enumerate(tasks):
        try:
            n = len(load_task_examples(task.path, task.type))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"icl_tasks.{i} ('{task.label}'): {e}") from None
        k = max(task.num_fewshot)
        if k > n - 1:
            raise ConfigError(f"icl_tasks.{i} ('{task.label}'): num_fewshot={k} needs at least {k + 1} examples in "
                              f"{task.path}, it has {n}; lower num_fewshot or use a larger task file")


# ----------------------------------------------------------------------------------------------------------------
# The network inside composer's model

def callable_network(model: torch.nn.Module) -> torch.nn.Module:
    """The module to call: ``ComposerMPT.model`` (an ``MPTForCausalLM``; under FSDP1 the FSDP unit wrapping it,
    under FSDP2 the sharded module itself), found under DDP's wrapper when there is one."""
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel):
        model = model.module
    net = getattr(model, "model", None)
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"in-run ICL evaluation needs composer's ComposerMPT (a .model network), got "
                        f"{type(model).__name__}")
    return net


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    past_key_values: Any = None


class LockstepNetwork:
    """The network of a sharded (FSDP) run, as the ICL scorers call it: whole forwards only (the scorers see no
    ``logits`` method, so they never apply the head to sharded weights), and in generation (``use_cache=True``)
    the last position's logits of rank 0 on every rank, so that every rank decodes the same tokens and stops at
    the same step. Every rank must make the same calls (FSDP's all-gathers are collectives)."""

    def __init__(self, network: torch.nn.Module):
        self.network = network
        self.config = getattr(network, "config", None)

    def __call__(self, input_ids: torch.Tensor, **kwargs) -> _Output:
        out = self.network(input_ids, **kwargs)
        if not kwargs.get("use_cache"):
            return _Output(out.logits, getattr(out, "past_key_values", None))
        last = out.logits[:, -1:].contiguous()
        if dist.get_world_size() > 1:
            dist.broadcast(last, src=0)
        return _Output(last, out.past_key_values)


# ----------------------------------------------------------------------------------------------------------------
# Random states

def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch (CPU) and, when CUDA is in use, this rank's GPU's random state."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# The callback

class InRunICL(Callback):
    """Score ``tasks`` during training and log ``icl/<label>/<k>shot`` (and the gauntlet); see the module docstring.

    ``batch_size``: rows per forward for tasks without their own (``device_eval_batch_size``, else the eval loader's
    batch); ``max_seq_len``: where prompts are cut (``icl_seq_len`` or ``model.max_seq_len``); ``eval_interval``:
    the run's (used when the run has no eval loader)."""

    def __init__(self, tasks: Sequence[ICLTaskConfig], tokenizer, *, max_seq_len: int, batch_size: int,
                 eval_interval: str, gauntlet: Optional[GauntletConfig] = None,
                 subset_num_batches: Optional[int] = None):
        from composer.utils import create_interval_scheduler
        self.tasks = limited_tasks(tasks, subset_num_batches, batch_size)
        check_task_files(self.tasks)
        if gauntlet is not None:
            try:
                check_gauntlet(gauntlet, self.tasks)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.gauntlet = gauntlet
        self.baselines = {t.label: random_baseline(t) for t in self.tasks}
        self.due = create_interval_scheduler(eval_interval, checkpoint_events=False, final_events={Event.FIT_END})
        self.last_batch: Optional[int] = None
        self.history: list[tuple[int, dict[str, float]]] = []  # (batch, metrics) of each evaluation (every rank)

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if state.evaluators:  # with an eval loader: whenever composer's evaluators have run
            due = event == Event.EVAL_AFTER_ALL
        elif event in (Event.BATCH_END, Event.EPOCH_END, Event.FIT_END):
            due = self.due(state, event)
        else:
            return
        if due and int(state.timestamp.batch) != self.last_batch:
            self.evaluate(state, logger)

    def evaluate(self, state: State, logger: Logger) -> dict[str, float]:
        """Score every task now and log the metrics (rank 0); every rank returns them."""
        from composer.core.precision import get_precision_context
        from composer.utils import model_eval_mode

        t0 = time.time()
        network = callable_network(state.model)
        runner = LockstepNetwork(network) if state.fsdp_enabled else network
        device = getattr(state.device, "_device", "cpu")
        rows = []
        saved = rng_states()
        try:
            with torch.no_grad(), model_eval_mode(state.model), get_precision_context(state.precision,
                                                                                      state.precision_config):
                for task in self.tasks:
                    for row in evaluate_icl_task(runner, self.tokenizer, task, max_seq_len=self.max_seq_len,
                                                 batch_size=self.batch_size, device=device):
                        row["random_baseline"] = self.baselines[task.label]
                        rows.append(row)
        finally:
            restore_rng_states(saved)
        metrics = {metric_name(r["task"], r["num_fewshot"]): r["accuracy"] for r in rows}
        if self.gauntlet is not None:
            metrics.update(gauntlet_metrics(gauntlet_scores(self.gauntlet, rows)))
        batch = int(state.timestamp.batch)
        self.last_batch = batch
        self.history.append((batch, metrics))
        if dist.get_global_rank() == 0:
            logger.log_metrics(metrics)
            summary = ", ".join(f"{k[len(METRIC_PREFIX) + 1:]} {v:.3f}" for k, v in metrics.items())
            log.info("in-run ICL at batch %d (%.1f s): %s", batch, time.time() - t0, summary)
        return metrics


def build_in_run_icl(cfg, tokenizer, batch_size: int) -> list[Callback]:
    """``[InRunICL]`` for a ``TrainConfig`` with ``icl_tasks`` (else ``[]``)."""
    if not cfg.icl_tasks:
        return []
    return [InRunICL(cfg.icl_tasks, tokenizer, max_seq_len=cfg.icl_seq_len or cfg.model.max_seq_len,
                     batch_size=batch_size, eval_interval=cfg.eval_interval, gauntlet=cfg.eval_gauntlet,
                     subset_num_batches=cfg.icl_subset_num_batches)]


__all__ = ["InRunICL", "LockstepNetwork", "build_in_run_icl", "limited_tasks", "metric_name", "callable_network"]
