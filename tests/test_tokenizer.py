"""The bundled tokenizer and load_tokenizer: conventions, loading paths, and the messages for bad names."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmfoundry.data import BUNDLED_CORPUS, BUNDLED_TOKENIZER, DataError
from llmfoundry.data.tokenizer import EOS_TOKEN, load_tokenizer, padded_vocab_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "def f(x):\n    return x ** 2  # naïve — 日本語\n\nThe `with` statement wraps a block."


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_bundled_tokenizer_follows_gpt_neox_conventions():
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer("bundled")
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 4096 and padded_vocab_size(tok) == 4096
    assert tok.eos_token == tok.bos_token == tok.unk_token == EOS_TOKEN
    assert tok.eos_token_id == tok.bos_token_id == tok.unk_token_id == 0
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT  # byte-level: any text round-trips
    assert tok(f"a{EOS_TOKEN}b", add_special_tokens=False)["input_ids"][1] == 0
    assert len(ids) < len(TEXT.encode()) / 2  # it did learn merges


def test_autotokenizer_loads_the_bundled_directory():
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(BUNDLED_TOKENIZER, name))
    auto = AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    assert auto(TEXT)["input_ids"] == load_tokenizer(BUNDLED_TOKENIZER)(TEXT)["input_ids"]


def test_load_tokenizer_names_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match=r"nope/tok does not exist; pass an existing directory"):
        load_tokenizer(str(tmp_path / "nope" / "tok"))
    with pytest.raises(DataError, match=rf"{tmp_path} holds no tokenizer files"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(DataError, match="is a file; pass the directory"):
        load_tokenizer(str(tmp_path / "file.json"))


def test_unreachable_hub_name_says_what_to_pass(tmp_path):
    """A hub name offline fails with one line naming the fix (through a converter's command line)."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    res = run_script("data_prep/convert_dataset_json.py", str(data), "--out_root", str(tmp_path / "out"),
                     "--tokenizer", "EleutherAI/gpt-neox-20b", env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr
    assert "could not load tokenizer 'EleutherAI/gpt-neox-20b' from the Hugging Face hub" in res.stderr
    assert "Pass a local directory" in res.stderr and "network access" in res.stderr
    assert "Traceback" not in res.stderr


def test_build_tokenizer_script_writes_a_loadable_tokenizer(tmp_path):
    res = run_script("data_prep/build_tokenizer.py", os.path.join(BUNDLED_CORPUS, "code"), "--vocab_size", "512",
                     "--out", str(tmp_path / "tok"))
    assert res.returncode == 0, res.stderr
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert len(tok) == 512 and tok.eos_token_id == 0
    assert tok.decode(tok(TEXT)["input_ids"]) == TEXT
