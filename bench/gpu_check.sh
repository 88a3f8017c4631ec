#!/usr/bin/env bash
# GPU check (a few minutes on one NVIDIA GPU with PyPI access; nothing here runs without a GPU).
#
#   1. venv ($VENV, default ~/.cache/granite-lsp/gpu-venv, reused when present) with a CUDA build
#      of torch and the project (editable)
#   2. tests on CUDA with our torch ops: tests/test_cuda.py + tests/test_runtime.py (+ the import
#      check), with mamba_ssm / causal_conv1d hidden from the process even if installed (transformers
#      would otherwise send its CPU reference forward into CUDA kernels)
#   3. tries to install causal-conv1d + mamba-ssm (time-limited: they build from source when no
#      prebuilt wheel matches this torch); when that works, tests/test_cuda.py again, now also
#      comparing the kernel path with the torch path
#   4. decode / prefill tokens/s on the real Granite-4.0-H-350M shape (random weights, bf16) with
#      the Mamba kernels when installed, and with GRANITE_LSP_CUDA_KERNELS=0
#
# Every step prints what it ran; the summary at the end lists each step's outcome and the script
# exits non-zero when a test step or a bench run failed, or no CUDA device was usable. Knobs (environment):
#   VENV=<dir>  TORCH_SPEC=torch==2.13.0  TORCH_INDEX_URL=<pip index for torch, e.g. a cu128 one>
#   SKIP_KERNELS=1 (no mamba/conv install)  KERNEL_INSTALL_TIMEOUT=150 (seconds)
#   PIP_FIND_LINKS=<dir of local wheels> (read by pip itself)  BENCH_ARGS="--prefill 512 --decode 32"
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
log() { printf '\n[gpu-check %4ds] %s\n' $((SECONDS - start)) "$*"; }
declare -a SUMMARY=()
note() { SUMMARY+=("$*"); }
failed=0

VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/granite-lsp/gpu-venv}
PY="$VENV/bin/python"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
KERNEL_INSTALL_TIMEOUT=${KERNEL_INSTALL_TIMEOUT:-150}
BENCH_ARGS=${BENCH_ARGS:-"--prefill 512 --decode 32 --repeat 3"}

finish() {
    log "summary"
    for line in "${SUMMARY[@]}"; do printf '  %s\n' "$line"; done
    exit "$failed"
}

# -- 1. environment ----------------------------------------------------------------------------
log "venv $VENV + $TORCH_SPEC (CUDA build) + project"
[ -x "$PY" ] || { mkdir -p "$(dirname "$VENV")" && python3 -m venv "$VENV"; } || { note "venv: could not create $VENV"; failed=1; finish; }
"$PY" -m pip install -q --upgrade pip setuptools wheel packaging ninja
torch_index=()
[ -n "${TORCH_INDEX_URL:-}" ] && torch_index=(--index-url "$TORCH_INDEX_URL")
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    "$PY" -m pip install -q ${torch_index[@]+"${torch_index[@]}"} "$TORCH_SPEC" || { note "torch: install failed"; failed=1; finish; }
fi
"$PY" -m pip install -q -e . pytest pytest-asyncio || { note "project: install failed"; failed=1; finish; }
if ! "$PY" - <<'EOF'; then
import sys, torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, device available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit(1)
print(f"device: {torch.cuda.get_device_name(0)}")
EOF
    note "no usable CUDA device / CUDA build of torch: nothing was tested (set TORCH_SPEC / TORCH_INDEX_URL?)"
    failed=1
    finish
fi
note "torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))')"

# pytest in a process where mamba_ssm / causal_conv1d cannot be imported (installed or not)
pytest_without_kernel_packages() {
    "$PY" - "$@" <<'EOF'
import sys
for name in ("mamba_ssm", "causal_conv1d"):
    sys.modules[name] = None  # any import of them raises ImportError: everyone takes the torch path
import pytest
sys.exit(pytest.main(sys.argv[1:]))
EOF
}

# -- 2. torch ops on CUDA ----------------------------------------------------------------------
log "tests, torch ops on CUDA: tests/test_cuda.py tests/test_runtime.py tests/test_cuda_import.py (not slow)"
pytest_without_kernel_packages -x -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_runtime.py tests/test_cuda_import.py
rc=$?
if [ "$rc" -eq 0 ]; then note "tests, torch ops on CUDA (+ CPU test_runtime): passed"; else note "tests, torch ops on CUDA (+ CPU test_runtime): FAILED (pytest exit $rc)"; failed=1; fi

# -- 3. mamba_ssm / causal_conv1d --------------------------------------------------------------
kernels_state() {
    "$PY" -c "from granite_lsp.runtime import cuda_kernels; print(cuda_kernels.describe('cuda'))" 2>&1 | tail -1
}
state="conv: torch, scan: torch"
if [ "${SKIP_KERNELS:-0}" = 1 ]; then
    note "kernels: not installed (SKIP_KERNELS=1); kernel-path tests not run"
else
    log "install causal-conv1d + mamba-ssm (at most ${KERNEL_INSTALL_TIMEOUT}s; log: $VENV/kernel-install.log)"
    if ! "$PY" -c "import causal_conv1d, mamba_ssm" 2>/dev/null; then
        MAX_JOBS=${MAX_JOBS:-16} timeout "$KERNEL_INSTALL_TIMEOUT" \
            "$PY" -m pip install --no-build-isolation causal-conv1d mamba-ssm >"$VENV/kernel-install.log" 2>&1
        echo "pip exit $? (124: timed out); last lines:"
        tail -5 "$VENV/kernel-install.log"
    fi
    state=$(kernels_state)
    echo "Mamba layers on CUDA: $state"
    installed=$("$PY" -m pip list 2>/dev/null | grep -iE '^(mamba[-_]ssm|causal[-_]conv1d|triton) ' | tr -s ' ' | paste -sd, -)
    note "kernels: installed ${installed:-none of mamba-ssm / causal-conv1d / triton} -> $state"
    if [[ "$state" == *"conv: causal_conv1d"* || "$state" == *"scan: mamba_ssm"* ]]; then
        log "tests, CUDA kernels vs torch ops: tests/test_cuda.py"
        "$PY" -m pytest -x -q -rs -p no:cacheprovider tests/test_cuda.py
        rc=$?
        if [ "$rc" -eq 0 ]; then note "tests, CUDA kernels vs torch ops: passed"; else note "tests, CUDA kernels vs torch ops: FAILED (pytest exit $rc)"; failed=1; fi
    else
        note "tests, CUDA kernels vs torch ops: not run (no kernel importable)"
    fi
fi

# -- 4. speed on the real shape ----------------------------------------------------------------
bench() {  # $1: label; the rest: environment assignments for the run
    local label=$1
    shift
    log "speed, real shape, bf16, $label: granite-lsp bench --kernels --device cuda --precisions bfloat16 $BENCH_ARGS"
    # shellcheck disable=SC2086
    if env "$@" "$VENV/bin/granite-lsp" bench --kernels --device cuda --precisions bfloat16 $BENCH_ARGS; then
        note "speed, $label: printed above (decode / prefill tok/s)"
    else
        note "speed, $label: bench FAILED"
        failed=1
    fi
}
if [[ "$state" == *"conv: causal_conv1d"* || "$state" == *"scan: mamba_ssm"* ]]; then
    bench "Mamba layers on $state" GRANITE_LSP_CUDA_KERNELS=1
    bench "Mamba layers on torch ops (GRANITE_LSP_CUDA_KERNELS=0)" GRANITE_LSP_CUDA_KERNELS=0
else
    bench "Mamba layers on torch ops (no kernel installed)" GRANITE_LSP_CUDA_KERNELS=0
fi
finish
