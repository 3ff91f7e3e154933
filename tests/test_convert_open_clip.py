"""open_clip ViT -> transformers CLIP vision conversion, and the open_clip-equivalent image processor.

The reference is a tiny random open_clip ViT built offline (open_clip is a test-only dependency).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

from hf_flamingo.conversion.open_clip import (
    clip_vision_config_from_open_clip,
    convert_open_clip_vision_state_dict,
    open_clip_image_processor,
    open_clip_vision_to_hf,
)
from hf_flamingo.image_processing_flamingo import FlamingoImageProcessor

open_clip = pytest.importorskip("open_clip")

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = REPO_ROOT / "conversion" / "convert_open_clip_to_hf.py"

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
MODEL_NAMES = {"gelu": "HFFlamingo-Tiny-ViT", "quick_gelu": "HFFlamingo-Tiny-ViT-quickgelu"}
TOL = 1e-5  # fp32; measured max abs differences are below 1e-6


@pytest.fixture(scope="module")
def registered_configs(tmp_path_factory) -> dict[str, dict]:
    """Registers the tiny open_clip configs (GELU and QuickGELU) under `MODEL_NAMES`; returns them by activation."""
    config_dir = tmp_path_factory.mktemp("open_clip_configs")
    configs = {"gelu": TINY_CLIP_CFG, "quick_gelu": {**TINY_CLIP_CFG, "quick_gelu": True}}
    for act, config in configs.items():
        (config_dir / f"{MODEL_NAMES[act]}.json").write_text(json.dumps(config))
    open_clip.add_model_config(config_dir)
    return configs


def _build_open_clip(name: str, seed: int = 0):
    """A tiny random open_clip CLIP (eval mode, non-trivial LayerNorms) returning pre-`ln_post` tokens."""
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    model.visual.output_tokens = True
    model.visual.final_ln_after_pool = True
    return model.eval(), preprocess


@pytest.fixture(scope="module", params=["gelu", "quick_gelu"])
def tiny_clip(request, registered_configs):
    """(open_clip model, its val transform, its model config) for each activation."""
    name = MODEL_NAMES[request.param]
    model, preprocess = _build_open_clip(name)
    return model, preprocess, open_clip.get_model_config(name)


@pytest.fixture(scope="module")
def gelu_clip(registered_configs):
    model, preprocess = _build_open_clip(MODEL_NAMES["gelu"], seed=1)
    return model, preprocess, open_clip.get_model_config(MODEL_NAMES["gelu"])


def _pixels(seed: int = 0, batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- config ------------------------------------------------------------------------------------------------------------


def test_config_from_open_clip(registered_configs):
    config = clip_vision_config_from_open_clip(TINY_CLIP_CFG)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 2)
    assert (config.intermediate_size, config.patch_size, config.image_size, config.projection_dim) == (256, 8, 32, 32)
    assert (config.hidden_act, config.layer_norm_eps) == ("gelu", 1e-5)
    assert clip_vision_config_from_open_clip(registered_configs["quick_gelu"]).hidden_act == "quick_gelu"
    assert clip_vision_config_from_open_clip(registered_configs["quick_gelu"], quick_gelu=False).hidden_act == "gelu"
    assert clip_vision_config_from_open_clip(TINY_CLIP_CFG, quick_gelu=True).hidden_act == "quick_gelu"

    # open_clip defaults (ViT-L-14 gives only these four fields), equal pairs, eps and harmless fields.
    vit_l = clip_vision_config_from_open_clip(
        {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}}
    )
    assert (vit_l.num_attention_heads, vit_l.intermediate_size, vit_l.projection_dim) == (16, 4096, 768)
    extra = {"image_size": [32, 32], "patch_size": (8, 8), "mlp_ratio": 2.5, "norm_kwargs": {"eps": 1e-6}}
    harmless = {"patch_dropout": 0.5, "output_tokens": True, "final_ln_after_pool": True, "act_kwargs": {}}
    config = clip_vision_config_from_open_clip(
        {**TINY_CLIP_CFG, "vision_cfg": {**TINY_CLIP_CFG["vision_cfg"], **extra, **harmless}}
    )
    assert (config.image_size, config.patch_size, config.intermediate_size, config.layer_norm_eps) == (
        32,
        8,
        160,
        1e-6,
    )


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"attentional_pool": True}, "attentional_pool=True"),
        ({"ls_init_value": 1e-5}, "ls_init_value"),
        ({"timm_model_name": "vit_base_patch16_224"}, "timm_model_name"),
        ({"layers": [3, 4, 6, 3]}, "ModifiedResNet"),
        ({"no_ln_pre": True}, "no_ln_pre"),
        ({"pool_type": "avg"}, "pool_type='avg'"),
        ({"qk_norm": True}, "qk_norm"),
        ({"block_type": "custom"}, "block_type='custom'"),
        ({"act_kwargs": {"approximate": "tanh"}}, "act_kwargs"),
        ({"norm_kwargs": {"elementwise_affine": False}}, "norm_kwargs"),
        ({"image_size": [32, 48]}, "not square"),
        ({"some_future_field": 1}, r"Unknown open_clip vision_cfg field\(s\) \['some_future_field'\]"),
        ({"head_width": 48}, "not a multiple of head_width"),
    ],
)
def test_unsupported_config_raises(override, match):
    model_config = {**TINY_CLIP_CFG, "vision_cfg": {**TINY_CLIP_CFG["vision_cfg"], **override}}
    with pytest.raises(ValueError, match=match):
        clip_vision_config_from_open_clip(model_config)


def test_config_without_vision_cfg_raises():
    with pytest.raises(ValueError, match="'embed_dim' and 'vision_cfg'"):
        clip_vision_config_from_open_clip({"embed_dim": 32})


# --- numerical parity ----------------------------------------------------------------------------------------------


def test_tokens_and_image_embeds_match_open_clip(tiny_clip):
    model, _, model_config = tiny_clip
    pixels = _pixels()
    hf = open_clip_vision_to_hf(model, model_config, with_projection=True)
    assert isinstance(hf, CLIPVisionModelWithProjection)
    assert hf.config.hidden_act == ("quick_gelu" if model_config.get("quick_gelu") else "gelu")
    with torch.no_grad():
        pooled, tokens = model.visual(pixels)
        image_features = model.encode_image(pixels)[0]
        out = hf(pixel_values=pixels)
    assert tokens.shape == (2, 16, 64)
    torch.testing.assert_close(out.last_hidden_state[:, 1:], tokens, atol=TOL, rtol=0)
    torch.testing.assert_close(out.image_embeds, pooled, atol=TOL, rtol=0)
    torch.testing.assert_close(out.image_embeds, image_features, atol=TOL, rtol=0)


def test_pooler_output_is_open_clip_pooled_before_projection(tiny_clip):
    model, _, model_config = tiny_clip
    visual = copy.deepcopy(model.visual)
    visual.proj = None  # open_clip then returns ln_post(CLS) unprojected
    pixels = _pixels(1)
    hf = open_clip_vision_to_hf(model.visual, model_config)
    assert type(hf) is CLIPVisionModel
    with torch.no_grad():
        pooled, tokens = visual(pixels)
        out = hf(pixel_values=pixels)
    torch.testing.assert_close(out.last_hidden_state[:, 1:], tokens, atol=TOL, rtol=0)
    torch.testing.assert_close(out.pooler_output, pooled, atol=TOL, rtol=0)


def test_default_final_ln_after_pool_tokens_are_post_layernorm(gelu_clip):
    """open_clip >= 2.23's default (`final_ln_after_pool=False`) returns `ln_post(tokens)`."""
    model, _, model_config = gelu_clip
    visual = copy.deepcopy(model.visual)
    visual.final_ln_after_pool = False
    pixels = _pixels(2)
    hf = open_clip_vision_to_hf(visual, model_config)
    with torch.no_grad():
        _, tokens = visual(pixels)
        out = hf(pixel_values=pixels)
        post_ln_tokens = hf.post_layernorm(out.last_hidden_state[:, 1:])
    torch.testing.assert_close(post_ln_tokens, tokens, atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", ["whole_clip", "openflamingo", "bare_visual", "ddp_checkpoint"])
def test_state_dict_layouts(gelu_clip, layout):
    model, _, model_config = gelu_clip
    config = clip_vision_config_from_open_clip(model_config)
    visual_sd = model.visual.state_dict()
    if layout == "whole_clip":
        state_dict = model.state_dict()  # text tower keys are ignored
    elif layout == "openflamingo":  # Flamingo stores `clip_model.visual` as `vision_encoder`
        state_dict = {f"vision_encoder.{k}": v for k, v in visual_sd.items()}
        state_dict["perceiver.latents"] = torch.zeros(4, 64)
        state_dict["lang_encoder.transformer.wte.weight"] = torch.zeros(8, 16)
    elif layout == "bare_visual":
        state_dict = visual_sd
    else:
        state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}

    converted = convert_open_clip_vision_state_dict(state_dict, config)
    hf = CLIPVisionModel(config).eval()
    assert set(converted) == set(hf.state_dict())
    hf.load_state_dict(converted, strict=True)
    reference = convert_open_clip_vision_state_dict(visual_sd, config, prefix="")
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    pixels = _pixels(3)
    with torch.no_grad():
        _, tokens = model.visual(pixels)
        torch.testing.assert_close(hf(pixel_values=pixels).last_hidden_state[:, 1:], tokens, atol=TOL, rtol=0)


def test_projection_keys_and_explicit_prefix(gelu_clip):
    model, _, model_config = gelu_clip
    config = clip_vision_config_from_open_clip(model_config)
    state_dict = model.state_dict()
    converted = convert_open_clip_vision_state_dict(state_dict, config, prefix="visual", include_projection=True)
    assert set(converted) == set(CLIPVisionModelWithProjection(config).state_dict())
    assert torch.equal(converted["visual_projection.weight"], model.visual.proj.detach().t())
    # The source is copied, not aliased, and the q/k/v split follows in_proj's row order.
    in_proj = state_dict["visual.transformer.resblocks.1.attn.in_proj_weight"]
    q, k, v = (converted[f"vision_model.encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q, k, v]), in_proj) and q.data_ptr() != in_proj.data_ptr()


# --- bad weights ---------------------------------------------------------------------------------------------------


def _corrupted(model, edit):
    state_dict = dict(model.state_dict())
    edit(state_dict)
    return state_dict


@pytest.mark.parametrize(
    ("edit", "kwargs", "match"),
    [
        (
            lambda sd: sd.pop("visual.transformer.resblocks.1.mlp.c_fc.bias"),
            {},
            r"Missing keys: visual\.transformer\.resblocks\.1\.mlp\.c_fc\.bias",
        ),
        (
            lambda sd: sd.__setitem__("visual.transformer.resblocks.2.ln_1.weight", torch.ones(64)),
            {},
            r"Unexpected keys: visual\.transformer\.resblocks\.2\.ln_1\.weight",
        ),
        (
            lambda sd: sd.__setitem__("visual.positional_embedding", torch.zeros(50, 64)),
            {},
            r"Wrong shapes: visual\.positional_embedding: expected \(17, 64\), got \(50, 64\)",
        ),
        (
            lambda sd: sd.__setitem__("visual.proj", torch.zeros(64, 16)),
            {},
            r"visual\.proj: expected \(64, 32\), got \(64, 16\)",
        ),
        (lambda sd: sd.pop("visual.proj"), {"include_projection": True}, r"Missing keys: visual\.proj"),
        (lambda sd: sd.pop("visual.class_embedding"), {}, "Could not find an open_clip VisionTransformer"),
        (
            lambda sd: sd.update(
                {f"other.{k[len('visual.') :]}": v for k, v in list(sd.items()) if k.startswith("visual.")}
            ),
            {},
            r"several open_clip vision towers \['other\.', 'visual\.'\]",
        ),
    ],
    ids=["missing", "unexpected", "shape", "proj_shape", "missing_proj", "no_tower", "ambiguous"],
)
def test_bad_state_dict_raises(gelu_clip, edit, kwargs, match):
    model, _, model_config = gelu_clip
    config = clip_vision_config_from_open_clip(model_config)
    with pytest.raises(ValueError, match=match):
        convert_open_clip_vision_state_dict(_corrupted(model, edit), config, **kwargs)


def test_proj_is_optional_without_projection(gelu_clip):
    model, _, model_config = gelu_clip
    config = clip_vision_config_from_open_clip(model_config)
    state_dict = _corrupted(model, lambda sd: sd.pop("visual.proj"))
    assert set(convert_open_clip_vision_state_dict(state_dict, config)) == set(CLIPVisionModel(config).state_dict())


def test_config_and_weights_disagree_raises(gelu_clip):
    model, _, model_config = gelu_clip
    wider = {**model_config, "vision_cfg": {**model_config["vision_cfg"], "layers": 3}}
    with pytest.raises(ValueError, match=r"Missing keys: visual\.transformer\.resblocks\.2\."):
        open_clip_vision_to_hf(model, wider)


# --- image processor -------------------------------------------------------------------------------------------------


def _test_images(width: int, height: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(width * 1000 + height)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = np.stack(
        [xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) * 255 / max(width + height - 2, 1)],
        axis=-1,
    )
    return {
        "noise": Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)),
        "gradient": Image.fromarray(gradient.round().astype(np.uint8)),
        "gray": Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L"),
    }


def _crop_offset_differs(width: int, height: int, size: int) -> bool:
    """Whether torchvision's round-half-even crop start differs from a floor division (transformers' CLIP crop)."""
    resized_long = int(size * max(width, height) / min(width, height))
    return (resized_long - size) % 4 == 3


# The last two sizes are ones where a floor-division crop would start one pixel early.
IMAGE_SIZES = [(640, 480), (333, 500), (224, 224), (37, 91), (513, 385), (91, 37), (299, 224), (225, 500)]


@pytest.mark.parametrize("size", [32, 224])
def test_image_processor_matches_open_clip_val_transform(gelu_clip, size):
    if size == 32:
        reference = gelu_clip[1]  # the val transform returned by create_model_and_transforms
    else:
        reference = open_clip.image_transform(224, is_train=False)
    processor = open_clip_image_processor(size)
    assert isinstance(processor, FlamingoImageProcessor)
    assert any(_crop_offset_differs(w, h, size) for w, h in IMAGE_SIZES)
    for width, height in IMAGE_SIZES:
        for kind, image in _test_images(width, height).items():
            expected = reference(image)
            got = processor(images=image, return_tensors="pt")["pixel_values"][0]
            assert got.shape == expected.shape == (3, size, size)
            diff = (got - expected).abs().max().item()
            assert diff <= 1e-6, f"{width}x{height} {kind} at {size}: max abs diff {diff}"  # measured: 0.0


@pytest.mark.parametrize("backend", [None, "pil", "torchvision"])
def test_saved_image_processor_reloads_as_itself(tmp_path, backend):
    from transformers import AutoImageProcessor

    open_clip_image_processor(32).save_pretrained(tmp_path)
    kwargs = {} if backend is None else {"backend": backend}
    reloaded = AutoImageProcessor.from_pretrained(tmp_path, **kwargs)
    assert type(reloaded) is FlamingoImageProcessor
    image = _test_images(299, 224)["noise"]
    reference = open_clip.image_transform(32, is_train=False)(image)
    assert torch.equal(reloaded(images=image, return_tensors="pt")["pixel_values"][0], reference)


def test_image_processor_custom_statistics_and_validation():
    processor = open_clip_image_processor(64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert list(processor.image_mean) == [0.5, 0.5, 0.5] and processor.crop_size.height == 64
    reference = open_clip.image_transform(64, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    image = _test_images(100, 80)["noise"]
    torch.testing.assert_close(processor(images=image, return_tensors="pt")["pixel_values"][0], reference(image))
    with pytest.raises(ValueError, match="positive int"):
        open_clip_image_processor(0)


# --- command line --------------------------------------------------------------------------------------------------


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CLI.relative_to(REPO_ROOT)), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        timeout=300,
    )


def _cli_main(argv: list[str]) -> int:
    """Runs the CLI's `main` in this process (the slow part of a subprocess is importing transformers)."""
    spec = importlib.util.spec_from_file_location("convert_open_clip_to_hf", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_cli_help():
    result = _run_cli("--help")
    assert result.returncode == 0, result.stderr
    for option in (
        "--checkpoint",
        "--model-config",
        "--quick-gelu",
        "--with-projection",
        "--output-dir",
        "--overwrite",
    ):
        assert option in result.stdout


def test_cli_converts_and_refuses_existing_dir(tmp_path, registered_configs):
    model, _ = _build_open_clip(MODEL_NAMES["quick_gelu"], seed=2)
    checkpoint, config_path = tmp_path / "open_clip.pt", tmp_path / "tiny-vit.json"
    torch.save(model.state_dict(), checkpoint)
    config_path.write_text(json.dumps(registered_configs["quick_gelu"]))
    output_dir = tmp_path / "converted"
    common = ["--checkpoint", str(checkpoint), "--model-config", str(config_path), "--output-dir", str(output_dir)]

    result = _run_cli(*common)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "open_clip.pt", "tiny-vit.json"]
    hf = CLIPVisionModel.from_pretrained(output_dir).eval()
    assert hf.config.hidden_act == "quick_gelu"
    pixels = _pixels(4)
    with torch.no_grad():
        pooled, tokens = model.visual(pixels)
        torch.testing.assert_close(hf(pixel_values=pixels).last_hidden_state[:, 1:], tokens, atol=TOL, rtol=0)
    processor = FlamingoImageProcessor.from_pretrained(output_dir)
    saved = {k: v for k, v in processor.to_dict().items() if k != "auto_map"}  # the remote-code pointer
    assert saved == open_clip_image_processor(32).to_dict()

    # An existing directory is refused and left untouched.
    marker_files = sorted(p.name for p in output_dir.iterdir())
    config_before = (output_dir / "config.json").read_bytes()
    result = _run_cli(*common, "--with-projection")
    assert result.returncode != 0
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert sorted(p.name for p in output_dir.iterdir()) == marker_files
    assert (output_dir / "config.json").read_bytes() == config_before

    # --overwrite replaces it (here with the projection head, and the config given by its open_clip name);
    # in-process to keep the test fast.
    by_name = ["--checkpoint", str(checkpoint), "--model-config", MODEL_NAMES["quick_gelu"]]
    assert _cli_main([*by_name, "--output-dir", str(output_dir), "--with-projection", "--overwrite"]) == 0
    hf_proj = CLIPVisionModelWithProjection.from_pretrained(output_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_proj(pixel_values=pixels).image_embeds, pooled, atol=TOL, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "open_clip.pt", "tiny-vit.json"]


def test_cli_reports_mismatched_weights(tmp_path, gelu_clip, capsys):
    model, _, model_config = gelu_clip
    checkpoint, config_path = tmp_path / "open_clip.safetensors", tmp_path / "deeper.json"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.visual.state_dict().items()}, checkpoint)
    config_path.write_text(json.dumps({**model_config, "vision_cfg": {**model_config["vision_cfg"], "layers": 3}}))
    argv = ["--checkpoint", str(checkpoint), "--model-config", str(config_path), "--output-dir", str(tmp_path / "out")]
    assert _cli_main(argv) == 1
    assert "Missing keys: transformer.resblocks.2." in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deeper.json", "open_clip.safetensors"]
