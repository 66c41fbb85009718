#!/usr/bin/env bash
# Makes the Python virtual environment that the server tests drive real clients from: the
# official `openai` and `huggingface_hub` packages, in .venv-clients/ at the repository root
# (the tests look there, or at $FALCON_TEST_PYTHON). Needs the network once; the tests do not.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv-clients/bin/python -c 'import openai, huggingface_hub' >/dev/null 2>&1; then
    python3 -m venv .venv-clients
    .venv-clients/bin/pip install --quiet --disable-pip-version-check openai huggingface_hub
fi
.venv-clients/bin/python -c 'import openai, huggingface_hub; print("openai", openai.__version__, "huggingface_hub", huggingface_hub.__version__)'
