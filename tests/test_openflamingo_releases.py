"""The five OpenFlamingo v2 releases: their real key sets and shapes (built on the meta device) convert completely.

Each checkpoint is reproduced by building the real OpenFlamingo 2.0.1 model — open_clip ViT-L-14 and the release's
language-model architecture — on the meta device, then applying the release's save path (DDP: the training code's
trainable-parameter filter; FSDP: the whole language model). No weights are allocated.
"""

import pytest
import torch
from openflamingo_oracle import openflamingo_state_dict, patch_openflamingo_for_transformers5

from hf_flamingo.conversion.openflamingo import (
    CheckpointError,
    check_checkpoint_against_release,
    release_flamingo_config,
)
from hf_flamingo.conversion.releases import OPENFLAMINGO_RELEASES, get_release

# Sizes in the release table of the reference (perceiver 63,019,008 parameters; per-block 8D² + 1028D + 1,048,578).
PERCEIVER_PARAMETERS = 63_019_008


def _block_parameters(hidden_size: int) -> int:
    return 8 * hidden_size**2 + 1028 * hidden_size + 1_048_578


def _as_saved_by_transformers_4_28(state_dict: dict, num_layers: int, max_positions: int, rotary_dims: int) -> dict:
    """The 4B releases were saved with transformers 4.28, whose GPT-NeoX named its output projection `embed_out` and
    saved three buffers with every layer (causal mask, masking constant, RoPE frequencies: about 134 MB of bool
    masks for 32 layers), under the canonical and the `old_decoder_blocks` alias names alike."""
    state_dict = {
        ("lang_encoder.embed_out.weight" if k == "lang_encoder.lm_head.weight" else k): v
        for k, v in state_dict.items()
    }
    for i in range(num_layers):
        for prefix in (f"lang_encoder.gpt_neox.layers.{i}.decoder_layer.", f"lang_encoder.old_decoder_blocks.{i}."):
            state_dict[prefix + "attention.bias"] = torch.empty(
                1, 1, max_positions, max_positions, dtype=torch.bool, device="meta"
            )
            state_dict[prefix + "attention.masked_bias"] = torch.empty((), device="meta")
            state_dict[prefix + "attention.rotary_emb.inv_freq"] = torch.empty(rotary_dims // 2, device="meta")
    return state_dict


def build_release_checkpoint(release) -> dict[str, torch.Tensor]:
    """The key set and shapes of a release's `checkpoint.pt`, from the real OpenFlamingo model on the meta device."""
    import open_clip
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from transformers import AutoModelForCausalLM

    patch_openflamingo_for_transformers5()
    with torch.device("meta"):
        clip_model = open_clip.create_model("ViT-L-14", pretrained=None, device="meta")
        clip_model.visual.output_tokens = True
        language_model = AutoModelForCausalLM.from_config(release.text_config())
        layers_attr = {"gpt_neox": "gpt_neox.layers"}.get(language_model.config.model_type, "transformer.blocks")
        extend_instance(language_model, FlamingoLMMixin)
        language_model.set_decoder_layers_attr_name(layers_attr)
        language_model.resize_token_embeddings(release.vocab_size, mean_resizing=False)
        ids = release.special_token_ids
        flamingo = Flamingo(
            clip_model,
            language_model,
            ids["<|endofchunk|>"],
            ids["<image>"],
            vis_dim=1024,
            cross_attn_every_n_layers=release.cross_attn_every_n_layers,
        )
    flamingo.requires_grad_(False)
    flamingo.perceiver.requires_grad_(True)
    flamingo.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    flamingo.lang_encoder.get_input_embeddings().requires_grad_(True)
    state_dict = openflamingo_state_dict(flamingo, release.checkpoint_layout)
    if release.checkpoint_layout == "full_language_model":
        config = release.text_config()
        state_dict = _as_saved_by_transformers_4_28(
            state_dict,
            config.num_hidden_layers,
            config.max_position_embeddings,
            int(config.hidden_size // config.num_attention_heads * config.rope_parameters["partial_rotary_factor"]),
        )
    return state_dict


@pytest.fixture(scope="module")
def release_checkpoints():
    return {name: build_release_checkpoint(release) for name, release in OPENFLAMINGO_RELEASES.items()}


@pytest.mark.parametrize("name", list(OPENFLAMINGO_RELEASES))
def test_release_key_set_converts_completely(name, release_checkpoints):
    release = OPENFLAMINGO_RELEASES[name]
    state_dict = release_checkpoints[name]
    report = check_checkpoint_against_release(state_dict, release)

    config = release_flamingo_config(release)
    hidden_size = config.text_hidden_size
    blocks = config.cross_attention_layer_indices()
    num_layers = config.num_text_layers
    assert blocks == [i for i in range(num_layers) if (i + 1) % release.cross_attn_every_n_layers == 0]
    assert report.cross_attn_every_n_layers == release.cross_attn_every_n_layers

    checkpoint_bridge = [k for k in state_dict if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k]
    assert sum(state_dict[k].numel() for k in checkpoint_bridge) == (
        PERCEIVER_PARAMETERS + len(blocks) * _block_parameters(hidden_size)
    )
    loaded = set(report.loaded_keys)
    bridge = {k for k in loaded if k.startswith(("perceiver.", "gated_cross_attn_layers."))}
    assert len(bridge) == len(checkpoint_bridge)
    assert {int(k.split(".")[1]) for k in bridge if k.startswith("gated_cross_attn_layers.")} == set(blocks)

    # Every checkpoint key was consumed: loaded, or dropped as a duplicate alias / obsolete buffer.
    assert len(loaded) + len(report.dropped_aliases) + len(report.dropped_buffers) == len(state_dict)
    # What the checkpoint leaves out is exactly the frozen backbones.
    assert all(k.startswith(("vision_model.", "language_model.")) for k in report.backbone_keys)
    assert any(k.startswith("vision_model.") for k in report.backbone_keys)
    language_model_loaded = {k for k in loaded if k.startswith("language_model.")}
    if release.checkpoint_layout == "trainable":
        # Input embeddings (tied with the output projection in MPT/MosaicGPT), nothing else of the LM.
        assert {k.split(".")[-2] for k in language_model_loaded} <= {"wte", "lm_head"}
        assert "language_model.transformer.wte.weight" in language_model_loaded
        assert not report.dropped_aliases and not report.dropped_buffers
    else:
        # The whole GPT-NeoX LM: nothing of it is left to the backbone; `embed_out` becomes `lm_head`.
        assert not any(k.startswith("language_model.") for k in report.backbone_keys)
        assert report.renamed_keys == {"embed_out.weight": "lm_head.weight"}
        assert len(report.dropped_buffers) == 3 * num_layers
        assert len(report.dropped_aliases) > 0  # old_decoder_blocks / gated_cross_attn_layers duplicates

    embedding_key = next(k for k in state_dict if k.endswith(("transformer.wte.weight", "gpt_neox.embed_in.weight")))
    assert tuple(state_dict[embedding_key].shape) == (release.vocab_size, hidden_size)
    assert config.text_config.vocab_size == 50280
    assert (config.media_token_id, config.eoc_token_id) == (50278, 50277)


@pytest.mark.parametrize(
    ("checkpoint_of", "checked_as", "message"),
    [
        ("OpenFlamingo-9B-vitl-mpt7b", "OpenFlamingo-3B-vitl-mpt1b", "but the language model has 24 layers"),
        ("OpenFlamingo-3B-vitl-mpt1b", "OpenFlamingo-9B-vitl-mpt7b", "not every n-th layer of a 32-layer"),
        ("OpenFlamingo-4B-vitl-rpj3b", "OpenFlamingo-3B-vitl-mpt1b", "belongs to a different language model"),
        ("OpenFlamingo-3B-vitl-mpt1b", "OpenFlamingo-4B-vitl-rpj3b", "no gated cross-attention weights"),
    ],
)
def test_checkpoint_of_another_release_is_refused(checkpoint_of, checked_as, message, release_checkpoints):
    with pytest.raises(CheckpointError, match=message):
        check_checkpoint_against_release(release_checkpoints[checkpoint_of], get_release(checked_as))


def test_langinstruct_variants_share_their_base_architecture(release_checkpoints):
    for base, variant in (
        ("OpenFlamingo-3B-vitl-mpt1b", "OpenFlamingo-3B-vitl-mpt1b-langinstruct"),
        ("OpenFlamingo-4B-vitl-rpj3b", "OpenFlamingo-4B-vitl-rpj3b-langinstruct"),
    ):
        base_shapes = {k: tuple(v.shape) for k, v in release_checkpoints[base].items()}
        assert base_shapes == {k: tuple(v.shape) for k, v in release_checkpoints[variant].items()}
        check_checkpoint_against_release(release_checkpoints[variant], get_release(base))


def test_truncated_release_checkpoint_is_refused(release_checkpoints):
    state_dict = dict(release_checkpoints["OpenFlamingo-3B-vitl-mpt1b"])
    del state_dict["lang_encoder.transformer.blocks.7.gated_cross_attn_layer.ff.3.weight"]
    with pytest.raises(CheckpointError, match=r"lacks 1 Perceiver Resampler / cross-attention weights"):
        check_checkpoint_against_release(state_dict, get_release("OpenFlamingo-3B-vitl-mpt1b"))


def test_unknown_release_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="OpenFlamingo-9B-vitl-mpt7b"):
        get_release("OpenFlamingo-80B")
    assert get_release("openflamingo/openflamingo-9b-VITL-mpt7b").name == "OpenFlamingo-9B-vitl-mpt7b"
