#!/usr/bin/env bash
# Times the README's installs as a new user meets them: each run in a fresh venv, with the pip that
# `python3 -m venv` ships and an empty pip cache of its own, and prints one markdown row per measurement.
#
#   bash bench/bench_install.sh [runs=3]      # about 6 minutes a run on 2 cores; needs ~7 GB of free disk
#
# Rows: `--dry-run` resolution with the lock and without it (pyproject's ranges alone, as `pip install mpt-forge`
# would resolve), then the two README installs with the lock: `-e .` (quick start) and `-e '.[dev]'` (tests).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

timed() {  # timed LABEL RUN CMD...: run CMD in a fresh venv with an empty cache, print a row
    local label="$1" run="$2"
    shift 2
    rm -rf "$work/venv" "$work/cache"
    python3 -m venv "$work/venv"
    local start end
    start=$(date +%s.%N)
    if ! PIP_CACHE_DIR="$work/cache" "$@" >"$work/log" 2>&1; then
        echo "failed: $label (run $run)" >&2
        tail -20 "$work/log" >&2
        exit 1
    fi
    end=$(date +%s.%N)
    local disk="-"
    [[ "$label" == install* ]] && disk="$(du -sh "$work/venv" | cut -f1)"
    printf '| %s | %d | %.0f s | %s |\n' "$label" "$run" "$(echo "$end - $start" | bc)" "$disk"
}

pip="$work/venv/bin/pip"
python3 -m venv "$work/venv"
echo "$("$work/venv/bin/python" -V), the venv's pip $("$pip" -V | cut -d' ' -f2), $(uname -sm), $(nproc) cores, $(date -u +%F)"
echo
echo "| what | run | wall | venv size |"
echo "|---|---|---|---|"
for run in $(seq 1 "$runs"); do
    timed "dry-run, lock, -e '.[dev]'" "$run" "$pip" install --dry-run -c requirements/lock.txt -e '.[dev]'
    timed "dry-run, no lock, -e '.[dev]'" "$run" "$pip" install --dry-run -e '.[dev]'
    timed "install, lock, -e . (quick start)" "$run" "$pip" install -c requirements/lock.txt -e .
    timed "install, lock, -e '.[dev]' (tests)" "$run" "$pip" install -c requirements/lock.txt -e '.[dev]'
done
