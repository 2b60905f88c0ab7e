#!/usr/bin/env bash
# Re-resolves pyproject.toml's ranges (the dev extra included) in a fresh virtual environment and writes every
# installed package, transitive ones too, at its exact version to requirements/lock.txt.
#
#   bash requirements/refresh-lock.sh            # about 3 minutes; PYTHON=python3.11 picks the interpreter
#
# Run it on Linux x86_64 with CPython 3.11 (CI's platform and the Docker image's), then run the tests against the
# new lock (`bash .ci/run`) and commit pyproject.toml and the lock together. The lock is used as a pip constraints
# file (`pip install -c requirements/lock.txt ...`): lines for packages that a platform does not need (the
# nvidia-* wheels on macOS, say) are ignored there.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m venv "$work/venv"
echo "resolving pyproject.toml's ranges in a fresh venv ($("$work/venv/bin/python" -V), $(uname -sm)) ..." >&2
"$work/venv/bin/pip" install -q --no-cache-dir -e '.[dev]'
"$work/venv/bin/pip" check >&2
{
    echo "# Exact versions of every package that 'pip install -e .[dev]' installs, transitive ones included."
    echo "# Written by requirements/refresh-lock.sh; resolved with $("$work/venv/bin/python" -V) on $(uname -sm)."
    echo "# Install with it as constraints: pip install -c requirements/lock.txt -e '.[dev]'"
    # --all keeps setuptools (triton needs it at run time); pip itself is not a dependency
    "$work/venv/bin/pip" freeze --all --exclude-editable | grep -v '^pip==' | LC_ALL=C sort -f
} > requirements/lock.txt.new

# The Docker image (Ubuntu 22.04: glibc 2.35, CPython 3.11, x86_64) installs from the lock: every pin must have a
# distribution for that platform. pip checks it without installing anything.
platforms=()
for n in 35 34 31 28 27 24 17 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
grep -v '^#' requirements/lock.txt.new > "$work/pins.txt"
"$work/venv/bin/pip" install -q --dry-run --target "$work/image" --no-deps --python-version 3.11 \
    --implementation cp --abi cp311 --abi abi3 --abi none "${platforms[@]}" --platform manylinux2014_x86_64 \
    --platform linux_x86_64 -r "$work/pins.txt"
echo "every pin has a distribution for the image (Linux x86_64, glibc 2.35, CPython 3.11)" >&2

mv requirements/lock.txt.new requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) packages)" >&2
