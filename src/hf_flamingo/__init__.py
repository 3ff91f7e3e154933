"""hf_flamingo: Flamingo as a Hugging Face transformers-native model.

Importing the package registers the classes with transformers' Auto classes, so that `AutoConfig`,
`AutoModelForImageTextToText` and `AutoProcessor` load saved Flamingo directories.
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .configuration_flamingo import FlamingoConfig
from .modeling_flamingo import (
    FlamingoCausalLMOutputWithPast,
    FlamingoForConditionalGeneration,
    FlamingoPreTrainedModel,
)
from .processing_flamingo import FlamingoProcessor

__version__ = "0.1.0.dev0"

AutoConfig.register(FlamingoConfig.model_type, FlamingoConfig, exist_ok=True)
AutoModelForImageTextToText.register(FlamingoConfig, FlamingoForConditionalGeneration, exist_ok=True)
AutoProcessor.register(FlamingoConfig, FlamingoProcessor, exist_ok=True)

__all__ = [
    "FlamingoCausalLMOutputWithPast",
    "FlamingoConfig",
    "FlamingoForConditionalGeneration",
    "FlamingoPreTrainedModel",
    "FlamingoProcessor",
]
