"""Colourization (issue 18): the sRGB -> Lab conversion matches reference values, the tower's input
is a gray of the same lightness, each token's target is its area's colour on hand-made images, the
loss equals an independent recomputation on ViT and ResNet towers, `loss.kind=colorize` trains the
image tower alone, exact under accumulation and resume, beside CLIP with both terms logged, and a
weight of 0 builds nothing."""
import json

import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from helpers import (MICRO_MODEL, accumulation_matches, assert_accumulates_to_the_same_losses, assert_resumes_exactly,
                     config, objective_for, token_batch)
from mmssl.errors import UserError
from mmssl.heads.colorize import AB_SCALE, grayscale, lab_to_rgb, rgb_to_lab
from mmssl.train.metrics import read_metrics
from mmssl.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

# CIE Lab (D65) of sRGB colours, from Bruce Lindbloom's / EasyRGB's calculators
REFERENCE = [((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),       # red
             ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),      # green
             ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),     # blue
             ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),                 # white
             ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),                   # black
             ((0.5, 0.5, 0.5), (53.3890, 0.0, 0.0)),               # mid grey
             ((128 / 255,) * 3, (53.5850, 0.0, 0.0)),              # sRGB 128 grey
             ((1.0, 1.0, 0.0), (97.1393, -21.5537, 94.4780))]      # yellow
RED, BLUE = REFERENCE[0][1], REFERENCE[2][1]
MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)   # the micro models' normalisation (open_clip's default)
STD = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)


def colours(rgbs) -> torch.Tensor:
    return torch.tensor(rgbs, dtype=torch.float32).view(-1, 3, 1, 1)


def normalised(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - MEAN) / STD


@pytest.fixture(scope="module")
def resnet_json(tmp_path_factory):
    """A micro ModifiedResNet at 64 px: a 2x2 final feature map."""
    path = tmp_path_factory.mktemp("rn") / "rn.json"
    path.write_text(json.dumps({**MICRO_MODEL, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8}}))
    return path


# ---------------------------------------------------------------- the colour space

def test_rgb_to_lab_matches_the_reference_values_and_inverts():
    lab = rgb_to_lab(colours([rgb for rgb, _ in REFERENCE])).view(-1, 3)
    torch.testing.assert_close(lab, torch.tensor([lab for _, lab in REFERENCE]), atol=0.05, rtol=0)
    image = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert rgb_to_lab(image).shape == (2, 3, 5, 7)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(image)), image, atol=1e-5, rtol=0)
    # out-of-range values (an un-normalised random batch) are clamped to [0, 1] first
    torch.testing.assert_close(rgb_to_lab(colours([(1.7, -0.2, -3.0)])), rgb_to_lab(colours([(1.0, 0.0, 0.0)])))


def test_grayscale_keeps_the_lightness_and_has_no_chroma():
    image = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    gray = grayscale(image)
    torch.testing.assert_close(gray[:, 1], gray[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(gray[:, 2], gray[:, 0], atol=1e-6, rtol=0)
    lab, original = rgb_to_lab(gray), rgb_to_lab(image)
    torch.testing.assert_close(lab[:, 0], original[:, 0], atol=1e-3, rtol=0)
    assert lab[:, 1:].abs().max() < 1e-3
    # red's gray: its relative luminance Y = 0.2126 gamma-compressed, whose L is red's 53.24
    red_gray = grayscale(colours([(1.0, 0.0, 0.0)])).flatten()
    torch.testing.assert_close(red_gray, torch.full((3,), 1.055 * 0.2126729 ** (1 / 2.4) - 0.055), atol=1e-5, rtol=0)


def test_the_tower_sees_the_normalised_gray(micro_json):
    objective, _ = objective_for(micro_json, "loss.kind=colorize")
    head = objective.heads["colorize"]
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen = head.gray_input(normalised(rgb)) * STD + MEAN
    torch.testing.assert_close(seen, grayscale(rgb), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the targets

def half_red_half_blue(size: int) -> torch.Tensor:
    rgb = torch.zeros(1, 3, size, size)
    rgb[0, 0, :, : size // 2] = 1.0
    rgb[0, 2, :, size // 2:] = 1.0
    return rgb


def test_vit_targets_are_each_patch_colour(micro_json):
    objective, _ = objective_for(micro_json, "loss.kind=colorize")
    head = objective.heads["colorize"]
    assert (head.grid, head.cell) == (4, 8)                      # 32 px, patch 8
    target = head.targets(normalised(half_red_half_blue(32)))
    assert target.shape == (1, 16, 8 * 8 * 2)
    per_pixel = target.view(4, 4, 64, 2)                         # grid row, grid column, pixel, (a, b)
    red_ab, blue_ab = torch.tensor(RED[1:]) / AB_SCALE, torch.tensor(BLUE[1:]) / AB_SCALE
    torch.testing.assert_close(per_pixel[:, :2], red_ab.expand(4, 2, 64, 2), atol=5e-4, rtol=0)
    torch.testing.assert_close(per_pixel[:, 2:], blue_ab.expand(4, 2, 64, 2), atol=5e-4, rtol=0)

    rgb_head = objective_for(micro_json, "loss.kind=colorize", "heads.colorize.target=rgb")[0].heads["colorize"]
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    target = rgb_head.targets(normalised(image))
    assert target.shape == (1, 16, 8 * 8 * 3)
    # token (1, 2): rows 8..15, columns 16..23, values in (row, column, channel) order
    expected = image[0, :, 8:16, 16:24].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(target[0, 1 * 4 + 2], expected, atol=1e-5, rtol=0)


def test_resnet_targets_pool_each_cell_to_four_by_four(resnet_json):
    objective, _ = objective_for(resnet_json, "loss.kind=colorize")
    head = objective.heads["colorize"]
    assert (head.grid, head.cell) == (2, 4)                      # 64 px / 32: a 2x2 map, 4x4 pixels per cell
    target = head.targets(normalised(half_red_half_blue(64)))
    assert target.shape == (1, 4, 4 * 4 * 2)
    red_ab, blue_ab = torch.tensor(RED[1:]) / AB_SCALE, torch.tensor(BLUE[1:]) / AB_SCALE
    for token, ab in ((0, red_ab), (1, blue_ab), (2, red_ab), (3, blue_ab)):
        torch.testing.assert_close(target[0, token].view(16, 2), ab.expand(16, 2), atol=5e-4, rtol=0)
    # a target pixel is the mean ab of its 8x8 image pixels
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    target = head.targets(normalised(image))
    ab = rgb_to_lab(image)[0, 1:, 8:16, 40:48].mean(dim=(1, 2)) / AB_SCALE   # cell (0, 1), pixel (1, 1)
    torch.testing.assert_close(target[0, 1].view(4, 4, 2)[1, 1], ab, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the loss

def independent_loss(objective, images: torch.Tensor) -> float:
    """The colourization loss recomputed from its definition, step by step."""
    head, visual = objective.heads["colorize"], objective.model.visual
    rgb = (images * STD + MEAN).clamp(0, 1)
    lab = rgb_to_lab(rgb)
    # the gray of the same L: gamma-compressed relative luminance
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    y = (0.2126729 * linear[:, 0] + 0.7151522 * linear[:, 1] + 0.0721750 * linear[:, 2]).clamp(0, 1)
    gray = torch.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055)[:, None].expand(-1, 3, -1, -1)
    x = (gray - MEAN) / STD
    if hasattr(visual, "conv1") and hasattr(visual, "transformer"):                 # ViT: the patch tokens
        tokens = visual.ln_post(visual.transformer(visual._embeds(x)))[:, 1:]
    else:                                                                           # ResNet: layer4's cells
        tokens = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x))))).flatten(2).transpose(1, 2)
    decoder = head.decoder
    pred = decoder.pred(decoder.norm(decoder.blocks(decoder.embed(tokens) + decoder.pos_embed)))
    g, r = head.grid, head.cell
    ab = torch.nn.functional.adaptive_avg_pool2d(lab[:, 1:] / 110.0, (g * r, g * r))
    target = ab.view(-1, 2, g, r, g, r).permute(0, 2, 4, 3, 5, 1).reshape(-1, g * g, r * r * 2)
    return ((pred - target) ** 2).mean().item()


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_colorize_loss_equals_an_independent_recomputation(tower, micro_json, resnet_json):
    model_json, size = (micro_json, 32) if tower == "vit" else (resnet_json, 64)
    objective, _ = objective_for(model_json, "loss.kind=colorize")
    assert set(objective.heads) == {"colorize"} and objective.weights == {"colorize_loss": 1.0}
    _, texts = token_batch(rows=4, size=size)
    images = normalised(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(5)))
    terms = objective(images, texts, step=0)
    assert "contrastive_loss" not in terms
    with torch.no_grad():
        expected = independent_loss(objective, images)
    assert terms["colorize_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_depth_zero_and_rgb_targets(micro_json):
    objective, _ = objective_for(micro_json, "loss.kind=colorize", "heads.colorize.decoder_depth=0",
                                 "heads.colorize.target=rgb")
    head = objective.heads["colorize"]
    assert len(head.decoder.blocks.resblocks) == 0 and head.decoder.pred.out_features == 8 * 8 * 3
    images, texts = token_batch(rows=3)
    rgb = (images * STD + MEAN).clamp(0, 1)
    terms = objective(images, texts, step=0)
    with torch.no_grad():
        visual = objective.model.visual
        tokens = visual.ln_post(visual.transformer(visual._embeds(head.gray_input(images))))[:, 1:]
        decoder = head.decoder
        pred = decoder.pred(decoder.norm(decoder.embed(tokens) + decoder.pos_embed))   # a per-token MLP
        target = rgb.view(3, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(3, 16, 192)
    assert terms["colorize_loss"].item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-5)


def test_colorize_alone_accumulates_exactly(micro_json):
    objective, _ = objective_for(micro_json, "loss.kind=colorize")
    images, texts = token_batch(rows=12)
    grads = accumulation_matches(objective, images, None, pieces=(2, 5))
    assert any(name.startswith("heads.colorize.decoder.") for name in grads)
    assert all(name.startswith(("heads.colorize.", "model.visual.")) for name in grads)   # the image tower alone


def test_colorize_beside_clip_accumulates_exactly(micro_json):
    objective, _ = objective_for(micro_json, "loss.colorize_weight=0.5")
    images, texts = token_batch(rows=12)
    grads = accumulation_matches(objective, images, texts, pieces=(3,))
    assert any(name.startswith("heads.colorize.") for name in grads)
    assert any(name.startswith("model.transformer.") for name in grads)   # the text tower trains too


def test_weight_zero_builds_nothing_and_bad_settings_are_refused(micro_json):
    objective, _ = objective_for(micro_json)
    assert "colorize" not in objective.heads and "colorize_loss" not in objective.weights
    with pytest.raises(UserError, match="loss.colorize_weight"):
        objective_for(micro_json, "loss.kind=colorize", "loss.colorize_weight=1")
    with pytest.raises(UserError, match="heads.colorize"):
        objective_for(micro_json, "loss.kind=colorize", "heads.colorize.target=hsv")
    with pytest.raises(UserError, match="patch_dropout=0"):
        objective_for(micro_json, "loss.kind=colorize", "model.patch_dropout=0.5")


# ---------------------------------------------------------------- training

def colorize_config(world, output, *extra):
    return config(world, output, "loss.kind=colorize", "train.batch_size=8", *extra)


@pytest.fixture(scope="module")
def colorize_run(world, tmp_path_factory, one_thread):
    output = tmp_path_factory.mktemp("colorize") / "run"
    return output, train(colorize_config(world, output, "train.steps=4"))


def test_colorize_trains_the_image_tower_alone(colorize_run):
    output, straight = colorize_run
    assert len(straight.losses) == 4 and all(np.isfinite(straight.losses)) and all(0 < x < 1 for x in straight.losses)
    records = read_metrics(output / "metrics.jsonl")
    assert "colorize_loss" in records[-1] and "contrastive_loss" not in records[-1]


def test_colorize_accumulates_to_the_same_losses(world, colorize_run, tmp_path):
    _, straight = colorize_run
    assert_accumulates_to_the_same_losses(lambda out, *extra: colorize_config(world, out, *extra), straight,
                                          tmp_path / "acc", steps=4)


def test_colorize_resumes_exactly(world, colorize_run, tmp_path):
    output, straight = colorize_run
    assert_resumes_exactly(lambda out, *extra: colorize_config(world, out, *extra), output, straight,
                           tmp_path / "resumed", steps=4)


def test_colorize_beside_clip_logs_both_terms(world, tmp_path):
    output = tmp_path / "mix"
    run = train(config(world, output, "loss.kind=clip", "loss.colorize_weight=0.5", "train.steps=3"))
    assert len(run.losses) == 3 and all(np.isfinite(run.losses))
    for record in read_metrics(output / "metrics.jsonl"):
        assert np.isfinite(record["contrastive_loss"]) and np.isfinite(record["colorize_loss"])
        assert record["loss"] == pytest.approx(record["contrastive_loss"] + 0.5 * record["colorize_loss"], rel=1e-5)
