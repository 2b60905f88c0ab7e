"""``scripts/train.py --help`` and ``scripts/eval.py --help``: useful, and answered before torch is imported."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs a script as ``__main__`` with the given arguments, then reports whether torch/composer got imported.
_RUN_AND_REPORT = """
import runpy, sys
script, args = sys.argv[1], sys.argv[2:]
sys.argv = [script] + args
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "composer", "transformers") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
sys.exit(code)
"""


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUN_AND_REPORT, str(REPO / "scripts" / script), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_help(flag):
    r = run_script("train.py", flag)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "usage: python scripts/train.py CONFIG.yaml [key=value ...]" in out
    assert "composer [-n NPROC] scripts/train.py" in out
    assert "llmfoundry/train/config.py" in out  # where every YAML key is documented
    assert "optimizer.lr=1e-3" in out  # what an override looks like
    assert out.rstrip().endswith("HEAVY:"), "--help imported " + out.rstrip().rsplit("HEAVY:", 1)[-1]


def test_train_help_anywhere_among_the_arguments():
    r = run_script("train.py", "yamls/tiny-cpu.yaml", "max_duration=1ba", "--help")
    assert r.returncode == 0 and "usage: python scripts/train.py" in r.stdout, r.stderr


def test_eval_help():
    r = run_script("eval.py", "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "usage: python scripts/eval.py" in out
    assert "llmfoundry/eval/evaluate.py" in out and "``load_path``" in out  # the key table, read from the source
    assert out.rstrip().endswith("HEAVY:"), "--help imported " + out.rstrip().rsplit("HEAVY:", 1)[-1]


def test_chat_help():
    r = run_script("chat.py", "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "usage: python scripts/chat.py MODEL" in out
    assert "latest-rank0.pt" in out and "convert_composer_to_hf.py" in out  # a checkpoint and an HF folder
    assert "/reset" in out and "--temperature" in out
    assert out.rstrip().endswith("HEAVY:"), "--help imported " + out.rstrip().rsplit("HEAVY:", 1)[-1]


def test_train_without_a_config_still_reaches_main():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "expected one config file" in r.stderr, r.stderr
