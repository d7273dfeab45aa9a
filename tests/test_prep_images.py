"""Image resizing/encoding and the hand-built tar headers, checked against PIL and tarfile."""
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_prep import shards
from data_prep.images import encode_image, read_image_file
from data_prep.samples import Sample, SampleFailure


def _jpeg(width, height, seed=0, smooth=True):
    rng = np.random.default_rng(seed)
    if smooth:  # photo-like: low-frequency content, where draft decoding must not change the result
        image = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _decode(data):
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("mode, size, expected", [
    ("border", (200, 100), (64, 64)),
    ("border", (30, 90), (64, 64)),
    ("center_crop", (200, 100), (64, 64)),
    ("keep_ratio", (200, 100), (128, 64)),
    ("keep_ratio", (30, 90), (64, 192)),
    ("no", (200, 100), (200, 100)),
])
def test_output_sizes(mode, size, expected):
    jpg, meta = encode_image(_jpeg(*size), image_size=64, resize_mode=mode)
    assert _decode(jpg).size == expected
    assert meta == {"original_width": size[0], "original_height": size[1], "width": expected[0], "height": expected[1]}


def test_no_resize_keeps_an_rgb_jpeg_byte_for_byte_and_reencodes_png():
    data = _jpeg(40, 30)
    assert encode_image(data, image_size=64, resize_mode="no")[0] == data
    buffer = io.BytesIO()
    Image.new("RGBA", (5, 7), (10, 20, 30, 255)).save(buffer, "PNG")
    jpg, meta = encode_image(buffer.getvalue(), image_size=64, resize_mode="no")
    assert _decode(jpg).format == "JPEG" and (meta["width"], meta["height"]) == (5, 7)


def test_border_pads_with_black_and_centres_the_image():
    image = Image.new("RGB", (100, 50), (250, 250, 250))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    out = np.asarray(_decode(encode_image(buffer.getvalue(), image_size=64)[0]), dtype=int)
    assert out[:14].max() < 10 and out[-14:].max() < 10  # 64x32 image in rows 16..47
    assert out[20:44].min() > 240


def test_center_crop_keeps_the_middle():
    pixels = np.zeros((50, 150, 3), dtype=np.uint8)
    pixels[:, 50:100] = 255  # white middle third, black sides
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    out = np.asarray(_decode(encode_image(buffer.getvalue(), image_size=32, resize_mode="center_crop")[0]))
    assert out[:, 2:-2].min() > 235


def test_draft_decoding_matches_full_decoding():
    """512 -> 256 through libjpeg's DCT scaling is visually the same as decode-then-resize."""
    data = _jpeg(512, 384)
    fast = np.asarray(_decode(encode_image(data, image_size=256, resize_mode="center_crop")[0]), dtype=float)
    full = _decode(data).convert("RGB")
    left = (512 - 384) / 2
    slow = full.resize((256, 256), Image.LANCZOS, box=(left, 0, left + 384, 384))
    assert np.abs(fast - np.asarray(slow, dtype=float)).mean() < 2.0


def test_broken_inputs_become_reasons(tmp_path):
    with pytest.raises(SampleFailure, match="^missing file: .*nope.jpg$"):
        read_image_file(tmp_path / "nope.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(SampleFailure, match=r"^empty file \(0 bytes\)"):
        read_image_file(tmp_path / "empty.jpg")
    with pytest.raises(SampleFailure, match="^unreadable file"):
        read_image_file(tmp_path)
    data = _jpeg(256, 256, smooth=False)
    with pytest.raises(SampleFailure, match="^truncated image: image file is truncated"):
        encode_image(data[: len(data) // 3], image_size=64)
    with pytest.raises(SampleFailure, match="^unreadable image: not a known image format, or corrupt$"):
        encode_image(b"GIF89a" + b"\x00" * 5, image_size=64)


def test_tar_headers_read_back_with_tarfile(tmp_path):
    samples = [Sample(b"\xff\xd8 fake jpeg " * k, f"caption {k} \u00e9", {"n": k}) for k in range(1, 40)]
    members = [shards.sample_members(shards.sample_key(3, k, 1000), s) for k, s in enumerate(samples)]
    shards.write_shard(tmp_path, 3, members, {"shard": 3})
    path = tmp_path / "00003.tar"
    assert path.stat().st_size % tarfile.RECORDSIZE == 0
    with tarfile.open(path) as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos[:3]] == ["000030000.jpg", "000030000.txt", "000030000.json"]
        assert len(infos) == 3 * 39 and all(i.isfile() and i.mode == 0o444 and i.mtime == 0 for i in infos)
        assert tar.extractfile("000030038.jpg").read() == samples[38].jpg
        assert tar.extractfile("000030005.txt").read().decode() == "caption 6 \u00e9"
        assert tar.extractfile("000030005.json").read() == b'{"key": "000030005", "n": 6}'
