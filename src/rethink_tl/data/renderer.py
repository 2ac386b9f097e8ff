"""Embedded synthetic chest-X-ray-like data set (``data=synthetic``).

Each image is a frontal "chest film": a soft-tissue body with a bright spine and
mediastinum, a heart shadow, two dark lung fields crossed by faint ribs and
branching vessels, film grain and per-image exposure changes. Two low-level
findings can be painted into the lungs:

* ``opacity``: a patch of fine granular (band-passed) texture with a slight haze,
  i.e. ground glass;
* ``nodule``: one to three small, soft, round denser spots.

Negatives carry look-alikes (end-on vessel dots, symmetric nipple shadows, smooth
soft-tissue haze, diffuse mild texture) so that neither finding is a single bright
or textured spot to threshold. Every image is finally rescaled to a mean and
standard deviation drawn independently of its labels, which makes global intensity
statistics useless as a shortcut: the labels have to be found in local texture.

Reproducibility: image ``i`` is drawn from generators seeded with
``(seed, i, stream)`` only, so it does not depend on ``n`` or on which other images
are generated. Label draws and finding shapes use one stream per label name, which
means that changing ``prevalence`` flips labels (and adds or removes that finding)
without changing the anatomy of any image.

All geometry lives in normalised coordinates (``x``, ``y`` in [-1, 1], ``y`` pointing
down) and per-pixel noise has its own streams, so one seed renders the same scene
at 32 px and at 256 px; only grain, texture detail and details too fine for the
coarser grid (ribs below ~4 px apart) differ.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from numbers import Integral, Real
from typing import Sequence

import numpy as np

from rethink_tl.errors import UserError

__all__ = ["LABELS", "MIN_SIZE", "MAX_SIZE", "finding_masks", "generate_labels", "generate_split"]

LABELS: tuple[str, ...] = ("opacity", "nodule")
MIN_SIZE = 32
MAX_SIZE = 256

# Stream ids for np.random.default_rng([seed, i, stream, ...]). Per-pixel noise
# comes from streams of its own: the number of normals drawn grows with the image
# size, and keeping them apart from the scalar shape parameters makes one seed
# give the same scene (anatomy, exposure, finding positions) at every size.
_ANATOMY_STREAM = 0
_LABEL_STREAM = 1
_NOISE_STREAM = 2

# Texture band of the ground-glass finding, in cycles per image width; fixed in
# image-relative units so the finding looks the same at every resolution. 12
# cycles still sits below Nyquist at 32 px (16 cycles).
_TEXTURE_CYCLES = 12.0
_TEXTURE_BANDWIDTH = 3.5

# Target grey-level statistics, shared by every image regardless of its labels.
_TARGET_MEAN = (100.0, 140.0)
_TARGET_STD = (38.0, 55.0)

_N_VESSELS = 7  # per hilum


@dataclass(frozen=True)
class _Grid:
    x: np.ndarray  # (s, s) normalised column coordinate
    y: np.ndarray  # (s, s) normalised row coordinate
    band: np.ndarray  # (s, s) band-pass filter for the fine texture, in fft2 layout
    px: float  # normalised units per pixel


# float32 throughout: it halves the cost of the transcendental functions, and the
# result is quantised to 8 bits anyway. Scalars that meet these arrays must be
# Python floats (not np.float64), or NumPy would promote the result to float64.
_F = np.float32
_Rng = np.random.Generator


@lru_cache(maxsize=8)
def _grid(size: int) -> _Grid:
    c = ((np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0).astype(_F)
    y, x = np.meshgrid(c, c, indexing="ij")
    f = np.fft.fftfreq(size) * size  # cycles per image
    fr = np.hypot(f[:, None], f[None, :])
    band = np.exp(-0.5 * ((fr - _TEXTURE_CYCLES) / _TEXTURE_BANDWIDTH) ** 2)
    # White noise of unit variance filtered by `band` has variance mean(band**2);
    # dividing by its root keeps texture amplitudes comparable across sizes.
    band = band / np.sqrt(np.mean(band**2))
    for a in (x, y, band):
        a.setflags(write=False)
    return _Grid(x=x, y=y, band=band, px=2.0 / size)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def _label_key(name: str) -> int:
    # crc32 rather than hash(): Python salts str hashes per process.
    return zlib.crc32(name.encode("utf-8"))


def _soft_ellipse(g: _Grid, cx: float, cy: float, ax: float, ay: float, edge: float) -> np.ndarray:
    r = np.sqrt(((g.x - cx) * (1.0 / ax)) ** 2 + ((g.y - cy) * (1.0 / ay)) ** 2)
    return _sigmoid((1.0 - r) * (1.0 / edge))


def _soft_disk(g: _Grid, cx: float, cy: float, radius: float) -> np.ndarray:
    d = np.sqrt((g.x - cx) ** 2 + (g.y - cy) ** 2)
    # The edge never gets sharper than about a pixel, otherwise small spots alias.
    edge = max(0.3 * radius, 0.5 * g.px)
    return _sigmoid((radius - d) * (1.0 / edge))


def _band_noise(rng: _Rng, g: _Grid) -> np.ndarray:
    w = rng.standard_normal(g.x.shape)
    return np.fft.ifft2(np.fft.fft2(w) * g.band).real.astype(_F)


@dataclass(frozen=True)
class _Lungs:
    cx: tuple[float, float]
    cy: tuple[float, float]
    ax: tuple[float, float]
    ay: tuple[float, float]
    mask: np.ndarray  # (s, s) in [0, 1], 1 inside either lung

    def point(self, rng: _Rng, inner: float = 0.75) -> tuple[float, float]:
        """A random point well inside a random lung (uniform over the ellipse area)."""
        side = int(rng.integers(2))
        rho = inner * math.sqrt(rng.random())
        theta = rng.uniform(0.0, 2.0 * math.pi)
        return (
            self.cx[side] + rho * self.ax[side] * math.cos(theta),
            self.cy[side] + rho * self.ay[side] * math.sin(theta),
        )


def _render_anatomy(rng: _Rng, noise: _Rng, g: _Grid) -> tuple[np.ndarray, _Lungs]:
    """Label-independent scene in density units (roughly 0 = air, 1 = bone)."""
    # Longer than 80 lines on purpose: a linear recipe, one structure after the other (body, spine, ribs,
    # lungs, heart, diaphragm), each drawing from the same generators in a fixed order. Split into pieces, the
    # order of the draws (which fixes every generated image) would hide across functions.
    x, y = g.x, g.y
    ax_ = np.abs(x)
    u = rng.uniform

    # Body: fills the film except the corners above the shoulders and the sides of the neck.
    half_w = u(0.90, 1.02)
    shoulder_y = u(-0.80, -0.68)
    neck = (half_w - u(0.40, 0.50)) * _sigmoid((shoulder_y - y - 0.25 * (ax_ - 0.3)) * 20.0)
    body = _sigmoid((half_w - neck - ax_) * (1.0 / u(0.03, 0.06)))
    img = u(0.03, 0.10) + u(0.50, 0.60) * body

    # Spine and mediastinum: a bright vertical band, vertebrae as a weak ripple.
    sx = u(-0.03, 0.03)
    dxs = np.abs(x - sx)
    spine = _sigmoid((u(0.06, 0.09) - dxs) * 30.0)
    vert = 1.0 + 0.15 * np.cos(y * (2.0 * math.pi / u(0.09, 0.13)) + u(0.0, 2.0 * math.pi))
    mediast = _sigmoid((u(0.13, 0.18) - dxs) * 20.0)
    img += body * (u(0.06, 0.10) * mediast + u(0.08, 0.14) * spine * vert)

    # Lungs: ellipses that widen towards the diaphragm.
    scale = u(0.92, 1.08)
    cy0 = u(-0.02, 0.10)
    cxs, cys, axs, ays = [], [], [], []
    lung = np.zeros_like(x)
    for side in (0, 1):
        sign = -1.0 if side == 0 else 1.0
        ax = u(0.26, 0.31) * scale
        ay = u(0.60, 0.70) * scale
        cx = sign * (u(0.10, 0.14) + ax)
        cy = cy0 + u(-0.03, 0.03)
        ax_y = ax * np.maximum(1.0 + u(0.15, 0.35) * (y - cy) * (1.0 / ay), 0.3)
        r = np.sqrt(((x - cx) / ax_y) ** 2 + ((y - cy) * (1.0 / ay)) ** 2)
        np.maximum(lung, _sigmoid((1.0 - r) * (1.0 / u(0.05, 0.09))), out=lung)
        cxs.append(cx)
        cys.append(cy)
        axs.append(ax)
        ays.append(ay)
    # The heart sits low and to the patient's left (image right) and hides lung there.
    heart = _soft_ellipse(g, sx + u(0.06, 0.12), cy0 + u(0.40, 0.50), u(0.21, 0.27), u(0.17, 0.22), 0.10)
    lung *= (1.0 - 0.95 * heart) * (1.0 - 0.9 * mediast)
    # Hila sit on the medial side of each lung, a little above its centre.
    hila = [(cxs[s] + (0.55 if s == 0 else -0.55) * axs[s], cys[s] + u(-0.12, 0.02)) for s in (0, 1)]
    hilar = sum(np.exp(((x - hx) ** 2 + (y - hy) ** 2) * (-1.0 / 0.04)) for hx, hy in hila)
    depth = u(0.34, 0.44)
    img -= depth * lung * (1.0 - 0.3 * np.minimum(hilar, 1.0))
    img += u(0.02, 0.06) * heart

    # Ribs: bands that rise from the spine and curve down laterally, seen mainly
    # through the lungs. Below ~4 px per rib period they would only alias into a
    # moire, so they fade out at small sizes.
    spacing = u(0.16, 0.22)
    t = (y - u(0.4, 0.7) * ax_ + u(0.8, 1.1) * ax_**2) * (1.0 / spacing) + u(0.0, 1.0)
    ribs = ((1.0 + np.cos(t * (2.0 * math.pi))) * 0.5) ** 3
    rib_amp = u(0.05, 0.09) * min(max((spacing / g.px - 2.5) / 2.5, 0.0), 1.0)
    clav = _sigmoid((0.03 - np.abs(y - u(-0.70, -0.60) + 0.2 * ax_)) * 60.0) * (ax_ > 0.12)
    img += body * (rib_amp * ribs * (0.2 + 0.8 * lung) + u(0.04, 0.08) * clav)

    # Vessels: tapering bright lines fanning out of both hila, drawn in one go.
    k = _N_VESSELS
    hx = np.repeat([h[0] for h in hila], k).astype(_F)[:, None, None]
    hy = np.repeat([h[1] for h in hila], k).astype(_F)[:, None, None]
    ang = (np.repeat([math.pi, 0.0], k) + rng.uniform(-1.3, 1.3, 2 * k)).astype(_F)[:, None, None]
    length = rng.uniform(0.20, 0.45, 2 * k).astype(_F)[:, None, None]
    width = np.maximum(rng.uniform(0.010, 0.018, 2 * k), 0.6 * g.px).astype(_F)[:, None, None]
    amp = rng.uniform(0.02, 0.07, 2 * k).astype(_F)[:, None, None]
    dx, dy = x - hx, y - hy
    ca, sa = np.cos(ang), np.sin(ang)
    along = dx * ca + dy * sa
    across = dy * ca - dx * sa
    fade = np.clip(1.0 - along / length, 0.0, 1.0) * (along > 0)
    img += lung * (amp * fade * np.exp(-0.5 * (across / width) ** 2)).sum(axis=0)

    lungs = _Lungs(tuple(cxs), tuple(cys), tuple(axs), tuple(ays), lung)

    # Look-alikes, present irrespective of labels.
    for _ in range(int(rng.integers(0, 4))):  # vessels seen end-on: small dense dots near the hila
        hx_, hy_ = hila[int(rng.integers(2))]
        spot = _soft_disk(g, hx_ + u(-0.2, 0.2), hy_ + u(-0.25, 0.25), u(0.02, 0.035))
        img += lung * u(0.06, 0.14) * spot
    if rng.random() < 0.2:  # nipple shadows: symmetric, faint, lower lateral lung
        ny, nx, nr, na = u(0.25, 0.45), u(0.50, 0.62), u(0.04, 0.07), u(0.04, 0.08)
        img += na * (_soft_disk(g, -nx, ny, nr) + _soft_disk(g, nx, ny, nr))
    if rng.random() < 0.35:  # smooth soft-tissue haze (breast, overlying fat), no fine texture
        px_, py_ = lungs.point(rng)
        haze = _soft_ellipse(g, px_, py_, u(0.12, 0.25), u(0.12, 0.25), 0.35)
        img += u(0.03, 0.08) * haze * lung
    # Fine texture of varying strength over the whole lung field: the texture band
    # alone must not give an opacity away, its localised excess has to.
    img += u(0.0, 0.025) * _band_noise(noise, g) * lung

    # Exposure: a low-frequency gradient (heel effect, patient thickness).
    img += u(-0.08, 0.08) * x + u(-0.08, 0.08) * y
    return img, lungs


def _paint_opacity(rng: _Rng, noise: _Rng, g: _Grid, lungs: _Lungs, where: list | None = None) -> np.ndarray:
    """The finding's density increment; ``where`` (a list) collects each patch's soft outline (0.5 on its
    edge), for ``finding_masks``. Collecting draws nothing and changes no value."""
    out = np.zeros_like(g.x)
    n_patches = 1 + int(rng.random() < 0.3)
    for _ in range(n_patches):
        cx, cy = lungs.point(rng)
        rx, ry = rng.uniform(0.10, 0.22), rng.uniform(0.10, 0.22)
        # An irregular edge: the radius wobbles with angle, so patches are not discs.
        theta = np.arctan2(g.y - cy, g.x - cx)
        k = rng.uniform(0.0, 2.0 * math.pi, 3)
        wobble = 1.0 + 0.09 * sum(np.sin(m * theta + k[j]) for j, m in enumerate((2.0, 3.0, 5.0)))
        r = np.sqrt(((g.x - cx) * (1.0 / rx)) ** 2 + ((g.y - cy) * (1.0 / ry)) ** 2) / wobble
        patch = _sigmoid((1.0 - r) * 4.0)
        if where is not None:
            where.append(patch)
        tex = _band_noise(noise, g)
        # Ground glass is granular and, on average, slightly denser than lung.
        haze, grain = rng.uniform(0.02, 0.05), rng.uniform(0.045, 0.08)
        out += patch * (haze + grain * (tex + 0.5 * np.abs(tex)))
    return out * lungs.mask


def _paint_nodule(rng: _Rng, noise: _Rng, g: _Grid, lungs: _Lungs, where: list | None = None) -> np.ndarray:
    out = np.zeros_like(g.x)
    count = 1 + int(rng.choice(3, p=(0.6, 0.3, 0.1)))
    for _ in range(count):
        cx, cy = lungs.point(rng, inner=0.8)
        amp = rng.uniform(0.16, 0.26)
        disk = _soft_disk(g, cx, cy, rng.uniform(0.065, 0.11))
        if where is not None:
            where.append(disk)
        out += amp * disk
    return out * lungs.mask


# One signature for all painters: (shape stream, per-pixel noise stream, grid, lungs).
_PAINTERS = {"opacity": _paint_opacity, "nodule": _paint_nodule}


def _finish(img: np.ndarray, rng: _Rng, noise: _Rng) -> np.ndarray:
    """Film response, grain and label-blind grey-level statistics, to uint8."""
    gamma, grain = rng.uniform(0.75, 1.35), rng.uniform(0.012, 0.035)
    target_mean = rng.uniform(*_TARGET_MEAN)
    target_std = rng.uniform(*_TARGET_STD)
    img = np.clip(img, 0.0, 1.0) ** gamma
    img += grain * noise.standard_normal(img.shape, dtype=_F)
    # Label-blind grey-level statistics: the finding changes the pre-normalised
    # mean and spread slightly, and this step erases that.
    img = (img - img.mean()) / max(float(img.std()), 1e-6) * target_std + target_mean
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _check_args(n, size, seed, prevalence, labels) -> tuple[tuple[str, ...], np.ndarray]:
    if not isinstance(n, Integral) or isinstance(n, bool) or n < 0:
        raise UserError(f"synthetic data: n must be a non-negative integer, got {n!r}")
    if not isinstance(size, Integral) or isinstance(size, bool) or not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"synthetic data: size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    if not isinstance(seed, Integral) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"synthetic data: seed must be a non-negative integer, got {seed!r}")
    if isinstance(labels, str):
        raise UserError(f"synthetic data: labels must be a sequence of names, got the string {labels!r}")
    labels = tuple(labels)
    if not labels:
        raise UserError("synthetic data: at least one label is needed")
    unknown = [name for name in labels if name not in _PAINTERS]
    if unknown:
        raise UserError(f"synthetic data: unknown label(s) {unknown}; available: {list(LABELS)}")
    if len(set(labels)) != len(labels):
        raise UserError(f"synthetic data: duplicate labels in {list(labels)}")
    if isinstance(prevalence, Real):
        prev = np.full(len(labels), float(prevalence))
    else:
        prev = np.asarray(list(prevalence), dtype=np.float64)
        if prev.shape != (len(labels),):
            raise UserError(
                f"synthetic data: prevalence needs one value per label "
                f"({len(labels)}: {list(labels)}), got {list(prev)}"
            )
    if not np.all(np.isfinite(prev)) or np.any(prev < 0.0) or np.any(prev > 1.0):
        raise UserError(f"synthetic data: prevalence must lie in [0, 1], got {list(prev)}")
    return labels, prev


def _draw_label(seed: int, i: int, key: int, prevalence: float) -> tuple[bool, np.random.Generator]:
    """Whether label ``key`` of image ``i`` is positive, and its stream for painting the finding.

    The label draw comes first in its stream, so the finding's shape for image i is the same whatever
    the prevalence.
    """
    lrng = np.random.default_rng([seed, i, _LABEL_STREAM, key])
    return bool(lrng.random() < prevalence), lrng


def generate_labels(
    n: int,
    seed: int,
    prevalence: float | Sequence[float],
    labels: Sequence[str] = LABELS,
) -> np.ndarray:
    """The labels ``generate_split(n, size, seed, prevalence, labels)`` gives, at any size, without
    rendering an image: float32 ``(n, len(labels))`` of 0/1."""
    labels, prev = _check_args(n, MIN_SIZE, seed, prevalence, labels)
    y = np.zeros((n, len(labels)), dtype=np.float32)
    for j, name in enumerate(labels):
        key = _label_key(name)
        y[:, j] = [_draw_label(seed, i, key, prev[j])[0] for i in range(n)]
    return y


def generate_split(
    n: int,
    size: int,
    seed: int,
    prevalence: float | Sequence[float],
    labels: Sequence[str] = LABELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` synthetic chest films and their labels.

    Args:
        n: number of images.
        size: side length in pixels, ``MIN_SIZE``..``MAX_SIZE``.
        seed: non-negative integer; use a different seed per split.
        prevalence: probability that each label is positive, one value for all
            labels or one per label (in the order of ``labels``). Labels are drawn
            independently per image, so the realised rate is binomial around it.
        labels: which findings to generate, a subset of ``LABELS``; findings not
            listed never appear.

    Returns:
        ``images``: uint8 array ``(n, size, size)``; ``labels``: float32 array
        ``(n, len(labels))`` of 0/1, columns in the order of ``labels``.
    """
    labels, prev = _check_args(n, size, seed, prevalence, labels)
    g = _grid(int(size))
    images = np.empty((n, size, size), dtype=np.uint8)
    y = np.zeros((n, len(labels)), dtype=np.float32)
    # Findings are painted in the fixed order of LABELS whatever the column order,
    # so that reordering `labels` only permutes columns (float sums do not commute
    # bit for bit, and one ulp can flip a rounded grey level).
    order = [(labels.index(name), name, _label_key(name)) for name in LABELS if name in labels]
    for i in range(n):
        rng = np.random.default_rng([seed, i, _ANATOMY_STREAM])
        noise = np.random.default_rng([seed, i, _NOISE_STREAM])
        img, lungs = _render_anatomy(rng, noise, g)
        for j, name, key in order:
            positive, lrng = _draw_label(seed, i, key, prev[j])
            if positive:
                y[i, j] = 1.0
                lnoise = np.random.default_rng([seed, i, _LABEL_STREAM, key, _NOISE_STREAM])
                img = img + _PAINTERS[name](lrng, lnoise, g, lungs)
        images[i] = _finish(img, rng, noise)
    return images, y


def finding_masks(
    indices: Sequence[int],
    size: int,
    seed: int,
    prevalence: float | Sequence[float],
    labels: Sequence[str] = LABELS,
) -> np.ndarray:
    """Where ``generate_split(n, size, seed, prevalence, labels)`` painted each finding into images ``indices``:
    bool ``(len(indices), len(labels), size, size)``, True inside a patch or nodule outline (the 0.5 level of
    its soft edge) and inside the lungs (the painter multiplies by the lung mask); all False where the label
    is negative. The same seeded streams as ``generate_split``, so ``explain`` can check whether a saliency
    map lights up the finding."""
    labels, prev = _check_args(max(list(indices), default=-1) + 1, size, seed, prevalence, labels)
    g = _grid(int(size))
    out = np.zeros((len(indices), len(labels), size, size), dtype=bool)
    for row, i in enumerate(indices):
        i = int(i)
        # The lungs come from the anatomy stream, drawn in the order generate_split draws them.
        _, lungs = _render_anatomy(np.random.default_rng([seed, i, _ANATOMY_STREAM]),
                                   np.random.default_rng([seed, i, _NOISE_STREAM]), g)
        for j, name in enumerate(labels):
            key = _label_key(name)
            positive, lrng = _draw_label(seed, i, key, prev[j])
            if not positive:
                continue
            where: list[np.ndarray] = []
            lnoise = np.random.default_rng([seed, i, _LABEL_STREAM, key, _NOISE_STREAM])
            _PAINTERS[name](lrng, lnoise, g, lungs, where)
            out[row, j] = (np.max(where, axis=0) >= 0.5) & (lungs.mask >= 0.5)
    return out
