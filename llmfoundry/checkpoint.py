"""Composer checkpoints <-> MPT weights, and the Hugging Face MPT format.

A composer checkpoint is either

* a whole file (``ep0-ba100-rank0.pt``): ``torch.save`` of ``{'state': {'model': {...}, ...}, 'rng': ...}``, the
  model's tensors under ``state['state']['model']`` with keys prefixed ``model.`` (``ComposerMPT.model``), or
* a sharded folder (FSDP ``state_dict_type: sharded``): a ``torch.distributed.checkpoint`` (DCP) directory with
  ``.metadata`` and ``__{rank}_0.distcp`` files, where the same tensors have the flattened keys
  ``state.model.model.transformer...``;

local, or at a URI composer's object stores understand (``s3://bucket/path``; ``S3_ENDPOINT_URL`` is honoured).

The model config comes from (first found): the ``model_config`` argument (an ``MPTConfig``, a dict, or a path to
a training YAML / ``MPTConfig`` YAML / HF ``config.json``), the checkpoint itself (recorded there by
``ModelConfigRecorder``, a composer callback), or the ``config.yaml`` the trainer writes next to its checkpoints.

Public functions:

* ``load_composer_checkpoint(path, model_config=None) -> (state_dict, MPTConfig, tokenizer_name | None)``
* ``check_state_dict(state_dict, config)``: a clear error naming the tensor and both shapes on a mismatch
* ``load_model(path, ...) -> (MPTForCausalLM, tokenizer_name | None)``: a composer checkpoint or an HF directory
* ``convert_composer_to_hf(path, out_dir, tokenizer=...)``: a directory ``transformers.MptForCausalLM`` and
  ``AutoTokenizer`` load
* ``load_hf_weights(model, hf_dir)``: HF MPT weights into an ``MPTForCausalLM`` or ``ComposerMPT`` (finetuning)
* ``save_composer_weights(state_dict, config, path)``: a ``.pt`` the trainer's ``load_path`` accepts with
  ``load_weights_only: true``
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

log = logging.getLogger(__name__)

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
RECORDER_NAME = "ModelConfigRecorder"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked. The message names the file or tensor and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Recording the model config inside checkpoints

_RECORDER_CLASS = None


def _recorder_class():
    global _RECORDER_CLASS
    if _RECORDER_CLASS is not None:
        return _RECORDER_CLASS
    from composer.core import Callback

    class _Recorder(Callback):
        """Stores the model config (and tokenizer name) in every composer checkpoint, so that evaluation and
        export need nothing but the checkpoint: ``state['state']['callbacks']['ModelConfigRecorder']``."""

        def __init__(self, model_config, tokenizer: Optional[str] = None):
            from llmfoundry.utils.config import to_dict
            self.model_config_json = json.dumps(to_dict(model_config))
            self.tokenizer = tokenizer

        def state_dict(self) -> dict[str, Any]:
            return {"model_config_json": self.model_config_json, "tokenizer": self.tokenizer}

        def load_state_dict(self, state: dict[str, Any]) -> None:  # the running config wins on resume
            pass

    _Recorder.__name__ = _Recorder.__qualname__ = RECORDER_NAME  # composer keys callback state by __qualname__
    _RECORDER_CLASS = _Recorder
    return _Recorder


def ModelConfigRecorder(model_config, tokenizer: Optional[str] = None):  # noqa: N802 (a class factory)
    """A composer callback recording ``model_config`` (an ``MPTConfig``) and ``tokenizer`` in each checkpoint;
    add ``ModelConfigRecorder(cfg.model, cfg.tokenizer)`` to the trainer's callbacks. (Built lazily so that
    importing this module does not import composer.)"""
    return _recorder_class()(model_config, tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Fetching and reading checkpoints

def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _object_store(uri: str):
    from composer.utils import maybe_create_object_store_from_uri, parse_uri
    store = maybe_create_object_store_from_uri(uri)
    _, _, key = parse_uri(uri)
    return store, key


def _download(store, key: str, dest: str) -> bool:
    """Download ``key`` to ``dest``; False when the object does not exist."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    try:
        store.download_object(object_name=key, filename=dest, overwrite=True)
        return True
    except FileNotFoundError:
        return False


def fetch_checkpoint(path: str, workdir: str, shards: bool = True) -> str:
    """A local path for ``path``: itself when local, else a download (file, or a sharded folder) into ``workdir``.
    ``shards=False``: of a sharded folder, only its ``.metadata`` (enough to tell whose checkpoint it is)."""
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if not is_remote(path):
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint {path} does not exist; pass a composer checkpoint file (.pt), a "
                                  "sharded checkpoint folder (with .metadata) or an s3:// path")
        return path
    store, key = _object_store(path)
    endpoint = os.environ.get("S3_ENDPOINT_URL", "AWS")
    try:
        if key.endswith(".symlink"):  # composer's remote "latest" pointers hold the real object name
            link = os.path.join(workdir, "link.symlink")
            if not _download(store, key, link):
                raise CheckpointError(f"checkpoint {path} not found (endpoint {endpoint})")
            key = Path(link).read_text().strip()
        name = os.path.basename(key.rstrip("/")) or "checkpoint"
        local = os.path.join(workdir, name)
        if key and not key.endswith("/") and _download(store, key, local):
            return local
        folder = os.path.join(workdir, name + ".dcp")
        if not _download(store, key.rstrip("/") + "/.metadata", os.path.join(folder, ".metadata")):
            raise CheckpointError(f"no checkpoint at {path} (endpoint {endpoint}): neither an object nor a sharded "
                                  "checkpoint folder holding .metadata; check the bucket and path")
        if not shards:
            return folder
        import torch.distributed.checkpoint as dcp
        md = dcp.FileSystemReader(folder).read_metadata()
        for rel in sorted({info.relative_path for info in md.storage_data.values()}):
            if not _download(store, key.rstrip("/") + "/" + rel, os.path.join(folder, rel)):
                raise CheckpointError(f"sharded checkpoint {path} is incomplete: its .metadata lists {rel}, which "
                                      "is not in the bucket; was the upload interrupted?")
        return folder
    except CheckpointError:
        raise
    except Exception as e:  # credentials, endpoint down, ...
        raise CheckpointError(f"cannot download checkpoint {path} (endpoint {endpoint}): {type(e).__name__}: "
                              f"{e}; check the path, the credentials and S3_ENDPOINT_URL") from e


def _is_dcp_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def dcp_file_sizes(metadata_bytes: bytes) -> dict[str, int]:
    """{file: the least size it must have} for the files a DCP ``.metadata`` points into (each rank's
    ``__{rank}_0.distcp``). Raises ``ValueError`` when the bytes are not a DCP ``.metadata``."""
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata
    try:
        md = pickle.loads(metadata_bytes)
    except Exception as e:  # noqa: BLE001 - a cut-short or foreign file: any unpickling error
        raise ValueError(f"it cannot be read ({type(e).__name__})") from e
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise ValueError("it is not a torch.distributed.checkpoint .metadata")
    sizes: dict[str, int] = {}
    for info in md.storage_data.values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    return sizes


def sharded_checkpoint_problem(folder: str) -> Optional[str]:
    """Why the DCP folder ``folder`` is not a complete sharded checkpoint (a few words), or None when it is.

    DCP has every rank write its ``__{rank}_0.distcp``, then the coordinator write ``.metadata`` (to a temporary
    name, renamed into place) listing where each tensor lies in which file: a folder without ``.metadata`` is a save
    that did not finish; one whose rank files are missing or shorter than ``.metadata`` says lost data afterwards.
    Reads ``.metadata`` and the files' sizes, never the tensors."""
    meta = os.path.join(folder, ".metadata")
    if not os.path.isfile(meta):
        return "no .metadata: its save did not finish"
    try:
        with open(meta, "rb") as f:
            needed = dcp_file_sizes(f.read())
    except (OSError, ValueError) as e:
        return f".metadata: {e}"
    for name, size in sorted(needed.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) < size:
            return f"{name} holds {os.path.getsize(path)} bytes, .metadata expects at least {size}"
    return None


def _read_dcp(folder: str) -> dict:
    """The model tensors and small objects (callbacks, metadata) of a DCP folder as a nested composer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    md = dcp.FileSystemReader(folder).read_metadata()
    planner_data = md.planner_data or {}
    tensors: dict[str, Any] = {}
    objects: dict[str, Any] = {}
    for fqn, item in md.state_dict_metadata.items():
        path = tuple(planner_data.get(fqn, tuple(fqn.split(".", 2))))
        if path[:2] == ("state", "model") and isinstance(item, TensorStorageMetadata):
            tensors[fqn] = torch.empty(item.size, dtype=item.properties.dtype)
        elif path[:2] in (("state", "callbacks"), ("state", "integrations")) and \
                isinstance(item, BytesStorageMetadata):
            objects[fqn] = None
    if not tensors:
        raise CheckpointError(f"sharded checkpoint {folder} holds no model tensors (no 'state.model.*' keys); is it "
                              "a composer checkpoint?")
    def load(sd):  # in this process only, even inside a distributed job
        kwargs = {"no_dist": True} if "no_dist" in inspect.signature(dcp.load).parameters else {}
        dcp.load(sd, storage_reader=dcp.FileSystemReader(folder), **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process": intended
        load(tensors)
        if objects:
            try:
                load(objects)
            except Exception as e:  # callback state is optional: the config can come from elsewhere
                log.warning("could not read callback state from %s: %s", folder, e)
                objects = {}
    state: dict[str, Any] = {"model": {}, "callbacks": {}}
    for fqn, t in tensors.items():
        path = tuple(planner_data.get(fqn, tuple(fqn.split(".", 2))))
        state["model"][".".join(str(p) for p in path[2:])] = t
    for fqn, value in objects.items():
        path = tuple(planner_data.get(fqn, tuple(fqn.split("."))))
        node = state
        for p in path[1:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    if "integrations" in state:  # DCP flattens nested metadata: list items come back under integer keys
        state["integrations"] = _relist(state["integrations"])
    return {"state": state}


def _relist(node):
    """Nested dicts whose keys are all integers (DCP's flattened list items) back into lists."""
    if not isinstance(node, dict):
        return node
    node = {k: _relist(v) for k, v in node.items()}
    if node and all(isinstance(k, int) for k in node):
        return [node[i] for i in sorted(node)]
    return node


def _composer_checkpoints_in(folder: str) -> list[str]:
    """The composer checkpoints directly in ``folder``: ``*.pt`` files, a DCP ``.metadata``, sharded folders."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name == ".metadata" or p.name.endswith(".pt") or _is_dcp_folder(str(p)))


def folder_checkpoint_problem(folder: str, *, hf_fix: str) -> Optional[str]:
    """Why ``folder`` is not one sharded composer checkpoint (the rest of a sentence naming it, ending with the fix),
    or None when it is (it holds a DCP ``.metadata``). ``hf_fix`` says what to do with a Hugging Face model folder."""
    if _is_dcp_folder(folder):
        problem = sharded_checkpoint_problem(folder)
        return (f"is not a complete sharded checkpoint ({problem}); pass a complete one, e.g. the one before it"
                if problem else None)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return f"is a Hugging Face model folder, not a composer checkpoint; {hf_fix}"
    inside = _composer_checkpoints_in(folder)
    hint = f" (it holds: {', '.join(inside[:5])})" if inside else ""
    return ("is a folder without .metadata, so not a sharded checkpoint; pass a checkpoint file (.pt) or the folder "
            f"of one sharded checkpoint (e.g. .../ep0-ba100){hint}")


def read_checkpoint(local_path: str) -> dict:
    """A composer checkpoint (whole file or DCP folder) as ``{'state': {'model': {...}, 'callbacks': ...}}``."""
    if os.path.isdir(local_path):
        problem = folder_checkpoint_problem(local_path, hf_fix="load it with MPTForCausalLM.from_pretrained / "
                                                               "load_model (hf_path)")
        if problem:
            raise CheckpointError(f"{local_path} {problem}")
        return _read_dcp(local_path)
    try:
        return torch.load(local_path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint file {local_path}: {type(e).__name__}: {e}; expected a "
                              "composer checkpoint (.pt) written by the trainer") from e


def _strip_key(key: str) -> str:
    for part in _WRAPPER_PARTS:
        key = key.replace(part, "")
    return key[len("model."):] if key.startswith("model.") else key


def extract_model_state_dict(ckpt: Mapping) -> dict[str, torch.Tensor]:
    """``MPTForCausalLM`` state dict from a composer checkpoint (or from a plain state dict)."""
    sd = ckpt
    if isinstance(ckpt, Mapping) and "state" in ckpt and isinstance(ckpt["state"], Mapping):
        sd = ckpt["state"].get("model")
        if sd is None:
            raise CheckpointError("checkpoint has no model weights (state['state']['model'] is missing)")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        if hasattr(v, "full_tensor"):  # a DTensor saved by FSDP2 in a whole file
            v = v.full_tensor()
        out[_strip_key(k)] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# Model config

def _config_from_mapping(d: Mapping, where: str):
    from llmfoundry.models.mpt import MPTConfig
    d = dict(d)
    if "model" in d and isinstance(d["model"], Mapping):  # a training YAML
        d = dict(d["model"])
    try:
        if d.get("model_type") == "mpt" or "architectures" in d:
            return MPTConfig.from_hf_dict(d)
        return MPTConfig.from_dict(d)
    except ValueError as e:
        raise CheckpointError(f"model config from {where} is invalid: {e}") from e


def read_config_file(path: str) -> tuple[Any, Optional[str]]:
    """``(MPTConfig, tokenizer or None)`` from a training YAML, an ``MPTConfig`` YAML or an HF ``config.json``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"model config file {path} does not exist; pass the training YAML of the run")
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
    else:  # resolve only what is needed here (a training YAML may use resolvers for its data paths)
        from omegaconf import OmegaConf
        node = OmegaConf.load(path)
        if not OmegaConf.is_dict(node):
            raise CheckpointError(f"model config file {path} must hold a mapping")
        data = {k: OmegaConf.to_container(node[k], resolve=True) if OmegaConf.is_config(node[k]) else node[k]
                for k in (("model", "tokenizer") if "model" in node else node.keys()) if k in node}
    if not isinstance(data, Mapping):
        raise CheckpointError(f"model config file {path} must hold a mapping")
    tok = data.get("tokenizer") if isinstance(data.get("tokenizer"), str) else None
    return _config_from_mapping(data, path), tok


def stored_model_config(ckpt: Mapping) -> tuple[Any, Optional[str]]:
    """``(MPTConfig, tokenizer)`` recorded in the checkpoint by ``ModelConfigRecorder``, else ``(None, None)``."""
    callbacks = (ckpt.get("state") or {}).get("callbacks") or {}
    rec = callbacks.get(RECORDER_NAME) if isinstance(callbacks, Mapping) else None
    if isinstance(rec, Mapping) and rec.get("model_config_json"):
        return _config_from_mapping(json.loads(rec["model_config_json"]), "the checkpoint"), rec.get("tokenizer")
    return None, None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints of composer HuggingFaceModels (llm-foundry's ComposerMPTCausalLM): config and tokenizer travel in
# state['integrations']['huggingface'] (HuggingFaceModel.get_metadata): the config.json under
# ['model']['config']['content'], each tokenizer file under ['tokenizer'][name] = {'file_extension', 'content'}.

def hf_metadata(ckpt: Mapping) -> Optional[Mapping]:
    """The ``integrations.huggingface`` metadata of a checkpoint written by a composer ``HuggingFaceModel`` (as
    llm-foundry's trainer writes them), or None for our own checkpoints."""
    integrations = (ckpt.get("state") or {}).get("integrations") if isinstance(ckpt, Mapping) else None
    meta = integrations.get("huggingface") if isinstance(integrations, Mapping) else None
    return meta if isinstance(meta, Mapping) else None


def _fit_config_to_weights(cfg, raw: Mapping, state_dict: Mapping[str, torch.Tensor]):
    """``cfg`` with ``no_bias`` / ``learned_pos_emb`` as the weights have them: transformers' MPT saves no biases
    whatever its config says, and llm-foundry builds (and adds) a position table whenever ``learned_pos_emb``,
    ALiBi or not, while ``MPTConfig.from_hf_dict`` drops it under ALiBi."""
    from dataclasses import replace
    if not cfg.no_bias and not any(k.endswith(".bias") for k in state_dict):
        cfg = replace(cfg, no_bias=True)
    if raw.get("learned_pos_emb", True) and not cfg.learned_pos_emb and "transformer.wpe.weight" in state_dict:
        cfg = replace(cfg, learned_pos_emb=True)
    return cfg


def metadata_model_config(meta: Mapping, state_dict: Mapping[str, torch.Tensor], where: str):
    """The ``MPTConfig`` of a ``HuggingFaceModel`` checkpoint's metadata, fitted to its weights; a
    ``CheckpointError`` for a model that is not MPT or holds LoRA adapters."""
    model = meta.get("model") if isinstance(meta.get("model"), Mapping) else {}
    config = model.get("config") if isinstance(model.get("config"), Mapping) else {}
    content = config.get("content")
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{where} holds Hugging Face metadata without a model config "
                              "(integrations.huggingface.model.config.content); pass the training YAML of the run "
                              "(--model_config path/to/train.yaml; in an eval config, model_config=...)")
    kind = content.get("model_type")
    if kind != "mpt":
        raise CheckpointError(f"{where} holds a Hugging Face model of model_type {kind!r} "
                              f"({config.get('class', 'unknown class')}); only MPT checkpoints (model_type 'mpt', "
                              "e.g. llm-foundry's mpt_causal_lm) load here")
    if model.get("peft_config"):
        raise CheckpointError(f"{where} holds PEFT/LoRA adapter weights; merge the adapters into the base model "
                              "and export it as a Hugging Face MPT folder first (then use that folder)")
    cfg = _config_from_mapping(content, f"{where} (integrations.huggingface)")
    return _fit_config_to_weights(cfg, content, state_dict)


def _tokenizer_file_bytes(name: str, entry: Mapping) -> Optional[bytes]:
    """One tokenizer file of the metadata as composer's get_metadata stored it (None for a kind it never writes)."""
    ext, content = entry.get("file_extension"), entry.get("content")
    if ext == ".json":
        return json.dumps(content, ensure_ascii=False).encode()
    if ext == ".txt":
        return "\n".join(content).encode() if isinstance(content, list) else str(content).encode()
    if ext in (".py", ".jinja"):
        return str(content).encode()
    if ext == ".model":
        return bytes(content)
    log.warning("tokenizer file %s in the checkpoint's metadata has an unknown kind (%r); left out", name, ext)
    return None


def metadata_tokenizer_dir(meta: Mapping) -> Optional[str]:
    """The tokenizer files of a ``HuggingFaceModel`` checkpoint's metadata, written once to a folder of the temp
    directory named after their content (``AutoTokenizer.from_pretrained`` loads it, offline); None when the
    metadata holds none."""
    import hashlib
    import shutil
    entries = meta.get("tokenizer")
    if not isinstance(entries, Mapping) or not entries:
        return None
    files = {}
    for name, entry in sorted(entries.items()):
        data = _tokenizer_file_bytes(name, entry) if isinstance(entry, Mapping) else None
        if data is not None and os.path.basename(name) == name:
            files[name] = data
    digest = hashlib.sha1()
    for name, data in files.items():
        digest.update(name.encode() + b"\0" + data + b"\0")
    folder = os.path.join(tempfile.gettempdir(), f"mpt-forge-tokenizer-{digest.hexdigest()[:16]}")
    if os.path.isdir(folder):
        return folder
    stage = tempfile.mkdtemp(dir=tempfile.gettempdir(), prefix=".mpt-forge-tokenizer-")
    for name, data in files.items():
        Path(stage, name).write_bytes(data)
    try:
        os.rename(stage, folder)
    except OSError:  # another process wrote the same folder first
        shutil.rmtree(stage, ignore_errors=True)
    return folder


def _sidecar_config(path: str, workdir: str) -> tuple[Any, Optional[str], Optional[str]]:
    """The trainer's ``config.yaml`` in the checkpoint's folder or the one above it: (config, tokenizer, where)."""
    path = str(path).rstrip("/")
    if is_remote(path):
        store, key = _object_store(path)
        parent = os.path.dirname(key)
        for folder in (parent, os.path.dirname(parent)):
            candidate = (folder + "/config.yaml") if folder else "config.yaml"
            dest = os.path.join(workdir, "sidecar", candidate.replace("/", "_"))
            try:
                if _download(store, candidate, dest):
                    cfg, tok = read_config_file(dest)
                    return cfg, tok, f"{path.split('://')[0]}://{getattr(store, 'bucket', '')}/{candidate}"
            except CheckpointError:
                raise
            except Exception:  # a store error here only means "no sidecar"
                return None, None, None
        return None, None, None
    parent = os.path.dirname(os.path.abspath(path))
    for folder in (parent, os.path.dirname(parent)):
        candidate = os.path.join(folder, "config.yaml")
        if os.path.isfile(candidate):
            cfg, tok = read_config_file(candidate)
            return cfg, tok, candidate
    return None, None, None


def _as_config(model_config) -> tuple[Any, Optional[str]]:
    from llmfoundry.models.mpt import MPTConfig
    if isinstance(model_config, MPTConfig):
        return model_config, None
    if isinstance(model_config, Mapping):
        return _config_from_mapping(model_config, "the model_config argument"), None
    return read_config_file(str(model_config))


def config_summary(cfg) -> str:
    return (f"d_model={cfg.d_model}, n_heads={cfg.n_heads}, n_layers={cfg.n_layers}, "
            f"expansion_ratio={cfg.expansion_ratio}, vocab_size={cfg.vocab_size}, "
            f"kv_n_heads={cfg.kv_n_heads}, tie_word_embeddings={cfg.tie_word_embeddings}")


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    from llmfoundry.models.mpt.model import build_meta
    return {k: tuple(v.shape) for k, v in build_meta(cfg).state_dict().items()}


def check_state_dict(state_dict: Mapping[str, torch.Tensor], cfg, source: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` naming the tensor and both shapes when ``state_dict`` does not fit ``cfg``."""
    expected = expected_shapes(cfg)
    fix = ("the weights were made with a different model config: pass the config of the run that wrote them "
           "(--model_config path/to/train.yaml; in an eval config, model_config=path/to/train.yaml) or correct the "
           "model keys")
    for k, shape in expected.items():
        if k in state_dict and tuple(state_dict[k].shape) != shape:
            raise CheckpointError(f"{source}: tensor '{k}' has shape {tuple(state_dict[k].shape)}, but the model "
                                  f"config ({config_summary(cfg)}) expects {shape}; {fix}")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        k = unexpected[0]
        hint = ""
        if k == "lm_head.weight":
            hint = " (an untied output head: the model config needs tie_word_embeddings: false)"
        elif k.startswith("transformer.blocks."):
            hint = f" (more blocks than n_layers={cfg.n_layers})"
        raise CheckpointError(f"{source} has {len(unexpected)} tensor(s) the model config ({config_summary(cfg)}) "
                              f"does not, e.g. '{k}'{hint}; {fix}")
    if missing:
        k = missing[0]
        hint = " (the config has an untied output head: tie_word_embeddings: false)" if k == "lm_head.weight" else ""
        raise CheckpointError(f"{source} lacks {len(missing)} tensor(s) the model config ({config_summary(cfg)}) "
                              f"expects, e.g. '{k}'{hint}; {fix}")


def load_composer_checkpoint(path: str, model_config=None) -> tuple[dict[str, torch.Tensor], Any, Optional[str]]:
    """``(state_dict, MPTConfig, tokenizer name or None)`` from a composer checkpoint (whole file or sharded
    folder, local or remote). The state dict has ``MPTForCausalLM`` keys and is checked against the config."""
    with tempfile.TemporaryDirectory(prefix="ckpt-") as workdir:
        local = fetch_checkpoint(path, workdir)
        ckpt = read_checkpoint(local)
        state_dict = extract_model_state_dict(ckpt)
        stored_cfg, stored_tok = stored_model_config(ckpt)
        meta = hf_metadata(ckpt)
        side_tok = None
        if model_config is not None:
            cfg, tokenizer = _as_config(model_config)
            source = "the given model config"
        elif stored_cfg is not None:
            cfg, tokenizer, source = stored_cfg, stored_tok, "the checkpoint"
        elif meta is not None:
            cfg, tokenizer = metadata_model_config(meta, state_dict, f"checkpoint {path}"), None
            source = "the checkpoint's Hugging Face metadata (integrations.huggingface)"
        else:
            cfg, side_tok, source = _sidecar_config(path, workdir)
            tokenizer = side_tok
        tokenizer = tokenizer or stored_tok or (metadata_tokenizer_dir(meta) if meta is not None else None) \
            or side_tok
    if meta is not None and cfg is not None:  # a transformers MPT's state dict holds the tied head twice
        state_dict = hf_to_mpt_state_dict(state_dict, cfg)
    if cfg is None:
        raise CheckpointError(f"checkpoint {path} records no model config and there is no config.yaml next to it; "
                              "pass the training YAML of the run (--model_config path/to/train.yaml; in an eval "
                              "config, model_config=path/to/train.yaml)")
    log.info("model config for %s from %s", path, source)
    check_state_dict(state_dict, cfg, f"checkpoint {path}")
    return state_dict, cfg, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Models

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def to_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def is_hf_dir(path: str) -> bool:
    return (not is_remote(path) and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
            and not _is_dcp_folder(path))


HUB_MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                   "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer*", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "*.model"]


def is_hub_name(path) -> bool:
    """Whether ``path`` names a Hugging Face hub model (``org/model``) rather than a local path."""
    return not os.path.exists(str(path)) and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) is not None


def hub_model_dir(name: str) -> str:
    """The local folder of the Hugging Face hub model ``name`` (``org/model``): the hub cache's copy when it has one
    (no request), else downloaded into that cache (weights, config and tokenizer files only). ``CheckpointError``
    naming the model, what failed and the fix when neither works (no network, ``HF_HUB_OFFLINE``, no such model)."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, local_files_only=True, allow_patterns=HUB_MODEL_FILES)
    except Exception:  # noqa: BLE001 - not in the cache: ask the hub below
        pass
    try:
        return snapshot_download(name, allow_patterns=HUB_MODEL_FILES)
    except Exception as e:  # noqa: BLE001 - offline, unknown or gated repo, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(
            f"{name!r} is not a local folder, and the Hugging Face hub did not give it ({type(e).__name__}: "
            f"{first}). Fix: download it where the hub is reachable (huggingface-cli download {name} --local-dir "
            f"DIR) and name DIR, or let this machine reach the hub (unset HF_HUB_OFFLINE; HF_TOKEN for a gated "
            f"model)") from e


def model_from_state_dict(state_dict: Mapping[str, torch.Tensor], cfg, *, device="cpu", dtype=None):
    """An ``MPTForCausalLM`` holding ``state_dict`` (built on the meta device: no init cost)."""
    from dataclasses import replace

    from llmfoundry.models.mpt import MPTForCausalLM
    check_state_dict(state_dict, cfg)
    model = MPTForCausalLM(replace(cfg, init_device="meta"))
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    model.config = replace(model.config, init_device="cpu")
    model.to(device=device, dtype=to_dtype(dtype) or torch.float32)
    return model.eval()


def check_max_seq_len_override(cfg, overrides: Mapping[str, Any], path: str) -> None:
    """A model with a learned position table (``learned_pos_emb``) has exactly ``max_seq_len`` positions: an
    override to another length is refused naming the key and the fix, not as a tensor shape mismatch that blames
    the checkpoint's config."""
    new = overrides.get("max_seq_len")
    if new is not None and new != cfg.max_seq_len and cfg.learned_pos_emb:
        raise CheckpointError(f"max_seq_len={new} cannot be used with {path}: it has a learned position table "
                              f"(learned_pos_emb: true) of max_seq_len={cfg.max_seq_len} positions; drop the "
                              f"max_seq_len override (model_overrides.max_seq_len in an eval config, --max_seq_len "
                              f"for generate)")


def load_model(path: str, *, model_config=None, overrides: Optional[Mapping[str, Any]] = None, device="cpu",
               dtype: Union[str, torch.dtype, None] = None):
    """``(MPTForCausalLM in eval mode, tokenizer name or None)`` from a composer checkpoint or an HF directory.

    ``overrides`` are config keys applied on top (e.g. ``{'max_seq_len': 8192, 'attn_config': {'attn_impl':
    'torch'}}``); only keys that do not change tensor shapes make sense here. A model trained with a GPU-only
    ``attn_impl`` ('triton', 'flash') loaded onto another device runs with 'torch' (the same attention, another
    kernel; a warning says so) unless ``overrides`` set ``attn_config``."""
    from llmfoundry.models.mpt import MPTForCausalLM
    overrides = dict(overrides or {})
    if is_hf_dir(path):
        if model_config is not None:
            raise CheckpointError(f"{path} is a Hugging Face directory with its own config.json; drop model_config")
        if "max_seq_len" in overrides:
            check_max_seq_len_override(read_config_file(os.path.join(path, "config.json"))[0], overrides, path)
        model = MPTForCausalLM.from_pretrained(path, dtype=to_dtype(dtype) or torch.float32, device=device,
                                               **overrides)
        tok = path if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")) \
            else None
    else:
        state_dict, cfg, tok = load_composer_checkpoint(path, model_config)
        check_max_seq_len_override(cfg, overrides, path)
        if overrides:
            cfg = cfg.replace(**overrides)
        model = model_from_state_dict(state_dict, cfg, device=device, dtype=dtype)
    attn = model.config.attn_config
    gpu_only = attn.attn_impl in ("triton", "flash")
    if gpu_only and torch.device(device).type != "cuda" and "attn_config" not in overrides:
        log.warning(f"{path} was trained with attn_impl '{attn.attn_impl}', which needs a CUDA GPU; running it on "
                    f"{device} with attn_impl 'torch' (same attention, another kernel)")
        attn.attn_impl = "torch"
    return model.eval(), tok


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face format

def require_tokenizer(name: Optional[str]):
    """The tokenizer ``name`` (see ``load_tokenizer``), or a ``CheckpointError`` saying how to name one."""
    from llmfoundry.data.tokenizer import load_tokenizer
    if not name:
        raise CheckpointError("no tokenizer known for this model (none recorded with the checkpoint, no tokenizer "
                              "files in the directory); set 'tokenizer:' (eval YAML) or --tokenizer (scripts) to a "
                              "tokenizer directory, 'bundled', or a hub name")
    try:
        return load_tokenizer(name)
    except Exception as e:
        raise CheckpointError(f"tokenizer '{name}' cannot be loaded: {e}") from e


_HF_WEIGHT_SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _check_hf_output(out_dir: str, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that is a file or holds composer checkpoints, or (unless ``overwrite``) is not empty."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"output {out_dir} is a file; pass a folder for the Hugging Face export")
    if not os.path.isdir(out_dir):
        return
    checkpoints = _composer_checkpoints_in(out_dir)
    if checkpoints:
        raise CheckpointError(f"output {out_dir} holds composer checkpoints ({_shown(checkpoints)}); write the "
                              "Hugging Face export to a folder of its own (--overwrite does not apply here)")
    names = sorted(os.listdir(out_dir))
    if names and not overwrite:
        raise CheckpointError(f"output {out_dir} exists and is not empty (holds {_shown(names)}); pass --overwrite "
                              "to replace it")


def _tokenizer_for_export(tok, max_seq_len: int):
    """``tok`` as the export saves it: only input_ids and attention_mask (transformers' ``generate(**tok(...))``
    refuses token_type_ids, which MPT does not take), and ``model_max_length`` = the model's ``max_seq_len`` (as
    mosaicml/mpt-7b's tokenizer has) instead of transformers' 'no limit' placeholder."""
    tok.model_input_names = ["input_ids", "attention_mask"]
    tok.model_max_length = max_seq_len
    tok.init_kwargs.update(model_input_names=list(tok.model_input_names), model_max_length=max_seq_len)
    return tok


def _write_generation_settings(folder: str, tok) -> None:
    """The tokenizer's BOS/EOS ids in ``config.json``, and a ``generation_config.json`` with them, a pad id and the
    KV cache on: without them transformers' ``generate`` runs past the end-of-text token, and without its cache
    (MPT's config keeps ``use_cache: false`` for training)."""
    ids = {k: v for k, v in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id)) if v is not None}
    config = Path(folder) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **ids}, indent=2, sort_keys=True) + "\n")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    generation = {**ids, **({"pad_token_id": pad} if pad is not None else {}), "use_cache": True}
    (Path(folder) / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")


def _write_hf_export(model, tok, out_dir: str) -> None:
    """Save into a staging folder beside ``out_dir``, then move the files in. Files of ``out_dir`` the export
    does not write are kept, except old weight files (a stale layout, e.g. a sharded index, would shadow the new)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out_dir))}.") as stage:
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        _write_generation_settings(stage, tok)
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):
            if name in HF_WEIGHT_FILES or _HF_WEIGHT_SHARD.match(name):
                os.remove(os.path.join(out_dir, name))
        for name in os.listdir(stage):
            os.replace(os.path.join(stage, name), os.path.join(out_dir, name))


def convert_composer_to_hf(path: str, out_dir: str, *, tokenizer: Optional[str] = None, model_config=None,
                           dtype: Union[str, torch.dtype, None] = None, overwrite: bool = False) -> str:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files to ``out_dir``, loadable by
    ``transformers.MptForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``. ``tokenizer``
    defaults to the one the run trained with (recorded in the checkpoint or its config.yaml).

    A non-empty ``out_dir`` is refused unless ``overwrite`` (then the export's files replace theirs, other files
    stay); a folder holding composer checkpoints is always refused."""
    _check_hf_output(out_dir, overwrite)
    state_dict, cfg, recorded_tok = load_composer_checkpoint(path, model_config)
    tok = require_tokenizer(tokenizer or recorded_tok)  # before writing anything
    if len(tok) > cfg.vocab_size:
        raise CheckpointError(f"tokenizer '{tokenizer or recorded_tok}' has {len(tok)} tokens but the model's "
                              f"vocab_size is {cfg.vocab_size}; pass the tokenizer the run was trained with")
    model = model_from_state_dict(state_dict, cfg, dtype=dtype)
    _write_hf_export(model, _tokenizer_for_export(tok, cfg.max_seq_len), out_dir)
    return out_dir


def _require_hf_dir(hf_dir: str) -> None:
    if not os.path.isdir(hf_dir):
        what = "is a file" if os.path.exists(hf_dir) else "does not exist"
        raise CheckpointError(f"Hugging Face model directory {hf_dir} {what}; pass a directory written by "
                              "save_pretrained")


def read_hf_state_dict(hf_dir: str) -> dict[str, torch.Tensor]:
    """The tensors of an HF model directory (safetensors or .bin, single or sharded with an index)."""
    _require_hf_dir(hf_dir)
    d = Path(hf_dir)
    if (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    elif (d / "model.safetensors.index.json").is_file():
        files = sorted({d / f for f in json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
                        .values()})
    elif (d / "pytorch_model.bin").is_file():
        files = [d / "pytorch_model.bin"]
    elif (d / "pytorch_model.bin.index.json").is_file():
        files = sorted({d / f for f in json.loads((d / "pytorch_model.bin.index.json").read_text())["weight_map"]
                        .values()})
    else:
        raise CheckpointError(f"{hf_dir} holds no model weights (expected one of {', '.join(HF_WEIGHT_FILES)})")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file
            out.update(load_file(str(f)))
        else:
            out.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return out


def hf_to_mpt_state_dict(hf_sd: Mapping[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Keys of transformers' MptForCausalLM are ours; drop a tied ``lm_head`` copy when our config ties."""
    out = {}
    for k, v in hf_sd.items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        out[k] = v
    return out


def hf_config(hf_dir: str):
    from llmfoundry.models.mpt import MPTConfig
    _require_hf_dir(hf_dir)
    p = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(p):
        raise CheckpointError(f"{hf_dir} has no config.json; pass a directory written by save_pretrained")
    with open(p) as f:
        return MPTConfig.from_hf_dict(json.load(f))


def load_hf_weights(model, hf_dir: str) -> None:
    """Copy the weights of HF MPT directory ``hf_dir`` into ``model`` (an ``MPTForCausalLM``, or anything holding
    one as ``.model`` such as ``ComposerMPT``). The shapes are checked against ``model``'s own config first."""
    net = model.model if hasattr(model, "model") and hasattr(model.model, "transformer") else model
    cfg = net.config
    state_dict = hf_to_mpt_state_dict(read_hf_state_dict(hf_dir), cfg)
    check_state_dict(state_dict, cfg, f"Hugging Face weights {hf_dir}")
    with torch.no_grad():
        net.load_state_dict(state_dict, strict=True)


def _check_pt_output(path: str, overwrite: bool) -> None:
    """Refuse a folder as ``path``, and an existing file unless ``overwrite``."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise CheckpointError(f"output {path} is a folder; pass the path of the .pt file to write")
    if os.path.lexists(path) and not overwrite:
        raise CheckpointError(f"output {path} exists; pass --overwrite to replace it")


def _save_atomically(obj, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, renamed over it when complete (an interrupted write
    leaves an existing ``path`` as it was)."""
    from llmfoundry.models.mpt.hf import follow_umask
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror} ({e.filename}); pass a path in a folder you can "
                              "write to") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_composer_weights(state_dict: Mapping[str, torch.Tensor], cfg, path: str,
                          tokenizer: Optional[str] = None, overwrite: bool = False) -> str:
    """A weights-only composer checkpoint of an ``MPTForCausalLM`` state dict: ``load_path`` of a training run
    with ``load_weights_only: true`` accepts it (it also records the model config, like the trainer's own).
    An existing ``path`` is refused unless ``overwrite``."""
    from llmfoundry.utils.config import to_dict
    _check_pt_output(path, overwrite)
    ckpt = {"state": {"model": {f"model.{k}": v.contiguous() for k, v in state_dict.items()},
                      "callbacks": {RECORDER_NAME: {"model_config_json": json.dumps(to_dict(cfg)),
                                                    "tokenizer": tokenizer}},
                      "integrations": {}, "metadata": {}}}
    _save_atomically(ckpt, path)
    return path


def convert_hf_to_composer(hf_dir: str, path: str, model_config=None, overwrite: bool = False) -> str:
    """An HF MPT directory as a weights-only composer checkpoint (see ``save_composer_weights``). With
    ``model_config`` (the training run's ``MPTConfig``, a dict or a training YAML path) the weights are checked
    against it first, so a mismatch is reported here, naming the tensor and both shapes. An existing ``path``
    (e.g. a training checkpoint) is refused unless ``overwrite``."""
    cfg = hf_config(hf_dir)
    _check_pt_output(path, overwrite)  # before reading the weights
    state_dict = hf_to_mpt_state_dict(read_hf_state_dict(hf_dir), cfg)
    check_state_dict(state_dict, cfg, f"Hugging Face weights {hf_dir}")
    if model_config is not None:
        target = _as_config(model_config)[0]
        check_state_dict(hf_to_mpt_state_dict(state_dict, target), target, f"Hugging Face weights {hf_dir}")
    tok = hf_dir if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")) else None
    return save_composer_weights(state_dict, cfg, path, tokenizer=tok, overwrite=overwrite)


__all__ = ["CheckpointError", "ModelConfigRecorder", "fetch_checkpoint", "read_checkpoint",
           "extract_model_state_dict", "load_composer_checkpoint", "check_state_dict", "load_model",
           "model_from_state_dict", "convert_composer_to_hf", "load_hf_weights", "read_hf_state_dict",
           "save_composer_weights", "convert_hf_to_composer", "read_config_file", "to_dtype", "is_hf_dir",
           "require_tokenizer", "folder_checkpoint_problem",
           "sharded_checkpoint_problem", "dcp_file_sizes"]
