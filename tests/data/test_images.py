import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn.data.images import check_image, image_size, image_to_tensor, load_image, read_image
from fasterrcnn.data.report import DataError

from .helpers import make_image


def test_rgb_png_reads_exactly(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "x.png")
    t = read_image(tmp_path / "x.png")
    assert t.dtype == torch.float32 and t.shape == (3, 6, 7)
    assert torch.equal((t * 255).round().to(torch.uint8), torch.from_numpy(a).permute(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "LA", "1", "RGBA", "P"])
def test_modes_become_rgb(tmp_path, mode):
    path = make_image(tmp_path / f"x_{mode}.png", 9, 5, mode=mode)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (9, 5)
    t = read_image(path)
    assert t.shape == (3, 5, 9) and t.min() >= 0.0 and t.max() <= 1.0


def test_grayscale_gives_three_equal_channels(tmp_path):
    path = make_image(tmp_path / "g.png", 8, 4, mode="L")
    t = read_image(path)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_palette_with_transparency_converts_without_warning(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.save(tmp_path / "p.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = read_image(tmp_path / "p.png")
    assert t.shape == (3, 4, 4)
    assert t[:, 1, 1].tolist() == [0.0, 1.0, 0.0]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")
    t = read_image(tmp_path / "d.png")
    assert t.shape == (3, 1, 4)
    assert (t[0, 0] * 255).round().tolist() == [0, 1, 128, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    t = read_image(tmp_path / "c.jpg")
    assert t.shape == (3, 8, 8)
    r, g, b = t[:, 4, 4].tolist()
    assert r > 0.8 and g < 0.2 and b < 0.2  # CMYK (0, 1, 1, 0) is red


def _exif_image(path, orientation=6):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = (255, 0, 0)  # stored left half red, right half blue
    a[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, quality=100, exif=exif)
    return path


def test_exif_orientation_is_applied(tmp_path):
    path = _exif_image(tmp_path / "o.jpg")
    assert image_size(path) == (10, 20)  # header only, rotated
    t = read_image(path)
    assert t.shape == (3, 20, 10)  # orientation 6: rotate 90 degrees clockwise to display
    assert t[0, 2, 5] > 0.8 and t[2, 2, 5] < 0.2  # stored left (red) is now on top
    assert t[2, 17, 5] > 0.8 and t[0, 17, 5] < 0.2


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="nope.jpg.*not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(DataError, match="nope.jpg"):
        image_size(tmp_path / "nope.jpg")


def test_not_an_image_names_it(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    with pytest.raises(DataError, match="junk.jpg.*cannot identify"):
        load_image(tmp_path / "junk.jpg")


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_image_names_it(tmp_path, ext):
    path = make_image(tmp_path / f"t.{ext}", 64, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"t\.{ext}.*(truncated|corrupt)"):
        load_image(path)
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # left alone


def test_check_image_kinds(tmp_path):
    good = make_image(tmp_path / "g.png", 5, 4)
    assert check_image(good, (5, 4)) is None
    assert check_image(tmp_path / "missing.png")[0] == "missing image"
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    assert check_image(tmp_path / "bad.png")[0] == "corrupt image"
    kind, detail = check_image(good, (6, 4))
    assert kind == "image size mismatch" and "g.png" in detail and "5x4" in detail


def test_size_mismatch_mentions_exif(tmp_path):
    path = _exif_image(tmp_path / "o.jpg")
    kind, detail = check_image(path, (20, 10))  # the stored (unrotated) size
    assert kind == "image size mismatch" and "EXIF" in detail


def test_image_to_tensor_owns_memory():
    img = Image.new("RGB", (3, 2), (255, 0, 0))
    t = image_to_tensor(img)
    t.zero_()
    assert img.getpixel((0, 0)) == (255, 0, 0)
