"""llm-foundry's eval YAML dialect (``scripts/eval/yamls/*.yaml``), read by ``scripts/eval.py``.

Recognised by keys only that dialect has (``models:``, ``icl_tasks`` entries with ``dataset_uri`` /
``icl_task_type``, ``icl_tasks: path/to/tasks.yaml``, ``eval_gauntlet: path/to/gauntlet.yaml``, ``fsdp_config``, a
top-level ``max_seq_len``, ...) and translated into ``EvalConfig`` keys by ``translate_eval`` (pure), with the training
translator's rules for ``model:``, ``tokenizer:`` and loaders (``llmfoundry.train.foundry_dialect``): a
``mpt_causal_lm`` model section becomes ``model_config`` with llm-foundry's MPT defaults (learned positions,
biases, no ALiBi), which is how that model was built. ``models:`` with several entries becomes our ``models`` list
(evaluated in turn); the ICL task files of llm-foundry's ``language_modeling``, ``multiple_choice``, ``schema`` and
``generation_task_with_answers`` tasks are read as they are (same JSONL fields), and a generation task's
``early_stopping_criteria`` / ``generation_kwargs.max_new_tokens`` become ``stop_sequences`` / ``max_new_tokens``
(greedy decoding only). ``eval_gauntlet`` is scored here (``llmfoundry.eval.gauntlet``; ``weighting: EQUAL`` ->
``equal``). The ICL and gauntlet rules live in the training translator (a training YAML has them too). As for
training, every key with no equivalent is listed in one ``ConfigError``.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping

from llmfoundry.train.foundry_dialect import (BANNER, Translation, _gauntlet, _icl_tasks, _loader, _mapping, _model,
                                              _neutral, _short, _tokenizer, _unknown)
from llmfoundry.utils.config import ConfigError

_TOP_NEUTRAL = {
    "max_seq_len": (None, "the model's max_seq_len is used here (model_overrides.max_seq_len to change it); "
                          "dropped"),
    "fsdp_config": (None, "evaluation runs on one device here; dropped"),
    "dist_timeout": (None, "dropped"),
    "python_log_level": (None, "dropped"),
    "loggers": (None, "results go to the table and results_path here; dropped"),
    "console_log_interval": (None, "dropped"),
    "log_config": (None, "dropped"),
    "run_name": (None, "dropped"),
    "metadata": (None, "dropped"),
    "callbacks": (None, "dropped"),
    "eval_gauntlet_str": (None, "a copy of eval_gauntlet as text; dropped (eval_gauntlet is read)"),
    "icl_tasks_str": (None, "dropped"),
    "code_paths": ((None, []), "no custom code is imported here; remove it"),
}
_PRECISIONS = {"amp_bf16": "amp_bf16", "fp32": "fp32", "amp_fp16": "fp16", "bf16": "bf16", "fp16": "fp16",
               "auto": "auto"}


def _ours(models: Any) -> bool:
    """Whether ``models:`` is our list (entries with ``label``, ``load_path`` / ``hf_path``, ...): no entry has
    llm-foundry's ``model_name`` or ``model``."""
    return isinstance(models, list) and bool(models) and all(
        isinstance(m, Mapping) and not {"model_name", "model"} & set(m) for m in models)


def _models(t: Translation, models: Any, out: dict) -> None:
    """``models:`` -> one model's keys at the top level (one entry) or our ``models`` list (several)."""
    t.mark("models")
    if not isinstance(models, list) or not models:
        t.problem("models", "give a list of models (each with model_name, model, tokenizer, load_path)")
        return
    entries = [_model_entry(t, _mapping(t, m, f"models.{i}"), f"models.{i}") for i, m in enumerate(models)]
    if len(entries) == 1:
        entries[0].pop("label")
        out.update(entries[0])
        return
    for i, e in enumerate(entries):
        e.setdefault("label", f"model{i}")
    out["models"] = entries
    t.note("models", f"{len(entries)} models, evaluated in turn (labels: their model_name)")


def _model_entry(t: Translation, entry: dict, p: str) -> dict:
    """One llm-foundry ``models`` entry -> our keys (``label``, ``load_path`` | ``hf_path``, ``tokenizer``,
    ``model_config``, ``model_overrides``)."""
    out: dict = {}
    name = entry.pop("model_name", None)
    if name is not None:
        out["label"] = str(name)
        t.note(f"{p}.model_name", f"{name!r} -> label (names the model in the results)")
    if "load_path" in entry:
        out["load_path"] = entry.pop("load_path")
    if "tokenizer" in entry:
        out["tokenizer"] = _tokenizer(t, entry.pop("tokenizer"))
    model = entry.pop("model", None)
    if isinstance(model, Mapping) and model.get("name") == "hf_causal_lm":
        src = model.get("pretrained_model_name_or_path")
        from llmfoundry.checkpoint import CheckpointError, hub_model_dir, is_hub_name
        if src and is_hub_name(src):  # cached or fetched
            try:
                src = hub_model_dir(str(src))
            except CheckpointError as e:
                t.problem(f"{p}.model.pretrained_model_name_or_path", str(e))
                return out
        if src and os.path.isdir(str(src)) and out.get("load_path") is None:
            out["hf_path"] = src
            t.note(f"{p}.model", f"hf_causal_lm -> hf_path: {src!r} (a Hugging Face MPT directory)")
            for k in set(model) - {"name", "pretrained_model_name_or_path", "pretrained", "init_device",
                                   "use_auth_token", "config_overrides"}:
                _unknown(t, f"{p}.model", k, ["pretrained_model_name_or_path", "config_overrides"])
            if model.get("config_overrides"):
                out["model_overrides"] = dict(model["config_overrides"])
        else:
            t.problem(f"{p}.model", "hf_causal_lm: pretrained_model_name_or_path must name a Hugging Face MPT "
                      "model: a folder with config.json, or a hub name (org/model)")
    elif model is not None:
        sub = Translation(data={})  # the training translator's model rules, under this entry's path
        cfg = _model(sub, model, {})
        t.notes += [f"{p}.{n}" for n in sub.notes]
        t.problems += [f"{p}.{q}" for q in sub.problems]
        t.dialect_keys += [f"{p}.{k}" for k in sub.dialect_keys]
        if isinstance(cfg, dict):
            cfg.pop("init_device", None)
        out["model_config"] = cfg
        t.note(f"{p}.model", "-> model_config (the checkpoint's weights are read with it)")
        if out.get("load_path") is None:
            t.problem(f"{p}.load_path", f"missing: llm-foundry evaluates model {out.get('label', p)!r} from random "
                      "initial weights then; here name the checkpoint to evaluate (load_path: a composer checkpoint "
                      "or folder)")
    for k in entry:
        _unknown(t, p, k, ["model_name", "model", "tokenizer", "load_path"])
    return out


def translate_eval(data: Mapping, eval_cls, yaml_dir: str | None = None) -> Translation:
    """llm-foundry's eval YAML (resolved dict) -> a dict for ``eval_cls`` (``EvalConfig``, passed in so that this
    module does not import ``evaluate``, which imports it); keys already ours pass through. ``yaml_dir``: where
    a relative ``icl_tasks: tasks.yaml`` is also looked for."""
    import copy

    from llmfoundry.train.foundry_dialect import _fields
    EvalConfig = eval_cls
    src = copy.deepcopy(dict(data))
    t = Translation(data={})
    out = t.data
    ours = _fields(EvalConfig)
    for k, v in src.items():
        if k == "models" and _ours(v):
            out[k] = v
        elif k == "models":
            _models(t, v, out)
        elif k == "icl_tasks":
            out[k] = _icl_tasks(t, v, yaml_dir)
        elif k == "eval_gauntlet":
            out[k] = _gauntlet(t, v, yaml_dir)
        elif k == "eval_loader":
            t.mark(k)
            if v is not None:
                out["eval_loaders"] = {"eval": _loader(t, v, k)}
                t.note(k, "-> eval_loaders.eval")
        elif k == "eval_loaders" and isinstance(v, list):
            t.mark(k)
            entries = [_mapping(t, x, f"eval_loaders.{i}") for i, x in enumerate(v)]
            out[k] = {x.pop("label", f"eval{i}"): _loader(t, x, f"eval_loaders.{i}") for i, x in enumerate(entries)}
            t.note(k, "a list with labels -> a mapping label -> loader")
        elif k == "icl_subset_num_batches":
            t.mark(k)
        elif k == "precision" and str(v) not in ("auto", "fp32", "bf16", "fp16", "amp_bf16"):
            t.mark(k)
            if str(v) in _PRECISIONS:
                out[k] = _PRECISIONS[str(v)]
                t.note(k, f"{v} -> {out[k]} (weights cast; there is no fp16 autocast here)")
            else:
                t.problem(k, f"{_short(v)}: use fp32, bf16, fp16 or amp_bf16")
        elif k in ours:
            out[k] = v
        elif k in _TOP_NEUTRAL:
            _neutral(t, k, v, _TOP_NEUTRAL[k])
        else:
            _unknown(t, "", k, ours + ["models", "icl_subset_num_batches", *_TOP_NEUTRAL])
    _subset_of_tasks(t, src.get("icl_subset_num_batches"), out, EvalConfig)
    if t.dialect_keys and out.get("eval_subset_num_batches") == -1:
        out["eval_subset_num_batches"] = None
        t.note("eval_subset_num_batches", "-1 -> null (all batches)")
    return t


def _subset_of_tasks(t: Translation, n: Any, out: dict, eval_cls) -> None:
    """llm-foundry's ``icl_subset_num_batches: N`` (the first N batches of every task) -> each task's
    ``max_examples``: N x (the task's ``batch_size``, else ``device_eval_batch_size``), the smaller limit kept."""
    import dataclasses
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        t.problem("icl_subset_num_batches", f"{_short(n)}: give a number of batches >= 1, or null for all")
        return
    default = next(f.default for f in dataclasses.fields(eval_cls) if f.name == "device_eval_batch_size")
    batch = out.get("device_eval_batch_size", default)
    tasks = out.get("icl_tasks")
    for task in tasks if isinstance(tasks, list) else []:
        if isinstance(task, dict):
            limit = n * (task.get("batch_size") or batch)
            task["max_examples"] = min(limit, task.get("max_examples") or limit)
    t.note("icl_subset_num_batches", f"{n} -> each task's max_examples: {n} x its batch size (the first examples of "
                                     f"its file)")


def load_foundry_eval(data: Mapping, yaml_path, eval_cls, out=None) -> dict | None:
    """The translated dict when ``data`` is in llm-foundry's eval dialect (notes printed; every key without an
    equivalent in one ``ConfigError``), else None."""
    yaml_dir = os.path.dirname(os.path.abspath(str(yaml_path))) if yaml_path else None
    t = translate_eval(data, eval_cls, yaml_dir)
    if not t.dialect_keys:
        return None
    source = str(yaml_path) if yaml_path is not None else "the config"
    if t.problems:
        from llmfoundry.train.foundry_dialect import problems_message
        raise ConfigError(problems_message(t.problems, str(yaml_path) if yaml_path else None))
    if os.environ.get("RANK", "0") == "0":
        out = out or sys.stderr
        print(f"{BANNER}: {source} is in llm-foundry's eval format; translated:", file=out)
        for n in t.notes:
            print(f"  {n}", file=out)
    return t.data
