#!/usr/bin/env bash
# Install lmscli, fetch the default model, start the server, load the model and get a real
# answer from it through the OpenAI Python SDK.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh examples
lms=.venv/bin/lms
$lms get smollm2-135m-instruct
$lms server start
$lms load smollm2-135m-instruct -y
.venv/bin/python examples/openai_quickstart.py
