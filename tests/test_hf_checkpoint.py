"""callbacks.hf_checkpoint: Hugging Face folders written while training (local, s3://, FSDP2 over 2 processes),
loaded back with transformers' MptForCausalLM / AutoTokenizer and compared with our model at the same batch."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmfoundry.checkpoint import load_composer_checkpoint, model_from_state_dict
from llmfoundry.models.mpt.hf import load_weights
from llmfoundry.train import load_config, train
from llmfoundry.utils.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "yamls" / "tiny-cpu.yaml")
TEXT = "def add(a, b):\n    return a + b  # the sum\n"
FILES = {"COMPLETE", "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json"}


def fast(tmp_path, *extra) -> list[str]:
    """tiny-cpu as a few-second run: composer checkpoints every 2 batches (and at the end) under tmp_path/ck."""
    return [f"save_folder={tmp_path}/ck", "global_train_batch_size=4", "device_train_microbatch_size=2",
            "eval_loader=null", "save_interval=2ba", "save_num_checkpoints_to_keep=-1", "autoresume=false",
            "scheduler.t_warmup=1ba", "callbacks.speed_monitor.window_size=2", *extra]


def composer_checkpoint(folder, batch: int):
    (path,) = glob.glob(os.path.join(str(folder), f"ep*-ba{batch}*"))
    return load_composer_checkpoint(path)


def assert_loads_in_transformers(folder, batch: int, state_dict, cfg, dtype=torch.float32) -> None:
    """``folder`` is a finished checkpoint of ``batch``: transformers' tokenizer encodes as the bundled one, and
    transformers' MptForCausalLM gives our model's logits (our weights cast to ``dtype``, as saved)."""
    from transformers import AutoTokenizer, GenerationConfig, MptForCausalLM

    from llmfoundry.data.tokenizer import load_tokenizer
    folder = str(folder)
    assert json.loads(Path(folder, "COMPLETE").read_text()) == {"batch": batch}
    bundled = load_tokenizer("bundled")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == bundled(TEXT)["input_ids"]
    assert GenerationConfig.from_pretrained(folder).eos_token_id == bundled.eos_token_id
    saved = load_weights(folder)
    for k, v in saved.items():
        assert v.dtype == dtype and torch.equal(v, state_dict[k].to(dtype)), k
    hf = MptForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ours = model_from_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, cfg)
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(input_ids=ids).logits
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=1e-4)


def test_every_interval_and_at_the_end_locally(tmp_path):
    """interval=2ba over 5 batches: ba2, ba4 and the final ba5, each as the composer checkpoint of that batch; the
    staging folders are gone."""
    cfg = load_config(TINY, fast(tmp_path, "max_duration=5ba", f"callbacks.hf_checkpoint.save_folder={tmp_path}"
                                 "/hf/{run_name}", "callbacks.hf_checkpoint.interval=2ba"))
    train(cfg).close()
    hf = tmp_path / "hf" / "tiny-cpu"
    assert sorted(os.listdir(hf)) == ["ba2", "ba4", "ba5"]
    for batch in (2, 4, 5):
        assert set(os.listdir(hf / f"ba{batch}")) == FILES
        sd, mcfg, _ = composer_checkpoint(tmp_path / "ck", batch)
        assert_loads_in_transformers(hf / f"ba{batch}", batch, sd, mcfg)
    assert json.loads((hf / "ba5" / "config.json").read_text())["max_seq_len"] == 256


def test_bf16_to_s3_uploads_complete_last(s3_bucket, tmp_path):
    """s3://: every file of ba2 and the final ba3 uploaded; the folder downloaded loads in transformers (bf16)."""
    import boto3
    dest = f"{s3_bucket}/hf/{{run_name}}"
    train(load_config(TINY, fast(tmp_path, "max_duration=3ba", f"callbacks.hf_checkpoint.save_folder={dest}",
                                 "callbacks.hf_checkpoint.interval=2ba",
                                 "callbacks.hf_checkpoint.precision=bf16"))).close()
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    bucket = s3_bucket[len("s3://"):]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == sorted(f"hf/tiny-cpu/ba{b}/{f}" for b in (2, 3) for f in FILES), keys
    local = tmp_path / "ba3"
    local.mkdir()
    for f in FILES:
        s3.download_file(bucket, f"hf/tiny-cpu/ba3/{f}", str(local / f))
    assert json.loads((local / "config.json").read_text())["torch_dtype"] == "bfloat16"
    sd, mcfg, _ = composer_checkpoint(tmp_path / "ck", 3)
    assert_loads_in_transformers(local, 3, sd, mcfg, dtype=torch.bfloat16)


def test_an_unexportable_model_is_refused_before_training(tmp_path):
    cfg = load_config(TINY, fast(tmp_path, "max_duration=2ba", "model.learned_pos_emb=true", "model.no_bias=false",
                                 f"callbacks.hf_checkpoint.save_folder={tmp_path}/hf"))
    with pytest.raises(ConfigError) as e:
        train(cfg)
    msg = str(e.value)
    assert msg.startswith("callbacks.hf_checkpoint: transformers' MptForCausalLM cannot represent this model")
    assert "learned_pos_emb=true" in msg and "no_bias=false" in msg
    assert not (tmp_path / "hf").exists() and not glob.glob(str(tmp_path / "ck" / "*.pt"))


def test_an_existing_folder_is_kept_unless_overwrite(tmp_path):
    old = tmp_path / "hf" / "ba2"
    old.mkdir(parents=True)
    (old / "mine.txt").write_text("keep me")
    (tmp_path / "hf" / ".ba7.k2_x9abc").mkdir()  # a staging folder an interrupted save left behind
    args = ["max_duration=2ba", f"callbacks.hf_checkpoint.save_folder={tmp_path}/hf",
            "callbacks.hf_checkpoint.interval=2ba"]
    train(load_config(TINY, fast(tmp_path / "a", *args))).close()
    assert os.listdir(tmp_path / "hf") == ["ba2"] and os.listdir(old) == ["mine.txt"]
    train(load_config(TINY, fast(tmp_path / "b", *args, "callbacks.hf_checkpoint.overwrite=true"))).close()
    assert os.listdir(tmp_path / "hf") == ["ba2"] and set(os.listdir(old)) == FILES


@pytest.mark.parametrize("interval", ["1ep", "0ba", "0"])
def test_only_batch_intervals(tmp_path, interval):
    with pytest.raises(ConfigError, match="callbacks.hf_checkpoint: 'interval' = "):
        load_config(TINY, fast(tmp_path, "callbacks.hf_checkpoint.save_folder=hf",
                               f"callbacks.hf_checkpoint.interval={interval}"))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [["fsdp.version=2", "fsdp.mixed_precision=FULL"], []], ids=["fsdp2", "ddp"])
def test_two_processes_gathered_on_rank0(tmp_path, parallel):
    """composer -n 2, FSDP2 or DDP over gloo: the (sharded) weights are gathered, rank 0 writes ba2 and the final
    ba3, and they equal the composer checkpoints of those batches (sharded folders under FSDP2)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUN_NAME", None)
    args = [TINY, *fast(tmp_path, "max_duration=3ba", "device_train_microbatch_size=1", *parallel,
                        f"callbacks.hf_checkpoint.save_folder={tmp_path}/hf", "callbacks.hf_checkpoint.interval=2ba")]
    cmd = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--stdout", str(logs / "rank{rank}.out"),
           "--stderr", str(logs / "rank{rank}.err"), str(REPO / "scripts" / "train.py"), *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + "".join(f.read_text()[-2000:] for f in logs.glob("rank*.err"))
    assert sorted(os.listdir(tmp_path / "hf")) == ["ba2", "ba3"]
    assert os.path.isdir(tmp_path / "ck" / "ep0-ba3") == bool(parallel)  # FSDP2: a sharded checkpoint folder
    for batch in (2, 3):
        sd, mcfg, _ = composer_checkpoint(tmp_path / "ck", batch)
        assert_loads_in_transformers(tmp_path / "hf" / f"ba{batch}", batch, sd, mcfg)
