"""The tiny default data: built at first use from this Python's standard library into a cache, once, by one
process while the others wait; the package ships no corpus, tokenizer or shards of other people's text."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from streaming import StreamingDataset

from llmfoundry.data import ASSETS, bundled

REPO = Path(__file__).resolve().parents[1]
BUILD = ("import sys; from llmfoundry.data import bundled; p = bundled.ensure_built(); "
         "print(p, (p / 'tokenizer' / 'tokenizer.json').stat().st_mtime_ns)")


def python(code: str, cache: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "MPT_FORGE_CACHE": str(cache), **env})


def test_the_package_ships_only_our_own_assets():
    shipped = sorted(str(p.relative_to(ASSETS)) for p in Path(ASSETS).rglob("*") if p.is_file())
    assert all(p.startswith(("finetune/", "icl/")) for p in shipped), shipped
    tracked = subprocess.run(["git", "ls-files", "llmfoundry"], cwd=REPO, capture_output=True, text=True).stdout
    assert not [f for f in tracked.split() if f.endswith((".mds", ".zstd", "tokenizer.json", "LICENSE"))]


def test_first_use_builds_once_while_other_processes_wait(tmp_path):
    """Three processes start together on an empty cache: one builds (and says so), all get the same folder and the
    same files; a later process finds the folder complete and builds nothing."""
    procs = [python(BUILD, tmp_path) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert len({o for o, _ in outs}) == 1, outs  # same folder, same tokenizer file (written once)
    assert sum("Building the tiny default data from Python" in e for _, e in outs) == 1, [e for _, e in outs]
    folder = Path(outs[0][0].split()[0])
    assert folder.parent == tmp_path and folder.name.startswith("tiny-")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [folder.name]  # no partial folder left

    build = json.loads((folder / "build.json").read_text())
    assert build["python"] == sys.version.split()[0] and build["vocab_size"] == 4096
    assert build["documents"] == len(bundled.corpus_documents()) > 100
    assert sorted(os.listdir(folder / "corpus" / "code")) == sorted(n for n, _ in bundled.corpus_sources()[1])

    again = python(BUILD, tmp_path)
    out, err = again.communicate(timeout=120)
    assert out == outs[0][0] and "Building" not in err


def test_built_shards_hold_the_corpus_tokens(tmp_path, monkeypatch):
    """The val shards are the held-out documents, tokenized with the built tokenizer and packed back to back
    (each followed by EOS), cut into 256-token samples; train and val together hold every document."""
    monkeypatch.setenv("MPT_FORGE_CACHE", str(tmp_path))
    from llmfoundry.data.tokenizer import load_tokenizer
    tok = load_tokenizer("bundled")
    assert Path(tok.name_or_path).is_relative_to(tmp_path)
    splits = bundled.split_documents(bundled.corpus_documents())
    assert len(splits["val"]) == 6 and len(splits["train"]) > 100
    expected = []
    for doc in splits["val"]:
        expected += tok(doc)["input_ids"] + [tok.eos_token_id]
    ds = StreamingDataset(local=bundled.mds_dir(), split="val", shuffle=False, batch_size=1)
    got = np.concatenate([ds[i]["tokens"] for i in range(ds.num_samples)])
    assert ds.num_samples == len(expected) // 256 and got.tolist() == expected[:len(got)]


def test_an_unwritable_cache_is_named_with_the_fix(tmp_path):
    p = python("from llmfoundry.data.tokenizer import load_tokenizer; load_tokenizer('bundled')",
               Path("/proc/mpt-forge-cache"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1
    assert "cannot write the tiny default data's cache folder /proc/mpt-forge-cache" in err
    assert "set MPT_FORGE_CACHE to a writable folder" in err


def test_the_module_prints_where_the_data_is(tmp_path):
    res = subprocess.run([sys.executable, "-m", "llmfoundry.data.bundled", "--corpus"], cwd=REPO, text=True,
                         capture_output=True, env={**os.environ, "MPT_FORGE_CACHE": str(tmp_path)}, timeout=120)
    assert res.returncode == 0, res.stderr
    corpus = Path(res.stdout.strip())
    assert corpus.parent.parent == tmp_path and (corpus / "python_reference.jsonl").is_file()
