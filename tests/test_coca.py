"""open_clip's CoCa models (issue 13): `tiny-coca-64` and open_clip's `coca_*` names build as open_clip's
`CoCa`; `loss.caption_weight` trains the model's own `text_decoder` (open_clip's CoCaLoss caption
term, exact resume, a parameter-free `heads["caption"]`); `mmssl caption` greedy is token for token
open_clip's `generate(top_k=1)`, also on the `mmssl export` output loaded by open_clip; caption
selection scores with the decoder; what a CoCa model cannot train is refused."""
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mmssl
from helpers import CPU, config
from mmssl.cli import main
from mmssl.errors import UserError
from mmssl.heads.coca import CoCaDecoderHead, greedy_generate, open_clip_generated_ids
from mmssl.models.factory import list_models, register_with_open_clip
from mmssl.objective import Objective
from mmssl.train.loop import build_trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


def coca_config(world, output, *extra):
    return config(world, output, "model.name=tiny-coca-64", "loss.caption_weight=1", "train.batch_size=8", *extra)


@pytest.fixture(scope="module")
def coca_run(world, tmp_path_factory, one_thread):
    output = tmp_path_factory.mktemp("coca") / "run"
    straight = train(coca_config(world, output, "train.steps=3"))
    return output, straight


@pytest.fixture
def open_clip_generate(monkeypatch):
    """open_clip's CoCa.generate runs with transformers >= 5 for top_k (only its beam search needs the
    removed BeamSearchScorer, whose failed import switches all of generate off)."""
    import open_clip.coca_model as coca_module
    from transformers import TopKLogitsWarper

    monkeypatch.setattr(coca_module, "_has_transformers", True)
    monkeypatch.setitem(coca_module.GENERATION_TYPES, "top_k", TopKLogitsWarper)


def _png(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "PNG")
    return path


def test_coca_names_build_as_open_clip_coca():
    from open_clip.coca_model import CoCa

    names = list_models()
    assert "tiny-coca-64" in names and "coca_ViT-B-32" in names
    register_with_open_clip()
    theirs = open_clip.create_model("tiny-coca-64")
    ours = mmssl.create_model("tiny-coca-64")
    assert isinstance(theirs, CoCa) and isinstance(ours, CoCa)
    assert ours.tokenizer.context_length == 32 and ours.visual.image_size == (64, 64)
    images, texts = torch.randn(2, 3, 64, 64), ours.tokenizer(["a red square", "two blue circles on the left"])
    with torch.no_grad():
        assert ours.encode_image(images).shape == (2, 192) and ours.encode_text(texts).shape == (2, 192)
        assert theirs.encode_image(images).shape == (2, 192)
    assert ours.open_clip_config["multimodal_cfg"]["layers"] == 2 and ours.open_clip_config["custom_text"]


def test_coca_decoder_projection_is_initialised_from_the_seed():
    # open_clip leaves text_decoder.text_projection as torch.empty memory: zeros, garbage or NaN
    projections = []
    for _ in range(2):
        torch.manual_seed(0)
        projections.append(mmssl.create_model("tiny-coca-64").text_decoder.text_projection.detach())
    width = projections[0].shape[0]
    assert torch.equal(projections[0], projections[1])
    assert projections[0].std().item() == pytest.approx(width ** -0.5, rel=0.05)
    assert abs(projections[0].mean().item()) < 0.01


def test_caption_term_is_coca_loss_on_the_models_own_outputs(world, tmp_path):
    from open_clip.loss import CoCaLoss

    cfg = coca_config(world, tmp_path / "unused")
    torch.manual_seed(0)
    model = mmssl.create_model("tiny-coca-64").eval()
    objective = Objective(model, cfg)
    assert isinstance(objective.heads["caption"], CoCaDecoderHead) and not list(objective.heads.parameters())
    images = torch.randn(4, 3, 64, 64)
    texts = model.tokenizer(["a red square", "a big blue circle on the left", "two stars", "green"])
    with torch.no_grad():
        terms = objective(images, texts)
        out = model(images, texts)
        theirs = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"],
            output_dict=True)
    expected = F.cross_entropy(out["logits"].permute(0, 2, 1), texts[:, 1:], ignore_index=0)
    assert terms["caption_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["caption_loss"].item() == pytest.approx(theirs["caption_loss"].item(), rel=1e-5)
    assert terms["contrastive_loss"].item() == pytest.approx(theirs["contrastive_loss"].item(), rel=1e-5)
    # the caption score is minus the summed cross-entropy of the caption's real tokens
    head = objective.heads["caption"]
    with torch.no_grad():
        scores = head.log_likelihood(model, model._encode_image(images)[1], texts)
    summed = F.cross_entropy(out["logits"].permute(0, 2, 1), texts[:, 1:], ignore_index=0, reduction="none").sum(1)
    torch.testing.assert_close(scores, -summed, rtol=1e-5, atol=1e-4)


def test_coca_training_resumes_exactly_and_keeps_the_decoder_in_the_model(world, coca_run, tmp_path):
    output, straight = coca_run
    assert len(straight.losses) == 3 and all(np.isfinite(straight.losses))
    state = torch.load(output / "checkpoints" / "latest.pt", weights_only=True)
    assert dict(state["heads"]) == {"caption": {}}                    # the head has no parameters
    assert any(key.startswith("text_decoder.") for key in state["model"])
    first = build_trainer(coca_config(world, tmp_path / "b", "train.steps=3", "train.save_every=2"), CPU)
    first.cfg.steps = 2
    first.fit()
    resumed = train(coca_config(world, tmp_path / "b", "train.steps=3", "train.resume=latest"))
    assert resumed.losses == straight.losses[2:]


def test_coca_accumulates_to_the_same_losses(world, coca_run, tmp_path):
    _, straight = coca_run
    split = train(coca_config(world, tmp_path / "acc", "train.steps=3", "train.accum_steps=2"))
    assert split.losses == pytest.approx(straight.losses, rel=1e-4)


def test_caption_matches_open_clip_generate_on_the_export(coca_run, tmp_path, capsys, open_clip_generate):
    output, _ = coca_run
    images = [str(_png(tmp_path / f"{i}.png", seed=i)) for i in range(3)]
    assert main(["caption", "--checkpoint", str(output), "--image", *images, "--max-tokens", "8"]) == 0
    printed = [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(output), "--out", str(out)]) == 0
    capsys.readouterr()
    assert "multimodal_cfg" in json.loads((out / "tiny-coca-64.json").read_text())
    theirs, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(out))
    theirs.eval()
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(out))
    batch = torch.stack([preprocess(Image.open(path)) for path in images])
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    with torch.no_grad():
        generated = theirs.generate(batch, generation_type="top_k", top_k=1, seq_len=9, min_seq_len=1)
    theirs_ids = [open_clip_generated_ids(row, sot, eot, 0) for row in generated.tolist()]
    assert printed == [" ".join(tokenizer.decode(ids).split()) for ids in theirs_ids]

    ours = mmssl.create_model(output)
    for min_seq_len in (1, 5):                     # token for token, with open_clip's minimum length too
        with torch.no_grad():
            mine = greedy_generate(ours, batch, seq_len=9, min_seq_len=min_seq_len)
            reference = theirs.generate(batch, generation_type="top_k", top_k=1, seq_len=9, min_seq_len=min_seq_len)
        assert [hypothesis.tokens for hypothesis in mine] == [
            open_clip_generated_ids(row, sot, eot, 0) for row in reference.tolist()]
        assert all(len(hypothesis.tokens) >= min_seq_len - 1 for hypothesis in mine)


def test_caption_beams_selection_and_eval_captioning_run_on_a_coca_checkpoint(world, coca_run, tmp_path, capsys):
    output, _ = coca_run
    image = str(_png(tmp_path / "one.png", seed=7))
    assert main(["caption", "--checkpoint", str(output), "--image", image, "--beams", "2", "--max-tokens", "4"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["image"] == image and len(line["caption"].split()) <= 4
    binding = str(world / "syn" / "binding")
    assert main(["eval", "caption-selection", "--checkpoint", str(output), "--data", binding, "--workers", "0",
                 "--scorer", "caption", "--precision", "fp32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scorer"] == "caption" and result["metrics"]["num_images"] == 12
    val = str(world / "syn" / "val")
    assert main(["eval", "captioning", "--checkpoint", str(output), "--data", val, "--workers", "0",
                 "--max-tokens", "4", "--precision", "fp32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "captioning" and result["metrics"]["num_images"] == 48


def test_coca_without_caption_weight_is_a_dual_encoder_and_refuses_other_heads(world, tmp_path):
    model = mmssl.create_model("tiny-coca-64")
    plain = Objective(model, config(world, tmp_path / "x", "model.name=tiny-coca-64"))
    assert not plain.heads and not plain.needs_tokens
    images, texts = torch.randn(2, 3, 64, 64), model.tokenizer(["a red square", "a blue star"])
    terms = plain(images, texts)
    assert set(terms) == {"contrastive_loss", "loss"}
    for option in ("loss.itm_weight=1", "loss.mlm_weight=1", "loss.inpaint_weight=1", "loss.kind=mae",
                   "loss.rotation_weight=1", "loss.jigsaw_weight=1", "loss.kind=colorize"):
        with pytest.raises(UserError, match="CoCa model"):
            Objective(model, config(world, tmp_path / "x", "model.name=tiny-coca-64", option))
