"""REP (Robust Edit Pathway, Yan et al. ACL 2025) for EasyEdit.

`import rep_easyedit` registers REP-ROME (and the other REP backends the installed EasyEdit can
run) with EasyEdit, so `BaseEditor.from_hparams(REPHyperParams.from_hparams(yaml))` works as for
any EasyEdit method.
"""

from .core.adapter import GatedLowRankAdapter
from .core.config import REPConfig
from .hparams import HParamsError, REPHyperParams
from .core.merging import merge_adapters
from .core.pathway import RobustEditPathway, installed_paths, prune_inactive, remove_pathways
from .core.persistence import PathwayLayoutError, load_pathway, save_edited_model, save_pathway
from .registration import register
from .rep_main import LayoutError, apply_rep_to_model, recording_training_keys
from .core.requests import EditRequestError

REGISTERED = register()

__all__ = [
    "GatedLowRankAdapter", "RobustEditPathway", "REPConfig", "REPHyperParams", "HParamsError",
    "EditRequestError", "LayoutError", "apply_rep_to_model", "installed_paths", "prune_inactive",
    "remove_pathways", "register", "REGISTERED", "save_pathway", "load_pathway", "save_edited_model",
    "PathwayLayoutError", "merge_adapters", "recording_training_keys",
]
