"""`mmssl export`: turn an mmssl checkpoint into weights + model config that open_clip loads directly.

Writes into DIR:
- `<name>.json`: the open_clip model config (embed_dim, vision_cfg, text_cfg; for a CoCa model also
  multimodal_cfg, and the weights include its text_decoder: open_clip builds the same CoCa);
- `open_clip_model.safetensors`: the dual encoder's state dict under open_clip's key names;
- `open_clip_config.json`: the same config plus preprocessing in the layout open_clip's
  `local-dir:` / Hugging Face Hub loading reads (with the HF tokenizer files when there is an HF tower).

Then, in any open_clip program:
    open_clip.add_model_config("DIR/<name>.json")
    model = open_clip.create_model("<name>", pretrained="DIR/open_clip_model.safetensors")
    tokenizer = open_clip.get_tokenizer("<name>")
or simply `open_clip.create_model("local-dir:DIR")`.

A Hugging Face text tower is stored in the config as `hf_model_name` / `hf_tokenizer_name`
pointing at the local directory it was trained from (absolute path); open_clip builds the
architecture from that directory's config.json, so the directory must exist where the export is
loaded, and its weights come from the exported file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

WEIGHTS_FILE = "open_clip_model.safetensors"
HUB_CONFIG_FILE = "open_clip_config.json"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write open_clip-loadable weights + model config JSON",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--checkpoint", required=True, help="mmssl checkpoint (.pt) or a training run folder (its checkpoints/latest.pt)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--name", default=None, help="model name to register in open_clip (default: the config's name)")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    written = export_checkpoint(args.checkpoint, args.out, name=args.name)
    for path in written:
        print(path)
    return 0


def export_checkpoint(checkpoint: str | Path, out: str | Path, name: str | None = None) -> list[Path]:
    """Export the checkpoint's dual encoder to `out`; returns the files written."""
    from mmssl.errors import UserError
    from mmssl.models.factory import load_checkpoint_model
    from mmssl.models.refs import checkpoint_ref

    ref = checkpoint_ref(checkpoint)
    if not ref.is_checkpoint:
        raise UserError(f"--checkpoint {checkpoint}: export takes an mmssl checkpoint or a run folder")
    model = load_checkpoint_model(ref.path)
    return export_model(model, out, name=name or model.model_name)


def export_model(model, out: str | Path, name: str) -> list[Path]:
    """Write `model` (built by mmssl.create_model) in open_clip's formats under `out`."""
    import json

    from open_clip.model import get_model_preprocess_cfg
    from safetensors.torch import save_file

    from mmssl.errors import UserError

    if not name or "/" in name or name.startswith("."):
        raise UserError(f"--name must be a plain model name, got {name!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{name}.json"
    config_path.write_text(json.dumps(model.open_clip_config, indent=4) + "\n")
    state = {key: tensor.detach().contiguous() for key, tensor in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    hub = {"model_cfg": model.open_clip_config, "preprocess_cfg": _jsonable(get_model_preprocess_cfg(model))}
    (out / HUB_CONFIG_FILE).write_text(json.dumps(hub, indent=4) + "\n")
    written = [config_path, out / WEIGHTS_FILE, out / HUB_CONFIG_FILE]
    if hasattr(model.tokenizer, "save_pretrained"):  # HF tokenizer: local-dir: loading reads it from `out`
        model.tokenizer.save_pretrained(str(out))
    return written


def _jsonable(preprocess_cfg: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in preprocess_cfg.items()}
