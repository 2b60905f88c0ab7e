"""Export a composer checkpoint to a Hugging Face MPT directory (config.json, model.safetensors, tokenizer files).

    python scripts/convert_composer_to_hf.py runs/tiny-cpu/checkpoints/latest-rank0.pt hf/tiny-cpu
    python scripts/convert_composer_to_hf.py s3://bucket/run/checkpoints/ep0-ba1000 hf/run --dtype bf16
    python scripts/convert_composer_to_hf.py CKPT OUT --model_config yamls/tiny-cpu.yaml --tokenizer bundled

CKPT is a whole checkpoint file (.pt), a sharded checkpoint folder (.metadata + __N_0.distcp) or an s3:// path.
The output loads with ``transformers.MptForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer.from_pretrained(OUT)``;
``--verify`` checks that transformers' logits equal ours on a sample text. OUT must be empty or new: with
``--overwrite`` the export's files replace those of an earlier export (other files stay). A folder holding composer
checkpoints is always refused.
"""
import argparse
import sys

from llmfoundry.checkpoint import CheckpointError, convert_composer_to_hf, load_model


def verify(out_dir: str, text: str = "def hello(name):\n    return f'hello {name}'\n") -> float:
    """Max |logit difference| between transformers' MptForCausalLM and ours on ``text`` (fp32)."""
    import torch
    from transformers import AutoTokenizer, MptForCausalLM
    tok = AutoTokenizer.from_pretrained(out_dir)
    hf = MptForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    ours, _ = load_model(out_dir, dtype="fp32")
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return (hf(ids).logits - ours(ids).logits).abs().max().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="composer checkpoint: .pt file, sharded folder, or s3://...")
    p.add_argument("out_dir", help="output directory (created; refused when not empty, unless --overwrite)")
    p.add_argument("--tokenizer", default=None, help="default: the tokenizer the run was trained with")
    p.add_argument("--model_config", default=None,
                   help="training YAML / model config, when the checkpoint records none and has no config.yaml")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the saved weights")
    p.add_argument("--verify", action="store_true", help="load with transformers and compare logits")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an existing export in out_dir (never in a folder of checkpoints)")
    args = p.parse_args(argv)
    try:
        out = convert_composer_to_hf(args.checkpoint, args.out_dir, tokenizer=args.tokenizer,
                                     model_config=args.model_config, dtype=args.dtype,
                                     overwrite=args.overwrite)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    if args.verify:
        diff = verify(out)
        print(f"transformers MptForCausalLM vs ours: max |logit diff| = {diff:.3g}")
        if diff > 1e-3:
            print("error: logits differ", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
