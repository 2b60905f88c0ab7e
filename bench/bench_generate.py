"""Generation throughput: our MPTForCausalLM.generate (KV cache) vs transformers' MptForCausalLM.generate,
same weights, greedy, bf16, on one GPU.

    PYTHONPATH=$PWD python3 bench/bench_generate.py                       # MPT-125M, batch 1 and 8
    PYTHONPATH=$PWD python3 bench/bench_generate.py --new_tokens 512 --batch_sizes 1 8 32 --impls torch flex

A random-init model with the config of ``--config`` (default yamls/mpt-125m.yaml) is written with our
``save_pretrained`` and loaded by both sides from that directory. Every run decodes exactly ``--new_tokens``
tokens after a ``--prompt_len``-token prompt (random ids, same for both, no padding; EOS disabled). Times are the
median of ``--repeats`` timed runs after one warm-up run, wall clock with CUDA synchronization; tokens/s =
batch x new_tokens / time. The last column counts how many of the first 32 greedy tokens of row 0 equal
transformers' (bf16 rounding may let long greedy runs diverge; the first tokens should agree).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmfoundry.checkpoint import read_config_file  # noqa: E402
from llmfoundry.models.mpt import MPTForCausalLM  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (kernels, autotuning, compilation)
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours_generate(model, ids, n):
    return model.generate(ids, n, temperature=0.0, eos_token_id=None)


def hf_generate(model, ids, n):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, use_cache=True, pad_token_id=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "yamls" / "mpt-125m.yaml"), help="training YAML (model: section)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--impls", nargs="+", default=["torch", "flex", "triton"], help="our attn_impl values to time")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_hf", action="store_true", help="skip transformers (e.g. a config it cannot load)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test, not a benchmark")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU (--device cpu only smoke-tests the script)", file=sys.stderr)
        return 1
    dtype, dev = DTYPES[args.dtype], args.device
    cfg, _ = read_config_file(args.config)
    cfg = cfg.replace(init_device="cpu", max_seq_len=max(cfg.max_seq_len, args.prompt_len + args.new_tokens))
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        MPTForCausalLM(cfg).save_pretrained(tmp)
        models = {}
        if not args.no_hf:
            from transformers import MptForCausalLM
            models["transformers"] = MptForCausalLM.from_pretrained(tmp).to(dev, dtype).eval()
        for impl in args.impls:
            try:
                models[f"ours ({impl})"] = MPTForCausalLM.from_pretrained(tmp, dtype=dtype, device=dev,
                                                                          attn_config={"attn_impl": impl}).eval()
            except Exception as e:  # e.g. flash-attn not installed
                print(f"skipping attn_impl {impl}: {type(e).__name__}: {e}", file=sys.stderr)
        gen = torch.Generator().manual_seed(1)
        for b in args.batch_sizes:
            ids = torch.randint(0, cfg.vocab_size, (b, args.prompt_len), generator=gen).to(dev)
            reference = None
            for name, model in models.items():
                fn = hf_generate if name == "transformers" else ours_generate
                try:
                    with torch.no_grad():
                        out = fn(model, ids, args.new_tokens)
                        secs = timed(lambda: fn(model, ids, args.new_tokens), args.repeats)
                except Exception as e:
                    print(f"{name} batch {b}: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                new = out[0, args.prompt_len:args.prompt_len + 32].tolist()
                assert out.shape[1] == args.prompt_len + args.new_tokens, (name, out.shape)
                if name == "transformers":
                    reference = new
                match = f"{sum(x == y for x, y in zip(new, reference))}/{len(reference)}" if reference else None
                rows.append({"impl": name, "batch": b, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                             "seconds": secs, "tokens_per_s": b * args.new_tokens / secs,
                             "ms_per_step": 1000 * secs / args.new_tokens, "greedy_match": match})
                print(json.dumps(rows[-1]), flush=True)  # as it goes: a run cut short still reports
                if dev == "cuda":
                    torch.cuda.empty_cache()
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["impl"] == "transformers"}
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"\n{device_name}, torch {torch.__version__}, {args.dtype}, "
          f"d_model={cfg.d_model} n_layers={cfg.n_layers} n_heads={cfg.n_heads} vocab={cfg.vocab_size}, "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens, median of {args.repeats}\n")
    print("| impl | batch | tokens/s | ms/step | vs transformers | greedy tokens = transformers' |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['tokens_per_s'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
        match = r["greedy_match"] or "-"
        print(f"| {r['impl']} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.2f} | {speed} | {match} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
