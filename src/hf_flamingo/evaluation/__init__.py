"""Few-shot evaluation with OpenFlamingo's protocol: COCO/Flickr30K captioning, VQAv2/OK-VQA/VizWiz/TextVQA,
ImageNet and HatefulMemes, with random or RICES demonstrations (see `runner.py`)."""

from .datasets import (
    DatasetFormatError,
    EvalExample,
    UnreadableImageError,
    load_coco_style_references,
    load_hateful_memes,
    load_image,
    load_image_folder,
    load_karpathy_captions,
    load_vqa,
)
from .demonstrations import RICES, RandomDemonstrations, VisionTowerEncoder
from .metrics import compute_cider, compute_vqa_accuracy, normalize_vqa_answer, roc_auc_score, vqa_accuracy
from .runner import (
    TASKS,
    EvaluationConfig,
    EvaluationResults,
    ShotResult,
    class_log_likelihoods,
    evaluate,
    generate_batch,
)

__all__ = [
    "DatasetFormatError",
    "EvalExample",
    "EvaluationConfig",
    "EvaluationResults",
    "RICES",
    "RandomDemonstrations",
    "ShotResult",
    "TASKS",
    "UnreadableImageError",
    "VisionTowerEncoder",
    "class_log_likelihoods",
    "compute_cider",
    "compute_vqa_accuracy",
    "evaluate",
    "generate_batch",
    "load_coco_style_references",
    "load_hateful_memes",
    "load_image",
    "load_image_folder",
    "load_karpathy_captions",
    "load_vqa",
    "normalize_vqa_answer",
    "roc_auc_score",
    "vqa_accuracy",
]
