#!/usr/bin/env bash
# Kill the default run with SIGKILL mid-training (once step 120 is logged), resume it, and compare
# the result with an uninterrupted run of the same recipe (pass its run dir as $1).
#   tools/kill_resume_demo.sh runs/minilm-to-4L256/<uninterrupted-run>
set -u
OUT=${OUT:-/tmp/kill-resume}
HF_HUB_OFFLINE=1 .venv/bin/compress run recipes/minilm-to-4L256.yaml --output "$OUT" >"$OUT.log" 2>&1 &
PID=$!
until M=$(ls "$OUT"/minilm-to-4L256/*/metrics.jsonl 2>/dev/null | head -1) && [ -n "$M" ] \
      && grep -q '"step": 120,' "$M"; do sleep 2; done
kill -9 "$PID"; wait "$PID"; echo "killed at step 120, exit status $?"
RUN=$(dirname "$M")
HF_HUB_OFFLINE=1 .venv/bin/compress run --resume "$RUN" >"$OUT-resume.log" 2>&1 || exit 1
.venv/bin/python - "$1" "$RUN" <<'PY'
import sys
from safetensors.torch import load_file
a, b = (load_file(f"{d}/model/model.safetensors") for d in sys.argv[1:3])
print("max abs weight difference:", max((a[k] - b[k]).abs().max().item() for k in a))
PY
