"""Test helpers: MosaicGPT (`model_type: "mosaic_gpt"`) state-dict conversions (the Hub remote code's keys, and
transformers' native MPT), which the tests use to check the native MosaicGPT against both.

- `mosaic_gpt_state_dict_from_remote_code`: a state dict of the Hub remote code (e.g.
  `anas-awadalla/mpt-1b-redpajama-200b`) for [`MosaicGPTForCausalLM`]. The parameter names are the same, so this only
  validates: the remote code saves no buffers (its ALiBi bias is a plain attribute) and no `lm_head` (the output
  projection is `transformer.wte`).
- `mosaic_gpt_to_mpt`: a MosaicGPT without q/k LayerNorm as transformers' native [`MptForCausalLM`].
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import MptConfig
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from hf_flamingo.configuration_mosaic_gpt import MosaicGPTConfig
from hf_flamingo.conversion._checks import format_keys, key_set_problems
from hf_flamingo.modeling_mosaic_gpt import MosaicGPTForCausalLM, alibi_slopes

_EMBEDDING = "transformer.wte.weight"
_LM_HEAD = "lm_head.weight"
_BLOCK_KEY = re.compile(r"^transformer\.blocks\.(\d+)\.")
_MPT_NAMES = (
    (re.compile(r"^transformer\.blocks\.(\d+)\.ln_1\."), r"transformer.blocks.\1.norm_1."),
    (re.compile(r"^transformer\.blocks\.(\d+)\.ln_2\."), r"transformer.blocks.\1.norm_2."),
    (re.compile(r"^transformer\.blocks\.(\d+)\.mlp\.mlp_up\."), r"transformer.blocks.\1.ffn.up_proj."),
    (re.compile(r"^transformer\.blocks\.(\d+)\.mlp\.mlp_down\."), r"transformer.blocks.\1.ffn.down_proj."),
    (re.compile(r"^transformer\.ln_f\."), "transformer.norm_f."),
)


def _infer_config(state_dict: Mapping[str, torch.Tensor]) -> MosaicGPTConfig:
    """The structure (not the head count) of the MosaicGPT a remote-layout state dict describes."""
    if _EMBEDDING not in state_dict:
        raise ValueError(f"Not a MosaicGPT state dict: there is no `{_EMBEDDING}`.")
    vocab_size, d_model = state_dict[_EMBEDDING].shape
    layers = {int(match.group(1)) for key in state_dict if (match := _BLOCK_KEY.match(key))}
    mlp_up = state_dict.get("transformer.blocks.0.mlp.mlp_up.weight")
    wpe = state_dict.get("transformer.wpe.weight")
    return MosaicGPTConfig(
        d_model=d_model,
        n_heads=1,
        n_layers=max(layers) + 1 if layers else 0,
        mlp_ratio=mlp_up.shape[0] // d_model if mlp_up is not None else 4,
        vocab_size=vocab_size,
        max_seq_len=wpe.shape[0] if wpe is not None else 2048,
        alibi=wpe is None,
        attn_qk_ln=any(key.endswith(".attn.q_ln.weight") for key in state_dict),
        no_bias=not any(key.endswith(".bias") for key in state_dict),
    )


def _expected_shapes(config: MosaicGPTConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = MosaicGPTForCausalLM(config)
    return {key: tensor.shape for key, tensor in model.state_dict().items() if key != _LM_HEAD}


def mosaic_gpt_state_dict_from_remote_code(
    state_dict: Mapping[str, torch.Tensor], config: MosaicGPTConfig | None = None
) -> dict[str, torch.Tensor]:
    """Validates a state dict of the MosaicGPT remote code and returns it for [`MosaicGPTForCausalLM`].

    The names are the same in both layouts (`transformer.wte`, `transformer.blocks.{i}.{ln_1, attn.Wqkv, attn.q_ln,
    attn.k_ln, attn.out_proj, ln_2, mlp.mlp_up, mlp.mlp_down}`, `transformer.ln_f`, optional `transformer.wpe`; a
    `.bias` next to every weight unless `no_bias`). An `lm_head.weight` equal to `transformer.wte.weight` (a tied copy)
    is dropped.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): The remote-code state dict (e.g. of `pytorch_model.bin`).
        config ([`MosaicGPTConfig`], *optional*): The model's config. Without it, the structure (number of layers,
            q/k LayerNorm, biases, learned positions) is inferred from the keys, and only consistency is checked.

    Returns:
        `dict[str, torch.Tensor]`: The state dict, loadable with `MosaicGPTForCausalLM.load_state_dict(..., strict=False)`
        (only the tied `lm_head.weight` is absent) or savable as `model.safetensors` for `from_pretrained`.

    Raises:
        ValueError: If keys are missing or unexpected, shapes do not match `config`, or `lm_head.weight` is not tied.
    """
    state_dict = dict(state_dict)
    if _LM_HEAD in state_dict:
        lm_head = state_dict.pop(_LM_HEAD)
        embedding = state_dict.get(_EMBEDDING)
        if embedding is None or lm_head.shape != embedding.shape or not torch.equal(lm_head, embedding):
            raise ValueError(
                f"`{_LM_HEAD}` differs from `{_EMBEDDING}`: MosaicGPT's output projection is its token embedding."
            )

    expected = _expected_shapes(config if config is not None else _infer_config(state_dict))
    problems = key_set_problems({key: value.shape for key, value in state_dict.items()}, expected)
    if problems:
        raise ValueError("The state dict does not fit the MosaicGPT layout. " + ". ".join(problems) + ".")
    return {key: state_dict[key] for key in expected}


def mosaic_gpt_to_mpt(
    config: MosaicGPTConfig, state_dict: Mapping[str, torch.Tensor]
) -> tuple[MptConfig, dict[str, torch.Tensor]]:
    """Maps a MosaicGPT onto transformers' native [`MptForCausalLM`], which then computes the same function.

    Renames `ln_1`/`ln_2` to `norm_1`/`norm_2`, `mlp.mlp_up`/`mlp.mlp_down` to `ffn.up_proj`/`ffn.down_proj` and
    `transformer.ln_f` to `transformer.norm_f` (`Wqkv`, `out_proj` and `wte` keep their names), and adds
    `lm_head.weight` as the same tensor as `transformer.wte.weight`.

    transformers' MPT has no biases at all (its LayerNorms have `bias=None` whatever `no_bias` says), always uses
    ALiBi with MPT's slopes, hard-codes an MLP ratio of 4, has no q/k LayerNorm, ignores `logit_scale`,
    `embedding_fraction` and `emb_pdrop`, and applies `attn_pdrop` to the residual branches too. Models that differ in
    any of these ways are refused, except that all-zero biases of a `no_bias=False` model are dropped. The one
    remaining difference: under autocast MPT's LayerNorms run in float32, MosaicGPT's `low_precision_layernorm` ones in
    the autocast dtype.

    Args:
        config ([`MosaicGPTConfig`]): The MosaicGPT config.
        state_dict (`Mapping[str, torch.Tensor]`): A [`MosaicGPTForCausalLM`] (or remote-code) state dict.

    Returns:
        `tuple[MptConfig, dict[str, torch.Tensor]]`: The MPT config and a state dict for
        `MptForCausalLM.load_state_dict` (strict).

    Raises:
        ValueError: If the model cannot be represented by `MptForCausalLM`, or the state dict does not fit `config`.
    """
    state_dict = mosaic_gpt_state_dict_from_remote_code(state_dict, config)

    problems = []
    if config.attn_qk_ln:
        problems.append("`attn_qk_ln=True` (MPT has no q/k LayerNorm)")
    if not config.alibi:
        problems.append("`alibi=False` (transformers' MPT always uses ALiBi)")
    elif not torch.allclose(
        alibi_slopes(config.n_heads, config.alibi_bias_max),
        -build_mpt_alibi_tensor(config.n_heads, 2, config.alibi_bias_max)[:, 0, 0],
        rtol=1e-6,
        atol=0,
    ):
        problems.append(
            f"`n_heads={config.n_heads}`: for a head count that is not a power of two, MPT's ALiBi slopes (an "
            "interleaving of the next power of two's slopes) differ from MosaicGPT's `2 ** (-h * alibi_bias_max / "
            "n_heads)`"
        )
    if float(config.alibi_bias_max) != int(config.alibi_bias_max):
        problems.append(f"`alibi_bias_max={config.alibi_bias_max}` (MPT's is an integer)")
    if config.mlp_ratio != 4:
        problems.append(f"`mlp_ratio={config.mlp_ratio}` (MPT's MLP ratio is 4)")
    if config.logit_scale is not None:
        problems.append(f"`logit_scale={config.logit_scale!r}` (MPT does not scale logits)")
    if config.embedding_fraction != 1:
        problems.append(f"`embedding_fraction={config.embedding_fraction}` (MPT does not shrink embedding gradients)")
    dropouts = {name: getattr(config, name) for name in ("attn_pdrop", "resid_pdrop", "emb_pdrop")}
    if any(dropouts.values()):
        problems.append(f"dropout {dropouts} (MPT places its dropouts differently; set them to 0)")
    nonzero_biases = [key for key, tensor in state_dict.items() if key.endswith(".bias") and tensor.any()]
    if nonzero_biases:
        problems.append(f"non-zero biases (MPT has none): {format_keys(nonzero_biases)}")
    if problems:
        raise ValueError("This MosaicGPT cannot be converted to transformers' MptForCausalLM: " + "; ".join(problems))

    mpt_config = MptConfig(
        d_model=config.d_model,
        n_heads=config.n_heads,
        n_layers=config.n_layers,
        expansion_ratio=4,
        max_seq_len=config.max_seq_len,
        vocab_size=config.vocab_size,
        resid_pdrop=0.0,
        emb_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        learned_pos_emb=False,
        attn_config={
            "attn_type": "multihead_attention",
            "attn_pdrop": 0,
            "attn_impl": "torch",
            "clip_qkv": float(config.attn_clip_qkv) if config.attn_clip_qkv else None,
            "softmax_scale": float(config.softmax_scale) if config.softmax_scale is not None else None,
            "qk_ln": False,
            "alibi": True,
            "alibi_bias_max": int(config.alibi_bias_max),
        },
        logit_scale=None,
        no_bias=True,
        embedding_fraction=1.0,
        norm_type="low_precision_layernorm" if config.low_precision_layernorm else "layernorm",
        use_cache=config.use_cache,
        initializer_range=config.init_std,
        tie_word_embeddings=True,
        pad_token_id=getattr(config, "pad_token_id", None),
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
    )

    mpt_state_dict = {}
    for key, tensor in state_dict.items():
        if key.endswith(".bias"):
            continue
        for pattern, replacement in _MPT_NAMES:
            key = pattern.sub(replacement, key)
        mpt_state_dict[key] = tensor
    mpt_state_dict[_LM_HEAD] = mpt_state_dict[_EMBEDDING]
    return mpt_config, mpt_state_dict
