"""Processor class for Flamingo (OpenFlamingo-compatible).

Besides torch, transformers, PIL/numpy and the standard library it imports only `image_tokens.py` (the `<image>`
contract it shares with the collator and the model), so that both ship as remote code next to a checkpoint.
"""

import inspect
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from .image_tokens import check_image_token_counts, image_tokens_per_sample, stack_images_per_sample

_PADDING_DEFAULTS = {"padding": "longest"}


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
        tokenizer.padding_side = "left"
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

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
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, or a (nested) list of them, *optional*):
                The images, in one of these layouts:

                - a nested list with one (possibly empty) list of images per text, e.g. `[[img_a, img_b], [img_c], []]`;
                - a single image or a flat list of images, only when `text` is a single string (or `None`).

                Arrays and tensors are single images when they have 2 or 3 dimensions, and a stack of images when
                they have 4.
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
        num_samples = len(texts) if texts is not None else None
        images_per_sample = self._group_images(images, num_samples)

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
        tensor_type = None if return_tensors is None else str(getattr(return_tensors, "value", return_tensors))
        if tensor_type not in (None, "pt", "np"):
            raise ValueError(
                f"FlamingoProcessor supports `return_tensors` 'pt', 'np' or None, got {return_tensors!r}."
            )

        data: dict[str, Any] = {}
        if texts is not None:
            text_inputs = self.tokenizer(texts, return_tensors=None, **text_kwargs)
            self._check_media_tokens(text_inputs["input_ids"], images_per_sample, text_kwargs.get("truncation"))
            data.update(text_inputs)
            if return_mm_token_type_ids:
                data["mm_token_type_ids"] = self.create_mm_token_type_ids(text_inputs["input_ids"])

        pixel_values = self._pack_images(images_per_sample, images_kwargs)
        if pixel_values is not None:
            data["pixel_values"] = pixel_values.numpy() if tensor_type == "np" else pixel_values

        return BatchFeature(data=data, tensor_type=tensor_type)

    @staticmethod
    def _normalize_text(text: str | list[str] | None) -> list[str] | None:
        """Returns the texts as a list, or `None` when no text was given."""
        if text is None:
            return None
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)) and len(text) > 0 and all(isinstance(sample, str) for sample in text):
            return list(text)
        raise ValueError("`text` must be a string or a non-empty list of strings.")

    @staticmethod
    def _group_images(images: Any, num_samples: int | None) -> list[list]:
        """
        Groups `images` into one list of images per sample.

        Args:
            images: The `images` argument of `__call__`.
            num_samples (`int`, *optional*): The number of texts, or `None` if no text was given.

        Returns:
            `list[list]`: One (possibly empty) list of images per sample.
        """
        if images is None:
            return [[] for _ in range(num_samples)]
        if isinstance(images, (list, tuple)) and len(images) == 0:
            return [[] for _ in range(num_samples if num_samples is not None else 1)]

        flat = _as_image_list(images)
        if flat is not None:
            if num_samples is not None and num_samples != 1:
                raise ValueError(
                    f"Got a flat list of {len(flat)} image(s) for {num_samples} texts, which is ambiguous. Pass one "
                    "list of images per text instead, e.g. `images=[[img_a, img_b], [img_c], []]`."
                )
            return [flat]

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
            "`images` must be a PIL image, a NumPy array or torch tensor, a flat list of these (for a single text), "
            "or a nested list with one list of images per text."
        )

    def _check_media_tokens(
        self, input_ids: list[list[int]], images_per_sample: list[list], truncation: Any = None
    ) -> None:
        """Raises a `ValueError` if a sample's number of media tokens differs from its number of images."""
        if len(input_ids) != len(images_per_sample):
            raise ValueError(
                f"The tokenizer returned {len(input_ids)} sequences for {len(images_per_sample)} texts; options that "
                "change the number of sequences (such as `return_overflowing_tokens`) are not supported."
            )
        truncated = truncation not in (None, False, "do_not_truncate")
        check_image_token_counts(
            image_tokens_per_sample(input_ids, self.media_token_id),
            [len(sample_images) for sample_images in images_per_sample],
            self.media_token,
            hint=f" Truncation may have removed `{self.media_token}` tokens." if truncated else "",
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
        """
        counts = [len(sample_images) for sample_images in images_per_sample]
        if sum(counts) == 0:
            return None
        flat_images = [image for sample_images in images_per_sample for image in sample_images]
        processed = self.image_processor(flat_images, return_tensors="pt", **images_kwargs)["pixel_values"]
        return stack_images_per_sample(torch.as_tensor(processed).split(counts))


__all__ = ["FlamingoProcessor"]
