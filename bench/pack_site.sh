#!/usr/bin/env bash
# The Python packages the GPU machine's image lacks, packed into one file that fits one device call.
#   bash bench/pack_site.sh [OUT.tar.xz]          (default: .site/site312.tar.xz; .site is ignored by git)
# The image has Python 3.12 with torch, numpy, pandas, pyarrow, matplotlib, scikit-learn, ...; it lacks
# prefect, mlflow, ray, deepspeed and their dependencies. Ray's wheel alone (79 MB) is over the 64 MiB a call
# may carry, so wheels are installed here for cp312 (pip --target, no byte-code) and the tree, less what
# this headless run never loads, travels as one xz archive (~59 MB):
#   ray/jars (Java workers), ray/rllib, *.js.map, the Prefect and MLflow web UIs (the run reads their APIs,
#   PREFECT_UI_ENABLED=false), virtualenv (Ray's pip runtime environments only), and copies of packages the
#   image already has (hf_xet, pygments, yaml); the three Ray executables are stripped of symbols.
# `SLIM=1 bash bench/pack_site.sh` packs the training benches' site (below) into .site-bench/ (ignored by git).
# On the machine: tar -xJf site312.tar.xz -C /tmp, PYTHONPATH=/tmp/site312, PATH=/tmp/site312/bin, and the
# console scripts' first line pointed at that machine's python3 (bench/pipeline_1gpu.sh does all of it).
set -euo pipefail
default_out=.site/site312.tar.xz
[[ -n ${SLIM:-} ]] && default_out=.site-bench/site312.tar.xz  # beside the full one: each call carries one folder
out=$(realpath -m "${1:-$default_out}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
           --platform manylinux1_x86_64)
target=(--only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")
# deepspeed publishes only an sdist: build a wheel (pure Python; its ops JIT-compile on the GPU machine).
python3 -m pip wheel -q --no-deps -w "$work/wheels" deepspeed==0.19.8
python3 -m pip download -q "${target[@]}" -d "$work/wheels" \
  "prefect==3.9.1" "mlflow==3.17.2" "ray[default,train]==2.60.0" "pyrwkv-tokenizer==0.9.1" "zstandard>=0.22" \
  "huggingface_hub>=2.4,<3" "pydantic==2.13.4" hjson py-cpuinfo
# Left out: packages the image already has, and the three this run never loads (py-spy, virtualenv, distlib).
leave_out='numpy pandas pyarrow scipy scikit-learn matplotlib pillow fonttools contourpy kiwisolver cycler
pyparsing grpcio aiohttp aiosignal aiohappyeyeballs frozenlist multidict yarl propcache hf-xet pygments pyyaml
py-spy virtualenv distlib joblib threadpoolctl'
for name in $leave_out; do
  pattern=$(echo "$name" | tr '-' '_')
  rm -f "$work/wheels/${pattern}"-[0-9]*.whl "$work/wheels/${name}"-[0-9]*.whl
done
python3 -m pip install -q --no-deps --no-compile "${target[@]}" --target "$work/site312" "$work"/wheels/*.whl
cd "$work/site312"
rm -rf ray/jars ray/rllib prefect/server/ui prefect/server/ui-v2 mlflow/server/js/build
find . -name '*.js.map' -delete
find . -name __pycache__ -prune -exec rm -rf {} +
strip --strip-unneeded ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
if [[ -n ${SLIM:-} ]]; then
  # SLIM=1: the training benches only (bench/fp8_device.sh, bench/issue28_device.sh; ~29 MB): no Ray nor the
  # services' cloud clients, which leaves room in the call for torchao (installed into the site).
  rm -rf ray ray-*.dist-info databricks databricks_sdk-* asyncpg asyncpg-* burner_redis* redis redis-* \
    cryptography cryptography-* google google_* googleapis_* opentelemetry* grpc*
  python3 -m pip download -q "${target[@]}" --no-deps -d "$work/wheels" "torchao==0.18.0"
  python3 -m pip install -q --no-deps --no-compile --target . "$work"/wheels/torchao-*.whl
fi
ls "$work/wheels" > "$work/site312/WHEELS.txt"
mkdir -p "$(dirname "$out")"
tar -C "$work" -cf - site312 | xz -T0 -9 > "$out"
ls -la "$out"
