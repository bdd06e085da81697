#!/usr/bin/env bash
# What CI cannot check, because it has no GPU. Run from the repository root on a CUDA machine:
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # PYTHON=/path/to/python to pick the interpreter
#
# Sized for about 10 minutes on one GPU (estimated, not yet timed on one), most wanted first:
# 1. full_size_model: a full-size random-init checkpoint in the official format (~30 s).
# 2. profile_steps: notebook 03's training at the official profile's CUDA settings (128²
#    patches, bf16 autocast, backbone checkpointing) on objects rendered at 512²: seconds per
#    step, CUDA peak memory, and the largest batch that fits (doubling until out of memory).
# 3. bench_train: one LoRA step, ours beside the course's (fp16 model, whole views), at view
#    sizes climbing 32 .. 512 px, and the full-size model's step.
# 4. bench_mesh: the full-size model's mesh at 256³ on CUDA, ours beside TripoSR's way.
# 5. tests_gpu: the tests marked `gpu` (CUDA mesh queries, bf16 training, classroom CUDA = CPU).
# 6. rehearsal: the six notebooks (SMOKE sizes) and the CLIs against the full-size checkpoint,
#    on CUDA.
# GPU_CHECK_ALL=1 adds inference_lora.py on CUDA and the model/LoRA/training/mesh/CLI tests
# with CUDA visible (several more minutes).
# Every step runs even if one before it failed; the exit status says whether all passed.
set -uo pipefail
OUT=${1:-outputs/gpu_check}
PYTHON=${PYTHON:-python}
MODEL=outputs/rehearsal/model
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
step full_size_model "$PYTHON" -c "from pathlib import Path
from tsr.model import TSR
if not Path('$MODEL/model.ckpt').is_file():
    TSR.from_config('official').save_pretrained('$MODEL', safe_serialization=False)"
step profile_steps "$PYTHON" benchmarks/bench_profile.py --model "$MODEL" --device cuda \
    --steps 4 --find-batch --max-batch 32 --json "$OUT/bench_profile.json"
step bench_train "$PYTHON" benchmarks/bench_train.py --device cuda --models tiny \
    --memory-budget-gb 60 --json "$OUT/bench_train.json"
step bench_mesh "$PYTHON" benchmarks/bench_mesh.py --full --device cuda --resolutions 256 \
    --json "$OUT/bench_mesh.json"
step tests_gpu "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_mesh.py tests/test_train.py tests/test_classroom.py
step rehearsal "$PYTHON" scripts/rehearse.py --model "$MODEL" --device cuda \
    --out "$OUT/rehearsal"
if [[ ${GPU_CHECK_ALL:-0} == 1 ]]; then
    step inference "$PYTHON" inference_lora.py --image_path examples/sphere.png --device cuda \
        --no-remove-bg --output "$OUT/sphere.glb"
    step tests_cuda_visible "$PYTHON" -m pytest -q -p no:cacheprovider \
        -m "not slow and not browser" tests/test_model.py tests/test_lora.py \
        tests/test_train.py tests/test_mesh.py tests/test_cli_infer_eval.py \
        tests/test_fine_tuning_cli.py tests/test_tsr_cli.py
fi

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed"
