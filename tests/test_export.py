"""Composer checkpoints (whole, sharded, s3://) -> MPT weights -> Hugging Face MPT directory, and back."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llmfoundry.checkpoint import (CheckpointError, convert_composer_to_hf,
                                   convert_hf_to_composer, load_composer_checkpoint, load_hf_weights, load_model,
                                   model_from_state_dict)

REPO = Path(__file__).resolve().parents[1]
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 2-batch training run of a tiny MPT with the trainer (whole-file checkpoint + its config.yaml), plus
    the same state saved with a ``ModelConfigRecorder`` and in composer's sharded (DCP) layout, away from any
    config.yaml."""
    import torch.distributed.checkpoint as dcp
    from composer.utils import reproducibility

    from llmfoundry.train import load_config, train

    d = tmp_path_factory.mktemp("export")
    cfg = load_config(REPO / "yamls" / "tiny-cpu.yaml", [
        f"save_folder={d}/ckpt", "max_duration=2ba", "save_interval=2ba", "eval_interval=2ba",
        "eval_subset_num_batches=1", "device_eval_batch_size=4", "autoresume=false",
        "run_name=export-test", "model.d_model=64", "global_train_batch_size=4", "device_train_microbatch_size=4",
        "callbacks.speed_monitor=null", "callbacks.runtime_estimator=false", "log_to_console=false",
        "python_log_level=null"])
    trainer = train(cfg)
    try:
        alone = d / "alone"
        trainer.save_checkpoint(str(alone / "recorded.pt"))
        # composer's sharded save (checkpoint._save_checkpoint) is exactly dcp.save of this dict into the folder
        dcp.save({"state": trainer.state.state_dict(), "rng": reproducibility.get_rng_state()},
                 storage_writer=dcp.FileSystemWriter(str(alone / "ep0-ba2")), no_dist=True)
        weights = {k: v.detach().clone() for k, v in trainer.state.model.model.state_dict().items()}
        trainer_ppl = float(trainer.state.eval_metrics["eval"]["LanguagePerplexity"].compute())
    finally:
        trainer.close()
    return {"dir": d, "cfg": cfg, "whole": str(d / "ckpt" / "ep0-ba2-rank0.pt"),
            "recorded": str(alone / "recorded.pt"), "sharded": str(alone / "ep0-ba2"), "weights": weights,
            "trainer_perplexity": trainer_ppl}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _same(sd_a, sd_b):
    assert set(sd_a) == set(sd_b)
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k], rtol=0, atol=0, msg=k)


def test_whole_checkpoint_to_hf_matches_transformers(run, tmp_path):
    from transformers import AutoTokenizer, MptForCausalLM

    from llmfoundry.data.tokenizer import load_tokenizer
    sd, cfg, tok = load_composer_checkpoint(run["whole"])  # config from the trainer's config.yaml beside it
    assert cfg == run["cfg"].model and tok == "bundled"
    _same(sd, run["weights"])

    out = convert_composer_to_hf(run["whole"], str(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    hf = MptForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok(TEXT)["input_ids"] == load_tokenizer("bundled")(TEXT)["input_ids"]
    ids = torch.tensor([hf_tok(TEXT)["input_ids"]])
    ours = model_from_state_dict(run["weights"], run["cfg"].model)
    torch.testing.assert_close(_logits(hf, ids), _logits(ours, ids), rtol=0, atol=1e-5)


def test_recorded_config_and_sharded_checkpoint(run, tmp_path):
    sd, cfg, tok = load_composer_checkpoint(run["recorded"])  # no config.yaml here: recorded in the checkpoint
    assert cfg == run["cfg"].model and tok == "bundled"
    _same(sd, run["weights"])
    sd, cfg, tok = load_composer_checkpoint(run["sharded"])
    assert cfg == run["cfg"].model and tok == "bundled"
    _same(sd, run["weights"])

    from transformers import MptForCausalLM
    out = convert_composer_to_hf(run["sharded"], str(tmp_path / "hf"))
    ids = torch.randint(0, 4096, (2, 40))
    torch.testing.assert_close(_logits(MptForCausalLM.from_pretrained(out).eval(), ids),
                               _logits(model_from_state_dict(run["weights"], cfg), ids), rtol=0, atol=1e-5)


def test_eval_perplexity_matches_the_trainers(run):
    """scripts/eval.py's perplexity over the trainer's eval batches equals the trainer's own eval metric."""
    from llmfoundry.eval.perplexity import build_eval_batches, evaluate_perplexity
    model, _ = load_model(run["sharded"])
    result = evaluate_perplexity(model, build_eval_batches(run["cfg"].eval_loader, 4), max_batches=1)
    assert result["tokens"] == 4 * 255
    assert result["perplexity"] == pytest.approx(run["trainer_perplexity"], rel=1e-5)


SAVE_SHARDED = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM
    from llmfoundry.utils.config import to_dict
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=4096)
    class ComposerLike(torch.nn.Module):  # ComposerMPT: the network is the child `model`
        def __init__(self):
            super().__init__()
            self.model = MPTForCausalLM(cfg)
    w = ComposerLike()
    if rank == 0:
        torch.save(w.model.state_dict(), os.path.join(out, "reference.pt"))
    for block in w.model.transformer.blocks:  # composer's FSDP2: blocks, then the child
        fully_shard(block, mesh=mesh)
    fully_shard(w.model, mesh=mesh)
    sd = get_model_state_dict(w, options=StateDictOptions(full_state_dict=False))  # DTensor shards
    state = {"state": {"model": sd, "callbacks": {"ModelConfigRecorder": {
        "model_config_json": json.dumps(to_dict(cfg)), "tokenizer": "bundled"}}}}
    if rank == 0:
        state["rng"] = [{"torch": torch.get_rng_state()}]
    dcp.save(state, storage_writer=dcp.FileSystemWriter(os.path.join(out, "ep0-ba1")))
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_sharded(tmp_path_factory):
    """A checkpoint sharded over 2 ranks by FSDP2 (gloo, CPU): two __N_0.distcp files holding halves."""
    d = tmp_path_factory.mktemp("fsdp2")
    script = d / "save.py"
    script.write_text(SAVE_SHARDED)
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(d)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    return d


def test_fsdp2_sharded_two_ranks(fsdp_sharded, tmp_path):
    folder = fsdp_sharded / "ep0-ba1"
    assert sorted(f for f in os.listdir(folder) if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    sd, cfg, _ = load_composer_checkpoint(str(folder))
    _same(sd, torch.load(fsdp_sharded / "reference.pt"))
    from transformers import MptForCausalLM
    out = convert_composer_to_hf(str(folder), str(tmp_path / "hf"), tokenizer="bundled")
    ids = torch.randint(0, 4096, (1, 30))
    torch.testing.assert_close(_logits(MptForCausalLM.from_pretrained(out).eval(), ids),
                               _logits(model_from_state_dict(sd, cfg), ids), rtol=0, atol=1e-5)


def _upload(client, bucket: str, local: Path, key: str):
    if local.is_dir():
        for f in local.iterdir():
            client.upload_file(str(f), bucket, f"{key}/{f.name}")
    else:
        client.upload_file(str(local), bucket, key)


def test_s3_sources(run, fsdp_sharded, s3_server, s3_bucket):
    client, bucket = s3_server.client(), s3_bucket[len("s3://"):]
    _upload(client, bucket, Path(run["recorded"]), "run/recorded.pt")
    _upload(client, bucket, Path(run["sharded"]), "run/ep0-ba2")
    _upload(client, bucket, fsdp_sharded / "ep0-ba1", "fsdp/ep0-ba1")
    # a whole checkpoint without a recorded config: the trainer's config.yaml beside it is fetched too
    _upload(client, bucket, Path(run["whole"]), "plain/ckpt/ep0-ba2-rank0.pt")
    _upload(client, bucket, run["dir"] / "ckpt" / "config.yaml", "plain/ckpt/config.yaml")
    for key in ("run/recorded.pt", "run/ep0-ba2", "plain/ckpt/ep0-ba2-rank0.pt"):
        sd, cfg, _ = load_composer_checkpoint(f"{s3_bucket}/{key}")
        assert cfg == run["cfg"].model
        _same(sd, run["weights"])
    client.put_object(Bucket=bucket, Key="run/latest-rank0.pt.symlink", Body=b"run/ep0-ba2")  # composer's pointer
    sd, _, _ = load_composer_checkpoint(f"{s3_bucket}/run/latest-rank0.pt.symlink")
    _same(sd, run["weights"])
    sd, _, _ = load_composer_checkpoint(f"{s3_bucket}/fsdp/ep0-ba1/")
    _same(sd, torch.load(fsdp_sharded / "reference.pt"))
    with pytest.raises(CheckpointError, match=r"no checkpoint at s3://.*/run/nothing-here.*\.metadata"):
        load_composer_checkpoint(f"{s3_bucket}/run/nothing-here")


def test_shape_mismatch_errors_name_tensor_and_shapes(run):
    cfg = run["cfg"].model
    with pytest.raises(CheckpointError, match=r"tensor 'transformer\.wte\.weight' has shape \(4096, 64\), but the "
                                              r"model config .* expects \(4096, 128\)"):
        load_composer_checkpoint(run["recorded"], model_config=cfg.replace(d_model=128))
    with pytest.raises(CheckpointError, match=r"lacks 6 tensor\(s\) the model config \(.*n_layers=3.*"
                                              r"'transformer\.blocks\.2\.norm_1\.weight'"):
        load_composer_checkpoint(run["recorded"], model_config=cfg.replace(n_layers=3))
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight'.*tie_word_embeddings: false"):
        load_composer_checkpoint(run["recorded"], model_config=cfg.replace(tie_word_embeddings=False))
    with pytest.raises(CheckpointError, match=r"'transformer\.blocks\.0\.attn\.Wqkv\.weight' has shape \(192, 64\)"
                                              r".* expects \(96, 64\)"):
        load_composer_checkpoint(run["recorded"], model_config=cfg.replace(attn_config={"kv_n_heads": 1}))


def test_other_errors(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    # the trainer records the model config in every checkpoint ...
    _, recorded_cfg, recorded_tok = load_composer_checkpoint(str(run["whole"]))
    assert recorded_cfg == run["cfg"].model and recorded_tok == "bundled"
    # ... a checkpoint without it (and without a config.yaml beside it) needs --model_config
    ckpt = torch.load(run["whole"], map_location="cpu", weights_only=False)
    ckpt["state"].get("callbacks", {}).pop("ModelConfigRecorder", None)
    torch.save(ckpt, bare / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"records no model config.*--model_config"):
        load_composer_checkpoint(str(bare / "ckpt.pt"))
    sd, cfg, tok = load_composer_checkpoint(str(bare / "ckpt.pt"), model_config=str(run["dir"] / "ckpt/config.yaml"))
    assert tok == "bundled" and cfg == run["cfg"].model
    with pytest.raises(CheckpointError, match="does not exist"):
        load_composer_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="without .metadata"):
        load_composer_checkpoint(str(bare))
    (bare / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint file .*junk\.pt"):
        load_composer_checkpoint(str(bare / "junk.pt"))
    with pytest.raises(CheckpointError, match=r"tokenizer '.*no-such-tokenizer' cannot be loaded"):
        convert_composer_to_hf(run["recorded"], str(tmp_path / "hf"), tokenizer=str(tmp_path / "no-such-tokenizer"))
    assert not (tmp_path / "hf").exists()  # nothing written on error
    hf_dir = convert_composer_to_hf(run["recorded"], str(tmp_path / "hf2"))
    with pytest.raises(CheckpointError, match="Hugging Face model folder"):
        load_composer_checkpoint(hf_dir)


def test_tiny_yaml_mismatch_names_both_shapes(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run["whole"], bare / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"\(4096, 64\).*expects \(4096, 128\)"):
        load_model(str(bare / "ckpt.pt"), model_config=str(REPO / "yamls/tiny-cpu.yaml"))


def test_hf_weights_start_a_training_run(run, tmp_path):
    """HF directory -> composer .pt -> trainer load_path + load_weights_only; and load_hf_weights directly."""
    from llmfoundry.train import build_trainer, load_config
    from llmfoundry.train.composer_model import ComposerMPT
    hf_dir = convert_composer_to_hf(run["recorded"], str(tmp_path / "hf"))
    init = convert_hf_to_composer(hf_dir, str(tmp_path / "init.pt"), model_config=run["cfg"].model)
    with pytest.raises(CheckpointError, match=r"'transformer\.wte\.weight' has shape \(4096, 64\).*\(4096, 128\)"):
        convert_hf_to_composer(hf_dir, str(tmp_path / "x.pt"), model_config=str(REPO / "yamls/tiny-cpu.yaml"))

    composer_model = ComposerMPT(run["cfg"].model)
    load_hf_weights(composer_model, hf_dir)
    _same(composer_model.model.state_dict(), run["weights"])
    with pytest.raises(CheckpointError, match=r"Hugging Face weights .*'transformer\.wte\.weight' has shape"):
        load_hf_weights(ComposerMPT(run["cfg"].model.replace(d_model=32, n_heads=2)), hf_dir)

    cfg = load_config(REPO / "yamls" / "tiny-cpu.yaml", [
        f"load_path={init}", "load_weights_only=true", "seed=123", "model.d_model=64", "max_duration=1ba",
        "eval_loader=null", "autoresume=false", "save_folder=null", "global_train_batch_size=4",
        "device_train_microbatch_size=4", "callbacks.speed_monitor=null", "log_to_console=false",
        "python_log_level=null"])
    trainer = build_trainer(cfg)
    try:
        _same({k: v.detach() for k, v in trainer.state.model.model.state_dict().items()}, run["weights"])
    finally:
        trainer.close()


def test_convert_script(run, tmp_path, capsys):
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_composer_to_hf.py"), run["sharded"],
                        str(out), "--verify"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "max |logit diff|" in r.stdout and (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "mpt"
    convert = _load_script("convert_composer_to_hf")
    assert convert.main([str(tmp_path / "nope.pt"), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "does not exist" in err


def _load_script(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(err: str, *parts: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_hf_to_composer_refuses_to_overwrite_a_checkpoint(run, tmp_path):
    """The QA data loss: an HF export written over a full training checkpoint (rc 0) is now refused."""
    hf_dir = convert_composer_to_hf(run["recorded"], str(tmp_path / "hf"))
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    target = ckpts / "ep0-ba2-rank0.pt"
    shutil.copy(run["whole"], target)
    before = _snapshot(ckpts)
    r = _script("convert_hf_to_composer", hf_dir, str(target))
    assert r.returncode == 1
    _one_error_line(r.stderr, f"output {target} exists; pass --overwrite to replace it")
    assert _snapshot(ckpts) == before

    convert = _load_script("convert_hf_to_composer")
    assert convert.main([hf_dir, str(target), "--overwrite"]) == 0
    sd, _, _ = load_composer_checkpoint(str(target))  # now the weights-only file
    _same(sd, run["weights"])
    assert "rng" not in torch.load(target, map_location="cpu", weights_only=False)
    assert os.stat(target).st_mode & 0o777 == _umask_mode()
    assert sorted(os.listdir(ckpts)) == ["ep0-ba2-rank0.pt"]  # no temporary file left behind


def test_hf_to_composer_path_errors(run, tmp_path, capsys):
    hf_dir = convert_composer_to_hf(run["recorded"], str(tmp_path / "hf"))
    convert = _load_script("convert_hf_to_composer")
    assert convert.main([str(tmp_path / "hf-nope"), str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    _one_error_line(err, "hf-nope does not exist")
    assert "config.json" not in err
    assert convert.main([str(tmp_path / "hf" / "config.json"), str(tmp_path / "x.pt")]) == 1
    _one_error_line(capsys.readouterr().err, "config.json is a file")
    for folder in (str(tmp_path), str(tmp_path / "new") + "/"):  # an existing folder; a new one
        assert convert.main([hf_dir, folder]) == 1
        _one_error_line(capsys.readouterr().err, f"output {folder} is a folder")
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")
    assert convert.main([hf_dir, str(tmp_path / "afile" / "x.pt")]) == 1
    _one_error_line(capsys.readouterr().err, "cannot write")
    assert convert.main([hf_dir, str(tmp_path / "sub" / "init.pt")]) == 0
    assert (tmp_path / "sub" / "init.pt").is_file()


def test_composer_to_hf_refuses_existing_output(run, tmp_path, capsys):
    convert = _load_script("convert_composer_to_hf")
    out = tmp_path / "hf"
    assert convert.main([run["recorded"], str(out)]) == 0
    capsys.readouterr()
    before = _snapshot(out)
    assert convert.main([run["recorded"], str(out)]) == 1
    _one_error_line(capsys.readouterr().err, f"output {out} exists", "pass --overwrite to replace it")
    assert _snapshot(out) == before
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        convert_composer_to_hf(run["recorded"], str(out))

    # --overwrite replaces the export's files, drops stale weight files, keeps the rest
    (out / "README.md").write_text("my notes\n")
    (out / "pytorch_model.bin").write_bytes(b"stale")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (out / "config.json").write_text("{}")
    assert convert.main([run["recorded"], str(out), "--overwrite"]) == 0
    assert (out / "README.md").read_text() == "my notes\n"
    assert sorted(os.listdir(out)) == sorted([*before, "README.md"])
    assert _snapshot(out) == {**before, "README.md": b"my notes\n"}
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no staging folder left behind

    (tmp_path / "afile").write_text("x")
    assert convert.main([run["recorded"], str(tmp_path / "afile"), "--overwrite"]) == 1
    _one_error_line(capsys.readouterr().err, "afile is a file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert.main([run["recorded"], str(empty)]) == 0  # an empty folder is fine


def test_composer_to_hf_never_writes_among_checkpoints(run, tmp_path, capsys):
    """Not even with --overwrite: a trainer's save folder (*.pt), a sharded checkpoint (.metadata), or a folder
    holding sharded checkpoints."""
    ckpt_folder = run["dir"] / "ckpt"  # the trainer's save folder: ep0-ba2-rank0.pt, latest-rank0.pt, config.yaml
    before = _snapshot(ckpt_folder)
    r = _script("convert_composer_to_hf", run["recorded"], str(ckpt_folder), "--overwrite")
    assert r.returncode == 1
    _one_error_line(r.stderr, f"output {ckpt_folder} holds composer checkpoints", "ep0-ba2-rank0.pt",
                    "a folder of its own")
    assert _snapshot(ckpt_folder) == before

    convert = _load_script("convert_composer_to_hf")
    parent_of_sharded = tmp_path / "sharded-run"
    shutil.copytree(run["sharded"], parent_of_sharded / "ep0-ba2")
    for folder, shown in ((Path(run["sharded"]), ".metadata"), (parent_of_sharded, "ep0-ba2")):
        before = _snapshot(folder)
        assert convert.main([run["recorded"], str(folder), "--overwrite"]) == 1
        _one_error_line(capsys.readouterr().err, f"output {folder} holds composer checkpoints", shown)
        assert _snapshot(folder) == before


def test_exported_folder_works_with_transformers_generate(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = Path(convert_composer_to_hf(run["recorded"], str(tmp_path / "hf")))
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    inputs = tok("def main(", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}
    ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert ids.shape == (1, inputs["input_ids"].shape[1] + 4)
    # generate stops at the end-of-text token and uses the KV cache, with no arguments for either
    gen = model.generation_config
    assert gen.eos_token_id == tok.eos_token_id == model.config.eos_token_id and gen.use_cache is True
    assert gen.pad_token_id == tok.eos_token_id and gen.bos_token_id == tok.bos_token_id
    eos_first = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                               bad_words_ids=[[t] for t in range(len(tok)) if t != tok.eos_token_id])
    assert eos_first[0, inputs["input_ids"].shape[1]:].tolist() == [tok.eos_token_id]  # stopped right there
    assert json.loads((out / "tokenizer_config.json").read_text())["model_input_names"] == ["input_ids",
                                                                                          "attention_mask"]
    assert tok.model_max_length == model.config.max_seq_len == run["cfg"].model.max_seq_len
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == _umask_mode() and set(modes.values()) == {_umask_mode()}, modes
