#!/usr/bin/env bash
# train.py through accelerate: fsdp, 2 GPU(s).
# Run from any directory (train.py finds its files from its own folder):
#   bash path/to/launch.sh [extra train.py arguments]
# On more than one machine (1 in this spec), run it on every machine with:
#   MACHINE_RANK       this machine's index: 0 on the main machine, then 1, 2, ...
#   MAIN_PROCESS_IP    the main machine's address, reachable from all the others
#   MAIN_PROCESS_PORT  a free TCP port on the main machine (default 29500)
set -euo pipefail
# torchrun gives each process one CPU thread unless OMP_NUM_THREADS is set, and
# the model is quantized in host memory: the 2 processes of this machine share its cores instead.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
args=(--config_file "$here/accelerate_config.yaml")
if [[ -n "${MAIN_PROCESS_IP:-}" ]]; then
    args+=(
        --machine_rank "${MACHINE_RANK:?set MACHINE_RANK (0 on the main machine)}"
        --main_process_ip "$MAIN_PROCESS_IP"
        --main_process_port "${MAIN_PROCESS_PORT:-29500}"
    )
fi
exec accelerate launch "${args[@]}" "$here/train.py" "$@"
