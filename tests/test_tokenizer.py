"""The bundled tokenizer and load_tokenizer: conventions, loading paths, and the messages for bad names."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmfoundry.data import DataError
from llmfoundry.data.bundled import corpus_dir, tokenizer_dir
from llmfoundry.data.bpe import EOS_TOKEN
from llmfoundry.data.tokenizer import load_tokenizer, padded_vocab_size

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
        assert os.path.isfile(os.path.join(tokenizer_dir(), name))
    auto = AutoTokenizer.from_pretrained(tokenizer_dir())
    assert auto(TEXT)["input_ids"] == load_tokenizer(tokenizer_dir())(TEXT)["input_ids"]


def test_load_tokenizer_names_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match=r"nope/tok does not exist; pass an existing directory"):
        load_tokenizer(str(tmp_path / "nope" / "tok"))
    with pytest.raises(DataError, match=r"tokenizer path .*/tokenizer does not exist"):  # a path, not a hub name
        load_tokenizer("./tokenizer")
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
    res = run_script("data_prep/build_tokenizer.py", os.path.join(corpus_dir(), "code"), "--vocab_size", "512",
                     "--out", str(tmp_path / "tok"))
    assert res.returncode == 0, res.stderr
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert len(tok) == 512 and tok.eos_token_id == 0
    assert tok.decode(tok(TEXT)["input_ids"]) == TEXT


def test_cached_hub_tokenizer_loads_without_a_request(tmp_path):
    """A hub name already in the local cache loads without asking the hub: the hub endpoint here is a real HTTP
    server on 127.0.0.1 that counts the requests it gets (none)."""
    import http.server
    import shutil
    import threading

    requests = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - http.server's naming
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        repo = tmp_path / "hf" / "hub" / "models--acme--tok"  # huggingface_hub's cache layout
        shutil.copytree(tokenizer_dir(), repo / "snapshots" / "0123abcd")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abcd")
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
        res = subprocess.run([sys.executable, "-c", "from llmfoundry.data.tokenizer import load_tokenizer; "
                              "print(len(load_tokenizer('acme/tok')))"],
                             cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    finally:
        server.shutdown()
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == "4096"
    assert requests == []
