"""Two augmented views per sample (mmssl.data.views) in the training loader: only when asked,
deterministic under the seed whatever the workers, exact on resume; image-only shards."""
import json

import pytest
import torch
import webdataset as wds
from torchvision import transforms as T

from helpers import jpeg_bytes, length_tokenizer, to_tensor, write_shards
from mmssl.data.train_loader import TrainLoader
from mmssl.data.views import simclr_augmentation

AUGMENT = simclr_augmentation(24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def make_loader(source, **kw):
    options = dict(transform=to_tensor, tokenizer=length_tokenizer, batch_size=4, seed=3,
                   num_workers=2, shuffle_buffer=8, rank=0, world_size=1)
    options.update(kw)
    return TrainLoader(source, **options)


def take(loader, n):
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def test_augmentation_is_simclrs_sized_for_the_image():
    steps = simclr_augmentation(224, (0.5,) * 3, (0.2,) * 3).transforms
    crop, flip, jitter, gray, blur = steps[:5]
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (224, 224) and crop.scale == (0.08, 1.0)
    assert isinstance(flip, T.RandomHorizontalFlip)
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], T.ColorJitter)
    assert jitter.transforms[0].brightness == (0.6, 1.4) and jitter.transforms[0].hue == (-0.1, 0.1)
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    assert blur.p == 0.5 and blur.transforms[0].kernel_size == (23, 23)   # odd, ~10% of 224


def test_no_views_unless_asked_and_same_batches_either_way(tmp_path):
    data = write_shards(tmp_path / "d", [10, 6])
    plain, with_views = take(make_loader(data), 3), take(make_loader(data, views=AUGMENT), 3)
    assert all(batch.views is None for batch in plain)
    for a, b in zip(plain, with_views):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts)
        assert b.views.shape == (2, 4, 3, 24, 24) and b.views.dtype == torch.float32
        assert not torch.equal(b.views[0], b.views[1])        # two different draws of each image


def test_views_depend_on_seed_epoch_and_key_only(tmp_path):
    data = write_shards(tmp_path / "d", [12])
    def by_key(loader, n):
        return {key: batch.views[:, i] for batch in take(loader, n) for i, key in enumerate(batch.keys)}
    two_workers, no_workers = by_key(make_loader(data, views=AUGMENT), 3), by_key(make_loader(data, views=AUGMENT, num_workers=0), 3)
    assert two_workers.keys() == no_workers.keys()
    assert all(torch.equal(two_workers[key], no_workers[key]) for key in two_workers)
    other_seed = by_key(make_loader(data, views=AUGMENT, seed=4), 3)
    assert not any(torch.equal(two_workers[key], other_seed[key]) for key in two_workers)


@pytest.mark.parametrize("stop_at", [2, 5])
def test_resume_reproduces_the_views(tmp_path, stop_at):
    data = write_shards(tmp_path / "d", [11, 5])
    straight = take(make_loader(data, views=AUGMENT), 8)
    interrupted = make_loader(data, views=AUGMENT)
    head = take(interrupted, stop_at)
    resumed = make_loader(data, views=AUGMENT)
    resumed.load_state_dict(interrupted.state_dict())
    tail = take(resumed, 8 - stop_at)
    assert all(a.keys == b.keys and torch.equal(a.views, b.views) for a, b in zip(head + tail, straight))


def test_image_only_shards_load_without_captions(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        for i in range(8):
            sink.write({"__key__": f"{i:04d}", "jpg": jpeg_bytes(i), "json": json.dumps({"label": i % 2})})
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"url": "00000.tar", "count": 8}], "total": 8}))
    batches = take(make_loader(folder, captions=False, tokenizer=None, views=AUGMENT), 2)
    assert sorted(key for b in batches for key in b.keys) == [f"{i:04d}" for i in range(8)]
    assert all(b.texts is None and b.captions == [None] * 4 and b.views.shape[:2] == (2, 4) for b in batches)
