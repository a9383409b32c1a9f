#!/usr/bin/env bash
# Create .venv and install lmscli into it (llama-cpp-python builds from source the first
# time, about 9 minutes on 2 cores; pip caches the wheel, so later installs take seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# setuptools warns on every editable install that a folder named like the package may shadow
# it: that folder is the package itself, here
PYTHONWARNINGS="ignore:Editable installation" \
    .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
