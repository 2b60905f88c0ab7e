"""Object stores other than s3:// (which the S3 tests cover against a real server): composer opens gs://, oci://
and dbfs:// itself. Without that store's credentials the run stops before any work with one message per address,
naming the key, what failed and what the store needs, instead of the SDK's traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gs_and_oci_without_credentials_are_named_in_one_message(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GCS_", "GOOGLE_", "OCI_", "RUN_NAME"))}
    env.update(HOME=str(tmp_path), PYTHONUNBUFFERED="1")  # no ~/.oci/config, no gcloud credentials
    r = subprocess.run([sys.executable, "scripts/train.py", "yamls/tiny-cpu.yaml", "max_duration=1ba",
                        "save_folder=gs://no-such-bucket/ckpt", "load_path=oci://no-such-bucket/ep0-ba1-rank0.pt"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "save_folder = 'gs://no-such-bucket/ckpt': composer could not open the gs:// store" in line
    assert "it needs GCS_KEY and GCS_SECRET" in line
    assert "load_path = 'oci://no-such-bucket/ep0-ba1-rank0.pt': composer could not open the oci:// store" in line
    assert "it needs an OCI config file" in line
    assert "Traceback" not in r.stderr
