#!/usr/bin/env bash
# TIAToolbox 2.x in its own venv (.venv-tiatoolbox/), for tests/test_interop_tiatoolbox.py: it declares
# torch<2.13 and needs torchvision, which the core venv must not get.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash benchmarks/setup_tiatoolbox_env.sh
