import pytest

from mmssl.config import ExperimentConfig, load_config, to_dict
from mmssl.errors import UserError


def test_bundled_tiny_config_loads_by_name():
    config = load_config("tiny")
    assert config.model.name == "tiny-vit-64"
    assert config.train.batch_size == 128


def test_overrides_are_typed_and_nested(tmp_path):
    config = load_config("tiny.yaml", ["train.steps=7", "loss.mlm_weight=0.5", "data.train=[a, b]",
                                       "heads.inpaint.mask_ratio=0.5", "train.grad_clip=null"])
    assert config.train.steps == 7
    assert config.loss.mlm_weight == 0.5
    assert config.data.train == ["a", "b"]
    assert config.heads.inpaint.mask_ratio == 0.5
    assert config.train.grad_clip is None


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(UserError, match="train.steps"):
        load_config(None, ["train.steps=1.5"])


@pytest.mark.parametrize("override, key", [("train.setps=3", "train.setps"), ("modle.name=x", "modle"),
                                           ("heads.mlm.ratio=1", "heads.mlm.ratio")])
def test_unknown_key_is_an_error_naming_it(override, key):
    with pytest.raises(UserError, match=f"unknown config key: {key}"):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(UserError, match="train.stepz"):
        load_config(path)


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(UserError, match="not found"):
        load_config("no/such/file.yaml")


def test_round_trip_through_dict():
    config = load_config("tiny")
    assert to_dict(config)["model"]["name"] == "tiny-vit-64"
    assert isinstance(ExperimentConfig().train.steps, int)
