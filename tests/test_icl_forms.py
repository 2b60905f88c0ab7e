"""The schema and generation_task_with_answers ICL task types: scoring checked against direct computations with a
tiny MPT's forward, answer normalisation, stop sequences, aliases, scripts/eval.py end to end, wrong-form errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_eval import model, write_jsonl  # noqa: F401 - test_eval's tiny model fixture and JSONL writer

from llmfoundry.checkpoint import save_composer_weights
from llmfoundry.eval.evaluate import main
from llmfoundry.eval.icl import build_requests, evaluate_icl_task
from llmfoundry.eval.icl_generation import extract_answer, generation_prompts, greedy_generate, is_correct
from llmfoundry.eval.icl_tasks import (ICLTaskConfig, build_prompt, fewshot_indices, load_task_examples,
                                       normalize_answer, random_baseline)
from llmfoundry.utils.config import ConfigError, from_dict

REPO = Path(__file__).resolve().parents[1]
ICL = REPO / "llmfoundry" / "assets" / "icl"
SCHEMA = str(ICL / "schema_tiny.jsonl")
QA = str(ICL / "qa_tiny.jsonl")
GEN = "generation_task_with_answers"


# ------------------------------------------------------------------------------------------------------ schema
def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """One unpadded forward over context + continuation: the summed log-probs of the continuation's tokens."""
    ctx = tok(context)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), dim=-1)
    return logp[torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont)), torch.tensor(cont)].sum().item()


def test_schema_picks_the_context_under_which_the_continuation_is_likeliest(model, tok):
    examples = load_task_examples(SCHEMA, "schema")
    cfg = ICLTaskConfig(label="schema", path=SCHEMA, type="schema", num_fewshot=[0, 2], batch_size=3)
    rows = evaluate_icl_task(model, tok, cfg, max_seq_len=128, batch_size=5)
    assert [r["num_fewshot"] for r in rows] == [0, 2]
    for row in rows:
        k = row["num_fewshot"]
        expected = []
        for i, ex in enumerate(examples):
            # written out here: shots show the gold context option, then the query's option, the same continuation
            shots = "".join(examples[s]["context_options"][examples[s]["gold"]] + " " + examples[s]["continuation"]
                            + "\n" for s in fewshot_indices(len(examples), i, k, cfg.fewshot_seed))
            lls = [continuation_logprob(model, tok, shots + option, " " + ex["continuation"])
                   for option in ex["context_options"]]
            expected.append(int(np.argmax(lls)))
        assert row["predictions"] == expected, k
        assert row["accuracy"] == pytest.approx(np.mean([p == ex["gold"] for p, ex in zip(expected, examples)]))
        assert row["type"] == "schema" and row["num_examples"] == len(examples) == 16
    # every option of an example is followed by the same continuation tokens; only those are scored
    requests = build_requests(cfg, examples, tok, 2, max_seq_len=128)
    assert len(requests) == sum(len(ex["context_options"]) for ex in examples)
    for i, ex in enumerate(examples):
        conts = {tuple(r.continuation) for r in requests if r.example == i}
        assert conts == {tuple(tok(" " + ex["continuation"], add_special_tokens=False)["input_ids"])}
    prompt = build_prompt(cfg, examples, 0, 1, option=1)
    s = fewshot_indices(len(examples), 0, 1, cfg.fewshot_seed)[0]
    assert prompt == (examples[s]["context_options"][examples[s]["gold"]] + " " + examples[s]["continuation"] + "\n"
                      + examples[0]["context_options"][1] + " ")
    assert random_baseline(cfg) == 0.5


# -------------------------------------------------------------------------------------------------- generation
def direct_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """Reference decoding: one row, no padding, no KV cache, the whole sequence through the model at every step."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
    return out


def test_greedy_generation_equals_a_direct_greedy_loop(model, tok):
    examples = load_task_examples(QA, GEN)
    cfg = ICLTaskConfig(label="qa", path=QA, type=GEN, num_fewshot=[0, 2], max_new_tokens=10)
    prompts = generation_prompts(cfg, examples, tok, 2, 128)[0] + generation_prompts(cfg, examples, tok, 0, 128)[0]
    assert len({len(p) for p in prompts}) > 3  # rows of different lengths: left padding is exercised
    direct = [direct_greedy(model, p, 10, tok.eos_token_id) for p in prompts]
    batched = greedy_generate(model, prompts, 10, pad_token_id=0, eos_token_id=tok.eos_token_id)
    assert batched == direct
    for batch_size in (1, 5):  # the task's predictions: the direct generations, cut at the first newline
        rows = evaluate_icl_task(model, tok, cfg, max_seq_len=128, batch_size=batch_size)
        for row in rows:
            gens = [direct_greedy(model, p, 10, tok.eos_token_id)
                    for p in generation_prompts(cfg, examples, tok, row["num_fewshot"], 128)[0]]
            assert row["predictions"] == [tok.decode(g).split("\n")[0].strip() for g in gens]
            assert row["accuracy"] == np.mean([is_correct(p, [e["answer"], *e.get("aliases", [])])
                                               for p, e in zip(row["predictions"], examples)])
    # the prompt is the solved shots and the question, its trailing space left for the model to write
    text = build_prompt(cfg, examples, 3, 2)
    assert text.endswith(examples[3]["context"] + " ") and examples[3]["answer"] not in text[-20:]
    assert generation_prompts(cfg, examples, tok, 2, 128)[0][3] == tok(text.rstrip(" "))["input_ids"]


def test_transformers_model_gives_the_same_answers(model, tok, tmp_path):
    from transformers import MptForCausalLM  # its own KV cache and full-logits forward
    model.save_pretrained(str(tmp_path / "hf"))
    theirs = MptForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    cfg = ICLTaskConfig(label="qa", path=QA, type=GEN, num_fewshot=[2], max_new_tokens=6)
    assert (evaluate_icl_task(theirs, tok, cfg, max_seq_len=128, batch_size=4)[0]["predictions"]
            == evaluate_icl_task(model, tok, cfg, max_seq_len=128, batch_size=4)[0]["predictions"])


@pytest.mark.parametrize("prediction, answer, match", [
    ("The Def.", "def", True), ("  an   Apple! ", "apple", True), ("DICT", "dict", True),
    ("“lambda”", "lambda", True), ("theory", "ory", False), ("def x", "def", False), ("", "def", False),
])
def test_answer_normalisation(prediction, answer, match):
    assert is_correct(prediction, [answer]) is match
    assert normalize_answer("The  Quick,  brown fox. A cat; an owl!") == "quick brown fox cat owl"


def test_stop_sequences_and_chain_of_thought():
    assert extract_answer(" def\nQ: What keyword", ["\n"]) == "def"
    assert extract_answer(" 42. Next question", ["\n", ".", "Next"]) == "42"  # the earliest stop sequence wins
    assert extract_answer(" no stop here ", ["\n"]) == "no stop here"
    assert extract_answer("\nanswer", ["\n"]) == ""
    cot = " 3 apples and 4 more make 7. The answer is 7\n\nQ:"
    assert extract_answer(cot, ["\n\n"], "The answer is") == "7"
    assert extract_answer(" is 2, no, The answer is 3 The answer is 4", [], "The answer is") == "4"  # the last one
    assert extract_answer(" just 5", ["\n"], "The answer is") == "just 5"  # never written: the whole answer


def test_alias_stop_sequence_and_cot_end_to_end(model, tok, tmp_path):
    """Answers built from the model's own greedy output: matched through an alias, cut at a stop sequence taken from
    the middle of a generation, and read after a chain-of-thought delimiter."""
    contexts = ["Q: What keyword defines a function?\nA:", "Q: What is 2 + 3?\nA:", "def main(", "import os\nimport"]
    gens = [tok.decode(direct_greedy(model, tok(c)["input_ids"], 8, tok.eos_token_id)) for c in contexts]
    keep = [(c, g) for c, g in zip(contexts, gens) if len(normalize_answer(g).split()) >= 2]
    assert len(keep) >= 2, gens
    cfg = dict(label="t", type=GEN, num_fewshot=[0], max_new_tokens=8, continuation_delimiter="", stop_sequences=[])

    def run(rows, **over):
        path = write_jsonl(tmp_path / "t.jsonl", rows)
        return evaluate_icl_task(model, tok, ICLTaskConfig(path=path, **{**cfg, **over}), max_seq_len=128)[0]

    row = run([{"context": c, "answer": "zzz qqq", "aliases": ["nope", g]} for c, g in keep])
    assert row["accuracy"] == 1.0 and row["predictions"] == [g.strip() for _, g in keep]
    assert run([{"context": c, "answer": "zzz qqq"} for c, _ in keep])["accuracy"] == 0.0
    c, g = keep[0]
    stop = g.split()[-1]  # the generation's last word as a stop sequence: the answer is what comes before it
    cut = g[:g.find(stop)].strip()
    row = run([{"context": c, "answer": cut if normalize_answer(cut) else "zzz"}], stop_sequences=["\n\n", stop])
    assert row["predictions"] == [cut] and row["accuracy"] == float(bool(normalize_answer(cut)))
    delim = g.split()[0]  # chain of thought: only the text after the last occurrence of the delimiter counts
    after = g.rsplit(delim, 1)[-1].strip()
    row = run([{"context": c, "answer": after if normalize_answer(after) else "zzz"}], cot_delimiter=delim)
    assert row["predictions"] == [after] and row["accuracy"] == float(bool(normalize_answer(after)))


def test_long_prompts_leave_room_for_the_answer(model, tok, caplog):
    cfg = ICLTaskConfig(label="qa", path=QA, type=GEN, num_fewshot=[3], max_new_tokens=8)
    with caplog.at_level("WARNING", logger="llmfoundry.eval.icl_generation"):
        row = evaluate_icl_task(model, tok, cfg, max_seq_len=40)[0]
    assert 0 < row["truncated_examples"] <= 16
    assert "were answered from their last 32 tokens" in caplog.records[-1].getMessage()
    with pytest.raises(ValueError, match=r"max_new_tokens=40 leaves no room for the prompt in the model's "
                                         r"max_seq_len=40; lower max_new_tokens"):
        evaluate_icl_task(model, tok, ICLTaskConfig(**{**cfg.__dict__, "max_new_tokens": 40}), max_seq_len=40)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("formsckpt")
    return save_composer_weights(model.state_dict(), model.config, str(d / "w.pt"), tokenizer="bundled")


def test_eval_script_reports_both_new_task_types(ckpt, tmp_path, capsys, caplog):
    out = tmp_path / "eval.json"
    with caplog.at_level("INFO", logger="llmfoundry.eval.evaluate"):
        rc = main([str(REPO / "yamls/eval/tiny-cpu.yaml"), f"load_path={ckpt}", f"results_path={out}",
                   "eval_loaders=null", "icl_tasks.0=null", "icl_tasks.1=null", "icl_tasks.2=null",
                   "icl_tasks.4=null", "icl_tasks.6.max_new_tokens=6"])
    table = capsys.readouterr().out
    assert rc == 0
    for task, shots in (("piqa_tiny", 0), ("schema_tiny", 0), ("schema_tiny", 2), ("qa_tiny", 0), ("qa_tiny", 2)):
        assert f"| {task} | {shots} | accuracy |" in table, table
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("schema_tiny 2-shot: accuracy ") for m in logged)
    assert any(m.startswith("qa_tiny 0-shot: accuracy ") for m in logged)
    saved = {(r["task"], r["num_fewshot"]): r for r in json.loads(out.read_text())["icl"]}
    assert set(saved) == {("piqa_tiny", 0), ("schema_tiny", 0), ("schema_tiny", 2), ("qa_tiny", 0), ("qa_tiny", 2)}
    for (task, _), r in saved.items():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["num_examples"] >= 10
    assert saved["schema_tiny", 0]["type"] == "schema" and saved["schema_tiny", 0]["random_baseline"] == 0.5
    assert all(isinstance(p, int) for p in saved["schema_tiny", 2]["predictions"])
    assert saved["qa_tiny", 2]["type"] == GEN and saved["qa_tiny", 2]["random_baseline"] == 0.0
    assert all(isinstance(p, str) and "\n" not in p for p in saved["qa_tiny", 2]["predictions"])


# ------------------------------------------------------------------------------------------- wrong-form files
GOOD = {"schema": {"context_options": ["a x", "a y"], "continuation": "z.", "gold": 0},
        "multiple_choice": {"query": "q", "choices": ["a", "b"], "gold": 1},
        GEN: {"context": "Q: q\nA:", "answer": "def", "aliases": ["d"]},
        "language_modeling": {"context": "c", "continuation": "d"}}


@pytest.mark.parametrize("task_type, line, message", [
    ("schema", GOOD["multiple_choice"], "the line has 'query'/'choices'/'gold': this is a multiple_choice file, not "
     "schema; set type: multiple_choice (or point the task's path at a schema file, whose lines have keys "
     "['context_options', 'continuation', 'gold'])"),
    ("multiple_choice", GOOD["schema"], "the line has 'context_options'/'continuation'/'gold': this is a schema file, "
     "not multiple_choice; set type: schema"),
    (GEN, GOOD["language_modeling"], "the line has 'context'/'continuation': this is a language_modeling file, not "
     "generation_task_with_answers; set type: language_modeling"),
    ("language_modeling", GOOD[GEN], "the line has 'context'/'answer': this is a generation_task_with_answers file, "
     "not language_modeling; set type: generation_task_with_answers"),
    ("schema", {"context_options": ["a", "b"], "gold": 0}, "a schema example needs keys ['context_options', "
     "'continuation', 'gold'], missing ['continuation']; add them or check the task's type"),
    ("schema", {**GOOD["schema"], "gold": 2}, "'gold' must be an index into 'context_options' (0..1), got 2; give the "
     "0-based position of the correct option"),
    ("schema", {**GOOD["schema"], "gold": True}, "'gold' must be an index into 'context_options' (0..1), got True"),
    ("schema", {**GOOD["schema"], "context_options": []}, "'context_options' must be a list of at least 2 strings, "
     "got an empty list; give every option as a string"),
    ("schema", {**GOOD["schema"], "context_options": ["a", 3]}, "'context_options' must be a list of at least 2 "
     "strings, got [\"a\", 3]"),
    ("schema", {**GOOD["schema"], "continuation": 5}, "'continuation' must be a string, got int 5; quote it"),
    (GEN, {**GOOD[GEN], "answer": 42}, "'answer' must be a string, got int 42; quote it"),
    (GEN, {**GOOD[GEN], "aliases": "d"}, "'aliases' must be a list of strings, got \"d\"; write e.g. "
     "\"aliases\": [\"one answer\", \"another\"] (or leave it out)"),
    (GEN, {**GOOD[GEN], "answer": "The."}, "'answer' 'The.' is empty once normalised (lowercase, no punctuation, no "
     "a/an/the), so nothing could match it; give the answer's words"),
    (GEN, ["Q: q", "def"], "expected a JSON object, got a list; write one object per line with keys ['context', "
     "'answer']"),
])
def test_wrong_form_is_one_message_with_file_line_and_fix(tmp_path, task_type, line, message):
    path = write_jsonl(tmp_path / "task.jsonl", [GOOD[task_type], GOOD[task_type], line])
    with pytest.raises(ValueError) as e:
        load_task_examples(path, task_type)
    assert str(e.value).startswith(f"{path}:3: {message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_the_bundled_files_and_a_wrong_type_through_the_cli(ckpt, capsys):
    assert len(load_task_examples(SCHEMA, "schema")) == len(load_task_examples(QA, GEN)) == 16
    rc = main([str(REPO / "yamls/eval/tiny-cpu.yaml"), f"load_path={ckpt}", "results_path=null", "eval_loaders=null",
               f"icl_tasks=[{{label: s, path: {QA}, type: schema}}]"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {QA}:1: the line has 'context'/'answer': this is a generation_task_with_answers "
                          "file, not schema; set type: generation_task_with_answers"), err


@pytest.mark.parametrize("fields, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"stop_sequences": ["\n", ""]}, "stop_sequences holds an empty string"),
    ({"type": "code_evaluation"}, "icl_tasks.type"),
])
def test_task_config_errors(fields, message):
    with pytest.raises(ConfigError) as e:
        from_dict(ICLTaskConfig, {"label": "x", "path": QA, "type": GEN, **fields}, path="icl_tasks")
    assert message in str(e.value), str(e.value)
