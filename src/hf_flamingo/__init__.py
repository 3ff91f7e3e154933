"""hf_flamingo: Flamingo as a Hugging Face transformers-native model.

Importing the package registers the classes with transformers' Auto classes, so that `AutoConfig`,
`AutoModel`, `AutoModelForImageTextToText`, `AutoProcessor` (and `AutoModelForCausalLM` for MosaicGPT) load saved directories.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_flamingo import FlamingoConfig
from .configuration_mosaic_gpt import MosaicGPTConfig
from .cpu_kernels import cpu_fast_path
from .data_collator import FlamingoDataCollator, build_flamingo_labels
from .gates import closed_gates
from .image_processing_flamingo import FlamingoImageProcessor
from .modeling_flamingo import (
    FlamingoCausalLMOutputWithPast,
    FlamingoForConditionalGeneration,
    FlamingoModel,
    FlamingoModelOutputWithPast,
    FlamingoPreTrainedModel,
)
from .modeling_mosaic_gpt import MosaicGPTForCausalLM, MosaicGPTModel
from .peft_utils import flamingo_lora_config
from .processing_flamingo import FlamingoProcessor

__version__ = "0.1.0.dev0"

AutoConfig.register(FlamingoConfig.model_type, FlamingoConfig, exist_ok=True)
AutoModel.register(FlamingoConfig, FlamingoModel, exist_ok=True)
AutoModelForImageTextToText.register(FlamingoConfig, FlamingoForConditionalGeneration, exist_ok=True)
AutoProcessor.register(FlamingoConfig, FlamingoProcessor, exist_ok=True)
# One implementation serves both backend requests: the PIL path is the one that reproduces open_clip exactly.
AutoImageProcessor.register(
    FlamingoConfig,
    image_processor_classes={"pil": FlamingoImageProcessor, "torchvision": FlamingoImageProcessor},
    exist_ok=True,
)
AutoConfig.register(MosaicGPTConfig.model_type, MosaicGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(MosaicGPTConfig, MosaicGPTForCausalLM, exist_ok=True)

# `save_pretrained` also writes the defining code and an `auto_map`, so that saved directories load with
# `trust_remote_code=True` where this package is not installed.
FlamingoConfig.register_for_auto_class()
FlamingoModel.register_for_auto_class("AutoModel")
FlamingoForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
FlamingoProcessor.register_for_auto_class("AutoProcessor")
FlamingoImageProcessor.register_for_auto_class("AutoImageProcessor")
MosaicGPTConfig.register_for_auto_class()
MosaicGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "FlamingoCausalLMOutputWithPast",
    "FlamingoConfig",
    "FlamingoDataCollator",
    "FlamingoForConditionalGeneration",
    "FlamingoImageProcessor",
    "FlamingoModel",
    "FlamingoModelOutputWithPast",
    "FlamingoPreTrainedModel",
    "FlamingoProcessor",
    "MosaicGPTConfig",
    "MosaicGPTForCausalLM",
    "MosaicGPTModel",
    "build_flamingo_labels",
    "closed_gates",
    "cpu_fast_path",
    "flamingo_lora_config",
]
