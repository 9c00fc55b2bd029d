"""`python -m rep_easyedit.contrib export <EasyEdit checkout>`: REP in upstream's layout."""

from __future__ import annotations

import argparse
import sys

from .export import export
from .layout import ExportError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rep_easyedit.contrib",
                                     description="Write REP into an EasyEdit checkout, in its own layout.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write easyeditor/models/rep/, ALG_DICT entries, hparams, example, docs")
    p.add_argument("checkout", help="root of a clone of https://github.com/zjunlp/EasyEdit")
    args = parser.parse_args(argv)
    try:
        written = export(args.checkout)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(written))
    print(f"{len(written)} files written or edited; `git -C {args.checkout} diff --stat` is the PR",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
