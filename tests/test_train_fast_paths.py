"""The training step's speed paths give the same model: padding-free text encoding and the CPU
attention kernel choice."""
import pytest
import torch

from helpers import CPU, config, micro_model_config, write_micro_model
from mmssl.models import create_model
from mmssl.models.text_trim import can_trim, encode_text, trimmed_length
from mmssl.train import allocator
from mmssl.train.attention import MATH_MAX_TOKENS, longest_sequence, training_attention
from mmssl.train.loop import _channels_last_conv_tower, build_trainer

CAPTIONS = ["a red circle", "a small blue star in the top left corner", "there is a green cross and a pink diamond"]


def model_from(folder, cfg):
    path = write_micro_model(folder, cfg, name="model.json")
    torch.manual_seed(0)
    return create_model(str(path))


def micro_model(folder, **text_cfg):
    return model_from(folder, micro_model_config(text=text_cfg))


def test_trimmed_length_is_the_longest_caption():
    tokens = torch.tensor([[5, 7, 9, 0, 0, 0], [5, 8, 0, 0, 0, 0]])
    assert trimmed_length(tokens) == 3
    assert trimmed_length(torch.zeros(2, 6, dtype=torch.long)) == 1


def test_trimmed_text_features_and_gradients_equal_open_clips(tmp_path):
    model = micro_model(tmp_path)
    tokens = model.tokenizer(CAPTIONS)
    assert can_trim(model) and trimmed_length(tokens) < tokens.shape[1]
    full = model.encode_text(tokens, normalize=True)
    full.sum().backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    trimmed = encode_text(model, tokens, normalize=True)
    trimmed.sum().backward()
    assert torch.allclose(trimmed, full, atol=1e-6)
    for name, grad in full_grads.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("text_cfg", [{"pool_type": "last"}, {"no_causal_mask": True}])
def test_towers_where_trimming_is_not_exact_run_unchanged(tmp_path, text_cfg):
    model = micro_model(tmp_path, **text_cfg)
    tokens = model.tokenizer(CAPTIONS)
    assert not can_trim(model)
    assert torch.equal(encode_text(model, tokens), model.encode_text(tokens))


def test_math_attention_only_for_short_bf16_sequences_on_cpu(tmp_path):
    cpu = torch.device("cpu")
    tiny = create_model("tiny-vit-64")
    assert longest_sequence(tiny) == 65 <= MATH_MAX_TOKENS
    with training_attention(tiny, cpu, torch.bfloat16):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    with training_attention(tiny, cpu, torch.float32):  # fp32: flash is faster at every length
        assert torch.backends.cuda.flash_sdp_enabled()
    long = model_from(tmp_path, {"embed_dim": 32,
                                 "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "patch_size": 16},
                                 "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}})
    assert longest_sequence(long) == 197
    with training_attention(long, cpu, torch.bfloat16):
        assert torch.backends.cuda.flash_sdp_enabled()


def test_allocator_tuning_applies_on_glibc_and_is_a_no_op_without_it(monkeypatch):
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert allocator.keep_freed_memory()

    def no_libc(*args, **kwargs):
        raise OSError("no libc")

    monkeypatch.setattr(allocator.ctypes, "CDLL", no_libc)
    assert allocator.keep_freed_memory() is False


def test_channels_last_resnet_tower_gives_the_same_features_and_gradients():
    torch.manual_seed(0)
    reference = create_model("tiny-rn-64")
    converted = create_model("tiny-rn-64")
    converted.load_state_dict(reference.state_dict())
    assert _channels_last_conv_tower(converted)
    stage_filter = converted.visual.layer1[0].conv2.weight   # 3x3 (a 1x1 filter is both layouts)
    assert stage_filter.is_contiguous(memory_format=torch.channels_last) and not stage_filter.is_contiguous()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for model in (reference, converted):
        model.train()
        model.encode_image(images).square().sum().backward()
    assert torch.allclose(converted.encode_image(images), reference.encode_image(images), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(reference.visual.named_parameters(), converted.visual.parameters()):
        # summation order differs, nothing else (the key bias's true gradient is zero: softmax ignores it)
        assert (q.grad - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-5, name
    vit = create_model("tiny-vit-64")
    assert not _channels_last_conv_tower(vit) and vit.visual.conv1.weight.is_contiguous()


def test_cpu_trainer_keeps_a_resnet_tower_channels_last(world, tmp_path):
    trainer = build_trainer(config(world, tmp_path / "run", "model.name=tiny-rn-64", "train.steps=1"), CPU)
    weight = trainer.objective.model.visual.layer2[0].conv2.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
