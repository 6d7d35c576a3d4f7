"""Deterministic synthetic image archives with ground truth (numpy + Pillow; ``texture`` also
reads the CC0 textures that ship inside scikit-image's wheel: nothing is downloaded).

Three kinds are rendered:

``harvest``
    A dense layer of maize-like grain kernels seen from above (as on a combine's elevator),
    filling the whole frame. Anomalies: green leaf fragments, pale papery husk pieces, broken
    kernel fragments with exposed white starch, reddish cob pieces with a cellular texture and
    dark mouldy kernels.
``factory``
    A brushed-metal surface. Anomalies: scratches, spots, branching cracks and soft stains.
``texture``
    256 x 256 grey views (stored as RGB, R = G = B) of scikit-image's ``brick``, ``grass`` and
    ``gravel``: random position, zoom 0.9..1.1, angle within +-4 degrees (mirrored and/or
    turned by 180 degrees), contrast, brightness, a light gradient and noise. Each anomalous
    image has exactly one defect (:data:`DEFECTS`, see :func:`render_texture`): ``local``
    (spots, scratches; masked), ``dark_smooth`` (a flattened, darkened blob; masked) or
    ``global`` (rotated 10..25 degrees, zoomed by 1.3..1.6 either way, or contrast
    0.55..0.65; no mask, so it counts for image AUROC only). The camera/lighting notes below
    are for harvest and factory.

Every camera has fixed lighting (gain, colour tint, vignetting and a gradient) derived only
from its number, plus a small per-image brightness jitter; every image gets slight blur and
sensor noise. Each anomaly covers roughly 0.3 % to 1.2 % of the image; an anomalous image
holds one to three of them, drawn on top of the normal content, and its mask holds exactly
the pixels that were drawn.

Archive layout (see DESIGN.md, "Archive layout")::

    OUT/year=YYYY/camera=K/img_YYYYmmddTHHMMSS.jpg      JPEG, quality 92, 4:2:0, EXIF date
    OUT/_truth/labels.csv                              path,label (sorted by path)
    OUT/_truth/masks/year=YYYY/camera=K/img_....png    8-bit L, 255 = anomalous pixel

``texture`` has ``texture=NAME/year=YYYY/img_YYYYmmddTHHMMSS.jpg`` in place of
``year=YYYY/camera=K/...`` (so ``OUT/texture=brick`` is itself an archive of one texture;
``cameras`` is ignored), masks only for ``local`` and ``dark_smooth``, and
``OUT/_truth/defects.csv`` with columns ``path,defect`` (the anomalous images, sorted by
path; ``defect`` one of ``local``, ``dark_smooth``, ``global``). The k-th anomalous image
drawn gets ``DEFECTS[k % 3]``, so the three types are balanced.

Determinism: image ``i`` is rendered from its own generator,
``SeedSequence(seed, spawn_key=(1, i))``; the set of anomalous images (exactly
``round(images * anomaly_rate)``) comes from ``spawn_key=(0,)``, and the capture times of
camera group ``g`` from ``spawn_key=(2, g)``. Image ``i`` goes to the ``(year, camera)`` group
``i % (len(years) * cameras)`` (years outer, cameras inner); for ``texture`` to the
``(texture, year)`` group ``i % (3 * len(years))`` (textures outer, years inner). Within a
group, capture times increase and are spread over the harvest season (1 August to 31 October,
08:00 to 18:00).
Nothing time- or machine-dependent is written, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "DEFECTS",
    "GLOBAL_CHANGES",
    "KINDS",
    "TEXTURES",
    "SynthSummary",
    "render_image",
    "render_texture",
    "write_archive",
]

KINDS: tuple[str, ...] = ("harvest", "factory", "texture")

_REF_AREA = 460 * 640  # the reference image size that the pixel sizes below are tuned for
_DAY_START_H = 8  # captures happen between 08:00 and 18:00
_DAY_SECONDS = 10 * 3600
_SEASON_DAYS = 92  # 1 August .. 31 October
_JPEG_QUALITY = 92
_EXIF_IFD = 0x8769
_TAG_DATETIME_ORIGINAL = 0x9003

Color = tuple[int, int, int]
Points = list[tuple[float, float]]


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`write_archive` wrote."""

    root: Path
    images: int
    anomalous: int
    paths: list[str]  # relative paths (forward slashes) of the images written, sorted
    # kind "texture": {relative path: defect} of the anomalous images (as _truth/defects.csv)
    defects: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds are: {', '.join(KINDS)}")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bound}, got {v}")
    return v


def _default_size(kind: str, height: int | None, width: int | None) -> tuple[int, int]:
    dh, dw = (256, 256) if kind == "texture" else (460, 640)
    return (dh if height is None else height), (dw if width is None else width)


def _check_size(height: int, width: int) -> tuple[int, int]:
    h = _check_int("height", height, 64, 20000)
    w = _check_int("width", width, 64, 20000)
    return h, w


# --------------------------------------------------------------------------- lighting


@dataclass(frozen=True)
class _Lighting:
    gain: float
    tint: tuple[float, float, float]
    vignette: float
    center: tuple[float, float]  # (y, x) of the vignetting centre, in units of half-size
    gradient: float
    gradient_angle: float
    light_angle: float  # direction the light comes from, for kernel shading


@lru_cache(maxsize=64)
def _camera_lighting(camera: int) -> _Lighting:
    r = np.random.default_rng(np.random.SeedSequence([0x5EED, camera]))
    return _Lighting(
        gain=float(r.uniform(0.9, 1.08)),
        tint=(float(r.uniform(0.95, 1.05)), 1.0, float(r.uniform(0.93, 1.06))),
        vignette=float(r.uniform(0.12, 0.3)),
        center=(float(r.uniform(-0.2, 0.2)), float(r.uniform(-0.2, 0.2))),
        gradient=float(r.uniform(0.03, 0.1)),
        gradient_angle=float(r.uniform(0, 2 * np.pi)),
        light_angle=float(r.uniform(0, 2 * np.pi)),
    )


@lru_cache(maxsize=16)
def _light_field(camera: int, height: int, width: int) -> np.ndarray:
    """Per-pixel RGB gain (H x W x 3, float32, read-only) of one camera."""
    li = _camera_lighting(camera)
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    r2 = ((y - li.center[0]) ** 2 + (x - li.center[1]) ** 2) / 2.0
    proj = x * math.cos(li.gradient_angle) + y * math.sin(li.gradient_angle)
    field = li.gain * (1.0 - li.vignette * r2) * (1.0 + li.gradient * proj)
    out = field[:, :, None] * np.asarray(li.tint, dtype=np.float32)[None, None, :]
    out = out.astype(np.float32)
    out.setflags(write=False)
    return out


def _finish(
    canvas: Image.Image, rng: np.random.Generator, camera: int, blur: float, noise: float
) -> np.ndarray:
    """Blur, light, add sensor noise and quantise a rendered scene."""
    h, w = canvas.height, canvas.width
    img = canvas.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else canvas
    arr: np.ndarray = np.asarray(img, dtype=np.float32)
    jitter = float(rng.uniform(0.96, 1.04))
    arr = arr * (_light_field(camera, h, w) * jitter)
    arr += rng.standard_normal((h, w, 3), dtype=np.float32) * noise
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- shape helpers


def _jagged_blob(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    radius: float,
    *,
    aspect: float = 1.0,
    angle: float = 0.0,
    vertices: int = 14,
    rough: float = 0.2,
) -> Points:
    """An irregular closed polygon around (cx, cy) with mean radius ``radius``."""
    t = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    t += np.linspace(0, 2 * np.pi, vertices, endpoint=False) - t  # keep roughly even spacing
    t += rng.uniform(-0.5, 0.5, vertices) * (2 * np.pi / vertices)
    r = radius * (1.0 + rough * rng.uniform(-1, 1, vertices))
    a, b = r * math.sqrt(aspect), r / math.sqrt(aspect)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return list(zip((cx + x * c - y * s).tolist(), (cy + x * s + y * c).tolist(), strict=True))


def _pts(arr: np.ndarray) -> Points:
    return [(float(p[0]), float(p[1])) for p in arr]


def _shade(color: np.ndarray, f: float, add: float = 0.0) -> Color:
    c = np.clip(color * f + add, 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def _strip(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    length: float,
    width: float,
    angle: float,
    *,
    profile: str,
    bend: float,
    n: int = 24,
) -> tuple[Points, np.ndarray, np.ndarray]:
    """An elongated outline along a bent centreline; returns (polygon, centreline, normal)."""
    t = np.linspace(0.0, 1.0, n)
    if profile == "leaf":
        half = 0.5 * width * np.sin(np.pi * np.clip(t * 0.85 + 0.12, 0, 1)) ** 0.7
    else:  # "husk": almost parallel sides, tapering a little to one end
        half = 0.5 * width * (1.0 - 0.45 * t) * np.minimum(1.0, 6 * np.minimum(t, 1 - t) + 0.55)
    half = half * (1.0 + 0.07 * rng.uniform(-1, 1, n))
    u = (t - 0.5) * length
    v = bend * length * (t - 0.5) ** 2
    c, s = math.cos(angle), math.sin(angle)
    centre = np.stack([cx + u * c - v * s, cy + u * s + v * c], axis=1)
    d = np.gradient(centre, axis=0)
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
    left = centre + normal * half[:, None]
    right = centre - normal * half[:, None]
    # torn ends: a few jagged points across each end
    ends = []
    for idx, sign in ((-1, 1.0), (0, -1.0)):
        p, q = (left[idx], right[idx]) if sign > 0 else (right[idx], left[idx])
        tang = d[idx] / (np.linalg.norm(d[idx]) + 1e-9) * sign
        k = rng.integers(2, 5)
        f = np.sort(rng.uniform(0.15, 0.85, k))
        jag = rng.uniform(-0.25, 0.25, k) * width
        ends.append([p + (q - p) * fi + tang * ji for fi, ji in zip(f, jag, strict=True)])
    poly = np.concatenate([left, np.asarray(ends[0]), right[::-1], np.asarray(ends[1])], axis=0)
    return _pts(poly), centre, normal


class _Layer:
    """A full-size colour layer plus its mask; pasted onto the scene in one go."""

    def __init__(self, width: int, height: int) -> None:
        self.rgb = Image.new("RGB", (width, height))
        self.mask = Image.new("L", (width, height), 0)
        self.draw = ImageDraw.Draw(self.rgb)
        self.mdraw = ImageDraw.Draw(self.mask)

    def apply(
        self, canvas: Image.Image, truth: Image.Image, alpha: Image.Image | None = None
    ) -> None:
        canvas.paste(self.rgb, (0, 0), alpha if alpha is not None else self.mask)
        truth.paste(255, (0, 0, truth.width, truth.height), self.mask)


def _center(rng: np.random.Generator, w: int, h: int, margin: float = 0.08) -> tuple[float, float]:
    return (
        float(rng.uniform(margin * w, (1 - margin) * w)),
        float(rng.uniform(margin * h, (1 - margin) * h)),
    )


# --------------------------------------------------------------------------- harvest

_KERNEL_GOLD = np.array([228.0, 178.0, 48.0])
_KERNEL_BROWN = np.array([196.0, 136.0, 62.0])
_KERNEL_ORANGE = np.array([226.0, 150.0, 40.0])
_GERM = np.array([240.0, 224.0, 160.0])
_CREVICE: Color = (70, 48, 22)


def _kernel_colors(rng: np.random.Generator, n: int) -> np.ndarray:
    t = rng.beta(1.6, 3.0, n)[:, None]
    o = rng.beta(1.2, 4.0, n)[:, None]
    base = _KERNEL_GOLD * (1 - t) + _KERNEL_BROWN * t
    base = base * (1 - o) + _KERNEL_ORANGE * o
    return np.clip(base * rng.uniform(0.9, 1.06, (n, 1)) + rng.normal(0, 4, (n, 3)), 0, 255)


def _kernel_size(h: int, w: int) -> tuple[float, float]:
    s = math.sqrt(h * w / _REF_AREA)
    return 19.0 * s, 14.5 * s  # semi-axes of a typical kernel


def _kernel_outlines(
    cx: np.ndarray,
    cy: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    k: np.ndarray,
    *,
    scale: float = 1.0,
    shift: tuple[float, float] = (0.0, 0.0),
    along: float = 0.0,
    n: int = 18,
) -> np.ndarray:
    """Vertices (N x n x 2) of wedge-shaped kernels (rounded, wider at the crown end).

    ``scale`` shrinks the outline about its centre, ``shift`` moves it by a fraction of ``a``
    in image coordinates (towards the light), ``along`` moves it along the kernel's axis.
    """
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ct, st = np.cos(t), np.sin(t)
    ex = 2.0 / 2.6  # superellipse exponent: between an ellipse and a rounded rectangle
    ux = np.sign(ct) * np.abs(ct) ** ex
    uy = np.sign(st) * np.abs(st) ** ex
    x = a[:, None] * (ux[None, :] * scale + along)
    y = b[:, None] * uy[None, :] * scale * (1.0 + k[:, None] * ux[None, :])
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    px = cx[:, None] + x * c - y * s + shift[0] * a[:, None]
    py = cy[:, None] + x * s + y * c + shift[1] * a[:, None]
    return np.stack([px, py], axis=2)


# shading levels of a kernel: (outline scale, shift towards the light, shade value / 200)
_KERNEL_LEVELS = (
    (1.0, 0.0, 110),
    (0.9, 0.04, 150),
    (0.76, 0.09, 182),
    (0.56, 0.14, 200),
    (0.22, 0.3, 228),
)


def _harvest_base(rng: np.random.Generator, h: int, w: int, camera: int) -> Image.Image:
    a0, b0 = _kernel_size(h, w)
    step = 1.5 * b0
    ys = np.arange(-b0, h + b0, step)
    xs = np.arange(-b0, w + b0, step)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    gx = gx + (np.arange(len(ys))[:, None] % 2) * step / 2  # hexagonal packing
    cy = (gy + rng.uniform(-0.45, 0.45, gy.shape) * step).ravel()
    cx = (gx + rng.uniform(-0.45, 0.45, gx.shape) * step).ravel()
    n = cx.size
    order = rng.permutation(n)
    size = rng.normal(1.0, 0.08, n).clip(0.75, 1.3)
    a = a0 * size * rng.uniform(0.88, 1.12, n)
    b = b0 * size * rng.uniform(0.85, 1.15, n)
    theta = rng.uniform(0, 2 * np.pi, n)
    k = rng.uniform(0.1, 0.4, n)
    colors = _kernel_colors(rng, n)
    germ = rng.random(n) < 0.45
    germ_col = np.clip(_GERM * 0.6 + colors * 0.4, 0, 255).astype(np.int64)
    la = _camera_lighting(camera).light_angle
    light = (math.cos(la), math.sin(la))

    # colour and relief are drawn separately; the relief is blurred more, for smooth shading
    color = Image.new("RGB", (w, h), _CREVICE)
    relief = Image.new("L", (w, h), 40)
    cdraw, rdraw = ImageDraw.Draw(color), ImageDraw.Draw(relief)
    outline = _kernel_outlines(cx, cy, a, b, theta, k).tolist()
    germs = _kernel_outlines(
        cx, cy, a * 0.42, b * 0.5, theta + np.pi, np.full(n, 0.3), along=-0.75, n=12
    ).tolist()
    levels = [
        (
            _kernel_outlines(
                cx, cy, a, b, theta, k, scale=sc, shift=(sh * light[0], sh * light[1])
            ).tolist(),
            val,
        )
        for sc, sh, val in _KERNEL_LEVELS
    ]
    fills = [tuple(c) for c in colors.astype(np.int64).tolist()]
    rims = [tuple(c) for c in (colors * 0.45).astype(np.int64).tolist()]
    rim_w = max(1, int(round(0.09 * b0)))
    gfills = [tuple(c) for c in germ_col.tolist()]
    for i in order.tolist():
        cdraw.polygon([tuple(p) for p in outline[i]], fill=fills[i], outline=rims[i], width=rim_w)
        if germ[i]:
            cdraw.polygon([tuple(p) for p in germs[i]], fill=gfills[i])
        for pts, val in levels:
            rdraw.polygon([tuple(p) for p in pts[i]], fill=val)
    relief = relief.filter(ImageFilter.GaussianBlur(max(0.7, 0.1 * b0)))
    shade = np.asarray(relief, dtype=np.float32) / 200.0
    # faint surface texture (pericarp mottling)
    tex = rng.standard_normal((max(2, h // 4), max(2, w // 4))).astype(np.float32)
    tex_img = Image.fromarray(tex, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    shade = shade * (1.0 + 0.03 * np.asarray(tex_img))
    col = np.asarray(color, dtype=np.float32)
    spec = np.clip(shade - 1.0, 0.0, None)[:, :, None] * 160.0
    arr = col * np.minimum(shade, 1.0)[:, :, None] + spec
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def _leaf(rng: np.random.Generator, layer: _Layer, area: float, w: int, h: int) -> None:
    aspect = rng.uniform(2.5, 4.5)
    width = math.sqrt(area / (0.62 * aspect))
    length = width * aspect
    cx, cy = _center(rng, w, h)
    poly, centre, normal = _strip(
        rng,
        cx,
        cy,
        length,
        width,
        rng.uniform(0, np.pi),
        profile="leaf",
        bend=rng.uniform(-0.35, 0.35),
    )
    dry = rng.uniform(0, 0.45)
    base = np.array([78.0, 132.0, 46.0]) * (1 - dry) + np.array([150.0, 150.0, 70.0]) * dry
    base = base * rng.uniform(0.85, 1.1)
    layer.draw.polygon(poly, fill=_shade(base, 1.0))
    layer.mdraw.polygon(poly, fill=255)
    # parallel venation along the blade, and a pale midrib
    lines = max(3, int(width / 3.5))
    for off in np.linspace(-0.45, 0.45, lines):
        pts = _pts(centre + normal * (off * width))
        layer.draw.line(pts, fill=_shade(base, rng.uniform(0.82, 1.12)), width=1)
    rib = max(1, int(round(width * 0.09)))
    layer.draw.line(_pts(centre), fill=_shade(base, 1.25, 25), width=rib)


def _husk(rng: np.random.Generator, layer: _Layer, area: float, w: int, h: int) -> None:
    aspect = rng.uniform(1.8, 3.5)
    width = math.sqrt(area / (0.72 * aspect))
    length = width * aspect
    cx, cy = _center(rng, w, h)
    poly, centre, normal = _strip(
        rng,
        cx,
        cy,
        length,
        width,
        rng.uniform(0, np.pi),
        profile="husk",
        bend=rng.uniform(-0.25, 0.25),
    )
    base = np.array([236.0, 226.0, 190.0]) * rng.uniform(0.92, 1.02)
    layer.draw.polygon(poly, fill=_shade(base, 1.0))
    layer.mdraw.polygon(poly, fill=255)
    lines = max(4, int(width / 2.5))
    for off in np.sort(rng.uniform(-0.5, 0.5, lines)):
        pts = _pts(centre + normal * (off * width))
        layer.draw.line(pts, fill=_shade(base, rng.uniform(0.8, 0.95)), width=1)
    # a translucent darker fold
    fold = _pts(centre + normal * (rng.uniform(-0.2, 0.2) * width))
    layer.draw.line(fold, fill=_shade(base, 0.8), width=max(1, int(width * 0.08)))


def _broken(rng: np.random.Generator, layer: _Layer, area: float, w: int, h: int) -> None:
    pieces = int(rng.integers(2, 5))
    cx, cy = _center(rng, w, h)
    spread = math.sqrt(area) * 0.6
    for _ in range(pieces):
        r = math.sqrt(area / pieces / (np.pi * 0.85)) * rng.uniform(0.8, 1.2)
        px = cx + rng.normal(0, spread * 0.5)
        py = cy + rng.normal(0, spread * 0.5)
        ang = rng.uniform(0, np.pi)
        poly = _jagged_blob(
            rng, px, py, r, aspect=rng.uniform(1.0, 2.0), angle=ang, vertices=9, rough=0.35
        )
        color = _kernel_colors(rng, 1)[0]
        layer.draw.polygon(poly, fill=_shade(color, 0.9), outline=_shade(color, 0.55))
        layer.mdraw.polygon(poly, fill=255)
        # exposed floury starch: a white jagged face inside the piece
        starch = _jagged_blob(
            rng,
            px + rng.uniform(-0.2, 0.2) * r,
            py + rng.uniform(-0.2, 0.2) * r,
            r * rng.uniform(0.5, 0.7),
            aspect=rng.uniform(1.0, 1.8),
            angle=ang,
            vertices=8,
            rough=0.3,
        )
        layer.draw.polygon(starch, fill=(int(rng.uniform(232, 248)), 236, 222))


def _cob(rng: np.random.Generator, layer: _Layer, area: float, w: int, h: int) -> None:
    aspect = rng.uniform(1.0, 2.2)
    r = math.sqrt(area / np.pi)
    cx, cy = _center(rng, w, h)
    ang = rng.uniform(0, np.pi)
    outline = _jagged_blob(rng, cx, cy, r, aspect=aspect, angle=ang, vertices=16, rough=0.12)
    base = np.array([158.0, 60.0, 44.0]) * rng.uniform(0.85, 1.1)
    layer.draw.polygon(outline, fill=_shade(base, 0.7))
    layer.mdraw.polygon(outline, fill=255)
    # chaff cells: a jittered grid of small cells with dark walls
    cell = max(3.0, 8.5 * math.sqrt(h * w / _REF_AREA))
    ext = r * math.sqrt(aspect) + cell
    ys = np.arange(cy - ext, cy + ext, cell)
    xs = np.arange(cx - ext, cx + ext, cell)
    wall = _shade(base, 0.45)
    for j, y in enumerate(ys.tolist()):
        shift = (j % 2) * cell / 2
        for x in xs.tolist():
            poly = _jagged_blob(
                rng, x + shift, y, cell * 0.6, vertices=6, rough=0.2, angle=rng.uniform(0, 1)
            )
            tone = rng.uniform(0.75, 1.25)
            fill = _shade(base, tone, rng.uniform(0, 25) + (45 if rng.random() < 0.2 else 0))
            layer.draw.polygon(poly, fill=fill, outline=wall)
    if rng.random() < 0.5:  # broken open: pale pith in the middle
        pith = _jagged_blob(rng, cx, cy, r * 0.4, aspect=aspect, angle=ang, rough=0.15)
        layer.draw.polygon(pith, fill=(226, 214, 186))


def _mouldy(rng: np.random.Generator, layer: _Layer, area: float, w: int, h: int) -> None:
    a0, b0 = _kernel_size(h, w)
    count = int(np.clip(round(area / (3.4 * a0 * b0)), 1, 5))
    cx, cy = _center(rng, w, h)
    for _ in range(count):
        one = np.ones(1)
        a, b = a0 * rng.uniform(0.95, 1.15) * one, b0 * rng.uniform(0.95, 1.15) * one
        x, y = cx + rng.normal(0, a0 * 0.9) * one, cy + rng.normal(0, a0 * 0.9) * one
        th, k = rng.uniform(0, 2 * np.pi) * one, rng.uniform(0.1, 0.4) * one
        dark = np.array([66.0, 46.0, 30.0]) * rng.uniform(0.55, 1.1)
        outline = _pts(_kernel_outlines(x, y, a, b, th, k)[0])
        layer.draw.polygon(outline, fill=_shade(dark, 1.0), outline=_shade(dark, 0.5))
        layer.mdraw.polygon(outline, fill=255)
        for _ in range(int(rng.integers(3, 8))):  # mould patches: grey-green or black
            mx = float(x[0]) + rng.uniform(-0.6, 0.6) * float(a[0])
            my = float(y[0]) + rng.uniform(-0.5, 0.5) * float(b[0])
            col: Color = (88, 96, 74) if rng.random() < 0.5 else (24, 22, 20)
            spot = _jagged_blob(rng, mx, my, b0 * rng.uniform(0.15, 0.35), vertices=8, rough=0.3)
            layer.draw.polygon(spot, fill=col)
        # mould outside the kernel outline is cut away when the layer is pasted by its mask
        gloss = _pts(_kernel_outlines(x, y, a, b, th, k, scale=0.22, shift=(0.2, -0.2), n=10)[0])
        layer.draw.polygon(gloss, fill=_shade(dark, 1.6, 12))


_HARVEST_ANOMALIES: tuple[Callable[[np.random.Generator, _Layer, float, int, int], None], ...] = (
    _leaf,
    _husk,
    _broken,
    _cob,
    _mouldy,
)


# --------------------------------------------------------------------------- factory


def _box_blur_x(a: np.ndarray, length: int) -> np.ndarray:
    pad = np.concatenate([a[:, -length:], a], axis=1)
    c = np.cumsum(pad, axis=1, dtype=np.float32)
    return (c[:, length:] - c[:, :-length]) / math.sqrt(length)


def _factory_base(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    s = math.sqrt(h * w / _REF_AREA)
    long_ = max(8, int(60 * s))
    short = max(3, int(12 * s))
    fine = _box_blur_x(rng.standard_normal((h, w), dtype=np.float32), long_)
    mid = _box_blur_x(rng.standard_normal((h, w), dtype=np.float32), short)
    rows = rng.standard_normal((h, 1), dtype=np.float32)  # line-to-line brushing strength
    low = rng.standard_normal((3, 4)).astype(np.float32)
    shade = np.asarray(Image.fromarray(low, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    gray = 150.0 * (1.0 + 0.05 * shade) + 5.5 * fine * (1.0 + 0.3 * rows) + 2.5 * mid
    tint = np.array([0.98, 1.0, 1.04], dtype=np.float32)
    arr = gray[:, :, None] * tint[None, None, :]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def _scratch(rng: np.random.Generator, layer: _Layer, area: float, w: int, h: int) -> None:
    s = math.sqrt(h * w / _REF_AREA)
    width = max(2, int(round(rng.uniform(2.0, 4.0) * s)))
    length = float(np.clip(area / width, 0.2 * w, 0.7 * math.hypot(w, h)))
    cx, cy = _center(rng, w, h, 0.2)
    ang = rng.uniform(0.35, np.pi - 0.35)  # across the brushing direction
    t = np.linspace(-0.5, 0.5, 24)
    bend = rng.uniform(-0.08, 0.08) * length
    u, v = t * length, bend * (1 - 4 * t**2) + rng.normal(0, 0.4 * s, t.size)
    c, si = math.cos(ang), math.sin(ang)
    pts = _pts(np.stack([cx + u * c - v * si, cy + u * si + v * c], axis=1))
    col: Color = (236, 238, 242) if rng.random() < 0.5 else (58, 58, 62)
    layer.draw.line(pts, fill=col, width=width, joint="curve")
    layer.mdraw.line(pts, fill=255, width=width, joint="curve")


def _spots(rng: np.random.Generator, layer: _Layer, area: float, w: int, h: int) -> None:
    n = int(rng.integers(1, 4))
    cx, cy = _center(rng, w, h)
    rust = rng.random() < 0.5
    for _ in range(n):
        r = math.sqrt(area / n / np.pi) * rng.uniform(0.8, 1.2)
        x = float(np.clip(cx + rng.normal(0, 2 * r), r, w - r))
        y = float(np.clip(cy + rng.normal(0, 2 * r), r, h - r))
        poly = _jagged_blob(rng, x, y, r, aspect=rng.uniform(1, 1.5), vertices=12, rough=0.15)
        base = np.array([150.0, 82.0, 40.0]) if rust else np.array([52.0, 50.0, 50.0])
        layer.draw.polygon(poly, fill=_shade(base, rng.uniform(0.85, 1.1)))
        layer.mdraw.polygon(poly, fill=255)
        inner = _jagged_blob(rng, x, y, r * 0.5, vertices=10, rough=0.2)
        layer.draw.polygon(inner, fill=_shade(base, 0.7))


def _walk(
    rng: np.random.Generator, x: float, y: float, ang: float, length: float, step: float
) -> Points:
    pts = [(x, y)]
    heading = ang
    for _ in range(max(2, int(length / step))):
        heading = ang + 0.75 * (heading - ang) + rng.normal(0, 0.4)  # jagged, no loops
        x += step * math.cos(heading)
        y += step * math.sin(heading)
        pts.append((x, y))
    return pts


def _crack(rng: np.random.Generator, layer: _Layer, area: float, w: int, h: int) -> None:
    s = math.sqrt(h * w / _REF_AREA)
    step = max(2.0, 7.0 * s)
    length = float(np.clip(area / max(2.0, 3.0 * s) * 0.8, 0.15 * w, 0.6 * w))
    cx, cy = _center(rng, w, h, 0.2)
    ang = rng.uniform(0, 2 * np.pi)
    main = _walk(rng, cx, cy, ang, length, step)
    col: Color = (int(rng.uniform(22, 40)), 24, 27)
    wm = max(2, int(round(3 * s)))
    layer.draw.line(main, fill=col, width=wm, joint="curve")
    layer.mdraw.line(main, fill=255, width=wm, joint="curve")
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(1, len(main) - 1))
        sx, sy = main[i]
        branch = _walk(
            rng, sx, sy, ang + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), length * 0.35, step
        )
        wb = max(1, wm - 1)
        layer.draw.line(branch, fill=col, width=wb)
        layer.mdraw.line(branch, fill=255, width=wb)


def _stain(rng: np.random.Generator, layer: _Layer, area: float, w: int, h: int) -> Image.Image:
    r = math.sqrt(area / np.pi) * 0.9
    cx, cy = _center(rng, w, h)
    poly = _jagged_blob(rng, cx, cy, r, aspect=rng.uniform(1, 2), angle=rng.uniform(0, np.pi))
    palette = [(150, 96, 42), (84, 70, 52), (192, 166, 78), (88, 106, 164)]  # rust, oil, ...
    col = palette[int(rng.integers(len(palette)))]
    layer.draw.rectangle((0, 0, w, h), fill=col)
    core = Image.new("L", (w, h), 0)
    ImageDraw.Draw(core).polygon(poly, fill=int(rng.uniform(190, 235)))
    alpha = core.filter(ImageFilter.GaussianBlur(max(1.0, r * 0.2)))
    a = np.asarray(alpha)
    m = np.where(a >= 48, 255, 0).astype(np.uint8)  # the faint fringe is cut off: exact mask
    layer.mask.paste(Image.fromarray(m, mode="L"))
    return Image.fromarray(np.where(m > 0, a, 0).astype(np.uint8), mode="L")


_FACTORY_ANOMALIES: tuple[Callable[..., Image.Image | None], ...] = (
    _scratch,
    _spots,
    _crack,
    _stain,
)


# --------------------------------------------------------------------------- texture

TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
DEFECTS: tuple[str, ...] = ("local", "dark_smooth", "global")
GLOBAL_CHANGES: tuple[str, ...] = ("rotation", "scale", "contrast")

_TEX_SIZE = 256  # default side of a texture image; source pixels its longest side spans at zoom 1
# Normal ranges and the global defect's ranges never overlap (angles modulo 180 degrees).
_TEX_ANGLE = 4.0  # normal: |angle| <= 4 degrees, then mirrored and/or turned by 180 degrees
_TEX_ANGLE_DEFECT = (10.0, 25.0)  # global "rotation": 10..25 degrees either way
_TEX_ZOOM = (0.9, 1.1)  # normal zoom, log-uniform
_TEX_ZOOM_DEFECT = (1.3, 1.6)  # global "scale": zoom in or out by this factor
_TEX_CONTRAST = (0.85, 1.15)  # normal contrast gain about the texture's mean
_TEX_CONTRAST_DEFECT = (0.55, 0.65)  # global "contrast"


@lru_cache(maxsize=8)
def _texture_source(name: str) -> np.ndarray:
    """The CC0 texture ``name`` that ships inside scikit-image's wheel (nothing is downloaded),
    as a read-only float32 grey image (512 x 512, 0..255)."""
    try:
        from skimage import data as skdata
    except ImportError as e:  # a declared dependency; only a broken install lands here
        raise RuntimeError(
            "kind 'texture' needs scikit-image>=0.24, which ships the CC0 textures"
        ) from e
    arr = np.asarray(getattr(skdata, name)(), dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=2)
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


def _texture_view(
    src: np.ndarray, rng: np.random.Generator, h: int, w: int, zoom: float, angle: float
) -> np.ndarray:
    """An ``h x w`` view of ``src`` at a random position, zoomed by ``zoom`` (times
    ``max(h, w) / 256``, so that the field of view does not depend on the output size) and
    rotated by ``angle`` degrees; never samples outside the source."""
    th = math.radians(angle)
    co, si = math.cos(th), math.sin(th)
    ex = (w * abs(co) + h * abs(si)) / 2 + 2  # half extents of the rotated view, + bicubic margin
    ey = (w * abs(si) + h * abs(co)) / 2 + 2
    sh, sw = src.shape
    z = max(zoom * max(h, w) / _TEX_SIZE, 2 * ex / sw, 2 * ey / sh)
    rw, rh = max(1, round(sw * z)), max(1, round(sh * z))
    img = Image.fromarray(src)
    if (rw, rh) != (sw, sh):
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)  # antialiased when shrinking
    cx = float(rng.uniform(ex, max(ex, rw - ex)))
    cy = float(rng.uniform(ey, max(ey, rh - ey)))
    coeffs = (co, -si, cx - co * w / 2 + si * h / 2, si, co, cy - si * w / 2 - co * h / 2)
    out = img.transform((w, h), Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC)
    return np.array(out, dtype=np.float32)


def _box_mean(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window, reflecting at the borders (float64)."""
    k = 2 * r + 1
    p = np.pad(a.astype(np.float64), r, mode="reflect")
    c = np.cumsum(p, axis=0)
    c = np.concatenate([np.zeros((1, c.shape[1])), c], axis=0)
    p = (c[k:] - c[:-k]) / k
    c = np.cumsum(p, axis=1)
    c = np.concatenate([np.zeros((c.shape[0], 1)), c], axis=1)
    return (c[:, k:] - c[:, :-k]) / k


def _local_defect(rng: np.random.Generator, v: np.ndarray) -> np.ndarray:
    """One to three small spots or scratches (5..15 px at 256 px), all brighter or all
    darker than their surroundings; drawn into ``v`` in place; returns the mask."""
    h, w = v.shape
    s = max(h, w) / _TEX_SIZE
    m = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(m)
    cx, cy = _center(rng, w, h, 0.12)
    for _ in range(int(rng.integers(1, 4))):
        x = float(np.clip(cx + rng.normal(0, 10 * s), 0.08 * w, 0.92 * w))
        y = float(np.clip(cy + rng.normal(0, 10 * s), 0.08 * h, 0.92 * h))
        size = float(rng.uniform(5, 15)) * s
        ang = float(rng.uniform(0, np.pi))
        if rng.random() < 0.5:  # a spot
            draw.polygon(
                _jagged_blob(
                    rng, x, y, size / 2, aspect=rng.uniform(1, 1.6), angle=ang, vertices=10
                ),
                fill=255,
            )
        else:  # a short, slightly bent scratch
            dx, dy = math.cos(ang) * size / 2, math.sin(ang) * size / 2
            bend = float(rng.uniform(-0.15, 0.15)) * size
            pts = [(x - dx, y - dy), (x - dy * bend / size, y + dx * bend / size), (x + dx, y + dy)]
            width = max(1, round(float(rng.uniform(1.5, 3.0)) * s))
            draw.line(pts, fill=255, width=width, joint="curve")
    mask = np.asarray(m) > 0
    if not mask.any():  # only at tiny sizes
        mask[int(cy), int(cx)] = True
    ys, xs = np.nonzero(mask)
    pad = int(round(12 * s)) + 2
    y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + pad + 1)
    around = v[y0:y1, x0:x1][~mask[y0:y1, x0:x1]]
    mu = float(around.mean()) if around.size else float(v.mean())
    delta = float(rng.uniform(50, 80))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if not 20 <= mu + sign * delta <= 235:  # no room on that side: the other polarity
        sign = -sign
    v[mask] = mu + sign * delta + 0.25 * (v[mask] - mu)
    return mask


def _dark_smooth_defect(rng: np.random.Generator, v: np.ndarray) -> np.ndarray:
    """A blob (20..50 px across at 256 px) whose texture is replaced by its strongly
    smoothed local mean and darkened; drawn into ``v`` in place; returns the mask."""
    h, w = v.shape
    s = max(h, w) / _TEX_SIZE
    r = float(rng.uniform(10, 25)) * s
    aspect = float(rng.uniform(1, 1.5))
    reach = r * math.sqrt(aspect) * 1.15
    cx = float(rng.uniform(min(reach, w / 2), max(w / 2, w - reach)))
    cy = float(rng.uniform(min(reach, h / 2), max(h / 2, h - reach)))
    poly = _jagged_blob(
        rng, cx, cy, r, aspect=aspect, angle=rng.uniform(0, np.pi), vertices=16, rough=0.12
    )
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).polygon(poly, fill=255)
    mask = np.asarray(m) > 0
    if not mask.any():
        mask[int(cy), int(cx)] = True
    k = max(2, int(round(r * 0.6)))
    smooth = _box_mean(_box_mean(v, k), k)  # ~ a Gaussian of sigma 0.7 r: the local mean
    v[mask] = (smooth[mask] * float(rng.uniform(0.55, 0.75))).astype(np.float32)
    return mask


def render_texture(
    rng: np.random.Generator,
    *,
    texture: str,
    defect: str | None = None,
    height: int = _TEX_SIZE,
    width: int = _TEX_SIZE,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Render one texture image (grey, stored as RGB with R = G = B).

    A random view of scikit-image's CC0 ``texture`` (one of :data:`TEXTURES`): random
    position, zoom 0.9..1.1, angle within +-4 degrees, random mirror and 180 degree turn,
    contrast 0.85..1.15, brightness +-12, a linear light gradient up to +-8 % and sensor noise
    (sigma 1.5..3). ``defect`` (one of :data:`DEFECTS`, or ``None`` for a normal image):

    * ``local``: one to three spots or scratches of 5..15 px, 50..80 grey levels brighter or
      darker than around them;
    * ``dark_smooth``: a 20..50 px blob whose texture is replaced by its local mean and
      darkened to 55..75 % -- simpler than the texture, so it may fool a likelihood model;
    * ``global``: the whole view is off the normal ranges in one way: rotated by 10..25
      degrees, zoomed in or out by 1.3..1.6, or contrast 0.55..0.65; no mask.

    Pixel sizes are for 256 x 256 and scale with ``max(height, width) / 256``. Returns
    ``(rgb, mask)``: an ``H x W x 3`` uint8 image and the ``H x W`` bool mask of a ``local`` or
    ``dark_smooth`` defect (never empty), else ``None``.
    """
    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; valid textures are: {', '.join(TEXTURES)}")
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; valid defects are: {', '.join(DEFECTS)}")
    h, w = _check_size(height, width)
    src = _texture_source(texture)
    zoom = float(np.exp(rng.uniform(math.log(_TEX_ZOOM[0]), math.log(_TEX_ZOOM[1]))))
    angle = float(rng.uniform(-_TEX_ANGLE, _TEX_ANGLE))
    contrast = float(rng.uniform(*_TEX_CONTRAST))
    if defect == "global":
        change = GLOBAL_CHANGES[int(rng.integers(len(GLOBAL_CHANGES)))]
        sign = 1.0 if rng.random() < 0.5 else -1.0
        if change == "rotation":
            angle = sign * float(rng.uniform(*_TEX_ANGLE_DEFECT))
        elif change == "scale":
            zoom = float(rng.uniform(*_TEX_ZOOM_DEFECT)) ** sign
        else:
            contrast = float(rng.uniform(*_TEX_CONTRAST_DEFECT))
    v = _texture_view(src, rng, h, w, zoom, angle)
    if rng.random() < 0.5:
        v = v[:, ::-1]
    if rng.random() < 0.5:
        v = v[::-1, ::-1]
    v = np.ascontiguousarray(v)
    mask: np.ndarray | None = None
    if defect == "local":
        mask = _local_defect(rng, v)
    elif defect == "dark_smooth":
        mask = _dark_smooth_defect(rng, v)
    # re-lighting: contrast about the texture's mean, brightness, a linear gradient; noise
    mean = float(src.mean())
    bright = float(rng.uniform(-12, 12))
    grad, gang = float(rng.uniform(0, 0.08)), float(rng.uniform(0, 2 * np.pi))
    y = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    field = 1.0 + grad * (x * math.cos(gang) + y * math.sin(gang))
    out = (mean + contrast * (v - mean) + bright) * field
    out += rng.standard_normal((h, w), dtype=np.float32) * float(rng.uniform(1.5, 3.0))
    grey = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), mask


# --------------------------------------------------------------------------- rendering


def render_image(
    kind: str,
    rng: np.random.Generator,
    *,
    camera: int,
    anomalous: bool,
    height: int | None = None,
    width: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Render one synthetic frame (default size: 460 x 640, texture 256 x 256).

    Returns ``(rgb, mask)``: an ``H x W x 3`` uint8 image and, for an anomalous frame, an
    ``H x W`` bool mask of the anomalous pixels (never empty); ``None`` for a normal frame.
    The result depends only on ``rng``'s state and the arguments.

    For ``texture``, ``camera`` picks the texture (``TEXTURES[(camera - 1) % 3]``) and an
    anomalous frame gets a defect drawn from :data:`DEFECTS`; a ``global`` defect has no
    mask (``None``). Use :func:`render_texture` to choose the texture and defect.
    """
    _check_kind(kind)
    camera = _check_int("camera", camera, 1)
    h, w = _check_size(*_default_size(kind, height, width))
    if kind == "texture":
        texture = TEXTURES[(camera - 1) % len(TEXTURES)]
        defect = DEFECTS[int(rng.integers(len(DEFECTS)))] if anomalous else None
        return render_texture(rng, texture=texture, defect=defect, height=h, width=w)
    if kind == "harvest":
        canvas = _harvest_base(rng, h, w, camera)
        makers: Sequence[Callable[..., Image.Image | None]] = _HARVEST_ANOMALIES
        blur, noise = 0.7 * math.sqrt(h * w / _REF_AREA) + 0.2, 2.5
    else:
        canvas = _factory_base(rng, h, w)
        makers = _FACTORY_ANOMALIES
        blur, noise = 0.5, 2.0
    truth: Image.Image | None = None
    if anomalous:
        truth = Image.new("L", (w, h), 0)
        count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        for _ in range(count):
            maker = makers[int(rng.integers(len(makers)))]
            area = float(np.exp(rng.uniform(math.log(0.003), math.log(0.012)))) * h * w
            layer = _Layer(w, h)
            alpha = maker(rng, layer, area, w, h)
            layer.apply(canvas, truth, alpha)
    rgb = _finish(canvas, rng, camera, blur, noise)
    if truth is None:
        return rgb, None
    mask = np.asarray(truth) > 0
    if not mask.any():  # cannot happen with centres inside the frame; keep the promise anyway
        raise RuntimeError("rendered an anomalous image with an empty mask")
    return rgb, mask


# --------------------------------------------------------------------------- archive


def _capture_times(seed: int, group: int, year: int, count: int) -> list[datetime]:
    """Strictly increasing daytime capture times spread over the season of ``year``."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, group)))
    total = _SEASON_DAYS * _DAY_SECONDS
    slot = total / count
    offs = np.floor((np.arange(count) + rng.uniform(0.15, 0.85, count)) * slot).astype(np.int64)
    steps = np.arange(count)
    offs = np.maximum.accumulate(offs - steps) + steps  # strictly increasing whole seconds
    start = datetime(year, 8, 1, _DAY_START_H)
    out = []
    for o in offs.tolist():
        day, sec = divmod(int(o), _DAY_SECONDS)
        out.append(start + timedelta(days=day, seconds=sec))
    return out


def _jpeg_bytes(rgb: np.ndarray, when: datetime) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_TAG_DATETIME_ORIGINAL] = when.strftime("%Y:%m:%d %H:%M:%S")
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(
        buf,
        format="JPEG",
        quality=_JPEG_QUALITY,
        subsampling=2,  # 4:2:0
        optimize=False,
        progressive=False,
        exif=exif.tobytes(),
    )
    return buf.getvalue()


def _png_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(
        buf, format="PNG", optimize=False, compress_level=6
    )
    return buf.getvalue()


def write_archive(
    out: str | Path,
    *,
    kind: str,
    images: int,
    seed: int,
    anomaly_rate: float = 0.1,
    years: Sequence[int] = (2017, 2018, 2019),
    cameras: int = 2,
    height: int | None = None,
    width: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SynthSummary:
    """Write a synthetic archive with ground truth under ``out`` (a new or empty directory).

    Images are 460 x 640 (``texture``: 256 x 256) unless ``height``/``width`` say otherwise.
    ``kind="texture"`` ignores ``cameras``: its groups are (texture, year).
    ``progress(done, total)`` is called after each image. Raises ``ValueError`` for bad
    arguments and ``FileExistsError`` when ``out`` exists and is not an empty directory.
    """
    _check_kind(kind)
    n = _check_int("images", images, 1)
    seed = _check_int("seed", seed, 0)
    cams = _check_int("cameras", cameras, 1, 999)
    h, w = _check_size(*_default_size(kind, height, width))
    if isinstance(anomaly_rate, bool) or not isinstance(anomaly_rate, int | float | np.floating):
        raise ValueError(f"anomaly_rate must be a number in [0, 1], got {anomaly_rate!r}")
    rate = float(anomaly_rate)
    if not 0.0 <= rate <= 1.0:  # also rejects NaN
        raise ValueError(f"anomaly_rate must be in [0, 1], got {anomaly_rate!r}")
    if isinstance(years, str | bytes) or len(years) == 0:
        raise ValueError("years must be a non-empty sequence of integers, e.g. (2017, 2018)")
    yrs = [_check_int("each year", y, 1900, 9999) for y in years]
    if len(set(yrs)) != len(yrs):
        raise ValueError(f"years must not repeat, got {list(years)}")
    if progress is not None and not callable(progress):
        raise ValueError("progress must be a callable progress(done, total) or None")

    root = Path(out)
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a directory; pick an empty directory")
        if any(root.iterdir()):
            raise FileExistsError(
                f"{root} is not empty; pick a new or empty directory for the synthetic archive"
            )

    texture = kind == "texture"
    # (year, camera), years outer; texture: (year, index into TEXTURES), textures outer
    if texture:
        groups = [(y, t) for t in range(len(TEXTURES)) for y in yrs]
    else:
        groups = [(y, c) for y in yrs for c in range(1, cams + 1)]
    n_anom = int(round(n * rate))
    pick = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    chosen = pick.permutation(n)[:n_anom]
    anomalous = np.zeros(n, dtype=bool)
    anomalous[chosen] = True
    # texture: the k-th chosen image gets DEFECTS[k % 3], so the types are balanced
    defect_of = {int(i): DEFECTS[k % len(DEFECTS)] for k, i in enumerate(chosen.tolist())}

    times: dict[int, list[datetime]] = {}
    for g, (year, _cam) in enumerate(groups):
        count = len(range(g, n, len(groups)))
        if count:
            times[g] = _capture_times(seed, g, year, count)

    root.mkdir(parents=True, exist_ok=True)
    labels: list[tuple[str, int]] = []
    defects: dict[str, str] = {}
    for i in range(n):
        g = i % len(groups)
        year, cam = groups[g]
        when = times[g][i // len(groups)]
        stamp = when.strftime("%Y%m%dT%H%M%S")
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, i)))
        if texture:
            rel = f"texture={TEXTURES[cam]}/year={year}/img_{stamp}.jpg"
            defect = defect_of.get(i)
            rgb, mask = render_texture(rng, texture=TEXTURES[cam], defect=defect, height=h, width=w)
            if defect is not None:
                defects[rel] = defect
        else:
            rel = f"year={year}/camera={cam}/img_{stamp}.jpg"
            rgb, mask = render_image(
                kind, rng, camera=cam, anomalous=bool(anomalous[i]), height=h, width=w
            )
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(_jpeg_bytes(rgb, when))
        if mask is not None:
            mpath = root / "_truth" / "masks" / (rel[: -len(".jpg")] + ".png")
            mpath.parent.mkdir(parents=True, exist_ok=True)
            mpath.write_bytes(_png_bytes(mask))
        labels.append((rel, int(bool(anomalous[i]))))
        if progress is not None:
            progress(i + 1, n)

    labels.sort()
    truth = root / "_truth"
    truth.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows(labels)
    (truth / "labels.csv").write_text(buf.getvalue(), encoding="utf-8")
    if texture:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "defect"])
        writer.writerows(sorted(defects.items()))
        (truth / "defects.csv").write_text(buf.getvalue(), encoding="utf-8")
    return SynthSummary(
        root=root, images=n, anomalous=n_anom, paths=[p for p, _ in labels], defects=defects
    )
