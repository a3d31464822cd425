#!/usr/bin/env bash
# One GPU suite (issue 18): everything this project measures on a lent H100/H200, in one call of at most 10 minutes.
#
#   bash benchmarks/gpu_suite.sh --dry-run     # on the CPU: every step's command parsed, the inputs prepared
#   bash benchmarks/gpu_suite.sh               # on the GPU (../shared/gpu/README.md: `. .device/env.sh` first)
#
# Steps (each writes its JSON to $OUT, or ./gpu-suite-out when OUT is unset; big files go to $WORK):
#   1. the CUDA tests (tests/test_semi_structured.py: 2:4 layers against dense on the GPU; tests/test_memory_plan.py:
#      an expansion on the GPU, statistics on the device or the host, against the CPU)
#   2. the Llama-7B-shaped build: SparseGPT against Sparse Expansion x16, 4 random blocks, 128 x 2048 random
#      calibration tokens, fp16, 70%, with its time ratio; the expanded model saved to $WORK
#   3. streamed evaluation of that expanded model (one block on the GPU at a time) with its peak GPU memory
#   4. the 2:4 switch benchmark (semi-structured sparse products against dense, 4096 x 4096, fp16)
#   5. one JSON, $OUT/gpu_suite.json, with every step's result and the GPU's name
# The tokenizer (the embedded model's, 2 MB) is read from $TOKENIZER (default .device/tokenizer); --dry-run writes
# it there from the embedded model so that it can be carried. The evaluation text is this repository's docs.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-gpu-suite-out}
WORK=${WORK:-/tmp/gpu-suite}
TOKENIZER=${TOKENIZER:-.device/tokenizer}
PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$WORK/text"

# The evaluation text: the docs, as one train and one test file (a speed and memory measurement, not a quality one).
cat docs/*.md README.md > "$WORK/text/test.txt"
cp "$WORK/text/test.txt" "$WORK/text/train.txt"

BUILD=(benchmarks/bench_expansion_build.py --shape llama-7b --blocks 4 --calib 128x2048 --data random
       --experts 16 --sparsity 0.7 --device cuda --dtype float16 --tokenizer "$TOKENIZER"
       --save "$WORK/se7b" --out "$OUT/build.json")
EVAL=(eval --model "$WORK/se7b" --streamed --device cuda --dtype float16 --data "$WORK/text" --seqlen 2048
      --eval-samples 4 --quiet --json "$OUT/eval_streamed.json")
SWITCH=(bench --kernel --device cuda --rows 4096 --cols 4096 --batch 128 --json "$OUT/switch.json")

if [ "$DRY" = 1 ]; then
  [ -d "$TOKENIZER" ] || $PY -c "import sys; from transformers import AutoTokenizer; \
from sparse_expansion.models.loading import default_model_dir; \
AutoTokenizer.from_pretrained(default_model_dir(quiet=True)).save_pretrained(sys.argv[1])" "$TOKENIZER"
  $PY -m pytest -q --collect-only tests/test_semi_structured.py tests/test_memory_plan.py > /dev/null
  # Every command line parsed by its own parser (the CLI's, the benchmark's) in one process; nothing runs.
  $PY - "${#BUILD[@]}" "${BUILD[@]}" "${EVAL[@]}" "${SWITCH[@]}" <<'EOF'
import contextlib, io, runpy, sys
count = int(sys.argv[1])
build, rest = sys.argv[2:2 + count], sys.argv[2 + count:]
split = rest.index("bench")
from sparse_expansion.cli.main import COMMANDS
from sparse_expansion.cli.parser import build_parser
parser, _ = build_parser(COMMANDS)
for argv in (rest[:split], rest[split:]):
    parser.parse_args(argv)
sys.path.insert(0, "benchmarks")
sys.argv = [build[0], *build[1:], "--help"]
try:
    with contextlib.redirect_stdout(io.StringIO()):
        runpy.run_path(build[0], run_name="__main__")
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("gpu_suite: dry run: every step parses")
EOF
  exit 0
fi

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: run with --dry-run on the CPU'"
start=$(date +%s)
$PY -m pytest -q tests/test_semi_structured.py tests/test_memory_plan.py 2>&1 | tail -3 | tee "$OUT/cuda_tests.txt"
$PY "${BUILD[@]}"
$PY -m sparse_expansion.cli "${EVAL[@]}"
$PY -m sparse_expansion.cli "${SWITCH[@]}"
$PY - "$OUT" "$start" <<'EOF'
import json, pathlib, sys, time
import torch
out = pathlib.Path(sys.argv[1])
result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "seconds": time.time() - float(sys.argv[2]),
          "cuda_tests": (out / "cuda_tests.txt").read_text().strip().splitlines()[-1]}
for name in ("build", "eval_streamed", "switch"):
    result[name] = json.loads((out / f"{name}.json").read_text())
(out / "gpu_suite.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k] for k in ("gpu", "seconds", "cuda_tests")}))
EOF
