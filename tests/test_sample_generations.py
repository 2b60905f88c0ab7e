"""callbacks.sample_generations: samples from fixed prompts while training (log lines, logger tables,
{save_folder}/samples.jsonl) that equal what llmfoundry.generate writes from the checkpoint of that batch, a run
trained to the same weights bit for bit as without the callback, DDP and FSDP2 ranks (rank 0 writes, no hang),
the config errors, and llm-foundry's generate_callback translated."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmfoundry.train import build_trainer, load_config
from llmfoundry.train.callbacks.sample_generations import (SAMPLES_FILE, complete, console_line, drop_samples_after,
                                                 eval_mode, log_table, rng_kept)
from llmfoundry.utils.config import ConfigError

from conftest import assert_same_weights, checkpoint_state

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "yamls" / "tiny-cpu.yaml")
PROMPTS = ["def ", "import "]
NEW_TOKENS = 16
SAMPLES = ("callbacks.sample_generations={prompts: ['def ', 'import '], interval: 2ba, "
           f"max_new_tokens: {NEW_TOKENS}}}")


def fast(save_folder, *extra) -> list[str]:
    """tiny-cpu as a 4-batch run without evaluation, a checkpoint every 2 batches; dropout on, so that a model
    left in eval mode (or a changed random state) after sampling would train differently."""
    return [f"save_folder={save_folder}", "global_train_batch_size=4", "device_train_microbatch_size=2",
            "max_duration=4ba", "save_interval=2ba", "save_num_checkpoints_to_keep=-1", "eval_loader=null",
            "console_log_interval=1ba", "scheduler.t_warmup=2ba", "scheduler.t_max=4ba", "model.resid_pdrop=0.1",
            "model.emb_pdrop=0.1", "callbacks.speed_monitor.window_size=2", *extra]


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUN_NAME", None)
    return env


def run_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def launch(nproc: int, args: list[str], logs: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``composer -n nproc scripts/train.py ARGS`` (each rank's output also under ``logs``)."""
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "composer.cli.launcher", "-n", str(nproc), "--stdout", str(logs / "rank{rank}.out"),
           "--stderr", str(logs / "rank{rank}.err"), str(REPO / "scripts" / "train.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def samples(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / SAMPLES_FILE).read_text().splitlines()]


def generated(checkpoint) -> list[str]:
    """llmfoundry.generate's greedy completions of PROMPTS from a composer checkpoint (its own tokenizer)."""
    from llmfoundry.checkpoint import load_model
    from llmfoundry.data.tokenizer import load_tokenizer
    from llmfoundry.generate import SamplingConfig, generate_texts
    model, tokenizer = load_model(str(checkpoint))
    return generate_texts(model, load_tokenizer(tokenizer), PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4-batch run with and without the callback."""
    out = {}
    for name, extra in (("with", [SAMPLES]), ("without", [])):
        folder = tmp_path_factory.mktemp(name) / "ck"
        r = run_cli([TINY, *fast(folder), *extra])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out[name] = folder, r
    return out


# ------------------------------------------------------------------------------------------ single process
def test_samples_logged_written_and_equal_to_generate(runs):
    """Rows for batches 2 and 4 (the end is batch 4: no extra round), a log line per prompt, and each greedy
    completion equal to llmfoundry.generate's from the checkpoint of that batch."""
    folder, r = runs["with"]
    rows = samples(folder)
    assert [(x["batch"], x["prompt"]) for x in rows] == [(b, p) for b in (2, 4) for p in PROMPTS]
    assert all(isinstance(x["completion"], str) for x in rows) and any(x["completion"].strip() for x in rows)
    out = r.stdout + r.stderr
    for b in (2, 4):
        for p in PROMPTS:
            assert f"sample @ba{b} | {p} -> " in out
        assert [x["completion"] for x in rows if x["batch"] == b] == generated(folder / f"ep0-ba{b}-rank0.pt"), b
    assert not (runs["without"][0] / SAMPLES_FILE).exists()


def test_training_unchanged_bit_for_bit(runs):
    """Weights and LION momenta at batches 2 and 4 equal those of the run without the callback (dropout on)."""
    for b in (2, 4):
        assert_same_weights(checkpoint_state(runs["with"][0], b), checkpoint_state(runs["without"][0], b))


def test_resumed_run_drops_rows_after_its_checkpoint(runs, tmp_path):
    """A run that continues from batch 2 (as after a crash past it) first drops the rows of batches after 2, then
    samples batch 4 again: each batch once in the file, batch 4 as generated from the new batch-4 checkpoint."""
    import shutil
    folder = tmp_path / "ck"
    shutil.copytree(runs["with"][0], folder, symlinks=True)
    os.remove(folder / "ep0-ba4-rank0.pt")
    os.remove(folder / "latest-rank0.pt")
    os.symlink("ep0-ba2-rank0.pt", folder / "latest-rank0.pt")
    r = run_cli([TINY, *fast(folder), SAMPLES])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropped 2 lines" in r.stdout + r.stderr and "sample @ba2 |" not in r.stdout + r.stderr
    rows = samples(folder)
    assert [(x["batch"], x["prompt"]) for x in rows] == [(b, p) for b in (2, 4) for p in PROMPTS]
    assert rows[:2] == samples(runs["with"][0])[:2]
    assert [x["completion"] for x in rows[2:]] == generated(folder / "ep0-ba4-rank0.pt")


# ------------------------------------------------------------------------------------------ several ranks
@pytest.mark.parametrize("parallel", [[], ["fsdp.version=2", "fsdp.mixed_precision=FULL"]], ids=["ddp", "fsdp2"])
def test_two_ranks_write_once_without_hang(tmp_path, parallel):
    """2 ranks: DDP (rank 0 alone generates) and FSDP2 (both generate in lockstep): one file, written by rank 0,
    each round once, the end (batch 3) sampled too."""
    logs = tmp_path / "logs"
    r = launch(2, [TINY, *fast(tmp_path / "ck", "max_duration=3ba", "scheduler.t_max=3ba"), SAMPLES, *parallel],
               logs)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:] + (logs / "rank1.err").read_text()[-2000:]
    rows = samples(tmp_path / "ck")
    assert [(x["batch"], x["prompt"]) for x in rows] == [(b, p) for b in (2, 3) for p in PROMPTS]
    assert "sample @ba3 | def  -> " in r.stdout + r.stderr
    assert "sample @ba" not in (logs / "rank1.err").read_text() + (logs / "rank1.out").read_text()


# ------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("value, message", [
    ("{prompts: [], interval: 2ba}", "'prompts' is empty"),
    ("{prompts: [a, ''], interval: 2ba}", "'prompts[1]' is empty"),
    ("{prompts: [a], interval: 1ep}", "'interval' = '1ep' is not a number of batches"),
    ("{prompts: [a], interval: 1000tok}", "'interval' = '1000tok' is not a number of batches"),
    ("{prompts: [a], interval: 0}", "'interval' = 0 is not a number of batches"),
    ("{prompts: [a], top_k: 5}", "temperature=0 is greedy decoding"),
    ("{prompts: [a], max_new_tokens: 0}", "max_new_tokens=0 must be >= 1"),
    ("{prompts: [a], batch_size: 0}", "'batch_size' = 0 must be >= 1"),
    ("{interval: 2ba}", "missing required config key 'callbacks.sample_generations.prompts'"),
])
def test_config_errors(value, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"callbacks.sample_generations={value}"])
    assert message in str(e.value) and "callbacks.sample_generations" in str(e.value)


def test_off_by_default():
    assert load_config(TINY).callbacks.sample_generations is None


def test_prompt_too_long_refused_before_training(tmp_path):
    """Checked with the run's tokenizer when the trainer is built: the prompt's index and the lengths; no save
    folder is left behind."""
    from llmfoundry.data.tokenizer import load_tokenizer
    long = "x = 1\n" * 62
    n = len(load_tokenizer("bundled")(long)["input_ids"])
    assert n + NEW_TOKENS > 256 and n < 256
    cfg = load_config(TINY, [f"save_folder={tmp_path}/ck", "autoresume=false", "eval_loader=null",
                             f"callbacks.sample_generations={{prompts: [ok, {json.dumps(long)}], "
                             f"max_new_tokens: {NEW_TOKENS}}}"])
    with pytest.raises(ConfigError) as e:
        build_trainer(cfg)
    assert (f"callbacks.sample_generations.prompts[1] is {n} tokens long and max_new_tokens = {NEW_TOKENS}: "
            f"{n + NEW_TOKENS} positions, more than model.max_seq_len = 256. Shorten the prompt to at most "
            f"{256 - NEW_TOKENS} tokens, or lower max_new_tokens to {256 - n}") in str(e.value)
    assert not (tmp_path / "ck").exists()


# ------------------------------------------------------------------------------------------ the pieces
def test_generation_keeps_random_state_and_modes():
    """Sampling with a seed repeats; the global random state and every module's mode are as before (also a
    module in eval mode inside a training model); lockstep greedy decoding (all max_new_tokens steps) gives the
    same tokens as stopping at EOS."""
    from llmfoundry.generate import SamplingConfig
    from llmfoundry.models.mpt import MPTForCausalLM
    torch.manual_seed(0)
    model = MPTForCausalLM(load_config(TINY).model)
    model.train()
    model.transformer.blocks[0].eval()
    modes = [m.training for m in model.modules()]
    state = torch.get_rng_state()
    prompts = [[5, 6, 7], [8]]

    def run(sampling, lockstep=False):
        with rng_kept(), eval_mode(model), torch.no_grad():
            assert not model.training
            torch.rand(3)  # whatever happens inside
            return complete(model, prompts, sampling, 1, pad_id=0, eos_id=3, device="cpu", lockstep=lockstep)

    sampled = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=50, seed=3)
    first = run(sampled)
    assert first == run(sampled) and len(first) == 2
    assert run(SamplingConfig(max_new_tokens=8)) == run(SamplingConfig(max_new_tokens=8), lockstep=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert [m.training for m in model.modules()] == modes


def test_console_line_and_file_helpers(tmp_path):
    line = console_line(7, "def f():\n\t", "x" * 250 + "\nmore")
    assert line.startswith("sample @ba7 | def f():\\n\\t -> " + "x" * 200 + " ... (+")
    assert "\n" not in line
    path = str(tmp_path / SAMPLES_FILE)
    for b in (2, 4, 6):
        with open(path, "a") as f:
            f.write(json.dumps({"batch": b, "prompt": "p", "completion": "c"}) + "\n")
    assert drop_samples_after(path, 4) == 1
    assert [x["batch"] for x in samples(tmp_path)] == [2, 4]
    assert drop_samples_after(path, 4) == 0 and drop_samples_after(str(tmp_path / "none"), 0) == 0


def test_table_goes_to_loggers_but_not_the_console():
    """The console logger would print every table again at each console log; it is left out."""
    from composer.loggers import ConsoleLogger, InMemoryLogger, Logger
    memory, console = InMemoryLogger(), ConsoleLogger()
    log_table(Logger(state=None, destinations=[memory, console]), 4, ["a", "b"], ["x", "y"])
    table = json.loads(memory.tables["samples"])
    assert table["columns"] == ["batch", "prompt", "completion"] and table["data"] == [[4, "a", "x"], [4, "b", "y"]]
    assert console.tables == {}


# ------------------------------------------------------------------------------------------ llm-foundry's YAML
def test_foundry_generate_callback_translates():
    """llm-foundry's generate_callback: interval or batch_log_interval (batches), greedy unless do_sample (then
    transformers' temperature 1.0 / top_k 50), use_cache dropped; an epoch interval and beam search refused."""
    from llmfoundry.train.config import TrainConfig
    from llmfoundry.train.foundry_dialect import translate
    t = translate({"callbacks": {"generate_callback": {"prompts": ["a", "b"], "interval": "100ba", "top_k": 5,
                                                       "max_new_tokens": 20, "use_cache": True}}}, TrainConfig)
    assert not t.problems and t.dialect_keys == ["callbacks.generate_callback"]
    assert t.data["callbacks"] == {"sample_generations": {"prompts": ["a", "b"], "interval": "100ba",
                                                          "max_new_tokens": 20}}
    t = translate({"callbacks": {"generate_callback": {"prompts": ["a"], "batch_log_interval": 50, "do_sample": True,
                                                       "top_p": 0.9, "batch_size": 2}}}, TrainConfig)
    assert not t.problems
    assert t.data["callbacks"]["sample_generations"] == {"prompts": ["a"], "interval": "50ba", "batch_size": 2,
                                                         "temperature": 1.0, "top_k": 50, "top_p": 0.9}
    t = translate({"callbacks": {"generate_callback": {"prompts": ["a"], "interval": 1, "num_beams": 4}}},
                  TrainConfig)
    assert sorted(p.split(":")[0] for p in t.problems) == ["callbacks.generate_callback.interval",
                                                           "callbacks.generate_callback.num_beams"]
