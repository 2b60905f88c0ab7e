"""Plain functions that turn parts of ``TrainConfig`` into the composer objects ``Trainer`` takes.

One function per thing: optimizer, scheduler, gradient clipping, FSDP (parallelism) config, callbacks, loggers.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable

import torch

from llmfoundry.train.config import (CallbacksConfig, FSDPConfig, LoggersConfig, MLflowConfig, OptimizerConfig,
                                     SchedulerConfig)
from llmfoundry.utils.config import ConfigError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- optimizer
def build_optimizer(cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """LION or AdamW over all parameters, both with decoupled weight decay (see ``OptimizerConfig``).

    Per step, at scheduled learning rate ``lr_t`` and configured (peak) ``lr``:
    ``w <- w * (1 - weight_decay * lr_t / lr)`` then the optimizer's update scaled by ``lr_t``.
    """
    params = list(params)
    if cfg.name == "lion":
        from llmfoundry.train.lion import Lion
        return Lion(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        from composer.optim import DecoupledAdamW
        return DecoupledAdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    raise ConfigError(f"optimizer.name = {cfg.name!r} must be 'lion' or 'adamw'")


# ---------------------------------------------------------------------------------------------------- scheduler
def build_scheduler(cfg: SchedulerConfig):
    """A composer scheduler (an LR multiplier as a function of training time; composer saves/restores it)."""
    from composer.optim import (ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler,
                                LinearWithWarmupScheduler)
    if cfg.name == "cosine":
        return CosineAnnealingWithWarmupScheduler(t_warmup=cfg.t_warmup, t_max=cfg.t_max, alpha_f=cfg.alpha_f)
    if cfg.name == "linear":
        return LinearWithWarmupScheduler(t_warmup=cfg.t_warmup, t_max=cfg.t_max, alpha_i=1.0, alpha_f=cfg.alpha_f)
    if cfg.name == "constant":
        return ConstantWithWarmupScheduler(t_warmup=cfg.t_warmup)
    raise ConfigError(f"scheduler.name = {cfg.name!r} must be one of cosine, linear, constant")


def build_grad_clipping(max_grad_norm: float | None) -> list:
    """Clip the global gradient norm (over all ranks/shards) to ``max_grad_norm`` before each optimizer step."""
    if max_grad_norm is None:
        return []
    from composer.algorithms import GradientClipping
    return [GradientClipping(clipping_type="norm", clipping_threshold=max_grad_norm)]


# ---------------------------------------------------------------------------------------------------- FSDP
def _hybrid_fsdp2_config_class():
    from composer.utils.parallelism import FSDP2Config

    @dataclass
    class HybridFSDP2Config(FSDP2Config):
        """FSDP2 on a 2-D device mesh (replicate x shard) = HSDP.

        composer 0.32.1 builds the FSDP2 device mesh from ``data_parallel_replicate_degree`` /
        ``data_parallel_shard_degree``, which ``FSDP2Config`` fixes to ``None`` / ``-1`` (a 1-D mesh, i.e. full
        shard). These two properties give the 2-D shape; composer then passes the 2-D mesh to ``fully_shard``.
        """
        replicate_degree: int = 1
        shard_degree: int = -1

        @property
        def data_parallel_replicate_degree(self):
            return self.replicate_degree

        @property
        def data_parallel_shard_degree(self):
            return self.shard_degree

    return HybridFSDP2Config


def hybrid_degrees(cfg: FSDPConfig, world_size: int, local_world_size: int) -> tuple[int, int]:
    """(replicate, shard) for HYBRID_SHARD: shard within ``shard_degree`` ranks (default: one node)."""
    shard = cfg.shard_degree or local_world_size
    if world_size % shard != 0:
        raise ConfigError(f"fsdp.shard_degree = {shard} must divide the number of ranks ({world_size}); "
                          "set fsdp.shard_degree to the GPUs per node")
    return world_size // shard, shard


def check_fsdp1_hybrid(cfg: FSDPConfig, replicate: int, shard: int) -> None:
    """torch's FSDP1 turns HYBRID_SHARD over shard groups of one rank into NO_SHARD within the group and then
    never averages gradients across the replicas: each rank would train its own weights. Refuse it."""
    if cfg.version == 1 and shard == 1 and replicate > 1:
        raise ConfigError("fsdp.sharding_strategy: HYBRID_SHARD with fsdp.version: 1 needs at least 2 ranks per "
                          f"shard group, got fsdp.shard_degree = 1 ({replicate} replicas of one GPU each): torch's "
                          "FSDP1 would not average gradients across them. Use fsdp.version: 2 (which does), or "
                          "FULL_SHARD, or a larger fsdp.shard_degree")


def build_parallelism(cfg: FSDPConfig | None, world_size: int, local_world_size: int):
    """composer ``ParallelismConfig`` for ``fsdp:`` (``None`` -> no FSDP: DDP when world_size > 1).

    FSDP2 is chosen by handing composer an ``FSDP2Config`` object (composer 0.32.1 takes
    ``ParallelismConfig(fsdp2=...)`` as is; only a plain-dict ``parallelism_config`` consults ``FSDP_VERSION``).
    """
    if cfg is None:
        return None
    from composer.utils.parallelism import FSDPConfig as ComposerFSDP1Config
    from composer.utils.parallelism import ParallelismConfig

    hybrid = cfg.sharding_strategy == "HYBRID_SHARD"
    replicate, shard = hybrid_degrees(cfg, world_size, local_world_size) if hybrid else (None, -1)
    if hybrid:
        check_fsdp1_hybrid(cfg, replicate, shard)
    if cfg.version == 2:
        ignored = [k for k, default in (("limit_all_gathers", True), ("forward_prefetch", False),
                                        ("backward_prefetch", "BACKWARD_PRE"), ("sync_module_states", False),
                                        ("activation_checkpointing_reentrant", False))
                   if getattr(cfg, k) != default]
        if ignored:
            log.warning("fsdp.version 2 ignores FSDP1-only settings: %s", ", ".join(ignored))
        kwargs = dict(reshard_after_forward=cfg.sharding_strategy != "SHARD_GRAD_OP",
                      activation_checkpointing=cfg.activation_checkpointing,
                      activation_cpu_offload=cfg.activation_cpu_offload,
                      state_dict_type=cfg.state_dict_type,
                      mixed_precision=cfg.mixed_precision,
                      verbose=cfg.verbose)
        if hybrid:
            fsdp2 = _hybrid_fsdp2_config_class()(replicate_degree=replicate, shard_degree=shard, **kwargs)
        else:
            from composer.utils.parallelism import FSDP2Config
            fsdp2 = FSDP2Config(**kwargs)
        return ParallelismConfig(fsdp2=fsdp2)

    fsdp1 = ComposerFSDP1Config(
        sharding_strategy=cfg.sharding_strategy,
        mixed_precision=cfg.mixed_precision,
        activation_checkpointing=cfg.activation_checkpointing,
        activation_checkpointing_reentrant=cfg.activation_checkpointing_reentrant,
        activation_cpu_offload=cfg.activation_cpu_offload,
        state_dict_type=cfg.state_dict_type,
        sync_module_states=cfg.sync_module_states,
        limit_all_gathers=cfg.limit_all_gathers,
        forward_prefetch=cfg.forward_prefetch,
        backward_prefetch=cfg.backward_prefetch,
        use_orig_params=True,
        verbose=cfg.verbose,
    )
    if hybrid:
        fsdp1.data_parallel_replicate_degree = replicate
        fsdp1.data_parallel_shard_degree = shard
    return ParallelismConfig(fsdp=fsdp1)


def build_grad_sync(cfg: FSDPConfig | None, precision: str) -> list:
    """``[SyncGradsOnLastMicrobatch()]`` for ``fsdp.reduce_grads_every_microbatch: false`` (FSDP2: reduce the
    gradients once per optimizer step, see grad_sync.py), else ``[]``. ``precision``: the resolved one."""
    if cfg is None or cfg.reduce_grads_every_microbatch:
        return []
    if cfg.mixed_precision == "PURE" and precision != "fp32":
        raise ConfigError("fsdp.reduce_grads_every_microbatch: false with fsdp.mixed_precision: PURE would sum the "
                          f"micro-batches' gradients in 16 bits (precision {precision}: torch accumulates unsharded "
                          "gradients in the reduce dtype, which PURE makes the same); set fsdp.mixed_precision: "
                          "DEFAULT (sums in fp32, one fp32 reduce-scatter per step)")
    from llmfoundry.train.grad_sync import SyncGradsOnLastMicrobatch
    return [SyncGradsOnLastMicrobatch()]


# ---------------------------------------------------------------------------------------------------- callbacks
def build_callbacks(cfg: CallbacksConfig, on_gpu: bool, save_folder: str | None = None) -> list:
    """SpeedMonitor (throughput; MFU from the model's ``flops_per_batch``), LRMonitor, MemoryMonitor (GPU only),
    RuntimeEstimator, TraceProfiler when ``callbacks.profiler`` is set, StopOnNonFiniteLoss (``save_folder``
    goes into its message), and when set: LossSpike, TimeLimit (needs ``save_folder``), OptimizerMonitor,
    HFCheckpoint (Hugging Face folders while training), SampleGenerations (``samples.jsonl`` in ``save_folder``)."""
    from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator, SpeedMonitor
    callbacks = []
    if cfg.speed_monitor is not None:
        callbacks.append(SpeedMonitor(window_size=cfg.speed_monitor.window_size,
                                      gpu_flops_available=cfg.speed_monitor.gpu_flops_available))
    if cfg.lr_monitor:
        callbacks.append(LRMonitor())
    if cfg.memory_monitor and on_gpu:
        callbacks.append(MemoryMonitor())
    if cfg.runtime_estimator:
        callbacks.append(RuntimeEstimator())
    if cfg.profiler is not None:
        from llmfoundry.train.callbacks.profiler import TraceProfiler
        p = cfg.profiler
        callbacks.append(TraceProfiler(p.folder, p.start_batch, p.num_batches, p.record_shapes, p.with_stack))
    if cfg.stop_on_nonfinite_loss:
        from llmfoundry.train.callbacks.loss_guard import StopOnNonFiniteLoss
        callbacks.append(StopOnNonFiniteLoss(save_folder))
    if cfg.loss_spike is not None:
        from llmfoundry.train.callbacks.loss_guard import LossSpike
        s = cfg.loss_spike
        callbacks.append(LossSpike(s.window, s.threshold, s.ratio, s.patience, s.action, save_folder))
    if cfg.time_limit is not None:
        if not save_folder:
            raise ConfigError("callbacks.time_limit saves a checkpoint before the limit and needs save_folder (with "
                              "autoresume: true the same command continues from it); set save_folder")
        from llmfoundry.train.callbacks.time_limit import TimeLimit
        callbacks.append(TimeLimit(cfg.time_limit.max_time_s, cfg.time_limit.margin_s, save_folder))
    if cfg.optimizer_monitor is not None:
        from llmfoundry.train.callbacks.monitors import OptimizerMonitor
        callbacks.append(OptimizerMonitor(cfg.optimizer_monitor.interval, cfg.optimizer_monitor.per_layer))
    if cfg.hf_checkpoint is not None:
        from llmfoundry.train.callbacks.hf_checkpoint import HFCheckpoint
        h = cfg.hf_checkpoint
        callbacks.append(HFCheckpoint(h.save_folder, h.interval_batches, h.precision, h.overwrite))
    if cfg.sample_generations is not None:
        from llmfoundry.train.callbacks.sample_generations import SampleGenerations
        g = cfg.sample_generations
        callbacks.append(SampleGenerations(g.prompts, g.interval_batches, g.max_new_tokens, g.temperature, g.top_k,
                                           g.top_p, g.seed, g.batch_size, save_folder))
    return callbacks


def peak_flops_used(callbacks: list) -> float | None:
    """The per-device peak FLOP/s SpeedMonitor divides by for MFU (set at ``Event.INIT``), or None."""
    from composer.callbacks import SpeedMonitor
    for cb in callbacks:
        if isinstance(cb, SpeedMonitor):
            return cb.gpu_flops_available
    return None


# ---------------------------------------------------------------------------------------------------- loggers
def _wandb_compat() -> None:
    """composer 0.32.1's WandBLogger calls ``wandb.run.get_url()``, which newer wandb releases dropped in favour
    of the ``url`` property; give ``Run`` the old name back so both work."""
    try:
        from wandb.sdk.wandb_run import Run
    except ImportError:  # composer raises its own clear error for a missing wandb
        return
    if not hasattr(Run, "get_url"):
        Run.get_url = lambda self: self.url


def build_loggers(cfg: LoggersConfig, run_name: str | None, hparams: dict | None = None,
                  resume: bool = False) -> list:
    """composer ``LoggerDestination`` objects. Console/progress output is configured on ``Trainer`` itself.
    Everything a logger needs (its package, a reachable tracking server) is checked here, before training."""
    loggers = []
    if cfg.wandb is not None:
        from composer.loggers import WandBLogger
        _wandb_compat()
        w = cfg.wandb
        loggers.append(WandBLogger(project=w.project, entity=w.entity, group=w.group, name=w.name or run_name,
                                   tags=list(w.tags) or None, init_kwargs={"config": hparams or {}}))
        if os.environ.get("WANDB_MODE") == "offline":
            log.info("wandb: offline mode, the run is written under ./wandb (sync later with `wandb sync`)")
    if cfg.mlflow is not None:
        loggers.append(_mlflow_logger(cfg.mlflow, run_name or "run", resume))
    if cfg.tensorboard is not None:
        _require("tensorboard", "loggers.tensorboard")
        from composer.loggers import TensorboardLogger
        loggers.append(TensorboardLogger(log_dir=cfg.tensorboard.log_dir, flush_interval=cfg.tensorboard.flush_interval))
    return loggers


def _require(package: str, key: str) -> None:
    import importlib.util
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{key} needs the {package} package, which is not installed; "
                          f"pip install 'mpt-forge[loggers]' (or remove {key})")


def mlflow_tracking_uri(cfg: MLflowConfig, run_name: str) -> str:
    """``cfg.tracking_uri`` with ``{run_name}`` filled in; a local path made absolute (every rank, any cwd)."""
    uri = cfg.tracking_uri.replace("{run_name}", run_name)
    if "://" in uri or uri.startswith(("file:", "databricks")):
        return uri
    return os.path.abspath(uri)


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """An ``http(s)://`` MLflow server must answer now: MLflow's own client would retry for minutes, then fail
    in the middle of the Trainer's setup."""
    import urllib.error
    import urllib.request
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an older server without /health): reachable
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"loggers.mlflow.tracking_uri {uri} is unreachable ({reason}); start the tracking "
                          f"server (mlflow server --port ...), fix the URI, or leave tracking_uri out to log to "
                          f"the local store runs/mlruns") from None


def _mlflow_logger(cfg: MLflowConfig, run_name: str, resume: bool):
    _require("mlflow", "loggers.mlflow")
    uri = mlflow_tracking_uri(cfg, run_name)
    check_tracking_server(uri)
    from composer.loggers import MLFlowLogger
    tags = {**cfg.tags, "run_name": run_name}  # composer finds the run to continue by this tag
    return MLFlowLogger(experiment_name=cfg.experiment_name, run_name=cfg.run_name or run_name, tags=tags,
                        tracking_uri=uri, log_system_metrics=cfg.log_system_metrics, resume=resume,
                        synchronous=False)


def flatten(d: dict, prefix: str = "") -> dict:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (lists stay values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def log_config(loggers: list, hparams: dict) -> None:
    """The resolved config as MLflow parameters and TensorBoard hparams (``model.d_model`` ...; wandb has it as its
    run config already). MLflow refuses to change a parameter of a resumed run: a changed key is logged as a
    warning, not an error."""
    from composer.loggers import MLFlowLogger, TensorboardLogger
    from composer.utils import dist
    flat = {k: ("null" if v is None else str(v)[:500]) for k, v in flatten(hparams).items()}
    for lg in loggers:
        if isinstance(lg, TensorboardLogger):
            lg.log_hyperparameters(flat)
        elif isinstance(lg, MLFlowLogger) and dist.get_global_rank() == 0:
            import mlflow
            try:
                mlflow.log_params(flat, synchronous=True)
            except mlflow.exceptions.MlflowException as e:
                log.warning("mlflow: the config was not logged as parameters (%s)", str(e).splitlines()[0])
