"""Finetuning data from MDS shards (a local folder or s3://): data_prep/convert_finetune_to_mds.py writes the
examples, the finetune loader reads them (remote/local/streams, split) into the same batches as from the JSON
Lines (response-only labels, packing, order), names shards without examples, and scripts/train.py trains on
them; llm-foundry's finetuning dataset.remote/local/split translates to them."""
from __future__ import annotations

import gc
import importlib.util
import json
import tempfile
from pathlib import Path

import pytest
import torch
from streaming import MDSWriter, StreamingDataset

from llmfoundry.data import DataError
from llmfoundry.data.convert import run_cli
from llmfoundry.data.finetune import BUNDLED_FINETUNE, FinetuneLoaderConfig, build_finetune_dataloader
from llmfoundry.data.streams import StreamError
from llmfoundry.utils.config import ConfigError, from_dict

REPO = Path(__file__).resolve().parents[1]
INSTRUCT_YAML = str(REPO / "yamls" / "finetune" / "tiny-instruct-cpu.yaml")
TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "data_prep" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_mds(*args: str):
    """data_prep/convert_finetune_to_mds.py in this process; its summary."""
    return load_script("convert_finetune_to_mds").main([*args, "--no_progress"])


def read_back(folder) -> list[dict]:
    ds = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    out = [ds[i] for i in range(len(ds))]
    del ds
    gc.collect()
    return out


def records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def make(**kw) -> FinetuneLoaderConfig:
    base = {"max_seq_len": 256, "packing_ratio": "auto", "shuffle": True, "shuffle_seed": 5, "drop_last": False}
    return from_dict(FinetuneLoaderConfig, {**base, **kw})


def batches(cfg, tok, epoch: int = 0) -> list[dict[str, torch.Tensor]]:
    loader = build_finetune_dataloader(cfg, tok, 4, attn_uses_sequence_id=True)
    loader.sampler.set_epoch(epoch)
    return list(loader)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {"input_ids", "labels", "attention_mask", "sequence_id"}
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def mds(tmp_path_factory) -> Path:
    """The bundled instruct and chat examples converted: <root>/instruct/{train,val}, <root>/chat/train."""
    root = tmp_path_factory.mktemp("ft-mds")
    for split in ("train", "val"):
        to_mds(f"{BUNDLED_FINETUNE}/instruct_{split}.jsonl", "--out_root", str(root / "instruct"), "--split", split)
    to_mds(f"{BUNDLED_FINETUNE}/chat_train.jsonl", "--out_root", str(root / "chat"))
    return root


# ------------------------------------------------------------------------------------------- the converter
def test_converter_writes_each_example_once_in_order(mds):
    source = records(f"{BUNDLED_FINETUNE}/instruct_train.jsonl")
    index = json.loads((mds / "instruct" / "train" / "index.json").read_text())
    assert index["shards"][0]["column_names"] == ["prompt", "response"]
    assert [{"prompt": r["prompt"], "response": r["response"]} for r in read_back(mds / "instruct" / "train")] == \
        [{"prompt": r["prompt"], "response": r["response"]} for r in source]
    chat = read_back(mds / "chat" / "train")
    assert [r["messages"] for r in chat] == [r["messages"] for r in records(f"{BUNDLED_FINETUNE}/chat_train.jsonl")]


def test_converter_maps_field_and_role_names(tmp_path, tok):
    """ShareGPT-style data: --columns / --role_names at conversion give the shards our names, and reading them
    equals reading the JSON Lines with the same mapping in the loader."""
    rows = [{"conversations": [{"from": "human", "value": f"What is {i} + {i}?"},
                               {"from": "gpt", "value": f"{2 * i}."}], "id": i} for i in range(12)]
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    to_mds(str(path), "--out_root", str(tmp_path / "mds"), "--columns", "messages=conversations", "role=from",
           "content=value", "--role_names", "human=user", "gpt=assistant")
    assert read_back(tmp_path / "mds" / "train")[0]["messages"] == [
        {"role": "user", "content": "What is 0 + 0?"}, {"role": "assistant", "content": "0."}]
    mapping = {"columns": {"messages": "conversations", "role": "from", "content": "value"},
               "role_names": {"human": "user", "gpt": "assistant"}}
    assert_same_batches(batches(make(local=str(tmp_path / "mds")), tok),
                        batches(make(data_files=str(path), **mapping), tok))


def test_converter_errors_name_the_example_and_leave_nothing(tmp_path, capsys):
    good = {"prompt": "a", "response": "b"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "a", "response": ""}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: to_mds(str(path), "--out_root", str(out)))
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {path}, line 2: 'response' is empty; every example needs a response "
                                       f"to train on (remove the example or fill it in)\n")
    assert not (out / "train").exists() or not any((out / "train").iterdir())
    summary = to_mds(str(path), "--out_root", str(out), "--malformed", "skip")  # or leave it out, counted
    assert summary.samples == 1 and str(summary).startswith("converted 1 examples into 1 samples of raw text")
    with pytest.raises(DataError, match="--columns 'prompt': write OURS=YOURS pairs"):
        to_mds(str(path), "--out_root", str(tmp_path / "o2"), "--columns", "prompt")


# ------------------------------------------------------------------------------------------- the loader
@pytest.mark.parametrize("kind", ["instruct", "chat"])
def test_batches_equal_those_from_the_json_lines(mds, tok, kind):
    """Same labels (response / assistant turns only), same packing, same shuffled order, any epoch."""
    extra = {"prompt_template": TEMPLATE} if kind == "instruct" else {}
    from_jsonl = make(data_files=f"{BUNDLED_FINETUNE}/{kind}_train.jsonl", **extra)
    from_mds = make(local=str(mds / kind), split="train", **extra)
    for epoch in (0, 1):
        assert_same_batches(batches(from_mds, tok, epoch), batches(from_jsonl, tok, epoch))
    b = batches(from_mds, tok)[0]
    assert (b["labels"] == -100).any() and (b["labels"] != -100).any()  # prompts masked, responses trained


def test_streams_are_read_one_after_the_other(mds, tok):
    two = make(split="", streams={"a": {"local": str(mds / "instruct" / "train")},
                                  "b": {"local": str(mds / "instruct"), "split": "val"}}, prompt_template=TEMPLATE)
    files = make(data_files=[f"{BUNDLED_FINETUNE}/instruct_train.jsonl", f"{BUNDLED_FINETUNE}/instruct_val.jsonl"],
                 prompt_template=TEMPLATE)
    assert_same_batches(batches(two, tok), batches(files, tok))


def test_shards_without_examples_and_missing_folders_are_named(tmp_path, tok, mds):
    with MDSWriter(out=str(tmp_path / "pre" / "train"), columns={"text": "str"}) as w:
        w.write({"text": "a document"})
    with pytest.raises(DataError) as e:
        batches(make(local=str(tmp_path / "pre")), tok)
    assert str(e.value) == (
        f"stream 'default' ({tmp_path / 'pre' / 'train'}): its shards hold no finetuning examples: found columns "
        f"{{text: str}}, need 'prompt' and 'response' (str) or 'messages' (json list of {{role, content}}). These are "
        f"pretraining shards: read them with the text loader (leave out name: finetune). Fix: convert the JSON Lines "
        f"with data_prep/convert_finetune_to_mds.py, or map other column names with columns: {{prompt: ..., "
        f"response: ...}}")
    with pytest.raises(StreamError, match=r"stream 'default': local directory .*nope/train does not exist"):
        batches(make(local=str(tmp_path / "nope")), tok)
    with pytest.raises(StreamError, match=r"Note: the split \('train'\) is appended to local"):
        batches(make(local=str(mds / "instruct" / "train")), tok)


def test_config_needs_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match=r"exactly one data source, got \['data_files', 'local'\]"):
        make(data_files="a.jsonl", local="x")
    with pytest.raises(ConfigError, match=r"exactly one data source, got none: .*'remote' and/or 'local'"):
        make()
    with pytest.raises(ConfigError, match=r"streams.a.proportion: finetuning reads every example of every stream once"):
        make(streams={"a": {"local": "x", "proportion": 0.5}})
    assert make(remote="s3://b/sft", local=str(tmp_path)).is_mds()


RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
dist.init_process_group("gloo")
from llmfoundry.data.finetune import FinetuneLoaderConfig, build_finetune_dataloader
from llmfoundry.utils.config import from_dict
loader = build_finetune_dataloader(from_dict(FinetuneLoaderConfig, json.loads(sys.argv[1])), "bundled", 2)
rows = [row for b in loader for row in b["input_ids"].tolist()]
print(json.dumps({"rows": rows, "examples": loader.dataset.num_examples, "total": len(loader.dataset)}))
dist.destroy_process_group()
"""


def test_two_ranks_read_every_example_through_one_shared_cache(mds, tmp_path):
    """Two ranks of one node (streaming's environment variables): each reads all 64 examples (the shards are
    fetched once into one cache, removed after both have read it) and gets its share of the rows."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "tmp").mkdir()
    cfg = json.dumps({"name": "finetune", "remote": str(mds / "instruct"), "max_seq_len": 256,
                      "packing_ratio": "auto", "shuffle_seed": 5, "drop_last": False})
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=str(tmp_path / "tmp"),
                   PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, cfg], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
    shares = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [s["examples"] for s in shares] == [64, 64] and shares[0]["total"] == shares[1]["total"]
    rows = [set(map(tuple, s["rows"])) for s in shares]
    assert len(rows[0] | rows[1]) == shares[0]["total"]  # every row, split between the ranks
    assert len(shares[0]["rows"]) == len(shares[1]["rows"]) == -(-shares[0]["total"] // 2)
    assert os.listdir(tmp_path / "tmp" / "llmfoundry-mds-cache") == []  # the shared cache is gone


# ------------------------------------------------------------------------------------------- s3 and training
def test_s3_source_equals_the_json_lines(s3_bucket, tok, tmp_path):
    """The converter uploads to the test S3 server; the loader downloads into a temporary cache (removed after)."""
    to_mds(f"{BUNDLED_FINETUNE}/instruct_train.jsonl", "--out_root", f"{s3_bucket}/sft")
    from_s3 = make(remote=f"{s3_bucket}/sft", prompt_template=TEMPLATE)
    caches = Path(tempfile.gettempdir()) / "llmfoundry-mds-cache"
    before = set(caches.iterdir()) if caches.exists() else set()
    assert_same_batches(batches(from_s3, tok), batches(make(data_files=f"{BUNDLED_FINETUNE}/instruct_train.jsonl",
                                                            prompt_template=TEMPLATE), tok))
    assert set(caches.iterdir()) == before  # the temporary download cache is removed once read
    cached = make(remote=f"{s3_bucket}/sft", local=str(tmp_path / "cache"), prompt_template=TEMPLATE)
    assert len(batches(cached, tok)) > 0 and (tmp_path / "cache" / "train" / "index.json").exists()
    with pytest.raises(StreamError, match=rf"could not download {s3_bucket}/nothing/train/index.json"):
        batches(make(remote=f"{s3_bucket}/nothing", download_retry=1), tok)


def test_finetune_from_mds_through_the_train_script(mds, s3_bucket, tmp_path, caplog):
    """tiny-instruct-cpu.yaml with its JSON Lines swapped for the MDS folder (and for s3://) trains and evaluates."""
    from llmfoundry.train import main

    def run(*source: str) -> int:
        return main([INSTRUCT_YAML, "load_path=null", f"save_folder={tmp_path}/ck-{len(source)}", "autoresume=false",
                     "max_duration=2ep", "eval_interval=2ep", "save_interval=2ep", "callbacks.speed_monitor=null",
                     "train_loader.data_files=null", "eval_loader.data_files=null", *source])

    assert run(f"train_loader.local={mds / 'instruct'}", f"eval_loader.local={mds / 'instruct'}",
               "eval_loader.split=val") == 0
    assert any(f"train 2ep on {mds / 'instruct'} (split train)" in m for m in caplog.messages)  # the run summary
    to_mds(f"{BUNDLED_FINETUNE}/instruct_train.jsonl", "--out_root", f"{s3_bucket}/sft")
    assert run(f"train_loader.remote={s3_bucket}/sft", "eval_loader=null") == 0


def test_llm_foundry_finetuning_yaml_reads_mds_with_remote_local_split(mds, tmp_path):
    """llm-foundry's finetuning YAML (tests/data/foundry) with dataset.local/split instead of hf_name: our MDS
    source, its streaming knobs dropped with a note."""
    from llmfoundry.train import load_config

    cfg = load_config(str(REPO / "tests" / "data" / "foundry" / "mpt-finetune.yaml"), [
        f"save_folder={tmp_path}/ck",  # the translated YAML is written there (else next to the YAML)
        "tokenizer.name=bundled", "train_loader.dataset.hf_name=null", "train_loader.dataset.hf_kwargs=null",
        f"train_loader.dataset.local={mds / 'instruct'}", "train_loader.dataset.predownload=8",
        "eval_loader.dataset.hf_name=null", "eval_loader.dataset.hf_kwargs=null",
        f"eval_loader.dataset.remote={mds / 'instruct'}", "eval_loader.dataset.split=val"])
    train, val = cfg.train_loader, cfg.eval_loader
    assert isinstance(train, FinetuneLoaderConfig) and train.is_mds() and val.is_mds()
    assert (train.local, train.split, train.data_files, train.hf_dataset) == (str(mds / "instruct"), "train", None, None)
    assert (val.remote, val.split) == (str(mds / "instruct"), "val")
