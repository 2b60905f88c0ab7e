"""Data curriculum (train_loader.curriculum): the mixture changes at its points, real runs resume across a change
bit-exactly, and bad curricula are named errors."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from llmfoundry.data.curriculum import CurriculumPoint, choose_per_stream, plan_phases
from llmfoundry.data.text_loader import TextLoaderConfig, build_text_dataloader
from llmfoundry.train import build_trainer, load_config
from llmfoundry.utils.config import ConfigError, from_dict

from conftest import assert_same_weights, checkpoint_state
from test_text_loader import take, write_mds
from test_train import TINY, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:.*using the first max_seq_len")

A, B = 1, 2  # the first token of every sample of stream a / b
SWITCH = [{"at": 0, "proportions": {"a": 1, "b": 0}}, {"at": 0.5, "proportions": {"a": 0, "b": 1}}]  # at 4 of 8


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict[str, str]:
    """Two small streams of packed 32-token samples, told apart by their first token."""
    root = tmp_path_factory.mktemp("mds")
    return {"a": write_mds(root / "a", 60, 32, marker=A, samples_per_shard=20),
            "b": write_mds(root / "b", 50, 32, marker=B, samples_per_shard=20)}


def loader_config(streams, points, **kw) -> TextLoaderConfig:
    base = {"max_seq_len": 8, "num_workers": 0, "streams": {n: {"local": p} for n, p in streams.items()},
            "curriculum": points, **kw}
    return from_dict(TextLoaderConfig, base)


def markers(batches) -> list[set[int]]:
    """The streams each batch drew from."""
    return [{int(t) for t in b["input_ids"][:, 0]} for b in batches]


# --- the loader --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixture_switches_at_the_point(streams, num_workers):
    """100/0 then 0/100 at batch 4 of 8: batches 0-3 only from a, then only from b; after the last point's phase,
    epochs of the streams' size (110 samples = 27 batches of 4) in the last mixture."""
    points = [*SWITCH, {"at": "6ba", "proportions": {"a": 1, "b": 1}}]
    loader = build_text_dataloader(loader_config(streams, points, num_workers=num_workers), 4, max_duration="8ba")
    first, second, third = take(loader), take(loader), take(loader)  # one epoch per phase
    assert markers(first) == [{A}] * 4
    assert markers(second) == [{B}] * 2
    assert len(third) == 27 and set.union(*markers(third)) == {A, B}
    assert abs(sum(int(b["input_ids"][:, 0].eq(A).sum()) for b in third) - 54) <= 2  # 55 of 110; 2 dropped (drop_last)


def test_streams_own_weights_before_the_first_point(streams):
    cfg = loader_config({"a": streams["a"], "b": streams["b"]}, [{"at": "3ba", "proportions": {"a": 0, "b": 1}}])
    cfg.streams["a"].proportion, cfg.streams["b"].proportion = 1.0, 0.0
    loader = build_text_dataloader(cfg, 4, max_duration="8ba")
    assert markers(take(loader)) == [{A}] * 3
    assert markers(take(loader, 5)) == [{B}] * 5


def test_long_phase_is_cut_into_epochs(streams):
    """A phase longer than epoch_size (20 samples = 5 batches of 4) is drawn as several epochs of it."""
    points = [{"at": 0, "proportions": {"a": 1, "b": 0}}, {"at": "10ba", "proportions": {"a": 0, "b": 1}}]
    loader = build_text_dataloader(loader_config(streams, points, epoch_size=22), 4, max_duration="12ba")
    assert [markers(take(loader)) for _ in range(3)] == [[{A}] * 5, [{A}] * 5, [{B}] * 5]


@pytest.mark.parametrize("stop", [3, 4, 6])
def test_loader_resumes_exactly_across_the_switch(streams, stop):
    """state_dict after `stop` batches (4 = exactly at the change), a fresh loader loads it: the rest of the sequence
    is the uninterrupted one's."""
    points = [{"at": 0, "proportions": {"a": 3, "b": 1}}, {"at": "4ba", "proportions": {"a": 1, "b": 3}}]
    cfg = loader_config(streams, points)
    full = build_text_dataloader(cfg, 4, max_duration="8ba")
    reference = [b["input_ids"] for b in take(full) + take(full, 4)]
    first = build_text_dataloader(cfg, 4, max_duration="8ba")
    got = [b["input_ids"] for b in take(first, stop)]
    state = first.state_dict()
    del first, full
    resumed = build_text_dataloader(cfg, 4, max_duration="8ba")
    resumed.load_state_dict(state)
    for _ in range(2):  # the rest of the epoch it stopped in (none at the change), then the next
        got += [b["input_ids"] for b in take(resumed)]
        if len(got) >= 8:
            break
    assert all((x == y).all() for x, y in zip(got[:8], reference, strict=True))


def test_resume_with_another_plan_is_logged(streams, caplog):
    cfg = loader_config(streams, SWITCH)
    first = build_text_dataloader(cfg, 4, max_duration="8ba")
    take(first, 2)
    state = first.state_dict()
    del first
    with caplog.at_level(logging.WARNING, logger="llmfoundry.data.text_loader"):
        build_text_dataloader(cfg, 4, max_duration="10ba").load_state_dict(state)  # the point moves to batch 5
    assert "resuming a loader position saved with another curriculum plan" in caplog.text


@pytest.mark.parametrize("max_duration", ["125ba", "500sp", "16000tok"])  # 125 batches of 4 x 32 tokens
def test_points_become_batch_boundaries(max_duration):
    """Fractions and times are placed at the batch boundary at or after them; the streams' own weights before."""
    points = [CurriculumPoint(0.1, {"a": 1}), CurriculumPoint("64sp", {"a": 1}), CurriculumPoint("2560tok", {"a": 1}),
              CurriculumPoint("3000tok", {"a": 1})]
    phases = plan_phases(points, max_duration, 4, 32)
    assert [p.start for p in phases] == [0, 13, 16, 20, 24] and phases[0].proportions is None


def test_choose_per_stream_sums_and_skips_zero_shares():
    for seed in range(20):
        n = choose_per_stream(7, (1.0, 0.0, 1.0), seed)
        assert n.sum() == 7 and n[1] == 0 and sorted(n.tolist()) == [0, 3, 4]


# --- errors ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("points, message", [
    ([{"at": 0.5, "proportions": {"a": 1, "cod": 1}}],
     r"curriculum\[0\] \(at 0.5\) names stream 'cod', which is not one of the loader's streams \['a', 'b'\]"),
    ([{"at": 0.5, "proportions": {"a": 1}}], r"gives no proportion for \['b'\]: give every stream's share"),
    ([{"at": 0.5, "proportions": {"a": -1, "b": 1}}], r"proportion -1.0 of stream 'a' must be a number >= 0"),
    ([{"at": 0.5, "proportions": {"a": 0, "b": 0}}], r"gives every stream proportion 0"),
    ([{"at": 4, "proportions": {"a": 1, "b": 1}}], r"at = 4 is read as a fraction of max_duration.*e\.g\. '4ba'"),
    ([{"at": "4 batches", "proportions": {"a": 1, "b": 1}}], r"at = '4 batches' is neither a fraction"),
    ([], r"'curriculum' is empty"),
])
def test_bad_points_are_named(streams, points, message):
    with pytest.raises(ConfigError, match=message):
        loader_config(streams, points)


def test_one_source_curriculum_is_refused(streams):
    with pytest.raises(ConfigError, match="this loader has a single source"):
        from_dict(TextLoaderConfig, {"max_seq_len": 8, "local": streams["a"],
                                     "curriculum": [{"at": 0.5, "proportions": {"default": 1}}]})


# --- real runs ---------------------------------------------------------------------------------------------------

N = 8
RECORD_DRIVER = """
import json, os, sys
from composer.core import Callback
from llmfoundry.train import build_trainer, load_config

class Record(Callback):  # the first token of every row of each batch; exits like a killed process after batch k
    def after_dataloader(self, state, logger):
        with open(sys.argv[3], "a") as f:
            f.write(json.dumps([int(state.timestamp.batch), state.batch["input_ids"][:, 0].tolist()]) + "\\n")
    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == int(sys.argv[2]):
            os._exit(17)

trainer = build_trainer(load_config(sys.argv[1], sys.argv[4:]))
trainer.state.callbacks.append(Record())
trainer.fit()
"""


def run_config(tmp_path, streams, points, eval_loader=None) -> str:
    """yamls/tiny-cpu.yaml on the two streams with a curriculum, 32-token samples, no eval loader."""
    cfg = yaml.safe_load(Path(TINY).read_text())
    cfg["variables"]["seq_len"] = 32
    cfg["train_loader"] = {"streams": {n: {"local": p} for n, p in streams.items()}, "curriculum": points,
                           "max_seq_len": "${variables.seq_len}", "shuffle_seed": 17, "num_workers": 0}
    cfg["eval_loader"] = eval_loader
    path = tmp_path / "cur.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def overrides(folder, *extra) -> list[str]:
    return [f"save_folder={folder}", "global_train_batch_size=4", "device_train_microbatch_size=2",
            f"max_duration={N}ba", "save_interval=3ba", "save_num_checkpoints_to_keep=-1",
            "console_log_interval=1ba", "scheduler.t_warmup=2ba", *extra]


def drive(tmp_path, config, folder, crash_at: int, *extra):
    driver, record = tmp_path / "driver.py", tmp_path / f"batches-{crash_at}.jsonl"
    driver.write_text(RECORD_DRIVER)
    r = run_cli([config, str(crash_at), str(record), *overrides(folder, *extra)], script=str(driver))
    rows = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return r, rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, streams):
    tmp = tmp_path_factory.mktemp("full")
    config = run_config(tmp, streams, SWITCH)
    r, rows = drive(tmp, config, tmp / "ck", 0)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp / "ck", r, rows


def test_run_draws_a_then_b(uninterrupted):
    folder, r, rows = uninterrupted
    assert [batch for batch, _ in rows] == list(range(N))
    assert [set(first) for _, first in rows] == [{A}] * 4 + [{B}] * 4
    assert "curriculum: batches 0-3: a 100%, b 0% | from batch 4: a 0%, b 100%" in r.stderr
    state = checkpoint_state(folder, N)
    assert state["timestamp"]["Timestamp"]["epoch"] == 1  # composer's epoch counts the phases
    assert state["dataset_state"]["train"]["epoch"] == 1 and state["dataset_state"]["train"]["sample_in_epoch"] == 16


@pytest.mark.parametrize("stop, save_interval", [(3, "3ba"), (4, "4ba"), (6, "3ba")])
def test_stopped_run_resumes_bit_exact(uninterrupted, streams, tmp_path, stop, save_interval):
    """Killed after batch stop+1 (last checkpoint at `stop`: 4 is exactly the change), the same command through
    scripts/train.py resumes: final weights and LION state equal the uninterrupted run's, bit for bit."""
    config = run_config(tmp_path, streams, SWITCH)
    folder = tmp_path / "ck"
    crashed, rows = drive(tmp_path, config, folder, stop + 1, f"save_interval={save_interval}")
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert rows == uninterrupted[2][:stop + 1]
    assert os.path.realpath(folder / "latest-rank0.pt").endswith(f"-ba{stop}-rank0.pt")
    resumed = run_cli([config, *overrides(folder, f"save_interval={save_interval}")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "autoresume: continuing from" in resumed.stderr
    assert "resuming a loader position saved" not in resumed.stderr and "No batches were trained" not in resumed.stderr
    assert_same_weights(checkpoint_state(folder, N), checkpoint_state(uninterrupted[0], N))


def test_max_duration_in_epochs_is_refused(tmp_path, streams):
    config = run_config(tmp_path, streams, SWITCH)
    with pytest.raises(ConfigError, match=r"train_loader.curriculum needs max_duration in batches, samples or "
                                          r"tokens, got '2ep'.*Fix: e\.g\. max_duration: '10000ba'"):
        build_trainer(load_config(config, overrides(tmp_path / "ck", "max_duration=2ep", "scheduler.t_warmup=0ep",
                                                    "scheduler.t_max=1dur")))
    assert not (tmp_path / "ck").exists()


def test_eval_loader_curriculum_is_refused(tmp_path, streams):
    eval_loader = {"streams": {n: {"local": p} for n, p in streams.items()}, "max_seq_len": 32, "curriculum": SWITCH}
    config = run_config(tmp_path, streams, SWITCH, eval_loader)
    with pytest.raises(ConfigError, match="eval_loader.curriculum: a curriculum changes the training mixture"):
        build_trainer(load_config(config, overrides(tmp_path / "ck")))


@pytest.mark.parametrize("points, message", [
    ([{"at": "8ba", "proportions": {"a": 1, "b": 1}}],
     r"curriculum\[0\] \(at '8ba', batch 8\) is at or beyond max_duration = 8ba \(8 batches of 4 samples\)"),
    ([{"at": "5ba", "proportions": {"a": 1, "b": 1}}, {"at": 0.5, "proportions": {"a": 1, "b": 0}}],
     r"curriculum\[1\] \(at 0.5, batch 4\) does not come after curriculum\[0\] \(at '5ba', batch 5\)"),
    ([{"at": "3ba", "proportions": {"a": 1, "b": 1}}, {"at": "10sp", "proportions": {"a": 1, "b": 0}}],
     r"curriculum\[1\] \(at '10sp', batch 3\) does not come after .*at least one batch apart"),
])
def test_points_out_of_order_or_beyond_the_end(tmp_path, streams, points, message):
    config = run_config(tmp_path, streams, points)
    with pytest.raises(ConfigError, match=message):
        build_trainer(load_config(config, overrides(tmp_path / "ck")))


def test_unknown_stream_through_the_cli(tmp_path, streams):
    config = run_config(tmp_path, streams, [{"at": 0.5, "proportions": {"a": 1, "code": 1}}])
    r = run_cli([config, *overrides(tmp_path / "ck")])
    assert r.returncode == 1
    assert "names stream 'code', which is not one of the loader's streams ['a', 'b']" in r.stderr, r.stderr[-2000:]
