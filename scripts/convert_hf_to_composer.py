"""An HF MPT directory as the starting weights of a training run.

    python scripts/convert_hf_to_composer.py hf/mpt-7b init/mpt-7b.pt --model_config yamls/mpt-7b.yaml
    python scripts/train.py yamls/mpt-7b.yaml load_path=init/mpt-7b.pt load_weights_only=true

The output is a weights-only composer checkpoint (``state['state']['model']`` with ``model.``-prefixed keys, plus
the model config); the trainer's ``load_path`` with ``load_weights_only: true`` loads it. The training YAML's
``model:`` must describe the same shapes (a mismatch names the tensor and both shapes). An existing output
file (such as a training checkpoint) is refused unless ``--overwrite``.
"""
import argparse
import sys

from llmfoundry.checkpoint import CheckpointError, convert_hf_to_composer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="directory with config.json + model.safetensors (or pytorch_model.bin)")
    p.add_argument("out", help="output .pt file (refused when it exists, unless --overwrite)")
    p.add_argument("--model_config", default=None,
                   help="the training YAML: check that the weights fit its model: section before writing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    try:
        out = convert_hf_to_composer(args.hf_dir, args.out, model_config=args.model_config,
                                     overwrite=args.overwrite)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
