"""``load_path: <Hugging Face MPT folder>``: a run starts from those weights, says so, and refuses a YAML whose
model would compute differently from the pretrained one. Real folders written by ``save_hf``, real runs."""
from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import pytest
import torch

from llmfoundry.models.mpt import MPTForCausalLM
from llmfoundry.models.mpt.hf import save_hf
from llmfoundry.train import load_config, train
from llmfoundry.utils.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "yamls" / "tiny-cpu.yaml")


def _hf_folder(tmp_path, **model_overrides) -> tuple[str, dict]:
    """The tiny-cpu model, initialised with another seed than any run, saved as a Hugging Face MPT folder."""
    cfg = load_config(TINY, [f"model.{k}={v}" for k, v in model_overrides.items()]).model
    torch.manual_seed(1234)
    sd = {k: v.clone() for k, v in MPTForCausalLM(cfg).state_dict().items()}
    folder = tmp_path / "hf"
    save_hf(cfg, sd, folder, strict_hf=False)  # also settings only our MPT reads (qk_ln)
    return str(folder), sd


def _run(tmp_path, *overrides):
    return load_config(TINY, [f"save_folder={tmp_path}/ck", "max_duration=1ba", "eval_loader=null",
                              "autoresume=false", *overrides])


def test_training_starts_from_the_folders_weights_and_says_so(tmp_path, caplog, monkeypatch):
    folder, sd = _hf_folder(tmp_path)
    caplog.set_level("INFO")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the converted copy is kept
    # the first step of the warmup has lr 0: its checkpoint holds the weights as loaded
    train(_run(tmp_path, f"load_path={folder}"))
    assert f"starting from the pretrained weights in {folder}" in caplog.text
    assert not glob.glob(str(tmp_path / "tmp" / "mpt-forge-pretrained-*"))  # the converted copy is gone once loaded
    (ckpt,) = glob.glob(str(tmp_path / "ck" / "ep*-ba1-rank0.pt"))
    model = torch.load(ckpt, map_location="cpu", weights_only=False)["state"]["model"]
    for k, v in sd.items():
        torch.testing.assert_close(model[f"model.{k}"], v, rtol=0, atol=0, msg=k)


def test_a_model_of_another_architecture_is_refused_naming_every_difference(tmp_path):
    folder, _ = _hf_folder(tmp_path, **{"attn_config.qk_ln": "true", "norm_eps": 1e-6})
    with pytest.raises(ConfigError) as e:
        train(_run(tmp_path, f"load_path={folder}"))
    msg = str(e.value)
    assert f"load_path {folder} holds a pretrained model of another architecture" in msg
    assert "model.attn_config.qk_ln: the YAML says False, config.json says True" in msg
    assert "model.norm_eps: the YAML says 1e-05, config.json says 1e-06" in msg
    assert not glob.glob(str(tmp_path / "ck" / "*.pt"))


def test_attention_implementation_and_sequence_length_may_differ(tmp_path):
    """Settings that compute the same (where attention runs, dropout, init, a longer ALiBi context) are free."""
    folder, _ = _hf_folder(tmp_path, **{"max_seq_len": 128, "attn_config.attn_impl": "flex"})
    train(_run(tmp_path, f"load_path={folder}"))
    assert glob.glob(str(tmp_path / "ck" / "ep*-ba1-rank0.pt"))
    assert os.path.isdir(folder)
