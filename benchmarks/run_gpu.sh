#!/usr/bin/env bash
# The GPU runs behind benchmarks/RESULTS.md, in one go, each part under its own time limit.
# Usage (from the repository root, on a machine with 2 GPUs; OUT defaults to ./gpu_out):
#   benchmarks/run_gpu.sh [tests] [fsdp] [single] [kernels] [profile]
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
parts=${*:-tests fsdp single kernels profile}
for part in $parts; do
  case $part in
    tests)
      timeout 220 python3 -m pytest -q tests/gpu -p no:cacheprovider -p no:warnings -rA 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt" ;;
    fsdp)
      timeout 330 python3 benchmarks/fsdp_train.py --devices 2 --strategies thunder_fsdp,model_parallel_compile,fsdp \
        --model Llama-3.2-1B --n-layer 8 --batch 4 --seq 2048 --steps 6 --warmup 2 --timeout 150 \
        --json "$OUT/fsdp.json" 2>&1 | tail -20 | tee "$OUT/fsdp.md" ;;
    single)
      # Fresh Triton, Inductor and lightning_thunder caches: "first step" then includes every compilation.
      TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) LIGHTNING_THUNDER_CACHE=$(mktemp -d) \
      CUDA_VISIBLE_DEVICES=0 timeout 420 python3 benchmarks/litgpt_train.py --model Llama-3.2-1B --n-layer 8 \
        --batch 4 --seq 2048 --dtype bf16 --modes eager,torch.compile,thunder,thunder+fp8,torchao-fp8 --steps 8 \
        --warmup 3 --timeout 120 --census 25 --json "$OUT/litgpt.json" 2>&1 | tee "$OUT/litgpt.log" | tail -150 ;;  # the log is written as it runs
    kernels)
      timeout 240 python3 benchmarks/kernels.py --modes eager,torch.compile,thunder --json "$OUT/kernels.json" 2>&1 \
        | tail -40 | tee "$OUT/kernels.md" ;;
    profile)
      for mode in thunder thunder+fp8; do
        CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/step_profile.py --mode "$mode" --n-layer 8 --breakdown 20 \
          2>&1 | grep -v "^USDT\|warn" | tail -50 | tee "$OUT/profile_${mode/+/_}.md"  # no "+" in names: not fetched
      done ;;
  esac
done
