"""Evaluate a composer checkpoint or an HF MPT directory: perplexity over MDS streams and ICL tasks.

    python scripts/eval.py yamls/eval/tiny-cpu.yaml
    python scripts/eval.py yamls/eval/mpt-7b.yaml load_path=s3://bucket/run/checkpoints/ep0-ba1000

Keys and their meaning: ``llmfoundry/eval/evaluate.py``. Prints a table and writes ``results_path`` (JSON).
``--help`` is answered here, before torch is imported: it prints that module's docstring (the key table), read
from its source.
"""
import ast
import importlib.util
import sys
from pathlib import Path

USAGE = """\
usage: python scripts/eval.py yamls/eval/CONFIG.yaml [key=value ...]

  python scripts/eval.py yamls/eval/tiny-cpu.yaml
  python scripts/eval.py yamls/eval/mpt-7b.yaml load_path=s3://bucket/run/checkpoints/ep0-ba1000

Overrides: key=value arguments after the YAML, applied in order (the later wins); a dotted key reaches into
sections, a number indexes a list, the value is read as YAML (as for scripts/train.py).
Exit status: 0 done, 1 a config, checkpoint or data error (one message on stderr), 2 a bad command line.
"""


def keys_doc() -> str:
    """The docstring of ``llmfoundry/eval/evaluate.py`` (where the keys are documented), without importing it."""
    package = Path(importlib.util.find_spec("llmfoundry").origin).parent
    source = package / "eval" / "evaluate.py"
    doc = ast.get_docstring(ast.parse(source.read_text(), str(source)), clean=False) or ""
    return f"YAML keys, from llmfoundry/eval/evaluate.py:\n\n{doc.strip()}\n"


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


if __name__ == "__main__":
    if wants_help(sys.argv[1:]):
        print(USAGE + "\n" + keys_doc(), end="")
        sys.exit(0)
    from llmfoundry.eval.evaluate import main
    sys.exit(main())
