"""The one image loader (engine/images.py) and its users: EXIF orientation, 16-bit PNGs at their real values,
transparency over white, decompression bombs refused from the header, corrupt files as one ValueError naming the
field; the trainers, the patch-quality estimator and the IP-Adapter preprocessing read images the same way."""

from __future__ import annotations

import io
import struct
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dreamfuse.engine.images import image_tensor, load_rgb, open_image, rgb_array
from dreamfuse.engine.limits import Limits
from PIL import Image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None = None) -> bytes:
    """A PNG written chunk by chunk (valid signature, IHDR, IDAT, IEND with CRCs): lets a test claim any size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _rows(a: np.ndarray) -> bytes:
    """PNG scanlines (filter type 0) of a big-endian sample array ``(H, W[, C])``."""
    return b"".join(b"\x00" + row.tobytes() for row in a)


# ------------------------------------------------------------------------------------------------ orientation
def _sideways_jpeg(path, orientation: int = 6) -> None:
    """A 16 x 8 (w x h) JPEG, left half red, right half blue, tagged with an EXIF orientation."""
    a = np.zeros((8, 16, 3), np.uint8)
    a[:, :8], a[:, 8:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    _sideways_jpeg(path)  # 6 = "rotate 90° clockwise to view": the stored left edge is the top
    x = load_rgb(path, "reference_image")
    assert x.shape == (3, 16, 8)  # upright: 8 wide, 16 tall
    top, bottom = x[:, :6].mean((1, 2)), x[:, -6:].mean((1, 2))
    assert top[0] > 0.8 and top[2] < 0.2 and bottom[2] > 0.8 and bottom[0] < 0.2
    # the pipelines' loader sees the upright aspect ratio (a 16 x 8 generation size would not match it)
    assert image_tensor(path, 32, 16, "reference_image").shape == (1, 3, 32, 16)
    with pytest.raises(ValueError, match="reference_image: aspect ratio"):
        image_tensor(path, 16, 32, "reference_image")
    # a PIL image opened by the caller is oriented too; an untagged one is returned as it is
    assert open_image(Image.open(path), "ip_image").size == (8, 16)
    plain = Image.new("RGB", (16, 8))
    assert open_image(plain, "ip_image") is plain


# ------------------------------------------------------------------------------------------------ 16-bit
def test_16bit_grayscale_png_keeps_its_values(tmp_path):
    values = np.array([[0, 1000, 32768, 65535], [257, 4096, 50000, 65000]], dtype=np.uint16)
    path = tmp_path / "depth16.png"
    path.write_bytes(_png_bytes(4, 2, 16, 0, _rows(values.astype(">u2"))))
    assert Image.open(path).mode == "I;16"
    x = load_rgb(path, "scaffold_image")
    want = torch.from_numpy(values.astype(np.float32) / 65535)
    for c in range(3):
        torch.testing.assert_close(x[c], want, rtol=0, atol=1e-7)  # convert("RGB") would give 1.0 above 255
    # mode I (32-bit integer, how Pillow hands some 16-bit sources over) is read on the same scale
    img_i = Image.fromarray(values.astype(np.int32))
    assert img_i.mode == "I"
    torch.testing.assert_close(torch.from_numpy(rgb_array(img_i, "x"))[..., 0], want, rtol=0, atol=1e-7)


def test_16bit_rgb_png_is_scaled_not_clipped(tmp_path):
    v = np.array([[0, 1000, 32768, 65535]], dtype=np.uint32)
    rgb = np.stack([v, v // 2, 65535 - v], axis=-1).astype(">u2")
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png_bytes(4, 1, 16, 2, _rows(rgb)))
    x = load_rgb(path, "image")
    want = torch.from_numpy(rgb.astype(np.float32) / 65535).permute(2, 0, 1)
    torch.testing.assert_close(x, want, rtol=0, atol=1 / 255)  # Pillow reduces 16-bit RGB to 8 bits


# ------------------------------------------------------------------------------------------------ transparency
def test_transparent_pixels_are_composited_over_white(tmp_path):
    a = np.zeros((2, 3, 4), np.uint8)
    a[:, 0] = (255, 0, 0, 0)  # fully transparent, but red underneath
    a[:, 1] = (0, 0, 0, 128)  # half-transparent black
    a[:, 2] = (0, 255, 0, 255)  # opaque green
    path = tmp_path / "cutout.png"
    Image.fromarray(a, "RGBA").save(path)
    x = load_rgb(path, "ip_image")
    torch.testing.assert_close(x[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(x[:, 0, 1], torch.full((3,), 1 - 128 / 255))
    torch.testing.assert_close(x[:, 0, 2], torch.tensor([0.0, 1.0, 0.0]))
    # LA, and a palette image with a transparent index, the same way
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    torch.testing.assert_close(torch.from_numpy(rgb_array(la, "x")), torch.tensor([[[1.0] * 3, [0.0] * 3]]))
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255])
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    buf = io.BytesIO()
    p.save(buf, "PNG")
    (tmp_path / "p.png").write_bytes(buf.getvalue())
    y = load_rgb(tmp_path / "p.png", "x")
    torch.testing.assert_close(y[:, 0], torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]))
    # grayscale becomes RGB
    g = load_rgb(Image.fromarray(np.full((2, 2), 51, np.uint8), "L"), "x")
    assert g.shape == (3, 2, 2) and torch.allclose(g, torch.full_like(g, 0.2))


# ------------------------------------------------------------------------------------------------ hostile files
@pytest.mark.parametrize("side, needle", [(20000, "limits.max_input_pixels"), (8000, "8000x8000")])
def test_decompression_bomb_header_fails_fast(tmp_path, side, needle):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(side, side, 8, 2))  # 60 bytes claiming 400 (or 64) megapixels
    assert path.stat().st_size < 100
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=needle) as e:
        load_rgb(path, "layout")
    assert time.perf_counter() - t0 < 1.0  # nothing decoded (400 MP of RGB would be 1.2 GB)
    assert str(e.value).startswith("layout: ")
    with pytest.raises(ValueError, match="^reference_image: "):
        image_tensor(path, 64, 64, "reference_image")


def test_custom_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (20, 10)).save(path)
    with pytest.raises(ValueError, match=r"ref: 20x10 is 200 pixels.*limits.max_input_pixels"):
        open_image(path, "ref", Limits(max_input_pixels=100))


def test_corrupt_and_truncated_files_name_the_field(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, "PNG")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    cases = {
        "garbage.png": b"this is not an image at all",
        "truncated.png": good.getvalue()[: len(good.getvalue()) // 2],
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "empty.png": b"",
        "bad_data.png": _png_bytes(16, 16, 8, 2, rows=b"\xff" * 7),  # a valid header over too little data
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"^scaffold: .*{name}") as e:
            load_rgb(tmp_path / name, "scaffold")
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^scaffold: file .* does not exist"):
        load_rgb(tmp_path / "missing.png", "scaffold")


# ------------------------------------------------------------------------------------------------ the users
def test_trainers_estimator_and_ip_adapter_use_the_loader(tmp_path):
    """An RGBA image whose transparent half holds red reads as white there in every consumer."""
    from dreamfuse.engine.ip_adapter import CLIP_MEAN, CLIP_STD, IPAdapter
    from dreamfuse.engine.patch_quality import _to_batch
    from dreamfuse.engine.train.patchdpo import _load_resized
    from dreamfuse.engine.train.reversion import _load_image

    a = np.zeros((16, 32, 4), np.uint8)
    a[:, :16] = (255, 0, 0, 0)  # transparent red
    a[:, 16:] = (0, 0, 255, 255)  # opaque blue
    path = tmp_path / "cut.png"
    Image.fromarray(a, "RGBA").save(path)
    white, blue = torch.ones(3), torch.tensor([0.0, 0.0, 1.0])

    def check(x):  # (3, H, W): left quarter white, right quarter blue
        w = x.shape[-1]
        torch.testing.assert_close(x[:, :, : w // 4].mean((1, 2)), white, atol=1e-3, rtol=0)
        torch.testing.assert_close(x[:, :, -w // 4:].mean((1, 2)), blue, atol=1e-3, rtol=0)

    rev = _load_image(path, 16)
    assert rev.shape == (3, 16, 16)  # resized whole (no centre crop: both halves are still there)
    check(rev)
    img, original = _load_resized(path, 16)
    assert original == (16, 32)
    check(img)
    check(_to_batch(path, "generated")[0])
    pixels = IPAdapter.preprocess(SimpleNamespace(image_size=16), [path])  # centre crop of the 16-high image
    x = pixels[0] * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert torch.allclose(x[:, :, :4].mean((1, 2)), white, atol=1e-3)
    assert torch.allclose(x[:, :, -4:].mean((1, 2)), blue, atol=1e-3)
    # EXIF orientation reaches the trainers: PatchDPO's SDXL "original size" is the upright one
    _sideways_jpeg(tmp_path / "phone.jpg")
    assert _load_resized(tmp_path / "phone.jpg", 8)[1] == (16, 8)


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    """mkstemp makes 0o600 files; a written image must be readable as any file the user writes (0o666 - umask)."""
    import os

    from dreamfuse.engine.files import save_image_atomic
    from PIL import Image

    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    atomic = save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "atomic.png")
    assert os.stat(atomic).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


# ------------------------------------------------------------------------------------------------ arrays
def test_numpy_arrays_are_images():
    a = np.zeros((16, 24, 3), np.uint8)
    a[:, :12] = RED
    a[:, 12:] = BLUE
    want = image_tensor(Image.fromarray(a), 16, 24, "ref")
    assert torch.equal(image_tensor(a, 16, 24, "ref"), want)  # uint8 as its PIL image
    torch.testing.assert_close(image_tensor(a.astype(np.float64) / 255, 16, 24, "ref"), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(image_tensor(a[:, ::-1], 16, 24, "ref"), want.flip(-1), atol=0, rtol=0)  # strided
    for bad, needle in ((a[..., :2], r"array must be \(H, W, 3\)"),
                        (a.astype(np.int32), "array must be uint8 or float"),
                        (a.astype(np.float32), r"a float array must hold finite values in \[0, 1\]"),
                        (a[None], r"array must be \(H, W, 3\)")):
        with pytest.raises(ValueError, match=f"^ref: {needle}"):
            image_tensor(bad, 16, 24, "ref")
    # the IP-Adapter's preprocessing takes them too, as their PIL images
    from dreamfuse.engine.ip_adapter import IPAdapter

    adapter = SimpleNamespace(image_size=16)
    assert torch.equal(IPAdapter.preprocess(adapter, [a]), IPAdapter.preprocess(adapter, [Image.fromarray(a)]))
