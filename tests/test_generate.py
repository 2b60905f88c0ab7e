"""Generation helpers: greedy vs a no-cache argmax loop, seeded sampling, left-padded batches, long prompts."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from llmfoundry.checkpoint import load_model, save_composer_weights
from llmfoundry.generate import SamplingConfig, generate_ids, generate_texts, left_pad, read_prompts
from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["def main(", "import os\nimport sys\n\nclass Config:\n    name", "The Python", "x"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=4096,
                    init_config={"name": "normal_", "init_std": 0.2})  # peaky logits: no near-ties in argmax
    return MPTForCausalLM(cfg).eval()


def argmax_loop(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through the model at every step, no cache."""
    seq = list(ids)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(ids):]


def test_greedy_equals_argmax_loop_without_cache(model, tok):
    cfg = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    for p in PROMPTS[:2]:
        ids = tok(p)["input_ids"]
        assert generate_ids(model, [ids], cfg)[0] == argmax_loop(model, ids, 12)


def test_left_padded_batch_equals_one_at_a_time(model, tok):
    cfg = SamplingConfig(max_new_tokens=10, stop_at_eos=False)
    batched = generate_texts(model, tok, PROMPTS, cfg, batch_size=4)
    single = [generate_texts(model, tok, [p], cfg, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_sampling_is_reproducible_with_seed(model, tok):
    def sample(seed, **kw):
        return generate_texts(model, tok, PROMPTS, SamplingConfig(max_new_tokens=16, temperature=1.0, seed=seed,
                                                                  stop_at_eos=False, **kw), batch_size=2)
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(3, top_k=20, top_p=0.9) == sample(3, top_k=20, top_p=0.9)
    greedy = generate_texts(model, tok, PROMPTS, SamplingConfig(max_new_tokens=16, stop_at_eos=False))
    assert sample(4, top_k=1) == greedy  # top-1 sampling is greedy


def test_stops_at_eos(model, tok):
    ids = tok("def main(")["input_ids"]
    first = argmax_loop(model, ids, 1)[0]
    out = generate_ids(model, [ids], SamplingConfig(max_new_tokens=8), eos_token_id=first)
    assert out == [[]]


def test_long_prompt_needs_max_seq_len_then_works(tmp_path, model, tok):
    path = save_composer_weights(model.state_dict(), model.config, str(tmp_path / "w.pt"), tokenizer="bundled")
    long_prompt = "def f(x):\n    return x\n" * 12  # ~100 tokens > max_seq_len 64
    with pytest.raises(ValueError, match=r"exceeds the model's max_seq_len=64; raise max_seq_len to at least"):
        generate_texts(model, tok, [long_prompt], SamplingConfig(max_new_tokens=8))
    longer, _ = load_model(path, overrides={"max_seq_len": 256})
    assert longer.config.max_seq_len == 256
    out = generate_texts(longer, tok, [long_prompt, "x"], SamplingConfig(max_new_tokens=8, stop_at_eos=False))
    assert len(out) == 2 and all(out)


def test_matches_transformers_greedy(tmp_path, model, tok):
    from transformers import MptForCausalLM
    model.save_pretrained(str(tmp_path / "hf"))
    hf = MptForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = tok(PROMPTS[1])["input_ids"]
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                      eos_token_id=None)[0, len(ids):].tolist()
    assert generate_ids(model, [ids], SamplingConfig(max_new_tokens=10, stop_at_eos=False))[0] == ref


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('first\n\n{"prompt": "second\\nline"}\nthird\\nwith newline\n')
    assert read_prompts(["cli"], str(f)) == ["cli", "first", "second\nline", "third\nwith newline"]
    with pytest.raises(FileNotFoundError, match="prompts file"):
        read_prompts(None, str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(None, str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_generate_script(tmp_path, model, capsys):
    path = save_composer_weights(model.state_dict(), model.config, str(tmp_path / "w.pt"), tokenizer="bundled")
    spec = importlib.util.spec_from_file_location("gen_script", REPO / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([path, "--prompts", "def main(", "import", "--max_new_tokens", "5", "--device", "cpu",
                        "--temperature", "0.7", "--top_k", "10", "--seed", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.count("### completion") == 2 and "tok/s" in out.err
    assert script.main([path, "--device", "cpu"]) == 1
    assert "error: no prompts" in capsys.readouterr().err


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("impl", ["torch", "flex", "triton"])
def test_gpu_generation_matches_cpu(model, tok, impl, tmp_path):
    """fp32 on the GPU: greedy tokens equal the CPU's, batched (left padding) equal one at a time; bf16 runs."""
    model.save_pretrained(str(tmp_path / "hf"))
    gpu = MPTForCausalLM.from_pretrained(str(tmp_path / "hf"), device="cuda",
                                         attn_config={"attn_impl": impl}).eval()
    cfg = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    cpu_out = generate_texts(model, tok, PROMPTS, cfg, batch_size=1)
    assert generate_texts(gpu, tok, PROMPTS, cfg, batch_size=1) == cpu_out
    assert generate_texts(gpu, tok, PROMPTS, cfg, batch_size=4) == cpu_out
    bf16 = MPTForCausalLM.from_pretrained(str(tmp_path / "hf"), device="cuda", dtype=torch.bfloat16,
                                          attn_config={"attn_impl": impl}).eval()
    sampled = SamplingConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=0, stop_at_eos=False)
    assert generate_texts(bf16, tok, PROMPTS, sampled) == generate_texts(bf16, tok, PROMPTS, sampled)


@pytest.mark.gpu
@cuda
def test_gpu_bench_generate_smoke(tmp_path):
    """The benchmark script runs end to end (tiny config) on this GPU's torch / transformers versions."""
    (tmp_path / "tiny.yaml").write_text("model: {d_model: 64, n_heads: 4, n_layers: 2, max_seq_len: 64, "
                                        "vocab_size: 512}\n")
    spec = importlib.util.spec_from_file_location("bench_generate", REPO / "bench" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    assert bench.main(["--config", str(tmp_path / "tiny.yaml"), "--new_tokens", "16", "--prompt_len", "8",
                       "--repeats", "1", "--impls", "torch", "--json", str(out)]) == 0
    import json
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"transformers", "ours (torch)"}
    assert all(r["greedy_match"] == "16/16" for r in rows if r["batch"] == 1)
