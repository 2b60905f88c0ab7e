"""``callbacks.sample_generations`` (off by default): what the model writes for a few fixed prompts, while it trains.

Every ``interval`` batches, and once more after the last batch (unless that batch was just sampled), the model
continues each of ``prompts`` by up to ``max_new_tokens`` tokens: greedily with ``temperature: 0`` (the default),
else sampled with ``temperature`` / ``top_k`` / ``top_p`` from a generator seeded with ``seed`` at every round (the
same weights give the same text). The end-of-text token ends a completion. What the user gets:

- one log line per prompt (logger ``llmfoundry``, level info)::

      sample @ba500 | def  -> fib(n):\\n    if n < 2:\\n        return n ... (+312 chars)

  newlines and tabs shown as ``\\n`` / ``\\t``, the prompt cut at 60 characters and the completion at 200;
- a table ``samples`` (columns ``batch``, ``prompt``, ``completion``; one row per prompt) in every logger that keeps
  tables: wandb (a table at each sampled step), MLflow (the artifact ``samples.json``, rows appended), composer's
  file logger. Composer's console logger is left out: it would print every table again at each console log line;
  the log lines above stand for it;
- ``{save_folder}/samples.jsonl`` when ``save_folder`` is local: one ``{"batch", "prompt", "completion"}`` object
  per line, appended as the run goes. A run that resumes first drops the lines of batches after the checkpoint
  it resumed from (they are sampled again), so the file describes one run.

How a round goes (``SampleGenerations.sample``): the prompts, encoded once with the run's tokenizer (``tokenizer:``),
are decoded ``batch_size`` at a time, left-padded, with the KV cache (``llmfoundry.models.mpt.generate``), the
network in eval mode under ``torch.no_grad`` and the run's precision (autocast for ``amp_bf16``). Afterwards every
module is back in the mode it had, and the global random states (torch's CPU and CUDA generators, python's and
numpy's), saved before, are restored: the run trains as it would without the callback, to the same weights bit
for bit.

Several ranks: with DDP (or one process) rank 0 alone generates, while the others go on to the next batch and
wait for it at the gradient all-reduce. A sharded model (FSDP1 or FSDP2) needs every rank in every forward, so
every rank generates the same prompts with the same seed, always for exactly ``max_new_tokens`` steps (stopping
at the end-of-text token would let a rank whose numbers came out differently stop sooner and leave the others
waiting); the tokens after it are dropped afterwards. Rank 0 logs and writes.

Checked when the trainer is built (``Event.INIT``, before any batch), with the real tokenizer: every prompt has
tokens, and its tokens plus ``max_new_tokens`` fit in ``model.max_seq_len``; the message names the prompt's
index and the lengths.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from composer.core import Callback, State, get_precision_context
from composer.loggers import Logger
from composer.utils import dist

from llmfoundry.utils.config import ConfigError

log = logging.getLogger(__name__)

KEY = "callbacks.sample_generations"
SAMPLES_FILE = "samples.jsonl"
COLUMNS = ["batch", "prompt", "completion"]


# ------------------------------------------------------------------------------------------------ checks
def check_prompt_lengths(lengths: Sequence[int], max_new_tokens: int, max_seq_len: int) -> None:
    """A ``ConfigError`` naming the first prompt that has no tokens, or whose tokens plus ``max_new_tokens`` do not
    fit in ``max_seq_len``, with both lengths and the fix."""
    for i, n in enumerate(lengths):
        if n == 0:
            raise ConfigError(f"{KEY}.prompts[{i}] encodes to no tokens; give it some text")
        if n + max_new_tokens > max_seq_len:
            room = max_seq_len - n
            lower = f", or lower max_new_tokens to {room}" if room > 0 else ""
            raise ConfigError(f"{KEY}.prompts[{i}] is {n} tokens long and max_new_tokens = {max_new_tokens}: "
                              f"{n + max_new_tokens} positions, more than model.max_seq_len = {max_seq_len}. "
                              f"Shorten the prompt to at most {max(max_seq_len - max_new_tokens, 0)} tokens{lower}")


def run_tokenizer_name(state: State) -> str | None:
    """The run's ``tokenizer:`` as the trainer records it in checkpoints (``ModelConfigRecorder``)."""
    from llmfoundry.checkpoint import RECORDER_NAME
    names = [cb.tokenizer for cb in state.callbacks if type(cb).__name__ == RECORDER_NAME]
    return names[0] if names else None


# ------------------------------------------------------------------------------------------------ generation
def network(model: torch.nn.Module) -> torch.nn.Module:
    """The module to generate with: ``ComposerMPT``'s child ``model`` (outside DDP's wrapper): the
    ``MPTForCausalLM``, which under FSDP2 is itself the sharded root, or under FSDP1 the FSDP unit around it (its
    forward gathers the shards)."""
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.model


@contextmanager
def rng_kept() -> Iterator[None]:
    """Restore torch's CPU (and current CUDA device's), python's and numpy's random states on exit."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode; every module gets back the train/eval mode it had."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def cut_at(row: list[int], stop: int | None) -> list[int]:
    """``row`` up to (without) the first ``stop`` id."""
    return row[:row.index(stop)] if stop is not None and stop in row else row


def complete(net: torch.nn.Module, prompts: Sequence[Sequence[int]], sampling, batch_size: int, *, pad_id: int,
             eos_id: int | None, device, lockstep: bool = False) -> list[list[int]]:
    """New token ids for each tokenized prompt (without the EOS and what follows), ``batch_size`` prompts per
    decode, left-padded; ``sampling`` is an ``llmfoundry.generate.SamplingConfig``. ``lockstep``: always run
    ``max_new_tokens`` steps (every rank of a sharded model must run the same forwards)."""
    from llmfoundry.generate import left_pad, make_generator
    from llmfoundry.models.mpt.generate import generate
    generator = None
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        if generator is None and sampling.temperature > 0:
            generator = make_generator(sampling.seed, ids.device)
        tokens = generate(net, ids, sampling.max_new_tokens, attention_mask=mask, temperature=sampling.temperature,
                          top_k=sampling.top_k or None, top_p=sampling.top_p if sampling.top_p < 1.0 else None,
                          eos_token_id=None if lockstep else eos_id, generator=generator, use_cache=True)
        out += [cut_at(row, eos_id) for row in tokens[:, ids.shape[1]:].tolist()]
    return out


# ------------------------------------------------------------------------------------------------ output
def _clip(text: str, width: int) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return text if len(text) <= width else f"{text[:width]} ... (+{len(text) - width} chars)"


def console_line(batch: int, prompt: str, completion: str) -> str:
    """``sample @ba{batch} | {prompt} -> {completion}`` on one line, long text cut."""
    return f"sample @ba{batch} | {_clip(prompt, 60)} -> {_clip(completion, 200)}"


def append_samples(path: str, batch: int, prompts: Sequence[str], completions: Sequence[str]) -> None:
    """One JSON line ``{"batch", "prompt", "completion"}`` per prompt, appended to ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for p, c in zip(prompts, completions):
            f.write(json.dumps({"batch": batch, "prompt": p, "completion": c}, ensure_ascii=False) + "\n")


def drop_samples_after(path: str, batch: int) -> int:
    """Remove from ``path`` the lines of batches after ``batch`` (rewritten in place, atomically); how many."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            row_batch = json.loads(line).get("batch")
        except (json.JSONDecodeError, AttributeError):
            row_batch = None  # not one of ours: left alone
        if not isinstance(row_batch, int) or row_batch <= batch:
            keep.append(line)
    if len(keep) == len(lines):
        return 0
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in keep)
    os.replace(tmp, path)
    return len(lines) - len(keep)


def log_table(logger: Logger, batch: int, prompts: Sequence[str], completions: Sequence[str]) -> None:
    """The ``samples`` table to every logger destination but composer's console logger."""
    from composer.loggers import ConsoleLogger
    rows = [[batch, p, c] for p, c in zip(prompts, completions)]
    for destination in logger.destinations:
        if not isinstance(destination, ConsoleLogger):
            destination.log_table(list(COLUMNS), rows, name="samples", step=batch)


# ------------------------------------------------------------------------------------------------ callback
class SampleGenerations(Callback):
    """See the module docstring. ``interval``: batches between rounds; ``save_folder``: where ``samples.jsonl``
    goes (a local folder; ``None`` or ``s3://...``: no file)."""

    def __init__(self, prompts: Sequence[str], interval: int, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                 save_folder: str | None = None):
        from llmfoundry.generate import SamplingConfig
        if not prompts:
            raise ConfigError(f"{KEY}.prompts is empty; give at least one prompt")
        if interval < 1 or batch_size < 1:
            raise ConfigError(f"{KEY}: interval = {interval} and batch_size = {batch_size} must be >= 1")
        self.prompts = list(prompts)
        self.interval, self.batch_size = interval, batch_size
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed)
        self.path = self._samples_path(save_folder)
        self.tokenizer = None
        self.encoded: list[list[int]] = []
        self.last_batch = -1

    @staticmethod
    def _samples_path(save_folder: str | None) -> str | None:
        from llmfoundry.checkpoint import is_remote
        if not save_folder or is_remote(save_folder):
            return None
        folder = save_folder[len("file://"):] if save_folder.startswith("file://") else save_folder
        return os.path.join(folder, SAMPLES_FILE)

    # -------------------------------------------------------------------------------------------- events
    def init(self, state: State, logger: Logger) -> None:
        """Load the run's tokenizer, encode the prompts and check they fit (before any batch)."""
        from llmfoundry.data.tokenizer import load_tokenizer
        from llmfoundry.train.callbacks.hf_checkpoint import find_network
        name = run_tokenizer_name(state)
        if not name:
            raise ConfigError(f"{KEY} needs the run's tokenizer ('tokenizer:')")
        self.tokenizer = load_tokenizer(name)
        self.encoded = [list(self.tokenizer(p)["input_ids"]) for p in self.prompts]
        check_prompt_lengths([len(e) for e in self.encoded], self.sampling.max_new_tokens,
                             find_network(state.model).config.max_seq_len)
        if self.path is None and dist.get_global_rank() == 0:
            log.info("%s: samples go to the log and the loggers' tables; %s is written only into a local "
                     "save_folder", KEY, SAMPLES_FILE)

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.path and dist.get_global_rank() == 0:
            dropped = drop_samples_after(self.path, int(state.timestamp.batch))
            if dropped:
                log.info("%s: dropped %d lines of %s written after batch %d, where this run continues", KEY,
                         dropped, self.path, int(state.timestamp.batch))

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        if batch % self.interval == 0:
            self.sample(state, logger, batch)

    def fit_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        if batch != self.last_batch:
            self.sample(state, logger, batch)

    # -------------------------------------------------------------------------------------------- a round
    def sample(self, state: State, logger: Logger, batch: int) -> list[str] | None:
        """Generate for every prompt and publish (rank 0); returns the completions on rank 0, else None."""
        self.last_batch = batch
        lockstep = state.fsdp_enabled and dist.get_world_size() > 1  # every rank runs the sharded forwards
        rank0 = dist.get_global_rank() == 0
        if not (lockstep or rank0):
            return None
        start = time.time()
        tok = self.tokenizer
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
        with rng_kept(), eval_mode(state.model), torch.no_grad(), get_precision_context(state.precision):
            rows = complete(network(state.model), self.encoded, self.sampling, self.batch_size, pad_id=pad,
                            eos_id=eos, device=state.device.tensor_to_device(torch.empty(0)).device,
                            lockstep=lockstep)
        if not rank0:
            return None
        completions = [tok.decode(r, skip_special_tokens=True) for r in rows]
        for p, c in zip(self.prompts, completions):
            log.info("%s", console_line(batch, p, c))
        log_table(logger, batch, self.prompts, completions)
        if self.path:
            append_samples(self.path, batch, self.prompts, completions)
        log.debug("%s: %d prompts at batch %d in %.1f s", KEY, len(self.prompts), batch, time.time() - start)
        return completions
