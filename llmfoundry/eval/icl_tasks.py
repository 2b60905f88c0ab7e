"""ICL tasks: their YAML config, JSONL forms and validation, few-shot prompts.

The task-definition layer shared by both scorers: ``llmfoundry.eval.icl`` (log-likelihood scoring, and the
dispatcher ``evaluate_icl_task``) and ``llmfoundry.eval.icl_generation`` (generated answers). It imports neither.

Four task types, in llm-foundry's JSONL forms (extra keys on a line are ignored):

* ``language_modeling`` (LAMBADA-style): each line ``{"context": str, "continuation": str}``. An example is
  correct when the greedy (argmax) prediction at every continuation position equals the continuation token.
* ``multiple_choice`` (HellaSwag / PIQA / ARC-style): each line ``{"query": str, "choices": [str, ...],
  "gold": int}``. The model picks the choice whose continuation has the highest log-likelihood, optionally
  normalized by its length in tokens or characters (``length_normalization``).
* ``schema`` (Winograd / Winogrande-style): each line ``{"context_options": [str, ...], "continuation": str,
  "gold": int}``. The same continuation is scored after each context option (its tokens only); the model picks
  the option under which the continuation is most likely (summed log-probs). Shots show the gold option.
* ``generation_task_with_answers`` (TriviaQA / GSM8K-style): each line ``{"context": str, "answer": str,
  "aliases": [str, ...]}`` (``aliases`` optional). The model answers greedily (up to ``max_new_tokens``, until
  EOS or one of ``stop_sequences``); correct when the answer, cut at the first stop sequence (and, with
  ``cot_delimiter``, taken after its last occurrence) matches ``answer`` or an alias after ``normalize_answer``
  (lowercase, no punctuation, no a/an/the, single spaces). Scoring lives in ``llmfoundry.eval.icl_generation``;
  the other three types are scored in ``llmfoundry.eval.icl``.

Few-shot prompts (``build_prompt``): ``prompt_string``, then ``num_fewshot`` solved examples and the query, each
as ``context_prefix`` + context + ``continuation_delimiter`` (+ the answer, for a shot), with ``example_delimiter``
between each and the text before it (none at the very start). Shots are sampled with a fixed seed per
(task, query), never include the query itself, and are the same whatever the batch size or device
(``fewshot_indices``). A task file in the wrong form is refused with one message naming the file, the line, what
is wrong and the fix (``load_task_examples``).
"""
from __future__ import annotations

import inspect
import json
import random
import string
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds `llmfoundry/`
BUNDLED_ICL_DIR = Path(__file__).resolve().parents[1] / "assets" / "icl"


@dataclass
class ICLTaskConfig:
    """One ICL task (YAML: an entry of ``icl_tasks:``)."""
    label: str
    path: str  # local JSONL; relative paths are tried from the working directory, then the repository root
    type: Literal["language_modeling", "multiple_choice", "schema", "generation_task_with_answers"]
    num_fewshot: list[int] = field(default_factory=lambda: [0])
    example_delimiter: str = "\n"
    continuation_delimiter: str = " "
    prompt_string: str = ""
    context_prefix: str = ""  # before every context, the shots' and the query's (llm-foundry's prelimiter)
    fewshot_seed: int = 1234
    length_normalization: Literal["none", "tokens", "chars"] = "tokens"  # multiple_choice only
    max_examples: Optional[int] = None  # evaluate only the first N examples (shots still come from the whole file)
    batch_size: Optional[int] = None  # rows (context + one continuation) per forward; default: EvalConfig's
    # generation_task_with_answers only:
    max_new_tokens: int = 32  # tokens generated per answer at most
    stop_sequences: list[str] = field(default_factory=lambda: ["\n"])  # the answer ends at the first of these
    cot_delimiter: str = ""  # chain of thought: compare only the text after its last occurrence ("" = all of it)

    def __post_init__(self):
        if not self.num_fewshot or any(k < 0 for k in self.num_fewshot):
            raise ValueError(f"icl task '{self.label}': num_fewshot must be a non-empty list of integers >= 0, "
                             f"got {self.num_fewshot}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"icl task '{self.label}': max_examples must be >= 1 or null")
        if self.max_new_tokens < 1:
            raise ValueError(f"icl task '{self.label}': max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop_sequences):
            raise ValueError(f"icl task '{self.label}': stop_sequences holds an empty string, which would cut every "
                             "answer to nothing; remove it (an empty list stops at EOS / max_new_tokens only)")


# ----------------------------------------------------------------------------------------------------------------
# Task files

# The keys each task type needs on every line (generation_task_with_answers may also have "aliases": [str, ...]).
_REQUIRED = {
    "language_modeling": ("context", "continuation"),
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "generation_task_with_answers": ("context", "answer"),
}
TASK_TYPES = tuple(_REQUIRED)
_TELLTALE = {  # keys that give a task type away, most specific first
    "schema": ("context_options",), "multiple_choice": ("query", "choices"),
    "generation_task_with_answers": ("answer", "aliases"), "language_modeling": ("context", "continuation"),
}


def resolve_task_path(path: str) -> Path:
    """``path`` as given, else relative to the repository root, else a bundled task file of that name."""
    p = Path(path).expanduser()
    for candidate in (p, PACKAGE_ROOT / p, BUNDLED_ICL_DIR / p.name):
        if candidate.is_file():
            return candidate
    bundled = sorted(x.name for x in BUNDLED_ICL_DIR.glob("*.jsonl"))
    raise FileNotFoundError(f"ICL task file '{path}' not found (looked in the working directory, {PACKAGE_ROOT} and "
                            f"{BUNDLED_ICL_DIR}); fix the task's 'path' (bundled task files: {', '.join(bundled)})")


def guess_task_type(ex: dict) -> Optional[str]:
    """The task type whose keys ``ex`` has (None when no type's keys are all there)."""
    for task_type, telltale in _TELLTALE.items():
        if any(k in ex for k in telltale) and all(k in ex for k in _REQUIRED[task_type]):
            return task_type
    return None


def _string_list(value: Any, min_len: int) -> bool:
    return isinstance(value, list) and len(value) >= min_len and all(isinstance(v, str) for v in value)


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def example_problem(ex: Any, task_type: str) -> Optional[str]:
    """What is wrong with one parsed line for ``task_type``, with the fix; None when it is fine."""
    keys = list(_REQUIRED[task_type])
    if not isinstance(ex, dict):
        return (f"expected a JSON object, got a {type(ex).__name__}; write one object per line with keys {keys}")
    missing = [k for k in keys if k not in ex]
    if missing:
        other = guess_task_type(ex)
        if other is not None and other != task_type:
            found = "/".join(f"'{k}'" for k in _REQUIRED[other] if k in ex)
            return (f"the line has {found}: this is a {other} file, not {task_type}; set type: {other} (or point the "
                    f"task's path at a {task_type} file, whose lines have keys {keys})")
        return f"a {task_type} example needs keys {keys}, missing {missing}; add them or check the task's type"
    for k in keys:
        if k in ("choices", "context_options", "gold"):
            continue
        if not isinstance(ex[k], str):
            return f"'{k}' must be a string, got {type(ex[k]).__name__} {json.dumps(ex[k])[:60]}; quote it"
    if task_type in ("multiple_choice", "schema"):
        options = "choices" if task_type == "multiple_choice" else "context_options"
        if not _string_list(ex[options], 2):
            got = "an empty list" if ex[options] == [] else json.dumps(ex[options])[:60]
            return f"'{options}' must be a list of at least 2 strings, got {got}; give every option as a string"
        gold = ex["gold"]
        if not _index(gold) or not 0 <= gold < len(ex[options]):
            return (f"'gold' must be an index into '{options}' (0..{len(ex[options]) - 1}), got {gold!r}; "
                    f"give the 0-based position of the correct option")
    if task_type == "generation_task_with_answers":
        aliases = ex.get("aliases", [])
        if not _string_list(aliases, 0):
            return (f"'aliases' must be a list of strings, got {json.dumps(aliases)[:60]}; write e.g. "
                    '"aliases": ["one answer", "another"] (or leave it out)')
        if not normalize_answer(ex["answer"]):
            return (f"'answer' {ex['answer']!r} is empty once normalised (lowercase, no punctuation, no a/an/the), so "
                    "nothing could match it; give the answer's words")
    return None


def load_task_examples(path: str, task_type: str) -> list[dict[str, Any]]:
    """Read and validate a task file: one message naming the file, the line, what is wrong and the fix."""
    if task_type not in _REQUIRED:
        raise ValueError(f"unknown ICL task type '{task_type}'; use one of {list(TASK_TYPES)}")
    file = resolve_task_path(path)
    examples = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object")
            problem = example_problem(ex, task_type)
            if problem is not None:
                raise ValueError(f"{file}:{lineno}: {problem}")
            examples.append(ex)
    if not examples:
        raise ValueError(f"ICL task file {file} is empty: it has no examples; "
                         f"write one JSON object per line with keys {list(_REQUIRED[task_type])}")
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Answers

_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace: ``'The Def.'`` -> ``'def'``."""
    text = "".join(ch for ch in text.lower()
                   if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    return " ".join(w for w in text.split() if w not in _ARTICLES)


# ----------------------------------------------------------------------------------------------------------------
# Prompts

def _context(ex: dict, task_type: str, option: Optional[int] = None) -> str:
    """The text a task's answer follows: the query, the context, or (schema) context option ``option``."""
    if task_type == "multiple_choice":
        return ex["query"]
    if task_type == "schema":
        return ex["context_options"][ex["gold"] if option is None else option]
    return ex["context"]


def _answer(ex: dict, task_type: str) -> str:
    """The gold answer text, as shown in a solved few-shot example."""
    if task_type == "multiple_choice":
        return ex["choices"][ex["gold"]]
    return ex["answer"] if task_type == "generation_task_with_answers" else ex["continuation"]


def _solved(ex: dict, task_type: str, cont_delim: str) -> str:
    return _context(ex, task_type) + cont_delim + _answer(ex, task_type)


def fewshot_indices(num_examples: int, query_index: int, num_fewshot: int, seed: int) -> list[int]:
    """``num_fewshot`` distinct example indices other than ``query_index``, fixed by ``seed`` and the query."""
    if num_fewshot == 0:
        return []
    if num_fewshot > num_examples - 1:
        raise ValueError(f"num_fewshot={num_fewshot} needs at least {num_fewshot + 1} examples in the task file, "
                         f"it has {num_examples}; lower num_fewshot or use a larger task file")
    rng = random.Random(seed * 1_000_003 + query_index)
    pool = [i for i in range(num_examples) if i != query_index]
    return rng.sample(pool, num_fewshot)


def build_prompt(cfg: ICLTaskConfig, examples: Sequence[dict], query_index: int, num_fewshot: int,
                 option: Optional[int] = None) -> str:
    """The context string for query ``query_index``: prompt string, solved shots, the query, the delimiter.
    For ``schema`` tasks ``option`` picks the context option that ends the prompt (default: the gold one)."""
    shots = fewshot_indices(len(examples), query_index, num_fewshot, cfg.fewshot_seed)
    text = cfg.prompt_string
    pieces = [_solved(examples[i], cfg.type, cfg.continuation_delimiter) for i in shots]
    pieces.append(_context(examples[query_index], cfg.type, option) + cfg.continuation_delimiter)
    for piece in pieces:  # the delimiter separates each context from any text before it, the prompt string too
        text += (cfg.example_delimiter if text else "") + cfg.context_prefix + piece
    return text


def num_evaluated(cfg: ICLTaskConfig, examples: Sequence[dict]) -> int:
    """How many examples (from the front of the file) are evaluated: all, or ``max_examples``."""
    return len(examples) if cfg.max_examples is None else min(cfg.max_examples, len(examples))


def random_baseline(cfg: ICLTaskConfig) -> float:
    """Expected accuracy of uniform guessing (0 for language modeling and generation)."""
    if cfg.type in ("language_modeling", "generation_task_with_answers"):
        return 0.0
    ex = load_task_examples(cfg.path, cfg.type)
    options = "choices" if cfg.type == "multiple_choice" else "context_options"
    n = num_evaluated(cfg, ex)
    return sum(1 / len(e[options]) for e in ex[:n]) / n


# ----------------------------------------------------------------------------------------------------------------
# Models (shared by every scorer: icl, icl_generation and perplexity)

def splits_head(model) -> bool:
    """Whether ``model`` can return hidden states and apply its head separately (our MPTForCausalLM): then
    logits are computed only where they are needed (a 50k vocabulary makes full logits large)."""
    try:
        return callable(getattr(model, "logits", None)) and \
            "return_hidden" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


__all__ = ["ICLTaskConfig", "TASK_TYPES", "resolve_task_path", "guess_task_type", "example_problem",
           "load_task_examples", "normalize_answer", "fewshot_indices", "build_prompt", "num_evaluated",
           "random_baseline", "splits_head"]
