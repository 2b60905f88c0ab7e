"""Shared test fixtures: a real S3-compatible server on 127.0.0.1 and small helpers."""
from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_interpreter_worker(script: str, timeout: float, unset: tuple[str, ...] = ()) -> dict:
    """Run ``script --worker`` with TRITON_INTERPRET=1 (it must be set before triton is imported, so a kernel test
    file's interpreter cases run in one subprocess) and return the JSON dict its last stdout line prints."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for name in unset:
        env.pop(name, None)
    proc = subprocess.run([sys.executable, script, "--worker"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def checkpoint_state(folder, batch: int) -> dict:
    """The ``state`` of the whole-file checkpoint ``ep*-ba{batch}-rank0.pt`` in ``folder``."""
    import glob

    import torch
    (path,) = glob.glob(os.path.join(str(folder), f"ep*-ba{batch}-rank0.pt"))
    return torch.load(path, map_location="cpu", weights_only=False)["state"]


def assert_same_weights(a: dict, b: dict) -> None:
    """Two checkpoint states hold bit-equal model weights and LION momenta."""
    import torch
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    opt_a, opt_b = a["optimizers"]["Lion"]["state"], b["optimizers"]["Lion"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        assert torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's standalone S3 server in a subprocess; ``url`` is its endpoint."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 60.0) -> "S3Server":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("moto S3 server exited at start")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto S3 server did not listen on {self.url} within {timeout}s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"bucket-{uuid.uuid4().hex[:8]}"
        self.client().create_bucket(Bucket=name)
        return name


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """A running S3 server; environment variables point boto3 and mosaicml-streaming at it."""
    server = S3Server().start()
    old = {k: os.environ.get(k) for k in [*S3_ENV, "S3_ENDPOINT_URL"]}
    os.environ.update(S3_ENV)
    os.environ["S3_ENDPOINT_URL"] = server.url
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A fresh empty bucket on the test server, as ``s3://name``."""
    return f"s3://{s3_server.make_bucket()}"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tests use tiny tensors: one intra-op thread is as fast, and far faster when processes share the cores."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    """The bundled 4096-token byte-level BPE tokenizer."""
    from llmfoundry.data.tokenizer import load_tokenizer
    return load_tokenizer("bundled")


class _SharedMemoryHeldUntilUnused:
    """Stands in for ``atexit`` inside mosaicml-streaming's shared-memory wrapper for this test process.

    streaming registers every block it creates or attaches (a dataset's barrier, epoch counter, shard states, the
    locals registry, and each probe of another dataset's prefix) with ``atexit``, which holds it, its mapping and
    its file descriptor until the process ends: a training process builds a few datasets, but this process builds
    thousands and reached the open-file limit (20,000 here). After each test this releases, with streaming's own
    ``cleanup``, the blocks that nothing but the registration holds any more (their datasets are gone); blocks
    still in use (a module fixture's dataset) stay registered, and what is left is cleaned up at exit as before."""

    def __init__(self):
        self.held = []

    def register(self, fn, *args, **kwargs):
        owner = getattr(fn, "__self__", None)
        if owner is None or getattr(fn, "__name__", "") != "cleanup" or args or kwargs:
            return atexit.register(fn, *args, **kwargs)
        self.held.append(owner)
        return fn

    def release_unused(self) -> None:
        kept = []
        while self.held:
            block = self.held.pop()
            # references: ``block`` here and getrefcount's argument; anything more is a user of the block
            if sys.getrefcount(block) > 2:
                kept.append(block)
                continue
            try:
                block.cleanup()
            except BufferError:  # an array still views the mapping: try again after a later test
                kept.append(block)
        self.held = kept

    def cleanup_all(self) -> None:
        for block in self.held:
            try:
                block.cleanup()
            except BufferError:
                pass
        self.held = []


@pytest.fixture(autouse=True, scope="session")
def _streaming_shared_memory():
    try:
        from streaming.base.shared import memory
    except ImportError:
        yield None
        return
    stand_in = _SharedMemoryHeldUntilUnused()
    memory.atexit = stand_in
    yield stand_in
    memory.atexit = atexit
    stand_in.cleanup_all()


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test(_streaming_shared_memory):
    """Free what a test left in reference cycles now, not at some later collection: a streaming loader holds shared
    memory and its file descriptors until it is collected, and across the whole suite those add up to the
    process's open-file limit (20,000 here) before Python's own collections get to them."""
    yield
    import gc
    gc.collect()
    if _streaming_shared_memory is not None:
        _streaming_shared_memory.release_unused()
