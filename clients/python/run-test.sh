#!/usr/bin/env bash
# Runs the Python example's test against the real server: builds target/debug/lamplight, makes a venv in
# target/python-venv with requirements.txt, generates the stubs from proto/, and runs pytest.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/python-venv"

command -v python3 >/dev/null || { echo "python3 is needed (Debian: apt-get install python3 python3-venv)"; exit 1; }
(cd "$root" && cargo build --quiet --bin lamplight)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || { echo "cannot make a venv (Debian: apt-get install python3-venv)"; exit 1; }
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
bash "$here/generate.sh" "$venv/bin/python"
cd "$here"
exec "$venv/bin/python" -m pytest -p no:cacheprovider -q test_example.py
