"""Choose what to prune and prune it: block, neuron, head and hidden-channel importance, depth pruning with healed
cuts, width pruning, prune specs, parameter budgets and candidate selection. Imports only `hf_recover.base`."""

from .attention_heads import head_importance
from .budget import width_spec_at_parameters
from .candidates import CandidateReport, CandidateResult, select_candidate
from .depth import prune_depth
from .healing import HealSpec
from .hidden import hidden_importance
from .importance import block_importance, neuron_importance, plot_block_importance
from .spec import PRUNE_SPEC_GRAMMAR, DepthSpec, PruneSpec, WidthSpec
from .width import prune_width

__all__ = [
    "PRUNE_SPEC_GRAMMAR",
    "CandidateReport",
    "CandidateResult",
    "DepthSpec",
    "HealSpec",
    "PruneSpec",
    "WidthSpec",
    "block_importance",
    "head_importance",
    "hidden_importance",
    "neuron_importance",
    "plot_block_importance",
    "prune_depth",
    "prune_width",
    "select_candidate",
    "width_spec_at_parameters",
]
