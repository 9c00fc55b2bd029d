"""The aggregation loss at every training step of one probed case, per `rep` setting.

A one-case trace beside `probe_gate.py` (which it runs): it wraps `training.aggregation_loss` to
record each value. It showed that Adam started from the least-squares map knocks it off its fit in
the first steps and walks it back (docs/results.md "Solving the map instead of training it"); that
first try trained the map, which the code did at commit fc9406a (now the map is solved and only
the gate trains, so the trace of `least_squares` is flat).

    OMP_NUM_THREADS=1 python -m benchmarks.lab.trace_aggregation --case 0 \
        --set delta_init=least_squares,stop_pos_fire=0,stop_neg_fire=1 --set delta_init=identity
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--case", type=int, default=0)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--every", type=int, default=5, help="print every this many steps")
    args = ap.parse_args()

    import rep_easyedit.core.training as training
    from benchmarks.lab import probe_gate

    traces: list[list[float]] = []
    loss = training.aggregation_loss

    def recorded(adapted, keys, kind, use_abs):
        value = loss(adapted, keys, kind, use_abs)
        traces[-1].append(float(value))
        return value

    training.aggregation_loss = recorded
    for setting in args.set or [""]:
        traces.append([])
        with tempfile.TemporaryDirectory() as tmp:
            sys.argv = ["probe_gate", "--model", args.model, "--cases", f"{args.case}-{args.case}",
                        "--out", str(Path(tmp) / "rows.jsonl")] + (["--set", setting] if setting else [])
            probe_gate.main()
        print(json.dumps({"set": setting, "steps": len(traces[-1]),
                          "aggregation": [round(v, 4) for v in traces[-1][::args.every]]}), flush=True)


if __name__ == "__main__":
    main()
