"""How figures are written: one perplexity/number format and one before/after table for the whole package."""

from __future__ import annotations

import math

import pytest

from hf_recover.base.reporting import (
    assistant_table,
    before_after_rows,
    before_after_table,
    format_parameters,
    format_percent,
    format_perplexity,
    markdown_table,
    own_answer_rows,
)
from hf_recover.recovery import RecoveryResult


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (22.5, "22.50"),
        (999.994, "999.99"),
        (1000.0, "1,000"),
        (1573730.4, "1,573,730"),
        (math.inf, "∞"),
        (math.nan, "—"),
        (None, "—"),
        (7, "7.00"),
    ],
)
def test_format_perplexity(value, expected):
    assert format_perplexity(value) == expected


@pytest.mark.parametrize(
    ("count", "expected"),
    [(134515008, "134.5M"), (1_234_000_000, "1.2B"), (950_272, "950.3K"), (512, "512"), (None, "—")],
)
def test_format_parameters(count, expected):
    assert format_parameters(count) == expected


def test_format_percent():
    assert format_percent(0.8712) == "87.1%"
    assert format_percent(0.625, 0) == "62%"  # round half to even, as Python formats it
    assert format_percent(-0.2120, sign=True) == "-21.2%" and format_percent(0.03, sign=True) == "+3.0%"
    assert format_percent(None) == format_percent(math.nan) == "—"


def test_markdown_table_aligns_its_numeric_columns_right():
    table = markdown_table(["name", "a", "b"], [["x", "1", "2"]], numeric_columns=2)
    assert table == "| name | a | b |\n|---|---:|---:|\n| x | 1 | 2 |"


def test_before_after_table_against_hand_computed_values():
    perplexity = {
        "validation": {"teacher": 20.0, "pruned": 60.0, "recovered": 30.0},  # recovery 30/40, retention 20/30
        "ood": {"teacher": 20.0, "recovered": 25.0},  # retention alone: 80%
        "empty": {},  # nothing known: no row
        "flat": {"teacher": 20.0, "pruned": 20.0, "recovered": 20.0},  # no gap: recovery undefined
        "broken": {"teacher": 20.0, "pruned": 0.0, "recovered": 25.0},  # a non-positive perplexity: no ratios
    }
    assert before_after_table(perplexity) == "\n".join(
        [
            "| split | teacher PPL | pruned PPL | recovered PPL | recovery | retention |",
            "|---|---:|---:|---:|---:|---:|",
            "| validation | 20.00 | 60.00 | 30.00 | 75.0% | 66.7% |",
            "| ood | 20.00 | — | 25.00 | — | 80.0% |",
            "| flat | 20.00 | 20.00 | 20.00 | — | 100.0% |",
            "| broken | 20.00 | 0.00 | 25.00 | — | — |",
        ]
    )
    assert before_after_rows(None) == [] and before_after_rows({"x": 3}) == []


def a_recovery_result() -> RecoveryResult:
    """A recovery run's figures, every field set (the README's demo: teacher 134.5M, pruned to 113.3M)."""
    return RecoveryResult(
        perplexity={"validation": {"teacher": 16.08, "pruned": 41.4, "recovered": 18.8}},
        assistant={
            "teacher": {
                "perplexity": 1.78,
                "top1_agreement": 1.0,
                "repeated_ngram_rate": 0.1,
                "repetition_ratio": 1.0,
                "finish_rate": 0.8,
                "refusal_rate": 0.05,
                "mean_length": 90.0,
                "teacher_logprob": -0.6,
                "instruction_prompt_accuracy": 0.2,
                "instruction_accuracy": 0.32,
            },
            "recovered": {
                "perplexity": 3.0,
                "top1_agreement": 0.7,
                "repeated_ngram_rate": 0.2,
                "repetition_ratio": 2.0,
                "log_perplexity_recovery": 0.6,
                "finish_rate": 0.6,
                "finish_ratio": 0.75,
                "refusal_rate": 0.5,
                "mean_length": 120.0,
                "length_ratio": 4 / 3,
                "teacher_logprob": -1.25,
                "instruction_prompt_accuracy": 0.1,
                "instruction_prompt_ratio": 0.5,
                "instruction_accuracy": 0.16,
                "instruction_ratio": 0.5,
            },
        },
        answers=[{"prompt": "How do I reverse a list?", "teacher": "Use slicing.", "recovered": "Use reversed()."}],
        teacher_parameters=134515008,
        student_parameters=113300000,
        train_steps=60,
        train_tokens=61440,
        train_runtime=424.4,
        wall_time=647.0,
    )


def test_recovery_result_writes_the_same_table():
    result = a_recovery_result()
    table = before_after_table(result.perplexity)
    assert result.to_markdown() == (
        table + "\n\n" + assistant_table(result.assistant) + "\n\nparameters: 134.5M -> 113.3M (15.8% fewer); "
        "training: 60 steps, 61,440 tokens, 424 s; wall time: 647 s\n\nAnswers side by side (greedy):\n\n"
        "**Prompt:** How do I reverse a list?\n\n*teacher:*\n> Use slicing.\n\n*recovered:*\n> Use reversed()."
    )
    assert "| recovered | 3.00 | 60.0% | 70.0% |" in assistant_table(result.assistant)
    own = "| recovered | 60.0% (0.75×) | 50.0% | 20.0% (2.00×) | 120 (1.33×) | -1.25 | 10.0% (0.50×) | 16.0% (0.50×) |"
    assert own in assistant_table(result.assistant)
    assert "| teacher | 80.0% | 5.0% | 10.0% (1.00×) | 90 | -0.60 | 20.0% | 32.0% |" in assistant_table(
        result.assistant
    )
    # a model that did not answer every prompt has no own-answer row
    assert own_answer_rows({"pruned": {"perplexity": 5.0}}) == []
    assert "| validation | 16.08 | 41.40 | 18.80 | 89.3% | 85.5% |" in table


def test_a_healed_column_when_the_cut_was_healed_and_recovery_counts_the_heal():
    perplexity = {
        "validation": {"teacher": 16.0, "pruned": 40.0, "healed": 28.0, "recovered": 19.0},
        "ood": {"teacher": 38.0, "pruned": 80.0, "healed": 60.0, "recovered": 50.0},
    }
    table = before_after_table(perplexity)
    assert table.splitlines()[0] == (
        "| split | teacher PPL | pruned PPL | healed PPL | recovered PPL | recovery | retention |"
    )
    # recovery against the cut as made: (40 - 19) / (40 - 16) = 87.5%, healing included
    assert "| validation | 16.00 | 40.00 | 28.00 | 19.00 | 87.5% | 84.2% |" in table
    unhealed = before_after_table({"validation": {"teacher": 16.0, "pruned": 40.0, "recovered": 19.0}})
    assert "healed" not in unhealed and "| validation | 16.00 | 40.00 | 19.00 | 87.5% | 84.2% |" in unhealed


def test_answers_side_by_side_are_quoted_and_cut():
    from hf_recover.base.reporting import answers_markdown

    text = answers_markdown([{"prompt": "Hi?", "teacher": "a\nb", "recovered": "x" * 12, "pruned": ""}], width=10)
    assert text == (
        "**Prompt:** Hi?\n\n*teacher:*\n> a\n> b\n\n*recovered:*\n> xxxxxxxxxx [...]\n\n*pruned:*\n> (no answer)"
    )
