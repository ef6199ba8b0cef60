#!/usr/bin/env bash
# nanodb launcher: makes its own environment on first use, then runs nanodb.
#   ./run.sh --scan ~/Pictures --path ~/.nanodb     run nanodb (python -m nanodb ARGS)
#   ./run.sh test [PYTEST ARGS]                     run the default test suite
#   ./run.sh test --slow                            also run the slow tests
#   ./run.sh lint                                   check the code with ruff (configured in pyproject.toml)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${NANODB_VENV:-$here/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.nanodb-installed"
# reinstalled when the requirements or the C search kernel change (pip install -e rebuilds _scan)
want="$(cat "$here/pyproject.toml" "$here/constraints.txt" "$here/nanodb/storage/_scan.c" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "nanodb: setting up the environment in $venv (first run only: about 6 minutes, 6.9 GB)..." >&2
    log="$(mktemp)"
    if ! { "$python" -m venv "$venv" &&
           "$venv/bin/python" -m pip install -c "$here/constraints.txt" -e "$here[test]"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "nanodb: setting up the environment failed (full log: $log)" >&2
        exit 1
    fi
    rm -f "$log"
    echo "$want" > "$stamp"
fi

if [ "${1:-}" = "lint" ]; then
    cd "$here"
    exec "$venv/bin/ruff" check .
fi
if [ "${1:-}" = "test" ]; then
    shift
    cd "$here"
    if [ "${1:-}" = "--slow" ]; then
        shift
        set -- -m "slow or not slow" "$@"
    fi
    exec "$venv/bin/python" -m pytest "$@"
fi
exec "$venv/bin/python" -m nanodb "$@"
