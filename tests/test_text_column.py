"""MDS shards of raw text (column 'text') beside packed tokens: the converters write them (--no_tokenize), the
loader tokenizes them with the run's tokenizer (cut and padded to max_seq_len), mixes them with packed streams,
names a folder with neither column, resumes exactly, and scripts/train.py trains on them."""
from __future__ import annotations

import collections
import gc
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import MDSWriter, StreamingDataset

from conftest import assert_same_weights, checkpoint_state
from llmfoundry.data import DataError
from llmfoundry.data.convert import ConvertConfig, convert, run_cli
from llmfoundry.data.readers import TextList
from llmfoundry.data.text_loader import StreamError, TextLoaderConfig, build_text_dataloader, sequence_ids
from llmfoundry.utils.config import from_dict

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "yamls" / "tiny-cpu.yaml")
S = 64  # max_seq_len of these tests
pytestmark = pytest.mark.filterwarnings("ignore:.*(longer than max_seq_len|using the first max_seq_len)")


def corpus_docs() -> list[str]:
    """The bundled corpus's documents (built at first use, or shipped, whichever this checkout has)."""
    try:
        from llmfoundry.data.bundled import corpus_documents
    except ImportError:
        from llmfoundry.data.readers import bundled_documents as corpus_documents
    return corpus_documents()


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "data_prep" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_back(folder, column: str) -> list:
    """Every sample's column, in index order, read with mosaicml-streaming itself."""
    ds = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    out = [ds[i][column] for i in range(len(ds))]
    del ds
    gc.collect()
    return out


def expected_row(tok, text: str, pad: int) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, attention_mask) of one text sample: the tokenizer's encoding, cut and padded to S."""
    ids = tok(text)["input_ids"][:S]
    n = len(ids)
    return ids + [pad] * (S - n), ids + [-100] * (S - n), [1] * n + [0] * (S - n)


def loader_cfg(**kw) -> TextLoaderConfig:
    return from_dict(TextLoaderConfig, {"max_seq_len": S, "num_workers": 0, **kw})


def rows(loader) -> list[dict[str, list[int]]]:
    return [{k: v[i].tolist() for k, v in b.items()} for b in loader for i in range(len(b["input_ids"]))]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return [d for d in corpus_docs() if d.strip()][:48]


@pytest.fixture(scope="module")
def data(tmp_path_factory, docs) -> dict[str, Path]:
    """The same documents as JSON Lines, converted by the JSON converter's command line to raw text
    (--no_tokenize) and to packed 64-token samples; each under <root>/train."""
    root = tmp_path_factory.mktemp("text-column")
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    script = load_script("convert_dataset_json")
    script.main([str(jsonl), "--out_root", str(root / "text" / "train"), "--no_tokenize", "--no_progress"])
    script.main([str(jsonl), "--out_root", str(root / "tokens" / "train"), "--concat_tokens", str(S),
                 "--no_progress"])
    return {"text": root / "text", "tokens": root / "tokens", "jsonl": jsonl}


# ------------------------------------------------------------------------------------------- converters
def test_converter_writes_one_text_sample_per_document(data, docs, tmp_path):
    index = json.loads((data["text"] / "train" / "index.json").read_text())
    assert {(s["column_names"][0], s["column_encodings"][0]) for s in index["shards"]} == {("text", "str")}
    assert read_back(data["text"] / "train", "text") == docs  # every document, as it is, in input order
    # several processes (each a contiguous range of slices into its part-NNNNN/, one merged index): same samples
    out = tmp_path / "two"
    summary = convert(TextList(tuple(docs), docs_per_unit=10),
                      ConvertConfig(out_root=str(out), tokenize=False, processes=2, progress=False))
    assert (summary.column, summary.samples, summary.processes) == ("text", len(docs), 2)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["part-00000", "part-00001"]
    assert read_back(out, "text") == docs
    assert "samples of raw text (columns text; the training loader tokenizes them)" in str(summary)


def test_no_tokenize_refuses_the_tokenizing_flags(data, tmp_path, capsys):
    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: load_script("convert_dataset_json").main([str(data["jsonl"]), "--out_root",
                                                                        str(tmp_path / "o"), *args]))
        assert e.value.code == 2
        return capsys.readouterr().err

    assert error("--no_tokenize", "--concat_tokens", "128") == (
        "error: pass either --concat_tokens N (packed token samples, column 'tokens') or --no_tokenize (one raw-text "
        "sample per document, column 'text'), not both\n")
    err = error("--no_tokenize", "--eos_text", "", "--tokenizer", "EleutherAI/gpt-neox-20b")
    assert err.startswith("error: --tokenizer, --eos_text only apply when tokenizing; with --no_tokenize the text is "
                          "stored as it is and the training run's tokenizer (YAML tokenizer:) tokenizes it"), err
    assert not (tmp_path / "o").exists()
    with pytest.raises(DataError, match="the inputs hold no documents"):
        convert(TextList(("", "")), ConvertConfig(out_root=str(tmp_path / "e"), tokenize=False, progress=False))


# ------------------------------------------------------------------------------------------- loader
def test_text_batches_are_the_tokenizers_encoding(data, tok):
    texts = read_back(data["text"] / "train", "text")
    loader = build_text_dataloader(loader_cfg(local=str(data["text"]), split="train", shuffle=False), 4,
                                   eos_token_id=tok.eos_token_id, vocab_size=4096, tokenizer=tok)
    got = rows(loader)
    assert len(got) == len(texts) // 4 * 4
    pad = tok.eos_token_id  # the bundled tokenizer has no pad token: rows are padded with EOS
    for row, text in zip(got, texts):
        ids, labels, mask = expected_row(tok, text, pad)
        assert (row["input_ids"], row["labels"], row["attention_mask"]) == (ids, labels, mask)
        n = sum(mask)  # sequence ids: the EOS rule on the real tokens, then one more for the padding
        real = sequence_ids(torch.tensor([ids[:n]]), pad)[0].tolist()
        assert row["sequence_id"] == real + [real[-1] + 1] * (S - n)
    assert any(sum(r["attention_mask"]) < S for r in got) and any(sum(r["attention_mask"]) == S for r in got)
    # the tokenizer may be given by name, as the YAML's tokenizer: key names it
    by_name = build_text_dataloader(loader_cfg(local=str(data["text"]), split="train", shuffle=False), 4,
                                    tokenizer="bundled")
    assert rows(by_name)[0]["input_ids"] == got[0]["input_ids"]


def test_packed_and_text_streams_mix_in_one_loader(data, tok):
    packed = [r.tolist() for r in read_back(data["tokens"] / "train", "tokens")]
    texts = read_back(data["text"] / "train", "text")
    cfg = loader_cfg(split="train", shuffle=True, drop_last=False, streams={"packed": {"local": str(data["tokens"])},
                                                                            "prose": {"local": str(data["text"])}})
    got = rows(build_text_dataloader(cfg, 4, tokenizer=tok))
    assert all(set(r) == {"input_ids", "labels", "attention_mask"} for r in got)
    # every packed sample and every document once (a document's start can equal a packed sample: a multiset)
    pad = tok.eos_token_id
    expected = [tuple(p) for p in packed] + [tuple(expected_row(tok, t, pad)[0]) for t in texts]
    assert collections.Counter(tuple(r["input_ids"]) for r in got) == collections.Counter(expected)
    for r in got:  # labels: the tokens, -100 on padding; padding only after the real tokens
        n = sum(r["attention_mask"])
        assert r["attention_mask"] == [1] * n + [0] * (S - n)
        assert r["labels"] == r["input_ids"][:n] + [-100] * (S - n)
    short = sum(len(tok(t)["input_ids"]) < S for t in texts)
    assert short > 0 and sum(sum(r["attention_mask"]) < S for r in got) == short


def test_a_folder_with_neither_column_is_named(tmp_path, tok, capsys):
    folder = tmp_path / "mds" / "train"
    with MDSWriter(out=str(folder), columns={"content": "str", "id": "int"}) as w:
        w.write({"content": "hello", "id": 1})
    with pytest.raises(StreamError) as e:
        build_text_dataloader(loader_cfg(local=str(tmp_path / "mds"), split="train"), 4, tokenizer=tok)
    assert str(e.value) == (
        f"stream 'default' ({tmp_path / 'mds' / 'train'}): its shards have neither a 'tokens' column (ndarray:int32: "
        f"packed token samples) nor a 'text' column (str: one document per sample, tokenized while loading); found "
        f"{{content: str, id: int}}. Fix: convert the corpus with data_prep/convert_dataset_json.py (or "
        f"convert_dataset_hf.py, convert_dataset_parquet.py, convert_text_to_mds.py): --concat_tokens N writes "
        f"'tokens', --no_tokenize writes 'text'.")
    finetune = tmp_path / "ft"
    with MDSWriter(out=str(finetune), columns={"prompt": "str", "response": "str"}) as w:
        w.write({"prompt": "a", "response": "b"})
    with pytest.raises(StreamError, match=r"look like finetuning examples: read them with train_loader.name: finetune"):
        build_text_dataloader(loader_cfg(streams={"sft": {"local": str(finetune)}}), 4, tokenizer=tok)
    # through scripts/train.py: the same message on one line, exit status 1, before any training
    from llmfoundry.train import main
    status = main([TINY, f"train_loader.local={tmp_path / 'mds'}", "eval_loader=null", f"save_folder={tmp_path}/ck"])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith(f"error: stream 'default' ({folder}): its shards have neither"), err


def test_text_streams_need_the_tokenizer(data):
    with pytest.raises(StreamError, match=r"stream 'default' .*hold raw text \(column 'text'\).*no tokenizer was "
                                          r"given\. Fix: pass tokenizer= to build_text_dataloader"):
        build_text_dataloader(loader_cfg(local=str(data["text"]), split="train"), 4)
    # a stream of packed tokens needs none
    assert len(rows(build_text_dataloader(loader_cfg(local=str(data["tokens"]), split="train"), 4))) > 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_continues_at_the_exact_next_sample(data, tok, num_workers):
    cfg = loader_cfg(split="train", shuffle=True, shuffle_block_size=16, num_workers=num_workers,
                     streams={"packed": {"local": str(data["tokens"])}, "prose": {"local": str(data["text"])}})
    bs, k = 4, 5

    def fresh():
        return build_text_dataloader(cfg, bs, eos_token_id=tok.eos_token_id, tokenizer=tok)

    reference = fresh()
    epoch = [r["input_ids"] for r in rows(reference)]
    del reference
    first = fresh()
    head = []
    for batch in first:
        head += batch["input_ids"].tolist()
        if len(head) == k * bs:
            break
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds
    del first
    gc.collect()
    second = fresh()
    second.load_state_dict(state)
    tail = [r["input_ids"] for r in rows(second)]
    assert head + tail == epoch


# ------------------------------------------------------------------------------------------- scripts/train.py
def train_args(folder, *extra: str) -> list[str]:
    """tiny-cpu at 64 tokens per sample, 4 per step, on the text stream (and a packed one with mix=True)."""
    return [TINY, f"save_folder={folder}", "variables.seq_len=64", "global_train_batch_size=4",
            "device_train_microbatch_size=4", "eval_loader=null", "max_duration=6ba", "scheduler.t_max=6ba",
            "scheduler.t_warmup=2ba", "save_interval=3ba", "save_num_checkpoints_to_keep=-1", "progress_bar=false",
            "callbacks.speed_monitor=null", "model.attn_config.attn_uses_sequence_id=true", *extra]


def test_training_on_text_shards_runs_and_resumes_exactly(data, tmp_path, caplog):
    """scripts/train.py's main on a text stream mixed with a packed one: it trains; a run stopped after 3 batches
    and continued by the same command ends with the weights of a run that never stopped (data position too)."""
    from llmfoundry.train import load_config, main, train

    streams = (f"train_loader.streams={{packed: {{local: {data['tokens']}}}, prose: {{local: {data['text']}}}}}")
    mixed = ["train_loader.local=null", streams]
    cfg = load_config(TINY, train_args(tmp_path / "one", *mixed, "max_duration=1ba", "autoresume=false")[1:])
    trainer = train(cfg)  # the batch carries the padding mask of the text rows
    assert set(trainer.state.batch) == {"input_ids", "labels", "attention_mask", "sequence_id"}
    trainer.close()
    del trainer
    whole = tmp_path / "whole"
    assert main(train_args(whole, *mixed)) == 0
    parts = tmp_path / "parts"
    assert main(train_args(parts, *mixed, "max_duration=3ba")) == 0
    caplog.clear()
    assert main(train_args(parts, *mixed)) == 0
    assert any(m.startswith("autoresume: continuing from") and "ba3-rank0.pt" in m for m in caplog.messages)
    assert_same_weights(checkpoint_state(parts, 6), checkpoint_state(whole, 6))
    state = checkpoint_state(whole, 6)
    assert all(torch.isfinite(w).all() for w in state["model"].values())
    # the text stream alone trains too
    assert main(train_args(tmp_path / "text", f"train_loader.local={data['text']}", "max_duration=2ba")) == 0


def test_scripts_eval_scores_a_text_stream_without_its_padding(data, docs, tmp_path, tok):
    """scripts/eval.py on a stream of raw text: tokenized with the model's tokenizer, padding not scored (the token
    count equals the documents' tokens, cut to max_seq_len, minus the first of each row which has no prediction)."""
    from llmfoundry.checkpoint import save_composer_weights
    from llmfoundry.eval.evaluate import evaluate, load_eval_config
    from llmfoundry.models.mpt import MPTForCausalLM
    from llmfoundry.train.config import load_config

    model = MPTForCausalLM(load_config(TINY, ["variables.seq_len=64"]).model)
    ckpt = save_composer_weights(model.state_dict(), model.config, str(tmp_path / "w.pt"), tokenizer="bundled")
    cfg = load_eval_config(str(REPO / "yamls" / "eval" / "tiny-cpu.yaml"), [
        f"load_path={ckpt}", "icl_tasks=null", f"eval_loaders.val.local={data['text']}", "eval_loaders.val.split=train",
        "eval_loaders.val.max_seq_len=64", "device=cpu", "results_path=null"])
    r = evaluate(cfg)["perplexity"]["val"]
    lengths = [min(len(tok(d, add_special_tokens=False)["input_ids"]), 64) for d in docs]
    assert r["tokens"] == sum(n - 1 for n in lengths) and r["loss"] > 0
