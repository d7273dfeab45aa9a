"""mmssl.data: shard resolution, the training loader (split, epochs, resume, corrupt samples), eval loader."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmssl.data import count_tar_samples, resolve_shards, resolve_sources, total_samples
from mmssl.errors import UserError


def _jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shards(folder: Path, sizes, manifest=True, stats=False, prefix="", corrupt=(), captions_json=False):
    """Tiny img2dataset-like shards: keys `{prefix}{shard:05d}{i:04d}`; `corrupt` keys get bad jpg bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for shard, size in enumerate(sizes):
        name = f"{shard:05d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(size):
                key = f"{prefix}{shard:05d}{i:04d}"
                meta = {"label": (shard * 7 + i) % 5, "key": key}
                sample = {"__key__": key, "jpg": _jpeg(shard * 1000 + i)}
                if captions_json:
                    meta["captions"] = [f"{key} caption {c}" for c in range(3)]
                else:
                    sample["txt"] = f"caption of {key}"
                sample["json"] = json.dumps(meta)
                if key in corrupt:
                    sample["jpg"] = b"not a jpeg"
                sink.write(sample)
        if stats:
            (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": size, "successes": size}))
        entries.append({"url": name, "count": size})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"shards": entries, "total": sum(sizes)}))
    return folder


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
