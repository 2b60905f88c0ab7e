"""Evaluation: ICL scoring against hand-computed log-likelihoods, few-shot prompts, perplexity, evaluate(cfg)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmfoundry.checkpoint import save_composer_weights
from llmfoundry.data.tokenizer import load_tokenizer
from llmfoundry.eval.evaluate import EvalConfig, evaluate, load_eval_config, main
from llmfoundry.eval.icl import build_requests, evaluate_icl_task
from llmfoundry.eval.icl_tasks import ICLTaskConfig, build_prompt, fewshot_indices, load_task_examples
from llmfoundry.eval.perplexity import evaluate_perplexity
from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM
from llmfoundry.utils.config import ConfigError, from_dict

REPO = Path(__file__).resolve().parents[1]
ICL = REPO / "llmfoundry" / "assets" / "icl"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=4096,
                    init_config={"name": "normal_", "init_std": 0.2})
    return MPTForCausalLM(cfg).eval()


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def continuation_logprob(model, tok, context: str, continuation: str) -> tuple[float, int, bool]:
    """Independent reference: one unpadded forward over context + continuation; (sum log p, n tokens, greedy ok)."""
    ctx = tok(context)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    rows = logp[len(ctx) - 1:len(ctx) - 1 + len(cont)]
    target = torch.tensor(cont)
    return rows[torch.arange(len(cont)), target].sum().item(), len(cont), bool((rows.argmax(-1) == target).all())


def test_multiple_choice_picks_argmax_of_independent_logprobs(model, tok):
    base = dict(label="hs", path=str(ICL / "hellaswag_tiny.jsonl"), type="multiple_choice", num_fewshot=[0, 2])
    examples = load_task_examples(base["path"], base["type"])
    reference = {}  # (shots, example) -> [(sum log p, tokens, chars) per choice], one unpadded forward each
    for shots in base["num_fewshot"]:
        for i, ex in enumerate(examples):
            prompt = build_prompt(ICLTaskConfig(**base), examples, i, shots)
            assert prompt.endswith(ex["query"] + " ")
            # the prompt's trailing space belongs to the continuation (one BPE token ' word')
            reference[shots, i] = [(*continuation_logprob(model, tok, prompt[:-1], " " + c)[:2], len(" " + c))
                                   for c in ex["choices"]]
    for norm in ("none", "tokens", "chars"):
        cfg = ICLTaskConfig(**base, length_normalization=norm, batch_size=3)
        for row in evaluate_icl_task(model, tok, cfg, max_seq_len=128, batch_size=5):
            expected = [int(np.argmax([{"none": ll, "tokens": ll / n, "chars": ll / c}[norm]
                                       for ll, n, c in reference[row["num_fewshot"], i]]))
                        for i in range(len(examples))]
            assert row["predictions"] == expected, (norm, row["num_fewshot"])
            assert row["accuracy"] == pytest.approx(np.mean([p == ex["gold"] for p, ex in zip(expected, examples)]))


def test_language_modeling_accuracy_with_known_answers(model, tok, tmp_path):
    """Continuations that are the model's own greedy output are all correct; a changed last token is wrong."""
    contexts = ["def main(", "import os\nimport", "The quick brown fox", "class Point:\n    x"]
    rows = []
    for c in contexts:
        ids = tok(c)["input_ids"]
        out = []
        for _ in range(3):  # 3 greedy tokens
            with torch.no_grad():
                out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
        rows.append({"context": c, "continuation": tok.decode(out)})
    # re-tokenizing decoded text can merge tokens differently; keep only examples that round-trip
    keep = [r for r in rows if continuation_logprob(model, tok, r["context"], r["continuation"])[2]]
    assert len(keep) >= 2
    good = write_jsonl(tmp_path / "good.jsonl", keep)
    cfg = ICLTaskConfig(label="lm", path=good, type="language_modeling", continuation_delimiter="")
    assert evaluate_icl_task(model, tok, cfg, max_seq_len=128)[0]["accuracy"] == 1.0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**r, "continuation": r["continuation"] + " zzz qqq"} for r in keep])
    cfg = ICLTaskConfig(label="lm", path=bad, type="language_modeling", continuation_delimiter="")
    assert evaluate_icl_task(model, tok, cfg, max_seq_len=128)[0]["accuracy"] == 0.0


def test_prompts_longer_than_max_seq_len_are_counted_and_warned(model, tok, caplog):
    cfg = ICLTaskConfig(label="piqa", path=str(ICL / "piqa_tiny.jsonl"), type="multiple_choice", num_fewshot=[0, 2])
    n = len(load_task_examples(cfg.path, cfg.type))
    with caplog.at_level("WARNING", logger="llmfoundry.eval.icl"):
        whole = evaluate_icl_task(model, tok, cfg, max_seq_len=512)
    assert [r["truncated_examples"] for r in whole] == [0, 0] and not caplog.records
    with caplog.at_level("WARNING", logger="llmfoundry.eval.icl"):
        rows = evaluate_icl_task(model, tok, cfg, max_seq_len=24)
    cut = [r["truncated_examples"] for r in rows]
    assert 0 < cut[1] <= n and cut[0] <= cut[1]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == (cut[0] > 0) + 1
    assert warned[-1] == (f"ICL task 'piqa' 2-shot: {cut[1]} of {n} examples are longer than max_seq_len=24 and were "
                          "scored on their last 24 tokens (the front of the prompt dropped); fewer shots or a larger "
                          "max_seq_len keep them whole")


def test_fewshot_prompt_construction(tok):
    cfg = ICLTaskConfig(label="t", path=str(ICL / "lambada_tiny.jsonl"), type="language_modeling",
                        prompt_string="Complete:\n", example_delimiter="\n###\n", continuation_delimiter=" ",
                        fewshot_seed=7)
    ex = load_task_examples(cfg.path, cfg.type)
    shots = fewshot_indices(len(ex), 3, 2, seed=7)
    assert len(set(shots)) == 2 and 3 not in shots
    assert shots == fewshot_indices(len(ex), 3, 2, seed=7)  # fixed by the seed
    assert any(fewshot_indices(len(ex), 3, 2, seed=s) != shots for s in range(8, 12))
    # as llm-foundry builds it: the example delimiter before each context that follows any text, the prompt too
    expected = ("Complete:\n" + "".join("\n###\n" + ex[i]["context"] + " " + ex[i]["continuation"] for i in shots)
                + "\n###\n" + ex[3]["context"] + " ")
    assert build_prompt(cfg, ex, 3, 2) == expected
    for q in range(len(ex)):  # never the query itself, whatever the seed
        assert q not in fewshot_indices(len(ex), q, len(ex) - 1, seed=q)
    assert build_prompt(cfg, ex, 3, 0) == "Complete:\n\n###\n" + ex[3]["context"] + " "
    bare = ICLTaskConfig(label="t", path=cfg.path, type="language_modeling", example_delimiter="\n", fewshot_seed=7,
                         context_prefix="Q: ")  # llm-foundry's prelimiter: before every context
    assert build_prompt(bare, ex, 3, 2) == "\n".join(
        "Q: " + ex[i]["context"] + " " + ex[i]["continuation"] for i in shots) + "\nQ: " + ex[3]["context"] + " "

    mc = ICLTaskConfig(label="mc", path=str(ICL / "piqa_tiny.jsonl"), type="multiple_choice")
    mex = load_task_examples(mc.path, mc.type)
    s = fewshot_indices(len(mex), 0, 1, mc.fewshot_seed)[0]
    assert build_prompt(mc, mex, 0, 1) == (mex[s]["query"] + " " + mex[s]["choices"][mex[s]["gold"]] + "\n"
                                           + mex[0]["query"] + " ")
    # rows: one per choice, the prompt's trailing space moved onto the continuation, left-truncated to fit
    reqs = build_requests(mc, mex, tok, 1, max_seq_len=24)
    assert len(reqs) == sum(len(e["choices"]) for e in mex)
    assert all(len(r.context) + len(r.continuation) <= 24 for r in reqs)
    assert any(len(r.context) + len(r.continuation) == 24 for r in reqs)  # some were truncated
    whole = {(r.example, r.choice): r for r in build_requests(mc, mex, tok, 1, max_seq_len=512)}
    assert all(w.cut == 0 for w in whole.values())
    for r in reqs:  # and say how many tokens they lost
        w = whole[r.example, r.choice]
        assert w.context[r.cut:] == r.context and len(w.context) == r.cut + len(r.context)
        assert (r.cut > 0) == (len(w.context) + len(w.continuation) > 24)
    assert reqs[0].continuation == tok(" " + mex[0]["choices"][0], add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=r"num_fewshot=12 needs at least 13 examples.*it has 10"):
        fewshot_indices(10, 0, 12, seed=1)


def test_task_file_errors(tmp_path, model, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"ICL task file .*empty\.jsonl is empty: it has no examples"):
        load_task_examples(str(empty), "multiple_choice")
    with pytest.raises(FileNotFoundError, match=r"ICL task file 'nope\.jsonl' not found.*fix the task's 'path'"):
        load_task_examples("nope.jsonl", "language_modeling")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 2}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'gold' must be an index into 'choices' \(0\.\.1\)"):
        load_task_examples(bad, "multiple_choice")
    miss = write_jsonl(tmp_path / "miss.jsonl", [{"context": "a", "continuation": "b"}, {"context": "c"}])
    with pytest.raises(ValueError, match=r"miss\.jsonl:2: .* missing \['continuation'\]"):
        load_task_examples(miss, "language_modeling")
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"junk\.jsonl:1: not valid JSON"):
        load_task_examples(str(tmp_path / "junk.jsonl"), "language_modeling")
    with pytest.raises(ConfigError, match="num_fewshot"):
        from_dict(ICLTaskConfig, {"label": "x", "path": "p", "type": "multiple_choice", "num_fewshot": []})
    with pytest.raises(ConfigError, match="did you mean 'num_fewshot'"):
        from_dict(ICLTaskConfig, {"label": "x", "path": "p", "type": "multiple_choice", "num_fewshots": [0]})


def write_mds(path: Path, samples: np.ndarray) -> str:
    from streaming import MDSWriter
    with MDSWriter(out=str(path), columns={"tokens": "ndarray:int32"}) as w:
        for s in samples:
            w.write({"tokens": s.astype(np.int32)})
    return str(path)


def test_perplexity_equals_exp_mean_token_loss(model, tmp_path):
    from llmfoundry.data.text_loader import TextLoaderConfig, build_text_dataloader
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 4096, size=(10, 32))
    local = write_mds(tmp_path / "mds" / "val", samples)
    cfg = TextLoaderConfig(local=str(tmp_path / "mds"), split="val", max_seq_len=32, shuffle=False,
                           drop_last=False, num_workers=0)
    result = evaluate_perplexity(model, build_text_dataloader(cfg, 4))
    assert local and result["tokens"] == 10 * 31 and result["batches"] == 3
    losses = []
    for s in samples:  # directly: one sample at a time, every next-token loss
        ids = torch.tensor(s[None], dtype=torch.long)
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        losses.append(F.cross_entropy(logits, ids[0, 1:], reduction="none"))
    mean = torch.cat(losses).double().mean().item()
    assert result["loss"] == pytest.approx(mean, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("evalckpt")
    return save_composer_weights(model.state_dict(), model.config, str(d / "w.pt"), tokenizer="bundled")


def test_evaluate_tiny_yaml_end_to_end(ckpt, tmp_path, capsys):
    results_path = tmp_path / "out" / "eval.json"
    cfg = load_eval_config(str(REPO / "yamls/eval/tiny-cpu.yaml"), [
        f"load_path={ckpt}", f"results_path={results_path}", "eval_subset_num_batches=2",
        "eval_loaders.val.max_seq_len=128"])
    results = evaluate(cfg)
    table = capsys.readouterr().out
    assert "| val | - | perplexity |" in table and "| hellaswag_tiny | 2 | accuracy |" in table
    saved = json.loads(results_path.read_text())
    assert saved["perplexity"]["val"]["tokens"] == 2 * 16 * 127
    assert {(r["task"], r["num_fewshot"]) for r in saved["icl"]} == {
        ("lambada_tiny", 0), ("lambada_tiny", 3), ("python_tiny", 0), ("python_tiny", 3), ("hellaswag_tiny", 0),
        ("hellaswag_tiny", 2), ("piqa_tiny", 0), ("arc_tiny", 0), ("arc_tiny", 3), ("schema_tiny", 0),
        ("schema_tiny", 2), ("qa_tiny", 0), ("qa_tiny", 2)}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["num_examples"] >= 10 for r in saved["icl"])
    assert results["perplexity"]["val"]["perplexity"] == pytest.approx(math.exp(results["perplexity"]["val"]["loss"]))


def test_samples_longer_than_the_model_are_truncated_with_a_warning(ckpt, tmp_path, caplog, capsys):
    """The bundled 256-token shards scored by a model overridden to max_seq_len=64: one warning line naming the
    length and the keys, and each sample scored on its first 64 tokens. A model with a position table cannot take
    another max_seq_len: a one-line error naming the override."""
    args = [str(REPO / "yamls/eval/tiny-cpu.yaml"), f"load_path={ckpt}", "icl_tasks=null", "results_path=null",
            "eval_subset_num_batches=1", "device=cpu", "model_overrides.max_seq_len=64"]
    results = evaluate(load_eval_config(args[0], args[1:]))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["eval_loaders.val: samples are truncated to the model's max_seq_len=64 tokens (the loader "
                      "reads 256); set eval_loaders.val.max_seq_len=64 to silence this, or "
                      "model_overrides.max_seq_len=256 to score all 256 (this model has no position table, so it can "
                      "run past the length it was trained for)"], warned
    assert results["perplexity"]["val"]["tokens"] == 16 * 63
    torch.manual_seed(0)
    wpe = MPTForCausalLM(MPTConfig(d_model=32, n_heads=2, n_layers=1, max_seq_len=128, vocab_size=4096,
                                   learned_pos_emb=True, attn_config={"alibi": False}))
    args[1] = f"load_path={save_composer_weights(wpe.state_dict(), wpe.config, str(tmp_path / 'wpe.pt'))}"
    assert main(args + ["tokenizer=bundled"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: max_seq_len=64 cannot be used with") and err.count("\n") == 1, err
    assert "learned_pos_emb: true) of max_seq_len=128 positions; drop the max_seq_len override" in err


def test_evaluate_hf_directory_gives_same_numbers(model, ckpt, tmp_path):
    model.save_pretrained(str(tmp_path / "hf"))
    load_tokenizer("bundled").save_pretrained(str(tmp_path / "hf"))
    common = {"icl_tasks": [{"label": "piqa", "path": str(ICL / "piqa_tiny.jsonl"), "type": "multiple_choice"}],
              "results_path": None, "device": "cpu"}
    a = evaluate(from_dict(EvalConfig, {"load_path": ckpt, **common}))
    b = evaluate(from_dict(EvalConfig, {"hf_path": str(tmp_path / "hf"), **common}))
    assert a["icl"][0]["predictions"] == b["icl"][0]["predictions"]
    from transformers import MptForCausalLM  # the full-logits path, with transformers' own model
    task = ICLTaskConfig(**common["icl_tasks"][0])
    theirs = evaluate_icl_task(MptForCausalLM.from_pretrained(str(tmp_path / "hf")).eval(), load_tokenizer("bundled"),
                               task, max_seq_len=128)
    assert theirs[0]["predictions"] == a["icl"][0]["predictions"]


def test_eval_config_and_cli_errors(model, ckpt, tmp_path, capsys):
    with pytest.raises(ConfigError, match="set one of 'load_path'"):
        from_dict(EvalConfig, {"icl_tasks": [{"label": "a", "path": "p", "type": "multiple_choice"}]})
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        from_dict(EvalConfig, {"load_path": ckpt})
    with pytest.raises(ConfigError, match="did you mean 'icl_tasks'"):
        load_eval_config(str(REPO / "yamls/eval/tiny-cpu.yaml"), ["icl_task=1"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main([str(REPO / "yamls/eval/tiny-cpu.yaml"), f"load_path={ckpt}",
                 f"icl_tasks=[{{label: e, path: {empty}, type: multiple_choice}}]", "results_path=null"]) == 1
    assert "error: ICL task file" in capsys.readouterr().err
    assert main([str(REPO / "yamls/eval/tiny-cpu.yaml"), f"load_path={tmp_path}/missing.pt"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main([str(REPO / "yamls/eval/tiny-cpu.yaml"), f"load_path={ckpt}", "tokenizer=/no/such/dir"]) == 1
    assert "tokenizer '/no/such/dir' cannot be loaded" in capsys.readouterr().err
    model.save_pretrained(str(tmp_path / "hf_no_tokenizer"))
    assert main([str(REPO / "yamls/eval/tiny-cpu.yaml"), "load_path=null", f"hf_path={tmp_path}/hf_no_tokenizer"]) == 1
    assert "no tokenizer known for this model" in capsys.readouterr().err
    assert main([str(REPO / "yamls/eval/tiny-cpu.yaml"), f"hf_path={tmp_path}/hf_no_tokenizer"]) == 1  # + the YAML's
    assert "add load_path=null to evaluate the Hugging Face directory" in capsys.readouterr().err



def test_eval_data_error_in_a_loader_worker_is_one_line(ckpt, tmp_path, capsys):
    """A token id past the model's vocabulary, found inside a DataLoader worker process, reaches the user as the
    loader's own one-line message (not the worker's re-raised traceback)."""
    bad = np.full((4, 64), 5, dtype=np.int64)
    bad[2, 7] = 4096 + 3  # the tiny model's vocab_size is 4096
    write_mds(tmp_path / "mds" / "val", bad)
    rc = main([str(REPO / "yamls/eval/tiny-cpu.yaml"), f"load_path={ckpt}", "icl_tasks=[]", "results_path=null",
               f"eval_loaders.val.local={tmp_path / 'mds'}", "eval_loaders.val.max_seq_len=64",
               "eval_loaders.val.num_workers=1"])
    err = capsys.readouterr().err
    assert rc == 1, err
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1 and "4099" in line[0] and "vocab_size" in line[0], err
    assert "Traceback" not in err and "DataLoader worker" not in err, err

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_evaluate_matches_cpu(ckpt, tmp_path):
    """fp32 on the GPU gives the CPU's ICL predictions and perplexity; bf16 runs the whole tiny YAML."""
    common = ["results_path=null", "eval_subset_num_batches=2", "eval_loaders.val.max_seq_len=128"]
    yaml = str(REPO / "yamls/eval/tiny-cpu.yaml")
    cpu = evaluate(load_eval_config(yaml, [f"load_path={ckpt}", "device=cpu", *common]))
    gpu = evaluate(load_eval_config(yaml, [f"load_path={ckpt}", "device=gpu", "precision=fp32", *common]))
    assert [r["predictions"] for r in gpu["icl"]] == [r["predictions"] for r in cpu["icl"]]
    assert gpu["perplexity"]["val"]["loss"] == pytest.approx(cpu["perplexity"]["val"]["loss"], rel=1e-4)
    bf16 = evaluate(load_eval_config(yaml, [f"load_path={ckpt}", "device=gpu", "precision=bf16", *common]))
    assert bf16["perplexity"]["val"]["loss"] == pytest.approx(cpu["perplexity"]["val"]["loss"], rel=2e-2)


# ------------------------------------------------------------------------------------------ overrides, results_path
EVAL_TINY = REPO / "yamls" / "eval" / "tiny-cpu.yaml"


def test_eval_override_indexes_icl_tasks():
    base = load_eval_config(str(EVAL_TINY))
    cfg = load_eval_config(str(EVAL_TINY), ["icl_tasks.0.path=/tmp/x.jsonl", "icl_tasks.2.num_fewshot.1=1",
                                            "icl_tasks[3].batch_size=2"])
    assert cfg.icl_tasks[0].path == "/tmp/x.jsonl" and cfg.icl_tasks[0].label == base.icl_tasks[0].label
    assert cfg.icl_tasks[2].num_fewshot == [0, 1] and cfg.icl_tasks[3].batch_size == 2
    assert cfg.icl_tasks[1] == base.icl_tasks[1] and cfg.icl_tasks[4] == base.icl_tasks[4]
    assert [t.path for t in cfg.icl_tasks[1:]] == [t.path for t in base.icl_tasks[1:]]
    assert cfg.eval_loaders == base.eval_loaders


@pytest.mark.parametrize("overrides, message", [
    (["icl_tasks.7.path=x"], "config key 'icl_tasks.7.path': the list has 7 items (0..6)"),
    (["icl_tasks.lambada_tiny.path=x"], "config key 'icl_tasks.lambada_tiny.path': 'icl_tasks' is a list"),
    (["load_path.0=x"], "config key 'load_path.0': 'load_path' is "),
    (["icl_tasks.0.pth=x"], "unknown config key 'icl_tasks[0].pth' in 'icl_tasks[0]' (did you mean 'path'?)"),
    (["icl_task.0.path=x"], "unknown config key 'icl_task' at the top level (did you mean 'icl_tasks'?)"),
    (["icl_tasks={a: 1}"], "config key 'icl_tasks' must be a list"),  # was: Cannot merge incompatible container types
])
def test_eval_override_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_eval_config(str(EVAL_TINY), overrides)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_eval_cli_icl_task_path_override(ckpt, tmp_path, capsys):
    rows = (ICL / "lambada_tiny.jsonl").read_text().splitlines()[:5]
    (tmp_path / "mine.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "res.json"
    assert main([str(EVAL_TINY), f"load_path={ckpt}", f"icl_tasks.0.path={tmp_path / 'mine.jsonl'}",
                 "eval_subset_num_batches=1", "eval_loaders.val.max_seq_len=128", f"results_path={out}"]) == 0
    saved = json.loads(out.read_text())
    n = {(r["task"], r["num_fewshot"]): r["num_examples"] for r in saved["icl"]}
    assert n[("lambada_tiny", 0)] == n[("lambada_tiny", 3)] == 5  # the override's file
    assert n[("python_tiny", 0)] == 12 and n[("piqa_tiny", 0)] == 10  # the others unchanged
    assert f"results written to {out}\n" in capsys.readouterr().out
    assert main([str(EVAL_TINY), f"load_path={ckpt}", "icl_tasks=null", "eval_subset_num_batches=1",
                 "eval_loaders.val.max_seq_len=128", f"results_path={out}"]) == 0
    assert f"results written to {out} (replacing the earlier file)" in capsys.readouterr().out


def test_results_path_checked_before_evaluating(ckpt, tmp_path, capsys):
    common = [str(EVAL_TINY), f"load_path={ckpt}", "eval_subset_num_batches=1", "eval_loaders.val.max_seq_len=128"]
    assert main([*common, f"results_path={tmp_path}"]) == 1
    captured = capsys.readouterr()
    assert f"error: results_path '{tmp_path}' is a directory" in captured.err, captured.err
    assert "| eval |" not in captured.out  # nothing was evaluated
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "sub" / "r.json"  # its parent cannot be created: 'afile' is a file
    assert main([*common, f"results_path={bad}"]) == 1
    captured = capsys.readouterr()
    assert f"error: results_path '{bad}': cannot create its folder" in captured.err, captured.err
    assert "| eval |" not in captured.out
    with pytest.raises(ConfigError, match="is a directory"):
        evaluate(load_eval_config(str(EVAL_TINY), [f"load_path={ckpt}", f"results_path={tmp_path}"]))


# ------------------------------------------------------------------------------------------- null means none
def test_null_means_none_for_eval_loaders_and_icl_tasks(tmp_path):
    base = load_eval_config(str(EVAL_TINY))
    cfg = load_eval_config(str(EVAL_TINY), ["icl_tasks=null", "model_overrides=null"])
    assert cfg.icl_tasks == [] and cfg.model_overrides == {} and cfg.eval_loaders == base.eval_loaders
    cfg = load_eval_config(str(EVAL_TINY), ["eval_loaders=null"])
    assert cfg.eval_loaders == {} and cfg.icl_tasks == base.icl_tasks
    # one entry: indexes are the YAML's, whatever else is left out
    cfg = load_eval_config(str(EVAL_TINY), ["eval_loaders.val=null", "icl_tasks.1=null", "icl_tasks.3=null"])
    assert cfg.eval_loaders == {} and [t.label for t in cfg.icl_tasks] == ["lambada_tiny", "hellaswag_tiny", "arc_tiny",
                                                                           "schema_tiny", "qa_tiny"]
    # a key left empty in the YAML itself is null too
    text = EVAL_TINY.read_text()
    yaml = tmp_path / "no_icl.yaml"
    yaml.write_text(text[:text.index("icl_tasks:")] + "icl_tasks:\nresults_path: null\n")
    assert load_eval_config(str(yaml)).icl_tasks == []
    for overrides in (["icl_tasks=null", "eval_loaders=null"], ["icl_tasks=[]", "eval_loaders.val=null"]):
        with pytest.raises(ConfigError) as e:
            load_eval_config(str(EVAL_TINY), overrides)
        assert "nothing to evaluate: 'eval_loaders' and 'icl_tasks' are both empty or null" in str(e.value)
        assert "\n" not in str(e.value)


def test_eval_cli_with_icl_tasks_null_runs_perplexity_only(ckpt, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert main([str(EVAL_TINY), f"load_path={ckpt}", "icl_tasks=null", "eval_subset_num_batches=1",
                 "eval_loaders.val.max_seq_len=128", f"results_path={out}"]) == 0
    saved = json.loads(out.read_text())
    assert saved["icl"] == [] and saved["perplexity"]["val"]["tokens"] == 16 * 127
    assert "| val | - | perplexity |" in capsys.readouterr().out
    for yaml in (EVAL_TINY, REPO / "yamls" / "eval" / "mpt-7b.yaml"):  # refused before anything is loaded
        assert main([str(yaml), "icl_tasks=null", "eval_loaders=null"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: EvalConfig: nothing to evaluate") and err.count("\n") == 1, err
