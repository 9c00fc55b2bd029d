#!/usr/bin/env bash
# Finish the dev-set benchmark on a 2-core CPU: every run is split over two one-thread processes
# (shard=0/2 and 1/2 in one out dir) and resumes where it stopped, so this script can be rerun.
#   cpu/MEMIT, cpu/REP-MEMIT    all 100 cases on this CPU (seeded): a same-device pair
#   dev100/<ALG>                the H200 run (gpu_h200/<ALG>) copied once, its missing cases
#                               finished here; each case line records the device that ran it
#                               (EMMET finished all 100 on the H200: gpu_h200/EMMET)
# Usage: bash benchmarks/lab/finish_on_cpu.sh [RUN ...]   (default: all, in the order below)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=benchmarks/results

run() {  # run NAME OUT [extra hydra args]: two shards side by side, wait for both
    local name=$1 out=$2; shift 2
    mkdir -p "$out"
    for i in 0 1; do  # the shard that ends last writes summary.json over every case in the dir
        OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" benchmarks/run_benchmark.py alg="$name" limit=100 \
            progress=false shard=$i/2 out="$out" "$@" >>"$out/run_benchmark.shard$i.log" 2>&1 &
    done
    wait
}

from_h200() {  # copy the H200 run once, then finish it here
    local name=$1; shift
    if [ ! -f "$R/dev100/$name/run.json" ]; then
        mkdir -p "$R/dev100/$name"
        cp "$R/gpu_h200/$name/cases.jsonl" "$R/gpu_h200/$name/run.json" "$R/dev100/$name/"
    fi
    run "$name" "$R/dev100/$name" "$@"
}

runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(REP-MEMIT MEMIT REP-ROME REP-R-ROME ROME R-ROME REP-EMMET)
for name in "${runs[@]}"; do
    echo "$(date -u +%H:%M:%S) $name"
    case $name in
        MEMIT|REP-MEMIT) run "$name" "$R/cpu/$name" ;;
        REP-ROME) from_h200 "$name" key_similarity=true ;;
        *) from_h200 "$name" ;;
    esac
done
echo "$(date -u +%H:%M:%S) done"
