"""Training: YAML config -> composer ``Trainer`` around the MPT model.

- ``config.py``: ``TrainConfig`` and ``load_config(yaml, overrides)`` (strict; the key -> code map is there).
- ``composer_model.py``: ``ComposerMPT`` (loss, metrics, FLOPs per batch for MFU).
- ``builders.py``: optimizer, scheduler, gradient clipping, FSDP config, callbacks, loggers.
- ``checks.py``: batch-size, object-store and disk checks before training; clear messages for load/save errors.
- ``train.py``: ``build_trainer(cfg)``, ``train(cfg)`` and the command line ``main(argv)``.
"""
from llmfoundry.train.config import TrainConfig, load_config
from llmfoundry.train.train import build_trainer, main, train

__all__ = ["TrainConfig", "load_config", "build_trainer", "train", "main"]
