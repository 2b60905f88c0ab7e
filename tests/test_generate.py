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


def test_transformers_keywords_mean_what_they_mean_there(model, tok):
    """do_sample, use_cache, pad_token_id, eos_token_id, max_new_tokens, temperature, top_k, top_p."""
    ids = torch.tensor([tok("def main(")["input_ids"]])
    n = ids.shape[1]
    greedy = model.generate(ids, max_new_tokens=12)
    assert greedy[0, n:].tolist() == argmax_loop(model, ids[0].tolist(), 12)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, temperature=0.7, top_k=5), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=12, use_cache=False), greedy)

    def sampled(**kw):
        return model.generate(ids, max_new_tokens=12, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(sampled(do_sample=True), sampled(temperature=1.0))  # do_sample alone: temperature 1
    assert torch.equal(sampled(do_sample=True, top_p=0.9, use_cache=False), sampled(temperature=1.0, top_p=0.9))
    assert not torch.equal(sampled(do_sample=True), greedy)
    # after eos, a row holds pad_token_id when one is given, else its eos
    eos = int(greedy[0, n + 2])
    padded = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert padded[0, n:].tolist()[:3] == greedy[0, n:n + 3].tolist() and padded.shape[1] == n + 3
    batch = torch.cat([ids, ids.flip(1)])
    out = model.generate(batch, max_new_tokens=8, eos_token_id=eos, pad_token_id=7)
    row = out[0, n:].tolist()
    assert row[:3] == greedy[0, n:n + 3].tolist() and set(row[3:]) <= {7}


def test_long_prompt_needs_max_seq_len_then_works(tmp_path, model, tok):
    path = save_composer_weights(model.state_dict(), model.config, str(tmp_path / "w.pt"), tokenizer="bundled")
    long_prompt = "def f(x):\n    return x\n" * 12  # ~100 tokens > max_seq_len 64
    with pytest.raises(ValueError, match=r"exceeds the model's max_seq_len=64; raise max_seq_len to at least"):
        generate_texts(model, tok, [long_prompt], SamplingConfig(max_new_tokens=8))
    short = "def f(x): return x"  # fits, but not with 64 new tokens: the message offers both fixes
    n = len(tok(short)["input_ids"])
    with pytest.raises(ValueError, match=rf"runs past its training length\), or lower max_new_tokens to {64 - n}$"):
        generate_texts(model, tok, [short], SamplingConfig(max_new_tokens=64))
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
    f.write_text('first\n\n{"prompt": "second\\nline"}\nthird\\nwith newline\n{x: 1\n')
    assert read_prompts(["cli"], str(f)) == ["cli", "first", "second\nline", "third\nwith newline", "{x: 1"]
    f.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r"p\.txt:1: a JSON line must be an object with a 'prompt' string"):
        read_prompts(None, str(f))
    with pytest.raises(FileNotFoundError, match="prompts file"):
        read_prompts(None, str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(None, str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match=r"top_k=5 / top_p=1.0 only shape sampling.*set a temperature > 0"):
        SamplingConfig(top_k=5)  # greedy by default: a top_k alone would be ignored


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


def load_script():
    spec = importlib.util.spec_from_file_location("gen_script", REPO / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("impl,needs", [("triton", "a CUDA GPU"), ("flash", "a CUDA GPU and the flash-attn package")])
def test_generate_script_gpu_attn_impl_on_cpu_is_one_line_error(tmp_path, capsys, impl, needs):
    """--attn_impl triton/flash with the CPU as device: refused before any weights are read (the checkpoint path
    does not even exist), one line, exit 1; the library refuses such a model too, before its first forward."""
    script = load_script()
    missing = str(tmp_path / "not-there.pt")
    assert script.main([missing, "--prompts", "def main(", "--device", "cpu", "--attn_impl", impl]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: attn_impl '{impl}' needs {needs}; use torch or flex on CPU"]
    from llmfoundry.generate import check_attn_impl
    with pytest.raises(ValueError, match=f"attn_impl '{impl}' needs {needs}; use torch or flex on CPU"):
        check_attn_impl(impl, torch.device("cpu"))
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=4096,
                    attn_config={"attn_impl": impl})
    with pytest.raises(ValueError, match=f"attn_impl '{impl}' needs"):
        generate_ids(MPTForCausalLM(cfg).eval(), [[1, 2, 3]], SamplingConfig(max_new_tokens=2))


def test_generate_script_checkpoint_with_gpu_attn_impl_on_cpu(tmp_path, model, capsys, caplog):
    """A checkpoint trained with attn_impl triton, sampled on the CPU: it runs with 'torch' (a warning says so)
    and gives the same greedy tokens as the model it came from; --attn_impl flex is taken as asked."""
    path = save_composer_weights(model.state_dict(), model.config.replace(attn_config={"attn_impl": "triton"}),
                                 str(tmp_path / "w.pt"), tokenizer="bundled")
    loaded, _ = load_model(path, device="cpu")
    assert loaded.config.attn_config.attn_impl == "torch"
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.0)
    assert generate_ids(loaded, [[5, 6, 7]], cfg) == generate_ids(model, [[5, 6, 7]], cfg)
    script = load_script()
    args = [path, "--prompts", "def main(", "--max_new_tokens", "3", "--device", "cpu"]
    caplog.clear()
    assert script.main(args) == 0
    assert capsys.readouterr().out.count("### completion") == 1
    assert "trained with attn_impl 'triton', which needs a CUDA GPU; running it on cpu with attn_impl 'torch'" \
        in caplog.text
    caplog.clear()
    assert script.main(args + ["--attn_impl", "flex"]) == 0
    assert capsys.readouterr().out.count("### completion") == 1 and "attn_impl 'torch'" not in caplog.text


def test_check_attn_impl_on_cuda_device():
    """The CUDA side of the check, from the packages installed here (no GPU needed: it only names the device)."""
    from llmfoundry.generate import check_attn_impl
    for impl in (None, "torch", "flex"):
        check_attn_impl(impl, "cpu")
        check_attn_impl(impl, "cuda", "fp32")
    has_flash = importlib.util.find_spec("flash_attn") is not None
    has_triton = importlib.util.find_spec("triton") is not None
    if has_flash:
        check_attn_impl("flash", "cuda", "bf16")
        with pytest.raises(ValueError, match="attn_impl 'flash' runs in fp16/bf16, not fp32"):
            check_attn_impl("flash", torch.device("cuda"), torch.float32)
    else:
        with pytest.raises(ValueError, match="needs the flash-attn package"):
            check_attn_impl("flash", "cuda", "bf16")
    if has_triton:
        check_attn_impl("triton", "cuda", "fp32")
    else:
        with pytest.raises(ValueError, match="needs the triton package"):
            check_attn_impl("triton", "cuda", "fp32")


def corpus_texts() -> list[str]:
    from llmfoundry.data.bundled import corpus_documents
    return corpus_documents()


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[int, str]:
    """Real BPE tokenizers trained on the bundled corpus, one larger (6000) and one smaller (1000) than the
    model's vocab_size of 4096, saved as directories that --tokenizer accepts."""
    from llmfoundry.data.bpe import train_bpe_tokenizer
    texts = corpus_texts()
    out = {}
    for size in (6000, 1000):
        d = tmp_path_factory.mktemp(f"tok{size}")
        tok = train_bpe_tokenizer(texts, vocab_size=size)
        assert len(tok) == size
        tok.save_pretrained(str(d))
        out[size] = str(d)
    return out


def test_generate_script_refuses_tokenizer_bigger_than_vocab(tmp_path, model, tok, capsys, tokenizer_dirs):
    """A 6000-token tokenizer on a 4096-vocab model: it does produce ids past the embedding, and the script says
    so in one line naming both sizes and the fix; a 1000-token tokenizer (fewer than vocab_size) is fine."""
    from llmfoundry.data.tokenizer import load_tokenizer
    big = load_tokenizer(tokenizer_dirs[6000])
    # the mismatch is real: ordinary text encodes to ids the model has no embedding row for
    assert max(big(corpus_texts()[0])["input_ids"]) >= 4096
    path = save_composer_weights(model.state_dict(), model.config, str(tmp_path / "w.pt"), tokenizer="bundled")
    script = load_script()
    args = [path, "--prompts", PROMPTS[1], "--max_new_tokens", "3", "--device", "cpu"]
    assert script.main(args + ["--tokenizer", tokenizer_dirs[6000]]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and not captured.out, captured
    assert lines[0].startswith(f"error: tokenizer '{tokenizer_dirs[6000]}' has 6000 tokens but the model's "
                               "vocab_size is 4096")
    assert "use the tokenizer the model was trained with" in lines[0] and "drop --tokenizer" in lines[0]
    with pytest.raises(ValueError, match="has 6000 tokens but the model's vocab_size is 4096"):
        generate_texts(model, big, ["x"], SamplingConfig(max_new_tokens=2))

    assert script.main(args + ["--tokenizer", tokenizer_dirs[1000]]) == 0  # smaller: the vocab is padded, fine
    assert capsys.readouterr().out.count("### completion") == 1
    assert script.main(args) == 0  # default: the tokenizer recorded with the checkpoint (bundled, 4096)
    assert capsys.readouterr().out.count("### completion") == 1
