"""The object store failing during checkpoint uploads: real runs of scripts/train.py against the moto server, reached
through a small HTTP proxy on 127.0.0.1 that can refuse the first PUTs of checkpoints or go away (its port closed)
and come back on the same port."""
from __future__ import annotations

import http.client
import http.server
import os
import re
import socket
import threading
import time

import pytest

from conftest import _free_port
from test_train import TINY, fast, run_cli

pytestmark = pytest.mark.slow


class FlakyProxy:
    """Forwards every request to the S3 server. ``fail_puts``: the next that many PUTs of ``*.pt`` objects get a
    503; ``stop_after``: after the first successful PUT whose path matches it, the proxy closes its port (the store
    is gone) until ``start`` again."""

    def __init__(self, upstream_port: int, fail_puts: int = 0, stop_after: str | None = None):
        self.upstream_port, self.port = upstream_port, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.fail_puts, self.stop_after = fail_puts, stop_after
        self.refused, self.server = 0, None
        self.lock = threading.Lock()

    def start(self) -> "FlakyProxy":
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    raw = b""
                    while True:  # keep the chunk framing (aws-chunked bodies are forwarded as they came)
                        line = self.rfile.readline()
                        raw += line
                        n = int(line.split(b";")[0].strip(), 16)
                        if n == 0:
                            while True:
                                t = self.rfile.readline()
                                raw += t
                                if t in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(n + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self):
                body = self._body()
                is_ckpt = self.command == "PUT" and re.search(r"\.pt(\?|$)", self.path)
                if is_ckpt:
                    with proxy.lock:
                        refuse = proxy.refused < proxy.fail_puts
                        proxy.refused += refuse
                    if refuse:
                        msg = b"<Error><Code>SlowDown</Code><Message>refused by the test proxy</Message></Error>"
                        self.send_response(503)
                        self.send_header("Content-Length", str(len(msg)))
                        self.end_headers()
                        self.wfile.write(msg)
                        return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    conn.putheader(k, v)
                conn.endheaders(body)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) if self.command != "HEAD"
                                                       else r.getheader("Content-Length") or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                if self.command == "PUT" and r.status == 200 and proxy.stop_after and \
                        re.search(proxy.stop_after, self.path):
                    proxy.stop_after = None
                    threading.Thread(target=proxy.stop).start()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def is_up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False


def _run(proxy, args, tmp_path, **env):
    old = {k: os.environ.get(k) for k in ["S3_ENDPOINT_URL", *env]}
    os.environ.update(S3_ENDPOINT_URL=proxy.url, **env)
    try:
        r = run_cli(args, cwd=tmp_path, timeout=240)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return r, r.stdout + r.stderr


def _keys(s3_server, bucket: str) -> dict[str, int]:
    got = s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: o["Size"] for o in got}


FAST_RETRY = ["checkpoint_upload.attempts=4", "checkpoint_upload.backoff_s=0.2"]


def test_uploads_that_fail_then_succeed_are_retried_and_resumed(s3_server, s3_bucket, tmp_path):
    """The first 2 PUTs of each run's checkpoints get a 503: each is retried with a logged backoff, lands whole
    (with its marker), 'latest' names it, and the same command continues from it."""
    bucket = s3_bucket[5:]
    proxy = FlakyProxy(s3_server.port, fail_puts=2).start()
    args = [TINY, *fast(f"{s3_bucket}/runs/{{run_name}}", "eval_loader=null", "save_interval=100ba", *FAST_RETRY,
                        "max_duration=2ba", "scheduler.t_max=4ba")]
    try:
        r, out = _run(proxy, args, tmp_path)
        assert r.returncode == 0, out[-4000:]
        assert proxy.refused == 2
        uri = f"{s3_bucket}/runs/tiny-cpu/ep0-ba2-rank0.pt"
        retry = rf"upload of {re.escape(uri)}: attempt 1/4 failed \(.*SlowDown.*\); retrying in 0\.2 s"
        assert re.search(retry, out), out[-4000:]
        assert f"upload of {uri}: attempt 2/4 failed" in out and f"upload of {uri} succeeded at attempt 3/4" in out
        keys = _keys(s3_server, bucket)
        size = keys["runs/tiny-cpu/ep0-ba2-rank0.pt"]
        assert size > 0 and keys["runs/tiny-cpu/ep0-ba2-rank0.pt.complete"] == len(str(size))
        body = s3_server.client().get_object(Bucket=bucket, Key="runs/tiny-cpu/latest-rank0.pt.symlink")["Body"]
        assert body.read().decode().strip() == "runs/tiny-cpu/ep0-ba2-rank0.pt"
        proxy.refused = 0  # the second launch's first 2 PUTs fail too
        r, out = _run(proxy, args[:-2] + ["max_duration=4ba", "scheduler.t_max=4ba"], tmp_path)
        assert r.returncode == 0, out[-4000:]
        assert f"autoresume: continuing from {uri}" in out
        assert "[batch=4/4]" in out and "[batch=2/4]" not in out
        assert "runs/tiny-cpu/ep0-ba4-rank0.pt.complete" in _keys(s3_server, bucket)
    finally:
        proxy.stop()


def test_store_gone_mid_run_stops_and_the_same_command_resumes_from_newest_complete(s3_server, s3_bucket, tmp_path):
    """The store goes away once the first checkpoint is complete in the bucket: the next upload fails every
    attempt, the run stops with one error naming the key and the last complete checkpoint. A partial object newer than it is put in the bucket;
    with the store back the same command skips it, says so, and continues from the newest complete one."""
    bucket = s3_bucket[5:]
    proxy = FlakyProxy(s3_server.port, stop_after=r"ep0-ba2-rank0\.pt\.complete$").start()
    args = [TINY, *fast(f"{s3_bucket}/runs/{{run_name}}", "eval_loader=null", "save_interval=2ba", *FAST_RETRY,
                        "max_duration=12ba", "scheduler.t_max=12ba")]
    try:
        r, out = _run(proxy, args, tmp_path)
        assert r.returncode == 1, out[-4000:]
        assert not proxy.is_up()
        good = f"{s3_bucket}/runs/tiny-cpu/ep0-ba2-rank0.pt"
        m = re.search(r"error: checkpoint upload to (s3://\S+) \(bucket '(\S+)', key '(\S+)'\) failed 4 times "
                      r"\(checkpoint_upload\.attempts\), last error [^\n]*The run stops here: the newest checkpoint "
                      r"known complete in the bucket is (\S+)\. Fix: bring the object store back", out)
        assert m, out[-4000:]
        assert m.group(2) == bucket and m.group(1) == f"s3://{bucket}/{m.group(3)}"
        assert re.fullmatch(r"runs/tiny-cpu/(ep0-ba\d+-rank0\.pt|latest-rank0\.pt\.symlink)", m.group(3))
        assert m.group(4) == good
        assert "attempt 3/4 failed" in out and "Traceback" not in out
        assert out.count("error: checkpoint upload to") == 1 and "RemoteUploader run into exception" not in out
        keys = _keys(s3_server, bucket)
        assert "runs/tiny-cpu/ep0-ba2-rank0.pt.complete" in keys
        assert not any(re.match(r"runs/tiny-cpu/ep0-ba([4-9]|1\d)-rank0\.pt", k) for k in keys), keys
        if "runs/tiny-cpu/latest-rank0.pt.symlink" in keys:  # 'latest' never names more than the complete one
            body = s3_server.client().get_object(Bucket=bucket, Key="runs/tiny-cpu/latest-rank0.pt.symlink")["Body"]
            assert body.read().decode().strip() == "runs/tiny-cpu/ep0-ba2-rank0.pt"
        # a newer object cut short (e.g. a copy that did not finish): no marker, a fraction of the size
        s3_server.client().put_object(Bucket=bucket, Key="runs/tiny-cpu/ep0-ba10-rank0.pt", Body=b"PK\x03\x04")
        proxy.start()  # the store is back, on the same address
        r, out = _run(proxy, args, tmp_path)
        assert r.returncode == 0, out[-4000:]
        assert (f"autoresume: skipping {s3_bucket}/runs/tiny-cpu/ep0-ba10-rank0.pt: no ep0-ba10-rank0.pt.complete "
                "marker") in out
        assert f"autoresume: continuing from {good} (the newest complete checkpoint in the bucket)" in out
        assert "[batch=12/12]" in out and "[batch=2/12]" not in out and "[batch=3/12]" in out
        assert "runs/tiny-cpu/ep0-ba12-rank0.pt.complete" in _keys(s3_server, bucket)
    finally:
        proxy.stop()
