"""``callbacks.hf_checkpoint``: Hugging Face folders while training, loadable by transformers' ``MptForCausalLM``.

Every ``interval`` batches, and after the last batch (unless that batch was just written), the callback writes
``{save_folder}/ba{batch}/`` holding ``config.json``, ``model.safetensors``, the run's tokenizer files,
``generation_config.json`` and, last, ``COMPLETE`` (``{"batch": N}``): a folder without ``COMPLETE`` is not a
finished checkpoint. ``save_folder`` may be local or ``s3://...`` and may hold ``{run_name}``. A local save takes
as long as writing the weights once (as a composer checkpoint does); an upload runs beside training.

How a save goes (``HFCheckpoint._save``):

1. every rank takes part in gathering the full weights (torch's ``get_model_state_dict`` with
   ``full_state_dict=True, cpu_offload=True``: FSDP shards are all-gathered one tensor at a time and only rank 0
   keeps them, on the CPU), cast to ``precision`` (fp32 or bf16);
2. rank 0 writes the folder into a staging folder (the same code path as ``convert_composer_to_hf``:
   ``save_hf`` + tokenizer + generation settings);
3. local: the staging folder (a hidden sibling, ``.ba{N}.xxxxxxxx``) is renamed to ``ba{N}``, so a half-written
   folder never has the final name (staging folders a crash left behind are removed when the next run starts);
   ``s3://``: staged in a local temporary folder, the files are uploaded, ``COMPLETE`` last, in a background
   thread (training goes on; the next save and the end of the run wait for it and raise its error).

A model config that transformers' MPT cannot represent (``hf_export_problems``: ALiBi off, learned positions,
biases, GQA, ...) is refused when the trainer is built (Event.INIT), in one message, before any batch is trained.
A ``ba{N}`` folder that already exists (e.g. after a resumed run) is kept unless ``overwrite: true``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from llmfoundry.utils.config import ConfigError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def find_network(model: torch.nn.Module):
    """The ``MPTForCausalLM`` inside composer's (DDP/FSDP-wrapped) model."""
    from llmfoundry.models.mpt import MPTForCausalLM
    for m in model.modules():
        if isinstance(m, MPTForCausalLM):
            return m
    raise TypeError(f"no MPTForCausalLM inside {type(model).__name__}")


def _clean_key(key: str) -> str:
    for p in _WRAPPER_PREFIXES:
        key = key.replace(p, "")
    return key


def gather_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The network's full state dict on rank 0 (CPU, floats cast to ``dtype``, ``MPTForCausalLM`` names); empty on
    other ranks. Every rank must call it: in a distributed run, torch's ``get_model_state_dict(full_state_dict,
    cpu_offload)`` gathers the FSDP1/FSDP2 shards collectively, one tensor at a time, onto rank 0's CPU."""
    if dist.get_world_size() > 1:  # from the root (composer's model, maybe DDP/FSDP1-wrapped): names lose wrappers
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sd = {k.removeprefix("module.").removeprefix("model."): v for k, v in sd.items()}
    else:
        sd = find_network(model).state_dict()
    if dist.get_global_rank() != 0:
        return {}
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        out[_clean_key(k)] = v.to(dtype) if v.is_floating_point() else v
    return out


def write_folder(cfg, state_dict: dict, tok, folder: str, batch: int) -> None:
    """config.json, weights, tokenizer, generation_config.json, then ``COMPLETE`` into ``folder`` (existing)."""
    from llmfoundry.checkpoint import _write_generation_settings
    from llmfoundry.models.mpt.hf import save_hf
    save_hf(cfg, state_dict, folder)
    tok.save_pretrained(folder)
    _write_generation_settings(folder, tok)
    (Path(folder) / COMPLETE).write_text(json.dumps({"batch": batch}) + "\n")


def publish_local(stage: str, dest: str, overwrite: bool) -> bool:
    """Rename ``stage`` to ``dest``; False (``stage`` removed) when ``dest`` exists and not ``overwrite``."""
    if os.path.exists(dest):
        if not overwrite:
            shutil.rmtree(stage)
            return False
        shutil.rmtree(dest)
    os.replace(stage, dest)
    return True


def remove_stale_stages(folder: str) -> None:
    """Remove the staging folders (``.ba{N}.xxxxxxxx``) a save interrupted by a crash left in a local ``folder``."""
    from llmfoundry.checkpoint import is_remote
    if is_remote(folder) or not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if re.fullmatch(r"\.ba\d+\.\w{8}", name) and os.path.isdir(os.path.join(folder, name)):
            log.warning("hf_checkpoint: removing %s, left by an interrupted save", os.path.join(folder, name))
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def upload_folder(stage: str, uri: str, overwrite: bool) -> bool:
    """Upload the files of ``stage`` under ``uri`` (``COMPLETE`` last), then remove ``stage``. False when ``uri``
    already holds a complete checkpoint and not ``overwrite``."""
    from composer.utils import maybe_create_object_store_from_uri, parse_uri
    store = maybe_create_object_store_from_uri(uri)
    prefix = parse_uri(uri)[2].rstrip("/")
    try:
        if not overwrite:
            try:
                store.get_object_size(f"{prefix}/{COMPLETE}")
                return False
            except FileNotFoundError:
                pass
        names = sorted(n for n in os.listdir(stage) if n != COMPLETE) + [COMPLETE]
        for name in names:
            store.upload_object(object_name=f"{prefix}/{name}", filename=os.path.join(stage, name))
        return True
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class HFCheckpoint(Callback):
    """See the module docstring. ``interval``: batches between saves; ``precision``: ``fp32`` or ``bf16``."""

    def __init__(self, save_folder: str, interval: int, precision: str = "fp32", overwrite: bool = False):
        if precision not in _DTYPES:
            raise ConfigError(f"callbacks.hf_checkpoint.precision = {precision!r}: use fp32 or bf16")
        self.save_folder, self.interval, self.overwrite = save_folder, interval, overwrite
        self.dtype = _DTYPES[precision]
        self.cfg = self.tok = None
        self.last_saved = -1
        self._upload: threading.Thread | None = None
        self._upload_error: BaseException | None = None

    # ------------------------------------------------------------------------------------------------ events
    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._init(state)
        elif event == Event.BATCH_CHECKPOINT:
            batch = int(state.timestamp.batch)
            if batch % self.interval == 0:
                self._save(state, batch)
        elif event == Event.FIT_END:
            batch = int(state.timestamp.batch)
            if batch != self.last_saved:
                self._save(state, batch)
            self._wait()

    def close(self, state: State, logger: Logger) -> None:
        self._wait()

    def _init(self, state: State) -> None:
        from llmfoundry.checkpoint import RECORDER_NAME, _tokenizer_for_export
        from llmfoundry.data.tokenizer import load_tokenizer
        from llmfoundry.models.mpt.hf import hf_export_problems
        self.cfg = find_network(state.model).config
        problems = hf_export_problems(self.cfg)
        if problems:
            raise ConfigError("callbacks.hf_checkpoint: transformers' MptForCausalLM cannot represent this model ("
                              + "; ".join(problems) + "). Change the model config, or turn hf_checkpoint off and "
                              "use composer checkpoints")
        names = [cb.tokenizer for cb in state.callbacks if type(cb).__name__ == RECORDER_NAME]
        if not names or not names[0]:
            raise ConfigError("callbacks.hf_checkpoint needs the run's tokenizer ('tokenizer:')")
        self.tok = _tokenizer_for_export(load_tokenizer(names[0]), self.cfg.max_seq_len)
        folder = self.save_folder.replace("{run_name}", state.run_name or "")
        self.save_folder = folder[len("file://"):] if folder.startswith("file://") else folder
        if dist.get_global_rank() == 0:
            remove_stale_stages(self.save_folder)

    # ------------------------------------------------------------------------------------------------ saving
    def _wait(self) -> None:
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._upload_error is not None:
            err, self._upload_error = self._upload_error, None
            raise RuntimeError(f"callbacks.hf_checkpoint: upload to {self.save_folder} failed: {err}") from err

    def _save(self, state: State, batch: int) -> None:
        from llmfoundry.checkpoint import is_remote
        self.last_saved = batch
        sd = gather_state_dict(state.model, self.dtype)  # collective: every rank
        if dist.get_global_rank() != 0:
            return
        self._wait()  # the previous upload, before this one starts
        dest = f"{self.save_folder.rstrip('/')}/ba{batch}"
        remote = is_remote(self.save_folder)
        if remote:
            stage = tempfile.mkdtemp(prefix=f"hf-ba{batch}-")
        else:
            os.makedirs(self.save_folder, exist_ok=True)
            stage = tempfile.mkdtemp(dir=self.save_folder, prefix=f".ba{batch}.")
        write_folder(self.cfg, sd, self.tok, stage, batch)
        del sd
        if not remote:
            os.chmod(stage, 0o777 & ~_umask())
            if publish_local(stage, dest, self.overwrite):
                log.info("hf_checkpoint: wrote %s", dest)
            else:
                log.warning("hf_checkpoint: %s exists; kept it (overwrite: true replaces it)", dest)
            return

        def upload():
            try:
                if upload_folder(stage, dest, self.overwrite):
                    log.info("hf_checkpoint: uploaded %s", dest)
                else:
                    log.warning("hf_checkpoint: %s exists; kept it (overwrite: true replaces it)", dest)
            except BaseException as e:  # raised in the training thread by _wait
                self._upload_error = e
        self._upload = threading.Thread(target=upload, name=f"hf-checkpoint-ba{batch}", daemon=True)
        self._upload.start()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
