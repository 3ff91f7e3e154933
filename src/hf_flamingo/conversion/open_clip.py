"""
Convert an open_clip Vision Transformer to a transformers `CLIPVisionModel`, and reproduce open_clip's evaluation
preprocessing with a transformers image processor.

OpenFlamingo's vision tower is open_clip's `ViT-L-14` (`openai` weights). It feeds the perceiver with the patch
tokens of `visual(x)` (`output_tokens=True`), without the CLS token and before `ln_post` (the behaviour of open_clip
<= 2.22, or of newer open_clip with `visual.final_ln_after_pool = True`). The transformers equivalent is
`CLIPVisionModel(...).last_hidden_state[:, 1:, :]`: `last_hidden_state` is the encoder output before
`post_layernorm`, which transformers applies only to the pooled CLS token.

Module correspondence (open_clip `VisionTransformer` -> transformers CLIP vision tower). The transformers names are
relative to the tower: in transformers 5 they are the keys of `CLIPVisionModel.state_dict()` as they are, and sit
under `vision_model.` in `CLIPVisionModelWithProjection` (and in transformers 4 / Hub checkpoints).

| open_clip (`visual.` / `vision_encoder.` / no prefix) | transformers |
|---|---|
| `class_embedding` | `embeddings.class_embedding` |
| `conv1.weight` | `embeddings.patch_embedding.weight` |
| `positional_embedding` | `embeddings.position_embedding.weight` |
| `ln_pre.*` | `pre_layrnorm.*` |
| `transformer.resblocks.{i}.ln_1.*` | `encoder.layers.{i}.layer_norm1.*` |
| `transformer.resblocks.{i}.attn.in_proj_{weight,bias}` | `encoder.layers.{i}.self_attn.{q,k,v}_proj.*` (split in 3) |
| `transformer.resblocks.{i}.attn.out_proj.*` | `encoder.layers.{i}.self_attn.out_proj.*` |
| `transformer.resblocks.{i}.ln_2.*` | `encoder.layers.{i}.layer_norm2.*` |
| `transformer.resblocks.{i}.mlp.c_fc.*` | `encoder.layers.{i}.mlp.fc1.*` |
| `transformer.resblocks.{i}.mlp.c_proj.*` | `encoder.layers.{i}.mlp.fc2.*` |
| `ln_post.*` | `post_layernorm.*` |
| `proj` (width, embed_dim) | `visual_projection.weight` = `proj.T` (`CLIPVisionModelWithProjection` only) |

This module does not import open_clip: it works on state dicts and on open_clip's model-config dicts (the JSON
returned by `open_clip.get_model_config(name)`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection
from transformers.image_utils import PILImageResampling

from ..image_processing_flamingo import FlamingoImageProcessor
from ._checks import key_set_problems

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "clip_vision_config_from_open_clip",
    "convert_open_clip_vision_state_dict",
    "open_clip_image_processor",
    "open_clip_vision_to_hf",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of the OpenAI CLIP training images (open_clip's `OPENAI_DATASET_MEAN`)."""
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel standard deviation of the OpenAI CLIP training images (open_clip's `OPENAI_DATASET_STD`)."""

# Fields of open_clip's `CLIPVisionCfg` (3.3.0, plus two older ones) that do not change the ViT's eval-time math
# or the shape of its weights, or that only matter together with a feature rejected below.
_IGNORED_VISION_FIELDS = frozenset(
    {
        "patch_dropout",  # training-time only (identity at eval)
        "output_tokens",  # what `forward` returns, not what it computes
        "final_ln_after_pool",  # only where `ln_post` applies to the tokens, see `clip_vision_config_from_open_clip`
        "attn_pooler_queries",  # only used with `attentional_pool`
        "attn_pooler_heads",
        "timm_model_pretrained",  # only used with `timm_model_name`
        "timm_pool",
        "timm_proj",
        "timm_proj_bias",
        "timm_drop",
        "timm_drop_path",
    }
)
_SIZE_FIELDS = frozenset({"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"})
# Fields that must keep their open_clip default for the tower to be a plain CLIP ViT: field -> (allowed values, why).
_DEFAULT_ONLY_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "timm_model_name": ((None, ""), "a timm backbone is not an open_clip VisionTransformer"),
    "attentional_pool": ((False, None), "the attentional pooler (CoCa) has no CLIPVisionModel equivalent"),
    "ls_init_value": ((None,), "LayerScale has no CLIPVisionModel equivalent"),
    "no_ln_pre": ((False, None), "CLIPVisionModel always applies `pre_layrnorm`"),
    "pool_type": (("tok", None), "CLIPVisionModel pools the CLS token (open_clip `pool_type='tok'`)"),
    "pos_embed_type": (("learnable", "sin_cos_2d", None), "unknown positional embedding type"),
    "block_type": ((None, "default"), "open_clip's 'custom' attention block has no CLIPVisionModel equivalent"),
    "qk_norm": ((False, None), "q/k LayerNorm has no CLIPVisionModel equivalent"),
    "scaled_cosine_attn": ((False, None), "scaled cosine attention has no CLIPVisionModel equivalent"),
    "scale_heads": ((False, None), "per-head attention scales have no CLIPVisionModel equivalent"),
    "scale_attn_inner": ((False, None), "the inner attention LayerNorm has no CLIPVisionModel equivalent"),
    "scale_attn": ((False, None), "the post-attention LayerNorm has no CLIPVisionModel equivalent"),
    "scale_fc": ((False, None), "the MLP LayerNorm has no CLIPVisionModel equivalent"),
    "input_patchnorm": ((False, None), "input patch LayerNorm (open_clip < 2.23) has no CLIPVisionModel equivalent"),
    "global_average_pool": (
        (False, None),
        "average pooling (open_clip < 2.23) differs from CLIPVisionModel's CLS pool",
    ),
}
_KNOWN_VISION_FIELDS = (
    _IGNORED_VISION_FIELDS | _SIZE_FIELDS | set(_DEFAULT_ONLY_FIELDS) | {"act_kwargs", "norm_kwargs"}
)


def _as_square(value: Any, name: str) -> int:
    """Returns `value` as one int if it is an int or a pair of equal ints; raises `ValueError` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"open_clip vision_cfg[{name!r}] must be an int or a pair of ints, got {value!r}.")
    if isinstance(value, int):
        return value
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        if value[0] != value[1]:
            raise ValueError(
                f"open_clip vision_cfg[{name!r}]={list(value)} is not square; CLIPVisionModel only supports square "
                f"{name}."
            )
        return value[0]
    raise ValueError(f"open_clip vision_cfg[{name!r}] must be an int or a pair of ints, got {value!r}.")


def clip_vision_config_from_open_clip(
    model_config: Mapping[str, Any], *, quick_gelu: bool | None = None
) -> CLIPVisionConfig:
    """
    Builds the `CLIPVisionConfig` matching the vision tower of an open_clip model config.

    Only a plain open_clip `VisionTransformer` has a `CLIPVisionModel` equivalent. Fields that change its eval-time
    computation in a way `CLIPVisionModel` cannot express raise a `ValueError`: `timm_model_name`, a ResNet
    (`layers` given as a list), `attentional_pool`, `ls_init_value`, `no_ln_pre`, `pool_type` other than `"tok"`,
    the custom attention block (`block_type="custom"`, `qk_norm`, `scaled_cosine_attn`, `scale_heads`,
    `scale_attn_inner`, `scale_attn`, `scale_fc`), the pre-2.23 `input_patchnorm` / `global_average_pool`, non-empty
    `act_kwargs`, `norm_kwargs` other than `eps`, a non-square `image_size` / `patch_size`, and fields this
    converter does not know (a newer open_clip may have added a feature it cannot check).

    Fields accepted and ignored because they do not change the converted weights or eval outputs:
    - `patch_dropout`: a training-time augmentation, the identity at eval.
    - `output_tokens`: only selects what open_clip's `forward` returns.
    - `final_ln_after_pool`: with `True` (and in open_clip <= 2.22), open_clip's tokens are taken before `ln_post`,
      i.e. they equal `last_hidden_state[:, 1:]`. With `False` (the default of open_clip >= 2.23) open_clip's
      tokens are `ln_post(tokens)`, i.e. `post_layernorm(last_hidden_state[:, 1:])`. The pooled
      output is the same either way: `pooler_output = post_layernorm(last_hidden_state[:, 0])`.
    - `pos_embed_type="sin_cos_2d"`: the fixed table is stored in the state dict and copied like a learned one.

    Args:
        model_config (`Mapping[str, Any]`):
            An open_clip model config, as returned by `open_clip.get_model_config(name)` or read from its JSON
            file: `{"embed_dim": int, "vision_cfg": {...}, "quick_gelu": bool (optional), ...}`.
        quick_gelu (`bool`, *optional*):
            Whether the tower uses QuickGELU (`hidden_act="quick_gelu"`) instead of `nn.GELU` (`"gelu"`). `None`
            reads `model_config["quick_gelu"]` (default `False`, as open_clip does). The OpenAI CLIP weights
            (`pretrained="openai"`, the tower of the OpenFlamingo releases) were trained with QuickGELU: pass
            `True` for them when the config is the plain `ViT-L-14` one.

    Returns:
        `CLIPVisionConfig`: with `hidden_size=width`, `num_hidden_layers=layers`,
        `num_attention_heads=width // head_width`, `intermediate_size=int(width * mlp_ratio)`, `patch_size`,
        `image_size`, `projection_dim=embed_dim` and `layer_norm_eps=1e-5` (or `norm_kwargs["eps"]`).

    Raises:
        ValueError: If the config is malformed or describes a tower with no `CLIPVisionModel` equivalent.
    """
    if not isinstance(model_config, Mapping):
        raise ValueError(f"`model_config` must be a mapping (an open_clip model config), got {type(model_config)}.")
    if "vision_cfg" not in model_config or "embed_dim" not in model_config:
        raise ValueError(
            "`model_config` must be an open_clip model config with 'embed_dim' and 'vision_cfg' keys, got keys "
            f"{sorted(model_config)}."
        )
    vision_cfg = model_config["vision_cfg"]
    if not isinstance(vision_cfg, Mapping):
        raise ValueError(f"open_clip model_config['vision_cfg'] must be a mapping, got {type(vision_cfg)}.")

    unknown = sorted(set(vision_cfg) - _KNOWN_VISION_FIELDS)
    if unknown:
        raise ValueError(
            f"Unknown open_clip vision_cfg field(s) {unknown}: cannot tell whether the tower still matches "
            "CLIPVisionModel (fields known to this converter are those of open_clip 3.3.0's CLIPVisionCfg)."
        )
    problems = []
    for name, (allowed, why) in _DEFAULT_ONLY_FIELDS.items():
        if name in vision_cfg and vision_cfg[name] not in allowed:
            problems.append(f"{name}={vision_cfg[name]!r} ({why})")
    if vision_cfg.get("act_kwargs"):
        problems.append(f"act_kwargs={vision_cfg['act_kwargs']!r} (activation arguments are not supported)")
    norm_kwargs = dict(vision_cfg.get("norm_kwargs") or {})
    layer_norm_eps = float(norm_kwargs.pop("eps", 1e-5))
    if norm_kwargs:
        problems.append(f"norm_kwargs={vision_cfg['norm_kwargs']!r} (only 'eps' maps to CLIPVisionConfig)")
    layers = vision_cfg.get("layers", 12)
    if isinstance(layers, Sequence):
        problems.append(f"layers={list(layers)!r} (a ModifiedResNet tower, not a ViT)")
    if problems:
        raise ValueError(
            "This open_clip vision tower has no transformers CLIPVisionModel equivalent: " + "; ".join(problems) + "."
        )

    width = int(vision_cfg.get("width", 768))
    head_width = int(vision_cfg.get("head_width", 64))
    if head_width <= 0 or width % head_width != 0:
        raise ValueError(f"open_clip vision_cfg width={width} is not a multiple of head_width={head_width}.")
    if quick_gelu is None:
        quick_gelu = bool(model_config.get("quick_gelu", False))

    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * float(vision_cfg.get("mlp_ratio", 4.0))),
        projection_dim=int(model_config["embed_dim"]),
        num_hidden_layers=int(layers),
        num_attention_heads=width // head_width,
        num_channels=3,
        image_size=_as_square(vision_cfg.get("image_size", 224), "image_size"),
        patch_size=_as_square(vision_cfg.get("patch_size", 16), "patch_size"),
        hidden_act="quick_gelu" if quick_gelu else "gelu",
        layer_norm_eps=layer_norm_eps,
    )


def _detect_prefix(keys: set[str]) -> str:
    """Finds the prefix `p` (`""` or ending in `"."`) such that `p + "conv1.weight"` and `p + "class_embedding"` exist."""
    candidates = sorted(
        key[: -len("conv1.weight")]
        for key in keys
        if key.endswith("conv1.weight")
        and (key == "conv1.weight" or key.endswith(".conv1.weight"))
        and key[: -len("conv1.weight")] + "class_embedding" in keys
    )
    if not candidates:
        sample = sorted(keys)[:8]
        raise ValueError(
            "Could not find an open_clip VisionTransformer in the state dict: no '<prefix>conv1.weight' with a "
            f"matching '<prefix>class_embedding' (first keys: {sample}). A ResNet or timm tower cannot be converted."
        )
    if len(candidates) > 1:
        raise ValueError(
            f"The state dict holds several open_clip vision towers {candidates}; pass `prefix=` to pick one."
        )
    return candidates[0]


@dataclass(frozen=True)
class _VisionKey:
    """One tensor of the transformers tower and the open_clip `VisionTransformer` tensor it comes from.

    Attributes:
        source: The open_clip key, without prefix.
        target: The transformers key, relative to the tower (see `_tower_prefix`).
        source_shape: The shape `source` must have.
        part: For the fused q/k/v projection, which third of `source` (split along dim 0) `target` is.
    """

    source: str
    target: str
    source_shape: tuple[int, ...]
    part: int | None = None


def _vision_keys(config: CLIPVisionConfig) -> list[_VisionKey]:
    """The open_clip -> transformers key mapping of a tower, for every tensor except `proj` (the module docstring's
    table), in the order of the converted state dict."""
    width, patch, grid = config.hidden_size, config.patch_size, config.image_size // config.patch_size
    keys = [
        _VisionKey("class_embedding", "embeddings.class_embedding", (width,)),
        _VisionKey("conv1.weight", "embeddings.patch_embedding.weight", (width, config.num_channels, patch, patch)),
        _VisionKey("positional_embedding", "embeddings.position_embedding.weight", (grid * grid + 1, width)),
    ]
    for norm, hf_norm in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for param in ("weight", "bias"):
            keys.append(_VisionKey(f"{norm}.{param}", f"{hf_norm}.{param}", (width,)))
    for i in range(config.num_hidden_layers):
        keys.extend(_block_keys(i, width, config.intermediate_size))
    return keys


def _block_keys(index: int, width: int, inner: int) -> list[_VisionKey]:
    """The `_VisionKey`s of residual block `index` (`transformer.resblocks.{index}` -> `encoder.layers.{index}`)."""
    src, dst = f"transformer.resblocks.{index}.", f"encoder.layers.{index}."
    keys = []
    for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
        keys.append(_VisionKey(f"{src}attn.in_proj_weight", f"{dst}self_attn.{name}.weight", (3 * width, width), part))
        keys.append(_VisionKey(f"{src}attn.in_proj_bias", f"{dst}self_attn.{name}.bias", (3 * width,), part))
    for src_name, dst_name, weight_shape in (
        ("attn.out_proj", "self_attn.out_proj", (width, width)),
        ("ln_1", "layer_norm1", (width,)),
        ("ln_2", "layer_norm2", (width,)),
        ("mlp.c_fc", "mlp.fc1", (inner, width)),
        ("mlp.c_proj", "mlp.fc2", (width, inner)),
    ):
        keys.append(_VisionKey(f"{src}{src_name}.weight", f"{dst}{dst_name}.weight", weight_shape))
        keys.append(_VisionKey(f"{src}{src_name}.bias", f"{dst}{dst_name}.bias", weight_shape[:1]))
    return keys


@functools.cache
def _tower_prefix(model_class: type) -> str:
    """The prefix of the vision tower's keys in `model_class.state_dict()` (`""` or `"vision_model."`).

    Read from a tiny model built on the meta device, so it follows the installed transformers' module layout.
    """
    probe = CLIPVisionConfig(
        hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1, image_size=2, patch_size=1
    )
    with torch.device("meta"):
        keys = list(model_class(probe).state_dict())
    anchor = "embeddings.class_embedding"
    return next(key for key in keys if key.endswith(anchor))[: -len(anchor)]


def convert_open_clip_vision_state_dict(
    state_dict: Mapping[str, Tensor],
    config: CLIPVisionConfig,
    *,
    prefix: str | None = None,
    include_projection: bool = False,
) -> dict[str, Tensor]:
    """
    Converts the weights of an open_clip `VisionTransformer` to `CLIPVisionModel` (or
    `CLIPVisionModelWithProjection`) keys.

    The returned keys are those of `CLIPVisionModel.state_dict()` (with `include_projection=False`) or of
    `CLIPVisionModelWithProjection.state_dict()` (with `include_projection=True`) in the installed transformers. In
    transformers 5 the first are unprefixed (`embeddings.class_embedding`, `pre_layrnorm.weight`,
    `encoder.layers.0.self_attn.q_proj.weight`, ...) and the second are under `vision_model.`, plus
    `visual_projection.weight`.

    The tower is found under `prefix`: `"visual."` in the state dict of a whole open_clip `CLIP` model,
    `"vision_encoder."` in that of an OpenFlamingo `Flamingo` model (which stores `clip_model.visual` as
    `vision_encoder`), `""` for the state dict of the bare visual module (and e.g. `"module.visual."` for a DDP
    training checkpoint). Keys outside the prefix (the CLIP text tower, the language model, ...) are ignored; every
    key under the prefix must be a weight of the tower and every weight of the tower must be present.

    `attn.in_proj_weight` (shape `(3 * width, width)`) and `attn.in_proj_bias` (`(3 * width,)`) are split, in this
    order, into the q, k and v projections. The visual projection `proj` (shape `(width, embed_dim)`) has no place in
    `CLIPVisionModel`: it is checked and dropped unless `include_projection=True`, which adds
    `visual_projection.weight = proj.T` (shape `(embed_dim, width)`) for `CLIPVisionModelWithProjection`.

    Args:
        state_dict (`Mapping[str, Tensor]`):
            The source weights. It is not modified.
        config (`CLIPVisionConfig`):
            The target config (see `clip_vision_config_from_open_clip`); used to check every shape.
        prefix (`str`, *optional*):
            The prefix of the visual tower's keys (a trailing `"."` is added if missing). `None` detects it: the one
            prefix `p` for which `p + "conv1.weight"` and `p + "class_embedding"` both exist.
        include_projection (`bool`, *optional*, defaults to `False`):
            Whether to return `visual_projection.weight` too (requires `proj` in the state dict).

    Returns:
        `dict[str, Tensor]`: New tensors (copies, in the source dtype) keyed like `CLIPVisionModel.state_dict()`,
        or like `CLIPVisionModelWithProjection.state_dict()` with `include_projection=True`; they load with
        `model.load_state_dict(converted, strict=True)`.

    Raises:
        ValueError: If the prefix cannot be detected, or if keys under it are missing, unexpected, or of the wrong
            shape. The message lists each offending key (with expected and actual shapes).
    """
    keys = set(state_dict)
    if prefix is None:
        prefix = _detect_prefix(keys)
    elif prefix and not prefix.endswith("."):
        prefix += "."

    vision_keys = _vision_keys(config)
    shapes = {entry.source: entry.source_shape for entry in vision_keys}
    proj_shape = (config.hidden_size, config.projection_dim)
    sub = {key[len(prefix) :]: state_dict[key] for key in keys if key.startswith(prefix)}

    if include_projection or "proj" in sub:
        shapes = {**shapes, "proj": proj_shape}  # `proj` is optional unless it is asked for
    problems = key_set_problems(
        {prefix + k: v.shape for k, v in sub.items()}, {prefix + k: shape for k, shape in shapes.items()}
    )
    if problems:
        raise ValueError(
            f"The open_clip vision state dict (prefix {prefix!r}) does not match the CLIPVisionConfig "
            f"(hidden_size={config.hidden_size}, num_hidden_layers={config.num_hidden_layers}, "
            f"intermediate_size={config.intermediate_size}, image_size={config.image_size}, "
            f"patch_size={config.patch_size}). " + ". ".join(problems) + "."
        )

    def copy(tensor: Tensor) -> Tensor:
        return tensor.detach().clone(memory_format=torch.contiguous_format)

    tower = _tower_prefix(CLIPVisionModelWithProjection if include_projection else CLIPVisionModel)
    out: dict[str, Tensor] = {}
    for entry in vision_keys:
        tensor = sub[entry.source]
        if entry.part is not None:
            tensor = tensor.chunk(3, dim=0)[entry.part]
        out[f"{tower}{entry.target}"] = copy(tensor)
    if include_projection:
        out["visual_projection.weight"] = copy(sub["proj"].t())
    return out


def open_clip_vision_to_hf(
    visual_module_or_state_dict: nn.Module | Mapping[str, Tensor],
    model_config: Mapping[str, Any],
    *,
    quick_gelu: bool | None = None,
    with_projection: bool = False,
    prefix: str | None = None,
) -> CLIPVisionModel | CLIPVisionModelWithProjection:
    """
    Builds a transformers CLIP vision model holding the weights of an open_clip ViT.

    Example (OpenFlamingo's tower; `model_config = open_clip.get_model_config("ViT-L-14")`):

    ```python
    >>> hf_vision = open_clip_vision_to_hf(clip_model.visual, model_config, quick_gelu=True)
    >>> patch_tokens = hf_vision(pixel_values).last_hidden_state[:, 1:]  # (batch, 256, 1024), pre-`ln_post`
    ```

    Args:
        visual_module_or_state_dict (`nn.Module | Mapping[str, Tensor]`):
            The open_clip visual module, a whole open_clip `CLIP` model, an OpenFlamingo model, or a state dict of
            any of these (see `convert_open_clip_vision_state_dict` for the accepted key layouts).
        model_config (`Mapping[str, Any]`):
            The open_clip model config (see `clip_vision_config_from_open_clip`).
        quick_gelu (`bool`, *optional*):
            Overrides `model_config["quick_gelu"]`; pass `True` for the OpenAI weights.
        with_projection (`bool`, *optional*, defaults to `False`):
            Return a `CLIPVisionModelWithProjection` whose `image_embeds` equal open_clip's pooled (projected)
            output, instead of a `CLIPVisionModel`.
        prefix (`str`, *optional*):
            The prefix of the visual keys; `None` detects it.

    Returns:
        `CLIPVisionModel | CLIPVisionModelWithProjection`: In eval mode, in torch's default dtype (cast with `.to()`),
        loaded with `strict=True`.

    Raises:
        ValueError: If the config is unsupported or the weights do not match it.
    """
    if isinstance(visual_module_or_state_dict, nn.Module):
        state_dict = visual_module_or_state_dict.state_dict()
    elif isinstance(visual_module_or_state_dict, Mapping):
        state_dict = visual_module_or_state_dict
    else:
        raise TypeError(f"Expected an nn.Module or a state dict, got {type(visual_module_or_state_dict).__name__}.")
    config = clip_vision_config_from_open_clip(model_config, quick_gelu=quick_gelu)
    converted = convert_open_clip_vision_state_dict(
        state_dict, config, prefix=prefix, include_projection=with_projection
    )
    model_class = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    model = model_class(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def open_clip_image_processor(
    image_size: int,
    *,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> FlamingoImageProcessor:
    """
    Builds an image processor reproducing open_clip's evaluation transform
    (`open_clip.image_transform(image_size, is_train=False)`, the default `resize_mode="shortest"`): resize the
    shortest side to `image_size` with PIL's bicubic filter (antialiased), center crop `image_size` x `image_size`
    (torchvision's rounding), convert to RGB, scale to [0, 1] and normalise with `mean` / `std`.

    The result is a [`FlamingoImageProcessor`] (transformers' PIL-backend CLIP processor with torchvision's crop
    rounding): bit-identical to open_clip on RGB and grayscale PIL images. Images with an alpha channel differ
    (open_clip resizes RGBA and then drops alpha; transformers composites onto white first); call
    `image.convert("RGB")` before either to get identical results. transformers' default torchvision backend
    (`CLIPImageProcessor`) resizes uint8 tensors with its own bicubic kernel and differs by one 8-bit level (0.015)
    on most images and by up to 0.6 on noise, so it is not used.

    Args:
        image_size (`int`):
            The side of the square model input (224 for ViT-L-14).
        mean (`Sequence[float]`, *optional*, defaults to `OPENAI_CLIP_MEAN`):
            Per-channel normalisation mean (open_clip's pretrained tag may use other statistics).
        std (`Sequence[float]`, *optional*, defaults to `OPENAI_CLIP_STD`):
            Per-channel normalisation standard deviation.

    Returns:
        [`FlamingoImageProcessor`]: Producing `pixel_values` of shape `(batch, 3, image_size, image_size)`.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"`image_size` must be a positive int, got {image_size!r}.")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"`mean` and `std` must have 3 values, got {list(mean)} and {list(std)}.")
    return FlamingoImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(m) for m in mean],
        image_std=[float(s) for s in std],
    )
