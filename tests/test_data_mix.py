"""The MPT-7B data-mix recipe: it covers exactly the streams yamls/mpt-7b.yaml reads, prints its commands, and its
conversion step, run on small local stand-ins of each source's raw files (no downloads), writes MDS streams that
yamls/mpt-7b.yaml (shrunk to a tiny model on CPU) trains from."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmfoundry.data.bundled import corpus_documents
from llmfoundry.train import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "data_prep" / "recipes" / "mpt-7b.yaml")
MPT7B = str(REPO / "yamls" / "mpt-7b.yaml")


def build_mix():
    spec = importlib.util.spec_from_file_location("build_mix", REPO / "data_prep" / "build_mix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def yaml_streams() -> set[tuple[str, str]]:
    """(stream, split) pairs yamls/mpt-7b.yaml reads."""
    cfg = load_config(MPT7B)
    pairs = {(name, cfg.train_loader.split) for name in cfg.train_loader.streams}
    pairs |= {(name, cfg.eval_loader.split) for name in cfg.eval_loader.streams}
    for loader in (cfg.train_loader, cfg.eval_loader):
        for name, s in loader.streams.items():
            assert s.remote == f"s3://my-bucket/mds/{name}", s.remote  # <data_remote>/<stream>/<split>
    return pairs


def test_the_recipe_covers_exactly_the_streams_of_the_yaml():
    recipe = build_mix().load_recipe(RECIPE)
    assert {(n, split) for n, s in recipe.streams.items() for split in s.splits} == yaml_streams()
    assert recipe.tokenizer == load_config(MPT7B).tokenizer and recipe.concat_tokens == 2048


def test_dry_run_prints_fetch_and_convert_commands_for_both_engines(capsys):
    main = build_mix().main
    assert main([RECIPE, "--raw_dir", "/data/raw", "--out_root", "s3://b/mds", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "(cd /data/raw/c4 && huggingface-cli download allenai/c4 --repo-type dataset" in out
    assert "python data_prep/convert_dataset_json.py '/data/raw/c4/en/c4-validation.*.json.gz' --out_root s3://b/mds/c4/val " \
           "--tokenizer EleutherAI/gpt-neox-20b --concat_tokens 2048 --text_field text --processes" in out
    assert "convert_dataset_parquet.py '/data/raw/the_stack/data/*/*.parquet' --out_root s3://b/mds/the_stack/train" in out
    assert out.count("# [") == sum(len(s.fetch) + len(s.splits) for s in build_mix().load_recipe(RECIPE).streams.values())
    assert main([RECIPE, "--raw_dir", "r", "--out_root", "o", "--dry_run", "--steps", "convert", "--engine", "spark",
                 "--master", "spark://head:7077", "--streams", "books"]) == 0
    out = capsys.readouterr().out
    assert "python data_prep/convert_spark.py 'r/books/train/*.txt' --format text --out_root o/books/train" in out
    assert out.rstrip().endswith("--master spark://head:7077") and "wget" not in out and "gsutil" not in out
    assert main([RECIPE, "--raw_dir", "r", "--out_root", "o", "--streams", "c5"]) == 2
    assert "--streams c5: not in" in capsys.readouterr().err


def stand_in(raw: Path, glob: str, fmt: str, field: str | None, docs: list[str]) -> None:
    """A raw file where ``glob`` (under ``raw``) will find it, holding ``docs`` in the source's format."""
    path = raw / glob.replace("*", "00000")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        lines = "".join(json.dumps({field: d, "meta": {"source": "stand-in"}}) + "\n" for d in docs)
        path.write_bytes(gzip.compress(lines.encode()) if path.suffix == ".gz" else lines.encode())
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({field: docs, "size": [len(d) for d in docs]}), path)
    else:
        for i, d in enumerate(docs):
            path.with_name(f"{i:05d}.txt").write_text(d)


@pytest.mark.timeout(900)
def test_converted_stand_ins_train_with_the_mpt_7b_yaml(tmp_path):
    recipe = build_mix().load_recipe(RECIPE)
    docs = corpus_documents()
    raw, out = tmp_path / "raw", tmp_path / "mds"
    for i, (name, s) in enumerate(recipe.streams.items()):
        for split, globs in s.splits.items():
            stand_in(raw / name, globs[0], s.format, s.text_field, docs[i * 8:(i + 1) * 8 + 4])
    r = subprocess.run([sys.executable, "data_prep/build_mix.py", RECIPE, "--raw_dir", str(raw), "--out_root",
                        str(out), "--steps", "convert", "--tokenizer", "bundled", "--concat_tokens", "256",
                        "--processes", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for name, split in yaml_streams():
        assert (out / name / split / "index.json").is_file(), (name, split)

    tiny = [f"variables.data_remote={out}", "variables.seq_len=256", "tokenizer=bundled", "model.d_model=64",
            "model.n_heads=2", "model.n_layers=2", "model.vocab_size=4096", "model.init_device=cpu",
            "model.attn_config.attn_impl=torch", "fsdp=null", "compile_config=null", "precision=fp32",
            "global_train_batch_size=4", "device_train_microbatch_size=2", "device_eval_batch_size=2",
            "max_duration=2ba", "eval_interval=2ba", "eval_subset_num_batches=1", "scheduler.t_warmup=1ba",
            "train_loader.num_workers=0", "eval_loader.num_workers=0", f"save_folder={tmp_path}/ck",
            "save_interval=2ba", "console_log_interval=1ba", "callbacks.memory_monitor=false",
            "callbacks.speed_monitor.window_size=1"]
    for name in load_config(MPT7B).train_loader.streams:  # each stream's own local cache
        tiny.append(f"train_loader.streams.{name}.local={tmp_path}/cache/{name}")
    tiny.append(f"eval_loader.streams.c4.local={tmp_path}/cache/c4-val")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUN_NAME", None)
    r = subprocess.run([sys.executable, "scripts/train.py", MPT7B, *tiny], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "[batch=2/2]" in log and "metrics/eval/LanguageCrossEntropy" in log
