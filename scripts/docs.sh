#!/usr/bin/env bash
# Build the API reference (docs/api/, Sphinx autodoc) with warnings as errors.
# Output: docs/api/_build/html. Extra arguments go to sphinx-build.
source "$(dirname "$0")/_env.sh"
ensure_venv "docs,redis,locust"
cd "$ROOT"
echo ">> sphinx (API reference)"
"$VENV/bin/sphinx-build" -q -W --keep-going -b html "$@" docs/api docs/api/_build/html
