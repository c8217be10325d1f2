#!/usr/bin/env bash
# Validate the TP runtime on a multi-GPU machine with NCCL in fp16, against transformers' own model class:
#   scripts/gpu_validate.sh [WORKDIR [TP ...]]          (TPs default to 1 2)
# It installs nothing: the Python it runs (PYTHON, default python3) must already import torch with CUDA,
# transformers, typer, rich and safetensors, as the lent GPU image does. It writes a synthetic act-order Llama,
# converts it at every TP, and runs `tpaware validate --device cuda --dtype float16`: at tp 1 in tpaware mode, at
# larger TPs in all three modes, and once more at the largest TP without the W4A16 kernel (dequantize + matmul) so
# that a kernel fault and a runtime fault tell themselves apart. Tables go to stdout, JSON reports to WORKDIR; the exit status is non-zero
# when any validation fails.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-140}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Correctness, not speed: the kernel takes its heuristic launch config instead of timing every candidate per shape in
# every rank process (set TPAWARE_AUTOTUNE=1 to validate the tuned choices instead).
export TPAWARE_AUTOTUNE=${TPAWARE_AUTOTUNE:-0}
py=${PYTHON:-python3}
work=${1:-$(mktemp -d -t tpaware-gpu-XXXXXX)}
shift $(( $# > 0 ? 1 : 0 ))
tps=("$@")
[ $# -eq 0 ] && tps=(1 2)
need=$(printf '%s\n' "${tps[@]}" | sort -n | tail -1)
tpaware() { "$py" -m pipeline.cli "$@"; }

"$py" - "$need" <<'PY' || exit 2
import sys, torch, transformers
n, need = torch.cuda.device_count(), int(sys.argv[1])
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"{n} x {torch.cuda.get_device_name(0) if n else 'no GPU'}")
assert n >= need, f"needs {need} GPUs, found {n}"
PY

set -e
tpaware synth "$work/src" --arch llama --hidden 1024 --intermediate 4096 --layers 4 --heads 16 --kv-heads 8 \
  --vocab 4096 --group-size 128
for tp in "${tps[@]}"; do tpaware convert "$work/src" --tp "$tp" --out "$work/tp$tp"; done
set +e

status=0
check() {  # tp mode [extra validate options]
  local tp=$1 mode=$2; shift 2
  local name="tp$tp-$mode${1:+-nokernel}"
  local start=$SECONDS
  tpaware validate "$work/tp$tp" --device cuda --dtype float16 --mode "$mode" --max-tokens 16 \
    --json "$work/validate-$name.json" "$@" || status=1
  echo "== $name: $((SECONDS - start)) s"
}
for tp in "${tps[@]}"; do
  if [ "$tp" = 1 ]; then check 1 tpaware; else for mode in tpaware naive local-sort; do check "$tp" "$mode"; done; fi
done
check "$need" tpaware --no-kernel
echo "reports in $work; overall: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
