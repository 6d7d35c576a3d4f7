"""Tests for pipelines.archive: listing rules, robust decoding (Promise 1), timestamps."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import png_bomb, png_chunk
from PIL import Image

from pipelines.archive import (
    IMAGE_EXTENSIONS,
    ArchiveEntry,
    ArchiveError,
    DecodedImage,
    DecodeError,
    _to_rgb,
    captured_at,
    decode_image,
    list_archive,
    open_archive,
    parse_columns,
    read_bytes,
    timestamp_from_name,
)

# ---------------------------------------------------------------------------------------------
# helpers


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rgb_pattern(w: int = 24, h: int = 16) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 10 % 256, y * 15 % 256, (x + y) * 7 % 256], axis=2).astype(np.uint8)


def _png_48bit(pixels: list[tuple[int, int, int]]) -> bytes:
    raw = b"\x00" + b"".join(struct.pack(">3H", *p) for p in pixels)
    ihdr = struct.pack(">IIBBBBB", len(pixels), 1, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def _assert_rgb(result: DecodedImage, h: int, w: int) -> np.ndarray:
    assert isinstance(result, DecodedImage)
    rgb = result.rgb
    assert rgb.dtype == np.uint8
    assert rgb.shape == (h, w, 3)
    assert rgb.flags.c_contiguous and rgb.flags.writeable
    assert (result.height, result.width) == (h, w)
    return rgb


# ---------------------------------------------------------------------------------------------
# listing

TINY_PNG = _encode(Image.new("RGB", (2, 2), (1, 2, 3)), "PNG")

KEPT = [
    "top.jpg",
    "year=2017/camera=2/a.JPG",
    "year=2017/camera=2/b.jpeg",
    "year=2017/camera=2/c.PNG",
    "year=2017/camera=2/d.Tif",
    "year=2017/camera=2/e.TIFF",
    "year=2017/camera=2/f.bmp",
    "year=2017/camera=2/g.WebP",
    "year=2018/camera=1/sub/h.png",
    "year=2018/notes-dir/i.jpg",
]
SKIPPED = [
    "_truth/labels.csv",
    "_truth/masks/x.png",
    "_truth/masks/year=2017/camera=2/a.png",
    ".hidden/a.jpg",
    ".DS_Store",
    "_tmp.jpg",
    "notes.txt",
    "year=2017/camera=2/.thumb.jpg",
    "year=2017/camera=2/_draft.png",
    "year=2017/_old/z.jpg",
    "year=2017/camera=2/readme.md",
    "year=2017/camera=2/archive.jpg.gz",
]


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    # The root itself lives under "_"/"." directories: only relative components count.
    root = tmp_path / "_outer" / ".cache" / "archive"
    for rel in KEPT + SKIPPED:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(TINY_PNG)
    return root


def test_list_archive_exact_paths_columns_and_uris(archive: Path):
    entries = list(list_archive(str(archive)))
    paths = [e.path for e in entries]
    assert paths == sorted(KEPT)
    by_path = {e.path: e for e in entries}
    assert by_path["year=2017/camera=2/a.JPG"].columns == {"year": "2017", "camera": "2"}
    assert list(by_path["year=2017/camera=2/a.JPG"].columns) == ["year", "camera"]
    assert by_path["year=2018/camera=1/sub/h.png"].columns == {"year": "2018", "camera": "1"}
    assert by_path["year=2018/notes-dir/i.jpg"].columns == {"year": "2018"}
    assert by_path["top.jpg"].columns == {}
    for e in entries:
        assert isinstance(e, ArchiveEntry)
        assert e.image_uri == "file://" + str(archive / e.path)
        assert e.image_uri.startswith("file:///")
        assert e.size == len(TINY_PNG)
        assert isinstance(e.mtime, datetime) and e.mtime.tzinfo is None
        assert read_bytes(e.image_uri) == TINY_PNG
    # file:// URIs, trailing slashes and relative paths list the same thing
    assert [e.path for e in list_archive("file://" + str(archive) + "/")] == paths
    cwd = os.getcwd()
    try:
        os.chdir(archive.parent)
        assert [e.image_uri for e in list_archive("archive")] == [e.image_uri for e in entries]
    finally:
        os.chdir(cwd)


def test_every_extension_in_any_case_is_listed(tmp_path: Path):
    names = []
    for i, ext in enumerate(IMAGE_EXTENSIONS):
        for variant in (ext, ext.upper(), ext[:2].upper() + ext[2:]):
            names.append(f"img{i}{variant}")
    names.append("not_an_image.gif")
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    listed = {e.path for e in list_archive(str(tmp_path))}
    assert listed == set(names) - {"not_an_image.gif"}


def test_etag_tracks_size_and_mtime(archive: Path):
    def etag_of(rel: str) -> str:
        return next(e.etag for e in list_archive(str(archive)) if e.path == rel)

    rel = "year=2017/camera=2/a.JPG"
    target = archive / rel
    st = target.stat()
    first = etag_of(rel)
    assert first == f"{st.st_size}-{st.st_mtime_ns}"
    assert etag_of(rel) == first  # stable
    # same size, different mtime
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = etag_of(rel)
    assert second != first
    # rewritten with a different size
    target.write_bytes(TINY_PNG + b"\x00\x00")
    third = etag_of(rel)
    assert third not in (first, second)
    assert third.startswith(f"{len(TINY_PNG) + 2}-")


def test_open_archive_errors(tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(ArchiveError, match="nope"):
        open_archive(str(missing))
    with pytest.raises(ArchiveError, match="nope"):
        list(list_archive("file://" + str(missing)))
    a_file = tmp_path / "file.jpg"
    a_file.write_bytes(b"x")
    with pytest.raises(ArchiveError, match="not a directory"):
        open_archive(str(a_file))
    with pytest.raises(ArchiveError, match="unsupported scheme"):
        open_archive("gs://bucket/x")
    with pytest.raises(ArchiveError):
        open_archive("s3://")
    assert issubclass(ArchiveError, ValueError)
    fs, root = open_archive(str(tmp_path))
    assert root == str(tmp_path) and fs.isdir(root)


def test_read_bytes_missing_file_is_a_read_error(tmp_path: Path):
    with pytest.raises(DecodeError) as info:
        read_bytes("file://" + str(tmp_path / "gone.jpg"))
    assert info.value.stage == "read"
    assert info.value.error_type == "FileNotFoundError"


def test_parse_columns():
    assert parse_columns("a=1/b=x=y/plain/c=/f=9.jpg") == {"a": "1", "b": "x=y", "c": ""}
    assert parse_columns("=1/9x=2/ok_1=3/img.png") == {"ok_1": "3"}
    # keys differing only in case are one column (SQL names are case-insensitive)
    assert parse_columns("Camera=1/img.jpg") == parse_columns("camera=1/img.jpg") == {"camera": "1"}
    assert parse_columns("YEAR=2017/Year=2018/img.jpg") == {"year": "2018"}


# ---------------------------------------------------------------------------------------------
# bad files: each becomes a DecodeError with the right stage and error_type


def _noise(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _truncated_jpeg() -> bytes:
    data = _encode(Image.fromarray(_noise(96, 96)), "JPEG", quality=90)
    return data[: len(data) // 2]


def _corrupt_png() -> bytes:
    data = bytearray(_encode(Image.fromarray(_rgb_pattern()), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # bad CRC / bad deflate stream
    return bytes(data)


BAD_FILES = {
    "truncated_jpeg": (_truncated_jpeg, {"OSError"}),
    "zero_bytes": (lambda: b"", {"EmptyFile"}),
    "random_bytes": (
        lambda: np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        {"UnidentifiedImageError"},
    ),
    "text_named_jpg": (lambda: b"hello, I am not a JPEG\n" * 10, {"UnidentifiedImageError"}),
    "gif_not_allowed": (
        lambda: _encode(Image.new("P", (8, 8), 3), "GIF"),
        {"UnidentifiedImageError"},
    ),
    "corrupt_png": (_corrupt_png, {"SyntaxError", "OSError", "ValueError"}),
    "header_only_png": (
        lambda: _encode(Image.new("L", (8, 8)), "PNG")[:33],
        {"UnidentifiedImageError"},
    ),
    "png_cut_in_pixels": (
        lambda: _encode(Image.fromarray(_noise(64, 64)), "PNG")[:-200],
        {"OSError"},
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_becomes_decode_error(name: str):
    make, expected = BAD_FILES[name]
    with pytest.raises(DecodeError) as info:
        decode_image(make())
    err = info.value
    assert err.stage == "decode"
    assert err.error_type in expected, (err.error_type, err.message)
    assert isinstance(err.message, str) and 0 < len(err.message) <= 500
    assert "0x" not in err.message  # no memory addresses: rows are reproducible


def test_decode_error_pickles():
    err = DecodeError("decode", "OSError", "x" * 1000)
    assert len(err.message) == 500
    back = pickle.loads(pickle.dumps(err))
    assert (back.stage, back.error_type, back.message) == ("decode", "OSError", err.message)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_own_limit():
    # 12000 x 12000 = 144 M pixels: above max_pixels, below Pillow's own error threshold
    # (2 * MAX_IMAGE_PIXELS), so only our check stands between us and a 144 MB decode.
    data = png_bomb(12000, 12000)
    assert len(data) < 100_000
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=10_000_000)
    assert (info.value.stage, info.value.error_type) == ("decode", "DecompressionBombError")
    assert "144000000" in info.value.message


def test_decompression_bomb_pillow_limit():
    # 20000 x 20000 = 400 M pixels: Pillow's own guard raises at open; same error row.
    data = png_bomb(20000, 20000)
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=10_000_000)
    assert (info.value.stage, info.value.error_type) == ("decode", "DecompressionBombError")
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=10**12)  # Pillow's process-wide ceiling still holds
    assert info.value.error_type == "DecompressionBombError"


def test_max_pixels_decides_not_pillows_warning(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _encode(Image.new("L", (40, 40), 7), "PNG")  # 1600 px: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning):
        out = decode_image(data, max_pixels=5000)
    assert out.rgb.shape == (40, 40, 3)
    with pytest.raises(DecodeError) as info, pytest.warns(Image.DecompressionBombWarning):
        decode_image(data, max_pixels=1500)
    assert info.value.error_type == "DecompressionBombError"


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_bomb_warning_as_error_is_a_decode_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _encode(Image.new("L", (40, 40), 7), "PNG")
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=5000)
    assert info.value.error_type == "DecompressionBombError"


# ---------------------------------------------------------------------------------------------
# good files in odd modes: each becomes a correct RGB uint8 array


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [("PNG", {}), ("TIFF", {}), ("BMP", {}), ("WEBP", {"lossless": True})],
)
def test_lossless_formats_round_trip(fmt: str, kwargs: dict):
    pattern = _rgb_pattern()
    out = decode_image(_encode(Image.fromarray(pattern), fmt, **kwargs))
    np.testing.assert_array_equal(_assert_rgb(out, 16, 24), pattern)


def test_jpeg_rgb_close():
    pattern = np.full((16, 24, 3), (200, 60, 30), np.uint8)
    out = decode_image(_encode(Image.fromarray(pattern), "JPEG", quality=95))
    rgb = _assert_rgb(out, 16, 24)
    assert np.abs(rgb.astype(int) - pattern).max() <= 3


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 8), (255, 0, 0, 0))  # pure cyan
    data = _encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    rgb = _assert_rgb(decode_image(data), 8, 16)
    assert np.abs(rgb.astype(int) - (0, 255, 255)).max() <= 3


def test_16bit_grayscale_png_is_scaled_not_clipped():
    values = np.array([[0, 255, 256, 1000, 40000, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = _assert_rgb(decode_image(data), 1, 6)
    expected = (values >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], expected)
    assert rgb[0, 3, 0] == 3  # Pillow's convert("RGB") would give 255 here


def test_16bit_big_endian_tiff():
    values = np.array([[0, 300, 1000, 65535]], dtype=">u2")
    data = _encode(Image.fromarray(values), "TIFF")
    rgb = _assert_rgb(decode_image(data), 1, 4)
    np.testing.assert_array_equal(rgb[0, :, 1], [0, 1, 3, 255])


def test_32bit_int_and_float_tiffs():
    ints = np.array([[-5, 0, 256, 65535, 70000]], dtype=np.int32)
    rgb = _assert_rgb(decode_image(_encode(Image.fromarray(ints), "TIFF")), 1, 5)
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 0, 1, 255, 255])
    floats = np.array([[-1.0, 0.4, 100.6, 300.0]], dtype=np.float32)
    rgb = _assert_rgb(decode_image(_encode(Image.fromarray(floats), "TIFF")), 1, 4)
    np.testing.assert_array_equal(rgb[0, :, 2], [0, 0, 101, 255])


def test_48bit_rgb_png_keeps_high_byte():
    data = _png_48bit([(0x1234, 0xABCD, 0xFF00), (0x00FF, 0x8000, 0x7FFF)])
    rgb = _assert_rgb(decode_image(data), 1, 2)
    np.testing.assert_array_equal(rgb[0], [[0x12, 0xAB, 0xFF], [0x00, 0x80, 0x7F]])


PALETTE = [(255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _palette_image() -> Image.Image:
    im = Image.new("P", (4, 2))
    im.putpalette([c for rgb in PALETTE for c in rgb])
    im.putdata([0, 1, 2, 3, 3, 2, 1, 0])
    return im


def test_palette_png_maps_colours():
    data = _encode(_palette_image(), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    rgb = _assert_rgb(decode_image(data), 2, 4)
    idx = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    np.testing.assert_array_equal(rgb, np.array(PALETTE, np.uint8)[idx])


def test_palette_with_transparency_composites_onto_black():
    data = _encode(_palette_image(), "PNG", transparency=0)  # white index 0 transparent
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and "transparency" in opened.info
    rgb = _assert_rgb(decode_image(data), 2, 4)
    expected = np.array([(0, 0, 0)] + PALETTE[1:], np.uint8)[np.array([[0, 1, 2, 3], [3, 2, 1, 0]])]
    np.testing.assert_array_equal(rgb, expected)


def test_rgba_composites_onto_black():
    px = np.array(
        [[[200, 100, 50, 255], [200, 100, 50, 128], [200, 100, 50, 0], [9, 9, 9, 51]]],
        dtype=np.uint8,
    )
    rgb = _assert_rgb(decode_image(_encode(Image.fromarray(px, "RGBA"), "PNG")), 1, 4)
    np.testing.assert_array_equal(rgb[0], [[200, 100, 50], [100, 50, 25], [0, 0, 0], [2, 2, 2]])


def test_la_composites_onto_black():
    im = Image.new("LA", (2, 1))
    im.putdata([(200, 255), (200, 0)])
    rgb = _assert_rgb(decode_image(_encode(im, "PNG")), 1, 2)
    np.testing.assert_array_equal(rgb[0], [[200, 200, 200], [0, 0, 0]])


def test_grayscale_and_bilevel():
    gray = np.array([[0, 17, 255]], np.uint8)
    rgb = _assert_rgb(decode_image(_encode(Image.fromarray(gray), "PNG")), 1, 3)
    np.testing.assert_array_equal(rgb[0], [[0] * 3, [17] * 3, [255] * 3])
    bilevel = Image.new("1", (3, 1))
    bilevel.putdata([0, 1, 0])
    data = _encode(bilevel, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    rgb = _assert_rgb(decode_image(data), 1, 3)
    np.testing.assert_array_equal(rgb[0], [[0] * 3, [255] * 3, [0] * 3])


def test_other_modes_convert():
    ycc = Image.new("YCbCr", (2, 2), (128, 128, 128))
    np.testing.assert_array_equal(_to_rgb(ycc), np.full((2, 2, 3), 128, np.uint8))
    hsv = Image.new("HSV", (1, 1), (0, 255, 255))
    np.testing.assert_array_equal(_to_rgb(hsv), [[[255, 0, 0]]])


@pytest.mark.parametrize(("orientation", "corner"), [(6, (0, -1)), (8, (-1, 0)), (3, (-1, -1))])
def test_exif_orientation_applied(orientation: int, corner: tuple[int, int]):
    # stored 40 wide x 20 high, red block in the stored top-left corner
    stored = np.full((20, 40, 3), 255, np.uint8)
    stored[:6, :6] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data)
    h, w = (40, 20) if orientation in (6, 8) else (20, 40)
    rgb = _assert_rgb(out, h, w)
    r, c = corner
    assert np.abs(rgb[r, c].astype(int) - (255, 0, 0)).max() <= 12
    # the other three corners stay white
    for rr in (0, -1):
        for cc in (0, -1):
            if (rr, cc) != corner:
                assert rgb[rr, cc].min() >= 243, (rr, cc, rgb[rr, cc])


def test_corpus_never_stops_the_loop():
    """Promise 1 in miniature: a mixed batch yields one result or one error per file."""
    corpus = {name: make() for name, (make, _) in BAD_FILES.items()}
    corpus["good_png"] = _encode(Image.fromarray(_rgb_pattern()), "PNG")
    corpus["good_cmyk"] = _encode(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG")
    decoded, errors = {}, {}
    for name, data in corpus.items():
        try:
            decoded[name] = decode_image(data)
        except DecodeError as e:
            errors[name] = e
    assert set(decoded) == {"good_png", "good_cmyk"}
    assert set(errors) == set(BAD_FILES)


# ---------------------------------------------------------------------------------------------
# captured_at


def _jpeg_with_dates(original: str | None, plain: str | None, offset: str | None = None) -> bytes:
    exif = Image.Exif()
    if plain:
        exif[306] = plain
    if original:
        sub = exif.get_ifd(0x8769)
        sub[36867] = original
        if offset:
            sub[36881] = offset
    return _encode(Image.new("RGB", (4, 4)), "JPEG", exif=exif.tobytes())


def test_captured_at_precedence():
    mtime = datetime(2001, 1, 1, 0, 0, 0)
    name = "cam/IMG_20180203_040506.jpg"
    with_exif = _jpeg_with_dates("2019:05:04 03:02:01", "2000:01:01 00:00:00")
    no_exif = _encode(Image.new("RGB", (4, 4)), "JPEG")
    # EXIF DateTimeOriginal beats DateTime, the file name and mtime
    assert captured_at(with_exif, name, mtime) == datetime(2019, 5, 4, 3, 2, 1)
    decoded = decode_image(with_exif)
    assert decoded.exif_datetime == datetime(2019, 5, 4, 3, 2, 1)
    assert captured_at(decoded, name, mtime) == datetime(2019, 5, 4, 3, 2, 1)
    assert captured_at(Image.open(io.BytesIO(with_exif)), name, mtime) == datetime(
        2019, 5, 4, 3, 2, 1
    )
    # DateTime only
    only_plain = _jpeg_with_dates(None, "2000:01:02 03:04:05")
    assert captured_at(only_plain, name, mtime) == datetime(2000, 1, 2, 3, 4, 5)
    # no EXIF: the file name beats mtime
    assert captured_at(no_exif, name, mtime) == datetime(2018, 2, 3, 4, 5, 6)
    # nothing: mtime; unreadable bytes are simply "no EXIF"
    assert captured_at(no_exif, "cam/IMG_0001.jpg", mtime) == mtime
    assert captured_at(b"garbage", "cam/IMG_0001.jpg", mtime) == mtime
    assert captured_at(b"", "x.jpg", None) is None
    # placeholder EXIF dates are ignored
    zeros = _jpeg_with_dates("0000:00:00 00:00:00", None)
    assert captured_at(zeros, name, mtime) == datetime(2018, 2, 3, 4, 5, 6)


def test_exif_offset_converted_to_utc():
    data = _jpeg_with_dates("2019:05:04 03:02:01", None, offset="+02:00")
    assert captured_at(data, "x.jpg", None) == datetime(2019, 5, 4, 1, 2, 1)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("20170601T123456.jpg", datetime(2017, 6, 1, 12, 34, 56)),
        ("cam2_20170601_123456.png", datetime(2017, 6, 1, 12, 34, 56)),
        ("2017-06-01_12-34-56.jpg", datetime(2017, 6, 1, 12, 34, 56)),
        ("frame20170601123456.tif", datetime(2017, 6, 1, 12, 34, 56)),
        ("2017-06-01T12:34:56Z.jpg", datetime(2017, 6, 1, 12, 34, 56)),
        ("dir20170601_123456/IMG_0001.jpg", None),  # directories do not count
        ("IMG_0001.jpg", None),
        ("20171301_123456.jpg", None),  # month 13
        ("120170601123456.jpg", None),  # embedded in a longer number
    ],
)
def test_timestamp_from_name(name: str, expected: datetime | None):
    assert timestamp_from_name(name) == expected


def test_symlinks_leading_out_of_the_archive_are_skipped_unless_asked(
    tmp_path, monkeypatch, caplog
):
    root = tmp_path / "archive"
    (root / "year=2017").mkdir(parents=True)
    (root / "year=2017" / "a.jpg").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "secret").mkdir(parents=True)
    (elsewhere / "outside.jpg").write_bytes(b"y")
    (elsewhere / "secret" / "s.jpg").write_bytes(b"z")
    (root / "year=2017" / "link-out.jpg").symlink_to(elsewhere / "outside.jpg")
    (root / "year=2018").symlink_to(elsewhere / "secret")  # a directory outside
    (root / "year=2019").mkdir()
    (root / "year=2019" / "link-in.jpg").symlink_to(root / "year=2017" / "a.jpg")  # inside
    monkeypatch.delenv("FLOWSCORE_FOLLOW_SYMLINKS", raising=False)
    with caplog.at_level("WARNING", logger="pipelines.archive"):
        paths = [e.path for e in list_archive(str(root))]
    assert paths == ["year=2017/a.jpg", "year=2019/link-in.jpg"]
    assert "skipped 2 symbolic link(s)" in caplog.text
    monkeypatch.setenv("FLOWSCORE_FOLLOW_SYMLINKS", "1")
    paths = [e.path for e in list_archive(str(root))]
    assert paths == [
        "year=2017/a.jpg",
        "year=2017/link-out.jpg",
        "year=2018/s.jpg",
        "year=2019/link-in.jpg",
    ]


def test_column_listing_is_the_listing(archive: Path):
    """``list_archive_columns`` holds what ``list_archive`` yields, in the same order:
    entries made on access, keys without entries, path columns from the folders."""
    from pipelines.archive import ArchiveListing, ListingBuilder, list_archive_columns

    listing = list_archive_columns(str(archive))
    entries = list(listing)
    assert isinstance(listing, ArchiveListing) and len(listing) == len(entries) > 3
    assert [e.path for e in entries] == sorted(e.path for e in entries)
    assert list(listing.keys()) == [(e.image_uri, e.etag) for e in entries]
    assert listing[0] == entries[0] and listing[-1] == entries[-1]
    assert listing[1:3] == entries[1:3]
    with pytest.raises(IndexError):
        listing[len(listing)]
    assert listing.path_columns() == sorted({k for e in entries for k in e.columns})
    # the builder sorts what it is given, and keeps S3 etags and missing times
    b = ListingBuilder("s3://b/", with_etags=True)
    b.add("year=2019/z.jpg", 3, None, "e1")
    b.add("year=2018/a.jpg", 5, 1_500_000_000_000_000_000, "e2")
    built = list(b.build())
    assert [(e.path, e.etag, e.size) for e in built] == [
        ("year=2018/a.jpg", "e2", 5),
        ("year=2019/z.jpg", "e1", 3),
    ]
    assert built[0].image_uri == "s3://b/year=2018/a.jpg" and built[1].mtime is None
    assert built[0].mtime == datetime(2017, 7, 14, 2, 40) and built[0].columns == {"year": "2018"}


@pytest.mark.s3
def test_an_s3_listing_of_more_than_one_page(s3_server):
    """S3 lists 1,000 keys a page: a prefix of 1,203 objects (and a few that are not
    images) comes back whole, in path order, with the objects' ETags."""
    import boto3
    from conftest import make_bucket

    from pipelines.archive import list_archive_columns

    make_bucket("paged")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    names = [f"a/year={2017 + i % 3}/img_{i:05d}.jpg" for i in range(1203)]
    for n in names:
        s3.put_object(Bucket="paged", Key=n, Body=b"x")
    s3.put_object(Bucket="paged", Key="a/notes.txt", Body=b"x")
    s3.put_object(Bucket="paged", Key="b/img_other.jpg", Body=b"x")
    listing = list_archive_columns("s3://paged/a")
    assert [e.path for e in listing] == sorted(n.removeprefix("a/") for n in names)
    etag = s3.head_object(Bucket="paged", Key=names[0])["ETag"].strip('"')
    assert dict(listing.keys())[f"s3://paged/{names[0]}"] == etag
    assert listing.path_columns() == ["year"]
