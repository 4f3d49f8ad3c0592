"""hf_recover: heal structurally pruned language models by knowledge distillation.

The public API. Names are imported lazily so that `import hf_recover` stays fast and a CLI
`--help` does not pay for importing torch and transformers.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "DistillationConfig": "config",
    "DistillationTrainer": "trainer",
    "PrunedConfig": "pruned_config",
    "load_default_teacher": "defaults",
    "load_default_corpus": "defaults",
    "load_recovery_data": "data",
    "prepare_recovery_dataset": "data",
    "evaluate_perplexity": "evaluation",
    "recovery_metrics": "evaluation",
    "evaluate_lm_eval": "evaluation",
    "capability_retention": "evaluation",
    "forward_kl": "losses",
    "reverse_kl": "losses",
    "skew_forward_kl": "losses",
    "skew_reverse_kl": "losses",
    "generalized_jsd": "losses",
    "total_variation": "losses",
    "hidden_alignment_loss": "alignment",
    "feature_dynamics_loss": "alignment",
    "distillation_loss": "losses",
    "DistillationLoss": "losses",
    "build_layer_map": "alignment",
    "block_importance": "pruning",
    "plot_block_importance": "pruning",
    "neuron_importance": "pruning",
    "head_importance": "pruning",
    "hidden_importance": "pruning",
    "prune_depth": "pruning",
    "prune_width": "pruning",
    "load_pruned": "loading",
    "select_candidate": "pruning",
    "CandidateReport": "pruning",
    "generate_model_card": "card",
    "save_model_card": "card",
    "push_recovered": "hub",
    "HubPushError": "hub",
    "cache_teacher_outputs": "teacher_cache",
    "load_teacher_cache": "teacher_cache",
    "TeacherCache": "teacher_cache",
    "TopKTeacher": "losses",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # cache: the next lookup skips __getattr__
        return value
    raise AttributeError(f"module 'hf_recover' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .alignment import build_layer_map, feature_dynamics_loss, hidden_alignment_loss
    from .card import generate_model_card, save_model_card
    from .config import DistillationConfig
    from .data import load_recovery_data, prepare_recovery_dataset
    from .defaults import load_default_corpus, load_default_teacher
    from .evaluation import capability_retention, evaluate_lm_eval, evaluate_perplexity, recovery_metrics
    from .hub import HubPushError, push_recovered
    from .loading import load_pruned
    from .losses import (
        DistillationLoss,
        TopKTeacher,
        distillation_loss,
        forward_kl,
        generalized_jsd,
        reverse_kl,
        skew_forward_kl,
        skew_reverse_kl,
        total_variation,
    )
    from .pruned_config import PrunedConfig
    from .pruning import (
        CandidateReport,
        block_importance,
        head_importance,
        hidden_importance,
        neuron_importance,
        plot_block_importance,
        prune_depth,
        prune_width,
        select_candidate,
    )
    from .teacher_cache import TeacherCache, cache_teacher_outputs, load_teacher_cache
    from .trainer import DistillationTrainer
