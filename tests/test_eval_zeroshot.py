"""eval.zeroshot / eval.templates: the classifier against open_clip's, FAISS scoring, template sets."""
import numpy as np
import pytest
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

import mmssl
from eval.metrics import classification_metrics
from eval.templates import bundled_classnames, bundled_templates, load_classnames, load_templates
from eval.zeroshot import build_classifier, zeroshot_logits
from mmssl.errors import UserError


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return mmssl.create_model("tiny-vit-64").eval()


def test_build_classifier_matches_open_clip(tiny_model):
    classnames = ["red circle", "blue square", "green star"]
    templates = ["a photo of a {}.", "a {} shape", "there is a {}"]
    ours = build_classifier(tiny_model, tiny_model.tokenizer, classnames, templates, batch_size=4)
    theirs = build_zero_shot_classifier(tiny_model, tiny_model.tokenizer, classnames, templates, device="cpu")
    assert ours.shape == (128, 3)  # (embed_dim, classes)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=0), torch.ones(3))


def test_build_classifier_averages_normalised_template_embeddings(tiny_model):
    classnames, templates = ["cat", "dog"], [lambda c: f"a {c}", lambda c: f"many {c}s"]
    weights = build_classifier(tiny_model, tiny_model.tokenizer, classnames, templates)
    with torch.no_grad():
        per_prompt = torch.nn.functional.normalize(
            tiny_model.encode_text(tiny_model.tokenizer(["a cat", "many cats", "a dog", "many dogs"])), dim=-1)
    expected = torch.nn.functional.normalize(per_prompt.view(2, 2, -1).mean(1), dim=-1).T
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)


def test_zeroshot_logits_are_all_class_scores_via_faiss():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 16)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    classifier = rng.normal(size=(16, 7)).astype(np.float32)
    classifier /= np.linalg.norm(classifier, axis=0, keepdims=True)
    logits = zeroshot_logits(features, classifier)
    np.testing.assert_allclose(logits, features @ classifier, atol=1e-6)
    labels = (features @ classifier).argmax(1)
    assert classification_metrics(logits, labels)["acc1"] == 1.0


def test_bundled_sets():
    assert len(bundled_classnames("imagenet")) == 1000
    assert len(set(bundled_classnames("cifar10"))) == 10
    assert len(set(bundled_classnames("cifar100"))) == 100
    assert bundled_classnames("cifar100")[1] == "aquarium fish"
    assert len(bundled_templates("openai")) == 80 and len(bundled_templates("simple")) == 7
    assert bundled_templates("openai")[0]("goldfish") == "a bad photo of a goldfish."


def test_files_and_defaults(tmp_path):
    (tmp_path / "classnames.txt").write_text("red circle\n\nblue square\n")
    (tmp_path / "templates.txt").write_text("a {}\na photo of a {c}.\n")
    assert load_classnames(None, tmp_path) == ["red circle", "blue square"]
    assert [t("cat") for t in load_templates(None, tmp_path)] == ["a cat", "a photo of a cat."]
    assert load_classnames("cifar10", tmp_path)[0] == "airplane"
    bare = tmp_path / "bare"
    bare.mkdir()
    assert load_classnames(None, bare, ["golden_retriever", "tabby"]) == ["golden retriever", "tabby"]
    assert len(load_templates(None, bare)) == 80  # no templates.txt: OpenAI's ImageNet templates


def test_bad_files_are_user_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "noplaceholder.txt").write_text("a photo\n")
    with pytest.raises(UserError, match="empty"):
        load_classnames(str(tmp_path / "empty.txt"), None)
    with pytest.raises(UserError, match="placeholder"):
        load_templates(str(tmp_path / "noplaceholder.txt"), None)
    with pytest.raises(UserError, match="not found"):
        load_classnames(str(tmp_path / "missing.txt"), None)
    with pytest.raises(UserError, match="no class names"):
        load_classnames(None, tmp_path)
