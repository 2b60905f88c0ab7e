"""Training entry: ``train(cfg) -> composer.Trainer`` and the command line ``main(argv)``.

Usage (one process, CPU or one GPU)::

    python scripts/train.py yamls/tiny-cpu.yaml [key=value ...]

All GPUs of one machine (composer's launcher starts one process per GPU and sets RANK, WORLD_SIZE, ...)::

    composer scripts/train.py yamls/mpt-7b.yaml [key=value ...]
    composer -n 2 scripts/train.py yamls/tiny-cpu.yaml      # 2 processes; on CPU they use DDP over gloo

Several machines: run the same command on every node, with the node's rank and the address of node 0::

    composer --world_size 16 --node_rank 0 --master_addr 10.0.0.1 --master_port 7501 scripts/train.py x.yaml
    composer --world_size 16 --node_rank 1 --master_addr 10.0.0.1 --master_port 7501 scripts/train.py x.yaml

``-n/--nproc`` processes on this node (default: number of GPUs), ``--world_size`` processes over all nodes,
``--node_rank`` this node's index (0..nodes-1), ``--master_addr``/``--master_port`` where rank 0 listens.
``global_train_batch_size`` is split over all ``world_size`` ranks; with ``fsdp.sharding_strategy: HYBRID_SHARD``
each node holds one full copy of the sharded model and nodes exchange gradients (DDP across nodes).

Steps of ``build_trainer``: resolve device/precision -> start torch.distributed -> check batch sizes -> log a
summary of the run (``run_summary``; the whole resolved config at debug level) -> check object stores and disk ->
tokenizer -> ``ComposerMPT`` -> optimizer -> loaders ->
``composer.Trainer`` (FSDP wrap, checkpoint load / autoresume) -> what ``resume.py`` adds across launches (the
config copy written at the first batch, a warning when a resume changes the batch shape, checkpoint pruning that
counts earlier launches). ``train`` then calls ``fit``, during which SIGTERM stops the run at a checkpoint
(``preemption.py``: exit status 75, the same command resumes there). A launch that fails before training leaves
nothing new in the save folder (nor an empty save folder it created).
"""
from __future__ import annotations

import logging
import os
import sys
import time

import torch

from llmfoundry.checkpoint import ModelConfigRecorder
from llmfoundry.train import builders, checks, ddp_sums, fp8, nodes, preemption, pretrained, resume, uploads
from llmfoundry.train.checks import TrainError
from llmfoundry.train.composer_model import ComposerMPT
from llmfoundry.train.config import TrainConfig, config_to_yaml, env_run_name, load_config, run_name_of
from llmfoundry.train.callbacks.icl_eval import build_in_run_icl
from llmfoundry.utils.config import ConfigError, to_dict

log = logging.getLogger(__name__)

LOCAL_RANK0_FIRST_S = 5.0  # how long the other ranks of a node let its local rank 0 exit first on a user error
USAGE = "usage: python scripts/train.py CONFIG.yaml [key=value ...]   (or: composer [-n N] scripts/train.py ...)"


def _setup_logging(level: str | None) -> None:
    if level is None:
        return
    from composer.utils import dist
    logging.basicConfig(format=f"%(asctime)s: rank{dist.get_global_rank()}[%(process)d]: %(levelname)s: "
                               f"%(name)s: %(message)s")
    logging.getLogger("llmfoundry").setLevel(level.upper())


def resolve_device(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("device: gpu but no CUDA GPU is visible; use device: auto or cpu")
    return device


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "amp_bf16" if device == "gpu" else "fp32"
    if device == "cpu" and precision != "fp32":
        raise ConfigError(f"precision: {precision} needs a GPU (composer trains on CPU in fp32 only); use "
                          "precision: fp32 or auto on CPU")
    return precision


def _check_model_vs_data(cfg: TrainConfig, tokenizer) -> None:
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer "
                          f"'{cfg.tokenizer}' ({len(tokenizer)} tokens); set model.vocab_size >= {len(tokenizer)}")
    for key in ("train_loader", "eval_loader"):
        loader = getattr(cfg, key)
        if loader is not None and loader.max_seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"{key}.max_seq_len = {loader.max_seq_len} is longer than model.max_seq_len = "
                              f"{cfg.model.max_seq_len}; lower it or raise model.max_seq_len")


def _preflight(cfg: TrainConfig) -> None:
    """Reachability of object stores and free disk, checked once per job; every rank raises the same error."""
    from composer.utils import dist
    problems = []
    if dist.get_global_rank() == 0:
        if checks.is_remote(cfg.save_folder):
            problems.append(checks.check_remote(cfg.save_folder, "save_folder", write=True))
            if cfg.save_num_checkpoints_to_keep >= 0:
                log.warning("save_num_checkpoints_to_keep=%d counts the local copies only: every checkpoint "
                            "uploaded to %s stays there (composer deletes no remote files; a lifecycle rule on the "
                            "bucket can expire old ones)", cfg.save_num_checkpoints_to_keep, cfg.save_folder)
        if checks.is_remote(cfg.load_path):
            problems.append(checks.check_remote(cfg.load_path, "load_path", write=False))
        elif cfg.load_path and "{" not in cfg.load_path:
            problems.append(checks.load_path_problem(cfg.load_path) if os.path.exists(cfg.load_path) else
                            f"load_path = {cfg.load_path!r} does not exist; point it at a checkpoint file "
                            f"(or a sharded checkpoint folder) or remove it")
    unwritable = None
    if cfg.save_folder and not checks.is_remote(cfg.save_folder) and dist.get_local_rank() == 0:
        unwritable = checks.save_folder_problem(resume.save_dir(cfg))
        problems.append(unwritable)
    if cfg.save_folder and cfg.check_free_disk and dist.get_local_rank() == 0 and not unwritable:
        per_ckpt = checks.checkpoint_bytes(cfg.model.num_params(), cfg.optimizer.name, cfg.save_weights_only)
        if cfg.fsdp is not None and cfg.fsdp.state_dict_type == "sharded":
            per_ckpt = per_ckpt * dist.get_local_world_size() // dist.get_world_size()
        problems.append(checks.check_free_disk(resume.save_dir(cfg), per_ckpt))
    problems = [p for p in problems if p]
    gathered = dist.all_gather_object(problems) if dist.get_world_size() > 1 else [problems]
    found = [p for rank_problems in gathered for p in rank_problems]
    if found:
        raise TrainError("; ".join(dict.fromkeys(found)))


def _local_checkpoint(cfg: TrainConfig, loaded: str | None = None) -> str | None:
    """The local checkpoint (file or sharded folder) composer loads or loaded, for shape checks and messages."""
    candidates = [loaded] if loaded else []
    if cfg.autoresume and cfg.save_folder and not checks.is_remote(cfg.save_folder):
        candidates.append(os.path.join(resume.save_dir(cfg), "latest-rank0.pt"))
    if cfg.load_path and not checks.is_remote(cfg.load_path) and not pretrained.is_pretrained_start(cfg.load_path):
        candidates.append(cfg.load_path.replace("{rank}", "0").replace("{run_name}", run_name_of(cfg)))
    for path in candidates:
        if path and os.path.exists(path):
            return os.path.realpath(path)
    return None


def _check_loaded_shapes(cfg: TrainConfig, model_shapes: dict, checkpoint: str | None, error=None) -> None:
    """Raise a TrainError naming the parameter/shape and checkpoint when they differ from the model."""
    ckpt_shapes = checks.checkpoint_param_shapes(checkpoint) if checkpoint else None
    problem = checks.shape_problem(ckpt_shapes, model_shapes) if ckpt_shapes else None
    if problem:
        raise TrainError(checks.mismatch_message(checkpoint, problem, _model_description(cfg))) from error
    if error is not None and checks.is_shape_mismatch(error):
        where = checkpoint or cfg.load_path or f"the latest checkpoint in {resume.save_dir(cfg)}"
        raise TrainError(checks.shape_mismatch_message(error, where, _model_description(cfg))) from error


def _model_description(cfg: TrainConfig) -> str:
    m = cfg.model
    return (f"d_model={m.d_model}, n_layers={m.n_layers}, n_heads={m.n_heads}, vocab_size={m.vocab_size}, "
            f"expansion_ratio={m.expansion_ratio}")


def _resume_point(cfg: TrainConfig, sharded: bool) -> tuple[str | None, bool, bool]:
    """(load_path, load_weights_only, autoresume) to give composer.

    For an ``s3://`` save folder, the newest complete checkpoint is looked up on the bucket here
    (``checks.complete_s3_checkpoints``: the ``.complete`` markers give the sizes a HEAD must find; a newer partial
    or unmarked one is skipped and named). composer 0.32.1 would instead take the one ``latest-rank0.pt.symlink``
    names (for whole files: copied to ``./s3:/<bucket>/...`` under the working directory and, on later restarts,
    that stale copy reused rather than the newest checkpoint in the bucket). A sharded checkpoint skipped loses its
    markers, so that the save of its batch replaces its files.
    """
    if not (cfg.autoresume and checks.is_remote(cfg.save_folder) and cfg.save_folder.startswith("s3://")):
        return cfg.load_path, cfg.load_weights_only, cfg.autoresume
    from composer.utils import dist
    found, skipped = [None], []
    if dist.get_global_rank() == 0:
        found[0], skipped = checks.complete_s3_checkpoints(resume.save_dir(cfg), sharded)
        for uri, why in skipped:
            if sharded:
                checks.unmark_s3_checkpoint(uri)
            log.warning("autoresume: skipping %s: %s", uri, why)
    dist.broadcast_object_list(found)
    if found[0]:
        log.info("autoresume: continuing from %s%s", found[0],
                 " (the newest complete checkpoint in the bucket)" if skipped else "")
        return found[0], False, False
    log.info("autoresume: no checkpoint in %s yet; starting %s", resume.save_dir(cfg),
             f"from load_path {cfg.load_path}" if cfg.load_path else "from scratch")
    return cfg.load_path, cfg.load_weights_only, False


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _data_sources(loader) -> str:
    """Where a loader reads from, in a few words: its streams, remote/local folder and split, or finetune files."""
    from llmfoundry.data.finetune import FinetuneLoaderConfig
    if isinstance(loader, FinetuneLoaderConfig):
        files = loader.data_files if isinstance(loader.data_files, str) else ", ".join(loader.data_files or [])
        streams = "; ".join(f"{k}: {v.remote or v.local}" for k, v in (loader.streams or {}).items())
        return f"{loader.hf_dataset or files or loader.remote or loader.local or streams} (split {loader.split})"
    if loader.streams:
        names = [f"{k}: {v.remote or v.local}" for k, v in loader.streams.items()]
        return f"{len(names)} streams ({'; '.join(names)})" + (f", split {loader.split}" if loader.split else "")
    return f"{loader.remote or loader.local}" + (f" (split {loader.split})" if loader.split else "")


def run_summary(cfg: TrainConfig, device: str, precision: str, world_size: int, device_batch: int,
                microbatch, config_path: str | None) -> str:
    """What the run is, in a few lines (the full resolved config goes to ``config_path`` and the debug log)."""
    m, a = cfg.model, cfg.model.attn_config
    heads = f"{m.n_heads} heads" + (f" ({m.kv_n_heads} kv)" if m.kv_n_heads != m.n_heads else "")
    lines = [
        f"run {run_name_of(cfg)}: MPT with {_count(m.num_params())} parameters (d_model {m.d_model}, "
        f"{m.n_layers} layers, {heads}), attn_impl {a.attn_impl}{' + alibi' if a.alibi else ''}, "
        f"seq len {cfg.train_loader.max_seq_len}",
        f"  batch {cfg.global_train_batch_size} = {device_batch} per device x {world_size} "
        f"device{'s' if world_size > 1 else ''} ({device}, world_size={world_size}), micro-batch {microbatch}, "
        f"precision {precision}, fsdp {'v%d' % cfg.fsdp.version if cfg.fsdp else 'off'}",
        f"  train {cfg.max_duration} on {_data_sources(cfg.train_loader)}",
    ]
    if cfg.eval_loader is not None:
        lines.append(f"  eval every {cfg.eval_interval} on {_data_sources(cfg.eval_loader)}")
    if cfg.save_folder:
        lines.append(f"  save to {resume.save_dir(cfg)} every {cfg.save_interval}"
                     f"{', autoresume' if cfg.autoresume else ''}")
    where = [f"{config_path} (written at the first batch)"] if config_path else []
    where += ["wandb's run config"] if cfg.loggers.wandb is not None else []
    lines.append(f"  full config: {'; '.join(where + ['python_log_level=debug prints it'])}")
    return "\n".join(lines)


def console_output(progress_bar, log_to_console: bool) -> tuple[bool, bool]:
    """(progress_bar, log_to_console) for composer's Trainer. ``progress_bar: auto``: composer's progress bar when
    its console stream (stderr) is a terminal with a width (tqdm draws nothing 0 columns wide); otherwise (CI,
    files, SLURM logs) the console log lines every ``console_log_interval`` (when ``log_to_console``)."""
    if progress_bar != "auto":
        return progress_bar, log_to_console
    try:
        tty = sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):  # no file descriptor (a replaced sys.stderr)
        tty = False
    return tty, log_to_console and not tty


# composer's autoresume search logs, at INFO, four lines of which one names a logger object ("Checkpoint not found
# in: <...ConsoleLogger object at 0x...>"); _log_autoresume says the outcome in one line instead.
_COMPOSER_AUTORESUME_LINES = ("Searching for a previous checkpoint to autoresume", "Looking for autoresume checkpoint",
                              "Checkpoint not found in:", "No previous autoresume checkpoint found")


def _not_autoresume_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_COMPOSER_AUTORESUME_LINES) or record.levelno > logging.INFO \
        or logging.getLogger("llmfoundry").isEnabledFor(logging.DEBUG)


def _quiet_composer_autoresume() -> None:
    composer_log = logging.getLogger("composer.trainer.trainer")
    if _not_autoresume_noise not in composer_log.filters:
        composer_log.addFilter(_not_autoresume_noise)


def _log_autoresume(cfg: TrainConfig, loaded: str | None, load_path: str | None) -> None:
    if loaded and loaded != load_path:
        log.info("autoresume: continuing from %s", _local_checkpoint(cfg, loaded) or loaded)
    else:
        log.info("autoresume: no checkpoint yet in %s; starting %s", resume.save_dir(cfg),
                 f"from load_path {load_path}" if loaded else "from scratch")


def _check_init_device(cfg: TrainConfig, device: str) -> None:
    init = cfg.model.init_device
    if init in ("meta", "mixed") and (cfg.fsdp is None or device != "gpu"):
        raise ConfigError(f"model.init_device: {init} needs FSDP on GPUs (the shards are materialized there); "
                          "use model.init_device: cpu")
    if init == "mixed" and cfg.fsdp.version == 1 and not cfg.fsdp.sync_module_states:
        raise ConfigError("model.init_device: mixed (weights on local rank 0 only) needs fsdp.sync_module_states: "
                          "true with fsdp.version: 1")
    if init == "cuda" and device != "gpu":
        raise ConfigError("model.init_device: cuda needs a GPU; use model.init_device: cpu")


def _build_loader(cfg: TrainConfig, loader_cfg, batch_size: int, tokenizer, eos_for_sequence_id):
    """``train_loader`` / ``eval_loader`` by type: finetuning examples or pretraining MDS streams."""
    from llmfoundry.data.finetune import FinetuneLoaderConfig, build_finetune_dataloader
    from llmfoundry.data.text_loader import build_text_dataloader
    if isinstance(loader_cfg, FinetuneLoaderConfig):
        return build_finetune_dataloader(loader_cfg, tokenizer, batch_size,
                                         attn_uses_sequence_id=cfg.model.attn_config.attn_uses_sequence_id)
    return build_text_dataloader(loader_cfg, batch_size, eos_for_sequence_id, vocab_size=cfg.model.vocab_size,
                                 tokenizer=tokenizer,  # for streams of raw text
                                 max_duration=cfg.max_duration)  # places the points of a curriculum


def build_trainer(cfg: TrainConfig):
    """Everything up to (not including) ``fit``: see the module docstring for the steps. When it fails, the save
    folder levels it created (composer creates the save folder when the Trainer is built) are removed again if
    they are still empty."""
    with checks.removing_created_folders(resume.save_dir(cfg)):
        return _build_trainer(cfg)


def _build_trainer(cfg: TrainConfig):
    from composer import Trainer
    from composer.core import Evaluator
    from composer.utils import dist, reproducibility

    from llmfoundry.data.curriculum import check_run as check_curriculum
    from llmfoundry.data.tokenizer import load_tokenizer

    _setup_logging(cfg.python_log_level)
    device = resolve_device(cfg.device)
    if cfg.precision == "amp_fp8":  # an FP8 GPU, a working torchao, the recipe: refused before any work
        fp8.check_fp8(device, cfg.fp8, cfg.fsdp)
    precision = resolve_precision(cfg.precision, device)
    if cfg.fsdp is not None and device != "gpu" and cfg.fsdp.version != 2:
        raise ConfigError("fsdp.version: 1 needs GPUs; on CPU use fsdp: null (several processes then use DDP) or "
                          "fsdp.version: 2 (FSDP2 over gloo: slow, for testing sharded checkpoints)")
    if cfg.fsdp is not None and device != "gpu" and cfg.fsdp.sharding_strategy == "HYBRID_SHARD":
        raise ConfigError("fsdp.sharding_strategy: HYBRID_SHARD needs GPUs (NCCL; gloo cannot average gradients "
                          "across replicas); use FULL_SHARD on CPU")
    attn = cfg.model.attn_config.attn_impl
    if device == "cpu" and (attn == "flash" or attn == "triton" and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ConfigError(f"model.attn_config.attn_impl: {attn} needs a CUDA GPU; on CPU use torch or flex")
    world_size = dist.get_world_size()
    if world_size > 1 or cfg.fsdp is not None:
        if device == "gpu":
            torch.cuda.set_device(dist.get_local_rank())
        dist.initialize_dist(device, cfg.dist_timeout)  # composer's Trainer reuses this process group
    device_batch = checks.device_batch_size(cfg.global_train_batch_size, world_size)
    microbatch = checks.check_microbatch(cfg.device_train_microbatch_size, device_batch, device == "gpu",
                                         cfg.fsdp.version if cfg.fsdp else None)
    check_curriculum(cfg.train_loader, cfg.eval_loader, cfg.max_duration, cfg.global_train_batch_size)
    config_path = resume.config_copy_path(cfg)
    if dist.get_global_rank() == 0:
        log.info("%s", run_summary(cfg, device, precision, world_size, device_batch, microbatch, config_path))
        log.debug("resolved config:\n%s", config_to_yaml(cfg))
    if cfg.autoresume and not (cfg.run_name or env_run_name()):
        raise ConfigError("autoresume needs a run_name (set run_name, or RUN_NAME in the environment)")
    _preflight(cfg)

    tokenizer = load_tokenizer(cfg.tokenizer)
    _check_model_vs_data(cfg, tokenizer)
    eos_for_sequence_id = tokenizer.eos_token_id if cfg.model.attn_config.attn_uses_sequence_id else None

    reproducibility.seed_all(cfg.seed)  # same initial weights on every rank
    _check_init_device(cfg, device)
    # MPTForCausalLM creates the weights on cfg.model.init_device
    model = ComposerMPT(cfg.model, train_metrics=cfg.train_metrics,
                        checkpoint_blocks=cfg.fsdp.activation_checkpointing_blocks if cfg.fsdp else None)
    # amp_fp8: the blocks' linears become torchao Float8Linear before the optimizer and FSDP see the weights
    fp8_callbacks = fp8.prepare(model.model, cfg) if precision == "amp_fp8" else []
    optimizer = builders.build_optimizer(cfg.optimizer, model.parameters())

    train_loader = _build_loader(cfg, cfg.train_loader, device_batch, tokenizer, eos_for_sequence_id)
    evaluators = []
    if cfg.eval_loader is not None:
        eval_batch = cfg.device_eval_batch_size or (microbatch if isinstance(microbatch, int) else device_batch)
        eval_loader = _build_loader(cfg, cfg.eval_loader, eval_batch, tokenizer, eos_for_sequence_id)
        evaluators.append(Evaluator(label="eval", dataloader=eval_loader,
                                    metric_names=list(model.get_metrics(is_train=False))))

    callbacks = builders.build_callbacks(cfg.callbacks, on_gpu=device == "gpu", save_folder=resume.save_dir(cfg))
    callbacks += builders.build_grad_sync(cfg.fsdp, precision)
    callbacks += fp8_callbacks  # FSDP float8 all-gather: the next step's FP8 scales after each step
    # icl_tasks: scored at the eval points (icl_eval.py), rows per forward as the eval loader's batch
    callbacks += build_in_run_icl(cfg, tokenizer, cfg.device_eval_batch_size or
                                  (microbatch if isinstance(microbatch, int) else device_batch))
    # the model config and tokenizer travel inside every checkpoint (s3 ones too): eval/export need nothing else
    callbacks.append(ModelConfigRecorder(cfg.model, cfg.tokenizer))
    shape_recorder = resume.BatchShapeRecorder(cfg)
    callbacks.append(shape_recorder)
    hparams = to_dict(cfg)
    loggers = builders.build_loggers(cfg.loggers, run_name_of(cfg), hparams, resume=bool(cfg.autoresume))
    parallelism = builders.build_parallelism(cfg.fsdp, world_size, dist.get_local_world_size())
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # before FSDP shards them
    sharded = cfg.fsdp is not None and cfg.fsdp.state_dict_type == "sharded"
    # a save cut short by a kill: set aside, resume from the one before (rank 0 looks, every rank stops on a problem)
    problem = [resume.check_local_checkpoints(cfg, sharded) if dist.get_global_rank() == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(problem)
    if problem[0]:
        raise TrainError(problem[0])
    load_path, load_weights_only, autoresume = _resume_point(cfg, sharded)
    resuming = autoresume and os.path.exists(os.path.join(resume.save_dir(cfg) or "", "latest-rank0.pt"))
    downloaded = None  # the user's load_path in a bucket (an llm-foundry checkpoint?): a copy on this node
    # until that copy is loaded and removed, any error on the way (composer's too) deletes it: local rank 0,
    # no barrier (the other ranks may never get there), and the error goes on up
    with pretrained.discard_on_error() as copies:
        if load_path and load_path == cfg.load_path and checks.is_remote(load_path) and not resuming:
            load_path, downloaded = pretrained.fetch_remote_start(load_path, run_name_of(cfg))
            copies.append(downloaded)
        if pretrained.is_pretrained_start(load_path) and not resuming:  # an HF MPT folder or an llm-foundry checkpoint
            load_path, load_weights_only = pretrained.start_point(cfg, load_path)
        progress_bar, log_to_console = console_output(cfg.progress_bar, cfg.log_to_console)

        _quiet_composer_autoresume()
        nodes.node_local_signal_files()  # composer names them after node 0 on every node (a shared save folder)
        try:
            trainer = Trainer(
                run_name=run_name_of(cfg),
                model=model,
                train_dataloader=train_loader,
                eval_dataloader=evaluators or None,
                eval_interval=cfg.eval_interval,
                eval_subset_num_batches=cfg.eval_subset_num_batches,
                max_duration=cfg.max_duration,
                optimizers=optimizer,
                schedulers=builders.build_scheduler(cfg.scheduler),
                algorithms=builders.build_grad_clipping(cfg.max_grad_norm),
                device_train_microbatch_size=microbatch,
                callbacks=callbacks,
                loggers=loggers,
                progress_bar=progress_bar,
                log_to_console=log_to_console,
                console_log_interval=cfg.console_log_interval,
                save_folder=cfg.save_folder,
                save_interval=cfg.save_interval,
                save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
                save_overwrite=cfg.save_overwrite,
                save_weights_only=cfg.save_weights_only,
                load_path=load_path,
                load_weights_only=load_weights_only,
                autoresume=autoresume,
                parallelism_config=parallelism,
                device=device,
                precision=fp8.composer_precision(precision),  # amp_fp8 -> amp_bf16 around the FP8 layers
                seed=cfg.seed,
                dist_timeout=cfg.dist_timeout,
                python_log_level=cfg.python_log_level,
                compile_config=cfg.compile_config,
            )
        except FileExistsError as e:
            raise TrainError(_save_conflict_message(cfg, e)) from e
        except Exception as e:
            if cfg.load_path or cfg.autoresume:
                checkpoint = _local_checkpoint(cfg)
                if checkpoint and os.path.isfile(checkpoint) and checks.is_unreadable_checkpoint(e):
                    raise TrainError(checks.unreadable_checkpoint_message(checkpoint, e)) from e
                _check_loaded_shapes(cfg, model_shapes, checkpoint, error=e)
            raise
        ddp_sums.exact_sums(trainer.state.model)  # CPU DDP: a resumed run's gradients equal the uninterrupted run's
        # s3:// checkpoints: retried uploads, 'latest' only for complete objects
        uploads.install(trainer, cfg.checkpoint_upload.attempts, cfg.checkpoint_upload.backoff_s)
        builders.log_config(loggers, hparams)  # the resolved config as MLflow parameters / TensorBoard hparams
        if autoresume and dist.get_global_rank() == 0:
            _log_autoresume(cfg, trainer.state.load_path, load_path)
        if trainer.state.load_path is not None:  # composer may load some mismatches non-strictly: check them all
            loaded = _local_checkpoint(cfg, trainer.state.load_path)
            _check_loaded_shapes(cfg, model_shapes, loaded)
            if pretrained.is_init_file(load_path):
                pretrained.remove(load_path)
            if downloaded:
                pretrained.remove(downloaded)
    if trainer.state.load_path is not None:
        if dist.get_global_rank() == 0:
            resume.warn_batch_shape_changes(cfg, shape_recorder.previous, trainer.state,
                                            cfg.load_path if downloaded else loaded or trainer.state.load_path)
        earlier = resume.earlier_checkpoints(cfg, trainer, sharded)
        if earlier:  # after composer's CheckpointSaver, so that it runs after each save
            keep = cfg.save_num_checkpoints_to_keep
            trainer.state.callbacks.append(resume.PruneEarlierCheckpoints(trainer, earlier, keep, sharded))
    trainer.state.callbacks.append(resume.ConfigCopy(cfg, config_path))  # after the load: it keeps no state
    trainer.state.callbacks.insert(0, resume.RestoreRNG(trainer))  # mid-epoch resumes continue the saved RNG

    peak = builders.peak_flops_used(callbacks)
    if peak:
        log.info("MFU is measured against a peak of %.4g FLOP/s per device (%s, precision %s)", peak,
                 torch.cuda.get_device_name() if device == "gpu" else "cpu", precision)
    elif cfg.callbacks.speed_monitor is not None:
        log.info("MFU is not reported: no peak FLOP/s known for this device (set "
                 "callbacks.speed_monitor.gpu_flops_available)")
    # the full config goes to the config copy, the debug log and wandb's run config; add what was resolved here
    trainer.logger.log_hyperparameters({"mfu_peak_flops_per_device": peak or 0, "resolved_device": device,
                                        "resolved_precision": precision, "world_size": world_size})
    return trainer


def _save_conflict_message(cfg: TrainConfig, e: FileExistsError) -> str:
    # composer's text: "<file> may conflict with a future checkpoint of the current run.Please delete that file, ..."
    conflict = str(e).split(" may conflict with")[0].strip()
    found = f" (e.g. {conflict})" if conflict and conflict != str(e).strip() else f" ({e})"
    latest = os.path.join(resume.save_dir(cfg) or "", "latest-rank0.pt")
    if cfg.autoresume and os.path.islink(latest) and conflict != str(e).strip():
        return resume.newer_checkpoint_message(resume.save_dir(cfg), latest, conflict)
    return (f"save_folder {resume.save_dir(cfg)} already holds checkpoints of another run{found}. Fix: set autoresume: "
            f"true to continue that run, save_overwrite: true to overwrite it, or pick another save_folder / run_name")


def _already_complete(trainer, cfg: TrainConfig) -> bool:
    """True when the loaded checkpoint is exactly at ``max_duration`` (a finished run launched again: nothing to
    do); a TrainError when it is past it (``max_duration`` was lowered)."""
    max_duration = trainer.state.max_duration
    try:
        elapsed = trainer.state.timestamp.get(max_duration.unit)
    except (ValueError, KeyError, AttributeError):  # a unit the timestamp does not count ('dur')
        return False
    if elapsed < max_duration:
        return False
    where = trainer.state.load_path or "the checkpoint"
    # a checkpoint given as load_path (not found by autoresume) may be meant as the start of a new run
    weights = (", or add load_weights_only=true to start a new run from its weights (step, optimizer and schedule "
               "from zero)") if cfg.load_path and not cfg.load_weights_only and where == cfg.load_path else ""
    if elapsed == max_duration:
        log.warning("run %s is already complete: resumed from %s at %s = max_duration, nothing to train. Raise "
                    "max_duration to train longer, or set a new run_name to start another run%s", run_name_of(cfg),
                    where, elapsed, weights)
        return True
    raise TrainError(f"the checkpoint loaded from {where} is at {elapsed}, past max_duration = {max_duration}; "
                     f"raise max_duration above {elapsed} to continue this run, or set a new run_name (or "
                     f"save_folder) to start another{weights}")


def train(cfg: TrainConfig):
    """Build the trainer and train to ``max_duration``; returns the ``Trainer`` (call ``.close()`` when done).
    A run launched again after it finished returns at once (autoresume finds it complete). A run that fails
    leaves no empty save folder it created behind (the config copy is only written once training starts)."""
    with checks.removing_created_folders(resume.save_dir(cfg)):
        return _train(cfg)


def _train(cfg: TrainConfig):
    trainer = build_trainer(cfg)
    if _already_complete(trainer, cfg):
        return trainer
    try:
        # SIGTERM: save after this batch, raise Preempted; ranks lost for peers.timeout_s: raise LostPeers
        with preemption.handling(cfg, trainer), nodes.watching(cfg, trainer):
            trainer.fit()
    except FileExistsError as e:  # raised at fit start, before any batch, by composer's checkpoint saver
        raise TrainError(_save_conflict_message(cfg, e)) from e
    except Exception as e:
        if checks.is_no_space(e):
            needed = checks.checkpoint_bytes(cfg.model.num_params(), cfg.optimizer.name, cfg.save_weights_only)
            raise TrainError(checks.no_space_message(resume.save_dir(cfg), needed)) from e
        refused = checks.unwritable_save(e, resume.save_dir(cfg))
        if refused is not None:
            raise TrainError(checks.unwritable_message(resume.save_dir(cfg), refused)) from e
        raise
    return trainer


def main(argv: list[str] | None = None) -> int:
    """``scripts/train.py CONFIG.yaml [key=value ...]``. User errors print one message and exit with status 1; a
    run stopped by SIGTERM after saving a checkpoint prints ``preempted: ...`` and exits with status 75
    (``preemption.py``)."""
    from llmfoundry.data import DataError
    from llmfoundry.data.streams import StreamError, user_message

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + (__doc__ or ""))
        return 0
    paths = [a for a in argv if "=" not in a]
    if len(paths) > 1 and paths[0].endswith((".yaml", ".yml")):  # CONFIG.yaml then a word without '='
        print(f"error: command-line override {paths[1]!r} must look like key=value, e.g. optimizer.lr=1e-4\n{USAGE}",
              file=sys.stderr)
        return 1
    if len(paths) != 1:
        print(f"error: expected one config file, got {paths or 'none'}\n{USAGE}", file=sys.stderr)
        return 2
    overrides = [a for a in argv if "=" in a]
    try:
        cfg = load_config(paths[0], overrides)
        trainer = train(cfg)
        trainer.close()
    except (ConfigError, TrainError, DataError, StreamError) as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            # errors every rank raises together (a loss-spike stop, a checkpoint problem rank 0 found and told all):
            # composer's launcher reports global rank 0's status and ends the others once one exits, so let local
            # rank 0 exit first: the job's status is then its 1, not the 241 of a rank 0 the launcher terminated
            time.sleep(LOCAL_RANK0_FIRST_S)
        return 1
    except preemption.Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return preemption.PREEMPTED_EXIT_CODE
    except nodes.LostPeers as e:
        print(f"error: {e}", file=sys.stderr)
        nodes.exit_lost_peers()  # status 69 without Python's teardown, which can wait long on the dead peers
    return 0

