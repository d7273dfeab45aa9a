"""Run open_clip's own trainer on a model config it does not ship (the benchmark's anchor).

usage: PYTHONPATH=bench/.anchor python bench/openclip_anchor.py MODEL_CONFIG.json [open_clip_train.main args]

open_clip_train only accepts registered model names, so the JSON is registered first (its file
stem becomes the name, e.g. tiny-vit-64).
"""
import sys

import open_clip
from open_clip_train.main import main

if __name__ == "__main__":
    open_clip.add_model_config(sys.argv[1])
    main(sys.argv[2:])
