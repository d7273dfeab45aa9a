"""mmssl.data: shard resolution, the training loader (split, epochs, resume, corrupt samples), eval loader."""
import io
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from helpers import jpeg_bytes, length_tokenizer, to_tensor, write_shards
from mmssl.data import count_tar_samples, resolve_shards, resolve_sources, total_samples
from mmssl.errors import UserError


# --- sources ---------------------------------------------------------------------------------


def test_manifest_folder_gives_urls_and_counts(tmp_path):
    write_shards(tmp_path / "a", [3, 5])
    shards = resolve_shards(tmp_path / "a")
    assert [Path(s.url).name for s in shards] == ["00000.tar", "00001.tar"]
    assert [s.count for s in shards] == [3, 5]
    assert total_samples(shards) == 8


def test_img2dataset_folder_uses_stats_successes(tmp_path):
    write_shards(tmp_path / "i2d", [4, 2, 6], manifest=False, stats=True)
    assert [s.count for s in resolve_shards(str(tmp_path / "i2d"))] == [4, 2, 6]


def test_brace_pattern_counts_from_stats_then_manifest_then_unknown(tmp_path):
    write_shards(tmp_path / "s", [2, 3, 4], manifest=False, stats=True)
    assert [s.count for s in resolve_shards(f"{tmp_path}/s/{{00000..00001}}.tar")] == [2, 3]
    write_shards(tmp_path / "m", [2, 3, 4])
    assert [s.count for s in resolve_shards(f"{tmp_path}/m/{{00001..00002}}.tar")] == [3, 4]
    write_shards(tmp_path / "u", [2, 3], manifest=False)
    unknown = resolve_shards(f"{tmp_path}/u/{{00000..00001}}.tar")
    assert [s.count for s in unknown] == [None, None] and total_samples(unknown) is None
    counted = resolve_shards(f"{tmp_path}/u/{{00000..00001}}.tar", need_counts=True)
    assert [s.count for s in counted] == [2, 3]
    assert count_tar_samples(counted[1].url) == 3


def test_tar_count_agrees_with_the_reader_on_non_sample_members(tmp_path):
    """Members the reader skips (no extension, `__`-prefixed) must not count as samples."""
    import tarfile

    from mmssl.data.tar_reader import tar_samples

    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        for name in ["a.jpg", "a.txt", "b.jpg", "README", "__meta__.json", "dir/c.jpg"]:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    assert [s["__key__"] for s in tar_samples(str(path))] == ["a", "b", "dir/c"]
    assert count_tar_samples(path) == 3


def test_several_sources_are_tagged(tmp_path):
    write_shards(tmp_path / "a", [3])
    write_shards(tmp_path / "b", [2, 2], manifest=False, stats=True)
    both = resolve_shards([tmp_path / "a", str(tmp_path / "b")])
    assert [(s.source, s.count) for s in both] == [(0, 3), (1, 2), (1, 2)]
    joined = resolve_sources(f"{tmp_path / 'a'}::{tmp_path / 'b'}")
    assert [len(group) for group in joined] == [1, 2]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: str(d / "missing"), "data source not found"),
        (lambda d: (d / "empty").mkdir() or str(d / "empty"), "no shards in"),
        (lambda d: str(d / "missing" / "{00000..00002}.tar"), "shard not found"),
        (lambda d: [], "no data source given"),
    ],
)
def test_bad_sources_are_one_line_user_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message) as err:
        resolve_shards(make(tmp_path))
    assert "\n" not in str(err.value)


# --- training loader -------------------------------------------------------------------------

import torch  # noqa: E402

from mmssl.config import DataConfig  # noqa: E402
from mmssl.data import TrainLoader, build_eval_loader, build_train_loader  # noqa: E402


def take(loader, n):
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def flat_keys(batches):
    return [key for batch in batches for key in batch.keys]


def make_loader(source, **kw):
    options = dict(transform=to_tensor, tokenizer=length_tokenizer, batch_size=4, seed=3,
                   num_workers=2, shuffle_buffer=8, rank=0, world_size=1)
    options.update(kw)
    return TrainLoader(source, **options)


def test_two_ranks_two_workers_uneven_shards_split_exactly(tmp_path):
    data = write_shards(tmp_path / "d", [13, 7, 20, 3, 9, 1, 8])  # 61 samples
    ranks = [make_loader(data, rank=rank, world_size=2) for rank in range(2)]
    assert ranks[0].batches_per_epoch == 61 // (4 * 2) == 7  # workers get 4 and 3 batches
    runs = [take(loader, 2 * 7) for loader in ranks]
    for epoch in range(2):
        keys = [flat_keys(run[epoch * 7:(epoch + 1) * 7]) for run in runs]
        assert [len(k) for k in keys] == [28, 28]
        assert len(set(keys[0]) | set(keys[1])) == 56  # no sample twice within the epoch
    assert flat_keys(runs[0][:7]) != flat_keys(runs[0][7:])  # a new order each epoch
    assert all(batch.images.shape == (4, 3, 16, 16) and batch.texts.shape == (4, 2) for run in runs for batch in run)
    assert [loader.epoch for loader in ranks] == [2, 2] and ranks[0].corrupt_count == 0


def test_same_seed_same_batches_other_seed_other_order(tmp_path):
    data = write_shards(tmp_path / "d", [10, 6])
    first, again = (flat_keys(take(make_loader(data, num_workers=0), 3)) for _ in range(2))
    assert first == again
    assert flat_keys(take(make_loader(data, num_workers=0, seed=4), 3)) != first


# 25 samples: batch 4 -> 6 batches/epoch (3 + 3 per worker); batch 5 -> 5 (3 + 2, with a marker)
@pytest.mark.parametrize("batch_size, stop_at", [(4, 5), (4, 8), (5, 5), (5, 7)])
def test_resume_yields_exactly_the_uninterrupted_batches(tmp_path, batch_size, stop_at):
    data = write_shards(tmp_path / "d", [11, 5, 9], corrupt={"000000004"})
    straight = take(make_loader(data, batch_size=batch_size), 12)
    interrupted = make_loader(data, batch_size=batch_size)
    head = take(interrupted, stop_at)
    state = interrupted.state_dict()
    resumed = make_loader(data, batch_size=batch_size)
    resumed.load_state_dict(state)
    tail = take(resumed, 12 - stop_at)
    assert flat_keys(head + tail) == flat_keys(straight)
    assert all(torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts)
               for a, b in zip(head + tail, straight))
    assert resumed.step == 12 and resumed.corrupt_count >= 2  # the corrupt sample, once per epoch


def test_resume_with_other_settings_is_refused(tmp_path):
    data = write_shards(tmp_path / "d", [12])
    state = make_loader(data).state_dict()
    with pytest.raises(UserError, match="workers was 2, now 1"):
        make_loader(data, num_workers=1).load_state_dict(state)


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    data = write_shards(tmp_path / "d", [12, 12], corrupt={"000000003", "000010007"})
    loader = make_loader(data, num_workers=0, batch_size=6)
    epoch = take(loader, loader.batches_per_epoch)
    keys = flat_keys(epoch)
    assert len(keys) == 24 and not {"000000003", "000010007"} & set(keys)
    assert 2 <= loader.corrupt_count <= 4  # both seen once; the refill pass may meet them again
    assert loader.state_dict()["cursors"][0]["corrupt"] == loader.corrupt_count


def test_json_captions_pick_one_per_sample_and_epoch_from_the_seed(tmp_path):
    data = write_shards(tmp_path / "d", [16], captions_json=True)
    runs = [take(make_loader(data, num_workers=0, shuffle_buffer=0), 8) for _ in range(2)]
    chosen = [dict(zip(b.keys, b.captions)) for b in runs[0]]
    assert chosen == [dict(zip(b.keys, b.captions)) for b in runs[1]]
    first, second = {}, {}
    for batch in runs[0][:4]:
        first.update(zip(batch.keys, batch.captions))
    for batch in runs[0][4:]:
        second.update(zip(batch.keys, batch.captions))
    assert all(caption.startswith(f"{key} caption ") for key, caption in first.items())
    assert first != second and first.keys() == second.keys()


def test_weighted_resampling_follows_source_weights(tmp_path):
    a = write_shards(tmp_path / "a", [30, 30], prefix="a")
    b = write_shards(tmp_path / "b", [60], prefix="b")
    config = DataConfig(train=[str(a), str(b)], train_weights=[3, 1], workers=1, shuffle_buffer=16)
    loader = build_train_loader(config, transform=to_tensor, tokenizer=None, batch_size=8, seed=1,
                                rank=0, world_size=1)
    assert loader.resampled and loader.batches_per_epoch == 15
    keys = flat_keys(take(loader, 60))
    share_a = sum(key.startswith("a") for key in keys) / len(keys)
    assert abs(share_a - 0.75) < 0.06  # 480 draws: sd 0.02
    assert len(set(keys)) < len(keys)  # with replacement


def test_bad_training_data_is_a_user_error(tmp_path):
    data = write_shards(tmp_path / "d", [5])
    with pytest.raises(UserError, match="fewer than one global batch"):
        make_loader(data, batch_size=4, rank=0, world_size=2)
    with pytest.raises(UserError, match="one non-negative weight per source"):
        make_loader(data, weights=[1, 2])
    with pytest.raises(UserError, match="no training data"):
        build_train_loader(DataConfig(), transform=to_tensor, tokenizer=None, batch_size=2)


# --- eval loader -----------------------------------------------------------------------------


def test_eval_loader_reads_every_sample_once_with_labels(tmp_path):
    data = write_shards(tmp_path / "d", [7, 3, 5], corrupt={"000010001"})
    loader = build_eval_loader(data, transform=to_tensor, batch_size=4, num_workers=2)
    batches = list(loader)
    keys = flat_keys(batches)
    expected = {f"{s:05d}{i:04d}" for s, n in enumerate([7, 3, 5]) for i in range(n)} - {"000010001"}
    assert sorted(keys) == sorted(expected) and loader.corrupt_count == 1
    labels = {k: int(l) for b in batches for k, l in zip(b.keys, b.labels)}
    assert all(labels[k] == (int(k[:5]) * 7 + int(k[5:])) % 5 for k in keys)
    assert [c for b in batches for c in b.captions][0] == [f"caption of {keys[0]}"]
    assert keys == flat_keys(list(loader))  # same order every time


def test_eval_loader_returns_all_json_captions(tmp_path):
    data = write_shards(tmp_path / "d", [3], captions_json=True)
    (batch,) = list(build_eval_loader(data, transform=to_tensor, batch_size=8, num_workers=0))
    assert batch.captions[1] == [f"000000001 caption {c}" for c in range(3)]


# --- fast paths: tar reader, batched transform tail, token cache ------------------------------

from mmssl.data.image_batch import BatchedImageTransform  # noqa: E402
from mmssl.data.samples import shard_samples  # noqa: E402
from mmssl.data.tar_reader import tar_samples  # noqa: E402
from mmssl.data.train_loader import CachedTokenizer  # noqa: E402


def test_tar_reader_matches_webdataset_including_long_names(tmp_path):
    shard = tmp_path / "long.tar"
    long_key = "deep/" + "x" * 150 + "/sample"
    with wds.TarWriter(str(shard)) as sink:
        for key in ["a", long_key, "b.c"]:
            sink.write({"__key__": key, "jpg": jpeg_bytes(1), "TXT": f"text {key}".encode(), "json": b"{}"})
    ours = list(tar_samples(str(shard)))
    theirs = list(wds.tariterators.tarfile_samples([{"url": str(shard)}]))
    assert [s["__key__"] for s in ours] == ["a", long_key, "b"]
    assert ours == [{k: v for k, v in s.items() if not k.startswith("__local")} for s in theirs]


def test_truncated_shard_keeps_its_good_samples(tmp_path, caplog):
    write_shards(tmp_path / "d", [6])
    tar = tmp_path / "d" / "00000.tar"
    tar.write_bytes(tar.read_bytes()[:9000])  # cut inside the second sample (members are 2560 bytes)
    samples = list(shard_samples(str(tar)))
    assert [s["__key__"] for s in samples] == ["000000000"] and "unreadable rest of shard" in caplog.text


def test_batched_transform_tail_is_bitwise_the_per_sample_transform():
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(12, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(12),
                           T.ToTensor(), T.Normalize((0.48, 0.45, 0.40), (0.26, 0.26, 0.27))])
    fast = BatchedImageTransform(transform)
    images = [Image.open(io.BytesIO(jpeg_bytes(seed, size=20))) for seed in range(3)]
    assert fast.batched and fast.sample(images[0]).dtype == torch.uint8
    assert torch.equal(fast.batch([fast.sample(im) for im in images]), torch.stack([transform(im) for im in images]))
    assert not BatchedImageTransform(to_tensor).batched


def test_cached_tokenizer_gives_the_tokenizer_rows():
    cached = CachedTokenizer(length_tokenizer, capacity=2)
    captions = ["a", "bb", "a", "ccc", "dddd"]
    assert torch.equal(cached(captions), length_tokenizer(captions))
    assert torch.equal(cached(captions[::-1]), length_tokenizer(captions[::-1])) and len(cached.rows) == 2
