"""The training quick-start: a Flamingo over the real SmolLM2-135M learns to caption synthetic shapes, offline.

It builds the model with `FlamingoForConditionalGeneration.from_backbones`, draws a captioning data set, trains the
bridge with `transformers.Trainer`, saves and reloads it with the Auto classes, and prints 2-shot captions of held-out
images with their accuracy next to the gates-closed (bare SmolLM2) baseline. Same as `hf-flamingo demo`; the code is
in `hf_flamingo.demo`.

Run: `HF_HUB_OFFLINE=1 python examples/quickstart.py` (`--help` for the options).
"""

import sys

from hf_flamingo.demo import main

if __name__ == "__main__":
    sys.exit(main())
