"""Generate text from a composer checkpoint or an HF MPT directory.

    python scripts/generate.py runs/tiny-cpu/checkpoints/latest-rank0.pt --prompts "def main(" "import os"
    python scripts/generate.py hf/mpt-7b --prompts_file prompts.txt --temperature 0.8 --top_p 0.95 --seed 1
    python scripts/generate.py CKPT --prompts_file long.txt --max_seq_len 8192   # ALiBi: run past training length

Greedy by default (--temperature 0); sampling with --temperature > 0 and optional --top_k / --top_p, reproducible
with --seed. Prompts are batched (--batch_size) with left padding and decoded with the KV cache.
"""
import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="composer checkpoint (.pt, sharded folder, s3://...) or HF MPT directory")
    p.add_argument("--prompts", nargs="+", default=None, help="prompt strings")
    p.add_argument("--prompts_file", default=None, help="one prompt per line (or JSONL with a 'prompt' key)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_seq_len", type=int, default=None, help="raise the model's max_seq_len (ALiBi models)")
    p.add_argument("--attn_impl", default=None, choices=["torch", "flex", "flash", "triton"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on GPU")
    p.add_argument("--tokenizer", default=None, help="default: the model's own")
    p.add_argument("--model_config", default=None, help="training YAML, when the checkpoint records no config")
    p.add_argument("--no_stop_at_eos", action="store_true", help="keep generating after EOS")
    args = p.parse_args(argv)

    import torch

    from llmfoundry.checkpoint import CheckpointError
    from llmfoundry.generate import SamplingConfig, generate_texts, load_for_generation, read_prompts

    try:
        prompts = read_prompts(args.prompts, args.prompts_file)
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                  stop_at_eos=not args.no_stop_at_eos)
        model, tokenizer, _ = load_for_generation(
            args.model, device=args.device, dtype=args.dtype, attn_impl=args.attn_impl,
            max_seq_len=args.max_seq_len, tokenizer=args.tokenizer, model_config=args.model_config)
        t0 = time.perf_counter()
        outputs = generate_texts(model, tokenizer, prompts, sampling, batch_size=args.batch_size)
        elapsed = time.perf_counter() - t0
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for prompt, out in zip(prompts, outputs):
        print(f"### prompt\n{prompt}\n### completion\n{out}\n")
    new_tokens = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
    print(f"{len(prompts)} prompts, ~{new_tokens} new tokens in {elapsed:.2f}s ({new_tokens / elapsed:.1f} tok/s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
