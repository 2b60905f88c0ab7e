"""llm-foundry's YAML dialect: recognised, translated (llm-foundry's model defaults kept), refused in one message,
and trained on CPU (tests/data/foundry/*.yaml are written in llm-foundry's published format)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmfoundry.train import load_config
from llmfoundry.train.composer_model import ComposerMPT
from llmfoundry.train.config import TrainConfig
from llmfoundry.train.foundry_dialect import is_foundry_dialect
from llmfoundry.train.foundry_dialect import translate as translate_with
from llmfoundry.utils.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "foundry"
PRETRAIN = str(DATA / "mpt-pretrain.yaml")
FINETUNE = str(DATA / "mpt-finetune.yaml")
TINY = str(REPO / "yamls" / "tiny-cpu.yaml")


def tiny(save_folder) -> list[str]:
    """llm-foundry-style overrides that make a run a few seconds on CPU (bundled data and tokenizer)."""
    return ["tokenizer.name=bundled", "precision=fp32", f"save_folder={save_folder}/{{run_name}}",
            "global_train_batch_size=4", "device_train_microbatch_size=2", "device_eval_batch_size=4",
            "eval_subset_num_batches=1", "console_log_interval=1ba"]


PRETRAIN_TINY = ["variables.data_local=${bundled:mds}", "model.attn_config.attn_impl=torch", "max_duration=4ba",
                 "eval_interval=2ba", "save_interval=4ba", "scheduler.t_warmup=1ba", "train_loader.num_workers=0",
                 "eval_loader.num_workers=0"]
FINETUNE_TINY = ["variables.data_dir=${bundled:finetune}", "max_duration=2ep"]


def translate(data: dict):
    return translate_with(data, TrainConfig)


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUN_NAME", None)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------- whole runs on CPU
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """mpt-pretrain.yaml trained for 4 batches (FSDP2 over gloo, as its fsdp_config says)."""
    tmp_path = tmp_path_factory.mktemp("pretrain")
    return tmp_path, run_cli([PRETRAIN, *tiny(tmp_path), *PRETRAIN_TINY])


def test_pretraining_yaml_trains_and_writes_our_format(pretrained):
    tmp_path, r = pretrained
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "is in llm-foundry's format; translated" in out
    for needle in ("fsdp_config: -> fsdp", "algorithms.gradient_clipping: -> max_grad_norm: 1.0",
                   "decoupled_adamw -> adamw", "cosine_with_warmup -> cosine", "model.name: mpt_causal_lm"):
        assert out.count(needle) == 1, needle  # each translation printed once
    assert "metrics/eval/LanguageCrossEntropy" in out
    folder = tmp_path / "mpt-pretrain"
    assert (folder / "latest-rank0.pt").exists()
    written = folder / "mpt-pretrain.mpt-forge.yaml"
    assert written.exists()
    # the written YAML is in our format: read without translation, it gives the same config
    import yaml
    data = yaml.safe_load(written.read_text())
    assert not is_foundry_dialect(data, TrainConfig)
    assert load_config(str(written)) == load_config(PRETRAIN, [*tiny(tmp_path), *PRETRAIN_TINY])


def test_eval_yaml_in_llm_foundry_format_evaluates_the_run(pretrained, tmp_path, capsys):
    from llmfoundry.eval.evaluate import evaluate, load_eval_config
    folder, r = pretrained
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    cfg = load_eval_config(str(DATA / "mpt-eval.yaml"), [
        f"variables.checkpoint={folder}/mpt-pretrain/latest-rank0.pt", "variables.tokenizer_name=bundled",
        f"results_path={tmp_path}/eval.json"])
    assert "in llm-foundry's eval format" in capsys.readouterr().err
    assert cfg.model_config["learned_pos_emb"] is True and cfg.model_config["no_bias"] is False
    assert [(t.label, t.type, t.num_fewshot) for t in cfg.icl_tasks] == [
        ("lambada", "language_modeling", [0, 1]), ("hellaswag", "multiple_choice", [0])]
    results = evaluate(cfg)
    assert [(x["task"], x["num_fewshot"]) for x in results["icl"]] == [("lambada", 0), ("lambada", 1),
                                                                       ("hellaswag", 0)]


def test_eval_dialect_refusals_in_one_message():
    from llmfoundry.eval.evaluate import EvalConfig
    from llmfoundry.eval.foundry_dialect import translate_eval
    t = translate_eval({"models": [{"model_name": "a"}, {"model_name": "b"}], "icl_subset_num_batches": 0,
                        "icl_tasks": [{"label": "x", "dataset_uri": "s3://b/x.jsonl",
                                       "icl_task_type": "code_evaluation", "num_fewshot": [0]},
                                      {"label": "piqa", "dataset_uri": None, "icl_task_type": "multiple_choice"}]},
                       EvalConfig)
    assert sorted(p.split(":")[0] for p in t.problems) == [
        "icl_subset_num_batches", "icl_tasks.0.dataset_uri", "icl_tasks.0.icl_task_type", "icl_tasks.1.dataset_uri"]
    assert any("task 'piqa' names no file; give the path of its JSONL file" in p for p in t.problems)
    assert translate_eval({"models": []}, EvalConfig).problems[0].startswith("models:")
    unloaded = translate_eval({"models": [{"model_name": "m", "model": {"name": "mpt_causal_lm", "d_model": 64}}]},
                              EvalConfig)  # llm-foundry would score random weights: said, not done
    assert [p for p in unloaded.problems if p.startswith("models.0.load_path: missing: llm-foundry evaluates model "
                                                         "'m' from random initial weights")], unloaded.problems


def test_eval_dialect_schema_and_generation_tasks():
    """llm-foundry's schema and generation_task_with_answers entries become our task types; a generation task's
    early_stopping_criteria, generation_kwargs.max_new_tokens and cot_delimiter are kept, sampling is refused."""
    from llmfoundry.eval.evaluate import EvalConfig
    from llmfoundry.eval.foundry_dialect import translate_eval
    from llmfoundry.utils.config import from_dict
    tasks = [{"label": "winogrande", "dataset_uri": "llmfoundry/assets/icl/schema_tiny.jsonl", "num_fewshot": [0, 2],
              "icl_task_type": "schema", "continuation_delimiter": " ", "example_delimiter": "\n",
              "fewshot_random_seed": 3},
             {"label": "gsm8k", "dataset_uri": "llmfoundry/assets/icl/qa_tiny.jsonl", "num_fewshot": 1,
              "icl_task_type": "generation_task_with_answers", "cot_delimiter": "The answer is ",
              "early_stopping_criteria": ["\n\n", "Question:"], "do_normalization": False,
              "generation_kwargs": {"max_new_tokens": 64, "do_sample": False, "temperature": 0.0},
              "continuation_delimiter": "\n\nA:", "question_prelimiter": ""},
             {"label": "triviaqa", "dataset_uri": "llmfoundry/assets/icl/qa_tiny.jsonl", "num_fewshot": [0],
              "icl_task_type": "generation_task_with_answers", "cot_delimiter": None, "early_stopping_criteria": None}]
    t = translate_eval({"load_path": "x.pt", "icl_tasks": tasks}, EvalConfig)
    assert t.problems == []
    assert any("early_stopping_criteria -> stop_sequences" in n for n in t.notes)
    schema, gsm8k, trivia = from_dict(EvalConfig, t.data).icl_tasks
    assert (schema.type, schema.num_fewshot, schema.fewshot_seed) == ("schema", [0, 2], 3)
    assert (gsm8k.type, gsm8k.num_fewshot, gsm8k.max_new_tokens) == ("generation_task_with_answers", [1], 64)
    assert gsm8k.stop_sequences == ["\n\n", "Question:"] and gsm8k.cot_delimiter == "The answer is "
    assert gsm8k.continuation_delimiter == "\n\nA:"
    assert (trivia.stop_sequences, trivia.cot_delimiter, trivia.max_new_tokens) == (["\n"], "", 32)
    sampled = {**tasks[1], "generation_kwargs": {"do_sample": True, "num_beams": 4, "top_q": 1}}
    t = translate_eval({"load_path": "x.pt", "icl_tasks": [sampled]}, EvalConfig)
    assert sorted(p.split(":")[0] for p in t.problems) == [
        "icl_tasks.0.generation_kwargs.do_sample", "icl_tasks.0.generation_kwargs.num_beams",
        "icl_tasks.0.generation_kwargs.top_q"]
    assert "answers are decoded greedily here" in t.problems[0]


def test_eval_dialect_subset_prelimiter_and_averages_of_absent_categories():
    """icl_subset_num_batches limits every task to its first N batches of examples; prelimiter (and its older name
    question_prelimiter) goes before every context; a gauntlet average naming a category the file does not define
    (llm-foundry's own eval_gauntlet.yaml averages a commented-out 'programming') averages the others."""
    from llmfoundry.eval.evaluate import EvalConfig
    from llmfoundry.eval.foundry_dialect import translate_eval
    from llmfoundry.utils.config import from_dict
    tasks = [{"label": "a", "dataset_uri": "llmfoundry/assets/icl/qa_tiny.jsonl", "batch_size": 3,
              "icl_task_type": "generation_task_with_answers", "question_prelimiter": "Q: "},
             {"label": "b", "dataset_uri": "llmfoundry/assets/icl/schema_tiny.jsonl", "icl_task_type": "schema",
              "prelimiter": "> "}]
    gauntlet = {"weighting": "EQUAL", "averages": {"core": ["reading", "programming"], "code": ["programming"]},
                "categories": [{"name": "reading", "benchmarks": [{"name": "a", "num_fewshot": 0,
                                                                    "random_baseline": 0}]}]}
    t = translate_eval({"load_path": "x.pt", "device_eval_batch_size": 5, "icl_subset_num_batches": 2,
                        "icl_tasks": tasks, "eval_gauntlet": gauntlet}, EvalConfig)
    assert t.problems == []
    cfg = from_dict(EvalConfig, t.data)
    a, b = cfg.icl_tasks
    assert (a.max_examples, b.max_examples) == (6, 10)  # 2 batches of the task's batch size, else the run's
    assert (a.context_prefix, b.context_prefix) == ("Q: ", "> ")
    assert t.data["eval_gauntlet"]["averages"] == {"core": ["reading"]}
    assert any("['programming']: no such category" in n for n in t.notes)


def test_finetuning_datasets_llm_foundry_reformats_by_name():
    """hf_name of a dataset llm-foundry reformats with a registered function -> record_format; preprocessing_fn as
    a registered name or a {prompt, response} mapping is translated; an import path is refused."""
    def loader(**ds):
        return translate({"train_loader": {"name": "finetuning", "dataset": {"max_seq_len": 64, **ds}}})

    t = loader(hf_name="HuggingFaceH4/databricks_dolly_15k", split="train")
    assert t.problems == [] and t.data["train_loader"]["record_format"] == "dolly"
    assert t.data["train_loader"]["hf_dataset"] == "HuggingFaceH4/databricks_dolly_15k"
    t = loader(hf_name="json", hf_kwargs={"data_files": "alpaca.jsonl"}, preprocessing_fn="tatsu-lab/alpaca")
    assert t.problems == [] and t.data["train_loader"]["record_format"] == "alpaca_text"
    t = loader(hf_name="json", hf_kwargs={"data_files": "x.jsonl"},
               preprocessing_fn={"prompt": "question", "response": "answer"})
    assert t.problems == [] and t.data["train_loader"]["columns"] == {"prompt": "question", "response": "answer"}
    t = loader(hf_name="json", hf_kwargs={"data_files": "x.jsonl"}, preprocessing_fn="my.module:fn")
    assert [p.split(":")[0] for p in t.problems] == ["train_loader.dataset.preprocessing_fn"]


def test_finetuning_yaml_trains(tmp_path):
    r = run_cli([FINETUNE, *tiny(tmp_path), *FINETUNE_TINY])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "finetuning -> name: finetune" in out and "metrics/eval/LanguageCrossEntropy" in out
    assert (tmp_path / "mpt-finetune" / "latest-rank0.pt").exists()


# ------------------------------------------------------------------------------- the model llm-foundry builds
def test_pretraining_model_keeps_llm_foundry_defaults(tmp_path):
    cfg = load_config(PRETRAIN, [*tiny(tmp_path), *PRETRAIN_TINY])
    m = cfg.model
    assert m.learned_pos_emb and not m.no_bias and not m.attn_config.alibi  # llm-foundry's MPTConfig defaults
    names = {n for n, _ in ComposerMPT(m).named_parameters()}
    assert "model.transformer.wpe.weight" in names  # learned positions
    assert {"model.transformer.blocks.0.attn.Wqkv.bias", "model.transformer.blocks.0.ffn.up_proj.bias"} <= names
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 6e-4 and cfg.max_grad_norm == 1.0
    assert cfg.scheduler.name == "cosine" and cfg.scheduler.alpha_f == 0.1
    assert cfg.train_loader.local.endswith("/mds") and cfg.train_loader.split == "train"
    assert cfg.fsdp is not None and cfg.fsdp.sharding_strategy == "FULL_SHARD"
    # without the override, llm-foundry's attn_impl default (flash) is kept, not swapped silently
    assert translate({"model": {"name": "mpt_causal_lm"}}).data["model"]["attn_config"]["attn_impl"] == "flash"


def test_finetuning_model_and_loader(tmp_path):
    cfg = load_config(FINETUNE, [*tiny(tmp_path), *FINETUNE_TINY])
    m = cfg.model
    assert m.attn_config.alibi and not m.learned_pos_emb  # llm-foundry turns learned positions off under ALiBi
    assert m.attn_config.kv_n_heads == 2 and not m.no_bias  # grouped_query_attention
    assert m.init_config.name == "normal_" and m.init_config.init_std == 0.02  # baseline_
    names = {n for n, _ in ComposerMPT(m).named_parameters()}
    assert "model.transformer.wpe.weight" not in names and "model.transformer.blocks.0.attn.Wqkv.bias" in names
    loader = cfg.train_loader
    assert loader.name == "finetune" and loader.data_files[0].endswith("instruct_train.jsonl")
    assert loader.packing_ratio == "auto" and cfg.eval_loader.drop_last is False
    assert cfg.optimizer.name == "lion" and cfg.optimizer.betas == [0.9, 0.99]
    assert cfg.scheduler.name == "linear" and cfg.scheduler.alpha_f == 0.0
    assert cfg.max_grad_norm is None  # no algorithms.gradient_clipping: llm-foundry does not clip
    assert cfg.eval_interval == "1ep"  # an integer interval counts epochs


# ------------------------------------------------------------------------------- refused in one message
def test_three_bad_keys_are_named_in_one_message(capsys):
    with pytest.raises(ConfigError) as e:
        load_config(str(DATA / "three-bad-keys.yaml"))
    msg = str(e.value)
    assert "has 3 keys with no equivalent" in msg
    for key in ("model.attn_config.rope", "algorithms.alibi", "callbacks.hf_checkpointer"):
        assert key in msg, key
    assert "use model.attn_config.alibi: true" in msg and "'1ep': only batch intervals here" in msg


def test_hf_checkpointer_becomes_hf_checkpoint(tmp_path):
    """llm-foundry's hf_checkpointer: same folders ({save_folder}/huggingface/ba{N}), its overwrite default, and a
    run writes them; MLflow registration, float16 and epoch intervals are refused."""
    t = translate({"callbacks": {"hf_checkpointer": {"save_folder": "s3://b/run/", "save_interval": "500ba",
                                                     "precision": "bfloat16", "flatten_imports": ["llmfoundry"]}}})
    assert not t.problems
    assert t.data["callbacks"]["hf_checkpoint"] == {"save_folder": "s3://b/run/huggingface", "interval": "500ba",
                                                    "precision": "bf16", "overwrite": True}
    t = translate({"callbacks": {"hf_checkpointer": {"save_folder": "x", "save_interval": 2, "precision": "float16",
                                                     "mlflow_registered_model_name": "m"}}})
    assert sorted(p.split(":")[0] for p in t.problems) == [
        "callbacks.hf_checkpointer.mlflow_registered_model_name", "callbacks.hf_checkpointer.precision",
        "callbacks.hf_checkpointer.save_interval"]
    r = run_cli([TINY, f"save_folder={tmp_path}/ck", "max_duration=2ba", "eval_loader=null", "autoresume=false",
                 "global_train_batch_size=4", "device_train_microbatch_size=2", "scheduler.t_warmup=1ba",
                 f"callbacks.hf_checkpointer.save_folder={tmp_path}/{{run_name}}",
                 "callbacks.hf_checkpointer.save_interval=1ba"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "callbacks.hf_checkpointer: -> callbacks.hf_checkpoint" in r.stdout + r.stderr
    from transformers import MptForCausalLM
    assert sorted(os.listdir(tmp_path / "tiny-cpu" / "huggingface")) == ["ba1", "ba2"]
    MptForCausalLM.from_pretrained(tmp_path / "tiny-cpu" / "huggingface" / "ba2")


def test_cli_prints_all_problems(tmp_path):
    """A bad value of a translated key (no such norm here) joins the list of keys without an equivalent."""
    r = run_cli([str(DATA / "three-bad-keys.yaml"), "fsdp_config.cpu_offload=true", "model.norm_type=triton_rmsnorm"])
    assert r.returncode == 1
    assert "has 5 keys with no equivalent" in r.stderr
    assert "fsdp_config.cpu_offload" in r.stderr and "model.norm_type" in r.stderr


def test_unknown_key_in_the_dialect_gets_a_near_spelling_and_is_listed_with_the_rest():
    t = translate({"model": {"name": "mpt_causal_lm", "n_layer": 2, "attn_config": {"atn_impl": "torch"}},
                   "tp_config": {"tensor_parallel_degree": 2}})
    assert any(p.startswith("model.n_layer:") and "did you mean 'n_layers'" in p for p in t.problems)
    assert any(p.startswith("model.attn_config.atn_impl:") and "'attn_impl'" in p for p in t.problems)
    assert any(p.startswith("tp_config:") for p in t.problems)


def test_hf_causal_lm_with_a_hub_name_the_hub_does_not_give_says_to_download_it(monkeypatch):
    """No hub here: the cache is empty and the endpoint refuses; one problem naming the model and both fixes."""
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_CACHE", "/nonexistent-hub-cache")
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    t = translate({"model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": "mosaicml/mpt-7b",
                             "pretrained": True}})
    assert len(t.problems) == 1, t.problems
    assert "'mosaicml/mpt-7b' is not a local folder, and the Hugging Face hub did not give it" in t.problems[0]
    assert "huggingface-cli download mosaicml/mpt-7b --local-dir DIR" in t.problems[0]
    assert "unset HF_HUB_OFFLINE" in t.problems[0]


def test_hf_causal_lm_with_a_hub_name_reads_the_hub_cache(tmp_path, monkeypatch):
    """A hub name already in the hub cache (an air-gapped cluster's pre-filled cache) is read from it, no request:
    the run starts from those weights."""
    import shutil

    import huggingface_hub.constants as hub
    folder, _ = _hf_mpt_folder(tmp_path)
    repo = tmp_path / "hub" / "models--acme--tiny-mpt"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    t = translate({"model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": "acme/tiny-mpt"}})
    assert not t.problems, t.problems
    assert t.data["load_path"] == str(repo / "snapshots" / commit) and t.data["model"]["d_model"] == 128
    assert any("acme/tiny-mpt from the Hugging Face hub" in n for n in t.notes)


def _hf_mpt_folder(tmp_path, **model_overrides):
    """A small MPT (random weights, seed 1234) saved as a Hugging Face folder."""
    import torch

    from llmfoundry.models.mpt import MPTForCausalLM
    from llmfoundry.models.mpt.hf import save_hf
    cfg = load_config(TINY, [f"model.{k}={v}" for k, v in model_overrides.items()]).model
    torch.manual_seed(1234)
    sd = {k: v.clone() for k, v in MPTForCausalLM(cfg).state_dict().items()}
    save_hf(cfg, sd, tmp_path / "hf-mpt", strict_hf=False)  # our MPT reads what transformers' lacks
    return str(tmp_path / "hf-mpt"), sd


def test_hf_causal_lm_takes_the_folders_architecture_and_weights(tmp_path):
    folder, _ = _hf_mpt_folder(tmp_path, learned_pos_emb="true", no_bias="false", **{"attn_config.alibi": "false"})
    t = translate({"model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": folder,
                             "config_overrides": {"max_seq_len": 128, "attn_config": {"attn_impl": "flex"}},
                             "use_flash_attention_2": True}})
    assert not t.problems, t.problems
    m = t.data["model"]
    assert m["learned_pos_emb"] is True and m["no_bias"] is False and m["d_model"] == 128
    assert m["max_seq_len"] == 128 and m["attn_config"]["attn_impl"] == "flex" and not m["attn_config"]["alibi"]
    assert t.data["load_path"] == folder
    off = translate({"model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": folder, "pretrained": False,
                               "peft_config": {"peft_type": "LORA"}}})
    assert "load_path" not in off.data
    assert [p for p in off.problems if p.startswith("model.peft_config")], off.problems


def test_hf_causal_lm_finetuning_run_starts_from_the_pretrained_weights(tmp_path):
    """llm-foundry's finetuning YAML with its model section swapped for hf_causal_lm over a local MPT folder: the
    run says which weights it starts from, and its first checkpoint (lr 0 at the first warmup step) holds them."""
    import glob

    import torch
    import yaml
    folder, sd = _hf_mpt_folder(tmp_path, max_seq_len=256)
    data = yaml.safe_load(open(FINETUNE))
    data["model"] = {"name": "hf_causal_lm", "pretrained_model_name_or_path": folder, "pretrained": True,
                     "config_overrides": {"attn_config": {"attn_uses_sequence_id": True}}}
    data.pop("fsdp_config")
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(data))
    r = run_cli([str(tmp_path / "ft.yaml"), *tiny(tmp_path), *FINETUNE_TINY, "max_duration=1ba",
                 "eval_loader=null", "eval_first=false", "save_interval=1ba"])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"starting from the pretrained weights in {folder}" in out
    (ckpt,) = glob.glob(str(tmp_path / "ft" / "ep*-ba1-rank0.pt"))
    model = torch.load(ckpt, map_location="cpu", weights_only=False)["state"]["model"]
    for k, v in sd.items():
        torch.testing.assert_close(model[f"model.{k}"], v, rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------- translation rules (pure)
def test_optimizer_and_scheduler_defaults_follow_llm_foundry():
    t = translate({"optimizer": {"name": "decoupled_adamw"}, "scheduler": {"name": "cosine_with_warmup",
                                                                         "t_warmup": "10ba"}})
    assert t.data["optimizer"] == {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                   "weight_decay": 1e-5}
    assert t.data["scheduler"] == {"name": "cosine", "t_warmup": "10ba", "alpha_f": 0.0, "t_max": "1dur"}
    # torch's AdamW (coupled decay) -> ours (decoupled): the same shrink per step
    t = translate({"fsdp_config": None, "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.1}})
    assert t.data["optimizer"]["weight_decay"] == pytest.approx(1e-5)
    assert t.data["fsdp"] is None
    # in our own format 'adamw' is ours: untouched
    assert translate({"optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.1}}).dialect_keys == []


def test_schedulers_with_no_equivalent_and_non_default_options():
    t = translate({"scheduler": {"name": "inv_sqrt_with_warmup", "t_warmup": "1ba"}})
    assert t.problems and "inv_sqrt_with_warmup" in t.problems[0]
    t = translate({"scheduler": {"name": "linear_decay_with_warmup", "t_warmup": "1ba", "alpha_i": 0.5}})
    assert [p.split(":")[0] for p in t.problems] == ["scheduler.alpha_i"]


def test_callbacks_loggers_and_fsdp_families():
    t = translate({"callbacks": {"lr_monitor": {}, "memory_monitor": {}, "speed_monitor": {},
                                 "runtime_estimator": {"time_unit": "hours"}, "scheduled_gc": {"batch_interval": 100}},
                   "loggers": {"wandb": {"project": "p", "rank_zero_only": True}},
                   "fsdp_config": {"sharding_strategy": "HYBRID_SHARD", "data_parallel_shard_degree": 8,
                                   "use_orig_params": True, "mixed_precision": "DEFAULT"}})
    assert t.problems == []
    assert t.data["callbacks"] == {"lr_monitor": True, "memory_monitor": True, "speed_monitor": {},
                                   "runtime_estimator": True}
    assert t.data["loggers"] == {"wandb": {"project": "p"}}
    assert t.data["fsdp"] == {"sharding_strategy": "HYBRID_SHARD", "shard_degree": 8, "mixed_precision": "DEFAULT"}
    assert translate({"fsdp_config": {"sharding_strategy": "NO_SHARD"}}).data["fsdp"] is None
    t = translate({"loggers": {"mlflow": {"experiment_name": "e", "tracking_uri": "http://mlflow:5000",
                                          "resume": True, "model_registry_prefix": "a.b"},
                               "tensorboard": {"log_dir": "tb", "flush_interval": 10, "rank_zero_only": True}}})
    assert t.problems == []
    assert t.data["loggers"] == {"mlflow": {"experiment_name": "e", "tracking_uri": "http://mlflow:5000"},
                                 "tensorboard": {"log_dir": "tb", "flush_interval": 10}}
    t = translate({"loggers": {"comet_ml": {}, "mlflow": {"tracking_url": "x"}},
                   "callbacks": {"kill_loss_spike": {}}})
    assert sorted(p.split(":")[0] for p in t.problems) == ["callbacks.kill_loss_spike", "loggers.comet_ml",
                                                           "loggers.mlflow.tracking_url"]


def test_attention_types():
    mq = translate({"model": {"name": "mpt_causal_lm", "attn_config": {"attn_type": "multiquery_attention"}}})
    assert mq.data["model"]["attn_config"]["kv_n_heads"] == 1
    mh = translate({"model": {"name": "mpt_causal_lm",
                              "attn_config": {"attn_type": "multihead_attention", "kv_n_heads": 4}}})
    assert "kv_n_heads" not in mh.data["model"]["attn_config"]  # llm-foundry ignores it for multi-head


def test_finetuning_sources():
    hub = translate({"train_loader": {"name": "finetuning", "dataset": {
        "hf_name": "mosaicml/dolly_hhrlhf", "split": "train", "max_seq_len": 128, "decoder_only_format": True}}})
    assert hub.problems == [] and hub.data["train_loader"]["hf_dataset"] == "mosaicml/dolly_hhrlhf"
    folder = translate({"train_loader": {"name": "finetuning", "dataset": {
        "hf_name": "json", "hf_kwargs": {"data_dir": "/data"}, "split": "validation", "max_seq_len": 128}}})
    assert folder.data["train_loader"]["hf_dataset"] == "/data" and folder.data["train_loader"]["split"] == "validation"
    bad = translate({"train_loader": {"name": "finetuning", "dataset": {
        "hf_name": "json", "hf_kwargs": {"data_dir": "/data"}, "preprocessing_fn": "my.mod:fn",
        "remote": "s3://b/mds", "max_seq_len": 128}}})
    assert sorted(p.split(":")[0] for p in bad.problems) == ["train_loader.dataset.preprocessing_fn",
                                                             "train_loader.dataset.remote"]
    assert "set either hf_name (a hub dataset or local files) or remote/local/streams" in bad.problems[-1]


def test_finetuning_from_mds_remote_local_split():
    """llm-foundry's streaming finetuning source (dataset.remote/local/split, or streams) is our finetune MDS
    source; its streaming knobs are dropped with a note; epoch_size is refused."""
    from llmfoundry.data.finetune import FinetuneLoaderConfig
    from llmfoundry.utils.config import from_dict
    t = translate({"train_loader": {"name": "finetuning", "dataset": {
        "remote": "s3://bucket/sft", "local": "/tmp/sft", "split": "train", "max_seq_len": 128, "shuffle": True,
        "shuffle_algo": "py1e", "predownload": 8, "num_canonical_nodes": 2, "download_timeout": 30},
        "drop_last": True}})
    assert t.problems == []
    assert t.data["train_loader"] == {"name": "finetune", "remote": "s3://bucket/sft", "local": "/tmp/sft",
                                      "split": "train", "max_seq_len": 128, "shuffle": True, "download_timeout": 30,
                                      "drop_last": True, "target_responses": "last", "target_prompts": "none",
                                      "too_long": "truncate_end"}
    assert any(n.startswith("train_loader.dataset.remote: read as is: MDS shards") for n in t.notes)
    assert from_dict(FinetuneLoaderConfig, t.data["train_loader"]).is_mds()
    streams = translate({"train_loader": {"name": "finetuning", "dataset": {
        "streams": {"a": {"remote": "s3://b/a", "local": "/tmp/a"}}, "max_seq_len": 128, "epoch_size": 100}}})
    assert streams.data["train_loader"]["streams"] == {"a": {"remote": "s3://b/a", "local": "/tmp/a"}}
    assert [p.split(":")[0] for p in streams.problems] == ["train_loader.dataset.epoch_size"]


# ------------------------------------------------------------------------------- recognition and hints
def test_our_own_yamls_are_not_the_dialect():
    from llmfoundry.utils.config import load_yaml_with_overrides
    from llmfoundry.train.config import _register_resolvers
    _register_resolvers()
    ours = [TINY, *(REPO / "yamls" / "finetune").glob("*.yaml"), *(REPO / "yamls").glob("mpt-*.yaml")]
    for path in map(str, ours):
        data = load_yaml_with_overrides(path, [])
        t = translate(data)
        assert t.dialect_keys == [] and t.problems == [], (path, t.dialect_keys, t.problems)


@pytest.mark.parametrize("override, needle", [
    ("fsdp_config=null", "fsdp_config: null -> fsdp: null"),
    ("eval_first=false", "eval_first: False"),
    ("model.attn_config.attn_type=multiquery_attention", "multiquery_attention -> attn_config.kv_n_heads: 1"),
])
def test_a_dialect_key_in_our_yaml_gets_the_dialect_answer(override, needle, capsys, tmp_path):
    """Formerly 'did you mean compile_config / eval_interval / attn_impl'; now translated. Our model defaults stay
    (the model section has no llm-foundry 'name')."""
    cfg = load_config(TINY, [override, f"save_folder={tmp_path}/ck"])
    assert needle in capsys.readouterr().err
    assert cfg.model.attn_config.alibi and cfg.model.no_bias  # tiny-cpu's model, unchanged


def test_llm_foundry_run_defaults_apply_to_a_whole_llm_foundry_yaml_only():
    ours = translate({"model": {"d_model": 64}, "eval_loader": {"local": "x"}, "eval_first": False}).data
    assert "max_grad_norm" not in ours and "eval_interval" not in ours  # our defaults (clip at 1.0, 1000ba)
    whole = translate({"model": {"name": "mpt_causal_lm"}, "eval_loader": {"local": "x"}}).data
    assert whole["max_grad_norm"] is None and whole["eval_interval"] == "1ep"


def test_finetune_hf_name_in_our_loader_gets_the_dialect_answer(tmp_path, capsys):
    cfg = load_config(str(REPO / "yamls" / "finetune" / "tiny-instruct-cpu.yaml"),
                      ["train_loader.data_files=null", "train_loader.hf_name=mosaicml/dolly_hhrlhf",
                       f"save_folder={tmp_path}/ck"])
    assert cfg.train_loader.hf_dataset == "mosaicml/dolly_hhrlhf"
    assert "train_loader.hf_name: -> hf_dataset: 'mosaicml/dolly_hhrlhf'" in capsys.readouterr().err


# ------------------------------------------------------------------------------- whole families of keys
# The field names of llm-foundry's TrainConfig (llmfoundry/utils/config_utils.py) and the keyword arguments of its
# MPTConfig / ComposerMPTCausalLM, attn_config and fsdp_config, at llm-foundry's defaults: none is an unknown key.
FOUNDRY_TRAIN_KEYS = {
    "seed": 17, "precision": "amp_bf16", "code_paths": None, "max_split_size_mb": None, "expandable_segments": True,
    "cuda_load_lazy": False, "dist_timeout": 600.0, "tp_config": None, "accumulate_train_batch_on_tokens": True,
    "eval_interval": 1, "eval_loaders": None, "icl_tasks": None, "icl_tasks_str": None, "eval_gauntlet": None,
    "eval_gauntlet_str": None, "icl_subset_num_batches": None, "icl_seq_len": None, "loggers": None,
    "progress_bar": False, "log_to_console": True, "python_log_level": "debug", "console_log_interval": "1ba",
    "log_config": True, "callbacks": None, "algorithms": None, "save_folder": None, "save_latest_filename": None,
    "save_overwrite": False, "save_weights_only": False, "save_filename": None, "save_interval": "1000ba",
    "save_num_checkpoints_to_keep": -1, "load_path": None, "load_weights_only": False,
    "load_strict_model_weights": True, "load_ignore_keys": None, "save_ignore_keys": None,
    "only_hf_checkpoint": False, "only_composer_checkpoint": False, "train_subset_num_batches": -1,
    "device_train_microbatch_size": 4, "global_train_batch_size": 8, "spin_dataloaders": True,
    "eval_subset_num_batches": -1, "eval_first": False, "compile_config": None, "metadata": None,
    "flatten_metadata": True, "run_name": None, "autoresume": False, "profiler": None, "variables": None,
    "max_seq_len": 2048, "device_eval_batch_size": 4, "max_duration": "10ba", "fsdp_config": None,
}
FOUNDRY_MODEL = {
    "name": "mpt_causal_lm", "d_model": 2048, "n_heads": 16, "n_layers": 24, "head_dim": None, "expansion_ratio": 4,
    "max_seq_len": 2048, "vocab_size": 50368, "resid_pdrop": 0.0, "emb_pdrop": 0.0, "learned_pos_emb": True,
    "ffn_config": {"ffn_type": "mptmlp"}, "init_device": "cpu", "logit_scale": None, "no_bias": False,
    "attention_bias": None, "embedding_fraction": 1.0, "norm_type": "low_precision_layernorm", "norm_eps": 1e-05,
    "use_cache": False, "fc_type": "torch", "tie_word_embeddings": True, "use_pad_tok_in_ffn": True,
    "block_overrides": None, "final_logit_softcapping": None, "use_train_metrics": True,
    "additional_train_metrics": None, "loss_fn": "fused_crossentropy",
    "init_config": {"name": "kaiming_normal_", "fan_mode": "fan_in", "init_nonlinearity": "relu",
                    "init_div_is_residual": True, "emb_init_std": None, "emb_init_uniform_lim": None,
                    "init_std": None, "init_gain": 0.0},
    "attn_config": {"attn_type": "multihead_attention", "attn_pdrop": 0.0, "attn_impl": "torch", "qk_ln": False,
                    "qk_gn": False, "fused_qkv": True, "clip_qkv": None, "softmax_scale": None,
                    "attn_uses_sequence_id": False, "sliding_window_size": -1, "attn_logit_softcapping": None,
                    "alibi": False, "alibi_bias_max": 8, "rope": False, "nope": False, "rope_theta": 10000,
                    "rope_impl": "dail", "rope_dail_config": {"type": "original", "pos_idx_in_fp32": True,
                                                              "xpos_scale_base": 512},
                    "rope_hf_config": {"type": "no_scaling", "factor": 1.0},
                    "attn_temperature_tuning": {"floor_scale": 8192, "attn_scale": 0.0}, "kv_dim": None},
}
FOUNDRY_FSDP = {"sharding_strategy": "FULL_SHARD", "mixed_precision": "PURE", "activation_checkpointing": False,
                "activation_checkpointing_reentrant": False, "activation_cpu_offload": False,
                "limit_all_gathers": True, "sync_module_states": False, "forward_prefetch": False,
                "backward_prefetch": "BACKWARD_PRE", "state_dict_type": "full", "use_orig_params": True,
                "verbose": False, "cpu_offload": False, "data_parallel_shard_degree": -1,
                "data_parallel_replicate_degree": None, "load_monolith_rank0_only": False, "auto_wrap": True}


def test_every_llm_foundry_key_at_its_default_is_known():
    from llmfoundry.train.config import config_from_dict
    data = {**FOUNDRY_TRAIN_KEYS, "fsdp_config": FOUNDRY_FSDP, "model": FOUNDRY_MODEL,
            "tokenizer": {"name": "bundled", "kwargs": {"model_max_length": 2048}},
            "optimizer": {"name": "decoupled_adamw"}, "scheduler": {"name": "cosine_with_warmup", "t_warmup": "1ba"},
            "train_loader": {"name": "text", "dataset": {"local": "/data", "split": "train", "max_seq_len": 2048,
                                                         "shuffle": True, "shuffle_seed": 17}, "num_workers": 8,
                             "drop_last": True}}
    t = translate(data)
    assert t.problems == []
    cfg = config_from_dict(t.data)
    assert cfg.model.learned_pos_emb and not cfg.model.no_bias and cfg.model.kv_n_heads == 16
    assert cfg.train_metrics and cfg.eval_interval == "1ep" and cfg.fsdp.state_dict_type == "full"


def test_eval_yaml_with_two_models_evaluates_each(pretrained, tmp_path):
    """llm-foundry's ``models:`` with two entries: each model is evaluated on the same tasks, in turn; the table has
    a model column and the results file a ``models`` list (same checkpoint twice here: same numbers)."""
    import json

    import yaml

    from llmfoundry.eval.evaluate import main
    folder, r = pretrained
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    data = yaml.safe_load((DATA / "mpt-eval.yaml").read_text())
    second = dict(data["models"][0], model_name="mpt_tiny_again")
    data["models"].append(second)
    data["icl_tasks"] = data["icl_tasks"][:1]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "eval.json"
    assert main([str(path), f"variables.checkpoint={folder}/mpt-pretrain/latest-rank0.pt",
                 "variables.tokenizer_name=bundled", f"results_path={out}"]) == 0
    results = json.loads(out.read_text())
    assert [m["label"] for m in results["models"]] == ["mpt_tiny", "mpt_tiny_again"]
    a, b = ([(x["task"], x["num_fewshot"], x["accuracy"]) for x in m["icl"]] for m in results["models"])
    assert a == b and len(a) == 2


def test_our_models_list_refuses_top_level_model_keys():
    from llmfoundry.eval.evaluate import EvalConfig
    from llmfoundry.utils.config import ConfigError, from_dict
    with pytest.raises(ConfigError, match="the top-level load_path would be ignored: move it into a models entry"):
        from_dict(EvalConfig, {"load_path": "x.pt", "models": [{"label": "a", "load_path": "a.pt"}],
                               "icl_tasks": [{"label": "t", "path": "p.jsonl", "type": "language_modeling"}]})
    with pytest.raises(ConfigError, match="models entry 'b': set exactly one of load_path"):
        from_dict(EvalConfig, {"models": [{"label": "b"}],
                               "icl_tasks": [{"label": "t", "path": "p.jsonl", "type": "language_modeling"}]})
