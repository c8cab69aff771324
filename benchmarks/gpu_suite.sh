#!/usr/bin/env bash
# The GPU suite in one command (benchmarks/gpu_suite.py says what it measures):
#   bash benchmarks/gpu_suite.sh            # on one H100/H200, under 9 minutes
#   bash benchmarks/gpu_suite.sh --tiny     # the same code at tiny sizes on the CPU (tests/test_gpu_suite.py)
# A lent GPU machine has JAX, flax, optax, orbax, torch and transformers but no network and no
# ml_collections: wheels carried in .whl/ (see the README's "GPU suite") are installed from there.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/blip2_site .whl/*.whl
  export PYTHONPATH="/tmp/blip2_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ " $* " == *" --tiny "* ]]; then
  export JAX_PLATFORMS=cpu
fi
python3 benchmarks/gpu_suite.py "$@"
