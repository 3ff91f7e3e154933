"""Model cards (`README.md`) for Flamingo checkpoints, built with `huggingface_hub`'s `ModelCard` / `ModelCardData`.

One builder, [`build_model_card`], serves every way a Flamingo is shared: `save_pretrained` writes its card into a
directory that has no `README.md` yet, `push_to_hub` uploads it, `FlamingoPreTrainedModel.create_model_card` returns
it (e.g. to merge it with `Trainer`'s card), and the OpenFlamingo converter builds its card with it.

Metadata: `library_name: transformers` (the checkpoints load with `AutoModelForImageTextToText` and carry their own
code, so the Hub's "Use this model" snippet works), `pipeline_tag: image-text-to-text`, the tags `flamingo` and
`hf_flamingo`, `base_model` (the vision encoder and language model, when they are Hub ids), `license`, `datasets`
and a `model-index` built from the evaluation harness's results files.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

LIBRARY_NAME = "transformers"
PIPELINE_TAG = "image-text-to-text"
DEFAULT_TAGS = ("flamingo", "hf_flamingo")
PLACEHOLDER_MODEL_ID = "path/to/this/model"
"""The model id the usage snippet loads when the card does not know the repository it will be uploaded to."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FLAMINGO_MODULES = ("perceiver.", "gated_cross_attn_layers.")


@dataclass(frozen=True)
class _TaskInfo:
    task_type: str
    task_name: str
    dataset_type: str
    dataset_name: str
    metric_type: str


# The evaluation harness's tasks (`hf_flamingo.evaluation.TASKS`) as model-index entries.
_TASKS = {
    "coco": _TaskInfo("image-to-text", "Image captioning", "coco", "COCO (Karpathy test split)", "cider"),
    "flickr30k": _TaskInfo(
        "image-to-text", "Image captioning", "flickr30k", "Flickr30k (Karpathy test split)", "cider"
    ),
    "vqav2": _TaskInfo("visual-question-answering", "Visual question answering", "vqav2", "VQAv2", "accuracy"),
    "ok_vqa": _TaskInfo("visual-question-answering", "Visual question answering", "ok_vqa", "OK-VQA", "accuracy"),
    "vizwiz": _TaskInfo("visual-question-answering", "Visual question answering", "vizwiz", "VizWiz", "accuracy"),
    "textvqa": _TaskInfo("visual-question-answering", "Visual question answering", "textvqa", "TextVQA", "accuracy"),
    "imagenet": _TaskInfo("image-classification", "Image classification", "imagenet-1k", "ImageNet-1k", "accuracy"),
    "hateful_memes": _TaskInfo(
        "image-classification", "Hateful meme classification", "hateful_memes", "Hateful Memes", "roc_auc"
    ),
}

_USAGE = """```python
import hf_flamingo  # registers the Auto classes (or pass trust_remote_code=True to use the code in this repo)
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.image_utils import load_image

model_id = "{model_id}"
model = AutoModelForImageTextToText.from_pretrained(model_id)
processor = AutoProcessor.from_pretrained(model_id)
demo_image = load_image("http://images.cocodataset.org/val2017/000000039769.jpg")
query_image = load_image("http://images.cocodataset.org/val2017/000000000285.jpg")
# Few-shot prompt: one demonstration (image, caption, <|endofchunk|>), then the query image.
prompt = "<image>Output:two cats sleeping on a pink blanket.<|endofchunk|><image>Output:"
inputs = processor(images=[[demo_image, query_image]], text=[prompt], return_tensors="pt")
generated = model.generate(**inputs, max_new_tokens=20, num_beams=3)
print(processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


def usage_snippet(model_id: str | None = None) -> str:
    """The Python usage example of the cards (a fenced code block): loads the model and processor from `model_id`
    and generates a caption for a query image after one demonstration.

    Args:
        model_id (`str`, *optional*): Hub id or directory to load from (default: [`PLACEHOLDER_MODEL_ID`]).
    """
    return _USAGE.format(model_id=model_id or PLACEHOLDER_MODEL_ID)


def hub_model_id(name_or_path: str | os.PathLike | None) -> str | None:
    """`name_or_path` if it can be a Hub model id (`name` or `owner/name`, not an existing local directory), else
    `None`: local paths never go into a card's metadata."""
    if name_or_path is None:
        return None
    name = os.fspath(name_or_path)
    if not _HUB_ID.match(name) or os.path.isdir(name):
        return None
    return name


def base_model_names(config: Any) -> tuple[str | None, str | None]:
    """The names the vision encoder and the language model were loaded from (`from_pretrained` records them as the
    sub-configs' `_name_or_path`, which `config.json` keeps), or `None` for backbones built from a config.

    Args:
        config ([`FlamingoConfig`]): The Flamingo's configuration.

    Returns:
        `(vision_model, language_model)`: Hub ids or local paths, as given to `from_backbones`.
    """
    return tuple(
        getattr(getattr(config, name), "_name_or_path", "") or None for name in ("vision_config", "text_config")
    )


def load_evaluation_results(source: Any) -> list[dict[str, Any]]:
    """Reads results of the evaluation harness (`hf_flamingo.evaluation.evaluate(..., output_path=...)`).

    Args:
        source: A results JSON path, an `EvaluationResults`, its `to_dict()`, or a list of any of these.

    Returns:
        `list[dict]`: One dict per task, with at least `task`, `metric` and `results` (`shots`, `mean`, `stddev`,
        `trials` per number of shots).

    Raises:
        FileNotFoundError: for a path that does not exist.
        ValueError: for a file or dict that is not a results file of the harness.
    """
    if isinstance(source, (list, tuple)):
        return [entry for item in source for entry in load_evaluation_results(item)]
    origin = "evaluation results"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Evaluation results file {str(path)!r} does not exist.")
        origin = str(path)
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{origin} is not JSON ({error}).") from error
    elif hasattr(source, "to_dict"):
        source = source.to_dict()
    if not isinstance(source, Mapping) or not {"task", "metric", "results"} <= set(source):
        raise ValueError(
            f"{origin} is not a results file of `hf_flamingo.evaluation.evaluate`: expected a JSON object with "
            "`task`, `metric` and `results` keys."
        )
    for result in source["results"]:
        if not isinstance(result, Mapping) or not {"shots", "mean"} <= set(result):
            raise ValueError(f"{origin}: every entry of `results` needs `shots` and `mean`, got {result!r}.")
    return [dict(source)]


def evaluation_eval_results(results: Sequence[Mapping[str, Any]]) -> list[EvalResult]:
    """Model-index entries (`huggingface_hub.EvalResult`) for results of [`load_evaluation_results`]: one metric per
    task and number of shots, valued at the mean score over the seeds (a percentage, as the harness reports it).
    Scores that are NaN (every trial failed) are left out."""
    eval_results = []
    for entry in results:
        info = _TASKS.get(entry["task"]) or _TaskInfo(
            PIPELINE_TAG, entry["task"], entry["task"], entry["task"], _metric_type(entry["metric"])
        )
        for result in entry["results"]:
            mean = float(result["mean"])
            if math.isnan(mean):
                continue
            shots = int(result["shots"])
            eval_results.append(
                EvalResult(
                    task_type=info.task_type,
                    task_name=info.task_name,
                    dataset_type=info.dataset_type,
                    dataset_name=info.dataset_name,
                    metric_type=info.metric_type,
                    metric_name=f"{entry['metric']} ({shots}-shot)",
                    metric_config=f"{shots}-shot",
                    metric_value=mean,
                    metric_args={"shots": shots, "trials": len(result.get("trials", [])) or 1},
                )
            )
    return eval_results


def _metric_type(metric: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", metric.lower()).strip("_")


def _evaluation_table(results: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| Task | Metric | Shots | Score (mean ± std over seeds) | Seeds |", "|---|---|---|---|---|"]
    for entry in results:
        name = _TASKS[entry["task"]].dataset_name if entry["task"] in _TASKS else entry["task"]
        for result in entry["results"]:
            stddev = result.get("stddev")
            spread = f" ± {float(stddev):.2f}" if stddev is not None and not math.isnan(float(stddev)) else ""
            seeds = len(result.get("trials", [])) or 1
            lines.append(
                f"| {name} | {entry['metric']} | {result['shots']} | {float(result['mean']):.2f}{spread} | {seeds} |"
            )
    return "\n".join(lines)


def _describe_backbone(name: str | None) -> str:
    if name is None:
        return "built from a config (no pretrained name recorded)"
    if hub_model_id(name) is not None:
        return f"[`{name}`](https://huggingface.co/{name})"
    return f"`{Path(name).name}` (a local checkpoint)"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _vision_features(config: Any) -> str:
    layer = config.vision_feature_layer
    where = "last layer" if layer == -1 else f"hidden states {layer}"
    tokens = (
        "patch tokens without the class token" if config.vision_feature_select_strategy == "default" else "all tokens"
    )
    norm = "after" if config.vision_feature_apply_post_layernorm else "before"
    return f"{tokens} of the {where}, {norm} the final LayerNorm"


def _parameter_counts(model: Any) -> tuple[int, int]:
    """(all parameters, those of the Perceiver Resampler and cross-attention blocks)."""
    total = flamingo = 0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if name.startswith(_FLAMINGO_MODULES):
            flamingo += parameter.numel()
    return total, flamingo


def _model_details(model: Any, vision_model: str | None, language_model: str | None) -> list[str]:
    config = model.config
    vision_config = config.vision_config
    total, flamingo = _parameter_counts(model)
    vision = type(model.vision_model).__name__
    image_size = getattr(vision_config, "image_size", None)
    size = f", {image_size} px" if image_size else ""
    depth = getattr(vision_config, "num_hidden_layers", None)
    layers = f", {_plural(depth, 'layer')}" if isinstance(depth, int) else ""
    return [
        f"Vision encoder: {_describe_backbone(vision_model)}: {vision}{layers}{size}; features: "
        f"{_vision_features(config)}.",
        f"Language model: {_describe_backbone(language_model)}: {type(model.language_model).__name__}, "
        f"{_plural(config.num_text_layers, 'layer')}, vocabulary {model.get_input_embeddings().weight.shape[0]}.",
        f"Perceiver Resampler: {_plural(config.perceiver_depth, 'layer')}, "
        f"{_plural(config.perceiver_num_latents, 'latent')} per image.",
        f"Gated cross-attention before decoder layers where `(i + 1) % {config.cross_attn_every_n_layers} == 0` "
        f"(`cross_attn_every_n_layers={config.cross_attn_every_n_layers}`, "
        f"{len(config.cross_attention_layer_indices())} blocks); `<image>` = {config.media_token_id}, "
        f"`<|endofchunk|>` = {config.eoc_token_id}; generation stops at `<|endofchunk|>` and at the language model's eos.",
        f"Parameters: {total:,} in all, of which {flamingo:,} in the Perceiver Resampler and the cross-attention "
        "blocks (the parameters OpenFlamingo trains; the backbones stay frozen).",
    ]


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _merge_data(data: ModelCardData, other: ModelCardData) -> None:
    """Adds the metadata of an existing card (`other`) to `data`: its keys where `data` has none, the union of the
    tags, datasets and evaluation results."""
    for key, value in other.to_dict().items():
        if key in ("model-index", "eval_results") or value is None:
            continue
        mine = getattr(data, key, None)
        if key in ("tags", "datasets", "base_model") and mine is not None:
            setattr(data, key, list(dict.fromkeys(_as_list(mine) + _as_list(value))))
        elif mine is None:
            setattr(data, key, value)
    if other.eval_results:
        data.eval_results = list(other.eval_results) + list(data.eval_results or [])
        data.model_name = data.model_name or other.model_name


def build_model_card(
    model: Any,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    title: str | None = None,
    description: str | None = None,
    vision_model: str | os.PathLike | None = None,
    language_model: str | os.PathLike | None = None,
    license: str | None = None,
    datasets: str | Sequence[str] | None = None,
    training_data: str | None = None,
    evaluation_results: Any = None,
    tags: Sequence[str] | None = None,
    extra_details: Sequence[str] = (),
    notes: str | None = None,
    merge_with: str | os.PathLike | ModelCard | None = None,
) -> ModelCard:
    """The model card of a Flamingo.

    Args:
        model ([`FlamingoPreTrainedModel`]): The model the card describes.
        repo_id (`str`, *optional*): The Hub repository the model is (or will be) in: the usage snippet loads it.
        model_name (`str`, *optional*): Name in the title and the model-index (default: `repo_id`'s last part).
        title (`str`, *optional*): The card's `# title` (default: `model_name`, or "Flamingo").
        description (`str`, *optional*): The paragraph under the title (default: a sentence naming the backbones).
        vision_model (`str`, *optional*): Hub id of the vision encoder (default: recorded in the config by
            `from_backbones`/`from_pretrained`, see [`base_model_names`]).
        language_model (`str`, *optional*): Hub id of the language model (default: as `vision_model`).
        license (`str`, *optional*): Hub license identifier (e.g. `"mit"`, `"apache-2.0"`). Unset: the card says the
            terms of the backbones apply, and the metadata has no `license`.
        datasets (`str` or `list[str]`, *optional*): Hub ids of the training data sets (metadata `datasets`).
        training_data (`str`, *optional*): A description of the training data (markdown).
        evaluation_results (*optional*): Results of the evaluation harness (a JSON path written by
            `hf_flamingo.evaluation.evaluate(..., output_path=...)`, an `EvaluationResults`, or a list of them):
            they become the `model-index` and a table.
        tags (`list[str]`, *optional*): Tags added to `flamingo` and `hf_flamingo`.
        extra_details (`list[str]`, *optional*): More bullet points for the "Model details" section.
        notes (`str`, *optional*): A closing paragraph (markdown).
        merge_with (`str`, `os.PathLike` or `ModelCard`, *optional*): An existing card (e.g. `README.md` written by
            `Trainer.create_model_card`) whose text follows this card's and whose metadata is merged in (its keys
            where this card has none, the union of tags, datasets and evaluation results).

    Returns:
        `huggingface_hub.ModelCard`.
    """
    recorded_vision, recorded_language = base_model_names(model.config)
    vision_model = os.fspath(vision_model) if vision_model is not None else recorded_vision
    language_model = os.fspath(language_model) if language_model is not None else recorded_language
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else None)
    results = load_evaluation_results(evaluation_results) if evaluation_results is not None else []
    eval_results = evaluation_eval_results(results)
    base_models = list(dict.fromkeys(n for n in (hub_model_id(vision_model), hub_model_id(language_model)) if n))
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        license=license,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *(tags or ())])),
        base_model=base_models or None,
        datasets=_as_list(datasets) or None,
        eval_results=eval_results or None,
        model_name=(model_name or "flamingo") if eval_results else model_name,
    )
    if len(base_models) > 1:
        # Two base models would otherwise read as a merge on the Hub.
        data.base_model_relation = "finetune"
    title = title or model_name or "Flamingo"
    description = description or (
        "A Flamingo vision-language model (`hf_flamingo`'s `FlamingoForConditionalGeneration`): a vision encoder "
        "and Perceiver Resampler whose image latents condition a frozen causal language model through tanh-gated "
        "cross-attention blocks, as in OpenFlamingo v2. It takes interleaved images and text and generates text."
    )
    sections = [
        f"# {title}",
        description.strip(),
        "## Model details\n\n"
        + "\n".join(f"- {line}" for line in [*_model_details(model, vision_model, language_model), *extra_details]),
        "## Usage\n\nSave the processor (`FlamingoProcessor`) with the model so that `AutoProcessor` loads it.\n\n"
        + usage_snippet(repo_id),
        "## Training data\n\n" + _training_data(datasets, training_data),
    ]
    if results:
        sections.append(
            "## Evaluation\n\nScores of the `hf_flamingo` evaluation harness (OpenFlamingo's protocol), in percent:\n\n"
            + _evaluation_table(results)
        )
    sections.append("## License\n\n" + _license_text(license, vision_model, language_model))
    if notes:
        sections.append(notes.strip())
    text = "\n\n".join(sections) + "\n"
    if merge_with is not None:
        existing = merge_with if isinstance(merge_with, ModelCard) else ModelCard.load(Path(merge_with))
        _merge_data(data, existing.data)
        text = f"{text}\n{existing.text.strip()}\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def _training_data(datasets: str | Sequence[str] | None, training_data: str | None) -> str:
    parts = []
    if training_data:
        parts.append(training_data.strip())
    names = _as_list(datasets)
    if names:
        parts.append(
            "Data sets: " + ", ".join(f"[`{name}`](https://huggingface.co/datasets/{name})" for name in names) + "."
        )
    return "\n\n".join(parts) or "Not recorded."


def _license_text(license: str | None, vision_model: str | None, language_model: str | None) -> str:
    if license:
        return f"`{license}`. The terms of the vision encoder and the language model apply to their weights."
    named = [f"`{name}`" for name in (hub_model_id(vision_model), hub_model_id(language_model)) if name]
    backbones = " and ".join(named) if named else "the vision encoder and the language model"
    return f"Not set: the weights include those of {backbones}, whose licenses apply."


def _resolve_card(
    model: Any, model_card: ModelCard | str | None, repo_id: str | None, tags: Sequence[str]
) -> ModelCard:
    if model_card is None:
        return build_model_card(model, repo_id=repo_id, tags=tags)
    card = model_card if isinstance(model_card, ModelCard) else ModelCard(model_card)
    if tags:
        card.data.tags = list(dict.fromkeys(_as_list(card.data.tags) + list(tags)))
    return card


def _file_times(directory: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in directory.iterdir()} if directory.is_dir() else {}


def save_with_model_card(
    model: Any,
    save: Any,
    save_directory: str | os.PathLike,
    *,
    is_main_process: bool = True,
    model_card: ModelCard | str | None = None,
    push_to_hub: bool = False,
    tags: Sequence[str] | None = None,
    **kwargs: Any,
) -> Any:
    """What `FlamingoPreTrainedModel.save_pretrained` runs: `save` (transformers' `save_pretrained`), then the model
    card, then (with `push_to_hub=True`) the upload.

    `README.md` is written only where the directory has none (a card already there, the user's or one written
    earlier, is kept), unless `model_card` is given, which is always written. With `push_to_hub=True` the files this
    call wrote are uploaded with `huggingface_hub.HfApi.upload_folder`, in one commit (transformers would replace
    `README.md` by an empty template card); a card generated here is not uploaded over a `README.md` the Hub
    repository already has.

    Args:
        model: The model.
        save: The parent class's bound `save_pretrained`.
        save_directory: Where to save.
        model_card (`ModelCard` or `str`, *optional*): The card to write instead of [`build_model_card`]'s.
        push_to_hub (`bool`): Also upload the files written (keyword arguments `repo_id`, `commit_message`,
            `commit_description`, `create_pr`, `revision`, `private`, `token`, as transformers takes them).
        tags (`list[str]`, *optional*): Tags added to the card's metadata.
        is_main_process (`bool`): Whether this process writes (and uploads); others only run `save`.
        **kwargs: Passed on to `save`.

    Returns:
        The upload's `CommitInfo` with `push_to_hub=True`, else `None`.
    """
    tags = list(dict.fromkeys([*(getattr(model, "model_tags", None) or ()), *(tags or ())]))
    directory = Path(save_directory)
    if not (push_to_hub and is_main_process):
        save(save_directory, is_main_process=is_main_process, push_to_hub=False, **kwargs)
        if is_main_process and directory.is_dir():
            _write_card(model, directory, model_card, None, tags)
        return None

    from huggingface_hub import HfApi

    repo_id = kwargs.pop("repo_id", directory.name)
    hub = {name: kwargs.pop(name, None) for name in ("commit_message", "commit_description", "revision", "private")}
    create_pr = kwargs.pop("create_pr", False)
    token = kwargs.get("token")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=hub["private"], exist_ok=True).repo_id
    before = _file_times(directory)
    save(save_directory, is_main_process=is_main_process, push_to_hub=False, **kwargs)
    generated = _write_card(model, directory, model_card, repo_id, tags) and model_card is None
    written = [name for name, mtime in _file_times(directory).items() if before.get(name) != mtime]
    if (directory / "README.md").is_file() and "README.md" not in written:
        written.append("README.md")  # a card the directory already had: the user's
    if generated and api.file_exists(repo_id, "README.md", revision=hub["revision"]):
        written.remove("README.md")  # keep the card the repository already has
    revision = hub["revision"]
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=directory,
        allow_patterns=[pattern for name in written for pattern in (name, f"{name}/*")],
        commit_message=hub["commit_message"] or "Upload model",
        commit_description=hub["commit_description"],
        create_pr=create_pr,
        revision=revision,
    )


def _write_card(
    model: Any, directory: Path, model_card: ModelCard | str | None, repo_id: str | None, tags: Sequence[str]
) -> bool:
    """Writes `README.md` (always for a given `model_card`, else only if absent); whether it was written."""
    path = directory / "README.md"
    if model_card is None and path.exists():
        return False
    _resolve_card(model, model_card, repo_id, tags).save(path)
    return True


__all__ = [
    "DEFAULT_TAGS",
    "LIBRARY_NAME",
    "PIPELINE_TAG",
    "PLACEHOLDER_MODEL_ID",
    "base_model_names",
    "build_model_card",
    "evaluation_eval_results",
    "hub_model_id",
    "load_evaluation_results",
    "save_with_model_card",
    "usage_snippet",
]
