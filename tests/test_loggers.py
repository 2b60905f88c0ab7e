"""MLflow and TensorBoard loggers through scripts/train.py, read back with each library's own reader: the metrics the
run logged (the same values in both), the config as parameters, one MLflow run continued across a resume, and an
unreachable tracking server named before training."""
from __future__ import annotations

import socket

import pytest
from test_train import TINY, fast, run_cli

mlflow = pytest.importorskip("mlflow")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

LOSS = "loss/train/total"


def tensorboard_scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_mlflow_and_tensorboard_read_back_and_resume(tmp_path):
    store, tb = tmp_path / "mlruns", tmp_path / "tb"
    loggers = [f"loggers.mlflow.tracking_uri={store}", "loggers.mlflow.experiment_name=tiny",
               f"loggers.tensorboard.log_dir={tb}", "loggers.tensorboard.flush_interval=1"]
    r = run_cli([TINY, *fast(tmp_path / "ck", "max_duration=4ba", *loggers)])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

    client = mlflow.MlflowClient(tracking_uri=str(store))
    exp = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tiny-cpu" and run.data.tags["run_name"] == "tiny-cpu"
    assert run.data.params["model.d_model"] == "128" and run.data.params["optimizer.name"] == "lion"
    ml = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, LOSS))
    assert [s for s, _ in ml] == [0, 1, 2, 3]
    assert "metrics/eval/LanguageCrossEntropy" in run.data.metrics

    tb_loss = tensorboard_scalars(tb / "tiny-cpu", LOSS)
    assert [s for s, _ in tb_loss] == [0, 1, 2, 3]
    assert [v for _, v in tb_loss] == pytest.approx([v for _, v in ml], rel=1e-6)

    # the same command, longer: autoresume continues the checkpoint and the same MLflow run
    r = run_cli([TINY, *fast(tmp_path / "ck", "max_duration=6ba", "save_interval=2ba", *loggers)])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    (again,) = client.search_runs([exp.experiment_id])
    assert again.info.run_id == run.info.run_id
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, LOSS))
    assert steps[-2:] == [4, 5] and set(steps) >= {0, 1, 2, 3, 4, 5}


def test_an_unreachable_tracking_server_is_named_before_training(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli([TINY, *fast(tmp_path / "ck", f"loggers.mlflow.tracking_uri=http://127.0.0.1:{port}")], timeout=120)
    err = r.stdout + r.stderr
    assert r.returncode != 0
    assert f"loggers.mlflow.tracking_uri http://127.0.0.1:{port} is unreachable" in err, err[-2000:]
    assert "leave tracking_uri out to log to the local store runs/mlruns" in err
    assert "Traceback" not in err and "[batch=1/" not in err
