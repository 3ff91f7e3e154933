"""Generation: `FlamingoGenerationMixin` (Flamingo's `generate` and `prepare_inputs_for_generation` on top of
transformers' `GenerationMixin`) and the images of one `generate` call, prepared once and handed to every decoding
step.

`FlamingoGenerationMixin.generate` builds a `FlamingoGenerationImages` before transformers' `generate`
expands the batch for beams and `num_return_sequences`, so the images are encoded, and every gated block's image
keys/values projected, once per sample and call. It travels through `generate` as one non-tensor keyword argument,
`flamingo_images` (transformers expands tensor arguments for beams, but hands other arguments unchanged to
`prepare_inputs_for_generation` at every step), where `FlamingoGenerationImages.step_inputs` turns it into the plain
tensors `forward` takes (`cross_attention_states`, `token_image_index`). Nothing here depends on how transformers
stores or names its cache.
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, GenerationMixin

from .image_conditioning import resolve_token_image_index
from .image_tokens import count_image_tokens
from .input_checks import check_prompt

if TYPE_CHECKING:
    from .modeling_flamingo import FlamingoForConditionalGeneration


def flamingo_stop_token_ids(
    end_of_chunk_token_id: int | None, language_model_eos: int | list[int] | None
) -> list[int]:
    """The token ids Flamingo's generation stops at: `<|endofchunk|>` (the end of a few-shot answer, OpenFlamingo's
    stopping token) first, then the language model's own eos token(s), without duplicates or `None`s."""
    if language_model_eos is None or isinstance(language_model_eos, int):
        language_model_eos = [language_model_eos]
    stop_ids: list[int] = []
    for token_id in [end_of_chunk_token_id, *language_model_eos]:
        if token_id is not None and token_id not in stop_ids:
            stop_ids.append(int(token_id))
    return stop_ids


def with_flamingo_stop_tokens(
    generation_config: GenerationConfig, end_of_chunk_token_id: int | None, pad_token_id: int | None = None
) -> GenerationConfig:
    """A copy of `generation_config` that also stops at `<|endofchunk|>` and, if given, pads with `pad_token_id`.

    Args:
        generation_config ([`GenerationConfig`]): The defaults to extend (the language model's eos is kept).
        end_of_chunk_token_id (`int`, *optional*): The id of `<|endofchunk|>`; `None` leaves the stop tokens as they are.
        pad_token_id (`int`, *optional*): The tokenizer's pad token id (the processor adds `<PAD>` when it has none).
    """
    updated = copy.deepcopy(generation_config)
    stop_ids = flamingo_stop_token_ids(end_of_chunk_token_id, generation_config.eos_token_id)
    updated.eos_token_id = (stop_ids[0] if len(stop_ids) == 1 else stop_ids) if stop_ids else None
    if pad_token_id is not None:
        updated.pad_token_id = pad_token_id
    return updated


class FlamingoGenerationImages:
    """One `generate` call's images, encoded and projected once per sample, and the prompt facts every step needs.

    Rules (OpenFlamingo's): prompt tokens attend to the image of their most recent `<image>` token (or, with
    `only_attend_immediate_media=False`, to every image up to it); tokens after the prompt attend to the prompt's last
    image; an `<image>` token produced by generation does not start a new image.

    A copy (transformers copies the arguments of the main model for an assistant model in assisted decoding) keeps
    the images but not the latents and keys/values, which belong to the model that computed them: the assistant
    encodes the images with its own vision tower, once.

    Args:
        model ([`FlamingoForConditionalGeneration`]): The model the keys/values are projected for.
        input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`): The prompts.
        pixel_values (`torch.FloatTensor`, *optional*): The images, as `forward` takes them.
        image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_images, num_latents, vision_hidden_size)`, *optional*):
            The model's own Perceiver Resampler outputs, instead of `pixel_values`.
    """

    def __init__(
        self,
        model: FlamingoForConditionalGeneration,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        image_hidden_states: torch.FloatTensor | None = None,
    ):
        image_hidden_states = model._resolve_image_hidden_states(input_ids, pixel_values, image_hidden_states)
        num_images = 0 if image_hidden_states is None else image_hidden_states.shape[1]
        self.prompt_length = input_ids.shape[1]
        token_image_index = resolve_token_image_index(input_ids, model.config.media_token_id, num_images)
        self.last_image_index = token_image_index[:, -1]
        self.pixel_values = pixel_values
        self._image_hidden_states = image_hidden_states
        self._latents_model = weakref.ref(model)  # whose Perceiver Resampler `_image_hidden_states` come from
        self._states_model: weakref.ReferenceType | None = None  # whose blocks projected the keys/values
        # `(copies, keys/values)`: each sample's rows repeated `copies` times, as the steps get them.
        self._prompt_states: tuple[int, torch.Tensor] | None = None  # all images, for tokens of the prompts
        self._continuing_states: tuple[int, torch.Tensor] | None = None  # each prompt's last image only
        self.bind(model)

    def __deepcopy__(self, memo: dict[int, Any]) -> FlamingoGenerationImages:
        copied = copy.copy(self)
        copied._states_model = None
        copied._prompt_states = copied._continuing_states = None
        return copied

    def bind(self, model: FlamingoForConditionalGeneration) -> None:
        """Makes the keys/values those of `model` (a no-op when they already are)."""
        if self._states_model is not None and self._states_model() is model:
            return
        if self._image_hidden_states is not None and self._latents_model() is not model:
            if self.pixel_values is None:
                raise ValueError(
                    "This generation's images were given as `image_hidden_states` of another model; a different "
                    "Flamingo (e.g. an assistant model in assisted decoding) needs the `pixel_values` to encode them."
                )
            self._image_hidden_states = model.get_image_features(self.pixel_values)
            self._latents_model = weakref.ref(model)
        self._states_model = weakref.ref(model)
        self._prompt_states = self._continuing_states = None
        if self._image_hidden_states is None:
            return
        prompt_states = model.get_cross_attention_states(self._image_hidden_states)
        self._prompt_states = (1, prompt_states)
        if model.config.only_attend_immediate_media:
            num_latents = model.config.perceiver_num_latents
            self._continuing_states = (1, _select_image(prompt_states, self.last_image_index, num_latents))

    def step_inputs(
        self, model: FlamingoForConditionalGeneration, input_ids: torch.LongTensor, num_new_tokens: int
    ) -> dict[str, torch.Tensor | None]:
        """The image inputs of the forward that feeds the last `num_new_tokens` tokens of `input_ids`.

        Args:
            model ([`FlamingoForConditionalGeneration`]): The model that runs the forward.
            input_ids (`torch.LongTensor` of shape `(batch_size * copies, sequence_length)`): Every token so far,
                with each prompt repeated `copies` times in a row (beams, `num_return_sequences`).
            num_new_tokens (`int`): How many of the last tokens this forward feeds (the rest are in the cache).

        Returns:
            `dict` with `cross_attention_states` and `token_image_index`, as
            [`~FlamingoForConditionalGeneration.forward`] takes them.
        """
        self.bind(model)
        rows, length = input_ids.shape
        samples = self.last_image_index.shape[0]
        if rows % samples:
            raise ValueError(f"Generation has {rows} rows, which is not a multiple of its {samples} prompts.")
        copies = rows // samples
        last_image_index = self.last_image_index.to(input_ids.device).repeat_interleave(copies)
        first_new = length - num_new_tokens
        if self._continuing_states is not None and first_new >= self.prompt_length:
            # Every new token comes after its prompt: it attends to the prompt's last image, which is the only image
            # in the continuing keys/values (index 1), or to none for prompts without images. From here on the cache
            # holds the prompts, so their keys/values are freed.
            self._prompt_states = None
            self._continuing_states = _repeated(self._continuing_states, copies)
            token_image_index = (last_image_index > 0).long().unsqueeze(1).expand(rows, num_new_tokens)
            return {
                "cross_attention_states": self._continuing_states[1],
                "token_image_index": token_image_index.contiguous(),  # stable strides for compiled forwards
            }
        prompt_states = None
        if self._image_hidden_states is not None:
            if self._prompt_states is None:  # freed when decoding went on from the cache; needed again after all
                self._prompt_states = (1, model.get_cross_attention_states(self._image_hidden_states))
            self._prompt_states = _repeated(self._prompt_states, copies)
            prompt_states = self._prompt_states[1]
        images_so_far = count_image_tokens(input_ids, model.config.media_token_id)
        token_image_index = torch.minimum(images_so_far, last_image_index.unsqueeze(1))[:, first_new:]
        return {"cross_attention_states": prompt_states, "token_image_index": token_image_index.contiguous()}


def _repeated(states: tuple[int, torch.Tensor], copies: int) -> tuple[int, torch.Tensor]:
    """`(copies_now, keys/values)` with each sample's rows repeated `copies` times in a row instead."""
    current, tensor = states
    if current == copies:
        return states
    per_sample = tensor[::current]
    return copies, per_sample.repeat_interleave(copies, dim=0) if copies > 1 else per_sample


def _select_image(states: torch.Tensor, image_index: torch.LongTensor, num_latents: int) -> torch.Tensor:
    """`(batch, blocks, images * latents, width)` -> the keys/values of image `image_index` (1-based; 0: any, they
    are unused) of each sample, `(batch, blocks, latents, width)`."""
    batch, num_blocks, num_keys, width = states.shape
    per_image = states.view(batch, num_blocks, num_keys // num_latents, num_latents, width)
    index = (image_index.to(states.device) - 1).clamp(min=0)
    return per_image[torch.arange(batch, device=states.device), :, index]


class FlamingoGenerationMixin(GenerationMixin):
    """transformers' [`~GenerationMixin`] with the images of a call prepared once (`generate`) and handed to each
    decoding step (`prepare_inputs_for_generation`); every decoding strategy and cache is transformers' own."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_hidden_states: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Generates text conditioned on images, through the standard [`~GenerationMixin.generate`].

        The images are encoded, and every gated block's keys/values projected, once per call, before the batch is
        expanded for beams or `num_return_sequences` ([`~hf_flamingo.generation_flamingo.FlamingoGenerationImages`]).
        Every generated token attends to the last image of its prompt; an `<image>` token produced by generation
        does not start a new image. Everything else is transformers' `generate`: every decoding strategy, cache
        implementation and `torch.compile`.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): The prompts (left-padded).
            pixel_values (`torch.FloatTensor`, *optional*): The images, as in [`~FlamingoForConditionalGeneration.forward`].
            image_hidden_states (`torch.FloatTensor`, *optional*): Precomputed image latents instead of `pixel_values`.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): Padding mask.
            **kwargs: Generation arguments (`max_new_tokens`, `num_beams`, `do_sample`, `generation_config`, ...).

        Returns:
            `torch.LongTensor` or a [`~utils.ModelOutput`], as [`~GenerationMixin.generate`].

        Raises:
            TypeError, ValueError, RuntimeError: as [`~FlamingoForConditionalGeneration.forward`]; the prompt and the
                images are checked once per call, never at the decoding steps.
        """
        for name in ("cross_attention_states", "token_image_index"):
            if kwargs.get(name) is not None:
                raise ValueError(f"`generate` computes `{name}` itself: pass `pixel_values` or `image_hidden_states`.")
        images = kwargs.pop("flamingo_images", None)
        if images is None:
            if input_ids is None:
                raise ValueError("`generate` needs `input_ids` (the prompt, with its `<image>` tokens).")
            check_prompt(self, input_ids, attention_mask)
            images = FlamingoGenerationImages(self, input_ids, pixel_values, image_hidden_states)
        elif pixel_values is not None or image_hidden_states is not None:
            raise ValueError("Pass the images as `pixel_values` or `image_hidden_states`, not with `flamingo_images`.")
        else:
            images.bind(self)  # an assistant model in assisted decoding gets the main model's arguments
        return super().generate(input_ids, attention_mask=attention_mask, flamingo_images=images, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        *args: Any,
        flamingo_images: FlamingoGenerationImages | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The inputs of one decoding step: the language model's own (its `prepare_inputs_for_generation`, so that
        its mask and position conventions apply, e.g. BLOOM's 2-D mask under a static cache) plus the image inputs
        of the tokens the step feeds.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): Every token so far.
            flamingo_images ([`~hf_flamingo.generation_flamingo.FlamingoGenerationImages`], *optional*):
                The call's images, which [`~FlamingoForConditionalGeneration.generate`] prepares.
            *args, **kwargs: As [`~GenerationMixin.prepare_inputs_for_generation`] of the installed transformers.
        """
        if flamingo_images is None and any(
            kwargs.get(name) is not None for name in ("pixel_values", "image_hidden_states")
        ):
            raise ValueError(
                "Generating with images goes through `FlamingoForConditionalGeneration.generate`, which prepares them "
                "once per call; `GenerationMixin.generate` alone would drop them after the prompt."
            )
        model_inputs = self.language_model.prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if flamingo_images is not None:
            model_inputs.update(flamingo_images.step_inputs(self, input_ids, model_inputs["input_ids"].shape[1]))
        return model_inputs
