"""Evaluation: image-text retrieval recall, zero-shot classification, prompt templates.

Metrics are percentages; the output keys are those of ``eval_results.json`` (DESIGN.md section 3).
"""
from altjax.evaluation.metrics import (
    RECALL_KS,
    ranks_against,
    retrieval_metrics,
    retrieval_ranks,
    zeroshot_metrics,
)
from altjax.evaluation.templates import (
    CHINESE_TEMPLATES,
    ENGLISH_TEMPLATES,
    OPENAI_IMAGENET_SELECTED_TEMPLATES,
    OPENAI_IMAGENET_TEMPLATES,
    TEMPLATE_SETS,
    fill_template,
    get_templates,
    load_templates,
)
from altjax.evaluation.zeroshot import zeroshot_classifier

__all__ = [
    "RECALL_KS",
    "ranks_against",
    "retrieval_metrics",
    "retrieval_ranks",
    "zeroshot_metrics",
    "zeroshot_classifier",
    "CHINESE_TEMPLATES",
    "ENGLISH_TEMPLATES",
    "OPENAI_IMAGENET_SELECTED_TEMPLATES",
    "OPENAI_IMAGENET_TEMPLATES",
    "TEMPLATE_SETS",
    "fill_template",
    "get_templates",
    "load_templates",
]
