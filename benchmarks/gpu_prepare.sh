#!/usr/bin/env bash
# Prepare `python -m benchmarks.gpu` for a lent GPU machine (see benchmarks/gpu.py): the files
# that must travel, in folders .git/info/exclude ignores (pass them as the device run's carry).
#   .gpu/smollm2  SmolLM2-135M-Instruct's config, tokenizer and chat template, no weights (3 MB)
#   .whl          wheels the device image lacks or has at other versions (17 MB, Python 3.12)
# Then run on the device (carry: [".whl", ".gpu"]), as one command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 python3 -m benchmarks.gpu --model-dir .gpu/smollm2 --out $OUT
# and paste $OUT/gpu_bench.md into BENCHMARKS.md (`make bench` keeps a `bench:gpu` section).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
model_dir=$(.venv/bin/python -c "from components.models import bundled; print(bundled.resolve('smollm2-135m-instruct'))")
mkdir -p .gpu/smollm2
find "$model_dir" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} .gpu/smollm2/ \;
version() { .venv/bin/pip show "$1" | sed -n 's/^Version: //p'; }
for pkg in trl datasets transformers peft accelerate dill multiprocess regex safetensors; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pkg==$(version "$pkg")"
done
du -sh .gpu .whl
