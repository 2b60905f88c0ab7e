"""llm-foundry's training YAML dialect, read by ``scripts/train.py``.

A YAML written for MosaicML's llm-foundry (``scripts/train/yamls/pretrain/mpt-*.yaml``, ``finetune/*.yaml``, with
its usual ``key=value`` overrides) is recognised by the keys only that dialect has (``fsdp_config``,
``algorithms``, ``eval_first``, a top-level ``max_seq_len``, ``model.name``, ``tokenizer: {name, kwargs}``,
``train_loader.dataset``, ``decoupled_adamw``, ``cosine_with_warmup``, ``lr_monitor: {}``, ...) and translated
into this project's keys by ``translate`` (a pure function: dict -> our dict, the notes, the problems).
``load_foundry_config`` (called by ``load_config``) prints each note once, stops with ONE ``ConfigError`` that
lists every key with no equivalent here (each with what to do), and writes the translated YAML in our format
(``<run_name>.mpt-forge.yaml`` in the local save folder, else next to the YAML) so the user can switch.

What changes meaning, not only names (and is kept as llm-foundry had it):

- ``model:`` with ``name: mpt_causal_lm`` gets llm-foundry's ``MPTConfig`` defaults, not ours (MPT-7B's):
  learned position embeddings, biases, no ALiBi, ``attn_impl: flash``; ``attn_config.alibi: true`` turns the
  learned positions off (as llm-foundry does).
- optimizers get their llm-foundry/composer defaults (``decoupled_adamw``: lr 1e-3, weight_decay 1e-5;
  ``decoupled_lionw``: betas [0.9, 0.99]); torch ``adamw``'s weight decay becomes ``lr * weight_decay`` (ours
  is decoupled, see ``OptimizerConfig``); schedulers decay to ``alpha_f: 0`` by default.
- gradients are clipped only when ``algorithms.gradient_clipping`` says so (else ``max_grad_norm: null``), and an
  eval loader runs every epoch unless ``eval_interval`` says otherwise: in a whole llm-foundry YAML (its model
  section names the model), not in one of ours given a dialect key as an override.
- an integer time (``eval_interval: 1``, ``max_duration: 2``) counts epochs, as in composer.
- ``callbacks.hf_checkpointer`` becomes ``callbacks.hf_checkpoint`` writing to ``{save_folder}/huggingface/ba{N}``
  as llm-foundry does, with its ``overwrite: true`` default; batch intervals only, no MLflow registration.
- ``icl_tasks`` (a list, or a YAML file holding one) and ``eval_gauntlet`` (likewise) are evaluated during the run
  at ``eval_interval`` (train/callbacks/icl_eval.py); their entries are translated as for scripts/eval.py (``dataset_uri``
  -> ``path``, ``icl_task_type`` -> ``type``, ``weighting: EQUAL`` -> ``equal``, ...); ``icl_subset_num_batches``
  and ``icl_seq_len`` keep their meaning.
- ``callbacks.generate_callback`` becomes ``callbacks.sample_generations`` (batch intervals only); greedy unless
  ``do_sample: true``, then transformers' defaults (temperature 1.0, top_k 50) unless given.

Keys that change nothing that is trained (logging, CUDA allocator and loader-speed knobs, ``eval_first``) are
dropped with a note; everything else without an equivalent is a problem.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from llmfoundry.data.record_formats import FOUNDRY_DATASETS
from llmfoundry.utils.config import ConfigError, closest

BANNER = "llm-foundry config"
TRANSLATED_SUFFIX = ".mpt-forge.yaml"


@dataclass
class Translation:
    """``data``: the config in our format; ``notes``: what was translated or dropped (one line each);
    ``problems``: keys with no equivalent here, each with what to do; ``dialect_keys``: the key paths that only
    llm-foundry's dialect has (non-empty: the YAML is in that dialect)."""
    data: dict
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    dialect_keys: list[str] = field(default_factory=list)
    schema: dict = field(default_factory=dict, repr=False)  # our config classes by name (``config_classes``)

    def note(self, path: str, text: str) -> None:
        self.notes.append(f"{path}: {text}")

    def problem(self, path: str, text: str) -> None:
        self.problems.append(f"{path}: {text}")

    def mark(self, path: str) -> None:
        self.dialect_keys.append(path)


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _dataclass_of(tp: Any) -> Any:
    """The dataclass in an annotation (``FSDPConfig | None`` -> ``FSDPConfig``)."""
    if dataclasses.is_dataclass(tp):
        return tp
    return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)


_LOGGER_CLASSES = {"wandb": "WandBConfig", "mlflow": "MLflowConfig", "tensorboard": "TensorBoardConfig"}


def config_classes(config_cls) -> dict[str, type]:
    """Our config dataclasses by name, read from ``TrainConfig``'s annotations (passed in by ``load_config``, so
    that this module does not import ``llmfoundry.train.config``, which imports it)."""
    hints = typing.get_type_hints(config_cls)
    classes = {"TrainConfig": config_cls}
    for key, name in (("optimizer", "OptimizerConfig"), ("scheduler", "SchedulerConfig"), ("fsdp", "FSDPConfig"),
                      ("callbacks", "CallbacksConfig"), ("loggers", "LoggersConfig")):
        classes[name] = _dataclass_of(hints[key])
    classes["SpeedMonitorConfig"] = _dataclass_of(typing.get_type_hints(classes["CallbacksConfig"])["speed_monitor"])
    logger_hints = typing.get_type_hints(classes["LoggersConfig"])
    for key, name in _LOGGER_CLASSES.items():
        classes[name] = _dataclass_of(logger_hints[key])
    return classes


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _mapping(t: Translation, value: Any, path: str) -> dict:
    """``value`` as a dict (null: empty); anything else is a problem (and an empty dict)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    t.problem(path, f"{_short(value)} must be a mapping")
    return {}


def _unknown(t: Translation, path: str, key: str, known) -> None:
    t.problem(f"{path}.{key}" if path else key,
              f"unknown key{closest(str(key), known)}; valid keys here: {', '.join(sorted(known))}")


# ---------------------------------------------------------------------------------------------------- model
# llm-foundry's MPTConfig defaults (llmfoundry/models/mpt/configuration_mpt.py, models/utils/config_defaults.py)
# where they differ from ours; written explicitly into a dialect model section that leaves them out.
FOUNDRY_MODEL_DEFAULTS = {"learned_pos_emb": True, "no_bias": False}
FOUNDRY_ATTN_DEFAULTS = {"attn_impl": "flash", "alibi": False}

# model keys only llm-foundry has: key -> (accepted values, what to do otherwise); None = dropped whatever it is
_MODEL_NEUTRAL = {
    "ffn_config": ((None, {}, {"ffn_type": "mptmlp"}), "only the GELU MLP ('mptmlp') is implemented here; "
                   "remove ffn_config (GLU, MoE and Transformer Engine FFNs are absent)"),
    "fc_type": (("torch", {"name": "torch"}, None), "only torch linear layers here; remove fc_type (for "
                "Transformer Engine's FP8 layers, te: precision: amp_fp8 alone trains the blocks' linears "
                "in FP8 here, through torchao)"),
    "block_overrides": ((None, {}), "per-layer overrides are absent here; remove block_overrides"),
    "final_logit_softcapping": ((None,), "logit soft-capping is absent here; remove it"),
    "use_pad_tok_in_ffn": ((True, None), "the FFN always runs on every token here; remove it"),
    "use_cache": (None, "generation-only; dropped"),
    "verbose": (None, "dropped"),
    "loss_fn": (("fused_crossentropy", "torch_crossentropy", None),
                "the loss here is cross-entropy computed in chunks; remove loss_fn"),
}
_ATTN_NEUTRAL = {
    "qk_gn": ((False,), "group-norm on q/k is absent here (qk_ln: true is layer norm); remove it"),
    "fused_qkv": ((True,), "the q/k/v projection is always fused here; remove it (the maths is the same)"),
    "sliding_window_size": ((-1, None), "sliding-window attention is absent here; remove it"),
    "attn_logit_softcapping": ((None,), "attention soft-capping is absent here; remove it"),
    "rope": ((False,), "rotary embeddings are absent here; use alibi: true or learned_pos_emb: true"),
    "nope": ((False,), "NoPE is absent here; remove it"),
    "kv_dim": ((None,), "cross-attention is absent here; remove it"),
    "attn_temperature_tuning": (({"floor_scale": 8192, "attn_scale": 0.0}, {"floor_scale": 8192, "attn_scale": 0},
                                 {"attn_scale": 0.0}, {"attn_scale": 0}, None, {}),
                                "attention temperature tuning is absent here; remove it (or attn_scale: 0)"),
    "seq_parallel_world_size": ((None, 1), "sequence parallelism is absent here; remove it"),
}
_ROPE_KEYS = ("rope_theta", "rope_impl", "rope_dail_config", "rope_hf_config")


def _short(value: Any) -> str:
    """The value as written, or just its kind for a list or mapping (the message names the key)."""
    if isinstance(value, Mapping):
        return "a mapping" if value else "{}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}" if value else "[]"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _neutral(t: Translation, path: str, value: Any, rule: tuple) -> None:
    ok, what = rule
    t.mark(path)
    if ok is None or value in ok:
        t.note(path, f"{_short(value)}: {what if ok is None else 'as here; dropped'}")
    else:
        t.problem(path, f"{_short(value)}: {what}")


def _attn(t: Translation, attn: Any, path: str, foundry_defaults: bool) -> dict:
    from llmfoundry.models.mpt.config import AttnConfig
    ours = _fields(AttnConfig)
    src = _mapping(t, attn, path)
    out = dict(FOUNDRY_ATTN_DEFAULTS) if foundry_defaults else {}
    attn_type = src.pop("attn_type", None)
    for k, v in src.items():
        p = f"{path}.{k}"
        if k in ours:
            out[k] = v
        elif k in _ATTN_NEUTRAL:
            _neutral(t, p, v, _ATTN_NEUTRAL[k])
        elif k in _ROPE_KEYS:
            t.mark(p)
            if not src.get("rope"):
                t.note(p, "unused without rope; dropped")
        else:
            _unknown(t, path, k, ours + ["attn_type"] + list(_ATTN_NEUTRAL))
    if attn_type is not None:
        p = f"{path}.attn_type"
        t.mark(p)
        if attn_type == "multihead_attention":
            if out.pop("kv_n_heads", None) is not None:
                t.note(f"{path}.kv_n_heads", "llm-foundry ignores it for multihead_attention; dropped")
            t.note(p, "multihead_attention: the default here; dropped")
        elif attn_type == "multiquery_attention":
            out["kv_n_heads"] = 1
            t.note(p, "multiquery_attention -> attn_config.kv_n_heads: 1")
        elif attn_type == "grouped_query_attention":
            if out.get("kv_n_heads") is None:
                t.problem(p, "grouped_query_attention needs attn_config.kv_n_heads (as in llm-foundry)")
            else:
                t.note(p, f"grouped_query_attention -> attn_config.kv_n_heads: {out['kv_n_heads']}")
        else:
            t.problem(p, f"{attn_type!r} is absent here; use multihead_attention, multiquery_attention or "
                         "grouped_query_attention (attn_config.kv_n_heads)")
    elif out.get("kv_n_heads") is not None and foundry_defaults:
        t.note(f"{path}.kv_n_heads", "llm-foundry ignores it without attn_type: grouped_query_attention; dropped")
        out.pop("kv_n_heads")
    return out


def _model(t: Translation, model: Any, top: dict) -> dict:
    from llmfoundry.models.mpt.config import MPTConfig
    if not isinstance(model, Mapping):
        return model
    src = dict(model)
    foundry = "name" in src  # llm-foundry's model section names its builder; ours has no such key
    out: dict = {}
    if foundry:
        name = src.pop("name")
        t.mark("model.name")
        if name == "mpt_causal_lm":
            t.note("model.name", "mpt_causal_lm: the only model here; dropped. llm-foundry's MPT defaults apply: "
                   "learned_pos_emb: true, no_bias: false, attn_config.alibi: false, attn_impl: flash "
                   "(ours are MPT-7B's)")
        elif name == "hf_causal_lm":
            return _hf_causal_lm(t, src, top)
        else:
            t.problem("model.name", f"{name!r}: only MPT is trained here: mpt_causal_lm (built from the YAML) or "
                      "hf_causal_lm naming a local Hugging Face MPT folder (its config and weights)")
            for k in ("pretrained", "pretrained_model_name_or_path", "config_overrides", "use_auth_token",
                      "trust_remote_code", "use_flash_attention_2", "peft_config"):
                src.pop(k, None)
        out.update(FOUNDRY_MODEL_DEFAULTS)
    ours = _fields(MPTConfig)
    for k, v in src.items():
        p = f"model.{k}"
        if k == "attn_config":
            continue
        if k == "init_config":
            out[k] = _init(t, v)
        elif k in ours:
            out[k] = v
        elif k in _MODEL_NEUTRAL:
            _neutral(t, p, v, _MODEL_NEUTRAL[k])
        elif k == "head_dim":
            t.mark(p)
            if v is not None and (not _is_int(v) or v * src.get("n_heads", 16) != src.get("d_model", 2048)):
                t.problem(p, f"{v}: the head size here is always d_model / n_heads; remove head_dim")
            else:
                t.note(p, "d_model / n_heads; dropped")
        elif k == "attention_bias":
            t.mark(p)
            if v is not None and v != (not out.get("no_bias", False)):
                t.problem(p, f"{v}: biases are all on or all off here (no_bias); remove attention_bias")
            else:
                t.note(p, "follows no_bias here; dropped")
        elif k == "use_train_metrics":
            t.mark(p)
            top["train_metrics"] = v
            t.note(p, f"-> train_metrics: {v} (top level)")
        elif k == "additional_train_metrics":
            _neutral(t, p, v, ((None, []), "extra metrics are absent here; remove it"))
        else:
            _unknown(t, "model", k, ours + list(_MODEL_NEUTRAL))
    if "attn_config" in src or foundry:
        out["attn_config"] = _attn(t, src.get("attn_config"), "model.attn_config", foundry)
    if foundry and out["attn_config"].get("alibi") and out.get("learned_pos_emb"):
        out["learned_pos_emb"] = False
        t.note("model.learned_pos_emb", "false: llm-foundry turns learned positions off under ALiBi")
    return out


# hf_causal_lm keys that change nothing here: what the note says
_HF_DROPPED = {"trust_remote_code": "MPT is built in here; dropped", "use_auth_token": "the hub is not read; dropped",
               "use_flash_attention_2": "attention is set by attn_config.attn_impl here; dropped",
               "init_device": None}


def _hf_causal_lm(t: Translation, src: dict, top: dict) -> dict:
    """llm-foundry's ``hf_causal_lm`` over a local Hugging Face MPT folder: the model is that folder's config.json
    (with ``config_overrides``), and ``pretrained: true`` (its default) starts from the folder's weights
    (``load_path``: train/pretrained.py checks and loads them)."""
    import json

    from llmfoundry.models.mpt.config import MPTConfig
    from llmfoundry.utils.config import to_dict
    path = src.pop("pretrained_model_name_or_path", None)
    pretrained = src.pop("pretrained", True)
    overrides = _mapping(t, src.pop("config_overrides", None), "model.config_overrides")
    for k in ("pretrained", "pretrained_model_name_or_path", "config_overrides"):
        t.mark(f"model.{k}")
    out: dict = {}
    for k, v in src.items():
        p = f"model.{k}"
        t.mark(p)
        if k == "peft_config" and v:
            t.problem(p, "LoRA/PEFT adapters are absent here; remove peft_config to finetune all weights")
        elif k in _HF_DROPPED or k == "peft_config":
            if k == "init_device":
                out["init_device"] = v
            t.note(p, _HF_DROPPED.get(k) or "as here")
        elif k == "use_train_metrics":
            top["train_metrics"] = v
            t.note(p, f"-> train_metrics: {v} (top level)")
        else:
            _unknown(t, "model", k, ["pretrained", "pretrained_model_name_or_path", "config_overrides",
                                     "peft_config", "use_train_metrics", *_HF_DROPPED])
    if not path:
        t.problem("model.pretrained_model_name_or_path", "missing: name the Hugging Face MPT folder to start from")
        return out
    folder = os.path.expanduser(str(path))
    from llmfoundry.checkpoint import CheckpointError, hub_model_dir, is_hub_name
    if is_hub_name(folder):  # cached or fetched
        try:
            folder = hub_model_dir(str(path))
        except CheckpointError as e:
            t.problem("model.pretrained_model_name_or_path", str(e))
            return out
        t.note("model.pretrained_model_name_or_path", f"{path} from the Hugging Face hub: {folder}")
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        t.problem("model.pretrained_model_name_or_path",
                  f"{path!r} is neither a local folder with a config.json nor a hub name (org/model); name the "
                  f"folder of a Hugging Face MPT model")
        return out
    with open(config_file) as f:
        hf = json.load(f)
    if hf.get("model_type") != "mpt":
        t.problem("model.pretrained_model_name_or_path", f"{path}: model_type {hf.get('model_type')!r}; only MPT "
                  "models (model_type 'mpt') are trained here")
        return out
    for k, v in overrides.items():  # llm-foundry updates the HF config's keys, one level into its sub-configs
        hf[k] = {**hf[k], **v} if isinstance(v, Mapping) and isinstance(hf.get(k), Mapping) else v
    try:
        model = to_dict(MPTConfig.from_hf_dict(hf))
    except (TypeError, ValueError) as e:
        t.problem("model.config_overrides" if overrides else "model.pretrained_model_name_or_path",
                  f"{path}: its config (with config_overrides) is not a valid MPT config: {e}")
        return out
    model.pop("init_device", None)
    model.update(out)
    if overrides:
        t.note("model.config_overrides", f"applied to {config_file}")
    t.note("model.name", f"hf_causal_lm -> model: the architecture in {config_file}")
    if pretrained:
        if top.get("load_path") not in (None, folder, path):
            t.problem("model.pretrained", f"true, and load_path {top['load_path']!r} is set too: pick one (load_path "
                      "wins in llm-foundry after the pretrained weights are loaded; set pretrained: false)")
        else:
            top["load_path"] = folder
            t.note("model.pretrained", f"true -> load_path: {folder} (the run starts from these weights)")
    else:
        t.note("model.pretrained", "false: the architecture of config.json, from random initial weights")
    return model


def _init(t: Translation, init: Any) -> Any:
    from llmfoundry.models.mpt.config import InitConfig
    if not isinstance(init, Mapping):
        return init
    out = {}
    ours = _fields(InitConfig)
    for k, v in init.items():
        p = f"model.init_config.{k}"
        if k == "name" and v == "baseline_":
            t.mark(p)
            out[k] = "normal_"
            t.note(p, "baseline_ -> normal_ (normal with init_std, residual projections divided as configured)")
        elif k in ours:
            out[k] = v
        elif k == "verbose":
            t.mark(p)
            t.note(p, "dropped")
        else:
            _unknown(t, "model.init_config", k, ours)
    return out


# -------------------------------------------------------------------------------------------------- loaders
# llm-foundry text dataset keys accepted at their defaults (streaming's), else: what to do
_TEXT_NEUTRAL = {
    "partition_algo": (("relaxed", "orig", None), "other partitioning algorithms are absent here; remove it"),
    "sampling_method": (("balanced", None), "only balanced sampling here; remove it"),
    "sampling_granularity": ((1, None), "remove it"),
    "batching_method": (("random", None), "only random batching here; remove it"),
    "validate_hash": ((None, False), "hash validation is absent here; remove it"),
    "keep_zip": ((False, None), "remove it"),
    "replication": ((None, 1), "sample replication is absent here; remove it"),
    "eos_token_id": (None, "the tokenizer's EOS separates documents here (attn_uses_sequence_id); dropped"),
    "bos_token_id": (None, "dropped (sequence ids come from EOS here)"),
    "allow_unsafe_types": (None, "dropped"),
    "token_encoding_type": (None, "token dtype comes from the shards here; dropped"),
    "timeout": ((0, None), "a DataLoader batch timeout is absent here; remove it"),
    "stream_name": (None, "dropped"),
}
_FINETUNE_NEUTRAL = {
    "decoder_only_format": ((True, None), "encoder-decoder formatting is absent here (MPT is decoder-only)"),
    "allow_pad_trimming": (None, "rows are always padded to max_seq_len here (only speed differs); dropped"),
    "safe_load": (None, "dropped"),
    "timeout": ((0, None), "a DataLoader batch timeout is absent here; remove it"),
    "max_leftover_bins_to_keep": (None, "dropped"),
    "auto_packing_replication": (None, "dropped"),
    "seq_parallel_replication": ((None, 1), "sequence parallelism is absent here; remove it"),
    "pad_to_longest": ((False, None), "rows are padded to max_seq_len here; remove it"),
    "download_folder": (None, "dropped"),
    "eos_token_id": (None, "the tokenizer's EOS is used here; dropped"),
    # streaming knobs of an MDS source: the whole source is read before training and rows shuffle in memory here
    **{k: _TEXT_NEUTRAL[k] for k in ("partition_algo", "sampling_method", "sampling_granularity", "batching_method",
                                     "validate_hash", "keep_zip", "replication", "allow_unsafe_types", "stream_name")},
    **{k: (None, "every example is read before training and rows are shuffled in memory (shuffle_seed) here; dropped")
       for k in ("predownload", "cache_limit", "shuffle_algo", "shuffle_block_size", "num_canonical_nodes")},
    "epoch_size": ((None,), "every example is seen once per epoch here; remove it"),
}
# llm-foundry registers a preprocessing function for these hub datasets (tasks.py); we cannot reproduce it
_HF_FILE_BUILDERS = ("json", "jsonl")


def _loader(t: Translation, loader: Any, path: str) -> Any:
    """A loader in llm-foundry's shape (``name``, ``dataset: {...}``, DataLoader keys) or ours (flat), or a mix
    (an llm-foundry YAML with our overrides): the ``dataset`` keys move up, loader-level keys win."""
    from llmfoundry.data.finetune import FinetuneLoaderConfig
    from llmfoundry.data.text_loader import TextLoaderConfig
    if not isinstance(loader, Mapping):
        return loader
    src = dict(loader)
    name = src.pop("name", "text")
    if name not in ("finetuning", "finetune", "text"):
        t.problem(f"{path}.name", f"{name!r}: loaders here are 'text' (MDS shards) or 'finetuning' (prompt/response "
                                  "or chat examples)")
        return loader
    dataset = src.pop("dataset", None)
    foundry = name == "finetuning" or dataset is not None
    where = {k: path for k in src}  # where each key was written, for the messages
    if dataset is not None:
        t.mark(f"{path}.dataset")
        t.note(f"{path}.dataset", "its keys moved up one level")
        if not isinstance(dataset, Mapping):
            t.problem(f"{path}.dataset", f"{dataset!r} must be a mapping")
            dataset = {}
        where = {**{k: f"{path}.dataset" for k in dataset}, **where}
        src = {**dataset, **src}
    if name == "text":
        out = _text_dataset(t, src, where, _fields(TextLoaderConfig))
    else:
        if name == "finetuning":
            t.mark(f"{path}.name")
        out = _finetune_dataset(t, src, where, path, _fields(FinetuneLoaderConfig), foundry)
        if foundry:
            out.setdefault("drop_last", False)  # build_finetuning_dataloader's default
    return out


def _text_dataset(t: Translation, ds: dict, where: dict, ours: list[str]) -> dict:
    out: dict = {}
    for k, v in ds.items():
        p = f"{where[k]}.{k}"
        if k in ours:
            out[k] = v
        elif k in _TEXT_NEUTRAL:
            _neutral(t, p, v, _TEXT_NEUTRAL[k])
        else:
            _unknown(t, where[k], k, ours)
    if "remote" in out and out["remote"] is None:
        out.pop("remote")
    return out


def _finetune_dataset(t: Translation, ds: dict, where: dict, path: str, ours: list[str], foundry: bool) -> dict:
    out: dict = {"name": "finetune"}
    p = where.get("hf_name", path)
    for k in ("hf_name", "hf_kwargs", "preprocessing_fn"):
        if k in ds:
            t.mark(f"{where[k]}.{k}")
    hf_name = ds.pop("hf_name", None)
    hf_kwargs = _mapping(t, ds.pop("hf_kwargs", None), f"{where.get('hf_kwargs', path)}.hf_kwargs")
    split = ds.get("split", "train")
    fn = ds.get("preprocessing_fn")
    known = {k.lower(): v for k, v in FOUNDRY_DATASETS.items()}
    if isinstance(fn, Mapping) and set(fn) == {"prompt", "response"}:  # llm-foundry's column mapping
        out["columns"] = {"prompt": fn["prompt"], "response": fn["response"]}
        t.note(f"{where['preprocessing_fn']}.preprocessing_fn", f"-> columns: {out['columns']}")
    elif isinstance(fn, str) and fn.lower() in known:
        out["record_format"] = known[fn.lower()]
        t.note(f"{where['preprocessing_fn']}.preprocessing_fn",
               f"{fn} -> record_format: {out['record_format']} (the same examples; llmfoundry/data/record_formats.py)")
    elif fn is not None:
        t.problem(f"{where['preprocessing_fn']}.preprocessing_fn",
                  "Python preprocessing functions are not imported here; map your fields with columns: {prompt: ..., "
                  "response: ...} (or messages/role/content) and role_names, put any text around the prompt in "
                  "prompt_template, or write JSONL with prompt/response fields")
    elif str(hf_name).lower() in known:
        out["record_format"] = known[str(hf_name).lower()]
        t.note(f"{p}.hf_name", f"{hf_name}: llm-foundry reformats its records with a function registered under "
                               f"that name -> record_format: {out['record_format']} (the same examples)")
    ds.pop("preprocessing_fn", None)
    mds = [k for k in ("remote", "local", "streams") if ds.get(k) is not None]  # streaming finetuning data
    for k in mds if hf_name is not None else ():
        ds.pop(k)
        t.mark(f"{where[k]}.{k}")
        t.problem(f"{where[k]}.{k}", "set either hf_name (a hub dataset or local files) or remote/local/streams "
                  "(MDS shards of examples), not both")
    if mds and hf_name is None:
        t.note(f"{where[mds[0]]}.{mds[0]}", "read as is: MDS shards with prompt/response (str) or messages (json) "
               "columns, as data_prep/convert_finetune_to_mds.py writes them (shards tokenized by llm-foundry's "
               "convert_finetuning_dataset.py are not read)")
    if hf_name is not None:
        if str(hf_name).startswith(("s3://", "oci://", "gs://", "http://", "https://", "dbfs:")):
            t.problem(f"{p}.hf_name", f"{hf_name!r}: remote files are not fetched here; copy them to a local "
                      "folder and name it")
        elif hf_name in _HF_FILE_BUILDERS:
            files, data_dir = hf_kwargs.pop("data_files", None), hf_kwargs.pop("data_dir", None)
            if isinstance(files, Mapping):
                files = files.get(split)
            if files is not None:
                out["data_files"] = files
                t.note(f"{p}.hf_name", f"json with hf_kwargs.data_files -> data_files: {files!r}")
            elif data_dir is not None:
                out["hf_dataset"] = data_dir
                t.note(f"{p}.hf_name", f"json with hf_kwargs.data_dir -> hf_dataset: {data_dir!r} (split {split!r})")
            else:
                t.problem(f"{p}.hf_kwargs", "hf_name: json needs hf_kwargs.data_files or data_dir")
        else:
            out["hf_dataset"] = hf_name
            t.note(f"{p}.hf_name", f"-> hf_dataset: {hf_name!r}")
        if "name" in hf_kwargs:
            out["hf_subset"] = hf_kwargs.pop("name")
            t.note(f"{p}.hf_kwargs.name", f"-> hf_subset: {out['hf_subset']!r}")
        for k in ("token", "revision", "trust_remote_code", "num_proc"):
            if k in hf_kwargs:
                hf_kwargs.pop(k)
                t.note(f"{p}.hf_kwargs.{k}", "dropped")
        for k in hf_kwargs:
            t.problem(f"{p}.hf_kwargs.{k}", "datasets.load_dataset arguments are not passed through here; remove it "
                      "(data_files, data_dir and name are translated)")
    for k, v in ds.items():
        q = f"{where[k]}.{k}"
        if k == "split" and "data_files" in out:
            continue
        if k in ours and k != "name":
            out[k] = v
        elif k in _FINETUNE_NEUTRAL:
            _neutral(t, q, v, _FINETUNE_NEUTRAL[k])
        else:
            _unknown(t, where[k], k, ours + ["hf_name", "hf_kwargs", "preprocessing_fn", *_FINETUNE_NEUTRAL])
    if foundry:
        # llm-foundry's way of building examples, where ours differs by default
        for k, v in (("target_responses", "last"), ("target_prompts", "none"), ("too_long", "truncate_end")):
            out.setdefault(k, v)
        t.note(path, f"finetuning -> name: finetune, building examples as llm-foundry does: target_responses: "
                     f"{out['target_responses']} (our default trains every assistant turn: all), target_prompts: "
                     f"{out['target_prompts']}, too_long: {out['too_long']} (the first max_seq_len tokens kept; "
                     f"ours keeps the response and cuts the prompt from the left: truncate), an EOS ending each "
                     f"example unless it has one")
    return out


# ------------------------------------------------------------------------------------- optimizer, scheduler
# name -> (our name, llm-foundry's/composer's defaults for the keys it leaves out)
_OPTIMIZERS = {
    "decoupled_adamw": ("adamw", {"lr": 1.0e-3, "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 1.0e-5}),
    "decoupled_lionw": ("lion", {"lr": 1.0e-4, "betas": [0.9, 0.99], "weight_decay": 0.0}),
    "adamw": ("adamw", {"lr": 1.0e-3, "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 1.0e-2}),
}
_SCHEDULERS = {  # name -> (our name, defaults, {key: accepted values})
    "cosine_with_warmup": ("cosine", {"alpha_f": 0.0, "t_max": "1dur"}, {"scale_warmup": (False,)}),
    "linear_decay_with_warmup": ("linear", {"alpha_f": 0.0, "t_max": "1dur"},
                                 {"alpha_i": (1, 1.0), "scale_warmup": (False,)}),
    "constant_with_warmup": ("constant", {}, {"alpha": (1, 1.0), "t_max": None, "scale_warmup": (False,)}),
}


def _optimizer(t: Translation, opt: Any) -> Any:
    """``adamw`` is torch's AdamW in llm-foundry and composer's DecoupledAdamW here: it is translated only when
    the rest of the YAML is in llm-foundry's dialect (``t.dialect_keys``)."""
    OptimizerConfig = t.schema["OptimizerConfig"]
    if not isinstance(opt, Mapping) or str(opt.get("name")) not in _OPTIMIZERS:
        return opt
    src = dict(opt)
    name = src.pop("name")
    if name == "adamw" and not t.dialect_keys:
        return opt
    ours_name, defaults = _OPTIMIZERS[name]
    t.mark("optimizer.name")
    out = {"name": ours_name, **defaults}
    for k, v in src.items():
        if k in _fields(OptimizerConfig):
            out[k] = v
        elif k == "amsgrad" or k == "foreach" or k == "fused":
            _neutral(t, f"optimizer.{k}", v, ((False, None), "absent here; remove it"))
        else:
            _unknown(t, "optimizer", k, _fields(OptimizerConfig))
    filled = sorted(set(defaults) - set(src))
    if name == "adamw":
        wd = out["weight_decay"]
        out["weight_decay"] = float(out["lr"]) * float(wd)
        t.note("optimizer.name", f"adamw (torch.optim.AdamW) -> adamw with decoupled weight_decay = lr x "
                                 f"{wd} = {out['weight_decay']:g} (the same decay per step)")
    else:
        t.note("optimizer.name", f"{name} -> {ours_name} (the same update)"
               + (f"; its defaults filled in: {', '.join(f'{k}={out[k]}' for k in filled)}" if filled else ""))
    return out


def _scheduler(t: Translation, sched: Any) -> Any:
    SchedulerConfig = t.schema["SchedulerConfig"]
    if not isinstance(sched, Mapping) or str(sched.get("name")) not in _SCHEDULERS and "with_warmup" not in str(
            sched.get("name")):
        return sched
    src = dict(sched)
    name = src.pop("name")
    t.mark("scheduler.name")
    if str(name) not in _SCHEDULERS:
        t.problem("scheduler.name", f"{name!r} is absent here; use cosine_with_warmup, linear_decay_with_warmup or "
                                    "constant_with_warmup")
        return sched
    ours_name, defaults, neutral = _SCHEDULERS[name]
    out = {"name": ours_name, **defaults}
    for k, v in src.items():
        if k in neutral:
            ok = neutral[k]
            _neutral(t, f"scheduler.{k}", v, (ok, "absent here; remove it") if ok else (None, "unused; dropped"))
        elif k in _fields(SchedulerConfig):
            out[k] = v
        else:
            _unknown(t, "scheduler", k, _fields(SchedulerConfig) + list(neutral))
    if "t_warmup" not in out:
        t.problem("scheduler.t_warmup", "missing (composer requires it); e.g. t_warmup: 100ba")
    filled = sorted(set(defaults) - set(src))
    t.note("scheduler.name", f"{name} -> {ours_name}"
           + (f"; its defaults filled in: {', '.join(f'{k}={out[k]}' for k in filled)}" if filled else ""))
    return out


# ------------------------------------------------------------------------------------------ top-level pieces
_FSDP_NEUTRAL = {
    "use_orig_params": (None, "dropped (the parameters keep their names here)"),
    "load_monolith_rank0_only": (None, "dropped"),
    "cpu_offload": ((False, None), "parameter CPU offload is absent here; remove it"),
    "auto_wrap": ((True, None), "every MPT block is wrapped here; remove it"),
    "keep_low_precision_grads": ((False, None), "absent here; remove it"),
    "data_parallel_replicate_degree": ((None, -1, 1), "use sharding_strategy: HYBRID_SHARD with shard_degree"),
    "load_planner": ((None,), "custom checkpoint planners are absent here; remove it"),
    "save_planner": ((None,), "custom checkpoint planners are absent here; remove it"),
    "device_mesh": ((None,), "use sharding_strategy and shard_degree"),
    "ignored_modules": ((None,), "absent here; remove it"),
}


def _fsdp(t: Translation, fsdp: Any) -> Any:
    FSDPConfig = t.schema["FSDPConfig"]
    t.mark("fsdp_config")
    if fsdp is None:
        t.note("fsdp_config", "null -> fsdp: null (DDP)")
        return None
    if not isinstance(fsdp, Mapping):
        t.problem("fsdp_config", f"{fsdp!r} must be a mapping or null")
        return fsdp
    if fsdp.get("sharding_strategy") == "NO_SHARD":
        t.note("fsdp_config", "sharding_strategy: NO_SHARD -> fsdp: null (plain DDP)")
        return None
    out = {}
    ours = _fields(FSDPConfig)
    for k, v in fsdp.items():
        p = f"fsdp_config.{k}"
        if k == "data_parallel_shard_degree":
            t.mark(p)
            if v not in (None, -1):
                out["shard_degree"] = v
                t.note(p, f"-> fsdp.shard_degree: {v}")
            else:
                t.note(p, "all ranks; dropped")
        elif k in ours:
            out[k] = v
        elif k in _FSDP_NEUTRAL:
            _neutral(t, p, v, _FSDP_NEUTRAL[k])
        else:
            _unknown(t, "fsdp_config", k, ours + list(_FSDP_NEUTRAL))
    if out.get("state_dict_type") == "local":
        t.problem("fsdp_config.state_dict_type", "'local' is absent here; use sharded or full")
    t.note("fsdp_config", "-> fsdp (composer's FSDP2 path, fsdp.version: 2; version: 1 is llm-foundry's "
                          "FullyShardedDataParallel wrapper)")
    return out


_ALGORITHM_HINTS = {
    "alibi": "use model.attn_config.alibi: true",
    "low_precision_layernorm": "use model.norm_type: low_precision_layernorm",
    "gated_linear_units": "GLU FFNs are absent here",
    "fused_layernorm": "use model.norm_type: low_precision_layernorm",
}


def _algorithms(t: Translation, algs: Any, top: dict) -> None:
    t.mark("algorithms")
    for name, opts in _mapping(t, algs, "algorithms").items():
        p = f"algorithms.{name}"
        if name == "gradient_clipping":
            opts = _mapping(t, opts, p)
            kind, threshold = opts.pop("clipping_type", "norm"), opts.pop("clipping_threshold", None)
            if kind != "norm":
                t.problem(f"{p}.clipping_type", f"{kind!r}: only norm clipping here (max_grad_norm)")
            elif threshold is None:
                t.problem(f"{p}.clipping_threshold", "missing; e.g. 1.0")
            else:
                top["max_grad_norm"] = threshold
                t.note(p, f"-> max_grad_norm: {threshold}")
            for k in opts:
                _unknown(t, p, k, ["clipping_type", "clipping_threshold"])
        else:
            hint = _ALGORITHM_HINTS.get(name, "composer algorithms are not applied here; remove it")
            t.problem(p, f"absent here: {hint}")


_DIAGNOSTIC_CALLBACKS = ("scheduled_gc", "optimizer_monitor", "activation_monitor",
                         "loss_perp_v_len", "log_mbmoe_tok_per_expert", "env_logging", "memory_snapshot",
                         "oom_observer", "nan_monitor", "mbmoe_tok_per_expert", "run_timeout", "system_metrics_monitor")
_CALLBACK_HINTS = {
    "kill_loss_spike": "callbacks.stop_on_nonfinite_loss stops at a NaN/inf loss; loss-spike detection is absent",
    "mono_checkpoint_saver": "set fsdp.state_dict_type: full for one checkpoint file",
    "early_stopper": "absent here; set max_duration",
    "curriculum_learning": "absent here (it swaps whole train_loader configs); to change the stream mixture at "
                           "points of the run use train_loader.curriculum: [{at, proportions}] (data/curriculum.py)",
}


_HF_PRECISION = {"float32": "fp32", "bfloat16": "bf16"}
_MLFLOW_KEYS = ("mlflow_registered_model_name", "mlflow_logging_config", "final_register_only",
                "register_wait_seconds")


def _hf_checkpointer(t: Translation, v: Any) -> dict | None:
    """llm-foundry's ``hf_checkpointer`` -> ``callbacks.hf_checkpoint``: its folders ``{save_folder}/huggingface/
    ba{batch}`` stay where they were; batch intervals only; float32/bfloat16; overwrite defaults to true there."""
    p = "callbacks.hf_checkpointer"
    t.mark(p)
    v = _mapping(t, v, p)
    out = {}
    if not v.get("save_folder"):
        t.problem(f"{p}.save_folder", "missing; the folder or s3:// prefix to write the Hugging Face folders under")
    else:
        out["save_folder"] = str(v["save_folder"]).rstrip("/") + "/huggingface"
    interval = v.get("save_interval")
    if isinstance(interval, str) and re.fullmatch(r"\s*\d+\s*ba\s*", interval):
        out["interval"] = interval.strip()
    else:
        t.problem(f"{p}.save_interval", f"{_short(interval)}: only batch intervals here, e.g. 1000ba (an integer "
                  "counts epochs in llm-foundry)")
    precision = v.get("precision", "float32")
    if precision in _HF_PRECISION:
        out["precision"] = _HF_PRECISION[precision]
    else:
        t.problem(f"{p}.precision", f"{_short(precision)}: use float32 or bfloat16")
    out["overwrite"] = v.get("overwrite", True)  # llm-foundry's default
    if v.get("huggingface_folder_name", "ba{batch}") != "ba{batch}":
        t.problem(f"{p}.huggingface_folder_name", "folders are always named ba{batch} here; remove it")
    for k in v:
        if k in _MLFLOW_KEYS:
            t.problem(f"{p}.{k}", "MLflow model registration is absent here; remove it (the folders are written "
                      "all the same)")
        elif k == "flatten_imports":
            t.note(f"{p}.{k}", "dropped (the folders load with transformers' MptForCausalLM, no custom code)")
        elif k not in ("save_folder", "save_interval", "precision", "overwrite", "huggingface_folder_name"):
            _unknown(t, p, k, ("save_folder", "save_interval", "precision", "overwrite", "huggingface_folder_name",
                               *_MLFLOW_KEYS, "flatten_imports"))
    t.note(p, f"-> callbacks.hf_checkpoint {out}")
    return out


_GENERATE_KEYS = ("prompts", "interval", "batch_log_interval", "batch_size", "max_new_tokens", "do_sample",
                  "temperature", "top_k", "top_p", "use_cache")


def _generate_callback(t: Translation, v: Any) -> dict:
    """llm-foundry's ``generate_callback`` (composer's ``Generate``) -> ``callbacks.sample_generations``: the same
    prompts every ``interval`` (older releases: ``batch_log_interval``) batches and at the end. transformers'
    meaning of its generate() options is kept: greedy unless ``do_sample: true``, which samples at ``temperature``
    1.0 with ``top_k`` 50 unless they are given."""
    p = "callbacks.generate_callback"
    t.mark(p)
    v = _mapping(t, v, p)
    out = {}
    prompts = v.get("prompts")
    if isinstance(prompts, (list, tuple)) and prompts:
        out["prompts"] = [str(x) for x in prompts]
    else:
        t.problem(f"{p}.prompts", f"{_short(prompts)}: give a non-empty list of prompts")
    interval = v.get("interval")
    if interval is None and _is_int(v.get("batch_log_interval")):
        interval = f"{v['batch_log_interval']}ba"
    if isinstance(interval, str) and re.fullmatch(r"\s*\d+\s*ba\s*", interval):
        out["interval"] = interval.strip()
    else:
        t.problem(f"{p}.interval", f"{_short(interval)}: only batch intervals here, e.g. 1000ba (an integer counts "
                  "epochs in composer)")
    for k in ("batch_size", "max_new_tokens"):
        if k in v:
            out[k] = v[k]
    if v.get("do_sample"):
        out.update(temperature=v.get("temperature", 1.0), top_k=v.get("top_k", 50), top_p=v.get("top_p", 1.0))
    else:
        ignored = [k for k in ("temperature", "top_k", "top_p") if k in v]
        if ignored:
            t.note(p, f"{', '.join(ignored)} dropped: without do_sample: true transformers decodes greedily, as "
                   "temperature: 0 does here")
    if "use_cache" in v:
        t.note(f"{p}.use_cache", "dropped (generation always uses the KV cache here)")
    for k in v:
        if k not in _GENERATE_KEYS:
            t.problem(f"{p}.{k}", "generate() option absent here (greedy, or sampling with temperature/top_k/top_p "
                      f"only); remove it. Accepted: {', '.join(_GENERATE_KEYS)}")
    shown = {k: (f"{len(x)} prompt{'s' * (len(x) != 1)}" if k == "prompts" else x) for k, x in out.items()}
    t.note(p, f"-> callbacks.sample_generations {shown}")
    return out


def _callbacks(t: Translation, cbs: Any) -> Any:
    CallbacksConfig, SpeedMonitorConfig = t.schema["CallbacksConfig"], t.schema["SpeedMonitorConfig"]
    if not isinstance(cbs, Mapping):
        return cbs
    hints = typing.get_type_hints(CallbacksConfig)
    out = {}
    for name, v in cbs.items():
        p = f"callbacks.{name}"
        if name == "speed_monitor":  # null: off, as here (and not a sign of the dialect)
            if isinstance(v, Mapping):
                v = dict(v)
                for k in [k for k in v if k not in _fields(SpeedMonitorConfig)]:
                    t.mark(f"{p}.{k}")
                    t.note(f"{p}.{k}", "dropped (logging only)")
                    v.pop(k)
            out[name] = v
        elif name in _fields(CallbacksConfig) and "bool" in str(hints.get(name, "")):
            if isinstance(v, Mapping):  # llm-foundry's '{}' (the callback's options): on
                t.mark(p)
                if v:
                    t.note(p, f"its options {sorted(v)} are dropped (logging only); -> true")
                out[name] = True
            else:
                out[name] = v
        elif name in _fields(CallbacksConfig):
            out[name] = v
        elif name == "hf_checkpointer":
            out["hf_checkpoint"] = _hf_checkpointer(t, v)
        elif name == "generate_callback":
            out["sample_generations"] = _generate_callback(t, v)
        elif name in _DIAGNOSTIC_CALLBACKS:
            t.mark(p)
            t.note(p, "absent here; dropped (it does not change training)")
        elif name in _CALLBACK_HINTS:
            t.mark(p)
            t.problem(p, _CALLBACK_HINTS[name])
        else:
            _unknown(t, "callbacks", name, _fields(CallbacksConfig))
    return out


# llm-foundry logger keys that have no use here: dropped with a note (the rest of an unknown key is a problem)
_LOGGER_DROPPED = {
    "wandb": ("log_artifacts", "rank_zero_only", "init_kwargs"),
    "mlflow": ("synchronous", "resume", "rank_zero_only", "flush_interval", "ignore_metrics", "rename_metrics",
               "ignore_hyperparameters", "run_group", "logging_buffer_seconds", "log_duplicated_metric_every_n_steps",
               "model_registry_prefix", "model_registry_uri"),
    "tensorboard": ("rank_zero_only",),
}


def _loggers(t: Translation, loggers: Any) -> Any:
    if not isinstance(loggers, Mapping):
        return loggers
    out = {}
    for name, v in loggers.items():
        p = f"loggers.{name}"
        if name not in _LOGGER_DROPPED:
            t.mark(p)
            t.problem(p, "the loggers here are wandb, mlflow and tensorboard (the console log is log_to_console)")
            continue
        v = _mapping(t, v, p)
        fields = _fields(t.schema[_LOGGER_CLASSES[name]])
        for k in [k for k in v if k not in fields]:
            t.mark(f"{p}.{k}")
            if k in _LOGGER_DROPPED[name]:
                t.note(f"{p}.{k}", "dropped" + (" (autoresume continues the MLflow run by itself)" * (k == "resume")))
            else:
                _unknown(t, p, k, fields)
            v.pop(k)
        out[name] = v
    return out


def _tokenizer(t: Translation, tok: Any) -> Any:
    if not isinstance(tok, Mapping):
        return tok
    t.mark("tokenizer")
    tok = dict(tok)
    name = tok.pop("name", None)
    kwargs = _mapping(t, tok.pop("kwargs", None), "tokenizer.kwargs")
    for k in tok:
        _unknown(t, "tokenizer", k, ["name", "kwargs"])
    if name is None:
        t.problem("tokenizer.name", "missing; a hub name (EleutherAI/gpt-neox-20b) or a local folder")
    kwargs.pop("model_max_length", None)
    for k in kwargs:
        t.problem(f"tokenizer.kwargs.{k}", "tokenizer arguments are not passed through here; save the tokenizer "
                  "with these settings (save_pretrained) to a folder and name that folder")
    t.note("tokenizer", f"{{name, kwargs}} -> tokenizer: {name}" + (" (model_max_length dropped)"))
    return name


# ---------------------------------------------------------------------------------------- ICL tasks, gauntlet
# llm-foundry's icl_tasks and eval_gauntlet, in a training YAML (evaluated during the run: train/callbacks/icl_eval.py) or an
# eval YAML (llmfoundry/eval/foundry_dialect.py uses these too)
_ICL_TYPES = ("language_modeling", "multiple_choice", "schema", "generation_task_with_answers")
_ICL_NEUTRAL = {
    "metric_names": (None, "accuracy is reported here; dropped"),
    "max_seq_len": (None, "the model's max_seq_len cuts the prompts here; dropped"),
    "has_categories": (None, "per-category scores are absent here (the task's accuracy is reported); dropped"),
    "do_normalization": (None, "generated answers are always normalised here; dropped"),
    "pass_at_k": (None, "dropped (code tasks only)"),
    "hf_loading_vars": ((None, {}), "task files are local JSONL here (dataset_uri)"),
    "hf_parsing_map": ((None, {}), "task files are local JSONL with llm-foundry's fields here"),
    "fewshot_random_seed": (None, None),  # renamed below
}


def _section_of_file(t: Translation, key: str, value: str, yaml_dir: str | None) -> tuple[Any, str | None]:
    """llm-foundry's ``key: path/to/file.yaml``: (that file's ``key:`` section, the file); (None, None) with a
    problem when there is no such file (looked for in the working directory, then next to the YAML)."""
    from omegaconf import OmegaConf
    candidates = [value] + ([os.path.join(yaml_dir, value)] if yaml_dir else [])
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        t.problem(key, f"{value!r}: no such file (looked in the working directory"
                       + (f" and {yaml_dir}" if yaml_dir else "") + ")")
        return None, None
    loaded = OmegaConf.to_container(OmegaConf.load(found), resolve=True)
    return (loaded.get(key) if isinstance(loaded, Mapping) else None), found


def _icl_task(t: Translation, task: Any, path: str) -> Any:
    """One llm-foundry ``icl_tasks`` entry -> our ``ICLTaskConfig`` keys (ours pass through)."""
    from llmfoundry.eval.icl_tasks import ICLTaskConfig
    if not isinstance(task, Mapping):
        return task
    ours = _fields(ICLTaskConfig)
    out = {}
    for k, v in task.items():
        p = f"{path}.{k}"
        if k == "dataset_uri":
            t.mark(p)
            if v is None or not str(v).strip():
                label = task.get("label")
                t.problem(p, f"empty: task {label!r} names no file; give the path of its JSONL file, or remove the "
                             f"task" if label else "empty: give the path of the task's JSONL file, or remove the task")
                continue
            if str(v).startswith(("s3://", "oci://", "gs://", "hf://", "http://", "https://", "dbfs:")):
                t.problem(p, f"{_short(v)}: task files are read from local paths here; download it and give its path")
            out["path"] = v
        elif k == "icl_task_type":
            t.mark(p)
            if v in _ICL_TYPES:
                out["type"] = v
            else:
                t.problem(p, f"{_short(v)}: only {', '.join(_ICL_TYPES[:-1])} and {_ICL_TYPES[-1]} tasks are "
                             "evaluated here; remove this task")
        elif k in ("prelimiter", "question_prelimiter"):  # two spellings of one llm-foundry key
            t.mark(p)
            out["context_prefix"] = v or ""
        elif k == "fewshot_random_seed":
            t.mark(p)
            out["fewshot_seed"] = v
        elif k == "early_stopping_criteria":
            t.mark(p)
            if v is not None:  # None: our default stop sequence, a newline
                out["stop_sequences"] = [v] if isinstance(v, str) else v
        elif k == "generation_kwargs":
            t.mark(p)
            out.update(_generation_kwargs(t, v, p))
        elif k == "cot_delimiter" and v is None:
            t.mark(p)
        elif k == "num_fewshot" and isinstance(v, int) and not isinstance(v, bool):
            out[k] = [v]
        elif k in ours:
            out[k] = v
        elif k in _ICL_NEUTRAL:
            ok, what = _ICL_NEUTRAL[k]
            if what is not None:
                t.mark(p)
                if ok is None or v in ok:  # per-task notes would repeat for every task: only problems are kept
                    continue
                t.problem(p, f"{_short(v)}: {what}")
        else:
            _unknown(t, path, k, ours + ["dataset_uri", "icl_task_type", "prelimiter", *_ICL_NEUTRAL])
    return out


# generation_kwargs of a generation task: greedy decoding only; these keys change nothing under it
_GREEDY_NEUTRAL = {"do_sample": (False, None), "num_beams": (1, None), "temperature": None, "top_p": None,
                   "top_k": None, "use_cache": None, "eos_token_id": None, "pad_token_id": None}


def _generation_kwargs(t: Translation, kwargs: Any, path: str) -> dict:
    """``generation_kwargs`` -> ``{max_new_tokens: N}`` (or nothing); sampling and beam search are refused."""
    if kwargs is None:
        return {}
    out = {}
    for k, v in _mapping(t, kwargs, path).items():
        if k == "max_new_tokens":
            out[k] = v
        elif k in _GREEDY_NEUTRAL:
            ok = _GREEDY_NEUTRAL[k]
            if ok is not None and v not in ok:
                t.problem(f"{path}.{k}", f"{_short(v)}: answers are decoded greedily here; remove it")
        else:
            _unknown(t, path, k, ["max_new_tokens", *_GREEDY_NEUTRAL])
    return out


def _icl_tasks(t: Translation, tasks: Any, yaml_dir: str | None) -> Any:
    """llm-foundry's ``icl_tasks`` (a list, or a YAML file holding ``icl_tasks:``) -> a list of our task entries."""
    if isinstance(tasks, str):  # llm-foundry: a YAML file holding `icl_tasks:`
        t.mark("icl_tasks")
        tasks, found = _section_of_file(t, "icl_tasks", tasks, yaml_dir)
        if found is None:
            return []
        if not isinstance(tasks, list):
            t.problem("icl_tasks", f"{found} has no 'icl_tasks:' list")
            return []
        t.note("icl_tasks", f"read {len(tasks)} tasks from {found}")
    if not isinstance(tasks, list):
        return tasks
    out = [_icl_task(t, task, f"icl_tasks.{i}") for i, task in enumerate(tasks)]
    if any(isinstance(x, Mapping) and "dataset_uri" in x for x in tasks):
        t.note("icl_tasks", "dataset_uri -> path, icl_task_type -> type; metric_names, max_seq_len and "
                            "has_categories dropped (accuracy per task and shot count is reported)")
    if any(isinstance(x, Mapping) and x.get("icl_task_type") == "generation_task_with_answers" for x in tasks):
        t.note("icl_tasks", "generation_task_with_answers: early_stopping_criteria -> stop_sequences (default: a "
                            "newline), generation_kwargs.max_new_tokens -> max_new_tokens (default 32); greedy "
                            "answers, exact match after normalisation (do_normalization dropped)")
    return out


_GAUNTLET_WEIGHTINGS = {"EQUAL": "equal", "SAMPLE_SZ": "sample_sz", "LOG_SAMPLE_SZ": "log_sample_sz"}


def _gauntlet(t: Translation, gauntlet: Any, yaml_dir: str | None) -> Any:
    """llm-foundry's ``eval_gauntlet`` (a mapping, or a YAML file holding ``eval_gauntlet:``) -> our
    ``GauntletConfig`` keys: ``weighting: EQUAL / SAMPLE_SZ / LOG_SAMPLE_SZ`` -> ``equal / sample_sz /
    log_sample_sz``; ``categories`` (``name``, ``benchmarks``: ``name``, ``num_fewshot``, ``random_baseline``),
    ``subtract_random_baseline``, ``rescale_accuracy`` and ``averages`` as they are."""
    if isinstance(gauntlet, str):
        t.mark("eval_gauntlet")
        gauntlet, found = _section_of_file(t, "eval_gauntlet", gauntlet, yaml_dir)
        if found is None:
            return None
        if not isinstance(gauntlet, Mapping):
            t.problem("eval_gauntlet", f"{found} has no 'eval_gauntlet:' mapping")
            return None
        t.note("eval_gauntlet", f"read from {found}")
    if not isinstance(gauntlet, Mapping):
        return gauntlet
    out = dict(gauntlet)
    w = out.get("weighting")
    if isinstance(w, str) and w in _GAUNTLET_WEIGHTINGS:
        t.mark("eval_gauntlet.weighting")
        out["weighting"] = _GAUNTLET_WEIGHTINGS[w]
        t.note("eval_gauntlet", f"weighting {w} -> {out['weighting']}; scored here as in llm-foundry (benchmark: "
                                "accuracy minus random_baseline, over 1 - random_baseline; category: weighted mean; "
                                "'average': the mean over categories, docs/GAUNTLET.md)")
    cats = out.get("categories")
    avgs = out.get("averages")
    if isinstance(cats, list) and isinstance(avgs, Mapping):  # llm-foundry averages the categories that exist
        names = {c.get("name") for c in cats if isinstance(c, Mapping)}
        out["averages"] = {}
        for avg, members in avgs.items():
            if not isinstance(members, list):
                out["averages"][avg] = members
                continue
            absent = [m for m in members if m not in names]
            kept = [m for m in members if m in names]
            if absent:
                t.note(f"eval_gauntlet.averages.{avg}", f"{absent}: no such category in this gauntlet; averaged over "
                                                        f"the others, as llm-foundry does")
            if kept:
                out["averages"][avg] = kept
            else:
                t.note(f"eval_gauntlet.averages.{avg}", "none of its categories is in this gauntlet; dropped")
    return out


# top-level keys only llm-foundry has -> what happens to them (None: a custom handler below)
_TOP_NEUTRAL = {
    "max_seq_len": (None, "dropped; here model.max_seq_len and each loader's max_seq_len say it"),
    "eval_first": ((False, None), "absent here: the first evaluation runs at eval_interval; remove it"),
    "device_train_batch_size": ((None,), "use global_train_batch_size (= per-device batch x number of GPUs)"),
    "tp_config": ((None,), "tensor parallelism is absent here; remove it (FSDP: fsdp_config)"),
    "code_paths": ((None, []), "no custom code is imported here; remove it"),
    "max_split_size_mb": (None, "dropped; set PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:N instead"),
    "expandable_segments": (None, "dropped; set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True instead"),
    "cuda_load_lazy": (None, "dropped; set CUDA_MODULE_LOADING=LAZY instead"),
    "accumulate_train_batch_on_tokens": (None, "dropped: each micro-batch's loss is weighted equally here"),
    "eval_loaders": ((None, []), "one eval_loader here; keep one"),
    "icl_tasks_str": (None, "a copy of icl_tasks as text; dropped (icl_tasks is read)"),
    "eval_gauntlet_str": (None, "a copy of eval_gauntlet as text; dropped (eval_gauntlet is read)"),
    "icl_max_seq_len": (None, "dropped (icl_seq_len cuts the ICL prompts here; default model.max_seq_len)"),
    "log_config": (None, "dropped; the resolved config is always logged and saved as config.yaml"),
    "metadata": (None, "dropped"),
    "flatten_metadata": (None, "dropped"),
    "save_latest_filename": ((None,), "checkpoint names are fixed here (ep{e}-ba{b}-rank{r}.pt, latest-rank{r}.pt)"),
    "save_filename": ((None,), "checkpoint names are fixed here (ep{e}-ba{b}-rank{r}.pt, latest-rank{r}.pt)"),
    "save_ignore_keys": ((None, []), "absent here; remove it"),
    "load_ignore_keys": ((None, []), "absent here; remove it"),
    "load_strict_model_weights": ((True, None), "a checkpoint must fit the model here; remove it"),
    "only_hf_checkpoint": ((False, None), "export with scripts/convert_composer_to_hf.py after training"),
    "only_composer_checkpoint": (None, "dropped (composer checkpoints are all that is written)"),
    "train_subset_num_batches": ((-1, None), "absent here; use max_duration"),
    "spin_dataloaders": ((True, None), "resumption always replays the data order here; remove it"),
    "profiler": ((None,), "use callbacks.profiler (start_batch, num_batches, folder)"),
    "dataset": (None, "a YAML anchor for the loaders; dropped"),
    "n_gpus": (None, "dropped"),
    "device_train_grad_accum": (None, "use device_train_microbatch_size"),
}
_TIME_KEYS = ("max_duration", "eval_interval", "save_interval", "console_log_interval")


def _amp_fp8(t: Translation) -> None:
    """llm-foundry's ``precision: amp_fp8`` is composer's Transformer Engine FP8 (``te.fp8_autocast``: delayed
    scaling, HYBRID format, for Transformer Engine layers, ``fc_type: te``); here the same value trains the
    transformer blocks' ``nn.Linear`` layers in FP8 through torchao (train/fp8.py)."""
    t.note("precision", "amp_fp8: FP8 through torchao here (train/fp8.py), not Transformer Engine: the transformer "
                        "blocks' linear layers with dynamic tensorwise scaling (fp8.recipe), e4m3 forward and e5m2 "
                        "gradients as in Transformer Engine's HYBRID format; needs pip install 'mpt-forge[fp8]' and a "
                        "GPU of compute capability 8.9 or newer (H100, H200)")


def translate(data: Mapping, config_cls, yaml_dir: str | None = None) -> Translation:
    """llm-foundry's training YAML (as a resolved dict, overrides applied) -> a dict for ``config_cls``
    (``TrainConfig``). ``yaml_dir``: where ``icl_tasks: tasks.yaml`` / ``eval_gauntlet: gauntlet.yaml`` are also
    looked for.

    Pure: ``data`` is not changed. Keys already in our format pass through unchanged, so a YAML that mixes both
    (an llm-foundry YAML with our ``key=value`` overrides) works. See the module docstring.
    """
    src = copy.deepcopy(dict(data))
    t = Translation(data={}, schema=config_classes(config_cls))
    out = t.data
    ours = _fields(config_cls)
    handlers = {"model", "tokenizer", "train_loader", "eval_loader", "optimizer", "scheduler", "fsdp_config",
                "algorithms", "callbacks", "loggers", "icl_tasks", "eval_gauntlet"}
    for k, v in src.items():
        if k in handlers:
            continue
        if k in ours:
            out[k] = v
        elif k in _TOP_NEUTRAL:
            if k == "eval_first" and v:
                t.mark(k)
                t.note(k, "true: absent here (the first evaluation runs at eval_interval); dropped")
                continue
            _neutral(t, k, v, _TOP_NEUTRAL[k])
        else:
            _unknown(t, "", k, ours + list(_TOP_NEUTRAL) + ["fsdp_config", "algorithms"])
    if src.get("precision") == "amp_fp8":
        _amp_fp8(t)
    if "model" in src:
        out["model"] = _model(t, src["model"], out)
    if "tokenizer" in src:
        out["tokenizer"] = _tokenizer(t, src["tokenizer"])
    for k in ("train_loader", "eval_loader"):
        if k in src:
            out[k] = _loader(t, src[k], k)
    if "scheduler" in src:
        out["scheduler"] = _scheduler(t, src["scheduler"])
    if "icl_tasks" in src:
        out["icl_tasks"] = _icl_tasks(t, src["icl_tasks"], yaml_dir)
    if "eval_gauntlet" in src:
        out["eval_gauntlet"] = _gauntlet(t, src["eval_gauntlet"], yaml_dir)
    if "fsdp_config" in src:
        fsdp = _fsdp(t, src["fsdp_config"])
        if "fsdp" in src and src["fsdp"] != fsdp:
            t.problem("fsdp_config", "set either fsdp_config (llm-foundry's) or fsdp (ours), not both")
        out["fsdp"] = fsdp
    if "algorithms" in src:
        _algorithms(t, src["algorithms"], out)
    if "callbacks" in src:
        out["callbacks"] = _callbacks(t, src["callbacks"])
    if "loggers" in src:
        out["loggers"] = _loggers(t, src["loggers"])
    if "optimizer" in src:  # last: its 'adamw' depends on the rest
        out["optimizer"] = _optimizer(t, src["optimizer"])
    if not t.dialect_keys:
        return t
    # llm-foundry's meanings and defaults where they differ from ours
    hints = typing.get_type_hints(config_cls)
    for k in [k for k in ours if k in out and out[k] is None]:
        if "None" not in str(hints[k]) and hints[k] is not Any:  # llm-foundry's null = its default
            del out[k]
            t.note(k, "null -> left out (the default here)")
    for k in _TIME_KEYS:
        if _is_int(out.get(k)):
            t.note(k, f"{out[k]} -> '{out[k]}ep' (an integer time counts epochs)")
            out[k] = f"{out[k]}ep"
    # a whole llm-foundry YAML (its model section names the model), not one of ours with a dialect override:
    whole = isinstance(src.get("model"), Mapping) and "name" in src["model"]
    if whole and "max_grad_norm" not in out:
        out["max_grad_norm"] = None
        t.note("max_grad_norm", "null: llm-foundry clips gradients only with algorithms.gradient_clipping")
    if out.get("device_train_microbatch_size") == "auto" and isinstance(out.get("fsdp"), dict):
        out["fsdp"].setdefault("version", 1)
        t.note("fsdp.version", "1 (FullyShardedDataParallel, as llm-foundry): device_train_microbatch_size: auto "
                               "needs it")
    if whole and out.get("eval_loader") is not None and "eval_interval" not in out:
        out["eval_interval"] = "1ep"
        t.note("eval_interval", "'1ep' (llm-foundry's default: every epoch)")
    return t


def is_foundry_dialect(data: Mapping, config_cls) -> bool:
    """True when ``data`` has a key (or value) that only llm-foundry's training YAML has."""
    return bool(translate(data, config_cls).dialect_keys)


def problems_message(problems: list[str], source: str | None = None) -> str:
    n = len(problems)
    where = f" {source!r}" if source else ""
    head = (f"the llm-foundry config{where} has {n} key{'s' * (n != 1)} with no equivalent here; change "
            f"{'them' if n != 1 else 'it'} and run again:")
    return "\n".join([head, *(f"  - {p}" for p in problems)])


def translated_yaml(data: Mapping, source: str | None = None) -> str:
    from omegaconf import OmegaConf
    header = (f"# Translated by mpt-forge from the llm-foundry config {source or ''} (command-line overrides "
              "applied).\n# Train with it directly: python scripts/train.py THIS_FILE\n")
    return header + OmegaConf.to_yaml(OmegaConf.create(dict(data)))


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def translated_path(data: Mapping, yaml_path) -> str | None:
    """Where the translated YAML goes: the local save folder (``{run_name}`` filled in), else next to the YAML."""
    run_name = data.get("run_name") or "run"
    folder = data.get("save_folder")
    if folder and "://" not in folder:
        return os.path.join(folder.replace("{run_name}", run_name), run_name + TRANSLATED_SUFFIX)
    if yaml_path is not None:
        return os.path.join(os.path.dirname(os.path.abspath(str(yaml_path))), run_name + TRANSLATED_SUFFIX)
    return None


def value_errors(data: Mapping, config_cls) -> list[str]:
    """Each top-level section of a translated config checked on its own, so that a value with no equivalent here
    (``norm_type: triton_rmsnorm``, ``precision: amp_fp4``...) in one section does not hide those of the others."""
    from llmfoundry.data.finetune import loader_config_from_dict
    from llmfoundry.utils.config import _convert
    hints = typing.get_type_hints(config_cls)
    errors = []
    for k, v in data.items():
        try:
            if k in ("train_loader", "eval_loader"):
                loader_config_from_dict(v, k)
            elif k in hints:
                _convert(v, hints[k], k)
        except ConfigError as e:
            errors.append(str(e))
        except (TypeError, ValueError) as e:
            errors.append(f"{k}: {e}")
    return errors


def load_foundry_config(data: Mapping, yaml_path, config_cls, convert, out=None):
    """Translate, print the notes (rank 0), refuse in one message, ``convert`` (``config_from_dict``) strictly,
    write the translated YAML."""
    out = out or sys.stderr
    source = str(yaml_path) if yaml_path is not None else None
    t = translate(data, config_cls, os.path.dirname(os.path.abspath(str(yaml_path))) if yaml_path else None)
    problems = t.problems + value_errors(t.data, config_cls)
    if problems:
        raise ConfigError(problems_message(problems, source))
    try:
        cfg = convert(t.data)
    except ConfigError as e:
        raise ConfigError(f"{e} (in the config translated from llm-foundry's format)") from None
    if _is_rank_zero():
        print(f"{BANNER}: {source or 'the config'} is in llm-foundry's format; translated:", file=out)
        for n in t.notes:
            print(f"  {n}", file=out)
        path = translated_path(t.data, yaml_path)
        text = translated_yaml(t.data, source)
        try:
            if path is None:
                raise OSError("no place to write")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            print(f"{BANNER}: wrote it in mpt-forge's format to {path}", file=out)
        except OSError:
            print(f"{BANNER}: the config in mpt-forge's format:\n{text}", file=out)
    return cfg
