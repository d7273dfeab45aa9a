import pytest
import yaml

from mmssl.config import ExperimentConfig, from_dict, load_config, to_dict
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


# every key of every section set away from its default (valid together), for the round trips
NON_DEFAULT = {
    "model": {"name": "ViT-B-32", "pretrained": "weights/model.pt", "hf_text": "hf/minilm", "lock_image": True,
              "lock_image_unlocked_groups": 2, "lock_text": True, "lock_text_unlocked_layers": 1,
              "grad_checkpointing": True, "patch_dropout": 0.5},
    "data": {"train": ["shards/a", "shards/b"], "train_weights": [1.0, 3.0], "val": "shards/val",
             "resampled": True, "shuffle_buffer": 50, "workers": 0, "augment": True, "allow_remote": True},
    "loss": {"kind": "siglip", "local_loss": True, "gather_with_grad": True, "mlm_weight": 0.5,
             "inpaint_weight": 0.25, "simclr_weight": 1.0, "simclr_temperature": 0.2, "queue_size": 4096,
             "momentum": 0.999, "distill_alpha": 0.4, "moco_temperature": 0.1, "itm_weight": 0.5,
             "caption_weight": 2.0, "rotation_weight": 0.5, "jigsaw_weight": 0.5, "colorize_weight": 0.5,
             "deepcluster_weight": 0.5, "weighting": "uncertainty"},
    "heads": {"mlm": {"mask_prob": 0.3, "replace_mask": 0.7, "replace_random": 0.2},
              "inpaint": {"mode": "shared", "mask_ratio": 0.5, "decoder_depth": 1, "decoder_width": 64,
                          "decoder_heads": 2, "norm_pix_loss": False, "unmasked_tune_steps": 5},
              "simclr": {"hidden_dim": 512, "out_dim": 128, "input": "projected"},
              "itm": {"layers": 1, "heads": 4}, "caption": {"layers": 3, "heads": 1},
              "rotation": {"hidden_dim": 0},
              "jigsaw": {"permutations": 30, "tiles": "crops", "jitter": 0.2, "hidden_dim": 64},
              "colorize": {"target": "rgb", "decoder_depth": 2, "decoder_width": 64, "decoder_heads": 2},
              "deepcluster": {"k": 10, "every_steps": 20, "sample": 500, "pca_dim": 0, "niter": 5}},
    "train": {"output": "runs/x", "steps": 50, "batch_size": 32, "accum_steps": 4, "optimizer": "muon",
              "lr": 0.002, "muon_lr": 0.01, "weight_decay": 0.05, "beta1": 0.8, "beta2": 0.95, "eps": 1e-8,
              "warmup": 5, "grad_clip": None, "precision": "bf16", "compile": True, "seed": 7, "log_every": 2,
              "save_every": 10, "val_every": 5, "resume": "latest", "overwrite": False, "keep_checkpoints": 3,
              "tensorboard": True, "threads": 2, "fsdp": True},
    "finetune": {"objective": "ce", "label_smoothing": 0.1, "lp_steps": 10, "classnames": ["a", "b"]},
}
AT_DEFAULT = {"train.overwrite",  # train.resume is set, and a run takes only one of the two
              "finetune.objective"}  # lp_steps and label smoothing need ce, the default


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_round_trip_through_dict():
    config = load_config("tiny")
    assert to_dict(config)["model"]["name"] == "tiny-vit-64"
    assert isinstance(ExperimentConfig().train.steps, int)
    # the sample names every key, and each one (but AT_DEFAULT) away from its default
    defaults, sample = _flat(to_dict(ExperimentConfig())), _flat(NON_DEFAULT)
    assert sorted(sample) == sorted(defaults)
    assert [key for key in defaults if (sample[key] == defaults[key]) != (key in AT_DEFAULT)] == []
    # dict -> config -> dict, and config -> dict -> config
    config = from_dict(ExperimentConfig, NON_DEFAULT)
    assert to_dict(config) == NON_DEFAULT
    assert from_dict(ExperimentConfig, to_dict(config)) == config
    assert config != ExperimentConfig()


def test_round_trip_through_a_yaml_file(tmp_path):
    config = from_dict(ExperimentConfig, NON_DEFAULT)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    assert load_config(path) == config
