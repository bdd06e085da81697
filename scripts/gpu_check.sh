#!/usr/bin/env bash
# What CI cannot check, because it has no GPU. Run from the repository root on a CUDA machine:
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # PYTHON=/path/to/python to pick the interpreter
#
# 1. The tests marked `gpu`: CUDA mesh queries, bf16 autocast training, the shipped model on
#    CUDA against the CPU.
# 2. inference_lora.py on CUDA: the shipped model's mesh for examples/sphere.png.
# 3. benchmarks/bench_train.py on CUDA: one LoRA training step, ours (bf16 autocast, 1024 rays
#    per object) beside the course's (fp16 model, whole views), and the full-size model's step.
# 4. benchmarks/bench_mesh.py on CUDA with the full-size model: forward, a 128² render, and
#    mesh extraction ours beside TripoSR's way, with time and peak memory.
# 5. The model, LoRA, training, mesh and CLI tests with CUDA visible: the CLIs default to
#    --device cuda there, so their CUDA paths run.
# Every step runs even if one before it failed; the exit status says whether all passed.
set -uo pipefail
OUT=${1:-outputs/gpu_check}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
failed=()

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember a failure
    local name=$1
    shift
    echo "=== $name: $*"
    local started=$SECONDS
    if "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "=== $name: ok ($((SECONDS - started)) s)"
    else
        echo "=== $name: FAILED ($((SECONDS - started)) s)"
        failed+=("$name")
    fi
}

step environment "$PYTHON" -c "from utils.notebook.env import environment_report, format_report_text
print(format_report_text(environment_report()))"
step tests_gpu "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_mesh.py tests/test_train.py tests/test_classroom.py
step inference "$PYTHON" inference_lora.py --image_path examples/sphere.png --device cuda \
    --no-remove-bg --output "$OUT/sphere.glb"
step bench_train "$PYTHON" benchmarks/bench_train.py --device cuda --models tiny \
    --memory-budget-gb 60 --json "$OUT/bench_train.json"
step bench_mesh "$PYTHON" benchmarks/bench_mesh.py --full --device cuda --resolutions 256 512 \
    --skip-official-above 512 --json "$OUT/bench_mesh.json"
step tests_cuda_visible "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow and not browser" \
    tests/test_model.py tests/test_lora.py tests/test_train.py tests/test_mesh.py \
    tests/test_cli_infer_eval.py tests/test_fine_tuning_cli.py tests/test_tsr_cli.py

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed"
