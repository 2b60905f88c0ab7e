"""``load_path: <a Hugging Face MPT folder>``: a run that starts from pretrained weights (finetuning, continued
pretraining).

The folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, as ``save_pretrained`` and
``scripts/convert_composer_to_hf.py`` write it) is converted once per node into a weights-only composer checkpoint
in the local temp folder, which composer then loads like any ``load_path`` with ``load_weights_only`` (so FSDP,
meta-device init and every precision work as for composer's own checkpoints); the copy is removed once loaded.
Before that, the YAML's ``model:`` is compared with the folder's ``config.json``: every setting that would compute
differently from the pretrained model (ALiBi, biases, position table, norms, shapes...) is listed in one error, so
that pretrained weights are never run as another architecture. The run's log names the weights it starts from.
With ``autoresume`` and a checkpoint already in the save folder, the run continues from that checkpoint instead, as
for any ``load_path``.

``load_path: <a checkpoint llm-foundry wrote>`` (a composer checkpoint of a ``HuggingFaceModel`` such as
llm-foundry's ``ComposerMPTCausalLM``: whole file or sharded folder, with the model's config.json in
``state['integrations']['huggingface']``) goes the same way: its config is compared with the YAML's model, its
weights converted (a tied ``lm_head`` copy dropped) and loaded. ``prepare`` starts from its weights only;
``start_point`` (given the whole run config) also continues a whole-file checkpoint's run, its optimizer state
included (``translate_full_checkpoint``: LION's ``exp_avg`` under our optimizer's name, AdamW as it is). Such a
checkpoint in a bucket (``s3://...``) is first downloaded once per node (``fetch_remote_start``).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path

from llmfoundry.checkpoint import (CheckpointError, check_state_dict, convert_hf_to_composer, hf_config,
                                   hf_metadata, hf_to_mpt_state_dict, is_hf_dir, load_composer_checkpoint,
                                   save_composer_weights)
from llmfoundry.utils.config import ConfigError, to_dict

log = logging.getLogger(__name__)

# settings that leave the computation unchanged: training knobs, where and how attention runs, initialization
_FREE = {"attn_config.attn_impl", "attn_config.attn_pdrop", "attn_config.attn_uses_sequence_id", "resid_pdrop",
         "emb_pdrop", "init_device", "max_seq_len", "use_cache"}
_FREE_PREFIXES = ("init_config.",)


def is_pretrained_start(load_path: str | None) -> bool:
    """A Hugging Face MPT folder, or a local checkpoint written by a composer ``HuggingFaceModel`` (llm-foundry)."""
    if not load_path:
        return False
    path = os.path.expanduser(load_path)
    return is_hf_dir(path) or is_foundry_checkpoint(path)


def _foundry_stamp(path: str) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


_FOUNDRY_SEEN: dict[tuple, bool] = {}


def is_foundry_checkpoint(path: str) -> bool:
    """Whether local ``path`` (a ``.pt`` file or a sharded folder) is a composer checkpoint carrying
    ``integrations.huggingface`` metadata: written by llm-foundry's trainer (or any composer HuggingFaceModel),
    not by ours. Reads the file's pickle (tensors memory-mapped) or the folder's ``.metadata``, once per file."""
    if "{" in path or "://" in path or not os.path.exists(path):
        return False
    key = _foundry_stamp(path)
    if key not in _FOUNDRY_SEEN:
        _FOUNDRY_SEEN[key] = _has_hf_metadata(path)
    return _FOUNDRY_SEEN[key]


def _has_hf_metadata(path: str) -> bool:
    import torch
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, ".metadata")):
            return False
        from torch.distributed.checkpoint import FileSystemReader
        try:
            keys = FileSystemReader(path).read_metadata().state_dict_metadata
        except Exception:  # noqa: BLE001 - not a readable DCP folder: composer reports it
            return False
        return any(k.startswith("state.integrations.huggingface.") for k in keys)
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - unreadable here; the trainer's own checks report it
        return False
    return hf_metadata(ckpt) is not None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def architecture_differences(model_cfg, pretrained_cfg, theirs_name: str = "config.json") -> list[str]:
    """Each setting where the run's model would compute differently from the pretrained one, as
    ``model.KEY: the YAML says A, config.json says B`` (``theirs_name`` names the other side). ``max_seq_len`` may
    differ (ALiBi extends; a position table of another length is caught by the shape check)."""
    mine, theirs = _flat(to_dict(model_cfg)), _flat(to_dict(pretrained_cfg))
    out = []
    for key in sorted(set(mine) | set(theirs)):
        if key in _FREE or key.startswith(_FREE_PREFIXES):
            continue
        a, b = mine.get(key), theirs.get(key)
        if a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            out.append(f"model.{key}: the YAML says {a!r}, {theirs_name} says {b!r}")
    return out


def _init_file(hf_dir: str, run_name: str | None) -> str:
    """Where this node keeps the converted weights: the temp folder, named after the folder and its weights'
    sizes and times (a changed folder is converted again)."""
    stamp = []
    for name in sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else [""]:
        st = os.stat(os.path.join(hf_dir, name) if name else hf_dir)
        stamp.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    key = hashlib.sha1("|".join([os.path.realpath(hf_dir), *stamp]).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"mpt-forge-pretrained-{run_name or 'run'}-{key}.pt")


def is_init_file(path: str | None) -> bool:
    return bool(path) and os.path.basename(path).startswith("mpt-forge-pretrained-") and \
        os.path.dirname(os.path.abspath(path)) == os.path.abspath(tempfile.gettempdir())


def remove(path: str) -> None:
    """Once every rank has loaded it, the converted (or downloaded) copy goes (as large as the model's weights; a
    relaunch before the first checkpoint converts the folder again)."""
    from composer.utils import dist
    if dist.get_world_size() > 1:
        dist.barrier()
    discard(path)


def discard(path: str) -> None:
    """Local rank 0 deletes ``path`` (a file or a folder) now, without waiting for the others (a failed start)."""
    import shutil

    from composer.utils import dist
    if dist.get_local_rank() == 0:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)


@contextlib.contextmanager
def discard_on_error():
    """Yields a list for local copies (None: no copy): any exception inside discards them (local rank 0, no
    barrier) and goes on up unchanged; on success they are left to ``remove``."""
    copies: list[str | None] = []
    try:
        yield copies
    except BaseException:
        for path in copies:
            if path:
                discard(path)
        raise


def fetch_remote_start(load_path: str, run_name: str | None) -> tuple[str, str | None]:
    """``load_path`` in an object store (``s3://...``, where llm-foundry runs keep their checkpoints): ``(the path
    to go on with, the local copy to remove once loaded, or None)``.

    Local rank 0 of each node downloads it into the temp folder (the others wait), because only its contents say
    whether llm-foundry wrote it: a whole file comes down whole, and composer then loads that copy instead of
    downloading it again; of a sharded folder only ``.metadata`` first, then the rest only when it is llm-foundry's
    (its weights are converted from the folder), else composer reads the folder from the store as usual (each rank
    fetching only the files it needs)."""
    import shutil

    from composer.utils import dist

    from llmfoundry.checkpoint import fetch_checkpoint
    key = hashlib.sha1(load_path.encode()).hexdigest()[:12]
    folder = os.path.join(tempfile.gettempdir(), f"mpt-forge-download-{run_name or 'run'}-{key}")

    def fetched() -> str:
        (name,) = [n for n in os.listdir(folder) if n != "link.symlink"]
        return os.path.join(folder, name)

    def on_rank0(shards: bool) -> None:
        if dist.get_local_rank() == 0:
            import time
            shutil.rmtree(folder, ignore_errors=True)
            log.info("load_path %s: downloading it to %s%s", load_path, folder,
                     "" if shards else " (of a sharded folder, .metadata first: whose checkpoint is it?)")
            start = time.time()
            try:
                fetch_checkpoint(load_path, folder, shards=shards)
            except CheckpointError as e:
                raise ConfigError(f"load_path: {e}") from e
            size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
            log.info("load_path %s: %.1f MB in %.1f s", load_path, size / 1e6, time.time() - start)
        if dist.get_world_size() > 1:
            dist.barrier()

    on_rank0(shards=False)
    local = fetched()
    if not os.path.isdir(local):
        return local, folder
    if not _has_hf_metadata(local):  # our own sharded checkpoint: composer reads it from the store
        remove(folder)
        return load_path, None
    on_rank0(shards=True)
    return fetched(), folder


def prepare(model_cfg, load_path: str, run_name: str | None) -> str:
    """Check the YAML's model against the pretrained folder (or llm-foundry checkpoint) ``load_path`` and return
    the composer checkpoint to load with ``load_weights_only`` (written by local rank 0 of each node; the others
    wait)."""
    from composer.utils import dist

    hf_dir = os.path.expanduser(load_path)
    if not is_hf_dir(hf_dir):
        return _prepare_foundry(model_cfg, hf_dir, run_name, full=False)
    problems = architecture_differences(model_cfg, hf_config(hf_dir))
    if problems:
        raise ConfigError(
            f"load_path {hf_dir} holds a pretrained model of another architecture than the YAML's model: "
            f"{'; '.join(problems)}. Set these model: keys as config.json has them (the weights only mean "
            f"something in the architecture they were trained in)")
    path = _init_file(hf_dir, run_name)
    if dist.get_local_rank() == 0 and not os.path.isfile(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        convert_hf_to_composer(hf_dir, tmp, model_config=model_cfg, overwrite=True)
        os.replace(tmp, path)
    if dist.get_world_size() > 1:
        dist.barrier()
    log.info("starting from the pretrained weights in %s (Hugging Face MPT folder; converted for loading to %s)",
             hf_dir, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints llm-foundry wrote

_THEIRS = "the checkpoint's config"


def _foundry_config(model_cfg, path: str):
    """``(MPTConfig, state_dict)`` of the checkpoint (the config from its Hugging Face metadata), after refusing,
    in one message, every setting in which the YAML's model differs from it."""
    state_dict, ckpt_cfg, _ = load_composer_checkpoint(path)
    problems = architecture_differences(model_cfg, ckpt_cfg, _THEIRS)
    if problems:
        raise ConfigError(
            f"load_path {path} is a checkpoint of another architecture than the YAML's model (its config comes from "
            f"the checkpoint's integrations.huggingface metadata, as llm-foundry writes it): {'; '.join(problems)}. "
            f"Set these model: keys as the checkpoint has them (the weights only mean something in the "
            f"architecture they were trained in)")
    return ckpt_cfg, state_dict


def translate_full_checkpoint(path: str, model_cfg, optimizer_name: str, out: str) -> str:
    """A whole-file llm-foundry checkpoint ``path`` as one our trainer resumes in full (step, optimizer, schedule):
    the tied ``lm_head`` copy of a transformers MPT dropped, the optimizer state filed under our optimizer's class
    (llm-foundry's ``DecoupledLionW`` keeps LION's momentum as ``exp_avg``, as ours does; composer's
    ``DecoupledAdamW`` is ours too), the Hugging Face metadata left out. Written to ``out``."""
    import torch
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt["state"]
    names = {"lion": "Lion", "adamw": "DecoupledAdamW"}
    ours = names.get(optimizer_name, optimizer_name)
    saved = dict(state.get("optimizers") or {})
    theirs = {"DecoupledLionW": "lion", "Lion": "lion", "DecoupledAdamW": "adamw"}
    if len(saved) > 1:
        raise CheckpointError(f"load_path {path} holds the state of several optimizers ({', '.join(saved)}); set "
                              "load_weights_only: true to start a new run from its weights")
    if saved:
        name, optim_state = next(iter(saved.items()))
        kind = theirs.get(name)
        if kind is None or kind != optimizer_name:
            raise CheckpointError(
                f"load_path {path} holds the optimizer state of {name} but the run's optimizer is "
                f"{optimizer_name!r}; set optimizer.name: {kind} to continue that run, or load_weights_only: true "
                f"to start a new run from its weights (optimizer state, step and schedule from zero)")
        if kind == "lion":
            for group in optim_state.get("param_groups", []):
                group.setdefault("peak_lr", group.get("initial_lr", group.get("lr")))
        state["optimizers"] = {ours: optim_state}
    plain = {k[len("model."):]: v for k, v in state["model"].items() if k.startswith("model.")}
    fitted = hf_to_mpt_state_dict(plain, model_cfg)
    check_state_dict(fitted, model_cfg, f"checkpoint {path}")
    state["model"] = {f"model.{k}": v for k, v in fitted.items()}
    state["integrations"] = {}
    if not isinstance((state.get("dataset_state") or {}).get("train"), dict):
        state.pop("dataset_state", None)  # no loader position saved (a plain DataLoader): composer skips batches
    torch.save(ckpt, out)
    return out


def _prepare_foundry(model_cfg, path: str, run_name: str | None, *, full: bool, optimizer_name: str = "lion") -> str:
    try:
        return _convert_foundry(model_cfg, path, run_name, full=full, optimizer_name=optimizer_name)
    except CheckpointError as e:  # one message from the command line, as for config errors
        raise ConfigError(str(e)) from e


def _convert_foundry(model_cfg, path: str, run_name: str | None, *, full: bool, optimizer_name: str) -> str:
    from composer.utils import dist

    if full and os.path.isdir(path):
        raise CheckpointError(f"load_path {path} is a sharded llm-foundry checkpoint: a run can start from its "
                              "weights, not continue it; set load_weights_only: true")
    ckpt_cfg, state_dict = _foundry_config(model_cfg, path)
    out = _init_file(path, run_name)
    if full:
        out = out[:-len(".pt")] + "-full.pt"
    if dist.get_local_rank() == 0 and not os.path.isfile(out):
        tmp = f"{out}.{os.getpid()}.tmp"
        if full:
            translate_full_checkpoint(path, model_cfg, optimizer_name, tmp)
        else:
            check_state_dict(hf_to_mpt_state_dict(state_dict, model_cfg), model_cfg, f"checkpoint {path}")
            save_composer_weights(state_dict, ckpt_cfg, tmp, overwrite=True)
        os.replace(tmp, out)
    if dist.get_world_size() > 1:
        dist.barrier()
    what = ("continuing its run (step, optimizer state and schedule)" if full else
            "its model weights only: step, optimizer state and schedule start from zero")
    log.info("starting from the llm-foundry checkpoint %s (%s; converted for loading to %s)", path, what, out)
    return out


def start_point(cfg, load_path: str) -> tuple[str, bool]:
    """``(load_path, load_weights_only)`` to give composer for a run whose ``load_path`` is a Hugging Face MPT folder
    or an llm-foundry checkpoint (``is_pretrained_start``): a folder, or ``load_weights_only: true``, starts from
    the weights; otherwise an llm-foundry checkpoint's run is continued (see ``translate_full_checkpoint``)."""
    path = os.path.expanduser(load_path)
    if is_hf_dir(path) or cfg.load_weights_only:
        return prepare(cfg.model, load_path, run_name_of(cfg)), True
    return _prepare_foundry(cfg.model, path, run_name_of(cfg), full=True, optimizer_name=cfg.optimizer.name), False


def run_name_of(cfg) -> str | None:
    from llmfoundry.train.config import run_name_of as name
    return name(cfg)
