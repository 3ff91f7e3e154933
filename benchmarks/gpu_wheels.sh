#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the wheels the GPU check needs on the device machine, at the versions of
# constraints/tested.txt, for its Python 3.12 on x86-64. That machine brings its own torch, numpy, tokenizers,
# safetensors, timm, einops, pyyaml, typer and the CUDA libraries; these are the packages it lacks or has at other
# versions. Together they stay under the 64 MiB a device run may carry (bitsandbytes alone is about 43 MB).
#
#   bash benchmarks/gpu_wheels.sh      # then the `run` command of benchmarks/README.md, carrying .whl
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(transformers huggingface_hub regex peft accelerate bitsandbytes open-flamingo open_clip_torch ftfy wcwidth
    einops-exts)
pins=()
for package in "${packages[@]}"; do
    pin=$(grep -i -E "^${package//[-_]/[-_]}==" constraints/tested.txt || true)
    if [[ -z "${pin}" ]]; then
        echo "gpu_wheels.sh: ${package} is not pinned in constraints/tested.txt" >&2
        exit 1
    fi
    pins+=("${pin}")
done

rm -rf .whl
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -l .whl
du -sh .whl
