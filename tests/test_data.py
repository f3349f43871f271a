"""Datasets: bundled digits, IDX (MNIST / Fashion-MNIST), the CIFAR-10 python archive, image folders.

No test touches the network: an autouse fixture points the cache at an empty folder and makes every
``urlopen`` fail, and the download tests serve bytes from memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import difflab.data as data
from difflab.data import ImageData, dataset_names, from_model_range, load_dataset, read_idx, to_model_range
from difflab.errors import DifflabError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
REAL_CACHE = data.cache_dir()  # read before the autouse fixture below empties it: where tests/setup.sh downloads to
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """An empty cache and no network, for every test."""
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------------------------------------------
# digits


def test_digits_match_scikit_learn():
    from sklearn.datasets import load_digits

    d = load_dataset("digits")
    assert d.name == "digits" and len(d) == 1797 and d.skipped == 0
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.uint8
    assert int(d.images.min()) == 0 and int(d.images.max()) == 255
    assert d.labels.dtype == torch.int64 and sorted(d.labels.unique().tolist()) == list(range(10))
    assert d.class_names == [str(i) for i in range(10)]
    ref = load_digits()
    np.testing.assert_array_equal(d.images[:, 0].numpy(), np.round(ref.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(d.labels.numpy(), ref.target)


def test_digits_resized_to_rgb_and_has_no_test_split():
    d = load_dataset("DIGITS", image_size=16, channels=3)
    assert d.images.shape == (1797, 3, 16, 16)
    assert torch.equal(d.images[:, 0], d.images[:, 2])  # grey stays grey
    with pytest.raises(DifflabError, match="no test split") as e:
        load_dataset("digits", split="test")
    one_line(e)


# ---------------------------------------------------------------------------------------------------
# IDX


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, codes[big.dtype], array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + big.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    raw = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trips(tmp_path, suffix, dtype):
    array = (np.arange(2 * 3 * 5).reshape(2, 3, 5) - 7).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5) * 8
    out = read_idx(write_idx(tmp_path / f"a-idx3{suffix}", array))
    assert out.shape == (2, 3, 5) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)
    labels = read_idx(write_idx(tmp_path / f"l-idx1{suffix}", np.array([3, 1, 4], np.uint8)))
    np.testing.assert_array_equal(labels, [3, 1, 4])


def test_read_idx_rejects_bad_files(tmp_path):
    good = idx_bytes(np.zeros((4, 2, 2), np.uint8))
    (tmp_path / "short").write_bytes(good[:-1])
    (tmp_path / "magic").write_bytes(b"\x01\x02" + good[2:])
    (tmp_path / "badgz").write_bytes(gzip.compress(good)[:20])
    for name, match in [("short", "truncated"), ("magic", "not an IDX file"), ("badgz", "cannot read")]:
        with pytest.raises(DifflabError, match=match) as e:
            read_idx(tmp_path / name)
        one_line(e)


def fake_mnist(folder: Path, split: str, n: int, *, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    prefix, ext = ("train" if split == "train" else "t10k"), (".gz" if gz else "")
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


@pytest.mark.parametrize("where", ["direct", "subfolder", "torchvision"])
def test_mnist_from_data_dir(tmp_path, where):
    root = tmp_path / "data"
    folder = {"direct": root, "subfolder": root / "mnist", "torchvision": root / "MNIST" / "raw"}[where]
    images, labels = fake_mnist(folder, "train", 12, gz=where != "direct")
    test_images, _ = fake_mnist(folder, "test", 5, seed=1)
    d = load_dataset("mnist", data_dir=str(root), download=False)
    assert d.name == "mnist" and d.images.shape == (12, 1, 28, 28) and d.class_names[3] == "3"
    np.testing.assert_array_equal(d.images[:, 0].numpy(), images)
    np.testing.assert_array_equal(d.labels.numpy(), labels)
    t = load_dataset("mnist", data_dir=str(root), split="test", download=False, image_size=14, channels=3)
    assert t.images.shape == (5, 3, 14, 14) and t.images.dtype == torch.uint8


def fashion_mnist_copies() -> list[Path]:
    """The folders holding all four real Fashion-MNIST files: Debian's, and difflab's cache (tests/setup.sh fetches
    them there where the Debian package cannot be installed)."""
    stems = [stem for split in data.SPLITS for stem in data.IDX_STEMS[split]]
    return [d for d in (FASHION_SYSTEM_DIR, REAL_CACHE / "fashion-mnist")
            if all(data._find_idx(d, stem) for stem in stems)]


def test_real_fashion_mnist_from_the_system_or_the_cache(monkeypatch):
    # tests/setup.sh puts it in one of the two places; this test must not skip.
    assert fashion_mnist_copies(), f"neither {FASHION_SYSTEM_DIR} nor {REAL_CACHE} holds it: run sh tests/setup.sh"
    monkeypatch.setenv("DIFFLAB_CACHE", str(REAL_CACHE))
    for split, n in [("train", 60000), ("test", 10000)]:
        d = load_dataset("fashion-mnist", split=split, download=False, progress=False)
        assert d.images.shape == (n, 1, 28, 28) and d.images.dtype == torch.uint8
        assert torch.equal(d.labels.bincount(), torch.full((10,), n // 10))
        assert d.class_names[0] == "T-shirt/top" and d.class_names[9] == "Ankle boot"
        assert 0 < d.images.float().mean() < 255


def test_without_the_system_copy_fashion_mnist_is_downloaded_and_md5_checked(tmp_path, monkeypatch):
    # What tests/setup.sh relies on without apt or root. No network here: a real copy stands in for the mirror,
    # with its own MD5s (Debian recompresses the .gz files, so theirs differ from the published ones).
    copies = fashion_mnist_copies()
    assert copies, "run sh tests/setup.sh"
    files = {f"{stem}.gz": data._find_idx(copies[0], stem).read_bytes() for stem in data.IDX_STEMS["test"]}
    assert all(payload[:2] == b"\x1f\x8b" for payload in files.values())  # gzip, as the mirror serves them
    monkeypatch.setitem(data.IDX_DATASETS["fashion-mnist"], "system", [str(tmp_path / "no-system-copy")])
    monkeypatch.setitem(data.IDX_DATASETS["fashion-mnist"], "md5", {k: hashlib.md5(v).hexdigest() for k, v in files.items()})
    requested = serve(monkeypatch, files)
    d = load_dataset("fashion-mnist", split="test", progress=False)
    assert d.images.shape == (10000, 1, 28, 28) and torch.equal(d.labels.bincount(), torch.full((10,), 1000))
    assert sorted(u.rsplit("/", 1)[-1] for u in requested) == sorted(files)
    assert all(u.startswith(data.IDX_DATASETS["fashion-mnist"]["mirrors"][0]) for u in requested)
    assert sorted(os.listdir(tmp_path / "cache" / "fashion-mnist")) == sorted(files)
    # bytes that do not match the MD5 are refused and leave nothing in the cache
    monkeypatch.setitem(data.IDX_DATASETS["fashion-mnist"], "md5", {k: "0" * 32 for k in files})
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(DifflabError, match="checksum mismatch"):
        load_dataset("fashion-mnist", split="test", progress=False)
    assert not any((tmp_path / "cache2").rglob("*.*"))


# ---------------------------------------------------------------------------------------------------
# Missing files and downloads (no real network)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_files_without_download_say_where_and_how(tmp_path, name):
    with pytest.raises(DifflabError) as e:
        load_dataset(name, data_dir=str(tmp_path / "nowhere"), download=False)
    message = one_line(e)
    assert "not found" in message and str(tmp_path / "cache" / name) in message
    assert str(tmp_path / "nowhere") in message and "data_dir" in message
    assert f"allow download (difflab fetches the files into {tmp_path / 'cache' / name} and checks their MD5)" in message


def test_fashion_mnist_unreachable_network_suggests_apt(tmp_path, monkeypatch):
    monkeypatch.setitem(data.IDX_DATASETS["fashion-mnist"], "system", [str(tmp_path / "no-system-copy")])
    with pytest.raises(DifflabError) as e:
        load_dataset("fashion-mnist", progress=False)
    message = one_line(e)
    assert "could not download" in message and "network disabled" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data_dir" in message
    assert message.endswith("or try the download again")


class FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def serve(monkeypatch, files: dict[str, bytes]) -> list[str]:
    requested = []

    def fake_urlopen(url, *args, **kwargs):
        requested.append(url)
        return FakeResponse(files[url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return requested


def test_download_verifies_checksum(tmp_path, monkeypatch):
    payload = b"some dataset bytes" * 1000
    serve(monkeypatch, {"file.bin": payload})
    md5 = hashlib.md5(payload).hexdigest()
    dest = tmp_path / "dl" / "file.bin"
    assert data.download_file("https://example.invalid/file.bin", dest, md5=md5, progress=False) == dest
    assert dest.read_bytes() == payload and os.listdir(dest.parent) == ["file.bin"]

    bad = tmp_path / "dl2" / "file.bin"
    with pytest.raises(DifflabError, match="checksum mismatch") as e:
        data.download_file("https://example.invalid/file.bin", bad, md5="0" * 32, progress=False)
    one_line(e)
    assert os.listdir(bad.parent) == []  # neither the file nor its temporary part


def test_mnist_download_end_to_end(tmp_path, monkeypatch):
    source = tmp_path / "served"
    images, labels = fake_mnist(source, "train", 7)
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    monkeypatch.setitem(data.IDX_DATASETS["mnist"], "md5", {k: hashlib.md5(v).hexdigest() for k, v in files.items()})
    requested = serve(monkeypatch, files)
    d = load_dataset("mnist", progress=False)
    np.testing.assert_array_equal(d.images[:, 0].numpy(), images)
    assert all(u.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for u in requested)
    assert sorted(os.listdir(tmp_path / "cache" / "mnist")) == sorted(files)
    # A corrupted mirror is rejected and leaves nothing in the cache.
    monkeypatch.setitem(data.IDX_DATASETS["mnist"], "md5", {k: "0" * 32 for k in files})
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(DifflabError, match="checksum mismatch"):
        load_dataset("mnist", progress=False)
    assert not any((tmp_path / "cache2").rglob("*.*"))


# ---------------------------------------------------------------------------------------------------
# CIFAR-10 python archive


def fake_cifar(root: Path, *, per_batch: int = 3, protocol: int = 2) -> dict[str, np.ndarray]:
    """The real layout: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, dicts with
    bytes keys; returns the data arrays by batch name."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        arrays[name] = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": [int(i) for i in rng.integers(0, 10, per_batch)],
                 b"data": arrays[name], b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        arrays[name + ".labels"] = np.array(batch[b"labels"])
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return arrays


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_from_archive_and_folder(tmp_path, protocol):
    arrays = fake_cifar(tmp_path, protocol=protocol)
    sources = [tmp_path / "cifar-10-python.tar.gz", tmp_path, tmp_path / "cifar-10-batches-py"]
    for source in sources:
        d = load_dataset("cifar10", data_dir=str(source), download=False)
        assert d.name == "cifar10" and d.images.shape == (15, 3, 32, 32) and d.class_names == CIFAR_CLASSES
        first = arrays["data_batch_1"][0]  # row-major channel planes R, G, B
        for c in range(3):
            np.testing.assert_array_equal(d.images[0, c].numpy(), first[c * 1024:(c + 1) * 1024].reshape(32, 32))
        np.testing.assert_array_equal(d.images[12:, :].reshape(3, -1).numpy(), arrays["data_batch_5"])
        np.testing.assert_array_equal(d.labels[:3].numpy(), arrays["data_batch_1.labels"])
    t = load_dataset("CIFAR-10", data_dir=str(sources[0]), split="test", channels=1, image_size=16)
    assert t.images.shape == (3, 1, 16, 16)


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_malicious_pickle(tmp_path):
    fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"payload": Exploit(marker)}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(batch))
    with pytest.raises(DifflabError, match="refusing to unpickle") as e:
        load_dataset("cifar10", data_dir=str(tmp_path / "cifar-10-batches-py"), download=False)
    assert "data_batch_3" in one_line(e) and not marker.exists()
    for evil in [pickle.dumps(eval), b"cbuiltins\nexec\n(S'1'\ntR."]:
        with pytest.raises(DifflabError, match="refusing"):
            data.RestrictedUnpickler(io.BytesIO(evil)).load()


def test_cifar10_rejects_garbage(tmp_path):
    fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DifflabError, match="not a readable pickle"):
        load_dataset("cifar10", data_dir=str(tmp_path / "cifar-10-batches-py"), split="test")
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DifflabError, match="cannot read CIFAR-10 archive"):
        load_dataset("cifar10", data_dir=str(tmp_path / "junk.tar.gz"))


# ---------------------------------------------------------------------------------------------------
# Image folders


def save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def noise(size: tuple[int, int], mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((len(mode),) if len(mode) > 1 else ())
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def test_folder_mixed_formats_nested_with_classes(tmp_path):
    root = tmp_path / "imgs"
    save(root / "cats" / "a.png", noise((40, 30), "RGB"))
    save(root / "cats" / "deeper" / "b.JPG", noise((30, 50), "L"), quality=90)
    save(root / "dogs" / "c.webp", noise((20, 20), "RGBA"))
    save(root / "dogs" / "d.jpeg", noise((64, 48), "RGB"))
    save(root / "dogs" / ".hidden.png", noise((8, 8), "RGB"))  # hidden: ignored
    (root / "dogs" / "notes.txt").write_text("not an image")
    d = load_dataset(str(root), image_size=16, progress=False)
    assert d.images.shape == (4, 3, 16, 16) and d.images.dtype == torch.uint8
    assert d.class_names == ["cats", "dogs"] and d.labels.tolist() == [0, 0, 1, 1]
    assert d.name == f"folder:{root.resolve()}" and d.skipped == 0
    g = load_dataset(str(root), image_size=8, channels=1, progress=False)
    assert g.images.shape == (4, 1, 8, 8)


@pytest.mark.parametrize("size", [(60, 40), (40, 60)])
def test_folder_resizes_shorter_side_and_center_crops(tmp_path, size):
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    if w > h:
        pixels[:, 10:50] = 255  # the centred 40x40 square is white, the 10-pixel margins black
    else:
        pixels[10:50, :] = 255
    save(tmp_path / "one" / "x.png", Image.fromarray(pixels))
    d = load_dataset(str(tmp_path / "one"), image_size=8, progress=False)
    assert d.images.shape == (1, 3, 8, 8)
    inner = d.images[..., 1:-1, :] if h > w else d.images[..., 1:-1]
    assert bool((inner == 255).all())  # only the bicubic filter's reach at the border sees the black margin
    assert int(d.images.min()) > 200
    assert d.labels is None and d.class_names is None


def test_folder_labels_only_with_two_or_more_class_folders(tmp_path):
    save(tmp_path / "a" / "only" / "x.png", noise((8, 8), "RGB"))
    save(tmp_path / "a" / "only" / "y.png", noise((8, 8), "RGB"))
    assert load_dataset(str(tmp_path / "a"), progress=False).labels is None  # one subfolder
    save(tmp_path / "b" / "c1" / "x.png", noise((8, 8), "RGB"))
    save(tmp_path / "b" / "c2" / "y.png", noise((8, 8), "RGB"))
    save(tmp_path / "b" / "loose.png", noise((8, 8), "RGB"))
    assert load_dataset(str(tmp_path / "b"), progress=False).labels is None  # an image outside the classes


def test_folder_default_size_is_the_shared_square_size_else_64(tmp_path):
    img = noise((12, 12), "L")
    save(tmp_path / "same" / "x.png", img)
    d = load_dataset(str(tmp_path / "same"), progress=False)
    assert d.images.shape == (1, 3, 12, 12) and torch.equal(d.images[0, 0], torch.from_numpy(np.array(img)))
    save(tmp_path / "same" / "y.png", noise((12, 20), "RGB"))
    assert load_dataset(str(tmp_path / "same"), progress=False).images.shape == (2, 3, 64, 64)
    save(tmp_path / "wide" / "x.png", noise((20, 12), "RGB"))
    assert load_dataset(str(tmp_path / "wide"), progress=False).images.shape == (1, 3, 64, 64)


def test_folder_transparency_and_palette(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black -> white
    save(tmp_path / "t" / "a.png", Image.fromarray(rgba))
    save(tmp_path / "t" / "b.png", Image.new("P", (4, 4), 0))
    grey16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    save(tmp_path / "t" / "c.png", grey16)
    d = load_dataset(str(tmp_path / "t"), progress=False)
    assert d.images.shape == (3, 3, 4, 4) and bool((d.images[0] == 255).all()) and bool((d.images[2] == 255).all())


def test_folder_skips_corrupt_files_with_one_warning(tmp_path):
    save(tmp_path / "f" / "good.png", noise((8, 8), "RGB"))
    (tmp_path / "f" / "garbage.png").write_bytes(b"definitely not a png")
    jpeg = io.BytesIO()
    noise((64, 64), "RGB").save(jpeg, format="JPEG")
    (tmp_path / "f" / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    with pytest.warns(UserWarning, match="skipped 2 of 3") as record:
        d = load_dataset(str(tmp_path / "f"), image_size=8, progress=False)
    assert len(record) == 1 and "garbage.png" in str(record[0].message)
    assert d.skipped == 2 and d.images.shape == (1, 3, 8, 8)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    for name in ["empty", "text"]:
        with pytest.raises(DifflabError, match="no images in") as e:
            load_dataset(str(tmp_path / name))
        assert ".png" in one_line(e) and str(tmp_path / name) in str(e.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"nope")
    (tmp_path / "bad" / "b.webp").write_bytes(b"")
    with pytest.raises(DifflabError, match="none of the 2 image files") as e:
        load_dataset(str(tmp_path / "bad"), image_size=8, progress=False)
    one_line(e)


def test_real_cifar_jpegs_as_a_class_folder():
    folder = FIXTURES / "cifar10-jpeg"  # two real CIFAR-10 test JPEGs per class, shipped with the tests
    d = load_dataset(str(folder), progress=False)
    assert d.images.shape == (20, 3, 32, 32) and d.class_names == CIFAR_CLASSES
    assert d.labels.tolist() == [i for i in range(10) for _ in range(2)]
    first = sorted((folder / "airplane").iterdir())[0]
    expected = np.asarray(Image.open(first).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(d.images[0].numpy(), expected)


# ---------------------------------------------------------------------------------------------------
# Names, arguments, value range


def test_unknown_name_and_bad_arguments(tmp_path):
    with pytest.raises(DifflabError) as e:
        load_dataset("imagenet")
    assert one_line(e) == ("unknown dataset or missing folder 'imagenet' "
                           "(known datasets: digits, fashion-mnist, mnist, cifar10, shapes)")
    assert dataset_names() == ["digits", "fashion-mnist", "mnist", "cifar10", "shapes"]
    (tmp_path / "file.png").write_bytes(b"x")
    for kwargs, match in [({"split": "val"}, "unknown split"), ({"channels": 2}, "channels"),
                          ({"image_size": 0}, "image_size"), ({"image_size": 32.0}, "image_size")]:
        with pytest.raises(DifflabError, match=match):
            load_dataset("digits", **kwargs)
    with pytest.raises(DifflabError, match="is a file"):
        load_dataset(str(tmp_path / "file.png"))


def test_model_range_round_trip_is_exact():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(pixels)
    assert x.dtype == torch.float32 and float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(from_model_range(x), pixels)
    assert torch.equal(from_model_range(to_model_range(pixels, torch.float64)), pixels)
    assert from_model_range(torch.tensor([-3.0, 2.0, float("nan")])).tolist() == [0, 255, 128]
    with pytest.raises(DifflabError, match="uint8"):
        to_model_range(x)


def test_image_data_contract():
    with pytest.raises(AssertionError):
        ImageData(torch.zeros(2, 1, 4, 4), None, None, "x")  # float images
