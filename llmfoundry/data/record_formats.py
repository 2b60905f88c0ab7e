"""Record formats of well-known public instruction datasets -> ``{'prompt': str, 'response': str}``.

A finetuning loader with ``record_format: NAME`` rewrites every record with ``FORMATS[NAME]`` before reading it as a
prompt/response example (llmfoundry/data/finetune.py). These are the datasets llm-foundry's finetuning YAMLs name
by ``hf_name`` and reformat with functions it registers under those names; its dialect maps them here
(llmfoundry/train/foundry_dialect.py), so such a YAML builds the same examples.

======================  ==========================================  =============================================
name                    fields read                                 example built
======================  ==========================================  =============================================
``dolly``               ``instruction``, ``input``, ``output``      the MPT-7B-Instruct prompt around the
                        (HuggingFaceH4/databricks_dolly_15k)        instruction (and the input on the next line
                                                                    when there is one); the output is the response
``alpaca_text``         ``text`` (tatsu-lab/alpaca)                 the text up to and including its first
                                                                    ``### Response:`` is the prompt, the rest the
                                                                    response
``p3``                  ``inputs``, ``targets`` (bigscience/P3)     prompt ``inputs + ':'``, response ``targets``
``inputs_targets``      ``inputs``, ``targets`` (Muennighoff/P3,    prompt ``inputs``, response ``targets``, with a
                        Muennighoff/flan)                           space between them unless either side has one
======================  ==========================================  =============================================
"""
from __future__ import annotations

from typing import Callable, Mapping

from llmfoundry.data import DataError

INSTRUCT_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
RESPONSE_MARK = "### Response:"


def _text(record: Mapping, key: str, where: str, name: str) -> str:
    if key not in record:
        raise DataError(f"{where}: record_format {name} needs the field '{key}'; this record has "
                        f"{sorted(record)}. Fix: the right record_format for this data, or none (columns: ...)")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string for record_format {name}, got {type(value).__name__}")
    return value


def dolly(record: Mapping, where: str) -> dict[str, str]:
    instruction = _text(record, "instruction", where, "dolly")
    extra = _text(record, "input", where, "dolly") if "input" in record else ""
    if extra:
        instruction = f"{instruction}\n{extra}"
    return {"prompt": INSTRUCT_PROMPT.format(instruction=instruction), "response": _text(record, "output", where,
                                                                                          "dolly")}


def alpaca_text(record: Mapping, where: str) -> dict[str, str]:
    text = _text(record, "text", where, "alpaca_text")
    cut = text.find(RESPONSE_MARK)
    if cut < 0 or text.find(RESPONSE_MARK, cut + 1) >= 0:
        raise DataError(f"{where}: record_format alpaca_text needs exactly one '{RESPONSE_MARK}' in 'text' to split "
                        f"the prompt from the response; found {text.count(RESPONSE_MARK)}")
    cut += len(RESPONSE_MARK)
    return {"prompt": text[:cut], "response": text[cut:]}


def p3(record: Mapping, where: str) -> dict[str, str]:
    return {"prompt": _text(record, "inputs", where, "p3") + ":", "response": _text(record, "targets", where, "p3")}


def inputs_targets(record: Mapping, where: str) -> dict[str, str]:
    prompt = _text(record, "inputs", where, "inputs_targets")
    response = _text(record, "targets", where, "inputs_targets")
    if not (prompt.endswith((" ", "\n", "\t")) or response.startswith((" ", "\n", "\t"))):
        response = " " + response
    return {"prompt": prompt, "response": response}


FORMATS: dict[str, Callable[[Mapping, str], dict[str, str]]] = {
    "dolly": dolly, "alpaca_text": alpaca_text, "p3": p3, "inputs_targets": inputs_targets}

# the hub datasets llm-foundry reformats by name -> the format that does the same here
FOUNDRY_DATASETS = {"HuggingFaceH4/databricks_dolly_15k": "dolly", "tatsu-lab/alpaca": "alpaca_text",
                    "bigscience/P3": "p3", "Muennighoff/P3": "inputs_targets", "Muennighoff/flan": "inputs_targets"}
