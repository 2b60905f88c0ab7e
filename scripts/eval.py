"""Evaluate a composer checkpoint or an HF MPT directory: perplexity over MDS streams and ICL tasks.

    python scripts/eval.py yamls/eval/tiny-cpu.yaml
    python scripts/eval.py yamls/eval/mpt-7b.yaml load_path=s3://bucket/run/checkpoints/ep0-ba1000

Keys and their meaning: ``llmfoundry/eval/evaluate.py``. Prints a table and writes ``results_path`` (JSON).
"""
import sys

from llmfoundry.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
