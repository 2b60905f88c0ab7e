"""The training config: one YAML file plus ``key=value`` overrides, checked strictly before any work.

How a YAML key reaches the code
-------------------------------
``load_config(yaml_path, ["optimizer.lr=1e-4", ...])`` reads the YAML with omegaconf, applies the command-line
overrides in order (``llmfoundry.utils.config.apply_overrides``; later wins, ``icl_tasks.0.path=x`` indexes a list),
resolves ``${...}`` interpolations, and converts the result with
``llmfoundry.utils.config.from_dict`` into the dataclasses below. A misspelled/unknown key, a missing required key,
or a value of the wrong type stops here with a ``ConfigError`` naming the key (and the closest valid key).
A YAML in llm-foundry's dialect (``fsdp_config``, ``model.name``, ``train_loader.dataset``, ...) is first translated
into these keys by ``llmfoundry.train.foundry_dialect`` (llm-foundry's model defaults kept; every key with no
equivalent listed in one ``ConfigError``).

=============================  ==================================================================================
YAML key                       used by
=============================  ==================================================================================
``variables``                  nothing: free-form values for ``${variables.x}`` interpolation elsewhere in the YAML
                               (``${bundled:mds}`` / ``${bundled:tokenizer}`` / ``${bundled:corpus}``: the tiny
                               default data built at first use, data/bundled.py; ``${bundled:finetune}``: the
                               finetuning examples shipped in llmfoundry/assets/finetune)
``run_name``                   ``Trainer(run_name=...)``; names the checkpoint folder via ``{run_name}``;
                               default: ``$RUN_NAME`` or the YAML file's stem (so the same command resumes);
                               ``run`` for a config built in Python with neither (``run_name_of``)
``seed``                       initial weights and ``Trainer(seed=...)``; the data order is ``train_loader.shuffle_seed``
``model.*``                    ``MPTConfig`` -> ``MPTForCausalLM`` inside ``ComposerMPT`` (composer_model.py)
``model.init_device``          where the weights are created: ``cpu``, or ``meta`` with FSDP (materialized shard by
                               shard on the GPUs through the model's ``param_init_fn``)
``tokenizer``                  ``load_tokenizer(name)``: EOS id for the loader, vocab-size check against the model;
                               tokenizes the samples of MDS streams of raw text (column ``text``) and finetuning data
``train_loader.*``             by ``train_loader.name``: ``text`` (default) ``TextLoaderConfig`` ->
                               ``build_text_dataloader`` (data/text_loader.py); ``finetune``
                               ``FinetuneLoaderConfig`` -> ``build_finetune_dataloader`` (data/finetune.py)
``train_loader.remote``,       MDS shards: with ``name: text``, pretraining streams (column ``tokens``, or ``text``
``.local``, ``.streams``,      tokenized while loading); with ``name: finetune``, examples (``prompt``/``response``
``.split``                     or ``messages`` columns, data_prep/convert_finetune_to_mds.py) read whole by
                               ``finetune._read_mds`` -> ``text_loader.read_mds_samples``; both through
                               ``streams.build_streams`` (local/s3:// folders, caches, download errors)
``train_loader.curriculum``    (off) data/curriculum.py: points ``{at, proportions}`` where the stream mixture
                               changes (``at``: a fraction of ``max_duration`` or ``Nba``/``Nsp``/``Ntok``); each
                               phase is drawn as dataset epochs (composer's epoch counts them) and resumes exactly;
                               ``max_duration`` in ``ba``/``sp``/``tok``
``eval_loader.*``              same, wrapped in a composer ``Evaluator`` (loss, perplexity, accuracy)
``global_train_batch_size``    split over ranks: ``global // world_size`` samples per device per step
``device_train_microbatch_size``  ``Trainer(device_train_microbatch_size=...)``: int or ``auto`` (GPU, FSDP1 only)
``device_eval_batch_size``     batch size of the eval loader
``max_duration``               ``Trainer(max_duration=...)``: ``'1000ba'``, ``'2000000tok'``, ``'1ep'``
``eval_interval``              ``Trainer(eval_interval=...)``; ``eval_subset_num_batches`` likewise
``icl_tasks``                  list of ``ICLTaskConfig`` (as in an eval YAML, eval/icl_tasks.py): scored during training
                               by icl_eval.InRunICL at the eval points, logged as ``icl/<label>/<k>shot``
``icl_subset_num_batches``     in-run ICL: each task's first ``N x batch size`` examples only (null = all, or the
                               task's ``max_examples``); ``icl_seq_len``: where prompts are cut (default
                               ``model.max_seq_len``)
``eval_gauntlet``              ``GauntletConfig`` (eval/gauntlet.py, docs/GAUNTLET.md): aggregate scores over the
                               ``icl_tasks``, logged as ``icl/gauntlet/<category>`` and ``icl/gauntlet/average``
``optimizer.*``                builders.build_optimizer: ``lion`` (train/lion.py, decoupled wd) or ``adamw``
``scheduler.*``                builders.build_scheduler: ``cosine`` / ``linear`` / ``constant`` with warmup
``max_grad_norm``              composer ``GradientClipping(clipping_type='norm')``; ``null`` disables
``precision``                  ``Trainer(precision=...)``; ``auto`` = ``amp_bf16`` on GPU, ``fp32`` on CPU;
                               ``amp_fp8``: fp8.py, the blocks' linears in FP8 through torchao (GPUs of compute
                               capability 8.9+), composer in ``amp_bf16`` around them
``fp8.*``                      ``Fp8Config`` -> fp8.prepare (read with ``precision: amp_fp8`` only): ``recipe``
                               ``tensorwise``/``rowwise``, ``fsdp_float8_all_gather`` (FSDP2, tensorwise)
``device``                     ``Trainer(device=...)``; ``auto`` = ``gpu`` when CUDA is available
``fsdp.*``                     builders.build_parallelism -> composer ``FSDP2Config`` (default) or ``FSDPConfig``;
                               ``fsdp: null`` = plain DDP (CPU, or one GPU); FSDP2 also runs on CPU (gloo, tests)
``fsdp.reduce_grads_every_microbatch``  ``false``: builders.build_grad_sync -> grad_sync.SyncGradsOnLastMicrobatch
                               (FSDP2: one gradient reduce-scatter per optimizer step; see ``FSDPConfig``)
``save_*``, ``load_*``,        ``Trainer(save_folder=..., save_interval=..., save_num_checkpoints_to_keep=...,
``autoresume``,                load_path=..., autoresume=...)``; ``s3://`` folders are checked for reachability and
``check_free_disk``            the disk for room for one checkpoint before training (train.py ``_preflight``);
                               a Hugging Face MPT folder as ``load_path``: its weights start the run, after the
                               model: keys are checked against its config.json (pretrained.py)
``checkpoint_upload.*``        uploads.install: each checkpoint file to an ``s3://`` save_folder is tried ``attempts``
                               times (6), waiting ``backoff_s`` (2 s) doubling between tries; then the run stops
``preemption.grace_period_s``  preemption.py: SIGTERM (to a rank, or to the launcher) finishes the batch, saves a
                               checkpoint on every rank and exits with status 75; a second SIGTERM (2 s or more
                               later), or this many seconds without a save, exits with 143 (docs/FAULTS.md).
                               ``preemption: null``: SIGTERM exits at once, as composer does
``peers.timeout_s``            nodes.py (several processes): ranks silent this long (default 300 s; 4 heartbeats once a
                               collective failed) stop the others with a message naming them and exit status 69;
                               independent of ``dist_timeout`` (docs/FAULTS.md). ``peers: null``: no heartbeat
``train_metrics``              ``ComposerMPT(train_metrics=...)``: composer's train metrics from full logits on every
                               micro-batch; off (default) = the loss is computed in chunks inside the model
``callbacks.*``                builders.build_callbacks; ours are in train/callbacks/ (one file each, named below)
                               beside composer's SpeedMonitor (throughput, MFU), LRMonitor, MemoryMonitor,
                               RuntimeEstimator; ``callbacks.profiler`` (off by default): profiler.TraceProfiler;
                               ``callbacks.stop_on_nonfinite_loss`` (on): loss_guard.StopOnNonFiniteLoss
``callbacks.loss_spike``        (off) loss_guard.LossSpike: a loss above its running window for ``patience`` batches
                               is logged, stops the run before its checkpoint, or has its optimizer steps skipped
``callbacks.time_limit``        (off) time_limit.TimeLimit: before ``max_time``, save a checkpoint and exit 0
``callbacks.optimizer_monitor`` (off) monitors.OptimizerMonitor: gradient (pre-clipping) and weight norms, global
                               and per parameter, every ``interval`` batches
``callbacks.hf_checkpoint``    (off) hf_checkpoint.HFCheckpoint: every ``interval`` batches and at the end, a
                               transformers ``MptForCausalLM`` folder ``{save_folder}/ba{N}`` (local or s3://;
                               ``precision`` fp32/bf16, ``overwrite``); unexportable models refused at Trainer init
``callbacks.sample_generations`` (off) sample_generations.SampleGenerations: every ``interval`` batches and at the
                               end, the model's continuation of each of ``prompts``: log lines, a wandb/MLflow table,
                               ``{save_folder}/samples.jsonl``; training unchanged (RNG states restored)
``loggers.wandb``              composer ``WandBLogger`` (``WANDB_MODE=offline`` works)
``loggers.mlflow``             composer ``MLFlowLogger`` (builders.build_loggers); ``tracking_uri`` default: the local
                               store ``runs/mlruns``; an http(s) server is checked before training
``loggers.tensorboard``        composer ``TensorboardLogger``; event files under ``<log_dir>/<run_name>`` (``runs/tb``)
``progress_bar``               ``auto`` (default): composer's progress bar when stderr is a terminal, else the console
                               log every ``console_log_interval`` (train.console_output); ``true`` / ``false``: as given
``log_to_console``, ``console_log_interval``, ``python_log_level``, ``dist_timeout``,
``compile_config``             passed to ``Trainer`` unchanged (``compile_config`` -> ``torch.compile`` kwargs)
=============================  ==================================================================================
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmfoundry.data.finetune import loader_config_from_dict
from llmfoundry.eval.gauntlet import GauntletConfig, check_gauntlet
from llmfoundry.eval.icl_tasks import ICLTaskConfig
from llmfoundry.models.mpt import MPTConfig
from llmfoundry.utils.config import ConfigError, closest, from_dict, to_dict

log = logging.getLogger(__name__)

TIME_EXAMPLES = "e.g. '1000ba' (batches), '2000000tok' (tokens), '1ep' (epochs), '0.01dur' (fraction of max_duration)"


def parse_time(value: str, key: str, allow_dur: bool = True):
    """A composer ``Time`` from a string like '100ba'; a ConfigError naming ``key`` otherwise."""
    from composer.core import Time, TimeUnit
    if not isinstance(value, str):
        raise ValueError(f"'{key}' = {value!r} must be a time string, {TIME_EXAMPLES}")
    try:
        t = Time.from_timestring(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"'{key}' = {value!r} is not a time string ({e}); use {TIME_EXAMPLES}") from None
    if t.unit == TimeUnit.DURATION and not allow_dur:
        raise ValueError(f"'{key}' = {value!r} cannot be a fraction of the duration; use {TIME_EXAMPLES}")
    return t


@dataclass
class OptimizerConfig:
    """``optimizer:``. Both optimizers use *decoupled* weight decay with llm-foundry's semantics.

    Each step multiplies every weight by ``1 - weight_decay * lr_t / lr``, where ``lr`` is the peak (configured)
    learning rate and ``lr_t`` the scheduled one. So ``weight_decay`` is the fraction removed per step at peak LR;
    it is NOT multiplied by ``lr`` (unlike ``torch.optim.AdamW``, whose per-step shrink is ``lr_t * weight_decay``).
    For a ``torch.optim.AdamW``-style value ``wd_torch`` use ``weight_decay = lr * wd_torch``.

    - ``lion``: ``llmfoundry.train.lion.Lion`` (a fused Triton kernel on GPUs, multi-tensor ops elsewhere; the same update as lion-pytorch's
      ``Lion(decoupled_weight_decay=True)``, whose per-step decay ``lr_t * wd / lr`` is the rule above). LION
      usually wants a 3-10x smaller ``lr`` than AdamW.
    - ``adamw``: composer's ``DecoupledAdamW`` (same decay rule; ``eps`` applies only here).
    """
    name: Literal["lion", "adamw"] = "lion"
    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    eps: float = 1.0e-8

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"'lr' = {self.lr} must be > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"'betas' = {self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        if self.weight_decay < 0 or self.weight_decay >= 1:
            raise ValueError(f"'weight_decay' = {self.weight_decay} must be in [0, 1): it is the fraction of each "
                             "weight removed per step at peak lr")


@dataclass
class SchedulerConfig:
    """``scheduler:``: a linear warmup from 0 to ``optimizer.lr`` over ``t_warmup``, then

    - ``cosine``: cosine decay to ``alpha_f * lr`` at ``t_max``;
    - ``linear``: linear decay to ``alpha_f * lr`` at ``t_max``;
    - ``constant``: ``lr`` until the end (``alpha_f`` and ``t_max`` unused).

    ``t_warmup`` / ``t_max`` are composer time strings in batches (``ba``), tokens (``tok``), samples (``sp``) or a
    fraction of ``max_duration`` (``dur``); ``t_max: 1dur`` ends the decay at ``max_duration``.
    """
    name: Literal["cosine", "linear", "constant"] = "cosine"
    t_warmup: str = "0ba"
    alpha_f: float = 0.1
    t_max: str = "1dur"

    def __post_init__(self):
        parse_time(self.t_warmup, "t_warmup")
        parse_time(self.t_max, "t_max")
        if not 0.0 <= self.alpha_f <= 1.0:
            raise ValueError(f"'alpha_f' = {self.alpha_f} must be in [0, 1] (final lr = alpha_f * lr)")


@dataclass
class FSDPConfig:
    """``fsdp:``: Fully Sharded Data Parallel over all ranks (GPU only). ``fsdp: null`` = DDP.

    - ``version``: 2 = composer's FSDP2 path (``torch.distributed.fsdp.fully_shard``, DTensor), the default;
      1 = the classic ``FullyShardedDataParallel`` wrapper (needed for ``device_train_microbatch_size: auto``).
    - ``sharding_strategy``: ``FULL_SHARD`` (params, grads, optimizer state sharded over all ranks),
      ``SHARD_GRAD_OP`` (params kept gathered between forward and backward), ``HYBRID_SHARD`` (full shard inside
      each group of ``shard_degree`` ranks, replicated across groups: FSDP inside a node, DDP across nodes;
      needs NCCL, i.e. GPUs). FSDP2 runs on CPU too (gloo; FULL_SHARD / SHARD_GRAD_OP), which the tests use.
    - ``shard_degree``: ranks per shard group for ``HYBRID_SHARD``; default = GPUs per node (``LOCAL_WORLD_SIZE``).
    - ``mixed_precision``: ``PURE`` (params and gradient reduction in the ``precision`` dtype, bf16), ``DEFAULT``
      (bf16 compute, fp32 gradient reduction), ``FULL`` (fp32 everywhere).
    - ``activation_checkpointing``: recompute each block (the model's ``activation_checkpointing_fn``) in backward.
    - ``activation_checkpointing_blocks``: recompute only the first N blocks (null = all of them): memory for speed.
      Each block left out keeps its activations (MPT-7B at micro-batch 4 x 2048: ~1 GB per block) and saves its
      forward's recomputation; on one H200, all 32 blocks gave MFU 0.47, none 0.57 (BENCHMARKS.md).
    - ``state_dict_type``: ``sharded`` (each rank writes its shard: fast, the default) or ``full`` (rank 0 writes
      one whole file).
    - ``sync_module_states``: broadcast rank 0's weights to all ranks at wrap time (FSDP1; FSDP2 does it when rank 0
      alone holds real weights).
    - ``limit_all_gathers``, ``forward_prefetch``, ``backward_prefetch``: FSDP1 performance knobs.
    - ``reduce_grads_every_microbatch``: true (default): every micro-batch's backward reduce-scatters its gradients
      (composer 0.32.1 never skips that under FSDP). false (FSDP2 only; train/grad_sync.py): the micro-batches of a
      batch sum their gradients unsharded in fp32 and the last backward reduce-scatters the sum, and the gathered
      weights stay gathered until then: one reduce-scatter and (with ``SHARD_GRAD_OP``) one gather per optimizer
      step instead of per micro-batch, with their copies and casts (on one GPU that is all they are). Needs
      ``mixed_precision: DEFAULT`` (or ``FULL``): with ``PURE`` torch would sum the micro-batches in bf16. The price
      is memory: from the first backward to the last, each GPU holds the whole model's fp32 gradient and bf16
      weights, 6 bytes per parameter, where the default holds 4 / ranks plus one block's gathered weights. So it
      pays for small models and on one GPU (MPT-1B: +2.4 GB peak on one H200, ~+7 GB per GPU on 8), not for a 7B
      model over many GPUs (~+37 GB per GPU on 8).
      No effect with one micro-batch per batch.
    """
    version: Literal[1, 2] = 2
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"] = "FULL_SHARD"
    shard_degree: int | None = None
    mixed_precision: Literal["PURE", "DEFAULT", "FULL"] = "PURE"
    activation_checkpointing: bool = False
    activation_checkpointing_blocks: int | None = None
    activation_checkpointing_reentrant: bool = False
    activation_cpu_offload: bool = False
    state_dict_type: Literal["sharded", "full"] = "sharded"
    sync_module_states: bool = False
    limit_all_gathers: bool = True
    forward_prefetch: bool = False
    backward_prefetch: Literal["BACKWARD_PRE", "BACKWARD_POST", "NONE"] = "BACKWARD_PRE"
    reduce_grads_every_microbatch: bool = True
    verbose: bool = False

    def __post_init__(self):
        if self.shard_degree is not None and self.shard_degree < 1:
            raise ValueError(f"'shard_degree' = {self.shard_degree} must be >= 1")
        n = self.activation_checkpointing_blocks
        if n is not None and n < 0:
            raise ValueError(f"'activation_checkpointing_blocks' = {n} must be >= 0 (null = every block)")
        if n is not None and not self.activation_checkpointing:
            raise ValueError(f"'activation_checkpointing_blocks' = {n} needs 'activation_checkpointing: true'")
        if not self.reduce_grads_every_microbatch and self.version != 2:
            raise ValueError("'reduce_grads_every_microbatch: false' needs 'version: 2' (FSDP2); composer's FSDP1 "
                             "path reduces every micro-batch's gradients. Use fsdp.version: 2, or "
                             "reduce_grads_every_microbatch: true")


@dataclass
class Fp8Config:
    """``fp8:``, read with ``precision: amp_fp8`` only (train/fp8.py; ``pip install 'mpt-forge[fp8]'``; a GPU of
    compute capability 8.9 or newer: H100, H200, L4, L40S). torchao's ``Float8Linear`` replaces the ``nn.Linear``
    layers of the transformer blocks (attention ``Wqkv``/``out_proj``, FFN ``up_proj``/``down_proj``); embeddings,
    the output head and the norms stay bf16, master weights and optimizer state are as with ``amp_bf16``, and
    checkpoints are ordinary (same keys and tensors: they resume with ``amp_bf16`` too and export to Hugging Face).

    - ``recipe``: torchao's scaling: ``tensorwise`` (one scale per tensor: the fastest) or ``rowwise`` (one per row
      of each operand: closer to bf16, slower; torchao 0.13 or newer).
    - ``fsdp_float8_all_gather``: FSDP2 gathers the sharded weights in FP8 (half of bf16's traffic and memory of
      the gathered weights; the next step's scales are computed in one all-reduce after each optimizer step).
      null (default): on with ``recipe: tensorwise`` under ``fsdp.version: 2`` on more than one GPU, else off
      (one GPU gathers nothing); torchao does it for ``tensorwise`` only.
    """
    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    fsdp_float8_all_gather: bool | None = None

    def __post_init__(self):
        if self.fsdp_float8_all_gather and self.recipe != "tensorwise":
            raise ValueError(f"'fsdp_float8_all_gather: true' needs 'recipe: tensorwise' (torchao gathers FP8 weights "
                             f"with one scale per tensor only; got recipe: {self.recipe}); set it to false or null")


@dataclass
class SpeedMonitorConfig:
    """``callbacks.speed_monitor``: throughput over the last ``window_size`` batches, and MFU.

    MFU = (model FLOPs per token from the config x tokens/s per device) / ``gpu_flops_available``. When
    ``gpu_flops_available`` is null, composer's table of dense peak FLOP/s for the detected GPU and ``precision``
    is used (H100 SXM bf16: 989e12, A100 bf16: 312e12); the value used is logged at start. CPU: no MFU.
    """
    window_size: int = 10
    gpu_flops_available: float | None = None


@dataclass
class ProfilerConfig:
    """``callbacks.profiler``: a torch.profiler trace of ``num_batches`` batches from batch ``start_batch`` (after
    compilation and autotuning), one Chrome trace per rank under ``folder`` (``{run_name}`` is filled in), and a
    summary in the log: wall time, the GPU's busy share, GPU time by kind of kernel (train/callbacks/profiler.py)."""
    start_batch: int = 5
    num_batches: int = 2
    folder: str = "traces/{run_name}"
    record_shapes: bool = False
    with_stack: bool = False

    def __post_init__(self):
        if self.start_batch < 0 or self.num_batches < 1:
            raise ValueError(f"'start_batch' = {self.start_batch} must be >= 0 and 'num_batches' = "
                             f"{self.num_batches} >= 1")


@dataclass
class LossSpikeConfig:
    """``callbacks.loss_spike`` (loss_guard.LossSpike): a batch spikes when its training loss is above
    ``mean + threshold * std`` of the last ``window`` normal losses and, when ``ratio`` is set, also above
    ``ratio * mean`` (``threshold: null``: the ratio alone); nothing is judged until the window is full.
    ``patience`` consecutive spiking batches are a spike; ``action``: ``log`` (a warning and the metric
    ``loss_spike/sustained``), ``stop`` (exit 1 before that batch's checkpoint; no checkpoint is written while a
    batch spikes, so the newest one, named in the message, predates the spike) or ``skip`` (skip the optimizer step
    of every spiking batch; ``patience`` skipped in a row stop the run as ``stop`` does)."""
    window: int = 100
    threshold: float | None = 3.0
    ratio: float | None = None
    patience: int = 5
    action: Literal["log", "stop", "skip"] = "log"

    def __post_init__(self):
        if self.window < 2:
            raise ValueError(f"'window' = {self.window} must be >= 2 (batches)")
        if self.threshold is None and self.ratio is None:
            raise ValueError("'threshold' and 'ratio' are both null; set at least one")
        if self.threshold is not None and self.threshold <= 0:
            raise ValueError(f"'threshold' = {self.threshold} must be > 0 (standard deviations above the mean)")
        if self.ratio is not None and self.ratio <= 1:
            raise ValueError(f"'ratio' = {self.ratio} must be > 1 (a multiple of the window's mean loss)")
        if self.patience < 1:
            raise ValueError(f"'patience' = {self.patience} must be >= 1 (batches)")


_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_seconds(value: float | str, key: str) -> float:
    """Seconds from a number of seconds or a string like ``'2h30m'``, ``'90m'``, ``'45s'``, ``'3600'``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"(\d+(\.\d+)?[dhms])+", value.replace(" ", "")):
        seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([dhms])", value.replace(" ", "")))
    else:
        raise ValueError(f"'{key}' = {value!r} is not a duration; use seconds (9000) or e.g. '2h30m', '90m', '45s'")
    if not seconds > 0:
        raise ValueError(f"'{key}' = {value!r} must be more than 0 seconds")
    return seconds


@dataclass
class TimeLimitConfig:
    """``callbacks.time_limit`` (time_limit.TimeLimit): stop cleanly (a checkpoint, exit 0, ``time limit
    reached: ...``) before ``max_time`` after the process started: seconds or e.g. ``'2h30m'``, ``'90m'``. The run
    stops after the batch when one more batch would pass ``max_time - margin_s``; ``margin_s`` covers the save and the
    end-of-run evaluation. The same command (autoresume) continues."""
    max_time: float | str  # required
    margin_s: float = 300.0

    def __post_init__(self):
        limit = parse_seconds(self.max_time, "max_time")
        if not 0 <= self.margin_s < limit:
            raise ValueError(f"'margin_s' = {self.margin_s} must be >= 0 and less than max_time ({limit:g} s)")

    @property
    def max_time_s(self) -> float:
        return parse_seconds(self.max_time, "max_time")


@dataclass
class OptimizerMonitorConfig:
    """``callbacks.optimizer_monitor`` (monitors.OptimizerMonitor): every ``interval`` batches, log the global
    gradient norm before clipping (``optimizer/grad_norm``) and weight norm (``optimizer/weight_norm``); with
    ``per_layer``, each parameter's too (``optimizer/grad_norm/<name>``). DDP and FSDP (sharded norms all-reduced)."""
    interval: int = 10
    per_layer: bool = False

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"'interval' = {self.interval} must be >= 1 (batches)")


def batch_count(value) -> int | None:
    """``1000`` or ``'1000ba'`` as 1000; None for anything that is not a number of batches >= 1."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*ba\s*", value):
        value = int(value.strip()[:-2])
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return None
    return value


@dataclass
class HFCheckpointConfig:
    """``callbacks.hf_checkpoint`` (hf_checkpoint.HFCheckpoint): every ``interval`` batches (``1000ba`` or 1000) and
    after the last batch, a folder ``{save_folder}/ba{N}/`` that transformers' ``MptForCausalLM`` and
    ``AutoTokenizer`` load (weights in ``precision``: fp32 or bf16, config, the run's tokenizer, generation
    config; ``COMPLETE`` written last). ``save_folder``: local or ``s3://`` (``{run_name}`` filled in). An existing
    ``ba{N}`` is kept unless ``overwrite``. FSDP weights are gathered to rank 0, which writes. A model
    transformers' MPT cannot represent (see ``hf_export_problems``) is refused before training."""
    save_folder: str  # required
    interval: int | str = "1000ba"
    precision: Literal["fp32", "bf16"] = "fp32"
    overwrite: bool = False

    def __post_init__(self):
        if not self.save_folder:
            raise ValueError("'save_folder' is empty; name a folder or s3:// prefix for the Hugging Face checkpoints")
        _ = self.interval_batches  # validates

    @property
    def interval_batches(self) -> int:
        v = batch_count(self.interval)
        if v is None:
            raise ValueError(f"'interval' = {self.interval!r}: use a number of batches >= 1, e.g. 1000ba (or 1000)")
        return v


@dataclass
class SampleGenerationsConfig:
    """``callbacks.sample_generations`` (sample_generations.SampleGenerations): every ``interval`` batches (``500ba``
    or 500) and after the last batch, the model continues each of ``prompts`` by up to ``max_new_tokens`` tokens
    (KV cache, ``batch_size`` prompts at a time) and you get a log line per prompt (``sample @ba500 | prompt ->
    completion``), a ``samples`` table in wandb / MLflow, and ``{batch, prompt, completion}`` lines appended to
    ``{save_folder}/samples.jsonl`` (local save folders). Greedy with ``temperature: 0`` (the default); else sampled
    with ``top_k`` (0: off) and ``top_p`` (1: off) from a generator seeded with ``seed``. Training is unchanged
    (random states restored: the same weights, bit for bit). A prompt that leaves no room for ``max_new_tokens``
    within ``model.max_seq_len`` is refused before training."""
    prompts: list[str]  # required
    interval: int | str = "500ba"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        from llmfoundry.generate import SamplingConfig
        if not self.prompts:
            raise ValueError("'prompts' is empty; give at least one prompt, e.g. prompts: ['def ', 'The meaning of']")
        empty = [i for i, p in enumerate(self.prompts) if not p]
        if empty:
            raise ValueError(f"'prompts[{empty[0]}]' is empty; a prompt needs text for the model to continue")
        _ = self.interval_batches  # validates
        if self.batch_size < 1:
            raise ValueError(f"'batch_size' = {self.batch_size} must be >= 1 (prompts per generation batch)")
        SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p, seed=self.seed)  # validates: max_new_tokens >= 1, top_k/top_p need sampling

    @property
    def interval_batches(self) -> int:
        v = batch_count(self.interval)
        if v is None:
            raise ValueError(f"'interval' = {self.interval!r} is not a number of batches: samples are taken every N "
                             "batches, e.g. 500ba (or 500)")
        return v


@dataclass
class CallbacksConfig:
    """``callbacks:``; set one to ``null``/``false`` to turn it off."""
    speed_monitor: SpeedMonitorConfig | None = field(default_factory=SpeedMonitorConfig)
    lr_monitor: bool = True
    memory_monitor: bool = True  # CUDA memory stats; skipped on CPU
    runtime_estimator: bool = True
    profiler: ProfilerConfig | None = None  # off unless set, e.g. callbacks.profiler.start_batch=10
    stop_on_nonfinite_loss: bool = True  # loss_guard.py: stop (before that batch's checkpoint) at a NaN/inf loss
    loss_spike: LossSpikeConfig | None = None  # off unless set, e.g. callbacks.loss_spike.action=stop
    time_limit: TimeLimitConfig | None = None  # off unless set, e.g. callbacks.time_limit.max_time=2h30m
    optimizer_monitor: OptimizerMonitorConfig | None = None  # off unless set: callbacks.optimizer_monitor.interval=10
    hf_checkpoint: HFCheckpointConfig | None = None  # off unless set: callbacks.hf_checkpoint.save_folder=hf
    sample_generations: SampleGenerationsConfig | None = None  # off unless set: sample_generations.prompts=[...]


@dataclass
class UploadConfig:
    """``checkpoint_upload:`` (train/uploads.py): how an upload of a checkpoint file to an ``s3://`` save_folder that
    fails is retried: ``attempts`` tries in all, the first wait ``backoff_s`` seconds, doubling (2, 4, 8, 16, 32 s by
    default: about a minute of store outage survived per file). Out of attempts, the run stops naming the key and the
    newest complete checkpoint; the same command resumes once the store is back."""
    attempts: int = 6
    backoff_s: float = 2.0

    def __post_init__(self):
        if self.attempts < 1 or self.backoff_s < 0:
            raise ValueError(f"checkpoint_upload: attempts must be >= 1 and backoff_s >= 0 (got {self.attempts}, "
                             f"{self.backoff_s})")


@dataclass
class PreemptionConfig:
    """``preemption:`` (train/preemption.py; needs a ``save_folder``). SIGTERM, what schedulers send before they
    kill a job, makes every rank finish its batch, save a checkpoint and exit with status 75 (``EX_TEMPFAIL``); the
    same command resumes there. ``grace_period_s``: seconds after the first SIGTERM by which the process exits even
    without a checkpoint (status 143): the bound on a batch, evaluation or peer that hangs. The scheduler's own
    SIGKILL may come sooner (SLURM ``KillWait`` and Kubernetes ``terminationGracePeriodSeconds``: 30 s by default):
    raise that when a batch plus a save takes longer; under ``composer`` the launcher SIGKILLs its ranks 30 s after
    it got SIGTERM itself. A second SIGTERM (2 s or more after the first) exits at once. ``preemption: null``
    leaves SIGTERM to composer (exit 143 at once, nothing saved)."""
    grace_period_s: float = 300.0

    def __post_init__(self):
        if not self.grace_period_s > 0:
            raise ValueError(f"'grace_period_s' = {self.grace_period_s} must be > 0 (seconds)")


@dataclass
class PeersConfig:
    """``peers:`` (train/nodes.py; runs of several processes). Every rank beats a heartbeat into the rendezvous
    store; when ranks are silent for ``timeout_s`` seconds (a node killed, powered off or cut from the network; the
    store silent: node 0), every other rank prints which ranks and nodes were lost, the last checkpoint and the
    command that resumes, and exits with status 69. Once a rank's own collective has failed, 4 heartbeats of
    silence (``timeout_s / 10`` each, at most 5 s) are enough. ``dist_timeout`` still bounds every collective,
    including legitimate long waits; ``peers: null`` leaves a lost node to it."""
    timeout_s: float = 300.0

    def __post_init__(self):
        if not self.timeout_s >= 5:
            raise ValueError(f"'timeout_s' = {self.timeout_s} must be >= 5 (seconds of silence before a rank counts "
                             f"as lost), or set peers: null to turn the heartbeat off")


@dataclass
class WandBConfig:
    """``loggers.wandb``: composer's ``WandBLogger``; ``WANDB_MODE=offline`` writes the run under ``./wandb``."""
    project: str | None = None
    entity: str | None = None
    group: str | None = None
    name: str | None = None  # default: run_name
    tags: list[str] = field(default_factory=list)


@dataclass
class MLflowConfig:
    """``loggers.mlflow``: composer's ``MLFlowLogger`` (``pip install 'mpt-forge[loggers]'``). Metrics, the resolved
    config as parameters, and a ``run_name`` tag; a resumed run (autoresume) continues the same MLflow run.
    ``tracking_uri``: a local folder or ``file:`` URI (default ``runs/mlruns``; ``mlflow ui --backend-store-uri
    runs/mlruns`` shows it), an ``http(s)://`` tracking server (checked before training), or ``databricks``.
    ``{run_name}`` in it is filled in."""
    tracking_uri: str = "runs/mlruns"
    experiment_name: str = "mpt-forge"
    run_name: str | None = None  # default: run_name
    tags: dict[str, str] = field(default_factory=dict)
    log_system_metrics: bool = False  # MLflow's CPU/GPU/memory sampling every 30 s (needs psutil; pynvml for GPUs)


@dataclass
class TensorBoardConfig:
    """``loggers.tensorboard``: composer's ``TensorboardLogger`` (``pip install 'mpt-forge[loggers]'``): event files
    under ``<log_dir>/<run_name>/`` (the config as hparams at each evaluation, in a folder below); view with
    ``tensorboard --logdir runs/tb``."""
    log_dir: str = "runs/tb"
    flush_interval: int = 100  # batches between flushes to disk (and at every eval and the end)


@dataclass
class LoggersConfig:
    """``loggers:``. Console output is controlled by the top-level ``log_to_console`` / ``progress_bar``."""
    wandb: WandBConfig | None = None
    mlflow: MLflowConfig | None = None
    tensorboard: TensorBoardConfig | None = None


@dataclass
class TrainConfig:
    """The whole run. See the module docstring for where each key goes."""
    model: MPTConfig
    train_loader: Any  # TextLoaderConfig (name: text, the default) or FinetuneLoaderConfig (name: finetune)
    max_duration: str
    global_train_batch_size: int

    variables: dict[str, Any] = field(default_factory=dict)
    run_name: str | None = None
    seed: int = 17
    tokenizer: str = "bundled"

    eval_loader: Any = None  # likewise, or null
    eval_interval: str = "1000ba"
    eval_subset_num_batches: int = -1
    device_eval_batch_size: int | None = None
    device_train_microbatch_size: int | Literal["auto"] | None = None
    icl_tasks: list[ICLTaskConfig] | None = None  # scored at the eval points (train/callbacks/icl_eval.py); null = none
    icl_subset_num_batches: int | None = None  # in-run ICL: each task's first N x batch size examples (null: all)
    icl_seq_len: int | None = None  # in-run ICL prompts are cut to this many tokens (null: model.max_seq_len)
    eval_gauntlet: GauntletConfig | None = None  # aggregate ICL scores (eval/gauntlet.py)

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_grad_norm: float | None = 1.0

    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16", "amp_fp8"] = "auto"  # amp_fp8: train/fp8.py
    fp8: Fp8Config = field(default_factory=Fp8Config)  # read with precision: amp_fp8 only
    device: Literal["auto", "cpu", "gpu"] = "auto"
    fsdp: FSDPConfig | None = None
    dist_timeout: float = 600.0
    compile_config: dict[str, Any] | None = None

    save_folder: str | None = None
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    save_weights_only: bool = False
    load_path: str | None = None
    load_weights_only: bool = False
    autoresume: bool = False
    check_free_disk: bool = True
    preemption: PreemptionConfig | None = field(default_factory=PreemptionConfig)
    peers: PeersConfig | None = field(default_factory=PeersConfig)  # nodes.py: lost ranks stop the run
    checkpoint_upload: UploadConfig = field(default_factory=UploadConfig)

    train_metrics: bool = False  # loss/perplexity/accuracy of each training batch from full logits (slower)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    log_to_console: bool = True
    console_log_interval: str = "1ba"
    progress_bar: Any = "auto"  # true, false, or auto: composer's bar when stderr is a terminal (train.console_output)
    python_log_level: str | None = "info"

    def __post_init__(self):
        try:
            self._check()
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:  # top-level keys: the message already names the key
            raise ConfigError(str(e)) from None

    def _check(self):
        self.train_loader = loader_config_from_dict(self.train_loader, "train_loader")
        self.eval_loader = loader_config_from_dict(self.eval_loader, "eval_loader")
        max_duration = parse_time(self.max_duration, "max_duration", allow_dur=False)
        parse_time(self.eval_interval, "eval_interval", allow_dur=False)
        parse_time(self.save_interval, "save_interval", allow_dur=False)
        parse_time(self.console_log_interval, "console_log_interval", allow_dur=False)
        if not (isinstance(self.progress_bar, bool) or self.progress_bar == "auto"):
            raise ValueError(f"config key 'progress_bar' must be true or false, or auto, got {self.progress_bar!r}")
        if self.global_train_batch_size < 1:
            raise ValueError(f"'global_train_batch_size' = {self.global_train_batch_size} must be >= 1")
        mb = self.device_train_microbatch_size
        if isinstance(mb, int) and mb < 1:
            raise ValueError(f"'device_train_microbatch_size' = {mb} must be >= 1 or 'auto'")
        if self.device_eval_batch_size is not None and self.device_eval_batch_size < 1:
            raise ValueError(f"'device_eval_batch_size' = {self.device_eval_batch_size} must be >= 1")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"'max_grad_norm' = {self.max_grad_norm} must be > 0 (or null to turn clipping off)")
        if self.autoresume and not self.save_folder:
            raise ValueError("'autoresume: true' needs 'save_folder' (where the checkpoints to resume from are)")
        if self.python_log_level is not None and self.python_log_level.upper() not in (
                "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"'python_log_level' = {self.python_log_level!r} must be one of debug, info, warning, "
                             f"error, critical{closest(self.python_log_level.lower(), ['debug', 'info', 'warning'])}")
        _check_schedule_units(self.scheduler, max_duration)
        self._check_icl()
        n = self.fsdp.activation_checkpointing_blocks if self.fsdp else None
        if n is not None and n > self.model.n_layers:
            raise ValueError(f"'fsdp.activation_checkpointing_blocks' = {n} is more than the model's n_layers = "
                             f"{self.model.n_layers}; use at most {self.model.n_layers} (or null for every block)")


    def _check_icl(self):
        self.icl_tasks = self.icl_tasks or []  # null: none
        labels = [t.label for t in self.icl_tasks]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"icl_tasks labels must be unique; repeated: {dup}")
        if self.icl_subset_num_batches is not None and self.icl_subset_num_batches < 1:
            raise ValueError(f"'icl_subset_num_batches' = {self.icl_subset_num_batches} must be >= 1 (or null: all "
                             "examples)")
        n = self.icl_seq_len
        if n is not None and not 1 <= n <= self.model.max_seq_len:
            raise ValueError(f"'icl_seq_len' = {n} must be between 1 and model.max_seq_len = "
                             f"{self.model.max_seq_len} (null: model.max_seq_len)")
        if self.eval_gauntlet is not None:
            if not self.icl_tasks:
                raise ValueError("'eval_gauntlet' scores the icl_tasks, and icl_tasks is empty; add the tasks its "
                                 "benchmarks name, or set eval_gauntlet: null")
            check_gauntlet(self.eval_gauntlet, self.icl_tasks)


def _check_schedule_units(sched: SchedulerConfig, max_duration) -> None:
    """Composer needs warmup and decay horizon in the same unit; catch a mismatch now, not at the first step."""
    from composer.core import TimeUnit
    max_unit = max_duration.unit
    units = {}
    for key in ("t_warmup", "t_max"):
        t = parse_time(getattr(sched, key), key)
        units[key] = max_unit if t.unit == TimeUnit.DURATION else t.unit
    if sched.name != "constant" and units["t_warmup"] != units["t_max"] and max_unit != TimeUnit.EPOCH:
        raise ValueError(
            f"scheduler.t_warmup ({sched.t_warmup}) and scheduler.t_max ({sched.t_max}, max_duration "
            f"{max_duration}) must be in the same unit; e.g. t_warmup: 100ba with max_duration in 'ba'")


def _register_resolvers() -> None:
    """``${bundled:mds}`` / ``${bundled:tokenizer}`` / ``${bundled:corpus}``: the tiny default data, built at first
    use from this Python's standard library (``llmfoundry/data/bundled.py``); ``${bundled:finetune}``: the
    finetuning examples shipped in ``llmfoundry/assets/finetune``."""
    from omegaconf import OmegaConf

    def bundled(what: str) -> str:
        from llmfoundry.data import bundled as tiny
        from llmfoundry.data.finetune import BUNDLED_FINETUNE
        paths = {"mds": tiny.mds_dir, "tokenizer": tiny.tokenizer_dir, "corpus": tiny.corpus_dir,
                 "finetune": lambda: BUNDLED_FINETUNE}
        if what not in paths:
            raise ConfigError(f"${{bundled:{what}}}: unknown bundled asset{closest(what, paths)}; "
                              f"one of {', '.join(paths)}")
        return paths[what]()

    if not OmegaConf.has_resolver("bundled"):
        import omegaconf
        new_api = tuple(int(x) for x in omegaconf.__version__.split(".")[:2]) >= (2, 4)
        # omegaconf 2.4 renamed register_new_resolver back to register_resolver (2.3 has only the former)
        (OmegaConf.register_resolver if new_api else OmegaConf.register_new_resolver)("bundled", bundled)


DEFAULT_RUN_NAME = "run"


def env_run_name() -> str | None:
    """``$RUN_NAME``, else ``$COMPOSER_RUN_NAME`` (None when neither is set)."""
    return os.environ.get("RUN_NAME") or os.environ.get("COMPOSER_RUN_NAME") or None


def run_name_of(cfg: TrainConfig) -> str:
    """The run's name: ``run_name``, else ``$RUN_NAME`` / ``$COMPOSER_RUN_NAME``, else ``'run'``.

    The one place the default is decided: composer's ``Trainer(run_name=...)`` gets it, and every ``{run_name}``
    (save folder, load_path) is filled with it, so the folder that is checked for free disk, gets ``config.yaml``
    and is named in messages is the one composer saves to (left to itself, composer would make up a random name).
    ``load_config`` already fills in the environment's name or the YAML's stem; a config built in Python (or with
    ``run_name: ''``) falls through to the environment, then to ``'run'``.
    """
    return cfg.run_name or env_run_name() or DEFAULT_RUN_NAME


def load_config(yaml_path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read ``yaml_path``, apply ``key=value`` ``overrides`` in order (``optimizer.lr=1e-4``; a number indexes a list:
    ``optimizer.betas.0=0.8``; see ``llmfoundry.utils.config.apply_overrides``), and convert strictly. Every mistake
    is a one-line ``ConfigError``.

    ``run_name`` defaults to ``$RUN_NAME`` (or ``$COMPOSER_RUN_NAME``), else the YAML file's stem, so running the
    same command again finds the same checkpoint folder and ``autoresume`` continues.
    """
    from llmfoundry.utils.config import load_yaml_with_overrides

    _register_resolvers()
    data = load_yaml_with_overrides(yaml_path, overrides, example="optimizer.lr=1e-4")
    if data.get("run_name") is None:
        data["run_name"] = env_run_name() or (Path(yaml_path).stem if yaml_path is not None else None)
    from llmfoundry.train import foundry_dialect  # an llm-foundry YAML: translated, reported, written out
    if foundry_dialect.is_foundry_dialect(data, TrainConfig):
        return foundry_dialect.load_foundry_config(data, yaml_path, TrainConfig, config_from_dict)
    return config_from_dict(data)


def config_from_dict(data: dict) -> TrainConfig:
    """``TrainConfig`` from a plain dict (what ``load_config`` produced, or a dict built in Python)."""
    return from_dict(TrainConfig, data)


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (logged at start and saved alongside checkpoints)."""
    from omegaconf import OmegaConf
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
