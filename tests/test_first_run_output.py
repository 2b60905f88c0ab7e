"""What a newcomer sees on a first run of tiny-cpu: a short summary instead of the whole resolved config (which
goes to the save folder, the debug log and wandb), one clear autoresume line, and progress: composer's progress bar
in a terminal, plain console log lines at ``console_log_interval`` otherwise."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from test_train import REPO, TINY, fast, run_cli

from llmfoundry.train import load_config
from llmfoundry.train.train import console_output
from llmfoundry.utils.config import ConfigError


def before_first_batch(out: str) -> list[str]:
    return out[:out.index("[batch=")].splitlines()


def test_first_run_prints_a_summary_and_plain_progress_lines(tmp_path):
    folder = tmp_path / "ck"
    r = run_cli([TINY, *fast(folder, "max_duration=6ba", "console_log_interval=2ba", "eval_interval=6ba")])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]

    # a summary, not ~130 lines of config
    assert "run tiny-cpu: MPT with 918K parameters (d_model 128, 2 layers, 4 heads), attn_impl torch + alibi, " \
           "seq len 256" in out
    assert "batch 4 = 4 per device x 1 device (cpu, world_size=1), micro-batch 2, precision fp32, fsdp off" in out
    assert "train 6ba on " in out and "/mds (split train)" in out
    assert f"save to {folder} every 3ba, autoresume" in out
    assert f"full config: {folder}/config.yaml" in out
    assert "optimizer:" not in out and "shuffle_algo" not in out
    assert len(before_first_batch(out)) < 40, "\n".join(before_first_batch(out))
    # ... and the whole config is in the file the summary names
    saved = (folder / "config.yaml").read_text()
    assert "optimizer:" in saved and "shuffle_algo: py1e" in saved and "progress_bar: auto" in saved

    # autoresume says what it found in its own words; no "Checkpoint not found in: <...ConsoleLogger object ...>"
    assert f"autoresume: no checkpoint yet in {folder}; starting from scratch" in out
    assert "Checkpoint not found in" not in out and "object at 0x" not in out

    # not a terminal: plain console log lines every console_log_interval, no progress bar
    for batch in (2, 4, 6):
        assert f"[batch={batch}/6]:" in out
    assert "[batch=3/6]:" not in out and "[batch=5/6]:" not in out
    assert "%|" not in out and "ba/s" not in out

    # the same command continues from the checkpoint and says so; at debug level the full config is printed
    r = run_cli([TINY, *fast(folder, "max_duration=7ba", "console_log_interval=2ba", "eval_interval=6ba",
                             "python_log_level=debug")])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"autoresume: continuing from {folder}/ep0-ba6-rank0.pt" in out
    assert "resolved config:" in out and "optimizer:" in out and "shuffle_algo: py1e" in out
    # another config in the same folder: the summary names the time-stamped copy that is then written
    (copy,) = [n for n in os.listdir(folder) if n.startswith("config-")]
    assert f"full config: {folder}/{copy} (written at the first batch)" in out
    assert "max_duration: 7ba" in (folder / copy).read_text()


def run_in_terminal(args: list[str], timeout: int = 300) -> str:
    """scripts/train.py with stdout and stderr on a pseudo-terminal 120 columns wide; everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUN_NAME", None)
    p = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=REPO, env=env,
                         stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert p.wait(timeout=timeout) == 0, b"".join(chunks)[-3000:].decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_terminal_run_shows_the_progress_bar(tmp_path):
    out = run_in_terminal([TINY, *fast(tmp_path / "ck", "max_duration=4ba", "eval_interval=4ba")])
    assert "run tiny-cpu: MPT with" in out
    assert "train" in out and "4/4 [" in out and "ba/s" in out and "loss/train/total=" in out  # composer's bar
    assert "100%|" in out and "eval" in out
    assert "[batch=" not in out  # the console log lines are for non-terminals


def test_progress_bar_key():
    assert load_config(TINY).progress_bar == "auto"
    assert load_config(TINY, ["progress_bar=false"]).progress_bar is False
    try:
        load_config(TINY, ["progress_bar=sometimes"])
        raise AssertionError("no error")
    except ConfigError as e:
        assert "progress_bar" in str(e) and "auto" in str(e)
    assert console_output(True, True) == (True, True)
    assert console_output(False, True) == (False, True)
    assert console_output("auto", True) == (False, True)  # pytest captures stderr: not a terminal
    assert console_output("auto", False) == (False, False)
