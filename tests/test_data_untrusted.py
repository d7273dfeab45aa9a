"""Shard lists are data: a downloaded manifest, brace pattern or config value must not run commands,
read outside its folder, or make the reader allocate without bound; remote shards need an opt-in."""
import io
import json
import struct
import tarfile

import pytest

from helpers import http_server, length_tokenizer, to_tensor, write_shards
from image_bytes import png_header
from mmssl.cli import main
from mmssl.data import build_eval_loader, resolve_shards
from mmssl.data.samples import LostSamples, shard_samples
from mmssl.data.tar_reader import MAX_MEMBER_BYTES, TarFormatError, tar_files
from mmssl.data.train_loader import TrainLoader
from mmssl.errors import UserError


def _pipe_manifest(folder, flag, count=4):
    """A real shard plus an entry that asks webdataset's opener to run `touch FLAG` in a shell."""
    write_shards(folder, [count])
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"].append({"url": f"pipe:touch {flag} && cat {folder}/00000.tar", "count": count})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("mmssl: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("command", ["train", "eval", "index"])
def test_a_pipe_url_in_a_manifest_never_runs(tmp_path, capsys, command):
    data = _pipe_manifest(tmp_path / "data", tmp_path / "FLAG")
    argv = {
        "train": ["train", "--config", "tiny", f"data.train={data}", f"train.output={tmp_path / 'run'}",
                  "train.steps=1", "train.batch_size=4", "data.workers=0"],
        "eval": ["eval", "retrieval", "--checkpoint", "openclip:tiny-vit-64", "--data", str(data), "--workers", "0"],
        "index": ["index", "build", "--checkpoint", "openclip:tiny-vit-64", "--data", str(data),
                  "--out", str(tmp_path / "index"), "--workers", "0"],
    }[command]
    assert main(argv) == 2
    _one_line_error(capsys, "pipe:", "shard entry 1", "manifest.json")
    assert not (tmp_path / "FLAG").exists()


def test_pipe_in_a_pattern_or_list_is_refused(tmp_path):
    flag = tmp_path / "FLAG"
    for spec in (f"pipe:touch {flag}_{{0..1}}", [str(write_shards(tmp_path / "a", [2])), f"pipe:touch {flag}"],
                 f"{tmp_path / 'a'}::pipe:touch {flag}"):
        with pytest.raises(UserError, match="'pipe:' URLs run shell commands"):
            resolve_shards(spec)
    with pytest.raises(UserError, match="unsupported shard URL scheme 'ftp'"):
        resolve_shards("ftp://host/{0..1}.tar", allow_remote=True)
    assert not list(tmp_path.glob("FLAG*"))


def test_manifest_entries_stay_inside_their_folder(tmp_path):
    write_shards(tmp_path / "outside", [2])
    data = write_shards(tmp_path / "data", [2])
    for name in ("../outside/00000.tar", str(tmp_path / "outside" / "00000.tar"), "file:/etc/passwd"):
        (data / "manifest.json").write_text(json.dumps({"shards": [{"url": name, "count": 2}]}))
        with pytest.raises(UserError, match="outside the manifest's folder|absolute path"):
            resolve_shards(data)
    (data / "link.tar").symlink_to(tmp_path / "outside" / "00000.tar")
    (data / "manifest.json").write_text(json.dumps({"shards": [{"url": "link.tar", "count": 2}]}))
    with pytest.raises(UserError, match="outside the manifest's folder"):
        resolve_shards(data)


@pytest.mark.parametrize("manifest, message", [
    ({"shards": [{"url": "00000.tar", "count": -3}]}, "count must be a non-negative integer"),
    ({"shards": [{"url": "00000.tar", "count": "many"}]}, "count must be a non-negative integer"),
    ({"shards": [{"url": 5}]}, "has no 'url' or 'name'"),
    ({"shards": "00000.tar"}, "not a shard manifest"),
])
def test_malformed_manifests_are_one_line_errors(tmp_path, manifest, message):
    data = write_shards(tmp_path / "data", [2])
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message) as err:
        resolve_shards(data)
    assert "\n" not in str(err.value)


def test_an_oversized_manifest_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    import mmssl.data.sources as sources

    data = write_shards(tmp_path / "data", [2])
    monkeypatch.setattr(sources, "MAX_JSON_BYTES", 32)
    with pytest.raises(UserError, match="manifest.json is over 32 bytes"):
        resolve_shards(data)


def test_remote_shards_need_the_opt_in(tmp_path, capsys):
    url = "https://example.invalid/shards/{00000..00001}.tar"
    with pytest.raises(UserError, match="data.allow_remote=true"):
        resolve_shards(url)
    assert [s.url for s in resolve_shards(url, allow_remote=True)][-1].endswith("00001.tar")
    assert main(["train", "--config", "tiny", f"data.train={url}", "train.steps=1"]) == 2
    _one_line_error(capsys, "is not read by default", "data.allow_remote=true")


@pytest.fixture()
def http_shards(tmp_path):
    """A loopback HTTP server over a shard folder (what a remote dataset looks like)."""
    data = write_shards(tmp_path / "served", [3, 2])
    with http_server(directory=data) as url:
        yield url, data


def test_remote_shards_are_read_through_fsspec_when_allowed(http_shards):
    base, folder = http_shards
    local = build_eval_loader(folder, transform=to_tensor, batch_size=8, num_workers=0)
    remote = build_eval_loader(f"{base}/{{00000..00001}}.tar", transform=to_tensor, batch_size=8,
                               num_workers=0, allow_remote=True)
    keys = [key for batch in local for key in batch.keys]
    assert [key for batch in remote for key in batch.keys] == keys and len(keys) == 5


def _tar_with_member_size(size_field: bytes) -> bytes:
    """One ustar header whose size field is `size_field` (checksum fixed up), then nothing."""
    info = tarfile.TarInfo("a.jpg")
    info.size = 0
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    header[124:136] = size_field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    return bytes(header)


def test_a_huge_declared_member_size_ends_the_shard_without_allocating():
    huge = b"\x80" + struct.pack(">Q", 2**40).rjust(11, b"\0")  # GNU base-256: one TiB
    with pytest.raises(TarFormatError, match=f"outside 0..{MAX_MEMBER_BYTES}"):
        list(tar_files(io.BytesIO(_tar_with_member_size(huge))))


def test_a_malformed_pax_size_ends_the_shard():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a.txt")
        info.pax_headers = {"comment": "x"}
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    data = buffer.getvalue().replace(b" comment=x\n", b" size=-99\n")  # same record length
    with pytest.raises(TarFormatError):
        list(tar_files(io.BytesIO(data)))


def test_samples_lost_to_truncation_are_counted(tmp_path):
    data = write_shards(tmp_path / "d", [6, 4])
    tar = data / "00000.tar"
    tar.write_bytes(tar.read_bytes()[:9000])  # only the first of its 6 samples survives whole
    items = list(shard_samples(str(tar), 0, 6))
    assert isinstance(items[-1], LostSamples) and items[-1].count == 5 and len(items) == 2

    loader = build_eval_loader(data, transform=to_tensor, batch_size=4, num_workers=0)
    keys = [key for batch in loader for key in batch.keys]
    assert len(keys) == 5 and loader.corrupt_count == 5

    train = TrainLoader(data, transform=to_tensor, tokenizer=length_tokenizer, batch_size=2, num_workers=0,
                        shuffle_buffer=1, rank=0, world_size=1)
    batches = iter(train)
    for _ in range(train.batches_per_epoch):  # one epoch: the truncated shard is read at least once
        next(batches)
    assert train.corrupt_count >= 5 and train.corrupt_count % 5 == 0


def test_image_bombs_and_slivers_inside_shards_are_corrupt_samples_not_allocations(tmp_path):
    """A shard's image is checked from its header before decoding: a 30000x30000 declaration and a
    3000x1 sliver (whose shortest-side resize would be 192000x64) are skipped and counted."""
    import webdataset as wds
    from PIL import Image
    from torchvision import transforms as T

    sliver = io.BytesIO()
    Image.new("RGB", (3000, 1), (200, 10, 10)).save(sliver, format="PNG")
    folder = tmp_path / "d"
    folder.mkdir()
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        sink.write({"__key__": "bomb", "png": png_header(30000, 30000), "txt": b"a bomb"})
        sink.write({"__key__": "sliver", "png": sliver.getvalue(), "txt": b"a sliver"})
        good = io.BytesIO()
        Image.new("RGB", (80, 60), (0, 200, 0)).save(good, format="JPEG")
        sink.write({"__key__": "good", "jpg": good.getvalue(), "txt": b"a green box"})
    transform = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor()])
    loader = build_eval_loader(folder, transform=transform, batch_size=4, num_workers=0)
    keys = [key for batch in loader for key in batch.keys]
    assert keys == ["good"] and loader.corrupt_count == 2  # refused before decoding (see image_guard)
