"""Checkpoints written by llm-foundry's trainer: a composer ``HuggingFaceModel`` around an MPT, its config.json and
tokenizer files in ``state['integrations']['huggingface']``, LION's momentum as ``exp_avg``. Built here for real
(llm-foundry is not installed): transformers' ``MptForCausalLM`` (the same parameter names as llm-foundry's MPT)
in composer's ``HuggingFaceModel``, trained 2 batches by a composer ``Trainer`` that saves to a folder; the
optimizer is our LION under llm-foundry's class name (same state layout), as composer files optimizer state by
class name. Then eval, generate, export and train.py read it."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from llmfoundry.checkpoint import CheckpointError, convert_composer_to_hf, load_composer_checkpoint, load_model
from llmfoundry.data.tokenizer import load_tokenizer
from llmfoundry.train.lion import Lion
from llmfoundry.utils.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "yamls" / "tiny-cpu.yaml")
TEXT = "def add(a, b):\n    return a + b\n"


class DecoupledLionW(Lion):
    """llm-foundry's LION class name: composer keys the optimizer state by it."""


def _train_foundry_style(folder: Path, optimizer_cls, batches: int = 2):
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from torch.utils.data import DataLoader
    from transformers import MptConfig, MptForCausalLM

    tok = load_tokenizer("bundled")
    torch.manual_seed(0)
    hf = MptForCausalLM(MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=4, max_seq_len=256,
                                  vocab_size=len(tok)))
    model = HuggingFaceModel(hf, tokenizer=tok, use_logits=True, shift_labels=True)
    ids = torch.randint(0, len(tok), (4 * batches, 16))
    loader = DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=4)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f"{batches}ba",
                      optimizers=optimizer_cls(model.parameters(), lr=1e-3), save_folder=str(folder / "ckpt"),
                      save_interval=f"{batches}ba", device="cpu", progress_bar=False, log_to_console=False)
    trainer.fit()
    return trainer, hf


@pytest.fixture(scope="module")
def foundry(tmp_path_factory):
    import torch.distributed.checkpoint as dcp
    from composer.utils import reproducibility

    d = tmp_path_factory.mktemp("foundry")
    trainer, hf = _train_foundry_style(d, DecoupledLionW)
    try:
        # composer's sharded save (checkpoint._save_checkpoint) is dcp.save of this dict into the folder
        dcp.save({"state": trainer.state.state_dict(), "rng": reproducibility.get_rng_state()},
                 storage_writer=dcp.FileSystemWriter(str(d / "sharded" / "ep0-ba2")), no_dist=True)
    finally:
        trainer.close()
    hf.eval()
    whole = str(d / "ckpt" / "ep0-ba2-rank0.pt")
    ckpt = torch.load(whole, map_location="cpu", weights_only=False)["state"]
    assert "DecoupledLionW" in ckpt["optimizers"] and "huggingface" in ckpt["integrations"]
    return {"dir": d, "whole": whole, "sharded": str(d / "sharded" / "ep0-ba2"), "hf": hf,
            "weights": {k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
            "exp_avg": ckpt["optimizers"]["DecoupledLionW"]["state"]}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_reads_config_tokenizer_and_weights_from_the_metadata(foundry):
    for path in (foundry["whole"], foundry["sharded"]):
        sd, cfg, tok_dir = load_composer_checkpoint(path)
        assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.max_seq_len) == (64, 2, 4, 4096, 256)
        assert cfg.attn_config.alibi and not cfg.learned_pos_emb and cfg.no_bias and cfg.tie_word_embeddings
        assert set(sd) == set(foundry["weights"])  # the tied lm_head copy is dropped
        for k, v in foundry["weights"].items():
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)
        assert os.path.isfile(os.path.join(tok_dir, "tokenizer.json"))
        assert load_tokenizer(tok_dir)(TEXT)["input_ids"] == load_tokenizer("bundled")(TEXT)["input_ids"]
    model, tok_dir = load_model(foundry["whole"])
    ids = torch.tensor([load_tokenizer(tok_dir)(TEXT)["input_ids"]])
    torch.testing.assert_close(_logits(model, ids), _logits(foundry["hf"], ids), rtol=0, atol=1e-5)


def test_generate_and_export(foundry, tmp_path):
    from transformers import AutoTokenizer, MptForCausalLM

    from llmfoundry.generate import SamplingConfig, generate_texts, load_for_generation
    model, tok, _ = load_for_generation(foundry["whole"], device="cpu", dtype="fp32")
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    ours = generate_texts(model, tok, [TEXT], SamplingConfig(max_new_tokens=8, stop_at_eos=False))
    theirs = foundry["hf"].generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == [tok.decode(theirs[0, ids.shape[1]:], skip_special_tokens=True)]

    out = convert_composer_to_hf(foundry["whole"], str(tmp_path / "hf"))
    exported = MptForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"] == ids[0].tolist()
    torch.testing.assert_close(_logits(exported, ids), _logits(foundry["hf"], ids), rtol=0, atol=1e-5)
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_composer_to_hf.py"), foundry["sharded"],
                        str(tmp_path / "hf2"), "--verify"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "max |logit diff|" in r.stdout, r.stderr


def test_eval_scores_it_as_transformers_does(foundry):
    from llmfoundry.eval.evaluate import EvalConfig, evaluate
    from llmfoundry.eval.icl import evaluate_icl_task
    from llmfoundry.eval.icl_tasks import ICLTaskConfig
    from llmfoundry.utils.config import from_dict
    task = {"label": "piqa", "path": str(REPO / "llmfoundry/assets/icl/piqa_tiny.jsonl"), "type": "multiple_choice"}
    ours = evaluate(from_dict(EvalConfig, {"load_path": foundry["whole"], "icl_tasks": [task], "results_path": None,
                                           "device": "cpu"}))
    theirs = evaluate_icl_task(foundry["hf"], load_tokenizer("bundled"), ICLTaskConfig(**task), max_seq_len=256)
    assert ours["icl"][0]["predictions"] == theirs[0]["predictions"]


def _run(tmp_path, *overrides):
    from llmfoundry.train import load_config
    return load_config(TINY, [f"save_folder={tmp_path}/ck", "max_duration=1ba", "eval_loader=null",
                              "autoresume=false", "model.d_model=64", "global_train_batch_size=4",
                              "device_train_microbatch_size=4", "callbacks.speed_monitor=null",
                              "callbacks.runtime_estimator=false", "log_to_console=false", *overrides])


def test_train_starts_from_its_weights(foundry, tmp_path, caplog, monkeypatch):
    from llmfoundry.train import train
    caplog.set_level("INFO")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the converted copy is kept
    # the first warmup step has lr 0, so the checkpoint after it holds the weights as loaded
    train(_run(tmp_path, f"load_path={foundry['whole']}", "load_weights_only=true")).close()
    assert f"starting from the llm-foundry checkpoint {foundry['whole']}" in caplog.text
    assert not glob.glob(str(tmp_path / "tmp" / "mpt-forge-pretrained-*"))
    (ckpt,) = glob.glob(str(tmp_path / "ck" / "ep*-ba1-rank0.pt"))
    model = torch.load(ckpt, map_location="cpu", weights_only=False)["state"]["model"]
    assert set(model) == {f"model.{k}" for k in foundry["weights"]}
    for k, v in foundry["weights"].items():
        torch.testing.assert_close(model[f"model.{k}"], v, rtol=0, atol=0, msg=k)


def test_train_refuses_another_architecture_naming_each_setting(foundry, tmp_path):
    from llmfoundry.train import train
    with pytest.raises(ConfigError) as e:
        train(_run(tmp_path, f"load_path={foundry['whole']}", "load_weights_only=true", "model.d_model=128",
                   "model.n_layers=3", "model.learned_pos_emb=true", "model.attn_config.alibi=false"))
    msg = str(e.value)
    assert msg.startswith(f"load_path {foundry['whole']} is a checkpoint of another architecture")
    for part in ("model.d_model: the YAML says 128, the checkpoint's config says 64",
                 "model.n_layers: the YAML says 3, the checkpoint's config says 2",
                 "model.learned_pos_emb: the YAML says True, the checkpoint's config says False",
                 "model.attn_config.alibi: the YAML says False, the checkpoint's config says True"):
        assert part in msg, msg
    assert not glob.glob(str(tmp_path / "ck" / "*.pt"))


def test_full_resume_keeps_step_and_lion_momentum(foundry, tmp_path, monkeypatch):
    """``load_path`` of it with ``load_weights_only: false`` (the default): the run continues at batch 2 with the
    checkpoint's LION momentum (filed under our optimizer's class), then trains on."""
    from llmfoundry.train import build_trainer
    from llmfoundry.train.pretrained import start_point
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    cfg = _run(tmp_path, f"load_path={foundry['whole']}", "max_duration=3ba")
    path, weights_only = start_point(cfg, cfg.load_path)
    assert not weights_only and os.path.isfile(path)
    trainer = build_trainer(cfg)  # train.py's own path: start_point inside
    try:
        assert int(trainer.state.timestamp.batch) == 2
        opt = trainer.state.optimizers[0]
        params = dict(trainer.state.model.named_parameters())
        for name, saved in foundry["exp_avg"].items():
            torch.testing.assert_close(opt.state[params[name]]["exp_avg"], saved["exp_avg"], rtol=0, atol=0)
        trainer.fit()
        assert int(trainer.state.timestamp.batch) == 3
    finally:
        trainer.close()
    cfg = _run(tmp_path, f"load_path={foundry['whole']}", "optimizer.name=adamw")
    with pytest.raises(ConfigError, match="holds the optimizer state of DecoupledLionW but the run's optimizer is "
                                          "'adamw'; set optimizer.name: lion to continue that run, or "
                                          "load_weights_only: true"):
        start_point(cfg, cfg.load_path)
    cfg = _run(tmp_path, f"load_path={foundry['sharded']}")
    with pytest.raises(ConfigError, match="is a sharded llm-foundry checkpoint: .* set load_weights_only: true"):
        start_point(cfg, cfg.load_path)


def test_full_resume_with_adamw(tmp_path, monkeypatch):
    """composer's DecoupledAdamW (llm-foundry's AdamW) is ours: its state loads under the same name."""
    from composer.optim import DecoupledAdamW

    from llmfoundry.train import build_trainer
    from llmfoundry.train.pretrained import start_point
    trainer, _ = _train_foundry_style(tmp_path / "adamw", DecoupledAdamW, batches=1)
    trainer.close()
    saved = torch.load(tmp_path / "adamw" / "ckpt" / "ep0-ba1-rank0.pt", weights_only=False)
    saved = saved["state"]["optimizers"]["DecoupledAdamW"]["state"]
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    cfg = _run(tmp_path, f"load_path={tmp_path}/adamw/ckpt/ep0-ba1-rank0.pt", "optimizer.name=adamw",
               "max_duration=2ba")
    path, _ = start_point(cfg, cfg.load_path)
    trainer = build_trainer(_run(tmp_path, f"load_path={path}", "optimizer.name=adamw", "max_duration=2ba"))
    try:
        assert int(trainer.state.timestamp.batch) == 1
        opt, params = trainer.state.optimizers[0], dict(trainer.state.model.named_parameters())
        for name, state in saved.items():
            torch.testing.assert_close(opt.state[params[name]]["exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=0)
        trainer.fit()
    finally:
        trainer.close()


def test_not_an_mpt_checkpoint_is_refused(foundry, tmp_path):
    ckpt = torch.load(foundry["whole"], map_location="cpu", weights_only=False)
    ckpt["state"]["integrations"]["huggingface"]["model"]["config"]["content"]["model_type"] = "llama"
    torch.save(ckpt, tmp_path / "llama.pt")
    with pytest.raises(CheckpointError, match="holds a Hugging Face model of model_type 'llama'"):
        load_composer_checkpoint(str(tmp_path / "llama.pt"))


def _upload(s3_server, bucket: str, local: Path, prefix: str) -> None:
    client = s3_server.client()
    for p in [local] if local.is_file() else sorted(local.iterdir()):
        client.upload_file(str(p), bucket, f"{prefix}/{p.name}" if local.is_dir() else prefix)


def test_train_from_its_checkpoints_in_a_bucket(foundry, s3_server, s3_bucket, tmp_path, caplog, monkeypatch):
    """llm-foundry runs keep their checkpoints in s3://: a whole file there continues its run, and a sharded folder
    there starts from its weights, as from a local copy; the download in the temp folder is gone once loaded.
    One of our own checkpoints in a bucket still loads as before (its copy removed too)."""
    from llmfoundry.train import build_trainer, train
    caplog.set_level("INFO")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    bucket = s3_bucket[5:]

    def copies():  # downloads and converted copies left in the temp folder
        return glob.glob(str(tmp_path / "tmp" / "mpt-forge-download-*")) + glob.glob(
            str(tmp_path / "tmp" / "mpt-forge-pretrained-*"))

    _upload(s3_server, bucket, Path(foundry["whole"]), "foundry/ckpt/ep0-ba2-rank0.pt")
    _upload(s3_server, bucket, Path(foundry["sharded"]), "foundry/sharded/ep0-ba2")

    trainer = build_trainer(_run(tmp_path / "a", f"load_path={s3_bucket}/foundry/ckpt/ep0-ba2-rank0.pt",
                                 "max_duration=3ba"))
    try:
        assert int(trainer.state.timestamp.batch) == 2  # its step, LION momentum under our optimizer's name
        opt, params = trainer.state.optimizers[0], dict(trainer.state.model.named_parameters())
        for name, saved in foundry["exp_avg"].items():
            torch.testing.assert_close(opt.state[params[name]]["exp_avg"], saved["exp_avg"], rtol=0, atol=0)
    finally:
        trainer.close()
    assert "starting from the llm-foundry checkpoint" in caplog.text and "continuing its run" in caplog.text
    assert not copies(), copies()

    train(_run(tmp_path / "b", f"load_path={s3_bucket}/foundry/sharded/ep0-ba2", "load_weights_only=true")).close()
    (ckpt,) = glob.glob(str(tmp_path / "b" / "ck" / "ep*-ba1-rank0.pt"))
    model = torch.load(ckpt, map_location="cpu", weights_only=False)["state"]["model"]
    for k, v in foundry["weights"].items():  # the first warmup step has lr 0: the weights as loaded
        torch.testing.assert_close(model[f"model.{k}"], v, rtol=0, atol=0, msg=k)
    assert not copies(), copies()

    _upload(s3_server, bucket, Path(ckpt), "ours/ep0-ba1-rank0.pt")
    trainer = build_trainer(_run(tmp_path / "c", f"load_path={s3_bucket}/ours/ep0-ba1-rank0.pt", "max_duration=2ba"))
    try:
        assert int(trainer.state.timestamp.batch) == 1
        loaded = {k: v for k, v in trainer.state.model.state_dict().items()}
        for k, v in model.items():
            torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
    finally:
        trainer.close()
    assert not copies(), copies()
