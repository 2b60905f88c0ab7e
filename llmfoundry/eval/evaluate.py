"""``scripts/eval.py yamls/eval/X.yaml [key=value ...]``: evaluate a composer checkpoint or an HF MPT directory.

YAML keys (``EvalConfig``):

==========================  =========================================================================================
``models``                  several models in one run: a list of ``{label, load_path | hf_path, model_config,
                            model_overrides, tokenizer}`` (the keys below, per model); each is evaluated on the same
                            loaders and tasks in turn, the table has a ``model`` column and ``results_path`` a
                            ``models`` list. Without it, one model from the keys below:
``load_path``               composer checkpoint: a ``.pt`` file, a sharded checkpoint folder, or ``s3://...``
``hf_path``                 or: a Hugging Face MPT directory (``config.json`` + weights [+ tokenizer files])
``model_config``            the model config when the checkpoint records none and has no ``config.yaml`` beside it:
                            a path (training YAML, MPTConfig YAML, HF config.json) or an inline ``model:`` mapping
``model_overrides``         config keys changed at load time, e.g. ``{max_seq_len: 4096, attn_config:
                            {attn_impl: flash}}`` (nothing that changes tensor shapes)
``tokenizer``               default: the run's (recorded in the checkpoint / config.yaml, or the HF directory's)
``device``, ``precision``   ``auto`` = GPU + ``bf16`` when CUDA is available, else CPU + ``fp32``; precision is
                            one of ``fp32``, ``bf16``, ``fp16`` (weights cast) or ``amp_bf16`` (fp32 weights, autocast)
``device_eval_batch_size``  rows per forward (perplexity samples, ICL context + continuation rows, prompts
                            answered together by generation tasks)
``eval_loaders``            ``{label: TextLoaderConfig}``: loss and perplexity over MDS streams; samples longer than
                            the model's ``max_seq_len`` are scored on their first ``max_seq_len`` tokens (a warning
                            says so)
``eval_subset_num_batches`` score at most this many batches of each loader (null = all)
``icl_tasks``               list of ``ICLTaskConfig`` (``llmfoundry/eval/icl_tasks.py``), each of a ``type``:
                            ``language_modeling``, ``multiple_choice``, ``schema`` or
                            ``generation_task_with_answers``; prompts longer than ``max_seq_len`` (generation:
                            minus ``max_new_tokens``) lose their front (a warning and ``truncated_examples`` count
                            them)
``eval_gauntlet``           aggregate scores over groups of the ``icl_tasks`` (``GauntletConfig``,
                            ``llmfoundry/eval/gauntlet.py``; docs/GAUNTLET.md): a ``gauntlet`` section in
                            ``results_path`` (per model with ``models``) and ``gauntlet`` rows in the table
``results_path``            JSON file with every number (null = do not write)
==========================  =========================================================================================

``null`` means none for ``eval_loaders``, ``icl_tasks``, ``model_overrides`` and ``variables``
(``icl_tasks=null`` evaluates perplexity only), and leaves out one entry: ``eval_loaders.val=null``,
``icl_tasks.0=null``. With no loader and no task left, the config is refused ("nothing to evaluate").
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from llmfoundry.data.text_loader import TextLoaderConfig
from llmfoundry.eval.gauntlet import GauntletConfig, check_gauntlet, format_gauntlet_rows, gauntlet_scores
from llmfoundry.eval.icl import evaluate_icl_task
from llmfoundry.eval.icl_tasks import ICLTaskConfig, load_task_examples, random_baseline
from llmfoundry.eval.perplexity import build_eval_batches, evaluate_perplexity
from llmfoundry.utils.config import ConfigError, from_dict

log = logging.getLogger(__name__)

USAGE = "usage: python scripts/eval.py yamls/eval/CONFIG.yaml [key=value ...]"


@dataclass
class ModelEntry:
    """One entry of ``models:``: a model to evaluate and how to load it (as the top-level keys of one model)."""
    label: str
    load_path: Optional[str] = None
    hf_path: Optional[str] = None
    model_config: Optional[Any] = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: Optional[str] = None

    def __post_init__(self):
        if (self.load_path is None) == (self.hf_path is None):
            raise ValueError(f"models entry '{self.label}': set exactly one of load_path (a composer checkpoint) "
                             f"and hf_path (a Hugging Face MPT directory)")


MODEL_KEYS = ("load_path", "hf_path", "model_config", "model_overrides", "tokenizer")


@dataclass
class EvalConfig:
    models: list[ModelEntry] = field(default_factory=list)
    load_path: Optional[str] = None
    hf_path: Optional[str] = None
    model_config: Optional[Any] = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: Optional[str] = None
    device: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "amp_bf16"] = "auto"
    device_eval_batch_size: int = 8
    eval_loaders: dict[str, TextLoaderConfig] = field(default_factory=dict)
    eval_subset_num_batches: Optional[int] = None
    icl_tasks: list[ICLTaskConfig] = field(default_factory=list)
    eval_gauntlet: Optional[GauntletConfig] = None
    results_path: Optional[str] = "eval_results.json"
    variables: dict[str, Any] = field(default_factory=dict)
    seed: int = 17

    def __post_init__(self):
        if self.models:
            given = [k for k in MODEL_KEYS if getattr(self, k) not in (None, {})]
            if given:
                raise ValueError(f"'models' lists the models to evaluate; the top-level {', '.join(given)} would be "
                                 f"ignored: move {'them' if len(given) > 1 else 'it'} into a models entry")
            labels = [m.label for m in self.models]
            if len(set(labels)) != len(labels):
                raise ValueError(f"models labels must be unique; repeated: "
                                 f"{sorted({x for x in labels if labels.count(x) > 1})}")
            self._check_evals()
            return
        if self.load_path is not None and self.hf_path is not None:
            raise ValueError(f"both load_path ({self.load_path}) and hf_path ({self.hf_path}) are set; keep one: "
                             "add load_path=null to evaluate the Hugging Face directory, or hf_path=null for the "
                             "composer checkpoint")
        if self.load_path is None and self.hf_path is None:
            raise ValueError("set one of 'load_path' (a composer checkpoint) and 'hf_path' (a Hugging Face MPT "
                             "directory)")
        if self.hf_path is not None and self.model_config is not None:
            raise ValueError("'model_config' is only for composer checkpoints; an hf_path directory has its own "
                             "config.json")
        self._check_evals()

    def one_model(self, entry: ModelEntry) -> "EvalConfig":
        """This config for one ``models`` entry (its keys at the top level, ``models`` empty)."""
        import dataclasses
        return dataclasses.replace(self, models=[], **{k: getattr(entry, k) for k in MODEL_KEYS})

    def _check_evals(self):
        if self.device_eval_batch_size < 1:
            raise ValueError(f"'device_eval_batch_size' = {self.device_eval_batch_size} must be >= 1")
        if self.eval_subset_num_batches is not None and self.eval_subset_num_batches < 1:
            raise ValueError("'eval_subset_num_batches' must be >= 1 or null (all batches)")
        if not self.eval_loaders and not self.icl_tasks:
            raise ValueError("nothing to evaluate: 'eval_loaders' and 'icl_tasks' are both empty or null; give "
                             "eval_loaders (perplexity) and/or icl_tasks")
        labels = [t.label for t in self.icl_tasks]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"icl_tasks labels must be unique; repeated: {sorted(dup)}")
        if self.eval_gauntlet is not None:
            check_gauntlet(self.eval_gauntlet, self.icl_tasks)


def _register_resolvers() -> None:
    try:  # the trainer's ${bundled:mds} / ${bundled:tokenizer}
        from llmfoundry.train.config import _register_resolvers as register
        register()
    except ImportError:  # pragma: no cover - trainer not installed
        pass


NULL_IS_EMPTY = ("eval_loaders", "icl_tasks", "model_overrides", "variables", "models")  # null means none
NULL_ENTRY_LEFT_OUT = ("eval_loaders", "icl_tasks")  # eval_loaders.val=null, icl_tasks.0=null: leave that one out


def null_as_empty(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with null list/mapping keys made empty and null eval_loaders / icl_tasks entries left out."""
    data = dict(data)
    for key in NULL_IS_EMPTY:
        if key in data and data[key] is None:
            data[key] = [] if key in ("icl_tasks", "models") else {}
    for key in NULL_ENTRY_LEFT_OUT:
        value = data.get(key)
        if isinstance(value, list):
            data[key] = [v for v in value if v is not None]
        elif isinstance(value, dict):
            data[key] = {k: v for k, v in value.items() if v is not None}
    return data


def load_eval_config(yaml_path: Optional[str], overrides: Optional[list[str]] = None) -> EvalConfig:
    """Read the YAML, apply ``key=value`` overrides (``icl_tasks.0.path=x`` indexes the list), resolve ``${...}``,
    take null as none (``null_as_empty``), convert strictly. Every mistake is a one-line ``ConfigError``."""
    from llmfoundry.utils.config import load_yaml_with_overrides

    _register_resolvers()
    data = load_yaml_with_overrides(yaml_path or None, overrides, example="load_path=ckpt.pt")
    from llmfoundry.eval.foundry_dialect import load_foundry_eval  # llm-foundry's eval YAML: translated
    data = load_foundry_eval(data, yaml_path, EvalConfig) or data
    return from_dict(EvalConfig, null_as_empty(data))


def resolve_device_precision(device: str, precision: str) -> tuple[str, str]:
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("device: gpu but no CUDA GPU is visible; use device: auto or cpu")
    if precision == "auto":
        precision = "bf16" if device == "gpu" else "fp32"
    return ("cuda" if device == "gpu" else "cpu"), precision


def _autocast(device: str, precision: str):
    if precision == "amp_bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_eval_model(cfg: EvalConfig, device: str, precision: str):
    """``(model, tokenizer)`` for ``cfg``."""
    from llmfoundry.checkpoint import load_model, require_tokenizer
    weights_dtype = {"fp32": torch.float32, "amp_bf16": torch.float32, "bf16": torch.bfloat16,
                     "fp16": torch.float16}[precision]
    source = cfg.load_path or cfg.hf_path
    if cfg.hf_path is not None and not os.path.isdir(cfg.hf_path):
        raise ConfigError(f"hf_path {cfg.hf_path} is not a directory; pass a Hugging Face MPT model directory")
    model, recorded_tok = load_model(source, model_config=cfg.model_config, overrides=cfg.model_overrides,
                                     device=device, dtype=weights_dtype)
    tokenizer = require_tokenizer(cfg.tokenizer or recorded_tok)
    return model, tokenizer


def format_table(results: dict[str, Any]) -> str:
    """A markdown table: one row per perplexity stream and per (ICL task, shots); with ``models``, per model too."""
    per_model = results["models"] if "models" in results else [results]
    first = "| model " if "models" in results else ""
    lines = [first + "| eval | shots | metric | value | n |", "|---" * (5 + bool(first)) + "|"]
    for res in per_model:
        m = f"| {res['label']} " if first else ""
        for label, r in res.get("perplexity", {}).items():
            lines.append(f"{m}| {label} | - | loss | {r['loss']:.4f} | {r['tokens']} tok |")
            lines.append(f"{m}| {label} | - | perplexity | {r['perplexity']:.3f} | {r['tokens']} tok |")
        for r in res.get("icl", []):
            cut = f", {r['truncated_examples']} truncated" if r.get("truncated_examples") else ""
            lines.append(f"{m}| {r['task']} | {r['num_fewshot']} | accuracy | {r['accuracy']:.4f} "
                         f"(chance {r['random_baseline']:.2f}) | {r['num_examples']}{cut} |")
        if "gauntlet" in res:
            lines += format_gauntlet_rows(res["gauntlet"], m)
    return "\n".join(lines)


def check_results_path(path: Optional[str]) -> None:
    """Before any evaluation: ``results_path`` must name a file that can be written (its folder is created here),
    so that a bad path is a one-line ``ConfigError`` up front instead of results lost at the end."""
    if not path:
        return
    if "://" in path:
        raise ConfigError(f"results_path {path!r}: only local files are supported; give a local JSON file path")
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise ConfigError(f"results_path {path!r} is a directory; give a JSON file path, "
                          f"e.g. results_path={os.path.join(path, 'eval.json')}")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"results_path {path!r}: cannot create its folder {parent!r} "
                          f"({e.strerror or e})") from None
    if not os.path.isdir(parent):
        raise ConfigError(f"results_path {path!r}: {parent!r} is not a folder")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ConfigError(f"results_path {path!r} is not writable")


def warn_truncation(label: str, loader_len: int, mcfg) -> None:
    """One warning line when an eval loader reads samples longer than the model's ``max_seq_len`` (e.g. after
    ``model_overrides.max_seq_len=128`` on 256-token shards): they are scored on their first ``max_seq_len`` tokens,
    the context the model is evaluated at (ICL prompts are cut to it too)."""
    n = mcfg.max_seq_len
    if loader_len <= n:
        return
    longer = ("" if mcfg.learned_pos_emb else
              f", or model_overrides.max_seq_len={loader_len} to score all {loader_len} (this model has no position "
              f"table, so it can run past the length it was trained for)")
    log.warning("eval_loaders.%s: samples are truncated to the model's max_seq_len=%d tokens (the loader reads %d); "
                "set eval_loaders.%s.max_seq_len=%d to silence this%s", label, n, loader_len, label, n, longer)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every eval in ``cfg`` (for each of ``models`` in turn, when given); returns the results (also printed as
    a table and written to results_path)."""
    check_results_path(cfg.results_path)
    device, precision = resolve_device_precision(cfg.device, cfg.precision)
    for task in cfg.icl_tasks:  # fail on a bad task file before loading a model
        n = len(load_task_examples(task.path, task.type))
        if max(task.num_fewshot) > n - 1:
            raise ConfigError(f"icl task '{task.label}': num_fewshot={max(task.num_fewshot)} needs at least "
                              f"{max(task.num_fewshot) + 1} examples in {task.path}, it has {n}")
    if cfg.models:
        results: dict[str, Any] = {"models": []}
        for entry in cfg.models:
            log.info("model %s (%s)", entry.label, entry.load_path or entry.hf_path)
            results["models"].append({"label": entry.label,
                                      **evaluate_one(cfg.one_model(entry), device, precision)})
    else:
        results = evaluate_one(cfg, device, precision)
    print(format_table(results))
    if cfg.results_path:
        replaced = os.path.exists(cfg.results_path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.results_path)), exist_ok=True)
            with open(cfg.results_path, "w") as f:
                json.dump(results, f, indent=2)
        except OSError as e:  # changed since the check at the start; the table above has the numbers
            raise ConfigError(f"results_path {cfg.results_path!r} cannot be written ({e.strerror or e}); "
                              "the results are in the table above") from None
        print(f"results written to {cfg.results_path}" + (" (replacing the earlier file)" if replaced else ""))
    return results


def evaluate_one(cfg: EvalConfig, device: str, precision: str) -> dict[str, Any]:
    """Every loader and task of ``cfg`` on its one model."""
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    model, tokenizer = load_eval_model(cfg, device, precision)
    mcfg = model.config
    results: dict[str, Any] = {"model": cfg.load_path or cfg.hf_path, "device": device, "precision": precision,
                               "max_seq_len": mcfg.max_seq_len, "perplexity": {}, "icl": []}
    if len(tokenizer) > mcfg.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {mcfg.vocab_size}; "
                          "pass the tokenizer the model was trained with ('tokenizer:')")
    with _autocast(device, precision):
        eos = tokenizer.eos_token_id if mcfg.attn_config.attn_uses_sequence_id else None
        for label, loader_cfg in cfg.eval_loaders.items():
            warn_truncation(label, loader_cfg.max_seq_len, mcfg)
            loader = build_eval_batches(loader_cfg, cfg.device_eval_batch_size, eos, vocab_size=mcfg.vocab_size,
                                        tokenizer=tokenizer)
            r = evaluate_perplexity(model, loader, device, cfg.eval_subset_num_batches, max_seq_len=mcfg.max_seq_len)
            log.info("%s: loss %.4f perplexity %.3f over %d tokens", label, r["loss"], r["perplexity"], r["tokens"])
            results["perplexity"][label] = r
        for task in cfg.icl_tasks:
            for row in evaluate_icl_task(model, tokenizer, task, max_seq_len=mcfg.max_seq_len,
                                         batch_size=cfg.device_eval_batch_size, device=device):
                row["random_baseline"] = random_baseline(task)
                log.info("%s %d-shot: accuracy %.4f", row["task"], row["num_fewshot"], row["accuracy"])
                results["icl"].append(row)
    if cfg.eval_gauntlet is not None:
        results["gauntlet"] = gauntlet_scores(cfg.eval_gauntlet, results["icl"])
        log.info("gauntlet: %s", ", ".join(f"{k} {v:.4f}" for k, v in results["gauntlet"]["averages"].items()))
    results["time_s"] = time.time() - t0
    del model
    return results


def main(argv: Optional[list[str]] = None) -> int:
    """``scripts/eval.py CONFIG.yaml [key=value ...]``; user errors print one line and exit 1."""
    from llmfoundry.checkpoint import CheckpointError
    from llmfoundry.data import DataError
    from llmfoundry.data.streams import StreamError, user_message

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + (__doc__ or ""))
        return 0
    paths = [a for a in argv if "=" not in a]
    if len(paths) > 1:
        print(f"error: expected at most one config file, got {paths}\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_eval_config(paths[0] if paths else None, [a for a in argv if "=" in a])
        evaluate(cfg)
    except (ConfigError, CheckpointError, DataError, StreamError, FileNotFoundError, ValueError) as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 1
    return 0


__all__ = ["EvalConfig", "ModelEntry", "load_eval_config", "evaluate", "format_table", "main"]
