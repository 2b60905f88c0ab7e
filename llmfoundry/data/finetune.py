"""Finetuning data: prompt/response or chat examples -> right-padded (optionally packed) training batches.

YAML (``train_loader:`` / ``eval_loader:`` with ``name: finetune``) is read into ``FinetuneLoaderConfig``;
``build_finetune_dataloader(cfg, tokenizer, device_batch_size)`` returns a torch ``DataLoader`` whose batches are

    {'input_ids': LongTensor (B, S), 'labels': LongTensor (B, S), 'attention_mask': LongTensor (B, S),
     'sequence_id': LongTensor (B, S)}

with S = ``max_seq_len``, rows right-padded (pad token = the tokenizer's pad token, else EOS).

Sources (exactly one)
---------------------
* ``data_files``: JSON Lines files (one object per line; blank lines are skipped) or folders (every ``*.jsonl``
  inside, sorted). ``${bundled:finetune}`` names ``llmfoundry/assets/finetune`` (tiny examples shipped here).
* ``hf_dataset``: a Hugging Face dataset: a folder written by ``Dataset(Dict).save_to_disk``, a local folder of
  data files, or a hub name (``hf_subset`` = its config name), and ``split``.
* ``remote`` and/or ``local`` (or ``streams``: name -> {remote, local, split}, read one after the other): MDS
  shards, as for pretraining (``s3://`` or a folder; ``llmfoundry/data/streams.py`` downloads, caches and names
  errors; ``s3_endpoint_url``, ``download_retry``, ``download_timeout`` as in the text loader), under the
  subfolder ``split`` ('' = none). Samples hold ``prompt`` and ``response`` (str) or ``messages`` (json) columns,
  e.g. written by ``data_prep/convert_finetune_to_mds.py``; each sample is one example, in index order, so the
  batches equal those of the JSON Lines it was converted from. Every rank reads every sample (as for the other
  sources); local ranks share one download cache, a temporary one unless ``local`` is set.
``columns`` maps our field names to the source's, e.g. ``{prompt: instruction, response: output}`` or
``{messages: conversations, role: from, content: value}``; ``role_names`` maps role values, e.g.
``{human: user, gpt: assistant}`` (ShareGPT-style data). ``record_format`` rewrites each record of a well-known
public instruction dataset (Dolly, Alpaca, P3, ...) into a prompt and a response first
(``llmfoundry/data/record_formats.py``).

Formats (``format: auto`` = chat when the first example has the ``messages`` field)
--------------------------------------------------------------------------------
* ``prompt_response``: ``{"prompt": str, "response": str}``. Tokens: ``prompt_template`` with ``{prompt}``
  replaced by the prompt, then the response, then EOS. Trained: the response and the EOS.
* ``chat``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``. The chat template
  is ChatML (as MPT-7B-Chat): each turn is ``<|im_start|>{role}\\n{content}<|im_end|>``, turns are joined by
  ``\\n``, then EOS. Trained: every assistant turn's ``{content}<|im_end|>``, and the EOS when the last turn is
  the assistant's. Rules: an optional system turn comes first; then user and assistant turns alternate,
  starting with user; at least one assistant turn. ``format_chat_prompt(messages)`` is the text to generate
  from (it ends with ``<|im_start|>assistant\\n``; stop generating at ``<|im_end|>``).
The text pieces are tokenized separately (no special tokens added) and concatenated.

Labels
------
``labels`` equal ``input_ids`` on trained tokens and are -100 everywhere else (prompts, chat headers, user and
system turns, padding). The model shifts them (position i is trained to predict labels[i + 1]). The first token
of every example is never trained, so no loss term predicts one packed example from the previous one.
What is trained can be widened or narrowed (llm-foundry's two settings, same meanings):
* ``target_responses``: ``all`` (default) trains every response (every assistant turn of a chat); ``last`` only
  the final one (llm-foundry's default), earlier turns are context.
* ``target_prompts``: ``none`` (default); ``all`` trains the prompts too (each run of text between responses,
  chat headers included); ``length>=N`` trains a prompt when it has at least N tokens.
The EOS is appended only when the example does not already end with it (a response that carries its own EOS).

Too long examples (``too_long``; more than ``max_seq_len`` tokens)
-----------------------------------------------------------------
* ``truncate`` (default):
  - prompt_response: the prompt is cut from the LEFT (its end, next to the response, stays), keeping at least
    ``min_prompt_tokens`` of it; if that is not enough, the response is cut from the right.
  - chat: the conversation is cut from the RIGHT (the latest turns go first); if the first assistant turn would
    then keep fewer than ``min_response_tokens``, the leading context is cut from the left (keeping at least
    ``min_prompt_tokens``) to make room.
  An example that would keep fewer than ``min(min_response_tokens, its trained tokens)`` trained tokens is
  refused: never trained on, never silently: one warning counts them and names the first few (file:line).
  (A prompt/response example is never refused: the config requires min_prompt_tokens + min_response_tokens
  <= max_seq_len. A chat example is when its first answers are too short and its leading context too long.)
* ``truncate_end``: the first ``max_seq_len`` tokens are kept, whatever they are (llm-foundry's truncation); an
  example with no trained token among them is left out (counted warning).
* ``skip``: every too long example is left out (the same counted warning).
* ``error``: the first too long example stops the build with a ``DataError`` naming its file and line.

Packing (``packing_ratio``)
---------------------------
``null`` (or 1): one example per row. ``auto``: best-fit-decreasing bin packing of all examples into rows of at
most ``max_seq_len`` tokens (least padding). A number r > 1: the same, with at most floor(r) examples per row.
Packed examples get consecutive ``sequence_id`` values (0, 1, ...; padding takes the next id): set
``model.attn_config.attn_uses_sequence_id: true`` so that they do not attend to each other (the builder warns
otherwise when told the model's setting). The achieved ratio (examples per row) and padding are logged.

Order, ranks, resumption
------------------------
Every rank reads and tokenizes the whole source (deterministically), then a ``DistributedSampler`` (world size 1
without ``torch.distributed``) gives each rank a disjoint share of each epoch's rows, shuffled with
``shuffle_seed`` and the epoch. Resumption needs no loader state: composer calls ``sampler.set_epoch`` and skips
the batches already seen in the epoch (``spin_dataloaders``), which reproduces the exact order. With
``drop_last: false`` (eval) the sampler repeats a few rows so that every rank gets as many: up to ranks - 1
duplicated rows in the metrics. Composer counts tokens as batch x max_seq_len (padding included).

``attention_mask`` marks padding; since padding only ever follows the real tokens of a row, causal attention
never reaches it from a real token, so a consumer may drop the mask (keeping fused attention kernels) without
changing any real token's output (see tests/test_finetune.py).

Errors
------
A malformed example stops the build with one ``DataError`` naming the file and line (or dataset row): not JSON,
not an object, a missing field (with the fields found and the ``columns`` fix), a non-string or empty response,
a malformed message, a wrong or misplaced role. With ``malformed: skip`` such examples are left out instead and
counted in one warning that names the first few (for large third-party datasets with a few broken rows).
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch

from llmfoundry.data import ASSETS, DataError
from llmfoundry.data.readers import is_saved_dataset
from llmfoundry.data.record_formats import FORMATS
from llmfoundry.data.streams import StreamConfig
from llmfoundry.utils.config import ConfigError, closest, from_dict

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
BUNDLED_FINETUNE = os.path.join(ASSETS, "finetune")
ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
FIELDS = ("prompt", "response", "messages", "role", "content")
MAX_NAMED = 5  # locations named in a warning

__all__ = ["FinetuneLoaderConfig", "build_finetune_dataloader", "build_finetune_dataset", "FinetuneDataset",
           "FinetuneCollator", "format_chat_prompt", "loader_config_from_dict", "canonical_records", "IGNORE_INDEX",
           "BUNDLED_FINETUNE"]


@dataclass
class FinetuneLoaderConfig:
    """Finetuning loader settings (YAML ``train_loader:`` / ``eval_loader:`` with ``name: finetune``).

    Source: ``data_files`` (JSONL files/folders), ``hf_dataset`` (+ ``hf_subset``, ``split``), or MDS shards:
    ``remote`` and/or ``local`` (or ``streams``, name -> {remote, local, split}), under ``split`` ('' = none), with
    ``s3_endpoint_url``, ``download_retry``, ``download_timeout`` (as in ``TextLoaderConfig``); ``columns``,
    ``role_names``: field and role renaming; ``record_format``: a public dataset's layout (``record_formats.py``);
    ``max_examples``: read only the first N examples.
    Format: ``format``, ``prompt_template`` (must contain ``{prompt}``), ``add_eos``; ``malformed``: ``error``
    (stop at the first malformed example) or ``skip`` (leave them out, counted in one warning naming the first).
    Trained: ``target_responses`` (all | last), ``target_prompts`` (none | all | length>=N).
    Length: ``max_seq_len``, ``too_long`` (truncate | truncate_end | skip | error), ``min_prompt_tokens``,
    ``min_response_tokens``.
    Packing: ``packing_ratio`` (null, a number >= 1, or 'auto').
    Order: ``shuffle``, ``shuffle_seed``. torch DataLoader: ``num_workers``, ``pin_memory`` (CUDA only),
    ``drop_last``, ``prefetch_factor``, ``persistent_workers``. Details: the module docstring.
    """
    max_seq_len: int
    name: Literal["finetune"] = "finetune"
    data_files: str | list[str] | None = None
    hf_dataset: str | None = None
    hf_subset: str | None = None
    remote: str | None = None
    local: str | None = None
    streams: dict[str, StreamConfig] | None = None
    split: str = "train"
    s3_endpoint_url: str | None = None
    download_retry: int = 2
    download_timeout: float = 60.0
    columns: dict[str, str] = field(default_factory=dict)
    role_names: dict[str, str] = field(default_factory=dict)
    record_format: str | None = None  # a public dataset's record layout (llmfoundry/data/record_formats.py)
    max_examples: int | None = None
    format: Literal["auto", "prompt_response", "chat"] = "auto"
    malformed: Literal["error", "skip"] = "error"
    prompt_template: str = "{prompt}"
    add_eos: bool = True
    target_responses: Literal["all", "last"] = "all"
    target_prompts: str = "none"
    too_long: Literal["truncate", "truncate_end", "skip", "error"] = "truncate"
    min_prompt_tokens: int = 8
    min_response_tokens: int = 8
    packing_ratio: Any = None  # null, a number >= 1, or 'auto' (checked in __post_init__)
    shuffle: bool = True
    shuffle_seed: int = 17
    num_workers: int = 0
    pin_memory: bool = True
    drop_last: bool = True
    prefetch_factor: int | None = 2
    persistent_workers: bool = False

    def __post_init__(self):
        if isinstance(self.data_files, str):
            self.data_files = [self.data_files]
        given = [k for k in ("data_files", "hf_dataset", "remote", "local", "streams") if getattr(self, k) is not None]
        if len([k for k in given if k not in ("remote", "local")]) + bool(self.remote or self.local) != 1:
            raise ValueError(f"set exactly one data source, got {given or 'none'}: 'data_files' (JSONL files or "
                             f"folders), 'hf_dataset' (a hub name, a save_to_disk folder, or a folder of data files), "
                             f"or MDS shards: 'remote' and/or 'local' (or 'streams')")
        for name, stream in (self.streams or {}).items():
            weights = [k for k in ("proportion", "repeat", "choose") if getattr(stream, k) is not None]
            if weights:
                raise ValueError(f"streams.{name}.{weights[0]}: finetuning reads every example of every stream once "
                                 f"per epoch (rows are packed and shuffled in memory); remove it")
        if self.streams is not None and not self.streams:
            raise ValueError("'streams' is empty: give at least one stream")
        if self.download_retry < 1:
            raise ValueError(f"download_retry must be >= 1, got {self.download_retry}")
        if self.download_timeout <= 0:
            raise ValueError(f"download_timeout must be > 0 seconds, got {self.download_timeout}")
        if self.data_files is not None and not self.data_files:
            raise ValueError("'data_files' is empty: list at least one JSONL file or folder")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        for key in self.columns:
            if key not in FIELDS:
                raise ValueError(f"columns: unknown field '{key}'{closest(key, FIELDS)}; the keys of 'columns' are our "
                                 f"field names ({', '.join(FIELDS)}), the values the names in your data")
        for src, role in self.role_names.items():
            if role not in ROLES:
                raise ValueError(f"role_names: '{src}' maps to '{role}', which must be one of {', '.join(ROLES)}"
                                 f"{closest(role, ROLES)}")
        if self.record_format is not None:
            if self.record_format not in FORMATS:
                raise ValueError(f"record_format = {self.record_format!r} must be one of {', '.join(FORMATS)} (or "
                                 f"null){closest(str(self.record_format), list(FORMATS))}")
            if self.columns or self.format == "chat":
                raise ValueError(f"record_format {self.record_format} builds prompt/response examples from its own "
                                 f"fields: remove 'columns' and format: chat")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template {self.prompt_template!r} must contain '{{prompt}}' (where the "
                             f"prompt goes)")
        prompt_cutoff(self.target_prompts)  # raises ValueError naming the accepted forms
        if self.min_prompt_tokens < 0:
            raise ValueError(f"min_prompt_tokens must be >= 0, got {self.min_prompt_tokens}")
        if self.min_response_tokens < 1:
            raise ValueError(f"min_response_tokens must be >= 1, got {self.min_response_tokens}")
        if self.too_long == "truncate" and self.min_prompt_tokens + self.min_response_tokens > self.max_seq_len:
            raise ValueError(f"min_prompt_tokens + min_response_tokens = "
                             f"{self.min_prompt_tokens + self.min_response_tokens} exceeds max_seq_len = "
                             f"{self.max_seq_len}; lower them")
        r = self.packing_ratio
        if r is not None and r != "auto" and (isinstance(r, bool) or not isinstance(r, (int, float)) or r < 1):
            raise ValueError(f"packing_ratio = {r!r} must be a number >= 1 (at most that many examples per row), "
                             f"'auto' (as many as fit), or null (no packing){closest(str(r), ['auto'])}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 (or null for all), got {self.max_examples}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1 (or null), got {self.prefetch_factor}")

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def is_mds(self) -> bool:
        return bool(self.remote or self.local or self.streams)

    def named_streams(self) -> dict[str, StreamConfig]:
        return self.streams or {"default": StreamConfig(remote=self.remote, local=self.local)}

    def max_per_row(self) -> int | None:
        """Examples per row: 1 (no packing), None (as many as fit), or floor(packing_ratio)."""
        if self.packing_ratio is None:
            return 1
        if self.packing_ratio == "auto":
            return None
        return int(self.packing_ratio)


def loader_config_from_dict(data: Any, path: str = "train_loader"):
    """A loader config by ``name``: ``text`` (default; ``TextLoaderConfig``, pretraining MDS streams) or
    ``finetune`` (``FinetuneLoaderConfig``). ``None`` stays ``None``; config objects pass through."""
    from llmfoundry.data.text_loader import TextLoaderConfig

    if data is None or isinstance(data, (TextLoaderConfig, FinetuneLoaderConfig)):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{path}' must be a mapping of loader settings, got {data!r}")
    name = data.get("name", "text")
    if name == "finetune":
        return from_dict(FinetuneLoaderConfig, data, path)
    if name == "text":
        return from_dict(TextLoaderConfig, {k: v for k, v in data.items() if k != "name"}, path)
    raise ConfigError(f"config key '{path}.name' = {name!r} must be 'text' (pretraining MDS streams, the default) "
                      f"or 'finetune' (prompt/response or chat examples){closest(str(name), ['text', 'finetune'])}")


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class Example:
    """One example as text pieces: (text, trained) pairs, and where it came from (for messages)."""
    pieces: list[tuple[str, bool]]
    where: str
    chat: bool


def jsonl_files(paths: Sequence[str]) -> list[str]:
    """The JSON Lines files of ``data_files``: files as given, folders' ``*.jsonl`` sorted."""
    files = []
    for p in paths:
        p = os.path.expanduser(p)
        if os.path.isdir(p):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(p) for f in names
                           if f.endswith(".jsonl"))
            if not found:
                raise DataError(f"data_files: folder {p} holds no *.jsonl files")
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DataError(f"data_files: {os.path.abspath(p)} does not exist; list JSONL files or folders "
                            f"(${{bundled:finetune}} names the examples shipped in llmfoundry/assets/finetune)")
    return files


def _read_jsonl(paths: Sequence[str]) -> Iterator[tuple[Any, str]]:
    for path in jsonl_files(paths):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}, line {line_no}"
                try:
                    record = json.loads(line.rstrip("\r\n"))  # a cut-off line's error points into the line
                except json.JSONDecodeError as e:
                    hint = (" (a .json file holding one array is not JSON Lines: convert it with "
                            "`jq -c '.[]' in.json > out.jsonl`)" if line.strip() in ("[", "[{") else "")
                    record = DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}){hint}. Fix: one "
                                       f"JSON object per line")
                yield record, where


# datasets' packaged builders that read files given to them (load_dataset('json', data_files=...))
FILE_READERS = ("json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "xml")


def _open_hf(cfg: FinetuneLoaderConfig):
    import datasets

    label = f"Hugging Face dataset '{cfg.hf_dataset}'" + (f" ({cfg.hf_subset})" if cfg.hf_subset else "")
    local = os.path.expanduser(cfg.hf_dataset)
    if cfg.hf_dataset in FILE_READERS and not os.path.exists(local):
        raise DataError(f"hf_dataset '{cfg.hf_dataset}' is one of datasets' file readers, not a dataset: without "
                        f"data files it would read whatever lies in the working directory. Fix: for JSON Lines "
                        f"files set data_files: [FILE, ...] instead of hf_dataset; for other formats pass as hf_dataset "
                        f"a folder holding the files, or one written by Dataset.save_to_disk")
    try:
        if os.path.isdir(local) and is_saved_dataset(local):
            ds = datasets.load_from_disk(local)
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataError(f"{label} has no split '{cfg.split}'{closest(cfg.split, list(ds))}; splits: "
                                    f"{', '.join(ds)}. Fix: set split")
                ds = ds[cfg.split]
        else:
            ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_subset, split=cfg.split)
    except DataError:
        raise
    except Exception as e:  # offline, unknown name, unknown split, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not open {label}, split '{cfg.split}': {first}\nPass a folder written by "
                        f"save_to_disk, a local folder of data files, or a hub name (network access needed); or "
                        f"use data_files for JSONL files") from e
    return ds, f"{label} split '{cfg.split}'"


def _check_mds_columns(cfg: FinetuneLoaderConfig, where: str, columns: dict[str, str]) -> None:
    """A shard must hold examples: prompt and response, or messages (under their ``columns`` names)."""
    prompt, response, messages = (cfg.column(k) for k in ("prompt", "response", "messages"))
    if messages in columns or (prompt in columns and response in columns):
        return
    found = ", ".join(f"{n}: {e}" for n, e in columns.items())
    hint = ""
    if "tokens" in columns or "text" in columns:
        hint = " These are pretraining shards: read them with the text loader (leave out name: finetune)."
    elif "input_ids" in columns or "turns" in columns:
        hint = (" They look tokenized (e.g. by llm-foundry's convert_finetuning_dataset.py, with its tokenizer and "
                "template), which is not read here.")
    raise DataError(f"{where}: its shards hold no finetuning examples: found columns {{{found}}}, need '{prompt}' "
                    f"and '{response}' (str) or '{messages}' (json list of {{role, content}}).{hint} Fix: convert "
                    f"the JSON Lines with data_prep/convert_finetune_to_mds.py, or map other column names with "
                    f"columns: {{prompt: ..., response: ...}}")


def _read_mds(cfg: FinetuneLoaderConfig) -> Iterator[tuple[Any, str]]:
    from llmfoundry.data.text_loader import read_mds_samples

    yield from read_mds_samples(cfg.named_streams(), split=cfg.split, download_retry=cfg.download_retry,
                                download_timeout=cfg.download_timeout, s3_endpoint_url=cfg.s3_endpoint_url,
                                check_columns=lambda where, columns: _check_mds_columns(cfg, where, columns))


def _read_records(cfg: FinetuneLoaderConfig) -> Iterator[tuple[Any, str]]:
    """(record, where) pairs; a record that could not be read is a ``DataError`` instead."""
    if cfg.data_files is not None:
        yield from _read_jsonl(cfg.data_files)
        return
    if cfg.is_mds():
        yield from _read_mds(cfg)
        return
    ds, label = _open_hf(cfg)
    for row, record in enumerate(ds):
        yield record, f"{label}, row {row}"


def _field(record: Mapping, cfg: FinetuneLoaderConfig, name: str, where: str) -> Any:
    col = cfg.column(name)
    if col not in record:
        found = ", ".join(repr(k) for k in record) or "none"
        fix = (f"rename it with columns: {{{name}: <your field>}}" if name not in cfg.columns else
               f"columns maps '{name}' to '{col}', which this example lacks")
        raise DataError(f"{where}: missing field '{col}'{closest(col, [str(k) for k in record])} "
                        f"(fields found: {found}); {fix}")
    return record[col]


def _string(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def prompt_and_response(record: Mapping, cfg: FinetuneLoaderConfig, where: str) -> tuple[str, str]:
    """The checked (prompt, response) of a prompt/response record (``DataError`` naming ``where`` otherwise)."""
    prompt = _string(_field(record, cfg, "prompt", where), f"'{cfg.column('prompt')}'", where)
    response = _string(_field(record, cfg, "response", where), f"'{cfg.column('response')}'", where)
    if not response.strip():
        raise DataError(f"{where}: '{cfg.column('response')}' is empty; every example needs a response to train "
                        f"on (remove the example or fill it in)")
    return prompt, response


def parse_prompt_response(record: Mapping, cfg: FinetuneLoaderConfig, where: str) -> Example:
    prompt, response = prompt_and_response(record, cfg, where)
    return Example([(cfg.prompt_template.replace("{prompt}", prompt), False), (response, True)], where, chat=False)


def chat_turns(record: Mapping, cfg: FinetuneLoaderConfig, where: str) -> list[tuple[str, str]]:
    """The checked (role, content) turns of a chat record, roles mapped by ``role_names``."""
    messages = _field(record, cfg, "messages", where)
    key = cfg.column("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{key}' must be a non-empty list of {{role, content}} messages, got "
                        f"{messages!r:.60}")
    role_key, content_key = cfg.column("role"), cfg.column("content")
    turns = []
    for i, m in enumerate(messages):
        at = f"{where}, {key}[{i}]"
        if not isinstance(m, Mapping):
            raise DataError(f"{at}: a message must be an object with '{role_key}' and '{content_key}', got {m!r:.60}")
        raw_role = _string(_field(m, cfg, "role", at), f"'{role_key}'", at)
        role = cfg.role_names.get(raw_role, raw_role)
        content = _string(_field(m, cfg, "content", at), f"'{content_key}'", at)
        if role not in ROLES:
            raise DataError(f"{at}: role '{raw_role}' must be one of {', '.join(ROLES)}"
                            f"{closest(role, ROLES)}; map other names with role_names: {{{raw_role}: user}}")
        first = i == 0 or (i == 1 and turns[0][0] == "system")
        expected = "user" if first else ("assistant" if turns[-1][0] == "user" else "user")
        if role == "system" and i > 0:
            raise DataError(f"{at}: a system message may only come first")
        if role != "system" and role != expected:
            raise DataError(f"{at}: role '{role}' out of turn: after the optional system message, user and "
                            f"assistant messages alternate, starting with user (expected '{expected}')")
        if role == "assistant" and not content.strip():
            raise DataError(f"{at}: the assistant message is empty; every assistant turn needs text to train on")
        turns.append((role, content))
    if not any(r == "assistant" for r, _ in turns):
        raise DataError(f"{where}: no assistant message; a chat example needs at least one assistant turn to train "
                        f"on")
    return turns


def parse_chat(record: Mapping, cfg: FinetuneLoaderConfig, where: str) -> Example:
    pieces: list[tuple[str, bool]] = []
    for i, (role, content) in enumerate(chat_turns(record, cfg, where)):
        sep = "\n" if i else ""
        if role == "assistant":
            pieces.append((f"{sep}{IM_START}assistant\n", False))
            pieces.append((f"{content}{IM_END}", True))
        else:
            pieces.append((f"{sep}{IM_START}{role}\n{content}{IM_END}", False))
    return Example(pieces, where, chat=True)


def format_chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The text a chat model generates the next assistant turn from (stop generation at ``<|im_end|>``)."""
    turns = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}" for m in messages]
    return "\n".join(turns + [f"{IM_START}assistant\n"])


def _parsed(cfg: FinetuneLoaderConfig, parse) -> Iterator[Any]:
    """``parse(record, fmt, where)`` of every record of the source, in order (fmt: 'chat' or 'prompt_response';
    ``auto`` decides by the first record); malformed records stop it or are skipped (``malformed``), and
    ``max_examples`` ends it."""
    count, skipped = 0, []
    fmt = None if cfg.format == "auto" else cfg.format
    for record, where in _read_records(cfg):
        try:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, Mapping):
                raise DataError(f"{where}: an example must be a JSON object, got {type(record).__name__}")
            if cfg.record_format is not None:
                record = FORMATS[cfg.record_format](record, where)
            if fmt is None:
                fmt = "chat" if cfg.column("messages") in record else "prompt_response"
            parsed = parse(record, fmt, where)
        except DataError as e:
            if cfg.malformed == "error":
                raise
            skipped.append(str(e).split(". Fix")[0])
            continue
        yield parsed
        count += 1
        if cfg.max_examples is not None and count >= cfg.max_examples:
            break
    _counted_warning("are malformed and were skipped (malformed: skip)", skipped, count + len(skipped),
                     "Fix or remove them, or set malformed: error to stop at the first")
    if not count:
        raise DataError(f"no examples in {_source_name(cfg)}" + (f" ({len(skipped)} malformed ones skipped)"
                                                                   if skipped else ""))


def read_examples(cfg: FinetuneLoaderConfig) -> list[Example]:
    """Every example of the source, parsed and checked (``DataError`` naming file and line otherwise)."""
    return list(_parsed(cfg, lambda record, fmt, where: (parse_chat if fmt == "chat" else parse_prompt_response)(
        record, cfg, where)))


def canonical_records(cfg: FinetuneLoaderConfig) -> Iterator[dict[str, Any]]:
    """Every example of the source, checked as the loader checks it, with our field and role names:
    ``{'prompt': str, 'response': str}`` or ``{'messages': [{'role': ..., 'content': ...}, ...]}`` (what
    ``data_prep/convert_finetune_to_mds.py`` writes; read back with default ``columns`` and ``role_names``, they
    give the same examples)."""
    def canonical(record, fmt, where):
        if fmt == "chat":
            return {"messages": [{"role": r, "content": c} for r, c in chat_turns(record, cfg, where)]}
        prompt, response = prompt_and_response(record, cfg, where)
        return {"prompt": prompt, "response": response}

    yield from _parsed(cfg, canonical)


def _source_name(cfg: FinetuneLoaderConfig) -> str:
    if cfg.data_files is not None:
        return "data_files " + ", ".join(cfg.data_files)
    if cfg.streams:
        return "MDS streams " + ", ".join(f"{k} ({v.remote or v.local})" for k, v in cfg.streams.items()) + \
            f" split '{cfg.split}'"
    if cfg.is_mds():
        return f"MDS {cfg.remote or cfg.local} split '{cfg.split}'"
    return f"hf_dataset '{cfg.hf_dataset}' split '{cfg.split}'"


# ------------------------------------------------------------------------------------------------ tokenizing
def prompt_cutoff(target_prompts: str) -> int | None:
    """``target_prompts`` as a length: 0 (``all``: every prompt trained), None (``none``), or N (``length>=N``:
    prompts of at least N tokens trained); ValueError for anything else."""
    if target_prompts == "all":
        return 0
    if target_prompts == "none":
        return None
    m = re.fullmatch(r"length>=(\d+)", str(target_prompts).replace(" ", ""))
    if m is None:
        raise ValueError(f"target_prompts = {target_prompts!r} must be 'none' (prompts are not trained), 'all', or "
                         f"'length>=N' (prompts of at least N tokens are trained)")
    return int(m.group(1))


def trained_pieces(lengths: Sequence[int], responses: Sequence[bool], target_responses: str,
                   target_prompts: str) -> list[bool]:
    """Which pieces of an example are trained. ``responses`` marks the response pieces (an assistant turn's
    content); each maximal run of other pieces is one prompt (``lengths``: the pieces' token counts).
    ``target_responses``: ``all`` responses or the ``last`` one; ``target_prompts``: see ``prompt_cutoff``."""
    last = max((i for i, r in enumerate(responses) if r), default=-1)
    out = [r and (target_responses == "all" or i == last) for i, r in enumerate(responses)]
    cutoff = prompt_cutoff(target_prompts)
    if cutoff is not None:
        i = 0
        while i < len(responses):
            if responses[i]:
                i += 1
                continue
            j = i
            while j < len(responses) and not responses[j]:
                j += 1
            if sum(lengths[i:j]) >= cutoff:
                out[i:j] = [True] * (j - i)
            i = j
    return out


def _tokenize(examples: list[Example], tokenizer, cfg: FinetuneLoaderConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids int32, trained mask bool) per example. With ``add_eos`` an example whose tokens do not already
    end with EOS gets one, trained when the example ends with a trained response."""
    eos = tokenizer.eos_token_id
    if cfg.add_eos and eos is None:
        raise DataError("the tokenizer has no EOS token; set add_eos: false or use a tokenizer with one")
    texts = [t for ex in examples for t, _ in ex.pieces]
    ids: list[list[int]] = []
    for a in range(0, len(texts), 2048):
        ids.extend(tokenizer(texts[a:a + 2048], add_special_tokens=False)["input_ids"])
    out, k = [], 0
    for ex in examples:
        piece_ids = ids[k:k + len(ex.pieces)]
        k += len(ex.pieces)
        responses = [trained for _, trained in ex.pieces]
        trained = trained_pieces([len(x) for x in piece_ids], responses, cfg.target_responses, cfg.target_prompts)
        toks, mask = [], []
        for x, t in zip(piece_ids, trained):
            toks.extend(x)
            mask.extend([t] * len(x))
        if cfg.add_eos and (not toks or toks[-1] != eos):
            toks.append(eos)
            mask.append(responses[-1] and trained[-1])  # after a trained final response (chat: an assistant turn)
        out.append((np.asarray(toks, dtype=np.int32), np.asarray(mask, dtype=bool)))
    return out


def truncation_window(trained: np.ndarray, max_len: int, chat: bool, min_prompt: int,
                      min_response: int) -> tuple[int, int] | None:
    """The kept tokens ``[a, b)`` of one example under the rules of the module docstring, or None (refused).

    ``trained`` is the example's trained-token mask; its first trained token ends the prompt."""
    n = len(trained)
    if n <= max_len:
        return 0, n
    first = int(np.argmax(trained))  # prompt length: tokens before the first trained one
    keep_prompt = min(min_prompt, first)
    need = min(min_response, int(trained.sum()))
    if chat:  # cut from the right; cut the leading context only as far as `need` trained tokens require
        end = int(np.flatnonzero(trained)[need - 1]) + 1  # the window must reach the need-th trained token
        a = min(max(0, end - max_len), first - keep_prompt)
    else:  # cut the prompt from the left first, then the response from the right
        a = min(n - max_len, first - keep_prompt)
    b = a + max_len
    got = int(trained[a + 1:b].sum())  # the first token of a window is never trained
    if got < need or got == 0:
        return None
    return a, b


# ------------------------------------------------------------------------------------------------ packing
def pack_rows(lengths: Sequence[int], max_len: int, max_per_row: int | None, order: Sequence[int]) -> list[list[int]]:
    """Rows of example indices, each at most ``max_len`` tokens.

    ``max_per_row == 1``: one example per row, in ``order``. Otherwise best-fit decreasing: examples by length,
    longest first (ties in ``order``), each into the open row with the least room that still fits it."""
    if max_per_row == 1:
        return [[i] for i in order]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in sorted(order, key=lambda j: -lengths[j]):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
        else:
            r, room = len(rows), max_len
            rows.append([i])
        room -= n
        if room > 0 and (max_per_row is None or len(rows[r]) < max_per_row):
            bisect.insort(free, (room, r))
    return rows


# ------------------------------------------------------------------------------------------------ dataset
class FinetuneDataset(torch.utils.data.Dataset):
    """Rows of packed examples: ``self[i]`` = dict of unpadded int64 arrays ``input_ids``, ``labels``,
    ``sequence_id`` (the collator pads). Holds everything in flat numpy arrays."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, offsets: np.ndarray, rows: list[list[int]],
                 max_seq_len: int):
        self.tokens, self.labels, self.offsets = tokens, labels, offsets
        self.row_offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
        self.row_members = np.asarray([i for r in rows for i in r], dtype=np.int64)
        self.max_seq_len = max_seq_len
        self.num_examples = len(offsets) - 1

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def examples_of_row(self, i: int) -> list[int]:
        return self.row_members[self.row_offsets[i]:self.row_offsets[i + 1]].tolist()

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        ids, labels, seq = [], [], []
        for j, ex in enumerate(self.examples_of_row(i)):
            a, b = self.offsets[ex], self.offsets[ex + 1]
            ids.append(self.tokens[a:b])
            labels.append(self.labels[a:b])
            seq.append(np.full(b - a, j, dtype=np.int64))
        return {"input_ids": np.concatenate(ids).astype(np.int64), "labels": np.concatenate(labels).astype(np.int64),
                "sequence_id": np.concatenate(seq)}


@dataclass
class FinetuneCollator:
    """Right-pads rows to ``max_seq_len``: input_ids with ``pad_token_id``, labels -100, attention_mask 0, and
    sequence_id one past the row's last example."""
    max_seq_len: int
    pad_token_id: int

    def __call__(self, rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        b, s = len(rows), self.max_seq_len
        input_ids = torch.full((b, s), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, s), dtype=torch.long)
        sequence_id = torch.zeros((b, s), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.from_numpy(row["input_ids"])
            labels[i, :n] = torch.from_numpy(row["labels"])
            attention_mask[i, :n] = 1
            sequence_id[i, :n] = torch.from_numpy(row["sequence_id"])
            sequence_id[i, n:] = int(row["sequence_id"][-1]) + 1 if n else 0
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "sequence_id": sequence_id}


def _is_rank_zero() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def _counted_warning(what: str, locations: list[str], total: int, fix: str) -> None:
    if not locations or not _is_rank_zero():
        return
    named = "; ".join(locations[:MAX_NAMED]) + ("; ..." if len(locations) > MAX_NAMED else "")
    msg = f"{len(locations)} of {total} finetuning examples {what}: {named}. {fix}"
    log.warning(msg)
    warnings.warn(msg, stacklevel=3)


def build_finetune_dataset(cfg: FinetuneLoaderConfig, tokenizer) -> FinetuneDataset:
    """Read, check, tokenize, truncate and pack the whole source (the same on every rank)."""
    examples = read_examples(cfg)
    tokenized = _tokenize(examples, tokenizer, cfg)
    kept_tokens, kept_labels, lengths = [], [], []
    refused, truncated = [], []
    L = cfg.max_seq_len
    for ex, (toks, trained) in zip(examples, tokenized):
        if len(toks) > L:
            if cfg.too_long == "error":
                raise DataError(f"{ex.where}: {len(toks)} tokens, more than max_seq_len = {L}. Fix: raise "
                                f"max_seq_len, shorten or remove the example, or set too_long: truncate (or skip)")
            if cfg.too_long == "skip":
                window = None
            elif cfg.too_long == "truncate_end":  # the first max_seq_len tokens, if any of them is trained
                window = (0, L) if trained[1:L].any() else None
            else:
                window = truncation_window(trained, L, ex.chat, cfg.min_prompt_tokens, cfg.min_response_tokens)
            if window is None:
                refused.append(f"{ex.where} ({len(toks)} tokens)")
                continue
            truncated.append(ex.where)
            toks, trained = toks[window[0]:window[1]], trained[window[0]:window[1]]
        labels = np.where(trained, toks, IGNORE_INDEX).astype(np.int32)
        labels[0] = IGNORE_INDEX  # never predicted from a previous (packed) example
        kept_tokens.append(toks)
        kept_labels.append(labels)
        lengths.append(len(toks))
    n = len(examples)
    if cfg.too_long == "skip":
        _counted_warning(f"are longer than max_seq_len = {L} and were skipped (too_long: skip)", refused, n,
                         "Raise max_seq_len or set too_long: truncate to keep them")
    elif cfg.too_long == "truncate_end":
        _counted_warning(f"are longer than max_seq_len = {L} and have no trained token among their first {L}, so "
                         f"they were left out (too_long: truncate_end)", refused, n,
                         "Raise max_seq_len, shorten their prompts, or set too_long: truncate (keeps the response)")
    else:
        _counted_warning(f"are longer than max_seq_len = {L} and could not keep min_response_tokens = "
                         f"{cfg.min_response_tokens} trained tokens, so they were left out", refused, n,
                         "Raise max_seq_len, lower min_prompt_tokens / min_response_tokens, or shorten them")
    if truncated and _is_rank_zero():
        log.info("%d of %d finetuning examples were truncated to max_seq_len = %d (first: %s)", len(truncated), n,
                 L, truncated[0])
    if not kept_tokens:
        raise DataError(f"all {n} examples of {_source_name(cfg)} were left out as too long for max_seq_len = {L}; "
                        f"raise max_seq_len or set too_long: truncate")
    offsets = np.cumsum([0] + lengths).astype(np.int64)
    order = np.random.default_rng(cfg.shuffle_seed).permutation(len(lengths)).tolist() if cfg.shuffle else \
        list(range(len(lengths)))
    rows = pack_rows(lengths, L, cfg.max_per_row(), order)
    dataset = FinetuneDataset(np.concatenate(kept_tokens), np.concatenate(kept_labels), offsets, rows, L)
    if _is_rank_zero():
        total = int(offsets[-1])
        trained = int((dataset.labels != IGNORE_INDEX).sum())
        log.info("finetuning data %s: %d examples -> %d rows of %d tokens (%.2f examples per row, %.1f%% padding, "
                 "%.1f%% of tokens trained)", _source_name(cfg), len(lengths), len(rows), L, len(lengths) / len(rows),
                 100 * (1 - total / (len(rows) * L)), 100 * trained / max(total, 1))
    return dataset


def build_finetune_dataloader(cfg: FinetuneLoaderConfig, tokenizer, device_batch_size: int, *,
                              attn_uses_sequence_id: bool | None = None) -> torch.utils.data.DataLoader:
    """The loader for this rank (see the module docstring). ``tokenizer``: a HF tokenizer or a name for
    ``load_tokenizer``. ``attn_uses_sequence_id``: the model's setting, when known (a warning if packed examples
    would attend to each other)."""
    from torch.utils.data import DataLoader, DistributedSampler

    if device_batch_size < 1:
        raise ValueError(f"device_batch_size must be >= 1, got {device_batch_size}")
    if isinstance(tokenizer, str):
        from llmfoundry.data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer)
    if cfg.max_per_row() != 1 and attn_uses_sequence_id is False and _is_rank_zero():
        warnings.warn("packing_ratio packs several examples per row but model.attn_config.attn_uses_sequence_id is "
                      "false, so packed examples attend to each other; set it to true", stacklevel=2)
    dataset = build_finetune_dataset(cfg, tokenizer)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    rank = torch.distributed.get_rank() if distributed else 0
    if cfg.drop_last and len(dataset) < world * device_batch_size:
        raise DataError(f"{_source_name(cfg)} gives {len(dataset)} rows (after packing), fewer than one batch of "
                        f"{device_batch_size} per rank x {world} ranks; with drop_last: true nothing would be "
                        f"trained. Add examples, lower the batch size, or set drop_last: false")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=cfg.shuffle,
                                 seed=cfg.shuffle_seed, drop_last=cfg.drop_last)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    workers = cfg.num_workers > 0
    return DataLoader(dataset, batch_size=device_batch_size, sampler=sampler,
                      collate_fn=FinetuneCollator(cfg.max_seq_len, pad if pad is not None else 0),
                      num_workers=cfg.num_workers, drop_last=cfg.drop_last,
                      pin_memory=cfg.pin_memory and torch.cuda.is_available(),
                      prefetch_factor=cfg.prefetch_factor if workers else None,
                      persistent_workers=cfg.persistent_workers and workers,
                      generator=torch.Generator().manual_seed(cfg.shuffle_seed))  # not the global RNG: see text_loader
