"""`hf_recover_perplexity`: token-weighted perplexity of a causal language model, as hf_recover measures it."""

import evaluate

from hf_recover.base.evaluation import perplexity_from_totals
from hf_recover.base.metrics import metric_info

_DESCRIPTION = """
Token-weighted perplexity over the next-token labels of a dataset: exp(sum of negative log-likelihoods / number of
scored tokens). Each input row is one sequence (or batch): the summed negative log-likelihood of its next-token labels
in nats, and how many labels were scored. The result equals hf_recover.evaluate_perplexity on the same data.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll_sum (list of float): per row, the summed next-token negative log-likelihood in nats
        (hf_recover.base.metrics.next_token_nll returns it per sequence).
    tokens (list of int): per row, the number of next-token labels scored.
Returns:
    perplexity: exp(nll); nll: the mean negative log-likelihood per token in nats; tokens: how many were scored.
Examples:
    >>> metric = evaluate.load(hf_recover.base.metrics.perplexity_metric_path())
    >>> metric.compute(nll_sum=[2.0, 4.0], tokens=[1, 2])["nll"]
    2.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HfRecoverPerplexity(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, {"nll_sum": "float64", "tokens": "int64"})

    def _compute(self, nll_sum, tokens):
        return perplexity_from_totals(float(sum(nll_sum)), int(sum(tokens)))
