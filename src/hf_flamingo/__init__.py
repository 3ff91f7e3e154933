"""hf_flamingo: Flamingo as a Hugging Face transformers-native model."""

from transformers import AutoConfig, AutoModelForImageTextToText

from .configuration_flamingo import FlamingoConfig
from .modeling_flamingo import (
    FlamingoCausalLMOutputWithPast,
    FlamingoForConditionalGeneration,
    FlamingoPreTrainedModel,
)

__version__ = "0.1.0.dev0"

AutoConfig.register(FlamingoConfig.model_type, FlamingoConfig, exist_ok=True)
AutoModelForImageTextToText.register(FlamingoConfig, FlamingoForConditionalGeneration, exist_ok=True)

__all__ = [
    "FlamingoCausalLMOutputWithPast",
    "FlamingoConfig",
    "FlamingoForConditionalGeneration",
    "FlamingoPreTrainedModel",
]
