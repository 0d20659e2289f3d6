#!/usr/bin/env bash
# The prepared GPU check (issue 11), one command on a CUDA machine without network:
#
#   bash tools/gpu/gpu_check.sh [--steps N]     # needs .gpu_check/ (tools/gpu/gpu_check_pack.sh)
#   bash tools/gpu/gpu_check.sh --device cpu --tiny --steps 3   # the same path on a CPU (tests)
#
# Installs the packed wheels into /tmp/gpu-check-site, put first on PYTHONPATH (the machine's own
# CUDA torch stays; a venv would lose it where python3 is itself a venv), then runs
# tools/gpu/gpu_check.py on the GPU within 8 minutes: a random BERT-base BertForMaskedLM to 6L/384H
# at the recipe's micro-batch in bf16. Prints tokens/s, the projected hours of the full budget, peak
# memory, MFU, the step-0 identity and masked == slimmed (fp32 and bf16), the ONNX verification
# (CPU provider; CUDA provider if installed). The run directory goes to /tmp/gpu-check; the
# reports also to $OUT when it is set.
# Exit 0: every check passed; 3: a check failed; 124: out of time.
set -euo pipefail
cd "$(dirname "$0")/../.."
PACK=${GPU_CHECK_PACK:-.gpu_check}
RUNS=${GPU_CHECK_RUNS:-/tmp/gpu-check}
PY=${PY:-python3}
if [ -d "$PACK/wheels" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-check-site "$PACK"/wheels/*.whl
  export PYTHONPATH="/tmp/gpu-check-site:$PWD"
  data=(--tokenizer "$PACK/tokenizer" --texts "$PACK/texts.txt")
else
  echo "gpu_check: no $PACK/wheels (run tools/gpu/gpu_check_pack.sh); using this Python's packages" >&2
  export PYTHONPATH="$PWD"
  data=()
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" -c 'import sys, torch, transformers, datasets, pydantic; print("python", sys.version.split()[0],
"torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'
status=0
timeout 470 "$PY" tools/gpu/gpu_check.py --device cuda --out "$RUNS" "${data[@]}" "$@" || status=$?
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp "$RUNS/gpu_check.json" "$OUT/" 2>/dev/null || true
  for f in metrics.jsonl summary.json verify.json environment.json; do
    cp "$RUNS"/runs/gpu-check/*/"$f" "$OUT/" 2>/dev/null || true
  done
fi
exit "$status"
