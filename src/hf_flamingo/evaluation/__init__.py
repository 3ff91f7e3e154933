"""Few-shot evaluation with OpenFlamingo's protocol: COCO/Flickr30K captioning, VQAv2/OK-VQA/VizWiz/TextVQA,
ImageNet and HatefulMemes, with random or RICES demonstrations. `runner.py` runs the protocol; each task family
(`tasks.py`) holds its prompts, model call and metric; `inference.py` holds the two model calls."""

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
from .inference import class_log_likelihoods, generate_batch
from .metrics import compute_cider, compute_vqa_accuracy, normalize_vqa_answer, roc_auc_score, vqa_accuracy
from .runner import (
    TASKS,
    EvaluationConfig,
    EvaluationData,
    EvaluationResults,
    ShotResult,
    evaluate,
    load_evaluation_data,
)
from .tasks import CaptioningTask, ClassificationTask, EvaluationTask, HatefulMemesTask, ImageNetTask, VQATask

__all__ = [
    "CaptioningTask",
    "ClassificationTask",
    "DatasetFormatError",
    "EvalExample",
    "EvaluationConfig",
    "EvaluationData",
    "EvaluationResults",
    "EvaluationTask",
    "HatefulMemesTask",
    "ImageNetTask",
    "RICES",
    "RandomDemonstrations",
    "ShotResult",
    "TASKS",
    "UnreadableImageError",
    "VQATask",
    "VisionTowerEncoder",
    "class_log_likelihoods",
    "compute_cider",
    "compute_vqa_accuracy",
    "evaluate",
    "generate_batch",
    "load_coco_style_references",
    "load_evaluation_data",
    "load_hateful_memes",
    "load_image",
    "load_image_folder",
    "load_karpathy_captions",
    "load_vqa",
    "normalize_vqa_answer",
    "roc_auc_score",
    "vqa_accuracy",
]
