#!/usr/bin/env bash
# Issue 16's GPU checks, prepared so that a session lent a GPU runs them in ONE device
# call (device time is 15 minutes for a whole session, starts included).
#
#   Here (any machine with this repo's .venv):
#     bash benchmarks/gpu_checks.sh --prepare
#         downloads into .whl/ (git-ignored) the wheels the device image lacks or has in
#         another version, pinned to this .venv's versions, for its Python 3.12
#   On the device (the `run` tool; carry [".whl"], timeout_s ~560):
#     bash benchmarks/gpu_checks.sh
#         1. the @pytest.mark.gpu tests: fused cross-entropy (Liger) against the chunked
#            path, flash-attention varlen packed attention, bf16 LoRA (QLoRA skips
#            without bitsandbytes)
#         2. benchmarks/fsdp_sft.py --size 2b: tokens/s, MFU against the H200's dense
#            bf16 peak, peak memory against the planner's estimate
#         3. benchmarks/packed_vs_unpacked.py --device cuda at 4,096 and 16,384 tokens
#     Every log also lands in $OUT (the tool brings it back). Each step has its own
#     timeout, so one hang costs its step, not the call.
#
# Knobs (for a CPU smoke test of this script: ALLOW_CPU=1 SIZE=tiny SEQS=1024):
#   SIZE (2b), SEQS ("4096 16384"), STEPS (8), PY (python3), ALLOW_CPU (0)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

# The device image's Python lacks these (pydantic and its parts), or has an older
# transformers than the one vlmtune is tested with; liger-kernel is the fused CE kernel.
PINNED="pydantic pydantic-core annotated-types typing-inspection transformers"
EXTRA="liger-kernel==0.8.5"

if [ "${1:-}" = "--prepare" ]; then
    pins=$(.venv/bin/python -m pip freeze | tr 'A-Z_' 'a-z-' | grep -E "^($(echo $PINNED | tr ' ' '|'))==")
    rm -rf .whl && mkdir .whl
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $pins $EXTRA || exit 1
    ls .whl && du -sh .whl
    exit 0
fi

OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export VLMTUNE_CACHE=${VLMTUNE_CACHE:-/tmp/vlmtune-cache}  # the random-weight models

$PY - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import os, sys, torch, transformers
cuda = torch.cuda.is_available()
print("python", sys.version.split()[0], "torch", torch.__version__,
      "transformers", transformers.__version__,
      "device", torch.cuda.get_device_name() if cuda else "cpu")
if not cuda and os.environ.get("ALLOW_CPU") != "1":
    sys.exit("no CUDA device: these are the GPU checks (ALLOW_CPU=1 for a smoke test)")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

step() {  # name, timeout (s), command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) ==="
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} in $((SECONDS - t0))s ==="
}

step gpu_tests 150 $PY -m pytest -q -m gpu -p no:cacheprovider \
    tests/engine/test_fused_ce.py tests/engine/test_packed_attention.py \
    tests/models/test_loading.py
step fsdp_sft 200 $PY benchmarks/fsdp_sft.py --size "${SIZE:-2b}" --fsdp --steps "${STEPS:-8}"
for seq in ${SEQS:-4096 16384}; do
    step "packed_vs_unpacked_$seq" 100 $PY benchmarks/packed_vs_unpacked.py --device auto \
        --seq-len "$seq" --repeat 1 --profile
done
