"""Inpainting head: the visible-patch ViT forward equals open_clip's, patch masking, masked-only loss."""
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import PatchDropout, VisionTransformer

from mmssl.errors import UserError
from mmssl.heads.inpaint import InpaintHead, MAEDecoder, masked_patch_loss, random_patch_mask
from mmssl.heads.vit_tokens import encode_visible, patchify

TEXT = CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=2, layers=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(**kwargs):
    torch.manual_seed(0)
    args = dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    return VisionTransformer(**{**args, **kwargs})


def _clip(**vision):
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2.0)
    return CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(**{**cfg, **vision}), text_cfg=TEXT, output_dict=True)


@pytest.mark.parametrize("pooling", [dict(), dict(pool_type="avg"), dict(final_ln_after_pool=True)])
def test_all_patches_kept_equals_open_clip_forward(pooling):
    visual = _vit(**pooling).eval()
    images = torch.randn(3, 3, 32, 32)
    keep = torch.arange(16).expand(3, 16)
    with torch.no_grad():
        assert torch.allclose(encode_visible(visual, images, keep).features, visual(images), atol=1e-6)


def test_subset_equals_open_clip_patch_dropout():
    """open_clip's PatchDropout keeps randn(B, N).topk(K) patches: the same indices give the same features."""
    visual = _vit()
    visual.patch_dropout = PatchDropout(0.75)
    visual.train()
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(7)
    with torch.no_grad():
        expected = visual(images)
    torch.manual_seed(7)
    keep = torch.randn(4, 16).topk(4, dim=-1).indices
    with torch.no_grad():
        ours = encode_visible(visual, images, keep)
    assert ours.tokens.shape == (4, 5, 32)
    assert torch.allclose(ours.features, expected, atol=1e-5)


def test_random_patch_mask_shapes_and_uniformity():
    torch.manual_seed(1)
    mask = random_patch_mask(4000, 16, 0.75)
    assert mask.keep.shape == (4000, 4)
    assert (mask.keep.diff(dim=1) > 0).all()                  # ascending, distinct
    assert (mask.masked.sum(1) == 12).all()
    assert not mask.masked.gather(1, mask.keep).any()         # kept patches are exactly the unmasked ones
    per_position = mask.masked.float().mean(0)
    assert torch.allclose(per_position, torch.full((16,), 0.75), atol=0.03)


def test_patchify_matches_conv1_order():
    """Patch n of patchify is the patch conv1 turns into token n (row-major over the grid)."""
    images = torch.randn(2, 3, 32, 32)
    conv = torch.nn.Conv2d(3, 5, kernel_size=8, stride=8, bias=False)
    tokens = conv(images).flatten(2).transpose(1, 2)                 # [2, 16, 5]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(5, -1)          # (out, p, p, c) like patchify
    assert torch.allclose(patchify(images, 8) @ weight.t(), tokens, atol=1e-5)


def test_loss_counts_only_masked_patches():
    torch.manual_seed(2)
    images = torch.randn(2, 3, 32, 32)
    mask = random_patch_mask(2, 16, 0.75)
    pred = torch.randn(2, 16, 192)
    base = masked_patch_loss(pred, images, mask.masked, 8)
    visible_changed = pred.clone()
    visible_changed[~mask.masked] += 100.0
    assert masked_patch_loss(visible_changed, images, mask.masked, 8) == base
    hidden_changed = pred.clone()
    b, n = mask.masked.nonzero()[0].tolist()
    hidden_changed[b, n] += 1.0                               # one hidden patch only
    assert masked_patch_loss(hidden_changed, images, mask.masked, 8) != base


def test_loss_value_by_hand():
    images = torch.zeros(1, 3, 16, 16)
    images[0, :, :8, 8:] = 2.0                                # patch 1 (top right) is all 2s
    masked = torch.tensor([[False, True, True, False]])       # patches 1 and 2 hidden
    pred = torch.zeros(1, 4, 192)
    # raw pixels: patch 1 error 4 per pixel, patch 2 error 0 -> mean over hidden patches 2.0
    assert masked_patch_loss(pred, images, masked, 8, norm_pix_loss=False).item() == pytest.approx(2.0)
    # normalised targets: constant patches normalise to 0, so predicting 0 is perfect
    assert masked_patch_loss(pred, images, masked, 8, norm_pix_loss=True).item() == pytest.approx(0.0)
    noisy = torch.randn(1, 3, 16, 16)
    target = patchify(noisy, 8)
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert masked_patch_loss(normalised, noisy, masked, 8).item() == pytest.approx(0.0, abs=1e-8)


def test_decoder_places_visible_tokens_at_their_patches():
    """With no decoder blocks, a masked patch's prediction ignores the encoder; a visible one reads its token."""
    torch.manual_seed(3)
    decoder = MAEDecoder(enc_width=32, grid=4, patch=8, width=16, depth=0, heads=2)
    keep = torch.tensor([[1, 6, 9, 14]])
    tokens = torch.randn(1, 5, 32)
    base = decoder(tokens, keep)
    changed = tokens.clone()
    changed[0, 2] += 1.0                                      # the token of patch keep[0, 1] = 6
    moved = (decoder(changed, keep) - base).abs().sum(-1)[0]
    assert moved.nonzero().flatten().tolist() == [6]


def test_non_vit_tower_is_a_config_error():
    torch.manual_seed(0)
    resnet = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=32),
                  text_cfg=TEXT, output_dict=True)
    with pytest.raises(UserError, match="needs a ViT image tower; this model's image tower is ModifiedResNet"):
        InpaintHead(resnet)


def test_bad_mask_ratio_is_a_config_error():
    with pytest.raises(UserError, match="mask_ratio"):
        InpaintHead(_clip(), mask_ratio=1.0)


def test_inpainting_loss_reaches_the_encoder():
    """Gradients flow into the image tower (conv1 included), not only into the decoder."""
    torch.manual_seed(4)
    model = _clip()
    head = InpaintHead(model, decoder_width=32, decoder_depth=1, decoder_heads=2)
    head(model, torch.randn(2, 3, 32, 32)).backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    assert model.visual.positional_embedding.grad.abs().sum() > 0
    assert model.visual.proj.grad is None                    # the pooled projection is not used
