"""MosaicGPT model configuration."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

_ATTN_IMPLS = ("torch", "flash", "triton")


class MosaicGPTConfig(PretrainedConfig):
    r"""
    Configuration of a [`MosaicGPTModel`] / [`MosaicGPTForCausalLM`]: MosaicML's pre-MPT "MosaicGPT" decoder (the
    `model_type: "mosaic_gpt"` remote code of `mosaicml/mpt-1b-redpajama-200b`, the language model of OpenFlamingo-3B).

    The argument names are the ones of the remote code's `config.json`, so such a file loads as is. The defaults
    describe `mpt-1b-redpajama-200b`. Arguments that only configured the remote code's initialisation or kernels are
    stored (so that the config round-trips) and otherwise ignored.

    Args:
        d_model (`int`, *optional*, defaults to 2048):
            Width of the residual stream.
        n_heads (`int`, *optional*, defaults to 16):
            Number of attention heads; must divide `d_model`.
        n_layers (`int`, *optional*, defaults to 24):
            Number of decoder blocks.
        mlp_ratio (`int`, *optional*, defaults to 4):
            Width of the MLP hidden layer as a multiple of `d_model`.
        max_seq_len (`int`, *optional*, defaults to 2048):
            Maximum sequence length; only enforced with learned position embeddings (`alibi=False`).
        vocab_size (`int`, *optional*, defaults to 50432):
            Number of rows of the (tied) token embedding.
        attn_pdrop (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities.
        resid_pdrop (`float`, *optional*, defaults to 0.0):
            Dropout on the attention and MLP outputs before they are added to the residual stream.
        emb_pdrop (`float`, *optional*, defaults to 0.0):
            Dropout on the embeddings.
        attn_impl (`str`, *optional*, defaults to `"torch"`):
            The remote code's attention kernel, one of `"torch"`, `"flash"`, `"triton"`. Accepted and ignored: this
            implementation dispatches on `attn_implementation` (`"sdpa"` or `"eager"`).
        attn_qk_ln (`bool`, *optional*, defaults to `True`):
            Whether to apply LayerNorms (`q_ln`, `k_ln`) over the full `d_model`-wide queries and keys.
        attn_clip_qkv (`float`, *optional*):
            If set, the fused query/key/value projection output is clamped to `[-attn_clip_qkv, attn_clip_qkv]`.
        softmax_scale (`float`, *optional*):
            Attention logit scale; defaults to `1 / sqrt(d_model / n_heads)`.
        prefix_lm (`bool`, *optional*, defaults to `False`):
            Prefix-LM attention. Not supported: must be `False`.
        attn_uses_sequence_id (`bool`, *optional*, defaults to `False`):
            Attention restricted to packed sub-sequences. Not supported: must be `False`.
        alibi (`bool`, *optional*, defaults to `True`):
            Whether positions are encoded by ALiBi attention biases. If `False`, a learned position embedding
            (`transformer.wpe`) of `max_seq_len` rows is added to the token embeddings instead.
        alibi_bias_max (`int`, *optional*, defaults to 8):
            The ALiBi slope of head `h` (1-based) is `2 ** (-h * alibi_bias_max / n_heads)`.
        init_device (`str`, *optional*, defaults to `"cpu"`):
            Stored, ignored.
        logit_scale (`float` or `str`, *optional*):
            If set, the logits are multiplied by it; `"inv_sqrt_d_model"` means `1 / sqrt(d_model)`.
        no_bias (`bool`, *optional*, defaults to `True`):
            If `True`, no Linear layer and no LayerNorm has a bias (the remote code removes every `bias` parameter).
        verbose (`int`, *optional*, defaults to 0):
            Stored, ignored.
        embedding_fraction (`float`, *optional*, defaults to 1.0):
            Fraction of the gradient that flows into the embeddings (GLM-130B's embedding gradient shrink); the
            forward value is unchanged. Must be in `(0, 1]`.
        low_precision_layernorm (`bool`, *optional*, defaults to `True`):
            If `True`, under autocast the LayerNorms run in the autocast dtype (input, weight and bias cast down) as
            in the remote code's `LPLayerNorm`; otherwise (and always outside autocast) they are plain LayerNorms.
        param_init_fn (`str`, *optional*, defaults to `"kaiming_normal_"`):
            Stored, ignored: parameters are initialised with a normal distribution of standard deviation `init_std`.
        init_std (`float`, *optional*, defaults to 0.02):
            Standard deviation of the initialisation of Linear and Embedding weights.
        emb_init_std (`float`, *optional*):
            Stored, ignored.
        emb_init_uniform_lim (`float` or `list[float]`, *optional*):
            Stored, ignored.
        init_div_is_residual (`bool`, `float` or `str`, *optional*, defaults to `True`):
            Stored, ignored.
        init_gain (`float`, *optional*, defaults to 0):
            Stored, ignored.
        fan_mode (`str`, *optional*, defaults to `"fan_in"`):
            Stored, ignored.
        init_nonlinearity (`str`, *optional*, defaults to `"relu"`):
            Stored, ignored.
        tokenizer_name (`str`, *optional*):
            Name of the tokenizer the model was trained with; stored, ignored.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether the model returns its key/value cache.
        kwargs:
            Passed to [`PretrainedConfig`]; unknown keys (e.g. `auto_map`) are stored as attributes. The output
            projection is always tied to the token embedding, so `tie_word_embeddings=False` is refused.

    Example:

    ```python
    >>> from hf_flamingo import MosaicGPTConfig, MosaicGPTForCausalLM

    >>> config = MosaicGPTConfig(d_model=256, n_heads=4, n_layers=2, vocab_size=1000)
    >>> model = MosaicGPTForCausalLM(config)
    ```
    """

    model_type = "mosaic_gpt"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_seq_len",
    }
    # Output keys `Trainer` leaves out of predictions: the cache, under its name before and after transformers 5.24.
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        d_model: int = 2048,
        n_heads: int = 16,
        n_layers: int = 24,
        mlp_ratio: int = 4,
        max_seq_len: int = 2048,
        vocab_size: int = 50432,
        attn_pdrop: float = 0.0,
        resid_pdrop: float = 0.0,
        emb_pdrop: float = 0.0,
        attn_impl: str = "torch",
        attn_qk_ln: bool = True,
        attn_clip_qkv: float | None = None,
        softmax_scale: float | None = None,
        prefix_lm: bool = False,
        attn_uses_sequence_id: bool = False,
        alibi: bool = True,
        alibi_bias_max: int = 8,
        init_device: str = "cpu",
        logit_scale: float | str | None = None,
        no_bias: bool = True,
        verbose: int = 0,
        embedding_fraction: float = 1.0,
        low_precision_layernorm: bool = True,
        param_init_fn: str = "kaiming_normal_",
        init_std: float = 0.02,
        emb_init_std: float | None = None,
        emb_init_uniform_lim: float | list[float] | None = None,
        init_div_is_residual: bool | float | str = True,
        init_gain: float = 0,
        fan_mode: str = "fan_in",
        init_nonlinearity: str = "relu",
        tokenizer_name: str | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ):
        if not kwargs.pop("tie_word_embeddings", True):
            raise ValueError(
                "MosaicGPT always uses the token embedding `transformer.wte` as its output projection; "
                "`tie_word_embeddings=False` is not supported."
            )
        if n_heads < 1 or d_model % n_heads != 0:
            raise ValueError(f"`d_model` ({d_model}) must be divisible by `n_heads` ({n_heads}).")
        if prefix_lm:
            raise NotImplementedError("MosaicGPT with `prefix_lm=True` (prefix-LM attention) is not supported.")
        if attn_uses_sequence_id:
            raise NotImplementedError(
                "MosaicGPT with `attn_uses_sequence_id=True` (attention within packed sequences) is not supported."
            )
        if attn_impl not in _ATTN_IMPLS:
            raise ValueError(f"`attn_impl` must be one of {_ATTN_IMPLS}, got {attn_impl!r}.")
        for name, probability in (("attn_pdrop", attn_pdrop), ("resid_pdrop", resid_pdrop), ("emb_pdrop", emb_pdrop)):
            if not 0 <= probability <= 1:
                raise ValueError(f"`{name}` is a probability and must be in [0, 1], got {probability}.")
        if not 0 < embedding_fraction <= 1:
            raise ValueError(f"`embedding_fraction` must be in (0, 1], got {embedding_fraction}.")
        if isinstance(logit_scale, str) and logit_scale != "inv_sqrt_d_model":
            raise ValueError(f"`logit_scale` must be a number, None or 'inv_sqrt_d_model', got {logit_scale!r}.")

        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.attn_pdrop = attn_pdrop
        self.resid_pdrop = resid_pdrop
        self.emb_pdrop = emb_pdrop
        self.attn_impl = attn_impl
        self.attn_qk_ln = attn_qk_ln
        self.attn_clip_qkv = attn_clip_qkv
        self.softmax_scale = softmax_scale
        self.prefix_lm = prefix_lm
        self.attn_uses_sequence_id = attn_uses_sequence_id
        self.alibi = alibi
        self.alibi_bias_max = alibi_bias_max
        self.init_device = init_device
        self.logit_scale = logit_scale
        self.no_bias = no_bias
        self.verbose = verbose
        self.embedding_fraction = embedding_fraction
        self.low_precision_layernorm = low_precision_layernorm
        self.param_init_fn = param_init_fn
        self.init_std = init_std
        self.emb_init_std = emb_init_std
        self.emb_init_uniform_lim = emb_init_uniform_lim
        self.init_div_is_residual = init_div_is_residual
        self.init_gain = init_gain
        self.fan_mode = fan_mode
        self.init_nonlinearity = init_nonlinearity
        self.tokenizer_name = tokenizer_name
        self.use_cache = use_cache
        self.tie_word_embeddings = True
        super().__init__(**kwargs)
