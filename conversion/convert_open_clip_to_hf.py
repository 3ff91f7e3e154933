"""Convert an open_clip ViT checkpoint into a Transformers `CLIPVisionModel` directory (see `--help`).

The output directory holds the model (`config.json`, `model.safetensors`) and an image processor reproducing
open_clip's evaluation transform (`preprocessor_config.json`); load them with `CLIPVisionModel.from_pretrained(dir)`
(or `CLIPVisionModelWithProjection` after `--with-projection`) and `CLIPImageProcessorPil.from_pretrained(dir)`.

Examples:

    # A tower trained with open_clip, its model config as a JSON file:
    python conversion/convert_open_clip_to_hf.py --checkpoint epoch_32.pt --model-config my-vit.json \
        --output-dir my-vit-hf

    # OpenFlamingo's tower (OpenAI ViT-L/14 weights, trained with QuickGELU), config by name (needs open_clip):
    python conversion/convert_open_clip_to_hf.py --checkpoint ViT-L-14-openai.safetensors --model-config ViT-L-14 \
        --quick-gelu --output-dir clip-vit-l-14-hf
"""

import sys

from hf_flamingo.conversion.open_clip_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
