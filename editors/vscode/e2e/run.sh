#!/usr/bin/env bash
# Runs the VS Code end-to-end test (code-server + Chromium + Playwright).
# Run setup.sh first. Options are environment variables; see e2e.test.mjs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
exec node --test --test-reporter=spec --test-timeout=1800000 e2e.test.mjs "$@"
