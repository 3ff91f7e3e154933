"""Convert an OpenFlamingo v2 `checkpoint.pt` into a Transformers directory (see `--help`).

Examples:

    # A released model, backbones from the Hub:
    python conversion/convert_openflamingo_to_hf.py --release OpenFlamingo-3B-vitl-mpt1b --output-dir of-3b

    # Offline, with local copies of everything:
    python conversion/convert_openflamingo_to_hf.py --release OpenFlamingo-9B-vitl-mpt7b \
        --checkpoint checkpoint.pt --vision-model ./clip-vit-large-patch14 --language-model ./mpt-7b \
        --output-dir of-9b --dtype bfloat16
"""

import sys

from hf_flamingo.conversion.openflamingo_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
