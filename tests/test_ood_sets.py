"""Release-format OOD loaders, on tiny archives and folders of each format built on the fly."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from trainables import data, ood_sets

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def striped(width: int = 64, height: int = 32) -> Image.Image:
    """Left quarter red, middle half green, right quarter blue."""
    x = np.zeros((height, width, 3), np.uint8)
    x[:, : width // 4] = RED
    x[:, width // 4: 3 * width // 4] = GREEN
    x[:, 3 * width // 4:] = BLUE
    return Image.fromarray(x)


def encoded(image: Image.Image, suffix: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format={"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}[suffix.lower()])
    return buffer.getvalue()


def write_archive(path: str, files: dict[str, bytes]) -> None:
    if path.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as z:
            for name, blob in files.items():
                z.writestr(name, blob)
        return
    with tarfile.open(path, "w:gz" if path.endswith(".gz") else "w") as t:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))


def write_folder(root: str, files: dict[str, bytes]) -> None:
    for name, blob in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(blob)


def jpgs(prefix: str, n: int, size=(40, 36), suffix="jpg") -> dict[str, bytes]:
    rng = np.random.RandomState(len(prefix) + n)
    return {f"{prefix}/{i:04d}.{suffix}": encoded(Image.fromarray(rng.randint(0, 256, (*size[::-1], 3), dtype=np.uint8)), suffix)
            for i in range(n)}


DECOY = {"notes.txt": b"not an image"}

# name -> (archive file or "" for a folder, files, images expected). Decoys that must not count:
# text files, hidden files, images outside the release's image folder.
LAYOUTS = {
    "lsun_c": ("LSUN.tar.gz", {**jpgs("LSUN/test", 3, (36, 36)), "LSUN/readme.txt": b"x"}, 3),
    "lsun_r": ("", {**jpgs("LSUN_resize/LSUN_resize", 4, (32, 32)), "LSUN_resize/LSUN_resize/._0000.jpg": b"junk"}, 4),
    "isun": ("iSUN.tar.gz", jpgs("iSUN/iSUN_patches", 2, (32, 32), "jpeg"), 2),
    "inaturalist": ("iNaturalist.tar.gz", {**jpgs("iNaturalist/images", 3), **jpgs("iNaturalist/other", 2)}, 3),
    "dtd": ("dtd-r1.0.1.tar.gz", {**jpgs("dtd/images/banded", 2), **jpgs("dtd/images/woven", 2),
                                  **jpgs("dtd/images/zigzagged", 2), "dtd/labels/test1.txt": b"banded/0000.jpg"}, 6),
    "tin_val": ("tiny-imagenet-200.zip", {**jpgs("tiny-imagenet-200/val/images", 3, (64, 64), "jpeg"),
                                          **jpgs("tiny-imagenet-200/train/n01443537/images", 2, (64, 64))}, 3),
    "places365": ("", jpgs("val_256", 3, (256, 256)), 3),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_image_release_counts_shapes_and_decoys(tmp_path, name):
    archive, files, expected = LAYOUTS[name]
    root = tmp_path / "data"
    root.mkdir()
    if archive:
        write_archive(str(root / archive), {**files, **DECOY})
    else:
        write_folder(str(root), files)
    cache = str(tmp_path / "cache")
    got = ood_sets.load(name, str(root), cache, download=False)
    assert got.name == name and got.x.shape == (expected, 32, 32, 3) and got.x.dtype == np.uint8
    assert (got.y == -1).all()
    # The second load reads the decoded cache: same pixels.
    assert np.array_equal(ood_sets.load(name, str(root), cache, download=False).x, got.x)


def test_resize_rules_on_a_non_square_image():
    image = striped(64, 32)
    crop = ood_sets.fit_32(image, "crop")      # shorter side is 32 already: the centre 32 columns
    assert (crop == GREEN).all()
    square = ood_sets.fit_32(image, "square")  # 64 -> 32 columns: red, green, blue quarters kept
    assert tuple(square[16, 0]) == RED and tuple(square[16, 31]) == BLUE and tuple(square[16, 16]) == GREEN
    with pytest.raises(ValueError, match="resize rule 'stretch'; accepted: crop, square"):
        ood_sets.fit_32(image, "stretch")


def test_the_protocol_rule_reaches_the_loaded_pixels(tmp_path):
    write_folder(str(tmp_path / "data"), {"LSUN_resize/LSUN_resize/a.png": encoded(striped(), "png")})
    crop = ood_sets.load("lsun_r", str(tmp_path / "data"), str(tmp_path / "cache"), False, rule="crop")
    square = ood_sets.load("lsun_r", str(tmp_path / "data"), str(tmp_path / "cache"), False, rule="square")
    assert (crop.x[0] == GREEN).all()
    assert tuple(square.x[0, 16, 0]) == RED and tuple(square.x[0, 16, 31]) == BLUE


def test_cifar100_official_test_pickle(tmp_path):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "test", "wb") as f:   # python-version layout: rows of R, G, B planes
        pickle.dump({b"data": images.transpose(0, 3, 1, 2).reshape(5, -1), b"fine_labels": [0] * 5}, f)
    got = ood_sets.load("cifar100_test", str(tmp_path), str(tmp_path / "cache"), download=False)
    assert np.array_equal(got.x, images)


def test_svhn_test_mat(tmp_path):
    from scipy.io import savemat
    images = np.random.RandomState(1).randint(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": np.ones((4, 1))})
    got = ood_sets.load("svhn", str(tmp_path), str(tmp_path / "cache"), download=False)
    assert got.x.shape == (4, 32, 32, 3) and np.array_equal(got.x, images)


def test_mnist_idx_becomes_rgb_32(tmp_path):
    digits = np.zeros((3, 28, 28), np.uint8)
    digits[:, 10:18, 10:18] = 255
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    header = b"".join(v.to_bytes(4, "big") for v in (2051, 3, 28, 28))
    (raw / "t10k-images-idx3-ubyte").write_bytes(header + digits.tobytes())
    got = ood_sets.load("mnist", str(tmp_path), str(tmp_path / "cache"), download=False)
    assert got.x.shape == (3, 32, 32, 3)
    assert (got.x[..., 0] == got.x[..., 1]).all() and got.x[0, 16, 16, 0] == 255 and got.x[0, 0, 0, 0] == 0


@pytest.mark.parametrize("layout", ["SCOOD/data", "SCOOD"])   # PASCL/RNA, and COCL without data/
def test_scood_list_keeps_sc_label(tmp_path, layout):
    root = tmp_path / layout
    write_folder(str(root / "images"), jpgs("lsun/test", 3))
    lines = ['lsun/test/0000.jpg {"label": -1, "sc_label": -1}',
             "lsun/test/0001.jpg {'sc_label': 4}", 'lsun/test/0002.jpg {"sc_label": -1}']
    listing = root / "imglist" / "benchmark_cifar10" / "test_lsun.txt"
    listing.parent.mkdir(parents=True)
    listing.write_text("\n".join(lines) + "\n")
    got = ood_sets.load("scood_lsun", str(tmp_path), str(tmp_path / "cache"), False, rule="square")
    assert got.x.shape == (3, 32, 32, 3) and list(got.y) == [-1, 4, -1]


def test_scood_list_errors_name_the_line_and_missing_image(tmp_path):
    root = tmp_path / "SCOOD" / "data"
    listing = root / "imglist" / "benchmark_cifar10" / "test_tin.txt"
    listing.parent.mkdir(parents=True)
    listing.write_text("tin/a.jpg {oops\n")
    with pytest.raises(ValueError, match="test_tin.txt:1"):
        ood_sets.load("scood_tin", str(tmp_path), str(tmp_path / "c1"), False)
    listing.write_text("tin/a.jpg {'sc_label': -1}\n")
    with pytest.raises(data.MissingDataError, match="lists tin/a.jpg"):
        ood_sets.load("scood_tin", str(tmp_path), str(tmp_path / "c2"), False)


def test_missing_set_names_the_set_and_every_place_looked(tmp_path):
    with pytest.raises(data.MissingDataError) as error:
        ood_sets.load("lsun_c", str(tmp_path), str(tmp_path / "cache"), download=True)
    text = str(error.value)
    assert "'lsun_c'" in text and os.path.join(str(tmp_path), "LSUN") in text and "no download" in text


def test_max_images_is_a_seeded_subset_in_original_order(tmp_path):
    write_folder(str(tmp_path), jpgs("val_256", 5, (32, 32)))
    full = ood_sets.load("places365", str(tmp_path), str(tmp_path / "cache"), False)
    part = ood_sets.load("places365", str(tmp_path), str(tmp_path / "cache"), False, max_images=2, seed=3)
    keep = np.sort(np.random.RandomState(3).choice(5, 2, replace=False))
    assert np.array_equal(part.x, full.x[keep])


def test_unknown_set_and_bad_cap(tmp_path):
    with pytest.raises(ValueError, match="unknown OOD set 'lsun_x'; accepted: .*lsun_c"):
        ood_sets.load("lsun_x", None, str(tmp_path), False)
    with pytest.raises(ValueError, match="max_images=0"):
        ood_sets.load("lsun_c", None, str(tmp_path), False, max_images=0)


def test_release_sets_go_through_the_data_registry(tmp_path, capsys):
    write_archive(str(tmp_path / "iSUN.tar.gz"), jpgs("iSUN/iSUN_patches", 2, (32, 32)))
    got = data.load_ood("isun", str(tmp_path), str(tmp_path / "cache"), download=False)
    assert got is not None and len(got) == 2
    assert data.load_ood("lsun_r", str(tmp_path), str(tmp_path / "cache"), download=False) is None
    assert "OOD set 'lsun_r'" in capsys.readouterr().err
