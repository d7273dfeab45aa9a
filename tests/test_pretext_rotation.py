"""RotNet (issue 18): the four quarter-turn copies carry the right labels on hand-made images, the
loss is 4-way cross-entropy over them, `loss.kind=rotation` trains the image tower alone, exact
under accumulation and resume, and a weight of 0 builds nothing."""
import pytest
import torch
import torch.nn.functional as F

from helpers import accumulation_matches, assert_resumes_exactly, config, objective_for, token_batch
from mmssl.errors import UserError
from mmssl.heads.rotation import rotated_copies
from mmssl.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rotated_copies_turn_a_marked_corner_counter_clockwise():
    image = torch.zeros(1, 3, 4, 4)
    image[0, :, 0, 3] = 1.0                       # top-right corner marked
    turned, labels = rotated_copies(torch.cat([image, 2 * image]))
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    corners = [tuple(torch.nonzero(turned[row, 0]).flatten().tolist()) for row in range(0, 8, 2)]
    assert corners == [(0, 3), (0, 0), (3, 0), (3, 3)]   # 0, 90, 180, 270 degrees counter-clockwise
    assert turned[1, 0, 0, 3] == 2.0                      # the second image's copies follow the first's
    with pytest.raises(ValueError, match="square"):
        rotated_copies(torch.zeros(1, 3, 4, 6))


def test_rotation_loss_is_the_mean_cross_entropy_of_the_four_copies(world):
    objective, _ = objective_for(world / "micro.json", "loss.kind=rotation")
    assert set(objective.heads) == {"rotation"} and objective.weights == {"rotation_loss": 1.0}
    images, texts = token_batch(rows=6)
    terms = objective(images, texts, step=0)
    head, model = objective.heads["rotation"], objective.model
    with torch.no_grad():
        expected = torch.stack([
            F.cross_entropy(head.classify(model.visual(torch.rot90(images, k, dims=(-2, -1)))),
                            torch.full((6,), k)) for k in range(4)]).mean()
    assert terms["rotation_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert "contrastive_loss" not in terms


def test_rotation_beside_clip_accumulates_exactly(world):
    objective, _ = objective_for(world / "micro.json", "loss.rotation_weight=0.5")
    images, texts = token_batch(rows=12)
    grads = accumulation_matches(objective, images, texts, pieces=(3,))
    assert any(name.startswith("heads.rotation.") for name in grads)
    assert any(name.startswith("model.transformer.") for name in grads)   # the text tower trains too


def test_rotation_alone_accumulates_exactly(world):
    # every term additive: no whole-batch term to back-propagate before the micro-batches
    objective, _ = objective_for(world / "micro.json", "loss.kind=rotation")
    images, texts = token_batch(rows=8)
    grads = accumulation_matches(objective, images, texts, pieces=(2,))
    assert not any(name.startswith("model.transformer.") for name in grads)   # the text tower is frozen


def test_rotation_weight_zero_builds_nothing_and_kind_refuses_its_own_weight(world):
    objective, _ = objective_for(world / "micro.json")
    assert "rotation" not in objective.heads
    with pytest.raises(UserError, match="loss.rotation_weight"):
        objective_for(world / "micro.json", "loss.kind=rotation", "loss.rotation_weight=1")
    for bad, key in (("heads.rotation.hidden_dim=-1", "heads.rotation.hidden_dim"),
                     ("loss.rotation_weight=-0.5", "loss.rotation_weight"),
                     ("heads.deepcluster.every_steps=0", "heads.deepcluster.every_steps"),
                     ("heads.deepcluster.sample=2000000", "heads.deepcluster.sample"),
                     ("heads.colorize.decoder_width=130", "heads.colorize.decoder_width")):
        with pytest.raises(UserError, match=f"bad value for {key}"):
            objective_for(world / "micro.json", bad)


def test_rotation_trains_the_image_tower_alone_and_resumes_exactly(world, tmp_path):
    def make(output, *extra):
        return config(world, output, "loss.kind=rotation", "train.batch_size=8", *extra)

    straight = train(make(tmp_path / "straight", "train.steps=4"))
    assert len(straight.losses) == 4 and all(0 < loss < 3 for loss in straight.losses)
    assert straight.losses[0] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.3)
    assert_resumes_exactly(make, tmp_path / "straight", straight, tmp_path / "resumed", steps=4)
