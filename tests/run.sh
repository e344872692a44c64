#!/usr/bin/env bash
# Install fedserver with its test dependencies into .venv and run every test:
# lint, unit tests (in memory) and integration tests (real processes on
# 127.0.0.1).  Usage: bash tests/run.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# system tools the tests run: openssl (the MIMI identity tests make chains with it)
if ! command -v openssl >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q && apt-get install -y -q openssl
    else
        echo "tests/run.sh: the openssl command is missing; install it (apt-get install openssl)" >&2
        exit 1
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,dev]' --config-settings editable_mode=strict

echo "== ruff"
.venv/bin/ruff check fedserver plugins twisted tests etc bench docs/examples
echo "== mypy"
.venv/bin/mypy fedserver plugins/*/
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
