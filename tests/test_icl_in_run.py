"""ICL evaluation inside a training run (llmfoundry/train/callbacks/icl_eval.py): the metrics at each eval point, read back from
TensorBoard, equal what scripts/eval.py computes on the checkpoint saved at that batch; the run's weights are
bit-identical to the same run without it; the schedule without an eval loader; the errors before training."""
from __future__ import annotations

import pytest

from llmfoundry.eval.evaluate import EvalConfig, evaluate
from llmfoundry.train import load_config, train
from llmfoundry.train import main as train_main
from llmfoundry.train.callbacks.icl_eval import InRunICL, limited_tasks
from llmfoundry.utils.config import ConfigError, from_dict

from conftest import assert_same_weights, checkpoint_state
from test_train import TINY, run_cli

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

TASKS = ("[{label: lambada, path: lambada_tiny.jsonl, type: language_modeling, num_fewshot: [0, 1], max_examples: 3},"
         " {label: piqa, path: piqa_tiny.jsonl, type: multiple_choice},"
         " {label: schema, path: schema_tiny.jsonl, type: schema},"
         " {label: qa, path: qa_tiny.jsonl, type: generation_task_with_answers, max_new_tokens: 4}]")
GAUNTLET = ("{categories: [{name: lm, benchmarks: [{name: lambada, num_fewshot: 0}, {name: lambada, num_fewshot: 1}]},"
            " {name: choice, benchmarks: [{name: piqa}, {name: schema}]}, {name: qa, benchmarks: [{name: qa}]}],"
            " averages: {no_qa: [lm, choice]}}")
ICL = [f"icl_tasks={TASKS}", f"eval_gauntlet={GAUNTLET}",
       "icl_subset_num_batches=1"]  # 1 x device_eval_batch_size = 4 examples per task (lambada: its own 3)
METRICS = ["icl/lambada/0shot", "icl/lambada/1shot", "icl/piqa/0shot", "icl/schema/0shot", "icl/qa/0shot",
           "icl/gauntlet/lm", "icl/gauntlet/choice", "icl/gauntlet/qa", "icl/gauntlet/average", "icl/gauntlet/no_qa"]


def short(save_folder, tb, *extra) -> list[str]:
    """tiny-cpu for 4 batches of 4 samples, evaluated (and saved) every 2."""
    return [f"save_folder={save_folder}", "global_train_batch_size=4", "device_train_microbatch_size=2",
            "device_eval_batch_size=4", "max_duration=4ba", "eval_interval=2ba", "eval_subset_num_batches=1",
            "save_interval=2ba", "save_num_checkpoints_to_keep=-1", "console_log_interval=1ba",
            "scheduler.t_warmup=2ba", "callbacks.speed_monitor.window_size=2", f"loggers.tensorboard.log_dir={tb}",
            "loggers.tensorboard.flush_interval=1", *extra]


def scalars(log_dir, tag: str) -> dict[int, float]:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same short run with and without in-run ICL (scripts/train.py)."""
    root = tmp_path_factory.mktemp("icl_in_run")
    out = {}
    for name, extra in (("icl", ICL), ("plain", [])):
        r = run_cli([TINY, *short(root / name / "ck", root / name / "tb", *extra)])
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        out[name] = (root / name, r.stdout + r.stderr)
    return out


def test_metrics_logged_at_each_eval_point_equal_scripts_eval_on_the_checkpoint(runs):
    folder, log = runs["icl"]
    assert "in-run ICL at batch 2" in log and "in-run ICL at batch 4" in log
    logged = {tag: scalars(folder / "tb" / "tiny-cpu", tag) for tag in METRICS}
    for tag, by_step in logged.items():
        assert sorted(by_step) == [2, 4], tag
    # scripts/eval.py on the checkpoint saved at batch 4, with the examples the run evaluated
    cfg = load_config(TINY, ICL)
    tasks = [dict(label=t.label, path=t.path, type=t.type, num_fewshot=t.num_fewshot, max_examples=t.max_examples,
                  max_new_tokens=t.max_new_tokens) for t in limited_tasks(cfg.icl_tasks, 1, 4)]
    assert [t["max_examples"] for t in tasks] == [3, 4, 4, 4]
    (ckpt,) = (folder / "ck").glob("ep*-ba4-rank0.pt")
    results = evaluate(from_dict(EvalConfig, {
        "load_path": str(ckpt), "device": "cpu", "precision": "fp32", "device_eval_batch_size": 4,
        "icl_tasks": tasks, "results_path": None, "eval_gauntlet": {
            "categories": [{"name": c.name, "benchmarks": [vars(b) for b in c.benchmarks]}
                           for c in cfg.eval_gauntlet.categories], "averages": cfg.eval_gauntlet.averages}}))
    assert [(r["task"], r["num_examples"]) for r in results["icl"]] == [
        ("lambada", 3), ("lambada", 3), ("piqa", 4), ("schema", 4), ("qa", 4)]
    for r in results["icl"]:
        assert logged[f"icl/{r['task']}/{r['num_fewshot']}shot"][4] == pytest.approx(r["accuracy"], abs=1e-6)
    g = results["gauntlet"]
    for name, score in [*((k, v["score"]) for k, v in g["categories"].items()), *g["averages"].items()]:
        assert logged[f"icl/gauntlet/{name}"][4] == pytest.approx(score, abs=1e-6), name


def test_weights_bit_identical_with_and_without_in_run_icl(runs):
    (icl, icl_log), (plain, plain_log) = runs["icl"], runs["plain"]
    assert "in-run ICL" not in plain_log
    for batch in (2, 4):
        a, b = checkpoint_state(icl / "ck", batch), checkpoint_state(plain / "ck", batch)
        assert_same_weights(a, b)
        counts = ("epoch", "batch", "sample", "token")  # (the timestamps' wall-clock times differ)
        assert [a["timestamp"]["Timestamp"][k] for k in counts] == [b["timestamp"]["Timestamp"][k] for k in counts]
        assert a["dataset_state"] == b["dataset_state"]
    loss = "loss/train/total"
    assert scalars(icl / "tb" / "tiny-cpu", loss) == scalars(plain / "tb" / "tiny-cpu", loss)


def test_without_an_eval_loader_on_the_eval_interval_and_at_the_end(tmp_path):
    """No eval loader: composer's interval schedule (every 2 batches, and after the last one, 5)."""
    cfg = load_config(TINY, [
        f"save_folder={tmp_path}/ck", "eval_loader=null", "global_train_batch_size=2", "device_train_microbatch_size=2",
        "max_duration=5ba", "eval_interval=2ba", "save_interval=100ba", "scheduler.t_warmup=1ba",
        "icl_tasks=[{label: piqa, path: piqa_tiny.jsonl, type: multiple_choice, max_examples: 2}]",
        "eval_gauntlet={categories: [{name: c, benchmarks: [{name: piqa, random_baseline: 0.0}]}]}"])
    trainer = train(cfg)
    try:
        (cb,) = [c for c in trainer.state.callbacks if isinstance(c, InRunICL)]
        assert [b for b, _ in cb.history] == [2, 4, 5]
        for _, metrics in cb.history:
            assert set(metrics) == {"icl/piqa/0shot", "icl/gauntlet/c", "icl/gauntlet/average"}
            assert metrics["icl/gauntlet/c"] == metrics["icl/piqa/0shot"]  # random_baseline 0: the accuracy
        assert trainer.state.model.training  # train mode restored
    finally:
        trainer.close()


def test_config_errors_before_training(tmp_path, capsys):
    task = "{label: piqa, path: piqa_tiny.jsonl, type: multiple_choice}"
    for overrides, message in [
        ([f"icl_tasks=[{task}, {task}]"], r"icl_tasks labels must be unique; repeated: \['piqa'\]"),
        ([f"icl_tasks=[{task}]", "icl_seq_len=512"], r"'icl_seq_len' = 512 must be between 1 and model.max_seq_len"),
        ([f"icl_tasks=[{task}]", "icl_subset_num_batches=0"], "'icl_subset_num_batches' = 0 must be >= 1"),
        (["eval_gauntlet={categories: [{name: c, benchmarks: [{name: piqa}]}]}"],
         "'eval_gauntlet' scores the icl_tasks, and icl_tasks is empty"),
        ([f"icl_tasks=[{task}]", "eval_gauntlet={categories: [{name: c, benchmarks: [{name: arc}]}]}"],
         r"eval_gauntlet.categories\[0\].benchmarks\[0\]: 'arc' \(category 'c'\) is not the label of an icl_tasks "
         r"entry \(labels: piqa\); add that task to icl_tasks or remove the benchmark"),
        ([f"icl_tasks=[{task}]",
          "eval_gauntlet={categories: [{name: c, benchmarks: [{name: piqa, num_fewshot: 2}]}]}"],
         r"'piqa' at num_fewshot=2 is not evaluated \(the task's num_fewshot: \[0\]\); add 2 to that task's "
         r"num_fewshot"),
        ([f"icl_tasks=[{task}]",
          "eval_gauntlet={categories: [{name: c, benchmarks: [{name: piqa, random_baseline: 1}]}]}"],
         r"random_baseline = 1.0 must be in \[0, 1\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(TINY, overrides)
    assert load_config(TINY, ["icl_tasks=null"]).icl_tasks == []
    # task files are read before training: a missing file or too few examples for the shots is one line, exit 1
    for task, message in [
        ("{label: x, path: nope.jsonl, type: language_modeling}", "icl_tasks.0 ('x'): ICL task file 'nope.jsonl' "
                                                                  "not found"),
        ("{label: p, path: piqa_tiny.jsonl, type: multiple_choice, num_fewshot: [10]}",
         "icl_tasks.0 ('p'): num_fewshot=10 needs at least 11 examples in piqa_tiny.jsonl, it has 10"),
        ("{label: p, path: piqa_tiny.jsonl, type: schema}", "icl_tasks.0 ('p'): "),
    ]:
        assert train_main([TINY, f"save_folder={tmp_path}/ck", f"icl_tasks=[{task}]"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: " + message) and err.count("\n") == 1, err
    assert not (tmp_path / "ck").exists()  # nothing left behind



FSDP_TASKS = ("[{label: piqa, path: piqa_tiny.jsonl, type: multiple_choice, max_examples: 3},"
              " {label: qa, path: qa_tiny.jsonl, type: generation_task_with_answers, max_new_tokens: 4,"
              " max_examples: 3},"
              " {label: lambada, path: lambada_tiny.jsonl, type: language_modeling, max_examples: 3}]")


def sharded_run(tmp_path, *extra):
    """tiny-cpu on 2 ranks for 2 batches, in-run ICL (with a generation task) and a gauntlet at batch 2; returns
    (rank 0's output, {'<label>/0shot': accuracy} from its 'in-run ICL' log line)."""
    from test_train_multiprocess import explain, launch
    args = [TINY, f"save_folder={tmp_path}/ck", "global_train_batch_size=4", "device_train_microbatch_size=1",
            "device_eval_batch_size=2", "max_duration=2ba", "eval_interval=2ba", "eval_subset_num_batches=1",
            "save_interval=2ba", "console_log_interval=1ba", f"icl_tasks={FSDP_TASKS}",
            "eval_gauntlet={categories: [{name: c, benchmarks: [{name: piqa}, {name: qa}]}]}", *extra]
    r = launch(2, args, tmp_path / "logs")
    assert r.returncode == 0, explain(r, tmp_path / "logs")
    out = r.stdout + r.stderr
    (line,) = [x for x in out.splitlines() if "in-run ICL at batch 2" in x]
    assert "in-run ICL" not in (tmp_path / "logs" / "rank1.err").read_text()  # rank 0 logs
    return out, dict(kv.rsplit(" ", 1) for kv in line.split("): ", 1)[1].split(", "))


@pytest.mark.slow
def test_fsdp2_two_processes_evaluate_in_lockstep(tmp_path):
    """FSDP2 on CPU (gloo), 2 ranks: every rank runs every forward (each gathers the sharded weights) and
    generation stops at the same step on both (rank 0's logits); rank 0 logs, and the numbers equal scripts/eval.py
    on the sharded checkpoint."""
    _, logged = sharded_run(tmp_path, "fsdp.version=2", "fsdp.mixed_precision=FULL")
    cfg = load_config(TINY, [f"icl_tasks={FSDP_TASKS}"])
    results = evaluate(from_dict(EvalConfig, {
        "load_path": str(tmp_path / "ck" / "ep0-ba2"), "device": "cpu", "precision": "fp32",
        "device_eval_batch_size": 2, "results_path": None,
        "icl_tasks": [dict(label=t.label, path=t.path, type=t.type, max_examples=t.max_examples,
                           max_new_tokens=t.max_new_tokens) for t in cfg.icl_tasks]}))
    for row in results["icl"]:
        assert float(logged[f"{row['task']}/0shot"]) == pytest.approx(row["accuracy"], abs=5e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [2, 1])
def test_gpu_fsdp_bf16_in_run_icl(tmp_path, version):
    """FSDP1 and FSDP2 on 2 GPUs (NCCL), PURE bf16, meta-device init: in-run ICL with generation completes on both
    ranks (no rank waits in a collective the other skipped)."""
    import torch
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    out, logged = sharded_run(tmp_path, "precision=amp_bf16", f"fsdp.version={version}", "fsdp.mixed_precision=PURE",
                              "model.init_device=meta")
    assert set(logged) == {"piqa/0shot", "qa/0shot", "lambada/0shot", "gauntlet/c", "gauntlet/average"}
