#!/usr/bin/env bash
# CI, after `make test`: the chat and export tests once more against the newest
# transformers 5.x that pyproject.toml's range (>=5.0,<6) allows and the package
# index can install, so that a deprecation turning into a removal inside our
# range fails here first.
# A release whose own dependencies the index lacks (5.25.0 asked for a
# `kernels` release the index did not have yet) cannot be installed by any user
# of that index either: it is named in one line and the next older one is tried.
# The newer release goes into a separate folder in front of the venv
# (PYTHONPATH, inherited by the CLI subprocesses the tests start); the venv
# itself is left as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
installed=$($PY -c 'import transformers; print(transformers.__version__)')
versions=$($PY -m pip index versions transformers 2>/dev/null | sed -n 's/^Available versions: //p' | tr ',' '\n' \
           | tr -d ' ' | grep -E '^5\.[0-9]+(\.[0-9]+)?$' || true)
if [ -z "$versions" ]; then
    echo "newest-transformers: the package index did not answer; nothing more to run" >&2
    exit 1
fi
# Newer than the suite's own, newest first (the index lists them newest first).
newer=$(printf '%s\n' "$versions" | while read -r v; do
    [ "$v" = "$installed" ] && break
    echo "$v"
done | head -n 3)
tests="tests/test_export_chat.py tests/test_chat_models.py tests/test_remote_code.py"
overlay=$(mktemp -d)
trap 'rm -rf "$overlay"' EXIT
for candidate in $newer; do
    if $PY -m pip install -q --target "$overlay" -c ci/constraints.txt "transformers==$candidate" \
            >"$overlay.log" 2>&1; then
        rm -f "$overlay.log"
        echo "newest-transformers: $tests on transformers $candidate (the suite ran on $installed)"
        PYTHONPATH="$overlay" $PY -c "import transformers; assert transformers.__version__ == '$candidate'"
        PYTHONPATH="$overlay" $PY -m pytest -q $tests
        exit 0
    fi
    echo "newest-transformers: transformers $candidate cannot be installed from this index:" \
         "$(grep -m1 -E '^ERROR: (No matching|Could not find|Cannot install|ResolutionImpossible)' "$overlay.log" || tail -n 1 "$overlay.log")"
    rm -rf "$overlay.log" "$overlay" && mkdir -p "$overlay"
done
echo "newest-transformers: the suite already ran on transformers $installed, the newest 5.x this index can install"
