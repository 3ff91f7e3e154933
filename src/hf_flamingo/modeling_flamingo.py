"""PyTorch Flamingo model: a vision encoder, a Perceiver Resampler and tanh-gated cross-attention attached to an
unmodified causal language model through forward pre-hooks (OpenFlamingo v2 semantics)."""

from __future__ import annotations

import importlib
import inspect
import math
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .cache_compat import CACHE_NAME, LEGACY_CACHE_NAME, cache_argument_name, cache_from_output, merge_cache_arguments
from .configuration_flamingo import FlamingoConfig
from .gated_cross_attention import FlamingoGatedCrossAttentionBlock
from .generation_flamingo import FlamingoGenerationMixin, with_flamingo_stop_tokens
from .image_conditioning import (
    block_conditioning,
    build_cross_attention_mask,
    check_cross_attention_states,
    resolve_token_image_index,
)
from .input_checks import check_forward_inputs, check_image_hidden_states, check_model_config, check_pixel_values
from .language_model_hooks import CrossAttentionConditioning, LanguageModelHooks
from .modeling_mosaic_gpt import MosaicGPTForCausalLM
from .perceiver import FlamingoPerceiverResampler
from .quantization_utils import keep_4bit_layers_differentiable

logger = logging.get_logger(__name__)


@dataclass
class FlamingoModelOutputWithPast(BaseModelOutputWithPast):
    """
    Output of [`FlamingoModel`]: transformers' [`~modeling_outputs.BaseModelOutputWithPast`] (`last_hidden_state`,
    the cache, `hidden_states`, `attentions`, all from the language model's decoder) and the image latents.

    Args:
        image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_images, num_latents, vision_hidden_size)`, *optional*):
            The Perceiver Resampler's output for the images of this call.
    """

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class FlamingoCausalLMOutputWithPast(CausalLMOutputWithPast):
    """
    Output of [`FlamingoForConditionalGeneration`]: transformers' [`~modeling_outputs.CausalLMOutputWithPast`] (`loss`,
    `logits`, the cache, `hidden_states`, `attentions`, all from the language model) and the image latents.

    The cache field has the name the installed transformers gives it, so that `generate` finds it: `cache` from
    transformers 5.24 on, `past_key_values` before (`hf_flamingo.cache_compat.CACHE_NAME`).

    Args:
        image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_images, num_latents, vision_hidden_size)`, *optional*):
            The Perceiver Resampler's output for the images of this call; pass it back as `image_hidden_states` to
            skip re-encoding the images.
    """

    image_hidden_states: torch.FloatTensor | None = None


# Images per vision-tower call on CPU outside training. For a ViT-B/16 at 224 px, 8 images keep the tower's returned
# hidden states at 62 MB instead of 186 MB for 24 images, and were as fast or faster (2-core EPYC).
_CPU_IMAGES_PER_CHUNK = 8


class FlamingoPreTrainedModel(PreTrainedModel):
    config_class = FlamingoConfig
    config: FlamingoConfig
    base_model_prefix = "flamingo"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlamingoGatedCrossAttentionBlock", "FlamingoPerceiverLayer"]
    _skip_keys_device_placement = [CACHE_NAME, LEGACY_CACHE_NAME]
    # Quantization (`from_pretrained(..., quantization_config=...)`): transformers 5 quantizers (bitsandbytes and the
    # others) never convert the modules listed here, so only the language model's linears are quantized (its
    # `lm_head` is kept by the quantizer's own default, through `get_output_embeddings`). Patterns are anchored at the
    # start of module names. This attribute is the only skip mechanism every quantizer reads; its one other effect is
    # that these modules load in float32 when `dtype=torch.float16` is requested (as BLIP-2's Q-Former), never for
    # bfloat16 or float32. `_keep_in_fp32_modules_strict` (which also upcasts under bfloat16) is deliberately unused.
    _keep_in_fp32_modules = ["vision_model", "perceiver", "gated_cross_attn_layers"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The vision and language models are PreTrainedModels and initialise their own modules; only Flamingo's
        # modules reach this method. They follow OpenFlamingo: PyTorch's default Linear/LayerNorm initialisation,
        # standard-normal latents and time embeddings, and closed (zero) gates.
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, FlamingoPerceiverResampler):
            init.normal_(module.latents, std=1.0)
            if module.frame_embs is not None:
                init.normal_(module.frame_embs, std=1.0)
            if module.media_time_embs is not None:
                init.normal_(module.media_time_embs, std=1.0)
        elif isinstance(module, FlamingoGatedCrossAttentionBlock):
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)

    def create_model_card(self, **kwargs: Any) -> Any:
        """The model card of this model, a `huggingface_hub.ModelCard` (base models, interval, usage, license,
        training data, evaluation results). Arguments: see [`hf_flamingo.model_card.build_model_card`], e.g.
        `repo_id=`, `license=`, `datasets=`, `evaluation_results="coco.json"`, `merge_with="out/README.md"` (to keep
        `Trainer.create_model_card`'s card below this one). Save it with `card.save(path)`, upload it with
        `card.push_to_hub(repo_id)`, or pass it to `save_pretrained(..., model_card=card)`."""
        return _model_card_module(required=True).build_model_card(self, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | Any,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        *,
        model_card: Any = None,
        **kwargs: Any,
    ) -> Any:
        """As [`~PreTrainedModel.save_pretrained`], and writes a model card (`README.md`, see
        [`create_model_card`]) into `save_directory` unless one is there already.

        Args:
            model_card (`huggingface_hub.ModelCard`, `str` or `False`, *optional*): The card to write (always, even
                over an existing `README.md`); `False` writes none. Default: this model's card, when the directory has
                no `README.md`.

        With `push_to_hub=True` the files written are uploaded in one commit with this card (transformers would
        upload an empty template card instead); a generated card does not replace a card the Hub repository already
        has. Returns the commit info then, else `None`.
        """
        cards = _model_card_module(required=False)
        if cards is None or model_card is False:
            return super().save_pretrained(save_directory, is_main_process, state_dict, push_to_hub, **kwargs)
        return cards.save_with_model_card(
            self,
            super().save_pretrained,
            save_directory,
            is_main_process=is_main_process,
            state_dict=state_dict,
            push_to_hub=push_to_hub,
            model_card=model_card,
            **kwargs,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        model_card: Any = None,
    ) -> Any:
        """As [`~PreTrainedModel.push_to_hub`], uploading this model's card (see [`save_pretrained`]) instead of an
        empty template; `model_card` uploads a card of your own."""
        hub_options = {
            "commit_message": commit_message,
            "commit_description": commit_description,
            "private": private,
            "token": token,
            "revision": revision,
            "create_pr": create_pr,
            "tags": tags,
        }
        if _model_card_module(required=False) is None:
            return super().push_to_hub(repo_id, max_shard_size=max_shard_size, **hub_options)
        with tempfile.TemporaryDirectory() as directory:
            return self.save_pretrained(
                directory,
                push_to_hub=True,
                max_shard_size=max_shard_size,
                model_card=model_card,
                repo_id=repo_id,
                **hub_options,
            )


def _model_card_module(required: bool) -> Any:
    """`hf_flamingo.model_card`, imported by name at call time so that a checkpoint's remote code (the modeling file
    and its relative imports) does not include it; `None` where the package is not installed, unless `required`."""
    try:
        return importlib.import_module("hf_flamingo.model_card")
    except ImportError as error:
        if required:
            raise ImportError("Model cards need the `hf_flamingo` package installed.") from error
        return None


class FlamingoModel(FlamingoPreTrainedModel):
    """The bare Flamingo: a vision encoder and Perceiver Resampler whose image latents condition a causal language
    model through tanh-gated cross-attention blocks; outputs the language model's last hidden states.

    The language model is built with `AutoModelForCausalLM.from_config(config.text_config)` (or given ready-made) and
    left unmodified: the blocks live in `gated_cross_attn_layers` (keyed by the index of the decoder layer they run
    in front of) and are called from forward pre-hooks on the decoder layers (`language_model_hooks`). The language
    model's own parameters keep their keys under `language_model.`, in this class and in
    [`FlamingoForConditionalGeneration`] alike, so either loads the other's checkpoints.

    Args:
        config ([`FlamingoConfig`]): Model configuration.
        vision_model (`PreTrainedModel`, *optional*): A ready vision encoder matching `config.vision_config`.
        language_model (`PreTrainedModel`, *optional*): A ready causal LM matching `config.text_config`.
    """

    def __init__(
        self,
        config: FlamingoConfig,
        vision_model: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        check_model_config(config)
        self.vision_model = vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
        self.perceiver = FlamingoPerceiverResampler(config)
        self.gated_cross_attn_layers = nn.ModuleDict(
            {str(index): FlamingoGatedCrossAttentionBlock(config) for index in config.cross_attention_layer_indices()}
        )
        self.language_model = (
            language_model if language_model is not None else _causal_lm_from_config(config.text_config)
        )
        self._lm_hooks = LanguageModelHooks(config.cross_attention_layer_indices())
        self._bind_language_model()
        self._embedding_grad_hook = None
        self.post_init()
        # `post_init` collects the children's `_no_split_modules`, including classes a vision-only tower does not
        # contain (e.g. CLIP's `CLIPTextEmbeddings`); FSDP's transformer auto-wrap refuses class names it cannot find.
        present = {type(module).__name__ for module in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules if name in present}

    @classmethod
    def from_backbones(cls, vision_model: Any, language_model: Any, **kwargs: Any) -> FlamingoModel:
        """Builds a new Flamingo around a pretrained vision encoder and causal language model (fresh Perceiver
        Resampler and cross-attention blocks, gates closed, backbones frozen). Arguments: see
        [`hf_flamingo.backbones.from_backbones`], e.g. `tokenizer=`, `dtype=`, `device_map=`,
        `quantization_config=`, `cross_attn_every_n_layers=`.
        """
        # Imported by name at call time: the builder is not part of a saved checkpoint's remote code.
        try:
            backbones = importlib.import_module("hf_flamingo.backbones")
        except ImportError as error:
            raise ImportError("`from_backbones` needs the `hf_flamingo` package installed.") from error
        return backbones.from_backbones(cls, vision_model, language_model, **kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> FlamingoModel:
        """Loads a saved Flamingo, as [`~PreTrainedModel.from_pretrained`].

        With a `quantization_config` (e.g. `BitsAndBytesConfig(load_in_4bit=True)`), or a checkpoint saved
        quantized, only the language model's linear layers are quantized; the vision tower, the Perceiver Resampler,
        the cross-attention blocks and `lm_head` keep the requested `dtype` (see `_keep_in_fp32_modules`). 4-bit
        layers are kept differentiable after inference on CPUs with AVX512-BF16
        ([`~hf_flamingo.quantization_utils.keep_4bit_layers_differentiable`]).
        """
        loaded = super().from_pretrained(*args, **kwargs)
        # `output_loading_info=True` returns `(model, loading_info)`.
        keep_4bit_layers_differentiable(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    def freeze_backbones(self, train_new_token_embeddings: bool = False) -> None:
        """Makes only the Perceiver Resampler and the gated cross-attention blocks trainable (OpenFlamingo's recipe).

        Args:
            train_new_token_embeddings (`bool`, *optional*, defaults to `False`):
                Also train the input-embedding rows of `<image>` and `<|endofchunk|>`: the embedding matrix gets
                `requires_grad=True` and a gradient hook zeroes every other row. Put the embeddings in a parameter
                group without weight decay, or the optimizer's decay will still move the other rows.
        """
        self.requires_grad_(False)
        self.perceiver.requires_grad_(True)
        self.gated_cross_attn_layers.requires_grad_(True)
        if self._embedding_grad_hook is not None:
            self._embedding_grad_hook.remove()
            self._embedding_grad_hook = None
        if train_new_token_embeddings:
            token_ids = [i for i in (self.config.media_token_id, self.config.eoc_token_id) if i is not None]
            weight = self.get_input_embeddings().weight
            row_mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
            row_mask[token_ids] = 1
            weight.requires_grad_(True)
            self._embedding_grad_hook = weight.register_hook(lambda grad: grad * row_mask.to(grad.device, grad.dtype))

    # ----------------------------------------------------------------------------------------------------------------
    # Embedding accessors (delegated, so that resizing and tying act on the language model)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args: Any, **kwargs: Any) -> nn.Embedding:
        """Resizes the language model's input and output embeddings and updates `config.text_config.vocab_size`."""
        embeddings = self.language_model.resize_token_embeddings(new_num_tokens, *args, **kwargs)
        if self._embedding_grad_hook is not None:
            logger.warning("Embeddings were resized: call `freeze_backbones(...)` again to re-install the row mask.")
        return embeddings

    def set_language_model(self, language_model: PreTrainedModel) -> None:
        """Replaces the language model and moves the cross-attention hooks onto its decoder layers."""
        self._lm_hooks.detach()
        self.language_model = language_model
        self.config.text_config = language_model.config
        self._bind_language_model()

    def _bind_language_model(self) -> None:
        """Hooks the blocks onto `self.language_model` and notes how its `forward` (and its decoder's) take the cache,
        and whether it takes `logits_to_keep`."""
        self._lm_hooks.attach(self.language_model, self.config.num_text_layers, self.config.decoder_layers_attr)
        self._lm_cache_argument = cache_argument_name(self.language_model)
        self._decoder_cache_argument = cache_argument_name(self.language_model.get_decoder())
        self._language_model_takes_logits_to_keep = _accepts_argument(self.language_model, "logits_to_keep")

    @property
    def decoder_layers_path(self) -> str | None:
        """Dotted path (relative to `language_model`) of the decoder layers the cross-attention hooks are on."""
        return self._lm_hooks.layers_path

    # ----------------------------------------------------------------------------------------------------------------
    # Images

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Encodes images (or video frames) and resamples them to latents.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, num_images, channels, height, width)` or
                `(batch, num_images, num_frames, channels, height, width)`): The images.

        Returns:
            `torch.FloatTensor` of shape `(batch, num_images, num_latents, vision_hidden_size)`.

        Raises:
            TypeError, ValueError: for images the vision tower cannot take or that would give a silent wrong result
                ([`~hf_flamingo.input_checks.check_pixel_values`]).
        """
        return self._encode_images(check_pixel_values(self, pixel_values))

    def _encode_images(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """`get_image_features` of checked 6-D `pixel_values`."""
        batch, num_images, num_frames = pixel_values.shape[:3]
        vision_param = next(self.vision_model.parameters())
        flat = pixel_values.reshape(batch * num_images * num_frames, *pixel_values.shape[3:])
        flat = flat.to(device=vision_param.device, dtype=vision_param.dtype)
        if flat.device.type == "cpu" and not self.vision_model.training:
            # In chunks of images: the tower returns the hidden states of all its layers, and smaller activations
            # stay in cache (training keeps one batch, for towers with batch statistics).
            features = torch.cat([self._vision_features(chunk) for chunk in flat.split(_CPU_IMAGES_PER_CHUNK)])
        else:
            features = self._vision_features(flat)
        perceiver_param = self.perceiver.latents
        features = features.to(device=perceiver_param.device, dtype=perceiver_param.dtype)
        features = features.reshape(batch, num_images, num_frames, *features.shape[1:])
        return self.perceiver(features)

    def _vision_features(self, images: torch.FloatTensor) -> torch.FloatTensor:
        """The tower's features of `images` (`(num_images, channels, height, width)`) as the config selects them."""
        vision_outputs = self.vision_model(pixel_values=images, output_hidden_states=True)
        features = vision_outputs.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        if self.config.vision_feature_apply_post_layernorm:
            features = self._vision_post_layernorm()(features)
        return features

    def _vision_post_layernorm(self) -> nn.Module:
        for name, module in self.vision_model.named_modules():
            if name.split(".")[-1] == "post_layernorm":
                return module
        raise ValueError(
            f"`vision_feature_apply_post_layernorm=True` but {type(self.vision_model).__name__} has no "
            "`post_layernorm` module."
        )

    def _resolve_image_hidden_states(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None,
        image_hidden_states: torch.FloatTensor | None,
    ) -> torch.FloatTensor | None:
        """Encodes `pixel_values`, or checks the given `image_hidden_states`; `None` when there are no images."""
        if pixel_values is not None and image_hidden_states is not None:
            raise ValueError("Pass either `pixel_values` or `image_hidden_states`, not both.")
        if pixel_values is not None:
            return self._encode_images(check_pixel_values(self, pixel_values, input_ids))
        if image_hidden_states is not None:
            check_image_hidden_states(image_hidden_states, input_ids.shape[0], self.config)
        return image_hidden_states

    def get_cross_attention_states(self, image_hidden_states: torch.FloatTensor) -> torch.FloatTensor:
        """Projects image latents to every gated block's cross-attention keys and values, once.

        `generate` calls this once per call, before expanding the batch for beams, so each block's keys and values
        are computed once per sample instead of at every decoding step.

        Args:
            image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_images, num_latents, vision_hidden_size)`):
                Perceiver Resampler outputs.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_blocks, num_images * num_latents, 2 * xattn_heads *
            xattn_dim_head)`, blocks in the order of `gated_cross_attn_layers`.
        """
        batch, num_images, num_latents, dim = image_hidden_states.shape
        media = image_hidden_states.reshape(batch, num_images * num_latents, dim)
        blocks = list(self.gated_cross_attn_layers.values())
        width = 2 * self.config.xattn_heads * self.config.xattn_dim_head
        dtype = blocks[0].attn.to_kv.weight.dtype if blocks else media.dtype
        # Filled block by block, so that all blocks' keys/values never exist twice at once.
        states = media.new_empty(batch, len(blocks), num_images * num_latents, width, dtype=dtype)
        for position, block in enumerate(blocks):
            states[:, position] = block.key_values(media)
        return states

    def _conditioning(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None,
        image_hidden_states: torch.FloatTensor | None,
        cross_attention_states: torch.FloatTensor | None,
        token_image_index: torch.LongTensor | None,
        cache: Cache | None,
    ) -> tuple[dict[int, CrossAttentionConditioning], torch.FloatTensor | None]:
        """Encodes the images (unless given as latents or keys/values), works out which image each token attends to,
        and returns what every gated block needs for this forward, with the image latents."""
        if cross_attention_states is not None:
            if pixel_values is not None or image_hidden_states is not None:
                raise ValueError(
                    "Pass the images once: `pixel_values`, `image_hidden_states` or `cross_attention_states`."
                )
            width = 2 * self.config.xattn_heads * self.config.xattn_dim_head
            num_latents = self.config.perceiver_num_latents
            check_cross_attention_states(
                cross_attention_states, input_ids.shape[0], len(self.gated_cross_attn_layers), num_latents, width
            )
            num_images = cross_attention_states.shape[2] // num_latents
        else:
            image_hidden_states = self._resolve_image_hidden_states(input_ids, pixel_values, image_hidden_states)
            num_images = 0 if image_hidden_states is None else image_hidden_states.shape[1]
        token_image_index = resolve_token_image_index(
            input_ids, self.config.media_token_id, num_images, token_image_index, cache
        )
        conditioning = block_conditioning(
            self.gated_cross_attn_layers,
            token_image_index,
            image_hidden_states,
            cross_attention_states,
            self.config.perceiver_num_latents,
            self.config.only_attend_immediate_media,
        )
        if self.training and torch.is_grad_enabled():
            self._lm_hooks.check_gradient_checkpointing(self.language_model)
        return conditioning, image_hidden_states

    def _run_language_model(self, module: nn.Module, conditioning: dict, **inputs: Any) -> Any:
        """Calls `module` (the language model or its decoder) with the blocks conditioned for this thread's call.

        The language model is not modified: the hooks apply `conditioning` to the calls this thread makes inside the
        block.
        """
        with self._lm_hooks.conditioning(conditioning):
            return module(**inputs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_hidden_states: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        token_image_index: torch.LongTensor | None = None,
        cross_attention_states: torch.FloatTensor | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> FlamingoModelOutputWithPast | tuple:
        r"""
        The language model's decoder (`language_model.get_decoder()`) conditioned on the images; arguments as in
        [`FlamingoForConditionalGeneration.forward`] (without `labels` and `logits_to_keep`).

        Returns:
            [`FlamingoModelOutputWithPast`] (`last_hidden_state`, the cache, `hidden_states`, `attentions`,
            `image_hidden_states`) or `tuple`.
        """
        cache = merge_cache_arguments(cache, past_key_values)
        check_forward_inputs(self, input_ids, attention_mask, position_ids, cache, token_image_index, kwargs)
        conditioning, image_hidden_states = self._conditioning(
            input_ids, pixel_values, image_hidden_states, cross_attention_states, token_image_index, cache
        )
        decoder = self.language_model.get_decoder()
        kwargs[self._decoder_cache_argument] = cache
        outputs = self._run_language_model(
            decoder,
            conditioning,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        output = FlamingoModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.get("hidden_states"),
            attentions=outputs.get("attentions"),
            image_hidden_states=image_hidden_states,
            **{CACHE_NAME: cache_from_output(outputs)},
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


class FlamingoForConditionalGeneration(FlamingoModel, FlamingoGenerationMixin):
    """Flamingo with its language model's head: next-token logits and loss, and `generate`.

    The same modules and checkpoint keys as [`FlamingoModel`] (the head is the language model's own `lm_head`);
    `forward` runs the whole causal LM instead of its decoder.

    Its `generation_config` stops at `<|endofchunk|>` (`config.eoc_token_id`, the end of a few-shot answer) and at the
    language model's eos token(s), in that order, whether the model is built with `from_backbones`, from a config,
    converted, or loaded from a directory saved that way; a `generation_config.json` saved with the model is used as
    it is.
    """

    def __init__(
        self,
        config: FlamingoConfig,
        vision_model: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config, vision_model=vision_model, language_model=language_model)
        self.generation_config = with_flamingo_stop_tokens(self.generation_config, config.eoc_token_id)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_hidden_states: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        token_image_index: torch.LongTensor | None = None,
        cross_attention_states: torch.FloatTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> FlamingoCausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids; `<image>` tokens (`config.media_token_id`) mark where each image appears.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding (covering the cached tokens too when a cache is given).
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_images, channels, height, width)` or `(batch_size, num_images, num_frames, channels, height, width)`, *optional*):
                The images, in order of their `<image>` tokens, normalised by the image processor (a float tensor
                whose values stay within +-30, `input_checks.MAX_NORMALISED_PIXEL_VALUE`: integer or raw 0-255
                values, and NaN/inf, are refused). Samples with fewer images are padded at the end with all-zero
                images; an image beyond a sample's number of `<image>` tokens is ignored, with a `UserWarning` when
                it is not all zeros (an image whose `<image>` token is missing).
            image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_images, num_latents, vision_hidden_size)`, *optional*):
                Precomputed Perceiver Resampler outputs (e.g. `outputs.image_hidden_states`), instead of
                `pixel_values`.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets for the language-modelling loss (shifted inside the language model); -100 is ignored.
            cache (`Cache`, *optional*):
                The language model's key/value cache (`past_key_values` is accepted too: its name before transformers
                5.24). It is passed to the language model under the name its `forward` takes.
            use_cache (`bool`, *optional*):
                Whether to return the updated cache.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Positions, passed to the language model (`generate` derives them from a left-padded mask).
            token_image_index (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                For every token, the 1-based index of the image it attends to (with
                `only_attend_immediate_media=False`: of the last of the images it attends to); 0 for none. Defaults
                to the number of `<image>` tokens up to and including the token (OpenFlamingo's rule), which only
                holds for tokens that start their sequences: tokens continuing from a non-empty cache need it (e.g.
                `last_image_index[:, None].expand_as(input_ids)` to continue after prompts holding
                `last_image_index` images). `generate` passes it.
            cross_attention_states (`torch.FloatTensor` of shape `(batch_size, num_blocks, num_images * num_latents, 2 * xattn_heads * xattn_dim_head)`, *optional*):
                Precomputed keys and values of every gated block
                ([`~FlamingoForConditionalGeneration.get_cross_attention_states`] of `image_hidden_states`), instead
                of `pixel_values` or `image_hidden_states`: the blocks skip projecting the image latents.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute logits only for the last `logits_to_keep` positions (0: all), as transformers' causal LMs
                do; `generate` uses it to skip the prompt's logits.
            return_dict (`bool`, *optional*):
                Return a [`FlamingoCausalLMOutputWithPast`] (default) or a tuple.
            past_key_values (`Cache`, *optional*):
                The cache under its name before transformers 5.24; give it under one name only.
            **kwargs:
                Passed to the language model (e.g. `output_attentions`, `num_items_in_batch`).

        Returns:
            [`FlamingoCausalLMOutputWithPast`] or `tuple`.

        Raises:
            TypeError, ValueError: for inputs that would fail deep inside or give a silent wrong result
                ([`hf_flamingo.input_checks`]): shapes and dtypes are always checked; token values (ids in the
                vocabulary, `<image>` tokens where `attention_mask` is 0) when no `cache` and no `token_image_index`
                are given; images whenever given. Value checks are skipped under `torch.compile`.
            RuntimeError: if the model's weights are still on the `meta` device.
        """
        cache = merge_cache_arguments(cache, past_key_values)
        check_forward_inputs(self, input_ids, attention_mask, position_ids, cache, token_image_index, kwargs, labels)
        conditioning, image_hidden_states = self._conditioning(
            input_ids, pixel_values, image_hidden_states, cross_attention_states, token_image_index, cache
        )
        if self._language_model_takes_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        kwargs[self._lm_cache_argument] = cache
        lm_outputs = self._run_language_model(
            self.language_model,
            conditioning,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            labels=labels,
            return_dict=True,
            **kwargs,
        )
        logits = lm_outputs.logits
        if not self._language_model_takes_logits_to_keep and isinstance(logits_to_keep, int) and logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        output = FlamingoCausalLMOutputWithPast(
            loss=lm_outputs.get("loss"),
            logits=logits,
            hidden_states=lm_outputs.get("hidden_states"),
            attentions=lm_outputs.get("attentions"),
            image_hidden_states=image_hidden_states,
            **{CACHE_NAME: cache_from_output(lm_outputs)},
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


def _causal_lm_from_config(text_config: PretrainedConfig) -> PreTrainedModel:
    # Language models bundled with this package are built directly, so that remote-code exports work without it.
    if text_config.model_type == MosaicGPTForCausalLM.config_class.model_type:
        return MosaicGPTForCausalLM._from_config(text_config)
    return AutoModelForCausalLM.from_config(text_config)


def _accepts_argument(module: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(module.forward).parameters


__all__ = [
    "FlamingoCausalLMOutputWithPast",
    "FlamingoForConditionalGeneration",
    "FlamingoModel",
    "FlamingoModelOutputWithPast",
    "FlamingoPreTrainedModel",
    "build_cross_attention_mask",
]
