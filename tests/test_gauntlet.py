"""The gauntlet (llmfoundry/eval/gauntlet.py): its arithmetic on hand-computed numbers, its errors, its section in
scripts/eval.py's results (one per model with ``models:``), and llm-foundry's ``eval_gauntlet`` / ``icl_tasks`` keys
in training and eval YAMLs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmfoundry.checkpoint import save_composer_weights
from llmfoundry.eval.evaluate import EvalConfig, evaluate, load_eval_config
from llmfoundry.eval.gauntlet import (GauntletConfig, benchmark_score, benchmark_weight, check_gauntlet,
                                      gauntlet_metrics, gauntlet_scores)
from llmfoundry.eval.icl_tasks import ICLTaskConfig
from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM
from llmfoundry.utils.config import ConfigError, from_dict

REPO = Path(__file__).resolve().parents[1]
GAUNTLET_YAML = str(REPO / "yamls" / "eval" / "gauntlet-tiny.yaml")

# docs/GAUNTLET.md's worked example
ROWS = [
    {"task": "lambada", "num_fewshot": 0, "accuracy": 0.40, "num_examples": 500, "random_baseline": 0.0},
    {"task": "piqa", "num_fewshot": 0, "accuracy": 0.70, "num_examples": 100, "random_baseline": 0.5},
    {"task": "hellaswag", "num_fewshot": 0, "accuracy": 0.40, "num_examples": 300, "random_baseline": 0.25},
    {"task": "hellaswag", "num_fewshot": 5, "accuracy": 0.10, "num_examples": 300, "random_baseline": 0.25},
]
EXAMPLE = {"categories": [
    {"name": "language", "benchmarks": [{"name": "lambada", "num_fewshot": 0}]},
    {"name": "commonsense", "benchmarks": [{"name": "piqa", "num_fewshot": 0},
                                           {"name": "hellaswag", "num_fewshot": 0}]},
]}


def gauntlet(**kw) -> GauntletConfig:
    return from_dict(GauntletConfig, {**EXAMPLE, **kw})


def test_scores_on_hand_computed_numbers():
    # piqa: (0.70 - 0.5) / 0.5 = 0.40; hellaswag: (0.40 - 0.25) / 0.75 = 0.20; lambada: 0.40 (chance 0)
    s = gauntlet_scores(gauntlet(), ROWS)
    assert [b["score"] for b in s["categories"]["commonsense"]["benchmarks"]] == pytest.approx([0.40, 0.20])
    assert s["categories"]["language"]["score"] == pytest.approx(0.40)
    assert s["categories"]["commonsense"]["score"] == pytest.approx(0.30)  # equal weights
    assert s["averages"] == pytest.approx({"average": 0.35})
    assert gauntlet_metrics(s) == pytest.approx({"icl/gauntlet/language": 0.40, "icl/gauntlet/commonsense": 0.30,
                                                 "icl/gauntlet/average": 0.35})
    # by number of examples: (0.40 * 100 + 0.20 * 300) / 400 = 0.25
    assert gauntlet_scores(gauntlet(weighting="sample_sz"), ROWS)["categories"]["commonsense"]["score"] == \
        pytest.approx(0.25)
    w1, w2 = math.log2(100), math.log2(300)
    assert gauntlet_scores(gauntlet(weighting="log_sample_sz"), ROWS)["categories"]["commonsense"]["score"] == \
        pytest.approx((0.40 * w1 + 0.20 * w2) / (w1 + w2))
    assert benchmark_weight("log_sample_sz", 1) == 1.0  # at least 1
    # without rescaling: accuracy minus chance; without either: the accuracy
    assert gauntlet_scores(gauntlet(rescale_accuracy=False), ROWS)["categories"]["commonsense"]["score"] == \
        pytest.approx((0.20 + 0.15) / 2)
    raw = gauntlet(rescale_accuracy=False, subtract_random_baseline=False)
    assert gauntlet_scores(raw, ROWS)["categories"]["commonsense"]["score"] == pytest.approx(0.55)
    # below chance is below 0 (not clamped); 1 = every example right
    assert benchmark_score(0.10, 0.25) == pytest.approx(-0.20)
    assert benchmark_score(1.0, 0.25) == pytest.approx(1.0) and benchmark_score(0.25, 0.25) == 0.0


def test_given_baseline_shots_and_named_averages():
    cfg = from_dict(GauntletConfig, {"categories": [
        {"name": "language", "benchmarks": [{"name": "lambada", "num_fewshot": 0}]},
        {"name": "few", "benchmarks": [{"name": "hellaswag", "num_fewshot": 5, "random_baseline": 0.0}]},
        {"name": "zero", "benchmarks": [{"name": "hellaswag", "num_fewshot": 0}]}],
        "averages": {"hellaswag_only": ["few", "zero"]}})
    s = gauntlet_scores(cfg, ROWS)
    assert s["categories"]["few"]["score"] == pytest.approx(0.10)  # the benchmark's baseline wins over the task's
    assert s["categories"]["zero"]["score"] == pytest.approx(0.20)
    assert s["averages"] == pytest.approx({"average": (0.40 + 0.10 + 0.20) / 3, "hellaswag_only": 0.15})
    assert s["groups"] == {"average": ["language", "few", "zero"], "hellaswag_only": ["few", "zero"]}


@pytest.mark.parametrize("data, message", [
    ({"categories": [{"name": "c", "benchmarks": [{"name": "piqa", "random_baseline": 1.0}]}]},
     r"random_baseline = 1.0 must be in \[0, 1\)"),
    ({"categories": [{"name": "c", "benchmarks": [{"name": "piqa", "random_baseline": -0.1}]}]},
     r"random_baseline = -0.1 must be in \[0, 1\)"),
    ({"categories": [{"name": "c", "benchmarks": []}]}, "gauntlet category 'c' has no benchmarks"),
    ({"categories": []}, "no categories; give at least one"),
    ({"categories": [{"name": "c", "benchmarks": [{"name": "a"}]}, {"name": "c", "benchmarks": [{"name": "b"}]}]},
     r"category names must be unique; repeated: \['c'\]"),
    ({"categories": [{"name": "c", "benchmarks": [{"name": "a"}, {"name": "a"}]}]}, "the same benchmark twice"),
    ({**EXAMPLE, "subtract_random_baseline": False}, "rescale_accuracy: true needs subtract_random_baseline"),
    ({**EXAMPLE, "averages": {"x": ["language", "nope"]}}, r"averages.x must list names of categories .* unknown: \['nope'\]"),
    ({**EXAMPLE, "averages": {"language": ["language"]}}, "the name 'language' is taken"),
    ({**EXAMPLE, "weighting": "EQUAL"}, "must be one of"),
])
def test_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(GauntletConfig, data)


def test_benchmarks_must_name_evaluated_tasks_and_shots():
    tasks = [ICLTaskConfig(label="piqa", path="piqa_tiny.jsonl", type="multiple_choice", num_fewshot=[0, 1]),
             ICLTaskConfig(label="lambada", path="lambada_tiny.jsonl", type="language_modeling")]
    check_gauntlet(gauntlet(), [*tasks, ICLTaskConfig(label="hellaswag", path="hellaswag_tiny.jsonl",
                                                      type="multiple_choice")])
    with pytest.raises(ValueError) as e:
        check_gauntlet(from_dict(GauntletConfig, {"categories": [{"name": "c", "benchmarks": [
            {"name": "hellaswag"}, {"name": "piqa", "num_fewshot": 5}]}]}), tasks)
    assert str(e.value) == (
        "eval_gauntlet.categories[0].benchmarks[0]: 'hellaswag' (category 'c') is not the label of an icl_tasks "
        "entry (labels: piqa, lambada); add that task to icl_tasks or remove the benchmark; "
        "eval_gauntlet.categories[0].benchmarks[1]: 'piqa' at num_fewshot=5 is not evaluated (the task's "
        "num_fewshot: [0, 1]); add 5 to that task's num_fewshot or use one of them")


# ------------------------------------------------------------------------------------------ scripts/eval.py
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two tiny models with different random weights, as composer weight files."""
    d = tmp_path_factory.mktemp("gauntlet_ckpt")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=4096,
                                         init_config={"name": "normal_", "init_std": 0.2}))
        out.append(save_composer_weights(model.state_dict(), model.config, str(d / f"w{seed}.pt"),
                                         tokenizer="bundled"))
    return out


def expected_gauntlet(cfg: EvalConfig, icl_rows: list[dict]) -> dict[str, float]:
    """The gauntlet recomputed here from the result rows and the YAML: rescaled accuracy, equal weights."""
    acc = {(r["task"], r["num_fewshot"]): (r["accuracy"], r["random_baseline"]) for r in icl_rows}
    cats = {}
    for c in cfg.eval_gauntlet.categories:
        scores = []
        for b in c.benchmarks:
            a, chance = acc[b.name, b.num_fewshot]
            base = chance if b.random_baseline is None else b.random_baseline
            scores.append((a - base) / (1 - base))
        cats[c.name] = sum(scores) / len(scores)
    return {**cats, "average": sum(cats.values()) / len(cats),
            "beyond_lm": (cats["commonsense"] + cats["reading"]) / 2}


def test_eval_yaml_gauntlet_in_results_and_table(ckpts, tmp_path, capsys):
    out = tmp_path / "g.json"
    cfg = load_eval_config(GAUNTLET_YAML, [f"load_path={ckpts[0]}", f"results_path={out}", "device=cpu"])
    results = evaluate(cfg)
    table = capsys.readouterr().out
    saved = json.loads(out.read_text())
    g = saved["gauntlet"]
    assert set(g["categories"]) == {"language_modeling", "commonsense", "reading"}
    got = {**{k: v["score"] for k, v in g["categories"].items()}, **g["averages"]}
    assert got == pytest.approx(expected_gauntlet(cfg, saved["icl"]))
    arc = next(b for b in g["categories"]["commonsense"]["benchmarks"] if b["name"] == "arc_tiny")
    assert arc["random_baseline"] == 0.25  # given in the YAML
    piqa = next(b for b in g["categories"]["commonsense"]["benchmarks"] if b["name"] == "piqa_tiny")
    assert piqa["random_baseline"] == 0.5  # the task's own: two choices
    assert results["gauntlet"] == g
    assert f"| gauntlet | - | average | {g['averages']['average']:.4f} | 3 categories |" in table
    assert f"| gauntlet | - | commonsense | {g['categories']['commonsense']['score']:.4f} | 3 benchmarks |" in table


def test_eval_gauntlet_per_model(ckpts, tmp_path, capsys):
    """``models:``: one gauntlet per model, from that model's own accuracies."""
    out = tmp_path / "m.json"
    models = f"models=[{{label: a, load_path: {ckpts[0]}}}, {{label: b, load_path: {ckpts[1]}}}]"
    cfg = load_eval_config(GAUNTLET_YAML, ["load_path=null", models, f"results_path={out}", "device=cpu",
                                           "icl_tasks.6.max_examples=4"])
    evaluate(cfg)
    table = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert [m["label"] for m in saved["models"]] == ["a", "b"]
    for m in saved["models"]:
        got = {**{k: v["score"] for k, v in m["gauntlet"]["categories"].items()}, **m["gauntlet"]["averages"]}
        assert got == pytest.approx(expected_gauntlet(cfg, m["icl"]))
        assert f"| {m['label']} | gauntlet | - | average | {m['gauntlet']['averages']['average']:.4f} |" in table


def test_eval_config_gauntlet_errors(ckpts):
    with pytest.raises(ConfigError, match="'nope' .* is not the label of an icl_tasks entry"):
        load_eval_config(GAUNTLET_YAML, [f"load_path={ckpts[0]}", "eval_gauntlet.categories.0.benchmarks.0.name=nope"])
    with pytest.raises(ConfigError, match="'piqa_tiny' at num_fewshot=3 is not evaluated"):
        load_eval_config(GAUNTLET_YAML, [f"load_path={ckpts[0]}",
                                         "eval_gauntlet.categories.1.benchmarks.1.num_fewshot=3"])
    with pytest.raises(ConfigError, match=r"random_baseline = 1.5 must be in \[0, 1\)"):
        load_eval_config(GAUNTLET_YAML, [f"load_path={ckpts[0]}",
                                         "eval_gauntlet.categories.1.benchmarks.2.random_baseline=1.5"])
    with pytest.raises(ConfigError, match="is not the label of an icl_tasks entry"):  # its task left out
        load_eval_config(GAUNTLET_YAML, [f"load_path={ckpts[0]}", "icl_tasks.0=null"])
    cfg = load_eval_config(GAUNTLET_YAML, [f"load_path={ckpts[0]}", "eval_gauntlet=null"])
    assert cfg.eval_gauntlet is None


# ------------------------------------------------------------------------------------------ llm-foundry's keys
FOUNDRY_GAUNTLET = {
    "weighting": "EQUAL", "subtract_random_baseline": True, "rescale_accuracy": True,
    "averages": {"core": ["language understanding"]},
    "categories": [{"name": "language understanding", "benchmarks": [
        {"name": "lambada", "num_fewshot": 0, "random_baseline": 0.0},
        {"name": "hellaswag", "num_fewshot": 0, "random_baseline": 0.25}]}],
}
FOUNDRY_TASKS = [
    {"label": "lambada", "dataset_uri": "llmfoundry/assets/icl/lambada_tiny.jsonl", "num_fewshot": [0],
     "icl_task_type": "language_modeling"},
    {"label": "hellaswag", "dataset_uri": "llmfoundry/assets/icl/hellaswag_tiny.jsonl", "num_fewshot": [0, 1],
     "icl_task_type": "multiple_choice", "metric_names": ["InContextLearningMultipleChoiceAccuracy"]},
]


def test_training_yaml_keys_of_llm_foundry(tmp_path):
    """A training YAML in llm-foundry's dialect: icl_tasks (inline or a file), eval_gauntlet (inline or a file),
    icl_subset_num_batches and icl_seq_len reach TrainConfig."""
    import yaml

    from llmfoundry.train.config import TrainConfig, config_from_dict
    from llmfoundry.train.foundry_dialect import translate
    base = yaml.safe_load((REPO / "yamls" / "tiny-cpu.yaml").read_text())
    base["model"]["max_seq_len"] = base["train_loader"]["max_seq_len"] = base["eval_loader"]["max_seq_len"] = 256
    base.pop("variables")
    base["train_loader"]["local"] = base["eval_loader"]["local"] = "/data"
    base["train_loader"]["shuffle_seed"] = 17
    data = {**base, "icl_tasks": FOUNDRY_TASKS, "eval_gauntlet": FOUNDRY_GAUNTLET, "icl_subset_num_batches": 2,
            "icl_seq_len": 128, "icl_tasks_str": "...", "eval_gauntlet_str": "..."}
    t = translate(data, TrainConfig)
    assert t.problems == [], t.problems
    assert {"icl_tasks.0.dataset_uri", "eval_gauntlet.weighting"} <= set(t.dialect_keys)
    assert any(n.startswith("eval_gauntlet: weighting EQUAL -> equal") for n in t.notes)
    cfg = config_from_dict(t.data)
    assert [(x.label, x.type, x.num_fewshot) for x in cfg.icl_tasks] == [
        ("lambada", "language_modeling", [0]), ("hellaswag", "multiple_choice", [0, 1])]
    assert (cfg.icl_subset_num_batches, cfg.icl_seq_len) == (2, 128)
    assert cfg.eval_gauntlet.weighting == "equal" and cfg.eval_gauntlet.averages == {"core": ["language understanding"]}
    assert [b.random_baseline for b in cfg.eval_gauntlet.categories[0].benchmarks] == [0.0, 0.25]
    # paths to YAML files holding the lists, found next to the training YAML
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump({"icl_tasks": FOUNDRY_TASKS}))
    (tmp_path / "gauntlet.yaml").write_text(yaml.safe_dump({"eval_gauntlet": FOUNDRY_GAUNTLET}))
    t = translate({**data, "icl_tasks": "tasks.yaml", "eval_gauntlet": "gauntlet.yaml"}, TrainConfig, str(tmp_path))
    assert t.problems == [] and config_from_dict(t.data).eval_gauntlet == cfg.eval_gauntlet
    assert [x.label for x in config_from_dict(t.data).icl_tasks] == ["lambada", "hellaswag"]
    missing = translate({**data, "icl_tasks": "nope.yaml", "eval_gauntlet": "gauntlet.yaml"}, TrainConfig)
    assert [p.split(":")[0] for p in missing.problems] == ["icl_tasks", "eval_gauntlet"]
    assert "'nope.yaml': no such file" in missing.problems[0]
    # a benchmark without its task: one message naming it
    bad = {**FOUNDRY_GAUNTLET, "averages": {},
           "categories": [{"name": "x", "benchmarks": [{"name": "arc", "num_fewshot": 0}]}]}
    with pytest.raises(ConfigError, match="'arc' .* is not the label of an icl_tasks entry"):
        config_from_dict(translate({**data, "eval_gauntlet": bad}, TrainConfig).data)


def test_eval_yaml_gauntlet_of_llm_foundry(ckpts, tmp_path):
    import yaml

    from llmfoundry.eval.foundry_dialect import translate_eval
    (tmp_path / "gauntlet.yaml").write_text(yaml.safe_dump({"eval_gauntlet": FOUNDRY_GAUNTLET}))
    data = {"models": [{"model_name": "m", "load_path": ckpts[0]}], "icl_tasks": FOUNDRY_TASKS,
            "eval_gauntlet": "gauntlet.yaml", "eval_gauntlet_str": "...", "device_eval_batch_size": 4}
    t = translate_eval(data, EvalConfig, str(tmp_path))
    assert t.problems == []
    cfg = from_dict(EvalConfig, {**t.data, "results_path": None, "device": "cpu"})
    assert cfg.eval_gauntlet.weighting == "equal"
    results = evaluate(cfg)
    hs = next(r for r in results["icl"] if (r["task"], r["num_fewshot"]) == ("hellaswag", 0))
    lm = next(r for r in results["icl"] if r["task"] == "lambada")
    assert results["gauntlet"]["averages"]["core"] == pytest.approx(
        (lm["accuracy"] + (hs["accuracy"] - 0.25) / 0.75) / 2)
