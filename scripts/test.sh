#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need (a Python
# virtualenv with the official openai and anthropic SDKs, and steady from npm for the
# contract test), then runs every Rust test in release mode and the Python SDK tests
# against the built `sluice sim`.
#
#   scripts/test.sh            # everything
#   SLUICE_DST_SCHEDULES=100000 scripts/test.sh   # a deeper deterministic simulation
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== installing test tools" >&2
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
STEADY_BIN="$(scripts/install-steady.sh)"
export STEADY_BIN

echo "== cargo test (release)" >&2
cargo build --release --workspace --bins
cargo test --release --workspace

echo "== Python SDK tests against sluice sim" >&2
SLUICE_BIN="$PWD/target/release/sluice" .venv/bin/python -m pytest -q tests/python
