#!/usr/bin/env bash
# One prepared GPU check for one H100/H200, under 8 minutes (GPU_CHECK_BUDGET_S, default 450 s in all):
#   the GPU test subset (tests/test_gpu_cuda.py), the bf16 matmul ceiling, stage-1 throughput and MFU of
#   ViT-B/16, L/16, H/14 eager and with inductor, the share of the step in the loss, the loader at 224 px
#   against what the GPU consumes, the largest ViT-H/14 micro-batch with ZeRO-2 + activation checkpointing.
# Writes REPORT_DIR/gpu_check.{md,json} plus gpu_check.log and gpu_tests.log (4 files: the device tool
# returns at most 8, two folders deep).
#
#   tools/gpu_check.sh [--dry-run] [REPORT_DIR]      # default REPORT_DIR: $OUT/gpu_check, else runs/gpu_check
#
# On the device (prepare .whl/ here first: .venv/bin/python tools/prepare_device_wheels.py), run with
# carry=[".whl"]:  tools/gpu_check.sh
# The wheels are installed to GPU_CHECK_SITE (default /tmp/site) when deepspeed is missing. --dry-run runs
# every part on the CPU with tiny models (tests/test_gpu_check.py does), so a typo cannot waste device time.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
REPORT_DIR="${1:-${OUT:+$OUT/gpu_check}}"
REPORT_DIR="${REPORT_DIR:-runs/gpu_check}"
mkdir -p "$REPORT_DIR"
PY="${GPU_CHECK_PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-450}))
PARTS_DIR=$(mktemp -d /tmp/gpu_check_parts.XXXXXX)
LOG="$REPORT_DIR/gpu_check.log"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
: >"$LOG"

if ! "$PY" -c "import deepspeed, webdataset, submitit, fairscale" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || { echo "gpu_check: installing .whl/*.whl failed" | tee -a "$LOG"; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: deepspeed/webdataset/submitit/fairscale missing and no .whl/ carried" \
         "(run tools/prepare_device_wheels.py here and carry .whl)" | tee -a "$LOG"
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
ARGS=(--parts-dir "$PARTS_DIR" --deadline "$DEADLINE")
[[ $DRY == 1 ]] && ARGS+=(--dry-run)
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
          "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())' 2>&1 | tee -a "$LOG"

left() { echo $((DEADLINE - $(date +%s))); }

# 1. The GPU test subset (bounded: a hung collective must not eat the lease). GPU_CHECK_TESTS=0 skips it
# (tests/test_gpu_check.py: the CPU suite runs tests/test_gpu_cuda.py itself).
if [[ "${GPU_CHECK_TESTS:-1}" == 1 ]]; then
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_cuda.py 2>&1 | tee "$REPORT_DIR/gpu_tests.log"
  rc=${PIPESTATUS[0]}
else
  echo "skipped (GPU_CHECK_TESTS=0)" >"$REPORT_DIR/gpu_tests.log"
  rc=0
fi
"$PY" - "$rc" "$REPORT_DIR/gpu_tests.log" "$PARTS_DIR/tests.json" <<'EOF'
import json, sys
rc, log, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
lines = [l for l in open(log).read().splitlines() if l.strip()]
json.dump({"rc": rc, "summary": lines[-1] if lines else "no output"}, open(out, "w"))
EOF

# 2. The measurements, in four processes (a CUDA error, leak or OOM in one cannot spoil the next); in the
# dry run all parts share one process (the same code, a quarter of the start-up time). The largest-batch
# search runs before the inductor compiles, which are the slowest and the first to be cut by the budget.
# GPU_CHECK_GROUPS="compile" (say) reruns some parts only; the others are then "not run" in the report.
if [[ $DRY == 1 ]]; then
  GROUPS_=(matmul,throughput,loss_share,loader,max_batch,compile)
else
  read -r -a GROUPS_ <<<"${GPU_CHECK_GROUPS:-matmul,throughput,loss_share loader max_batch compile}"
fi
for group in "${GROUPS_[@]}"; do
  if (( $(left) < 20 )); then echo "gpu_check: $group skipped (time budget)" | tee -a "$LOG"; continue; fi
  timeout "$(left)" "$PY" tools/gpu_check.py "${ARGS[@]}" --part "$group" 2>&1 | tee -a "$LOG"
done

"$PY" tools/gpu_check.py --parts-dir "$PARTS_DIR" --report "$REPORT_DIR" | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "gpu_check: $(( $(date +%s) - START )) s in all; report in $REPORT_DIR" | tee -a "$LOG"
rm -rf "$PARTS_DIR"
exit "$rc"
