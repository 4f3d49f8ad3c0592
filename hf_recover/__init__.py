"""hf_recover: heal structurally pruned language models by knowledge distillation.

The public API. The package is arranged in parts (see docs/architecture.md): `base` (losses, data, pruned
config, loading, model anatomy, evaluation, reporting, metrics, the embedded defaults), `distill` (the trainer and
its teacher), `prune` (what to prune, and pruning it), `publish` (model card, Hub) and this face (the public names,
`recovery`, `cli`, `scripts`, `integrations`). Names are imported lazily, so that `import hf_recover` imports
neither torch nor transformers (the CLI imports them to build its parsers).
"""

from importlib import import_module
from typing import TYPE_CHECKING

from . import moved_modules
from .base.version import __version__

moved_modules.install()  # the import paths of before the parts keep working until REMOVED_IN, with a warning

_EXPORTS = {
    "DistillationConfig": "distill.config",
    "DistillationTrainer": "distill.trainer",
    "PrunedConfig": "base.pruned_config",
    "load_default_teacher": "base.defaults",
    "load_default_corpus": "base.defaults",
    "load_recovery_data": "base.data",
    "prepare_recovery_dataset": "base.data",
    "evaluate_perplexity": "base.evaluation",
    "recovery_metrics": "base.evaluation",
    "evaluate_lm_eval": "base.evaluation",
    "capability_retention": "base.evaluation",
    "evaluate_chat_retention": "base.chat_retention",
    "chat_reference": "base.chat_retention",
    "load_chat_prompts": "base.chat_retention",
    "forward_kl": "base.losses",
    "reverse_kl": "base.losses",
    "skew_forward_kl": "base.losses",
    "skew_reverse_kl": "base.losses",
    "generalized_jsd": "base.losses",
    "total_variation": "base.losses",
    "hidden_alignment_loss": "distill.alignment",
    "feature_dynamics_loss": "distill.alignment",
    "distillation_loss": "base.losses",
    "DistillationLoss": "base.losses",
    "build_layer_map": "distill.alignment",
    "block_importance": "prune",
    "plot_block_importance": "prune",
    "neuron_importance": "prune",
    "head_importance": "prune",
    "hidden_importance": "prune",
    "prune_depth": "prune",
    "prune_width": "prune",
    "PruneSpec": "prune",
    "load_pruned": "base.loading",
    "select_candidate": "prune",
    "CandidateReport": "prune",
    "generate_model_card": "publish.card",
    "save_model_card": "publish.card",
    "push_recovered": "publish.hub",
    "HubPushError": "publish.hub",
    "cache_teacher_outputs": "distill.teacher_cache",
    "load_teacher_cache": "distill.teacher_cache",
    "TeacherCache": "distill.teacher_cache",
    "build_teacher_data": "distill.teacher_data",
    "load_teacher_data": "distill.teacher_data",
    "TopKTeacher": "base.losses",
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
    from .base.chat_retention import chat_reference, evaluate_chat_retention, load_chat_prompts
    from .base.data import load_recovery_data, prepare_recovery_dataset
    from .base.defaults import load_default_corpus, load_default_teacher
    from .base.evaluation import capability_retention, evaluate_lm_eval, evaluate_perplexity, recovery_metrics
    from .base.loading import load_pruned
    from .base.losses import (
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
    from .base.pruned_config import PrunedConfig
    from .distill.alignment import build_layer_map, feature_dynamics_loss, hidden_alignment_loss
    from .distill.config import DistillationConfig
    from .distill.teacher_cache import TeacherCache, cache_teacher_outputs, load_teacher_cache
    from .distill.teacher_data import build_teacher_data, load_teacher_data
    from .distill.trainer import DistillationTrainer
    from .prune import (
        CandidateReport,
        PruneSpec,
        block_importance,
        head_importance,
        hidden_importance,
        neuron_importance,
        plot_block_importance,
        prune_depth,
        prune_width,
        select_candidate,
    )
    from .publish.card import generate_model_card, save_model_card
    from .publish.hub import HubPushError, push_recovered
