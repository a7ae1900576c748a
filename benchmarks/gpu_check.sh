#!/usr/bin/env bash
# The GPU check: run it whenever a CUDA GPU is at hand (an H100/H200 here) and record its figures
# in benchmarks/RESULTS.md. About 6 minutes on one H100; each step has its own time limit, so the
# whole fits in 8 minutes, and a step that fails is reported and the next one still runs.
#
#   bash benchmarks/gpu_check.sh                 # with python3 from PATH (torch with CUDA in it)
#   PYTHON=.venv/bin/python OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# 1. the CUDA tests (tests/test_cuda.py: logits and cached greedy decoding equal the CPU's, a
#    compiled bf16 training run that reloads on the CPU);
# 2. GPT-2 124M training throughput and MFU, bf16, eager and compiled (benchmarks/train_throughput.py);
# 3. a short run of the GPU preset (shakespeare-char-gpu, bf16, compiled) on the tour's own text
#    (docs/*.md: the machine may have no network to fetch Shakespeare);
# 4. with several GPUs: the same run with DDP on all of them (torchrun).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
failed=0

step() {  # step SECONDS NAME COMMAND...: run it with a limit, its output also in $OUT/NAME.log
    local limit=$1 name=$2
    shift 2
    echo "=== $name (at most ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit status $rc in $((SECONDS - start))s"
    [[ $rc == 0 ]] || failed=$((failed + 1))
}

"$PY" - <<'EOF' | tee "$OUT/device.log"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
EOF
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [[ "$gpus" == 0 ]]; then
    echo "no CUDA GPU visible to $PY; nothing to check" >&2
    exit 1
fi

step 150 cuda-tests "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step 150 gpt2-124m-throughput "$PY" benchmarks/train_throughput.py --device cuda --model gpt2-124m \
    --dtypes bf16 --paths eager,compiled --steps 20
corpus="docs/*.md"
step 100 gpu-preset "$PY" -m gptlab train --preset shakespeare-char-gpu --corpus "$corpus" \
    --out "$OUT/gpu-preset" --force --max-steps 300 --eval-interval 100 --no-progress
if [[ "$gpus" -gt 1 ]]; then
    step 100 gpu-preset-ddp "$PY" -m torch.distributed.run --standalone --nproc_per_node "$gpus" -m gptlab train \
        --preset shakespeare-char-gpu --corpus "$corpus" --out "$OUT/gpu-preset-ddp" --force --max-steps 300 \
        --eval-interval 100 --no-progress
fi
echo "gpu_check: $failed step(s) failed; logs in $OUT"
exit $(( failed > 0 ))
