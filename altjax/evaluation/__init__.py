"""Evaluation: image-text retrieval recall, zero-shot classification, prompt templates, sharded
embedding of whole evaluation sets, and the datasets they come from.

Metrics are percentages, reported beside the counts evaluated (``evaluated_counts``: ``images``,
and ``classes`` or ``texts``); the output keys are those of ``eval_results.json`` (DESIGN.md
section 3).
The command lines ``altjax-eval`` and ``altjax-embed`` live in ``altjax.evaluation.cli``.
"""
from altjax.evaluation.datasets import (
    TFDS_DATASETS,
    ClassificationSet,
    DatasetError,
    RetrievalSet,
    image_folder_classification,
    image_folder_retrieval,
    load_dataset,
)
from altjax.evaluation.embed import (
    Embedder,
    SkippedImages,
    UnreadableImageError,
    build_classifier,
    evaluate_retrieval,
    evaluate_zeroshot,
    evaluated_counts,
    evaluation_key,
)
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
    "TFDS_DATASETS",
    "ClassificationSet",
    "DatasetError",
    "RetrievalSet",
    "image_folder_classification",
    "image_folder_retrieval",
    "load_dataset",
    "Embedder",
    "SkippedImages",
    "UnreadableImageError",
    "build_classifier",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "evaluated_counts",
    "evaluation_key",
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
