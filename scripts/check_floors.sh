#!/usr/bin/env bash
# Run the test suite on the oldest versions pyproject.toml allows: every `>=` floor of the
# dependencies and the test extra pinned with `==` (what they pull in resolves as usual),
# on the oldest Python it allows. The floors are promises to users who already have a
# torch or transformers installed; this keeps them true. Not in CI: torch's older
# releases on PyPI are CUDA builds (~3 GB).
#   PYTHON=python3.10 bash scripts/check_floors.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.10}
VENV=${VENV:-/tmp/loraplex-floors}

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q tomli  # tomllib is Python 3.11+
"$VENV/bin/python" - >"$VENV/floors.txt" <<'EOF'
import re

import tomli

project = tomli.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    name, rest = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(.*)", req).groups()
    if name != "ruff":  # a linter: its floor does not change what runs
        print(name + rest.replace(">=", "==", 1))
EOF
"$VENV/bin/pip" install -q -r "$VENV/floors.txt"
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" list 2>/dev/null | grep -iE '^(torch|triton|transformers|peft|fastapi|pydantic) '
"$VENV/bin/python" -m pytest -q "$@"
