#!/usr/bin/env bash
# Builds a virtual environment with this project installed editable (`pip install -e
# .[dev,demo]`: the console scripts, and `stem_megatron` importable from anywhere) for one of
# three dependency sets, all read from pyproject.toml:
#   locked   the exact versions in constraints.txt (what CI tests; `make install`)
#   latest   the newest releases of the day (`make test-latest`, shows drift before users do)
#   lowest   every `>=` lower bound in pyproject.toml exactly (`make test-lowest`, keeps them true)
# torch: `locked` keeps a torch the base python already imports (a cluster's own build) and
# otherwise installs $TORCH_INSTALL; `latest` installs $TORCH_INSTALL; `lowest` installs the
# lower bound of pyproject.toml. An unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
usage() { echo "usage: $0 VENV_DIR locked|latest|lowest" >&2; exit 2; }
[ $# -eq 2 ] || usage
venv=$1 set=$2
python=${BASE_PYTHON:-python3}
torch_install=${TORCH_INSTALL:-torch==2.13.0}
cd "$(dirname "$0")/../.."
project=(-e ".[dev,demo]")

case $set in
  locked)
    site=""
    if "$python" -c "import torch" 2>/dev/null; then site=--system-site-packages; fi
    test -x "$venv/bin/python" || "$python" -m venv $site "$venv"
    "$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/pip" install -q "$torch_install"
    "$venv/bin/pip" install -q -c constraints.txt "${project[@]}"
    ;;
  latest)
    rm -rf "$venv" && "$python" -m venv "$venv"
    "$venv/bin/pip" install -q "$torch_install"
    "$venv/bin/pip" install -q "${project[@]}"  # a fresh venv: the newest of each
    ;;
  lowest)
    rm -rf "$venv" && "$python" -m venv "$venv"
    pins=$(mktemp) && trap 'rm -f "$pins"' EXIT
    # `    "name>=X",  # why` (one requirement a line in pyproject.toml) -> `name==X`.
    sed -nE 's/^ *"([A-Za-z0-9_.-]+)>=([^";]+)".*/\1==\2/p' pyproject.toml > "$pins"
    "$venv/bin/pip" install -q -c "$pins" "${project[@]}"
    ;;
  *) usage ;;
esac
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
print("environment:", ", ".join(f"{n} {md.version(n)}" for n in
      ("stem-megatron", "torch", "megatron-core", "transformers", "tokenizers", "numpy")))
PY
