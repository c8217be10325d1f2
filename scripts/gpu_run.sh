#!/usr/bin/env bash
# One lent multi-GPU machine, few calls (it is billed by the minute):
#   scripts/gpu_run.sh STEP OUT_DIR [TP ...]          (TPs default to 1 2)
# STEP is one of
#   mlp       the MLP benchmark (scripts/bench_mlp.py) at every TP: OUT_DIR/mlp.{json,md,log}
#   validate  `tpaware validate` with NCCL in fp16 (scripts/gpu_validate.sh) at every TP: OUT_DIR/validate.log and the
#             JSON reports in OUT_DIR/validate-reports.tar.gz
#   decode    the decode benchmark (scripts/bench_decode.py) at every TP: OUT_DIR/decode.{json,md,log}
#   allreduce the all-reduce benchmark (scripts/bench_allreduce.py) at every TP above 1: OUT_DIR/allreduce.{json,md,log}
# Where the image lacks typer/rich (the CLI's), wheels carried in .whl/ are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: $0 mlp|validate|decode|allreduce OUT_DIR [TP ...]}
out=${2:?usage: $0 mlp|validate|decode|allreduce OUT_DIR [TP ...]}
shift 2
tps=("$@")
[ $# -eq 0 ] && tps=(1 2)
csv=$(IFS=,; echo "${tps[*]}")
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ! python3 -c "import typer, rich" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpus.csv"
start=$SECONDS
case $step in
  mlp)
    timeout "${STEP_TIMEOUT:-560}" python3 scripts/bench_mlp.py --tp "$csv" --m 1,2,4,8,16 --reps 200 \
      --out "$out/mlp" > "$out/mlp.log" 2>&1
    echo "== mlp: exit $?, $((SECONDS - start)) s"; tail -80 "$out/mlp.log" ;;
  validate)
    work=$(mktemp -d)
    COLUMNS=160 timeout "${STEP_TIMEOUT:-560}" bash scripts/gpu_validate.sh "$work" "${tps[@]}" > "$out/validate.log" 2>&1
    echo "== validate: exit $?, $((SECONDS - start)) s"
    tar czf "$out/validate-reports.tar.gz" -C "$work" $(cd "$work" && ls validate-*.json 2>/dev/null)
    grep -E "^==|PASSED|FAILED|pass|FAIL|Error|error" "$out/validate.log" | tail -40 ;;
  decode)
    timeout "${STEP_TIMEOUT:-560}" python3 scripts/bench_decode.py --tp "$csv" --batch 1,2,4,8,16 --layers 2 \
      --reps 200 --out "$out/decode" > "$out/decode.log" 2>&1
    echo "== decode: exit $?, $((SECONDS - start)) s"; tail -40 "$out/decode.log" ;;
  allreduce)
    multi=$(IFS=,; tp=(); for t in "${tps[@]}"; do [ "$t" -gt 1 ] && tp+=("$t"); done; echo "${tp[*]}")
    [ -n "$multi" ] || { echo "== allreduce: needs a TP above 1"; exit 2; }
    timeout "${STEP_TIMEOUT:-560}" python3 scripts/bench_allreduce.py --tp "$multi" --out "$out/allreduce" \
      > "$out/allreduce.log" 2>&1
    echo "== allreduce: exit $?, $((SECONDS - start)) s"; tail -12 "$out/allreduce.log" ;;
  *) echo "unknown step '$step' (mlp, validate, decode or allreduce)"; exit 2 ;;
esac
