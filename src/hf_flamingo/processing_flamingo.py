"""Processor class for Flamingo (OpenFlamingo-compatible).

Besides torch, transformers, PIL/numpy and the standard library it imports only `image_tokens.py` (the `<image>`
contract it shares with the collator and the model), so that both ship as remote code next to a checkpoint.
"""

import inspect
import os
import re
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput, load_image
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from .image_tokens import (
    check_image_token_counts,
    check_raw_image_values,
    image_tokens_per_sample,
    stack_images_per_sample,
)

_PADDING_DEFAULTS = {"padding": "longest"}
_NUM_CHANNELS = (1, 3, 4)
"""Channel counts an image array may have: grayscale, RGB, RGBA (1 and 4 are converted to RGB by `do_convert_rgb`)."""


def flamingo_chat_template(media_token: str = "<image>", end_of_chunk_token: str = "<|endofchunk|>") -> str:
    """The default chat template: renders interleaved few-shot `messages` to Flamingo's prompt format.

    Each message's content is written in order, with nothing added between parts or messages: an `{"type": "image"}`
    part becomes `media_token`, a `{"type": "text"}` part (or a string content) its text. An `assistant` message (a
    demonstration's answer) is closed with `end_of_chunk_token`. `system` and `user` messages are written the same
    way, without a closing token; the generation prompt adds nothing, so the model continues the last message.
    """
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{- raise_exception('Flamingo chat messages have the role system, user or assistant, got ' + message['role']) -}}"
        "{%- endif -%}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{- {media_token!r} -}}}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
        "{%- else -%}{{- raise_exception('Flamingo chat content parts are image or text, got ' + part['type']) -}}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        f"{{%- if message['role'] == 'assistant' -%}}{{{{- {end_of_chunk_token!r} -}}}}{{%- endif -%}}"
        "{%- endfor -%}"
    )


class FlamingoProcessorKwargs(ProcessingKwargs, total=False):
    # `_defaults` is read by every transformers 5.x release; newer releases also read the class-level
    # `text_kwargs` of `FlamingoProcessor`. Both carry the same values.
    _defaults = {"text_kwargs": dict(_PADDING_DEFAULTS)}


def _is_single_image(image: Any) -> bool:
    """Whether `image` is one image: a PIL image, or an array/tensor with 2 (grayscale) or 3 dimensions."""
    if isinstance(image, Image.Image):
        return True
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return image.ndim in (2, 3)
    return False


def _is_image_stack(image: Any) -> bool:
    """Whether `image` is a stack of images: an array/tensor with 4 dimensions `(num_images, ...)`."""
    return isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4


def _as_image_list(images: Any) -> list | None:
    """Turns one image, a stack of images or a flat list/tuple of images into a list; `None` if it is none of these."""
    if _is_single_image(images):
        return [images]
    if _is_image_stack(images):
        return list(images)
    if isinstance(images, (list, tuple)) and all(_is_single_image(image) for image in images):
        return list(images)
    return None


def _describe_value(value: Any) -> str:
    """A short description of a value that is not an image, with the fix when it is obvious."""
    if isinstance(value, (bytes, bytearray)):
        return "bytes; decode encoded images first, e.g. with `PIL.Image.open(io.BytesIO(data))`"
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return (
            f"an array with {value.ndim} dimension(s) (shape {tuple(value.shape)}); an image has 2 `(height, width)` "
            "or 3 `(height, width, channels)` / `(channels, height, width)` dimensions, a stack of images 4"
        )
    return f"of type {type(value).__name__}"


def _load_image_references(images: Any, path: str = "images") -> Any:
    """`images` with every path, URL or base64 string (`str` or `os.PathLike`) opened as a PIL image by transformers'
    `load_image`, in the same nesting; other values are returned as they are.

    Raises:
        ValueError: Naming the element that could not be loaded and why.
    """
    if isinstance(images, (str, os.PathLike)):
        try:
            return load_image(os.fspath(images))
        except Exception as error:  # noqa: BLE001 - file, decoding and network errors alike
            raise ValueError(f"Could not load `{path}` ({os.fspath(images)[:200]!r}) as an image: {error}") from error
    if isinstance(images, (list, tuple)):
        return [_load_image_references(element, f"{path}[{index}]") for index, element in enumerate(images)]
    return images


def _describe_invalid_images(images: Any, path: str = "images", depth: int = 0) -> str:
    """Says what is wrong with an `images` argument that could not be grouped: its first element that is not an
    image, or a nesting that is too deep or mixed."""
    if _is_single_image(images) or (depth < 2 and _is_image_stack(images)):
        return ""
    if not isinstance(images, (list, tuple)):
        return f" `{path}` is {_describe_value(images)}."
    if depth >= 2:
        return (
            f" `{path}` is a {type(images).__name__} nested {depth + 1} deep; images are nested at most two deep "
            "(one list of images per text)."
        )
    for index, element in enumerate(images):
        problem = _describe_invalid_images(element, f"{path}[{index}]", depth + 1)
        if problem:
            return problem
    return f" `{path}` mixes images and lists of images." if depth == 0 else ""


def _data_format(value: Any) -> str | None:
    """`"channels_first"`, `"channels_last"` or `None` from an `input_data_format` option (str or `ChannelDimension`)."""
    value = getattr(value, "value", value)
    return value if value in ("channels_first", "channels_last") else None


def _channels_and_size(shape: tuple[int, ...], data_format: str | None) -> tuple[int, tuple[int, ...]]:
    """The number of channels and the `(height, width)` of an image of `shape`, like transformers infers them
    (channels first if the first dimension is 1, 3 or 4, else last). If neither end is 1, 3 or 4, the smaller end is
    taken as the channels, for the error message."""
    if len(shape) == 2:
        return 1, shape
    if data_format == "channels_first" or (data_format is None and shape[0] in _NUM_CHANNELS):
        return shape[0], shape[1:]
    if data_format == "channels_last" or shape[-1] in _NUM_CHANNELS or shape[-1] <= shape[0]:
        return shape[-1], shape[:-1]
    return shape[0], shape[1:]


class FlamingoProcessor(ProcessorMixin):
    r"""
    Constructs a Flamingo processor which wraps an image processor (e.g. [`CLIPImageProcessor`]) and a causal-LM
    tokenizer into a single processor, following OpenFlamingo's conventions.

    Text is interleaved with images by writing one `media_token` (`"<image>"`) where each image appears, and by
    closing each image-text chunk with `end_of_chunk_token` (`"<|endofchunk|>"`), e.g.
    `"<image>Output: a dog.<|endofchunk|><image>Output:"`. The processor does not expand the media token: each
    image corresponds to exactly one `<image>` token, and the model's gated cross-attention layers use the token
    positions to decide which image each text token attends to.

    On construction the tokenizer is extended like OpenFlamingo does it: `end_of_chunk_token` and `media_token` are
    added, in this order, as additional special tokens if the tokenizer does not already have them, and
    `pad_token` is added only if the tokenizer has no padding token. For a GPT-NeoX tokenizer this gives
    `<|endofchunk|>` = 50277, `<image>` = 50278 and `<PAD>` = 50279. The tokenizer's padding side is set to `"left"`
    (what generation needs); pass `padding_side="right"` to a call for training.

    Args:
        image_processor ([`BaseImageProcessor`]):
            The image processor, e.g. a [`CLIPImageProcessor`] configured like the vision encoder's preprocessing.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The tokenizer of the language model. It is modified in place (special tokens, padding side).
        chat_template (`str`, *optional*):
            A Jinja template used to turn a list of messages into a prompt string.
        media_token (`str`, *optional*, defaults to `"<image>"`):
            The token that marks where an image appears in the text.
        end_of_chunk_token (`str`, *optional*, defaults to `"<|endofchunk|>"`):
            The token that ends an image-text chunk. Generation usually stops on it.
        pad_token (`str`, *optional*, defaults to `"<PAD>"`):
            The padding token added when the tokenizer has none. Ignored if the tokenizer already has a pad token.
        media_token_id (`int`, *optional*):
            The id `media_token` must have, e.g. the model's `config.media_token_id`. Checked once the tokens are
            added; a mismatch raises instead of silently feeding the model the wrong token.
        eoc_token_id (`int`, *optional*):
            The id `end_of_chunk_token` must have, e.g. the model's `config.eoc_token_id`. Checked like
            `media_token_id`.

    The ids depend on the tokenizer's vocabulary before the tokens are added: a tokenizer that already has a pad
    token (or other added tokens) gives `<image>` and `<|endofchunk|>` other ids than the one the model was
    converted with. `save_pretrained` therefore records both ids in `processor_config.json`, and `from_pretrained`
    refuses a tokenizer that gives them other ids. To check a processor built by hand against a model, pass
    `media_token_id=model.config.media_token_id, eoc_token_id=model.config.eoc_token_id`.
    """

    valid_processor_kwargs = FlamingoProcessorKwargs
    text_kwargs = dict(_PADDING_DEFAULTS)

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        media_token: str = "<image>",
        end_of_chunk_token: str = "<|endofchunk|>",
        pad_token: str = "<PAD>",
        media_token_id: int | None = None,
        eoc_token_id: int | None = None,
        **kwargs,
    ):
        if image_processor is None:
            raise ValueError("FlamingoProcessor needs an `image_processor`.")
        if tokenizer is None:
            raise ValueError("FlamingoProcessor needs a `tokenizer`.")
        if media_token == end_of_chunk_token:
            raise ValueError(f"`media_token` and `end_of_chunk_token` must differ, both are {media_token!r}.")

        self.media_token = media_token
        self.end_of_chunk_token = end_of_chunk_token
        self._add_flamingo_special_tokens(tokenizer, pad_token)
        self._check_token_ids(tokenizer, media_token_id, eoc_token_id)
        tokenizer.padding_side = "left"
        if chat_template is None:
            chat_template = flamingo_chat_template(media_token, end_of_chunk_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def _check_token_ids(self, tokenizer: Any, media_token_id: int | None, eoc_token_id: int | None) -> None:
        """Raises if the tokenizer gives the media or end-of-chunk token another id than expected, or pads with one."""
        actual = {
            "media_token_id": (self.media_token, tokenizer.convert_tokens_to_ids(self.media_token), media_token_id),
            "eoc_token_id": (
                self.end_of_chunk_token,
                tokenizer.convert_tokens_to_ids(self.end_of_chunk_token),
                eoc_token_id,
            ),
        }
        if any(expected is not None and expected != token_id for _, token_id, expected in actual.values()):
            found = " and ".join(f"`{token}` id {token_id}" for token, token_id, _ in actual.values())
            wanted = " and ".join(
                f"`{name}={expected}`" for name, (_, _, expected) in actual.items() if expected is not None
            )
            raise ValueError(
                f"The tokenizer gives {found}, but this processor expects {wanted} (the ids the model uses: its "
                "`config.media_token_id` / `config.eoc_token_id`, saved in `processor_config.json`). The tokenizer "
                "most likely had other added tokens (often a pad token) before these were added, which shifts their "
                "ids. Use the tokenizer saved with the checkpoint, e.g. `FlamingoProcessor.from_pretrained(checkpoint)`."
            )
        pad_token_id = tokenizer.pad_token_id
        for token, token_id, _ in actual.values():
            if pad_token_id == token_id:
                raise ValueError(
                    f"The tokenizer's pad token {tokenizer.pad_token!r} is `{token}` (id {token_id}); padding would "
                    f"then look like `{token}` to the model. Give the tokenizer another pad token, e.g. "
                    "`tokenizer.pad_token = tokenizer.eos_token`, or none (the processor then adds `<PAD>`)."
                )

    def to_dict(self) -> dict[str, Any]:
        """Serializes the processor, recording the ids of the media and end-of-chunk tokens (checked on reload)."""
        output = super().to_dict()
        output["media_token_id"] = self.media_token_id
        output["eoc_token_id"] = self.eoc_token_id
        return output

    def _add_flamingo_special_tokens(self, tokenizer: Any, pad_token: str) -> None:
        """Registers the chunk and media tokens (and a pad token if missing), keeping existing ids and special tokens."""
        missing = [
            token for token in (self.end_of_chunk_token, self.media_token) if token not in tokenizer.all_special_tokens
        ]
        if missing:
            # Extend the list of extra special tokens instead of replacing it. The keyword is called
            # `replace_extra_special_tokens` in transformers 5 and `replace_additional_special_tokens` in 4.x.
            parameters = inspect.signature(tokenizer.add_special_tokens).parameters
            keep_existing = {}
            for name in ("replace_extra_special_tokens", "replace_additional_special_tokens"):
                if name in parameters:
                    keep_existing[name] = False
                    break
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, **keep_existing)
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": pad_token})

    @property
    def media_token_id(self) -> int:
        """`int`: The id of `media_token` (`<image>`)."""
        return self.tokenizer.convert_tokens_to_ids(self.media_token)

    @property
    def eoc_token_id(self) -> int:
        """`int`: The id of `end_of_chunk_token` (`<|endofchunk|>`)."""
        return self.tokenizer.convert_tokens_to_ids(self.end_of_chunk_token)

    @property
    def image_token(self) -> str:
        """`str`: Alias of `media_token`, the name generic transformers code looks for."""
        return self.media_token

    @property
    def image_token_id(self) -> int:
        """`int`: Alias of `media_token_id`, the name generic transformers code looks for."""
        return self.media_token_id

    @property
    def model_input_names(self) -> list[str]:
        """`list[str]`: The names of the model inputs this processor returns."""
        return list(self.tokenizer.model_input_names) + ["pixel_values"]

    def __call__(
        self,
        images: ImageInput | list[list[ImageInput]] | None = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Tokenizes interleaved text and preprocesses its images.

        Each image needs exactly one `<image>` token at the place where it appears in its text. The number of
        `<image>` tokens is counted in the token ids (after truncation), per sample, and must equal the number of
        images given for that sample.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str` (path or URL), or a (nested) list of them, *optional*):
                The images, in one of these layouts:

                - a nested list with one (possibly empty) list of images per text, e.g. `[[img_a, img_b], [img_c], []]`;
                - a single image or a flat list of images: all of them for a single text, or, for several texts,
                  handed out in order, one per `<image>` token (e.g. one image per text).

                Paths, URLs and base64 strings are loaded with transformers' `load_image`.

                Arrays and tensors are single images when they have 2 or 3 dimensions, and a stack of images when
                they have 4. Every image is checked before any work, and errors name the sample and image index:
                images must not be empty; arrays need 3 channels, or 1 (grayscale, also `(height, width)`) or 4
                (RGBA), which are converted to RGB like PIL images of mode `L` and `RGBA` when the image processor's
                `do_convert_rgb` is set (CLIP's default) and refused otherwise; float values must be finite, integer
                values within `[0, 255]`, and boolean images are refused. Float images whose values all lie in
                [0, 1] while `do_rescale=True` log transformers' warning "It looks like you are trying to rescale
                already rescaled images..." and would be divided by 255 twice: pass `do_rescale=False` for them.
            text (`str` or `list[str]`, *optional*):
                The text(s) to tokenize, with `<image>` (and usually `<|endofchunk|>`) tokens written inline.
            videos, audio:
                Not supported; they are accepted so that the generic processor API can call this method, and must be
                `None`.
            return_tensors (`str` or [`~utils.TensorType`], *optional*):
                `"pt"` for PyTorch tensors, `"np"` for NumPy arrays, or `None` for Python lists. `pixel_values` is
                always one stacked array: a `torch.Tensor` unless `return_tensors="np"`.
            padding (`bool`, `str` or [`~utils.PaddingStrategy`], *optional*, defaults to `"longest"`):
                Padding strategy of the tokenizer. Padding goes on the tokenizer's padding side (left by default);
                pass `padding_side="right"` to change it for one call.
            **kwargs:
                Further keyword arguments for the tokenizer (`truncation`, `max_length`, `padding_side`,
                `add_special_tokens`, ...) and the image processor, either flat or grouped in `text_kwargs` and
                `images_kwargs`.

        Returns:
            [`BatchFeature`]: A dictionary with the fields

            - **input_ids** -- Token ids of shape `(batch_size, sequence_length)`.
            - **attention_mask** -- Attention mask of shape `(batch_size, sequence_length)`, 0 on padding.
            - **pixel_values** -- Images of shape `(batch_size, max_num_images, num_channels, height, width)`, where
              `max_num_images` is the largest number of images of any sample; samples with fewer images are padded
              with zeros after their own images. Only present if at least one image was given.
            - **mm_token_type_ids** -- Only if `return_mm_token_type_ids=True`: 1 at `<image>` tokens, 0 elsewhere.
        """
        if videos is not None or audio is not None:
            raise ValueError("FlamingoProcessor only handles `text` and `images`, not `videos` or `audio`.")
        if text is None and images is None:
            raise ValueError("You need to provide `text`, `images` or both to FlamingoProcessor.")

        texts = self._normalize_text(text)
        images_per_sample = self._group_images(_load_image_references(images), texts)

        merged_kwargs = self._merge_kwargs(
            FlamingoProcessorKwargs,
            tokenizer_init_kwargs=self.tokenizer.init_kwargs,
            **kwargs,
        )
        text_kwargs = merged_kwargs["text_kwargs"]
        images_kwargs = merged_kwargs["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        return_mm_token_type_ids = text_kwargs.pop(
            "return_mm_token_type_ids", merged_kwargs.get("return_mm_token_type_ids", False)
        )
        text_kwargs.pop("return_text_replacement_offsets", None)
        tensor_type = self._check_call_options(return_tensors, text_kwargs)
        images_per_sample = self._prepare_images(images_per_sample, images_kwargs)

        data: dict[str, Any] = {}
        if texts is not None:
            text_inputs = self.tokenizer(texts, return_tensors=None, **text_kwargs)
            self._check_media_tokens(
                text_inputs["input_ids"], images_per_sample, text_kwargs.get("truncation"), texts=texts
            )
            data.update(text_inputs)
            if return_mm_token_type_ids:
                data["mm_token_type_ids"] = self.create_mm_token_type_ids(text_inputs["input_ids"])

        pixel_values = self._pack_images(images_per_sample, images_kwargs)
        if pixel_values is not None:
            data["pixel_values"] = pixel_values.numpy() if tensor_type == "np" else pixel_values

        return BatchFeature(data=data, tensor_type=tensor_type)

    @staticmethod
    def _check_call_options(return_tensors: Any, text_kwargs: dict[str, Any]) -> str | None:
        """Validates `return_tensors` and `padding_side`; returns the tensor type as `"pt"`, `"np"` or `None`."""
        tensor_type = None if return_tensors is None else str(getattr(return_tensors, "value", return_tensors))
        if tensor_type not in (None, "pt", "np"):
            raise ValueError(
                f"FlamingoProcessor supports `return_tensors` 'pt', 'np' or None, got {return_tensors!r}. "
                "`pixel_values` is built with torch; convert the outputs yourself for other frameworks."
            )
        padding_side = text_kwargs.get("padding_side")
        if padding_side is not None and padding_side not in ("left", "right"):
            raise ValueError(
                f"`padding_side` must be 'left' (for generation, the default) or 'right' (for training), got "
                f"{padding_side!r}."
            )
        return tensor_type

    @staticmethod
    def _normalize_text(text: str | list[str] | None) -> list[str] | None:
        """Returns the texts as a list, or `None` when no text was given."""
        if text is None:
            return None
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)) and len(text) > 0 and all(isinstance(sample, str) for sample in text):
            return list(text)
        if not isinstance(text, (list, tuple)):
            received = f"got {type(text).__name__}"
        elif len(text) == 0:
            received = "got an empty list"
        else:
            index = next(index for index, sample in enumerate(text) if not isinstance(sample, str))
            received = f"got a {type(text).__name__} whose element {index} is {type(text[index]).__name__}"
            if isinstance(text[index], int):
                received += " (token ids go to the model or the data collator as `input_ids`, not to `text`)"
        raise ValueError(f"`text` must be a string or a non-empty list of strings, {received}.")

    def _group_images(self, images: Any, texts: list[str] | None) -> list[list]:
        """
        Groups `images` into one list of images per sample.

        Args:
            images: The `images` argument of `__call__`, paths and URLs already loaded.
            texts (`list[str]`, *optional*): The texts, or `None` if no text was given.

        Returns:
            `list[list]`: One (possibly empty) list of images per sample.
        """
        num_samples = len(texts) if texts is not None else None
        if images is None:
            return [[] for _ in range(num_samples)]
        if isinstance(images, (list, tuple)) and len(images) == 0:
            return [[] for _ in range(num_samples if num_samples is not None else 1)]

        flat = _as_image_list(images)
        if flat is not None:
            return [flat] if num_samples in (None, 1) else self._split_flat_images(flat, texts)

        if isinstance(images, (list, tuple)) and all(isinstance(sample, (list, tuple)) for sample in images):
            grouped = []
            for sample_images in images:
                sample_list = [] if len(sample_images) == 0 else _as_image_list(sample_images)
                if sample_list is None:
                    break
                grouped.append(sample_list)
            else:
                if num_samples is not None and len(grouped) != num_samples:
                    raise ValueError(
                        f"Got {len(grouped)} lists of images for {num_samples} texts; pass exactly one (possibly "
                        "empty) list of images per text."
                    )
                return grouped

        raise ValueError(
            "`images` must be a PIL image, a NumPy array or torch tensor, a path or URL, a flat list of these (handed "
            "out in order of the `<image>` tokens), or a nested list with one list of images per text."
            + _describe_invalid_images(images)
        )

    def _split_flat_images(self, images: list, texts: list[str]) -> list[list]:
        """Hands a flat list of images for several texts out in order, as many to each text as it has `<image>`
        tokens (as transformers' VLM processors do), e.g. one image per text."""
        counts = [text.count(self.media_token) for text in texts]
        if sum(counts) != len(images):
            raise ValueError(
                f"Got a flat list of {len(images)} image(s) for {len(texts)} texts with {sum(counts)} "
                f"`{self.media_token}` token(s) in all (per text: {counts}). A flat list is handed out in order, one "
                f"image per `{self.media_token}` token; give as many images as tokens, or one list of images per text, "
                "e.g. `images=[[img_a, img_b], [img_c], []]`."
            )
        starts = [sum(counts[:index]) for index in range(len(counts))]
        return [images[start : start + count] for start, count in zip(starts, counts, strict=True)]

    def _image_option(self, images_kwargs: dict[str, Any], name: str, default: Any) -> Any:
        """The value of image processor option `name` for this call: the call's, else the image processor's."""
        value = images_kwargs.get(name)
        if value is None:
            value = getattr(self.image_processor, name, None)
        return default if value is None else value

    def _prepare_images(self, images_per_sample: list[list], images_kwargs: dict[str, Any]) -> list[list]:
        """
        Checks every image before any preprocessing and gives 2-D (grayscale) arrays a channel axis.

        PIL images must not be empty and, with `do_convert_rgb=False`, must be RGB. Arrays and tensors must have 3
        channels, or 1 (grayscale) or 4 (RGBA) with `do_convert_rgb=True`, which converts them to RGB like PIL images
        of mode `L` and `RGBA`. Their values are checked by [`~image_tokens.check_raw_image_values`].

        Raises:
            ValueError: Naming the sample and image index, what was found and what is expected.
        """
        options = {
            "do_rescale": bool(self._image_option(images_kwargs, "do_rescale", False)),
            "rescale_factor": float(self._image_option(images_kwargs, "rescale_factor", 1 / 255)),
            "do_convert_rgb": bool(self._image_option(images_kwargs, "do_convert_rgb", False)),
            "data_format": _data_format(images_kwargs.get("input_data_format")),
        }
        return [
            [
                self._prepare_image(image, f"Image {index} of sample {sample}", **options)
                for index, image in enumerate(sample_images)
            ]
            for sample, sample_images in enumerate(images_per_sample)
        ]

    @staticmethod
    def _prepare_image(
        image: Any, name: str, do_rescale: bool, rescale_factor: float, do_convert_rgb: bool, data_format: str | None
    ) -> Any:
        """Checks one image (see `_prepare_images`); returns it, with a channel axis if it was 2-D."""
        if isinstance(image, Image.Image):
            if image.width == 0 or image.height == 0:
                raise ValueError(f"{name} is empty ({image.width}x{image.height} pixels); images need pixels.")
            if not do_convert_rgb and image.mode != "RGB":
                raise ValueError(
                    f"{name} is a PIL image in mode {image.mode!r} but `do_convert_rgb=False` keeps it so, and 3 "
                    "(RGB) channels are expected. Pass `do_convert_rgb=True` or convert it with `image.convert('RGB')`."
                )
            return image
        channels, size = _channels_and_size(tuple(image.shape), data_format)
        if min(size) == 0:
            raise ValueError(f"{name} has shape {tuple(image.shape)}: its height and width must be at least 1 pixel.")
        if channels not in _NUM_CHANNELS or (channels != 3 and not do_convert_rgb):
            raise ValueError(
                f"{name} has shape {tuple(image.shape)} with {channels} channel(s); expected 3 (RGB) channels, as "
                "`(height, width, 3)` or `(3, height, width)` (1 or 4 channels are converted to RGB when "
                "`do_convert_rgb=True`)."
            )
        value_range = check_raw_image_values(image, name, do_rescale=do_rescale, rescale_factor=rescale_factor)
        is_float = image.is_floating_point() if isinstance(image, torch.Tensor) else image.dtype.kind == "f"
        if channels == 4 and is_float and value_range is not None and (value_range[0] < 0 or value_range[1] > 1):
            raise ValueError(
                f"{name} has 4 (RGBA) channels and float values in [{value_range[0]:g}, {value_range[1]:g}]; "
                "converting RGBA to RGB composites onto white and needs floats in [0, 1] (with `do_rescale=False`) "
                "or `uint8` values. Drop the alpha channel yourself if it is not transparency."
            )
        if image.ndim == 2:
            return image[..., None] if data_format == "channels_last" else image[None]
        return image

    def _check_media_tokens(
        self,
        input_ids: list[list[int]],
        images_per_sample: list[list],
        truncation: Any = None,
        texts: list[str] | None = None,
    ) -> None:
        """Raises a `ValueError` if a sample's number of media tokens differs from its number of images."""
        if len(input_ids) != len(images_per_sample):
            raise ValueError(
                f"The tokenizer returned {len(input_ids)} sequences for {len(images_per_sample)} texts; options that "
                "change the number of sequences (such as `return_overflowing_tokens`) are not supported."
            )
        token_counts = image_tokens_per_sample(input_ids, self.media_token_id)
        image_counts = [len(sample_images) for sample_images in images_per_sample]
        if token_counts == image_counts:
            return
        hint = ""
        if truncation not in (None, False, "do_not_truncate"):
            hint = f" Truncation may have removed `{self.media_token}` tokens."
        if texts is not None:
            pairs = enumerate(zip(token_counts, image_counts, strict=True))
            sample = next(index for index, (num_tokens, num_images) in pairs if num_tokens != num_images)
            hint += self._misspelling_hint(texts[sample])
        check_image_token_counts(token_counts, image_counts, self.media_token, hint=hint)

    def _misspelling_hint(self, text: str) -> str:
        """A hint naming spellings of the media token in `text` that are not the token (`<Image>`, `< image>`)."""
        core = re.escape(self.media_token.strip("<>").strip())
        pattern = re.compile(rf"<\s*{core}\s*/?\s*>", re.IGNORECASE) if core else None
        variants = sorted({match for match in pattern.findall(text) if match != self.media_token}) if pattern else []
        if not variants:
            return ""
        return (
            f" Its text contains {', '.join(repr(variant) for variant in variants)}, which is not the media token "
            f"{self.media_token!r}: write it exactly so."
        )

    def _pack_images(self, images_per_sample: list[list], images_kwargs: dict) -> torch.Tensor | None:
        """
        Preprocesses all images at once and packs them per sample.

        Args:
            images_per_sample (`list[list]`): One list of images per sample.
            images_kwargs (`dict`): Keyword arguments for the image processor.

        Returns:
            `torch.Tensor` of shape `(batch_size, max_num_images, num_channels, height, width)`, zero-padded on the
            image axis, or `None` if there are no images.

        Raises:
            ValueError: If the images do not all have the same shape after preprocessing (e.g. with
                `do_resize=False` or `do_center_crop=False`), naming the first two that differ.
        """
        counts = [len(sample_images) for sample_images in images_per_sample]
        if sum(counts) == 0:
            return None
        flat_images = [image for sample_images in images_per_sample for image in sample_images]
        processed = self.image_processor(flat_images, return_tensors=None, **images_kwargs)["pixel_values"]
        if isinstance(processed, (np.ndarray, torch.Tensor)):
            stacked = torch.as_tensor(processed)
        else:
            processed = [torch.as_tensor(image) for image in processed]
            self._check_processed_shapes(processed, counts)
            stacked = torch.stack(processed)
        return stack_images_per_sample(stacked.split(counts))

    @staticmethod
    def _check_processed_shapes(processed: list[torch.Tensor], counts: list[int]) -> None:
        """Raises if the preprocessed images differ in shape, naming the sample and index of the first two."""
        names = [f"image {index} of sample {sample}" for sample, count in enumerate(counts) for index in range(count)]
        for position, image in enumerate(processed):
            if image.shape != processed[0].shape:
                raise ValueError(
                    f"After preprocessing, {names[position]} has shape {tuple(image.shape)} but {names[0]} has "
                    f"{tuple(processed[0].shape)}; all images must have the same size to be stacked. Keep "
                    "`do_resize=True` and `do_center_crop=True` (the image processor's defaults) or resize the "
                    "images to one size yourself."
                )


__all__ = ["FlamingoProcessor"]
