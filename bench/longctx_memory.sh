#!/usr/bin/env bash
# Issue 27's memory claims in one device call on one H100/H200 (about 3 minutes), from the repo root:
#   bash bench/longctx_memory.sh
# 1. builds the WKV5 CUDA kernel (its RNN-mode forward keeps no chunk-sized float32 temporaries; if the build
#    fails, the PyTorch chunked op runs instead, with prefill chunks small enough for the same goals);
# 2. bench/infer_memory.py: the 7B in RNN mode, bf16 and 4-bit, contexts 4096 and 131072, embedding on the host;
# 3. bench/finetune_memory.py: one segmented fine-tune step, the 7B's width at 8 layers, 4096 vs 131072 tokens;
# 4. bench/longctx_record.py: bench/results/longctx-<card>.json from both.
# JSON and logs go to $OUT and bench/results/. Needs torch, numpy, safetensors and pydantic: wheels in .whl/
# are installed first (the GPU image lacks pydantic: pydantic, pydantic-core, annotated-types, typing-inspection).
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" bench/results
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 RWKV5_KERNEL_CACHE=/tmp/rwkv5-kernels
python3 -c "import pydantic, torch; assert torch.cuda.is_available()" || { echo "needs pydantic and a GPU"; exit 1; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
t0=$(date +%s)
stamp() { echo "== $1: $(( $(date +%s) - t0 )) s"; }

if timeout 180 python3 -m kernels.build > "$OUT/build.log" 2>&1; then
  backend=cuda chunks="1024 1024" segment=4096
else
  tail -20 "$OUT/build.log"
  # The chunked op keeps ~1.9 MB of float32 products per token and layer: shorter chunks and segments.
  backend=chunk chunks="128 256" segment=2048
fi
stamp "build ($backend)"

timeout 240 python3 bench/infer_memory.py --preset 7b --bits 16 4 --contexts 4096 131072 --chunk $chunks \
  --decode 16 --embedding host --wkv-backend $backend --out "$OUT/infer-7b.json" 2>&1 | tee "$OUT/infer.log"
stamp infer
timeout 150 python3 bench/finetune_memory.py --preset 7b --layers 8 --lengths 4096,131072 --segment-len $segment \
  --wkv-backend $backend --out "$OUT/finetune-memory-7b-L8.json" 2>&1 | tee "$OUT/finetune.log"
stamp finetune
python3 bench/longctx_record.py --finetune "$OUT/finetune-memory-7b-L8.json" --inference "$OUT/infer-7b.json" \
  || exit 1
cp bench/results/longctx-*.json "$OUT/"
stamp done
