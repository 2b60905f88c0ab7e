"""Train an MPT model from a YAML config: ``python scripts/train.py yamls/tiny-cpu.yaml [key=value ...]``.

Multi-process / multi-node: ``composer [-n NPROC] [--world_size W --node_rank R --master_addr A --master_port P]
scripts/train.py CONFIG.yaml ...`` (see ``llmfoundry/train/train.py``).
"""
import sys

from llmfoundry.train import main

if __name__ == "__main__":
    sys.exit(main())
