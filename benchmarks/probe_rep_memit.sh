#!/usr/bin/env bash
# REP-MEMIT choices of issue #3, measured end to end on dev cases the reported tables leave out of
# REP-MEMIT (80-85): keys read before (default) or after MEMIT's update, and the aggregation target
# (match onto k*, cosine onto C⁻¹k*, cosine onto k*), against plain MEMIT on the same cases.
#   bash benchmarks/probe_rep_memit.sh [out_dir]     (CPU: two runs at a time, one thread each)
set -u
OUT=${1:-benchmarks/results/probe_rep_memit}
PY=${PYTHON:-.venv/bin/python}
COMMON="skip=${SKIP:-80} limit=${LIMIT:-6} fluency_tokens=0 progress=false"
run() { OMP_NUM_THREADS=1 "$PY" examples/run_benchmark.py $COMMON out="$OUT/$1" "${@:2}" > "$OUT/$1.log" 2>&1; }
mkdir -p "$OUT"
{ run MEMIT alg=MEMIT; run REP-MEMIT-cosine-whitened alg=REP-MEMIT hparams=benchmarks/configs/rep-memit-cosine-whitened.yaml; } &
{ run REP-MEMIT alg=REP-MEMIT; run REP-MEMIT-fit-after-update alg=REP-MEMIT hparams=benchmarks/configs/rep-memit-fit-after-update.yaml; } &
wait
run REP-MEMIT-cosine-raw alg=REP-MEMIT hparams=benchmarks/configs/rep-memit-cosine-raw.yaml &
wait
"$PY" examples/compare_runs.py --runs "$OUT"/MEMIT "$OUT"/REP-MEMIT "$OUT"/REP-MEMIT-* --out "$OUT"
