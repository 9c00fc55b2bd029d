#!/usr/bin/env bash
# REP-MEMIT choices of issue #3, measured end to end on dev cases 80-91, which the reported
# REP-MEMIT rows leave out: adapters trained on keys read before MEMIT's update (the paper's
# order) or after it (`rep.fit_after_update`, now the default), and the aggregation target
# (`match` onto k*, `cosine` onto C⁻¹k*, `cosine` onto k*; cases 80-85 only), against plain MEMIT.
#   bash benchmarks/lab/probe_rep_memit.sh [out_dir]     (CPU: two runs at a time, one thread each)
set -u
OUT=${1:-benchmarks/results/probe_rep_memit}
PY=${PYTHON:-.venv/bin/python}
BEFORE=+set.rep.fit_after_update=false  # the paper's order; the YAML's default is now true
run() {  # name, cases, args...
    OMP_NUM_THREADS=1 "$PY" benchmarks/run_benchmark.py skip=80 limit=$2 fluency_tokens=0 progress=false \
        out="$OUT/$1" "${@:3}" > "$OUT/$1.log" 2>&1
}
mkdir -p "$OUT"
{ run MEMIT 12 alg=MEMIT
  run REP-MEMIT-cosine-whitened 6 alg=REP-MEMIT $BEFORE +set.rep.aggregation=cosine +set.rep.whiten_target=true; } &
{ run REP-MEMIT-keys-before-update 12 alg=REP-MEMIT $BEFORE
  run REP-MEMIT-fit-after-update 12 alg=REP-MEMIT
  run REP-MEMIT-cosine-raw 6 alg=REP-MEMIT $BEFORE +set.rep.aggregation=cosine +set.rep.whiten_target=false; } &
wait
"$PY" benchmarks/compare_runs.py --runs "$OUT"/MEMIT "$OUT"/REP-MEMIT-keys-before-update \
    "$OUT"/REP-MEMIT-fit-after-update --out "$OUT"
"$PY" benchmarks/compare_runs.py --runs "$OUT"/MEMIT "$OUT"/REP-MEMIT-* --first 86 --out "$OUT/cases80-85"
