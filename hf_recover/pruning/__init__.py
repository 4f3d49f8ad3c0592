"""Choose what to prune and prune it: block and neuron importance, depth and width pruning, and
candidate selection. `load_pruned` (from `hf_recover.loading`) is re-exported here for existing imports."""

from ..loading import load_pruned
from .candidates import CandidateReport, CandidateResult, select_candidate
from .depth import prune_depth
from .importance import block_importance, neuron_importance, plot_block_importance
from .width import prune_width

__all__ = [
    "CandidateReport",
    "CandidateResult",
    "block_importance",
    "load_pruned",
    "neuron_importance",
    "plot_block_importance",
    "prune_depth",
    "prune_width",
    "select_candidate",
]
