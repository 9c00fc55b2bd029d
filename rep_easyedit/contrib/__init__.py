"""Contributing REP to upstream EasyEdit: `python -m rep_easyedit.contrib export <checkout>`.

The export writes REP into an EasyEdit checkout in upstream's own layout, generated from this
package's modules (one source of truth): `layout.py` says which module goes where and rewrites
imports, `registry.py` edits upstream's registration points, `export.py` writes it all.
"""
