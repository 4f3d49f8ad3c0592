"""`hf_recover_recovery`: how much of the quality that pruning removed a recovery gave back."""

import evaluate

from hf_recover.base.evaluation import recovery_metrics
from hf_recover.base.metrics import metric_info

_DESCRIPTION = """
Recovery and retention of a pruned-then-recovered student, from three perplexities on the same data:
recovery = (PPL_pruned - PPL_recovered) / (PPL_pruned - PPL_teacher), the fraction of the perplexity gap that pruning
opened and recovery closed (1.0 = back to the teacher); retention = PPL_teacher / PPL_recovered and
pruned_retention = PPL_teacher / PPL_pruned. The result equals hf_recover.recovery_metrics.
"""

_KWARGS_DESCRIPTION = """
Args:
    teacher_perplexity (list of one float): the teacher's perplexity.
    pruned_perplexity (list of one float): the pruned student's, before recovery.
    recovered_perplexity (list of one float): the student's after recovery.
    One row per call: compute each split (validation, out-of-domain, ...) on its own.
Returns:
    recovery, retention, pruned_retention (floats).
Examples:
    >>> metric = evaluate.load(hf_recover.base.metrics.recovery_metric_path())
    >>> metric.compute(teacher_perplexity=[20.0], pruned_perplexity=[60.0], recovered_perplexity=[30.0])["recovery"]
    0.75
"""

_NAMES = ("teacher_perplexity", "pruned_perplexity", "recovered_perplexity")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HfRecoverRecovery(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, dict.fromkeys(_NAMES, "float64"))

    def _compute(self, teacher_perplexity, pruned_perplexity, recovered_perplexity):
        if len(teacher_perplexity) != 1:
            raise ValueError(
                f"hf_recover_recovery takes one row (one teacher, pruned and recovered perplexity), got "
                f"{len(teacher_perplexity)}; compute each split on its own."
            )
        return recovery_metrics(teacher_perplexity[0], pruned_perplexity[0], recovered_perplexity[0])
