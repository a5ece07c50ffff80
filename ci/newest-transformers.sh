#!/usr/bin/env bash
# CI, after `make test`: the chat and export tests once more against the newest
# transformers 5.x that pyproject.toml's range (>=5.0,<6) allows, so that a
# deprecation turning into a removal inside our range fails here first.
# The newer release goes into a separate folder in front of the venv
# (PYTHONPATH, inherited by the CLI subprocesses the tests start); the venv
# itself is left as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
installed=$($PY -c 'import transformers; print(transformers.__version__)')
newest=$($PY -m pip index versions transformers 2>/dev/null | sed -n 's/^Available versions: //p' | tr ',' '\n' \
         | tr -d ' ' | grep -E '^5\.[0-9]+(\.[0-9]+)?$' | head -n 1)
if [ -z "$newest" ]; then
    echo "newest-transformers: the package index did not answer; nothing more to run" >&2
    exit 1
fi
tests="tests/test_export_chat.py tests/test_chat_models.py tests/test_remote_code.py"
if [ "$newest" = "$installed" ]; then
    echo "newest-transformers: the suite already ran on transformers $installed, the newest 5.x"
    exit 0
fi
overlay=$(mktemp -d)
trap 'rm -rf "$overlay"' EXIT
echo "newest-transformers: $tests on transformers $newest (the suite ran on $installed)"
$PY -m pip install -q --target "$overlay" -c ci/constraints.txt "transformers==$newest"
PYTHONPATH="$overlay" $PY -c "import transformers; assert transformers.__version__ == '$newest'"
PYTHONPATH="$overlay" $PY -m pytest -q $tests
