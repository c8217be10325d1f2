#!/usr/bin/env bash
# The whole 2-GPU session in one command (the lent machines are billed by the minute):
#   scripts/gpu_x2.sh OUT_DIR
# 1. the MLP benchmark at tp 1 and 2 (scripts/bench_mlp.py): OUT_DIR/mlp.{json,md,log};
# 2. `tpaware validate` with NCCL in fp16 at tp 1 and 2 (scripts/gpu_validate.sh): OUT_DIR/validate.log and the JSON
#    reports in OUT_DIR/validate-reports.tar.gz.
# Where the image lacks typer/rich (the CLI's), wheels carried in .whl/ are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ! python3 -c "import typer, rich" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpus.csv"
start=$SECONDS
timeout "${BENCH_TIMEOUT:-300}" python3 scripts/bench_mlp.py --tp 1,2 --m 1,2,4,8,16 --reps 200 --out "$out/mlp" \
  > "$out/mlp.log" 2>&1
echo "== bench: exit $?, $((SECONDS - start)) s"
tail -60 "$out/mlp.log"
start=$SECONDS
work=$(mktemp -d)
COLUMNS=160 timeout "${VALIDATE_TIMEOUT:-240}" bash scripts/gpu_validate.sh "$work" > "$out/validate.log" 2>&1
echo "== validate: exit $?, $((SECONDS - start)) s"
tar czf "$out/validate-reports.tar.gz" -C "$work" $(cd "$work" && ls validate-*.json 2>/dev/null)
grep -E "^==|PASSED|FAILED|pass|FAIL|Error|error" "$out/validate.log" | tail -40
