#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks into .whl/ (git-ignored, ~60 MB): the
# pinned training stack it does not have (trl, datasets, bitsandbytes) or has in another
# version (transformers, peft), and peftgen's own small dependencies. Python 3.12, x86-64.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
packages=(
    trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2
    dill==0.4.1 multiprocess==0.70.19
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    ruamel.yaml==0.19.1
)
for package in "${packages[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$package"
done
du -sh .whl
