#!/usr/bin/env bash
# Installs steady (npm package @stdy/cli, pinned in tests/contract/package.json and
# package-lock.json) into
# tests/contract/node_modules, and prints the path of the steady executable.
#
# Idempotent: does nothing when the pinned version is already installed. Needs node and npm,
# and the npm registry (or an npm cache that holds the package).
#
# The contract test (crates/sluice-cli/tests/contract.rs) finds steady there by itself;
# STEADY_BIN=<path printed here> points it at another copy.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/tests/contract"
version="$(node -p "require('$dir/package.json').devDependencies['@stdy/cli']")"

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) platform=linux-x64 ;;
    Linux-aarch64 | Linux-arm64) platform=linux-arm64 ;;
    Darwin-x86_64) platform=darwin-x64 ;;
    Darwin-arm64) platform=darwin-arm64 ;;
    *) platform="" ;;
esac

installed_version() {
    node -p "require('$dir/node_modules/@stdy/cli/package.json').version" 2>/dev/null || true
}

if [[ "$(installed_version)" != "$version" ]] ||
    { [[ -n "$platform" ]] && [[ ! -x "$dir/node_modules/@stdy/cli-$platform/bin/steady" ]]; }; then
    echo "installing @stdy/cli@$version into $dir/node_modules" >&2
    # stdout carries only the path; npm's own output goes to stderr. `npm ci` installs
    # exactly what package-lock.json pins (versions and integrity hashes).
    npm ci --prefix "$dir" --include=dev --include=optional --no-audit --no-fund >&2
fi

# Prefer the native executable: the npm wrapper (node_modules/.bin/steady, a node script)
# does not pass SIGKILL on to it, so a killed wrapper would leave steady running.
if [[ -n "$platform" && -x "$dir/node_modules/@stdy/cli-$platform/bin/steady" ]]; then
    bin="$dir/node_modules/@stdy/cli-$platform/bin/steady"
else
    bin="$dir/node_modules/.bin/steady"
fi
"$bin" --version >&2
echo "$bin"
