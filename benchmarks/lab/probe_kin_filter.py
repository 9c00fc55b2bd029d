"""`probe_gate.py` with a stricter kin-name filter: a name sharing any word with the subject is left out.

The shipped filter (`core/kin_names.is_kin`) drops names that share the subject's last word. On
SmolLM2 many sampled names share its first word ("Ferrari F500" for "Ferrari F355") and the real
table lost held-out shuffles with them; this asks, from keys alone, whether names of the kind
that share no word with the subject keep the neighbours' gain at less cost out of domain.
Arguments as `probe_gate.py` (its rows, labelled by `--set`; write them to their own file).

    OMP_NUM_THREADS=1 python benchmarks/lab/probe_kin_filter.py --cases 0-29 --activation \
        --set kin_negatives=8 --out benchmarks/results/probe_gate/smollm2_kin_disjoint.jsonl
"""

from __future__ import annotations

import runpy
from pathlib import Path

from rep_easyedit.core import kin_names

shipped = kin_names.is_kin


def disjoint(item: str, subject: str, exclude: list[str]) -> bool:
    return shipped(item, subject, exclude) and not set(kin_names._words(item)) & set(kin_names._words(subject))


if __name__ == "__main__":
    kin_names.is_kin = disjoint
    runpy.run_path(str(Path(__file__).with_name("probe_gate.py")), run_name="__main__")
