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

# PostgreSQL for the storage tests (tests/integration/test_postgresql.py, FEDSERVER_TEST_POSTGRESQL):
# the machine's own server on 127.0.0.1:5432, started when it is down.  Without one those tests fail
# and say why; they are never skipped.
if [ -z "${FEDSERVER_TEST_POSTGRESQL:-}" ] && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        for version in $(ls /etc/postgresql); do
            pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        done
        for _ in $(seq 1 30); do
            pg_isready -q -h 127.0.0.1 -p 5432 && break
            sleep 1
        done
    fi
    if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
        echo "tests/run.sh: no PostgreSQL answers on 127.0.0.1:5432 and it could not be started" \
             "(pg_ctlcluster VERSION main start, as root); the PostgreSQL tests will fail" >&2
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
