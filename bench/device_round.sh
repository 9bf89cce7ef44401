#!/usr/bin/env bash
# One GPU call of this round (the device tool's nvidia-h200): install the carried wheels, then
# the steps named as arguments, each logging under $OUT. Steps:
#   tests   GPU tests of the inference engine (pytest -m gpu) and the kernels' tests compiled
#   serving bench/serving.py: bitsandbytes (previous path), our NF4 kernels unfused, the default (one process)
#   serving-lora the same with the default engine's LoRA term through PyTorch (rows lora_torch_*) instead
#   serving-optins  the default vs bitsandbytes, and each opt-in kernel setting on its own (rows optin_*)
#   serving-bnb  the same without the unfused engine (bitsandbytes, unfused = previous path, vs the default)
#   floor   bench/kernels.py: NF4 matmuls of one decode step, ours (one code / exact) vs bnb vs bf16
#   variants the same, with the tensor-core kernel's default vs its two-dot form
#   kernels the kernels' tests, compiled
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, triton, transformers, bitsandbytes; print(torch.__version__, triton.__version__, transformers.__version__, bitsandbytes.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
for step in "$@"; do
  start=$(date +%s)
  case $step in
    tests)   timeout 300 python3 -m pytest -m gpu -q -p no:randomly -s api_tests/inference > "$OUT/gpu_tests.log" 2>&1
             timeout 200 python3 -m pytest -q -p no:randomly api_tests/inference/kernels >> "$OUT/gpu_tests.log" 2>&1 ;;
    serving) timeout 560 python3 bench/serving.py --compare-bnb --compare-unfused --profile --tokens 128 \
               --out "$OUT/serving.json" > "$OUT/serving.log" 2>&1 ;;
    serving-optins) timeout 500 python3 bench/serving.py --compare-bnb --compare-opt-ins --profile --tokens 128 \
               --out "$OUT/serving.json" > "$OUT/serving.log" 2>&1 ;;
    serving-lora) timeout 400 python3 bench/serving.py --compare-bnb --compare-lora-torch --profile --tokens 128 \
               --out "$OUT/serving.json" > "$OUT/serving.log" 2>&1 ;;
    serving-bnb) timeout 500 python3 bench/serving.py --compare-bnb --profile --tokens 128 \
               --out "$OUT/serving.json" > "$OUT/serving.log" 2>&1 ;;
    kernels) timeout 300 python3 -m pytest -q -p no:randomly api_tests/inference/kernels > "$OUT/kernel_tests.log" 2>&1 ;;
    variants) timeout 400 python3 bench/kernels.py --skip-sweep --skip-lora --variants --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1 ;;
    diag)    timeout 60 python3 bench/diag/rotary_llama.py > "$OUT/diag_rotary.log" 2>&1 ;;
    floor)   timeout 300 python3 bench/kernels.py --skip-sweep --skip-lora --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1 ;;
  esac
  echo "$step rc=$? $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"
done
