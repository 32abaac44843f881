"""A deterministic synthetic lumbar spine MRI phantom with exact labels.

The phantom serves as napari sample data, as a test fixture, as benchmark input of any size
and as extra training data.  Anatomy is described in millimetres (vertebral bodies T10..S4
placed along a lordotic curve, discs, dural sac with cord and cauda equina, posterior elements,
paraspinal muscle, psoas, kidneys, great vessels, fat and abdomen) and rasterised onto the
requested grid with partial-volume edges, trabecular textures, a smooth multiplicative bias
field and Rician noise.  Only what lies in the field of view appears.

Storage geometry follows the real sagittal studies (PIR): ITK index x runs anterior → posterior,
y superior → inferior and z left → right, so ``array[z, y, x]`` is a stack of sagittal slices.

Labels follow :mod:`napari_spineseg.schema`: 1 vertebral body (every body in view, the fused
sacrum counted as one "S1" body), 2 intervertebral disc, 3 spinal canal (dural sac: CSF and
cord), 4 lesion (hemangioma-like, inside a body).  Posterior elements stay background.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from itertools import pairwise

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.spatial import cKDTree

from .errors import InputError
from .schema import INTERVERTEBRAL_DISC, LESION, SPINAL_CANAL, VERTEBRAL_BODY
from .volume import Geometry, Volume

__all__ = ["PHANTOM_DIRECTION", "Phantom", "PhantomConfig", "make_phantom", "sample_study"]

#: PIR storage: index x → posterior, y → inferior, z → patient right (LPS, row-major).
PHANTOM_DIRECTION: tuple[float, ...] = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
#: LPS position (mm) of the centre of the field of view.
_FOV_CENTRE_LPS = np.array([0.0, 30.0, 0.0])


@dataclass
class PhantomConfig:
    """What to synthesise.  Sizes and spacings are in ITK (x, y, z) order, spacings in mm."""

    size: tuple[int, int, int] = (224, 224, 77)
    spacing: tuple[float, float, float] = (1.2, 1.2, 2.0)
    contrast: str = "T1"  # "T1" or "T2"
    lesions: int = 0  # number of hemangioma-like lesions (label 4)
    snr: float = 20.0  # marrow signal / noise sigma; inf disables noise
    bias_field: float = 0.25  # peak relative amplitude of the multiplicative bias field
    seed: int = 0
    anatomy_jitter: float = 1.0  # scale of seeded anatomical variation (0: canonical anatomy)
    lesion_diameter_mm: tuple[float, float] = (5.0, 15.0)


@dataclass
class Phantom:
    """A synthetic study, its exact label map and what it contains."""

    image: Volume  # float32, roughly 0..1000
    labels: Volume  # uint8, same geometry
    levels: list[str]  # vertebral bodies present, superior -> inferior
    lesion_levels: list[str] = field(default_factory=list)  # level of each lesion


# --------------------------------------------------------------------------------------------
# Tissue table: (T1, T2, fine texture, medium texture, striated texture) amplitudes.
_TISSUES: dict[str, tuple[float, float, float, float, float]] = {
    "air": (0.0, 0.0, 0.0, 0.0, 0.0),
    "fat": (820.0, 720.0, 0.03, 0.05, 0.0),
    "muscle": (330.0, 190.0, 0.04, 0.05, 0.14),
    "abdomen": (380.0, 300.0, 0.08, 0.20, 0.0),
    "marrow": (600.0, 400.0, 0.10, 0.07, 0.0),
    "pe_marrow": (540.0, 340.0, 0.15, 0.07, 0.0),
    "cortex": (70.0, 55.0, 0.10, 0.0, 0.0),
    "annulus": (270.0, 150.0, 0.05, 0.05, 0.0),
    "nucleus": (300.0, 830.0, 0.05, 0.06, 0.0),
    "csf": (110.0, 950.0, 0.03, 0.02, 0.0),
    "cord": (370.0, 330.0, 0.04, 0.03, 0.0),
    "root": (340.0, 260.0, 0.03, 0.0, 0.0),
    "epidural_fat": (760.0, 640.0, 0.04, 0.06, 0.0),
    "vessel": (70.0, 60.0, 0.05, 0.05, 0.0),
    "kidney": (430.0, 620.0, 0.05, 0.08, 0.0),
    "facet": (200.0, 480.0, 0.05, 0.0, 0.0),
    "basivertebral": (300.0, 700.0, 0.05, 0.0, 0.0),
    "lesion": (860.0, 880.0, 0.06, 0.05, 0.0),
    "sacral_remnant": (230.0, 170.0, 0.05, 0.0, 0.0),
}

# Level table: name, body height (SI), depth (AP), width (LR), height of the disc below (mm),
# tangent angle (degrees; + turns posteriorly going inferior).
_LEVELS: tuple[tuple[str, float, float, float, float, float], ...] = (
    ("T9", 20.0, 28.0, 34.0, 5.5, -9.0),
    ("T10", 21.0, 29.0, 35.0, 6.0, -11.0),
    ("T11", 22.0, 30.0, 37.0, 6.5, -13.0),
    ("T12", 23.5, 32.0, 40.0, 7.0, -14.0),
    ("L1", 25.0, 35.0, 42.0, 8.5, -14.0),
    ("L2", 26.0, 37.0, 44.0, 9.5, -9.0),
    ("L3", 27.0, 39.0, 47.0, 10.5, -3.0),
    ("L4", 27.0, 40.0, 49.0, 11.0, 5.0),
    ("L5", 27.0, 40.0, 51.0, 10.0, 16.0),
    ("S1", 27.0, 42.0, 50.0, 3.0, 36.0),
    ("S2", 21.0, 33.0, 40.0, 2.5, 32.0),
    ("S3", 17.0, 26.0, 32.0, 2.5, 23.0),
    ("S4", 13.0, 20.0, 24.0, 2.0, 12.0),
)
_SACRAL = ("S1", "S2", "S3", "S4")
_LUMBAR = ("L1", "L2", "L3", "L4", "L5")
_L3_CENTRE = (-6.0, 12.0)  # (AP, SI) mm relative to the field-of-view centre
_CORTEX_MM = 1.6


@dataclass
class _Vertebra:
    name: str
    centre: np.ndarray  # (u, v) mm: u posterior, v inferior
    theta: float  # radians
    a: float  # AP half-depth
    b: float  # LR half-width
    h: float  # SI half-height
    sacral: bool
    hydration: float = 1.0  # of the disc below (T2 nucleus brightness)
    crop: tuple[slice, slice] | None = None  # body and posterior elements
    p: np.ndarray | None = None  # local AP coordinate on the crop
    q: np.ndarray | None = None  # local SI coordinate on the crop
    bcrop: tuple[slice, slice] | None = None  # body only
    bp: np.ndarray | None = None
    bq: np.ndarray | None = None
    lesions: list = field(default_factory=list)

    @property
    def tangent(self) -> np.ndarray:
        return np.array([np.sin(self.theta), np.cos(self.theta)])

    @property
    def normal(self) -> np.ndarray:
        return np.array([np.cos(self.theta), -np.sin(self.theta)])

    def local(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        du, dv = u - self.centre[0], v - self.centre[1]
        c, s = np.cos(self.theta), np.sin(self.theta)
        return (du * c - dv * s).astype(np.float32), (du * s + dv * c).astype(np.float32)

    def to_uv(self, p: float, q: float) -> np.ndarray:
        return self.centre + p * self.normal + q * self.tangent


@dataclass
class _Lesion:
    level: str
    p: float
    q: float
    w: float
    radii: tuple[float, float, float]  # p, q, w half-axes
    dots: np.ndarray  # (M, 2): trabecular column positions (p, w)


# --------------------------------------------------------------------------------------------
# Signed-distance helpers (mm; negative inside).


def _frac(sdf: np.ndarray, pv: float) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre lies at signed distance ``sdf``."""
    return np.clip(0.5 - sdf / pv, 0.0, 1.0)


def _ellipse_sdf(x: np.ndarray, y, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an ellipse with half-axes ``a`` (x) and ``b`` (y)."""
    g = (x / a) ** 2 + (y / b) ** 2 - 1.0
    grad = 2.0 * np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2)
    return np.maximum(g / np.maximum(grad, 1e-3), -np.minimum(a, b))


def _round_max(d1: np.ndarray, d2, r: float) -> np.ndarray:
    """Intersection of two regions with an edge rounded by radius ``r``."""
    k1, k2 = d1 + r, d2 + r
    outside = np.hypot(np.maximum(k1, 0.0), np.maximum(k2, 0.0))
    return outside + np.minimum(np.maximum(k1, k2), 0.0) - r


def _box_sdf(p, q, w: float, centre, half, r: float, angle: float = 0.0) -> np.ndarray:
    """Rounded box in a vertebra's local frame, optionally rotated in the sagittal plane."""
    x, y = p - centre[0], q - centre[1]
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        x, y = x * c + y * s, -x * s + y * c
    dx = np.abs(x) - half[0] + r
    dy = np.abs(y) - half[1] + r
    dz = abs(w - centre[2]) - half[2] + r
    outside = np.sqrt(np.maximum(dx, 0) ** 2 + np.maximum(dy, 0) ** 2 + max(dz, 0.0) ** 2)
    return outside + np.minimum(np.maximum(np.maximum(dx, dy), dz), 0.0) - r


class _Canvas:
    """One sagittal slice being painted: base intensity and three texture amplitudes."""

    def __init__(self, shape: tuple[int, int], contrast: int) -> None:
        self.img = np.zeros(shape, np.float32)
        self.amp = np.zeros((3, *shape), np.float32)
        self.contrast = contrast

    def paint(self, sl, f: np.ndarray, tissue: str, value: float | None = None) -> None:
        t = _TISSUES[tissue]
        val = t[self.contrast] if value is None else value
        img = self.img[sl]
        img += f * (val - img)
        # Texture follows the dominant tissue of each voxel.
        np.copyto(self.amp[(slice(None), *sl)], np.asarray(t[2:], np.float32)[:, None, None], where=(f > 0.5)[None])


# --------------------------------------------------------------------------------------------
# Anatomy in millimetres.


@dataclass
class _Anatomy:
    vertebrae: list[_Vertebra]
    axis: np.ndarray  # (M, 2) polyline through the body centres (u, v), 0.5 mm steps
    axis_t: np.ndarray  # arc length of each polyline point (0 at the L3 centre)
    axis_normal: np.ndarray  # (M, 2) posterior normals
    w_offset: float  # lateral offset of the spine (mm)
    fat_mm: float  # posterior subcutaneous fat thickness
    conus_t: float
    sac_end_t: float
    bifurcation_t: float
    roots: np.ndarray  # (K, 2) cauda equina strands: (n offset within the sac, w)
    lesions: list[_Lesion]
    canal_t: np.ndarray  # knots of canal profiles along the axis
    canal_post: np.ndarray  # posterior body wall offset (n) at the knots
    level_t: dict[str, float]


def _build_anatomy(cfg: PhantomConfig, rng: np.random.Generator) -> _Anatomy:
    jit = cfg.anatomy_jitter
    size_scale = 1.0 + 0.04 * jit * rng.standard_normal()
    lordosis = 1.0 + 0.12 * jit * rng.standard_normal()
    specs = []
    for name, h, d, wd, disc, ang in _LEVELS:
        s = size_scale * (1.0 + 0.025 * jit * rng.standard_normal())
        disc_s = 1.0 + 0.08 * jit * rng.standard_normal()
        ang = ang * lordosis + 1.2 * jit * rng.standard_normal()
        specs.append((name, h * s, d * s, wd * s, disc * disc_s, np.deg2rad(ang)))
    i3 = [s[0] for s in specs].index("L3")
    centre = np.array(_L3_CENTRE) + jit * rng.normal(0.0, [2.0, 2.0])

    def make(spec, c):
        name, h, d, wd, _, th = spec
        hyd = 1.0
        if name in ("L4", "L5"):
            hyd = float(np.clip(rng.uniform(0.5, 1.05), 0.4, 1.0)) if jit else 0.85
        return _Vertebra(name, np.asarray(c, float), th, d / 2, wd / 2, h / 2, name in _SACRAL, hyd)

    verts = {i3: make(specs[i3], centre)}
    for i in range(i3 + 1, len(specs)):  # inferior chain
        up = verts[i - 1]
        gap = specs[i - 1][4]
        tdisc = np.array([np.sin((up.theta + specs[i][5]) / 2), np.cos((up.theta + specs[i][5]) / 2)])
        top = up.to_uv(0.0, up.h) + gap * tdisc
        th = specs[i][5]
        verts[i] = make(specs[i], top + specs[i][1] / 2 * np.array([np.sin(th), np.cos(th)]))
    for i in range(i3 - 1, -1, -1):  # superior chain
        lo = verts[i + 1]
        gap = specs[i][4]
        tdisc = np.array([np.sin((lo.theta + specs[i][5]) / 2), np.cos((lo.theta + specs[i][5]) / 2)])
        bottom = lo.to_uv(0.0, -lo.h) - gap * tdisc
        th = specs[i][5]
        verts[i] = make(specs[i], bottom - specs[i][1] / 2 * np.array([np.sin(th), np.cos(th)]))
    vertebrae = [verts[i] for i in range(len(specs))]

    # Smooth axis through endplate centres and body centres, extended straight at both ends.
    knots = []
    for v in vertebrae:
        knots += [v.to_uv(0, -v.h), v.centre, v.to_uv(0, v.h)]
    knots = np.array(knots)
    chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(knots, axis=0), axis=1))])
    keep = np.concatenate([[True], np.diff(chord) > 1e-6])
    spline = CubicSpline(chord[keep], knots[keep], bc_type="natural")
    s = np.arange(0.0, chord[-1], 0.5)
    pts = spline(s)
    tan = spline(s, 1)
    tan /= np.linalg.norm(tan, axis=1, keepdims=True)
    ext = np.arange(0.5, 600.0, 0.5)[:, None]
    pts = np.concatenate([pts[0] - ext[::-1] * tan[0], pts, pts[-1] + ext * tan[-1]])
    tan = np.concatenate([np.repeat(tan[:1], len(ext), 0), tan, np.repeat(tan[-1:], len(ext), 0)])
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    normal = np.stack([tan[:, 1], -tan[:, 0]], axis=1)
    tree = cKDTree(pts)
    level_t = {v.name: float(arc[tree.query(v.centre)[1]]) for v in vertebrae}
    arc -= level_t["L3"]
    level_t = {k: t - level_t["L3"] for k, t in level_t.items()}

    canal_t = np.array([level_t[v.name] for v in vertebrae])
    canal_post = np.array([v.a for v in vertebrae])
    lt = level_t
    conus_t = lt["L1"] + 0.3 * (lt["L2"] - lt["L1"]) + 4.0 * jit * rng.standard_normal()
    sac_end_t = lt["S2"] + 0.2 * (lt["S3"] - lt["S2"])
    bif_t = lt["L4"] + 2.0 * jit * rng.standard_normal()
    n_roots = 16
    roots = np.stack([rng.uniform(-0.1, 0.85, n_roots), rng.uniform(-0.8, 0.8, n_roots)], axis=1)

    anatomy = _Anatomy(
        vertebrae=vertebrae,
        axis=pts,
        axis_t=arc,
        axis_normal=normal,
        w_offset=float(jit * rng.normal(0.0, 1.5)),
        fat_mm=float(np.clip(18.0 + 6.0 * jit * rng.standard_normal(), 8.0, 32.0)),
        conus_t=float(conus_t),
        sac_end_t=float(sac_end_t),
        bifurcation_t=float(bif_t),
        roots=roots,
        lesions=[],
        canal_t=canal_t,
        canal_post=canal_post,
        level_t=level_t,
    )
    return anatomy


def _place_lesions(cfg: PhantomConfig, anatomy: _Anatomy, grid, rng: np.random.Generator) -> None:
    """Hemangioma-like lesions inside lumbar bodies that are in view, centred on a voxel."""
    if cfg.lesions <= 0:
        return
    candidates = [v for v in anatomy.vertebrae if v.name in _LUMBAR and v.bcrop is not None]
    if not candidates:
        candidates = [v for v in anatomy.vertebrae if v.bcrop is not None]
    if not candidates:
        return
    replace_ = cfg.lesions > len(candidates)
    picks = rng.choice(len(candidates), size=cfg.lesions, replace=replace_)
    u_ax, v_ax, w_ax = grid
    dmin, dmax = cfg.lesion_diameter_mm
    for i in sorted(picks, key=lambda k: anatomy.vertebrae.index(candidates[k])):
        vert = candidates[int(i)]
        r = rng.uniform(dmin, dmax) / 2.0
        r = min(r, 0.7 * vert.h - _CORTEX_MM - 1.0, 0.7 * vert.a - _CORTEX_MM - 1.0)
        r = max(r, 1.0)
        lim_q = max(vert.h - r - _CORTEX_MM - 1.5, 0.0)
        lim_p = max(vert.a - r - _CORTEX_MM - 1.5, 0.0) * 0.8
        p, q = rng.uniform(-lim_p, lim_p), rng.uniform(-lim_q, lim_q)
        w = anatomy.w_offset + rng.uniform(-0.35, 0.35) * vert.b
        # Snap the centre to the nearest voxel centre so every lesion owns at least one voxel.
        uv = vert.to_uv(p, q)
        uv = np.array([u_ax[np.argmin(np.abs(u_ax - uv[0]))], v_ax[np.argmin(np.abs(v_ax - uv[1]))]])
        w = float(w_ax[np.argmin(np.abs(w_ax - w))])
        p, q = (float(c) for c in vert.local(uv[0], uv[1]))
        radii = tuple(float(r * f) for f in rng.uniform(0.85, 1.15, 3))
        n_dots = max(3, int(np.pi * (r + 1.0) ** 2 / 7.0))
        ang = rng.uniform(0, 2 * np.pi, n_dots)
        rad = (r + 1.0) * np.sqrt(rng.uniform(0, 1, n_dots))
        dots = np.stack([p + rad * np.cos(ang), w + rad * np.sin(ang)], axis=1)
        lesion = _Lesion(vert.name, p, q, w, radii, dots)
        vert.lesions.append(lesion)
        anatomy.lesions.append(lesion)


# --------------------------------------------------------------------------------------------
# Noise fields, bias field.

_FIELDS_MM = ((0.6, 0.6, 0.6), (3.0, 3.0, 3.0), (0.8, 6.0, 1.5))  # (u, v, w) sigmas in mm


def _kernel_norm(sigma: float) -> float:
    if sigma <= 0:
        return 1.0
    radius = int(4.0 * sigma + 0.5)
    delta = np.zeros(2 * radius + 1)
    delta[radius] = 1.0
    k = ndimage.gaussian_filter1d(delta, sigma, mode="constant")
    return float(np.sqrt(np.sum(k**2)))


class _Noise:
    """Smooth unit-variance Gaussian noise, one sagittal slice at a time.

    Seeded "key" slices are filtered in-plane (on a coarser grid when the correlation length
    spans several voxels, then interpolated back) and blended linearly between keys along z, so
    every slice is reproducible on its own and large volumes stay cheap.
    """

    def __init__(self, seed: int, stream: int, shape2: tuple[int, int], sig_zyx) -> None:
        self.seed, self.stream, self.shape2 = seed, stream, shape2
        sz, sy, sx = sig_zyx
        self.zstep = max(1, round(sz))
        self.steps = (max(1, int(sy / 1.5)), max(1, int(sx / 1.5)))
        self.coarse = tuple(n if st == 1 else -(-n // st) + 1 for n, st in zip(shape2, self.steps))
        self.sig = (sy / self.steps[0], sx / self.steps[1])
        self.norm = _kernel_norm(self.sig[0]) * _kernel_norm(self.sig[1])
        self.cache: dict[int, np.ndarray] = {}

    def _key(self, i: int) -> np.ndarray:
        if i not in self.cache:
            if len(self.cache) > 4:
                self.cache.pop(min(self.cache))
            rng = np.random.default_rng([self.seed, self.stream, i + 100_000])
            raw = rng.standard_normal(self.coarse, dtype=np.float32)
            key = ndimage.gaussian_filter(raw, self.sig, mode="reflect") / np.float32(self.norm)
            if self.steps != (1, 1):
                ry = np.arange(self.shape2[0]) / self.steps[0]
                rx = np.arange(self.shape2[1]) / self.steps[1]
                key = ndimage.map_coordinates(key, np.meshgrid(ry, rx, indexing="ij"), order=1, mode="nearest")
            self.cache[i] = key.astype(np.float32)
        return self.cache[i]

    def slice(self, k: int) -> np.ndarray:
        i, rem = divmod(k, self.zstep)
        if rem == 0:
            return self._key(i)
        f = rem / self.zstep
        return (self._key(i) * (1 - f) + self._key(i + 1) * f) / np.float32(np.hypot(1 - f, f))


class _Bias:
    """Smooth multiplicative field: posterior receive-coil gain plus random low frequencies."""

    def __init__(self, amplitude: float, rng: np.random.Generator, u, v, w) -> None:
        self.amplitude = amplitude
        k = rng.uniform(2 * np.pi / 600.0, 2 * np.pi / 250.0, (3, 3))
        phase = rng.uniform(0, 2 * np.pi, (3, 3))
        weight = rng.uniform(0.5, 1.0, 3)
        self.terms = [(weight[i], k[i], phase[i]) for i in range(3)]
        self.coil = 1.3
        # Normalise so the peak deviation over the field of view is ``amplitude``.
        cu, cv, cw = (np.linspace(a.min(), a.max(), 9) for a in (u, v, w))
        vals = np.stack([self._raw(cu, cv, x) for x in cw])
        self.offset = 0.5 * (vals.max() + vals.min())
        self.scale = max(0.5 * (vals.max() - vals.min()), 1e-6)
        self.u, self.v = u, v

    def _raw(self, u, v, w: float) -> np.ndarray:
        out = self.coil * np.tanh(u / 120.0)[None, :] + np.zeros((len(v), 1))
        for wt, k, ph in self.terms:
            out = out + wt * np.outer(np.cos(k[1] * v + ph[1]), np.cos(k[0] * u + ph[0])) * np.cos(k[2] * w + ph[2])
        return out

    def slice(self, w: float) -> np.ndarray:
        raw = self._raw(self.u, self.v, w)
        return (1.0 + self.amplitude * (raw - self.offset) / self.scale).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Rendering.


class _Renderer:
    def __init__(self, cfg: PhantomConfig, anatomy: _Anatomy, u: np.ndarray, v: np.ndarray) -> None:
        self.cfg = cfg
        self.an = anatomy
        self.contrast = 0 if cfg.contrast == "T1" else 1
        self.pv = float(np.mean(cfg.spacing[:2]))
        self.u1, self.v1 = u, v
        self.U, self.V = np.meshgrid(u.astype(np.float32), v.astype(np.float32))
        ny, nx = self.U.shape
        # Curvilinear (t along the spine axis, n posterior offset) coordinates of every pixel.
        tree = cKDTree(anatomy.axis)
        _, idx = tree.query(np.stack([self.U.ravel(), self.V.ravel()], 1))
        rel = np.stack([self.U.ravel(), self.V.ravel()], 1) - anatomy.axis[idx]
        self.T = anatomy.axis_t[idx].reshape(ny, nx).astype(np.float32)
        self.N = np.einsum("ij,ij->i", rel, anatomy.axis_normal[idx]).reshape(ny, nx).astype(np.float32)
        # Horizontal offset from the spine axis (for skin, fascia, compartments).
        order = np.argsort(anatomy.axis[:, 1])
        ax_u = np.interp(v, anatomy.axis[order, 1], anatomy.axis[order, 0])
        smooth_u = ndimage.gaussian_filter1d(ax_u, 25.0 / cfg.spacing[1], mode="nearest")
        self.du = (self.U - ax_u[:, None].astype(np.float32)).astype(np.float32)
        lt = anatomy.level_t
        t_rows = np.interp(v, anatomy.axis[order, 1], anatomy.axis_t[order])
        skin_off = np.interp(t_rows, [lt["L1"], lt["L5"], lt["S1"], lt["S2"], lt["S3"]], [96, 96, 88, 70, 55])
        self.skin_mid = (smooth_u + skin_off - ax_u).astype(np.float32)  # relative to the axis
        # Canal profile along t: posterior body wall offset.
        self.post = np.interp(self.T, anatomy.canal_t, anatomy.canal_post).astype(np.float32)
        # Bands around the spine for structures anterior / posterior to the bodies.
        near = np.abs(self.du) < 130
        self.band_ant = self._mask_box(near & (self.N > -100) & (self.N < 20))
        self.band_post = self._mask_box(near & (self.N > 0) & (self.N < 70) & (anatomy.sac_end_t + 60 > self.T))
        verts = anatomy.vertebrae
        for vert in verts:
            vert.crop = self._box(
                [vert.to_uv(p, q) for p in (-vert.a - 8, vert.a + 66) for q in (-vert.h - 16, vert.h + 16)]
            )
            if vert.crop is not None:
                vert.p, vert.q = vert.local(self.U[vert.crop], self.V[vert.crop])
            vert.bcrop = self._box(
                [vert.to_uv(p, q) for p in (-vert.a - 3, vert.a + 3) for q in (-vert.h - 3, vert.h + 3)]
            )
            if vert.bcrop is not None:
                vert.bp, vert.bq = vert.local(self.U[vert.bcrop], self.V[vert.bcrop])
        self.discs = []
        for up, lo in pairwise(verts):
            pts = [up.to_uv(p, up.h - 5) for p in (-up.a - 3, up.a + 3)] + [
                lo.to_uv(p, -lo.h + 5) for p in (-lo.a - 3, lo.a + 3)
            ]
            sl = self._box(pts)
            if sl is None:
                continue
            U, V = self.U[sl], self.V[sl]
            self.discs.append((up, lo, sl, *up.local(U, V), *lo.local(U, V)))

    @staticmethod
    def _mask_box(mask: np.ndarray) -> tuple[slice, slice] | None:
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        if len(rows) == 0:
            return None
        return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)

    def _box(self, points) -> tuple[slice, slice] | None:
        """Grid crop covering the (u, v) bounding box of ``points``, or None if out of view."""
        pts = np.asarray(points)
        cols = np.nonzero((self.u1 >= pts[:, 0].min()) & (self.u1 <= pts[:, 0].max()))[0]
        rows = np.nonzero((self.v1 >= pts[:, 1].min()) & (self.v1 <= pts[:, 1].max()))[0]
        if len(cols) == 0 or len(rows) == 0:
            return None
        return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)

    # -- shapes ------------------------------------------------------------------------------
    @staticmethod
    def _body_parts(vert: _Vertebra, p, q, w: float):
        """(sdf, radial axial coordinate, effective half-height) of a vertebral body."""
        qn = np.clip(q / vert.h, -1.0, 1.0)
        waist = np.where(p < 0, 0.06, 0.025) * (1.0 - qn**2)
        a_eff = vert.a * (1.0 - waist)
        r2 = (p / a_eff) ** 2 + (w / vert.b) ** 2
        d_ax = _ellipse_sdf(p / a_eff * vert.a, w, vert.a, vert.b)
        conc = 0.8 if vert.sacral else 1.6
        h_eff = vert.h - conc * np.clip(1.0 - r2, 0.0, 1.0)
        sdf = _round_max(d_ax, np.abs(q) - h_eff, min(3.0, 0.2 * vert.h))
        return sdf, h_eff

    def render(self, w_mm: float, contrast: int) -> tuple[_Canvas, np.ndarray, dict[str, int]]:
        an, pv = self.an, self.pv
        cv = _Canvas(self.U.shape, contrast)
        lab = np.zeros(self.U.shape, np.uint8)
        w = w_mm - an.w_offset
        full = (slice(None), slice(None))
        # Torso, subcutaneous fat, abdomen and posterior muscle compartment.
        half_lr = 165.0
        lr = max(1.0 - (w / half_lr) ** 2, 0.0)
        skin = self.skin_mid * np.float32(np.sqrt(lr)) - np.float32(4.0 * np.exp(-((w / 18.0) ** 2)))
        torso_sdf = np.maximum(self.du - skin, -150.0 * np.sqrt(lr) - self.du)
        if lr > 0:
            cv.paint(full, _frac(torso_sdf, pv), "fat")
            fascia = skin - np.float32(an.fat_mm) + np.float32(6.0 * (1 - np.exp(-((w / 20.0) ** 2))))
            wall = 10.0 + 14.0 * (w / 60.0) ** 2
            inner = np.maximum(torso_sdf + an.fat_mm * 0.4, -self.du - 200)
            cv.paint(full, _frac(np.maximum(inner, self.du - wall), 2.0), "abdomen")
            cv.paint(full, _frac(np.maximum(self.du - fascia, wall - self.du), pv), "muscle")
        if lr > 0:
            self._render_band(cv, lab, w)
        counts: dict[str, int] = {}
        self._render_vertebrae(cv, lab, w, counts)
        return cv, lab, counts

    def _render_band(self, cv: _Canvas, lab: np.ndarray, w: float) -> None:
        an, pv, lt = self.an, self.pv, self.an.level_t
        if self.band_ant is not None:
            self._render_anterior(cv, w)
        sl = self.band_post
        if sl is None or abs(w) > 22.0:
            return
        T, N, post = self.T[sl], self.N[sl], self.post[sl]
        # Bony canal and foramina filled with epidural fat.
        canal_ap = np.where(lt["S1"] > T, 18.0, np.clip(18.0 - 0.12 * (T - lt["S1"]), 6.0, 18.0))
        canal_lr = np.where(lt["S1"] > T, 20.0, np.clip(20.0 - 0.15 * (T - lt["S1"]), 6.0, 20.0))
        dn = np.maximum(post - 0.5 - N, N - post - canal_ap)
        bony = np.maximum(dn, abs(w) - canal_lr)
        if np.any(bony < pv):
            cv.paint(sl, _frac(bony, pv), "epidural_fat")
        if abs(w) > 12.0:
            return
        # Dural sac: CSF, cord to the conus, cauda equina roots.
        taper = np.clip((an.sac_end_t - T) / 30.0, 0.0, 1.0)
        sac_ap = (7.0 - 0.01 * (T - lt["L1"]).clip(0)) * np.sqrt(taper)
        sac_lr = 9.5 * np.sqrt(taper)
        sac_c = post + 1.2 + sac_ap
        sac = np.where(taper > 0, _ellipse_sdf(N - sac_c, w, np.maximum(sac_ap, 0.1), np.maximum(sac_lr, 0.1)), 99.0)
        sac = np.maximum(sac, T - an.sac_end_t)
        if abs(w) < 12.0 and np.any(sac < pv):
            cv.paint(sl, _frac(sac, pv), "csf")
            lab[sl][sac <= 0] = SPINAL_CANAL
            cone = np.clip((an.conus_t - T) / 18.0, 0.0, 1.0) ** 0.6
            cord_c = sac_c - 1.0
            cord = np.where(cone > 0, _ellipse_sdf(N - cord_c, w, 4.2 * cone + 0.05, 5.2 * cone + 0.05), 99.0)
            cord = np.maximum(cord, sac)
            if np.any(cord < pv):
                cv.paint(sl, _frac(cord, pv), "cord")
            fade = np.clip((T - an.conus_t + 10) / 10.0, 0.0, 1.0)
            for rn, rw in an.roots:
                rc_n = sac_c + rn * sac_ap
                rc_w = rw * sac_lr * np.clip(1.0 - 0.004 * (T - an.conus_t), 0.3, 1.0)
                d = np.sqrt((N - rc_n) ** 2 + (w - rc_w) ** 2) - 0.7
                d = np.maximum(d, sac)
                if np.any(d < pv):
                    cv.paint(sl, _frac(d, pv) * fade * 0.8, "root")

    def _render_anterior(self, cv: _Canvas, w: float) -> None:
        """Psoas muscles, kidneys and the great vessels."""
        an, pv, lt, sl = self.an, self.pv, self.an.level_t, self.band_ant
        T, N, post = self.T[sl], self.N[sl], self.post[sl]
        # Psoas muscles: grow from T12 to L5 beside the bodies, then run anteriorly into the pelvis.
        grow = np.clip((T - lt["T12"]) / (lt["L5"] - lt["T12"]), 0.0, 1.0)
        pr = 4.0 + 20.0 * grow
        pelvis = np.clip((T - lt["L5"]) / 60.0, 0.0, None)
        pn = -post * 0.45 - 6.0 - 40.0 * pelvis**1.5
        pw = post * 1.25 + pr * 0.85 + 10.0 * pelvis
        psoas = np.maximum(_ellipse_sdf(N - pn, abs(w) - pw, pr * 0.9, pr), lt["T12"] - T) if abs(w) > 8 else None
        if psoas is not None and np.any(psoas < pv):
            cv.paint(sl, _frac(psoas, pv), "muscle")
        # Kidneys with perirenal fat (lateral slices).
        kt = 0.5 * (lt["L1"] + lt["L2"])
        if abs(w) > 30:
            kd = np.sqrt(((T - kt) / 52.0) ** 2 + ((N - 2.0) / 24.0) ** 2 + ((abs(w) - 72.0) / 26.0) ** 2)
            fatd = (kd - 1.35) * 24.0
            if np.any(fatd < pv):
                cv.paint(sl, _frac(fatd, pv), "fat")
                cv.paint(sl, _frac((kd - 1.0) * 24.0, pv), "kidney")
        # Aorta (left) and inferior vena cava (right), then the iliac vessels.
        vessels = ((-1.0, 9.0, an.bifurcation_t), (1.0, 10.0, lt["L5"] - 5.0)) if abs(w) < 60 else ()
        for side, radius, end_t in vessels:
            below = np.clip(T - end_t, 0.0, None)
            vw = side * (13.0 if side < 0 else 17.0) + np.sign(side) * 0.0
            centre_n = -post - radius - 3.0 - 0.25 * below
            # Both iliacs diverge from the midline below the bifurcation.
            for lat in (-1.0, 1.0):
                cw = np.where(end_t > T, vw, lat * (8.0 + 0.55 * below) + 0.3 * vw)
                rr = np.where(end_t > T, radius, radius * 0.65)
                d = _ellipse_sdf(N - centre_n, w - cw, rr, rr)
                d = np.maximum(d, lt["T10"] - T)
                if np.any(d < pv):
                    cv.paint(sl, _frac(d, pv), "vessel")

    def _render_vertebrae(self, cv: _Canvas, lab: np.ndarray, w: float, counts: dict[str, int]) -> None:
        an, pv = self.an, self.pv
        verts = an.vertebrae
        aw = abs(w)
        # Posterior elements (not labelled).
        for vert in verts:
            if vert.crop is None or aw > vert.b + 25:
                continue
            self._posterior(cv, vert, w)
        # Discs (and fused sacral remnants).
        for disc in self.discs:
            if aw <= max(disc[0].b, disc[1].b) + 3:
                self._disc(cv, lab, w, *disc)
        # Bodies with cortex, marrow, basivertebral vein and lesions.
        for vert in verts:
            if vert.bcrop is None or aw > vert.b + 2:
                continue
            sl = vert.bcrop
            sdf, _ = self._body_parts(vert, vert.bp, vert.bq, w)
            if not np.any(sdf < pv):
                continue
            cv.paint(sl, _frac(sdf, pv), "cortex")
            cv.paint(sl, _frac(sdf + _CORTEX_MM, pv), "pe_marrow" if vert.sacral else "marrow")
            if aw < 4.0:
                bv = _box_sdf(vert.bp, vert.bq, w, (vert.a - 3.5, 0.0, 0.0), (3.5, 1.2, 3.0), 1.0)
                cv.paint(sl, _frac(bv, pv) * 0.5, "basivertebral")
            inside = sdf <= 0
            sub = lab[sl]
            sub[inside] = VERTEBRAL_BODY
            name = "S1" if vert.sacral else vert.name
            counts[name] = counts.get(name, 0) + int(inside.sum())
            for lesion in vert.lesions:
                self._lesion(cv, lab, vert, lesion, sdf, w)

    def _posterior(self, cv: _Canvas, vert: _Vertebra, w: float) -> None:
        a, h, p, q, pv = vert.a, vert.h, vert.p, vert.q, self.pv
        aw = abs(w)
        ped_w = 12.5 + 0.1 * a
        boxes = []
        if not vert.sacral or vert.name == "S1":
            boxes.append(((a + 8.0, -0.35 * h, ped_w), (9.0, 0.3 * h + 1.0, 3.5), 2.5, 0.0))  # pedicle
            boxes.append(((a + 23.0, 0.2 * h, ped_w + 3.0), (7.0, h + 3.0, 6.0), 3.0, 0.0))  # articular pillar
        if not vert.sacral:
            boxes.append(((a + 21.5, 0.1 * h, 0.0), (3.5, 0.6 * h, ped_w + 2.0), 2.0, 0.0))  # lamina
            boxes.append(((a + 37.0, 0.25 * h, 0.0), (18.0, 0.45 * h + 1.5, 3.5), 3.0, -0.2))  # spinous process
            boxes.append(((a + 17.0, -0.1 * h, 28.0 + 0.2 * a), (4.0, 4.5, 13.0), 2.0, 0.0))  # transverse
        else:
            canal = 18.0 if vert.name == "S1" else max(6.0, 14.0 - 3.0 * _SACRAL.index(vert.name))
            boxes.append(((a + canal + 4.0, 0.0, 0.0), (4.0, h + 1.5, vert.b * 0.9), 2.0, 0.0))  # dorsal plate
            boxes.append(((a + canal + 10.0, 0.0, 0.0), (4.0, 0.5 * h, 3.0), 2.0, -0.3))  # median crest
            boxes.append(((-vert.a * 0.2, 0.0, vert.b + 18.0), (vert.a * 1.0, h + 1.5, 20.0), 4.0, 0.0))  # ala
        sdf = None
        for centre, half, r, ang in boxes:
            if abs(aw - centre[2]) > half[2] + 2 and centre[2] != 0:
                continue
            if centre[2] == 0 and aw > half[2] + 2:
                continue
            d = _box_sdf(p, q, aw, centre, half, r, ang)
            sdf = d if sdf is None else np.minimum(sdf, d)
        if sdf is None or not np.any(sdf < pv):
            return
        sl = vert.crop
        cv.paint(sl, _frac(sdf, pv), "cortex")
        cv.paint(sl, _frac(sdf + 1.8, pv), "pe_marrow")
        # Facet joint space between this pillar and the one below (fluid/cartilage).
        if not vert.sacral and abs(aw - (ped_w + 3.0)) < 7.0:
            fj = _box_sdf(p, q, aw, (a + 23.0, 0.2 * h + h + 3.6, ped_w + 3.0), (6.0, 0.9, 5.0), 0.8)
            cv.paint(sl, _frac(fj, pv) * 0.8, "facet")

    def _disc(self, cv: _Canvas, lab: np.ndarray, w: float, up, lo, sl, pu, qu, pl, ql) -> None:
        pv = self.pv
        _, hu = self._body_parts(up, pu, qu, w)
        _, hl = self._body_parts(lo, pl, ql, w)
        dist_up = qu - hu  # >= 0 below the upper body's inferior endplate
        dist_lo = -ql - hl  # >= 0 above the lower body's superior endplate
        pd = 0.5 * (pu + pl)
        ad = 0.5 * (up.a + lo.a) + (0.3 if up.sacral else 1.3)
        bd = 0.5 * (up.b + lo.b) + (0.3 if up.sacral else 1.3)
        d_ax = _ellipse_sdf(pd, w, ad, bd)
        sdf = np.maximum(d_ax, np.maximum(-dist_up, -dist_lo) - 0.6)
        if not np.any(sdf < pv):
            return
        f = _frac(sdf, pv)
        if up.sacral:
            cv.paint(sl, f, "sacral_remnant")
            lab[sl][sdf <= 0] = VERTEBRAL_BODY
            return
        cv.paint(sl, f, "annulus")
        height = np.maximum(dist_up + dist_lo, 0.1)
        nuc = np.maximum(
            _ellipse_sdf(pd - 0.1 * ad, w, 0.68 * ad, 0.7 * bd), 0.12 * height - np.minimum(dist_up, dist_lo)
        )
        t = _TISSUES
        c = cv.contrast
        val = t["annulus"][c] + up.hydration * (t["nucleus"][c] - t["annulus"][c])
        cv.paint(sl, _frac(nuc, 3.0) * np.float32(0.95), "nucleus", value=val)
        # Intranuclear cleft: a thin dark line through the nucleus of adult discs.
        cleft = np.maximum(np.abs(dist_up - dist_lo) - 0.6, _ellipse_sdf(pd, w, 0.5 * ad, 0.5 * bd))
        cv.paint(sl, _frac(cleft, pv) * 0.25, "annulus")
        lab[sl][sdf <= 0] = INTERVERTEBRAL_DISC

    def _lesion(self, cv: _Canvas, lab: np.ndarray, vert: _Vertebra, lesion: _Lesion, body_sdf, w: float) -> None:
        rp, rq, rw = lesion.radii
        if abs(w - lesion.w) > rw + self.pv:
            return
        p, q = vert.bp, vert.bq
        rho = np.sqrt(((p - lesion.p) / rp) ** 2 + ((q - lesion.q) / rq) ** 2 + ((w - lesion.w) / rw) ** 2)
        sdf = np.maximum((rho - 1.0) * min(rp, rq, rw), body_sdf + _CORTEX_MM)
        if not np.any(sdf < self.pv):
            return
        # Thickened vertical trabeculae: dark dots in axial, corduroy stripes in sagittal slices.
        sig_w = max(0.7, self.cfg.spacing[2] / 2.5)
        near = lesion.dots[np.abs(lesion.dots[:, 1] - w) < 3 * sig_w]
        dark = np.zeros_like(p)
        for dp, dw in near:
            weight = np.exp(-((w - dw) ** 2) / (2 * sig_w**2)) * 0.7 / max(1.0, sig_w / 0.7)
            dark = np.maximum(dark, weight * np.exp(-((p - dp) ** 2) / (2 * 0.75**2)))
        val = _TISSUES["lesion"][cv.contrast]
        f = _frac(sdf, self.pv)
        cv.paint(vert.bcrop, f, "lesion")
        cv.img[vert.bcrop] *= 1.0 - 0.75 * dark * f
        sub = lab[vert.bcrop]
        sub[(sdf <= 0)] = LESION
        del val


# --------------------------------------------------------------------------------------------


def _validate(cfg: PhantomConfig) -> PhantomConfig:
    try:
        size = tuple(int(s) for s in cfg.size)
        spacing = tuple(float(s) for s in cfg.spacing)
    except (TypeError, ValueError) as exc:
        raise InputError(f"phantom: size and spacing must be 3 numbers ({exc})") from None
    if len(size) != 3 or len(spacing) != 3:
        raise InputError(f"phantom: size and spacing need 3 values (x, y, z), got {cfg.size} and {cfg.spacing}")
    if min(size) < 2:
        raise InputError(f"phantom: every size must be at least 2 voxels, got {size}")
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(f"phantom: spacing must be positive, got {spacing}")
    contrast = str(cfg.contrast).upper()
    if contrast not in ("T1", "T2"):
        raise InputError(f"phantom: contrast must be 'T1' or 'T2', got {cfg.contrast!r}")
    if int(cfg.lesions) < 0:
        raise InputError(f"phantom: lesions must be >= 0, got {cfg.lesions}")
    if not cfg.snr > 0:
        raise InputError(f"phantom: snr must be positive (inf for no noise), got {cfg.snr}")
    if not 0.0 <= cfg.bias_field < 0.9:
        raise InputError(f"phantom: bias_field must be in [0, 0.9), got {cfg.bias_field}")
    lo, hi = cfg.lesion_diameter_mm
    if not 0 < lo <= hi:
        raise InputError(f"phantom: lesion_diameter_mm must be 0 < min <= max, got {cfg.lesion_diameter_mm}")
    return replace(cfg, size=size, spacing=spacing, contrast=contrast, lesions=int(cfg.lesions), seed=int(cfg.seed))


def phantom_geometry(size: tuple[int, int, int], spacing: tuple[float, float, float]) -> Geometry:
    """PIR geometry of a phantom grid, centred on a fixed LPS point."""
    direction = np.asarray(PHANTOM_DIRECTION).reshape(3, 3)
    half = np.asarray(spacing) * (np.asarray(size) - 1) / 2.0
    origin = _FOV_CENTRE_LPS - direction @ half
    return Geometry(size, spacing, tuple(np.round(origin, 6)), PHANTOM_DIRECTION)


def make_phantom(config: PhantomConfig | None = None, **overrides) -> Phantom:
    """Synthesise a sagittal lumbar spine MRI and its exact label map (deterministic per config).

    ``overrides`` replace fields of ``config`` (or of the default :class:`PhantomConfig`).
    """
    config = config or PhantomConfig()
    names = {f.name for f in fields(PhantomConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise InputError(f"phantom: unknown option(s) {sorted(unknown)}; known: {sorted(names)}")
    cfg = _validate(replace(config, **overrides))
    nx, ny, nz = cfg.size
    sx, sy, sz = cfg.spacing
    u = (np.arange(nx) - (nx - 1) / 2.0) * sx  # anterior -> posterior
    v = (np.arange(ny) - (ny - 1) / 2.0) * sy  # superior -> inferior
    w = (np.arange(nz) - (nz - 1) / 2.0) * sz  # left -> right
    rng = np.random.default_rng([cfg.seed, 1])
    anatomy = _build_anatomy(cfg, rng)
    renderer = _Renderer(cfg, anatomy, u, v)
    _place_lesions(cfg, anatomy, (u, v, w), np.random.default_rng([cfg.seed, 2]))
    bias = _Bias(cfg.bias_field, np.random.default_rng([cfg.seed, 3]), u, v, w)
    contrast = 0 if cfg.contrast == "T1" else 1
    sigma = _TISSUES["marrow"][contrast] / cfg.snr if np.isfinite(cfg.snr) else 0.0

    image = np.empty((nz, ny, nx), np.float32)
    labels = np.zeros((nz, ny, nx), np.uint8)
    counts: dict[str, int] = {}
    sig_fields = [(s_w / sz, s_v / sy, s_u / sx) for s_u, s_v, s_w in _FIELDS_MM]
    noise = [_Noise(cfg.seed, 10 + i, (ny, nx), s) for i, s in enumerate(sig_fields)]
    for k in range(nz):
        cv, lab, c = renderer.render(float(w[k]), contrast)
        for name, n in c.items():
            counts[name] = counts.get(name, 0) + n
        tex = 1.0 + cv.amp[0] * noise[0].slice(k) + cv.amp[1] * noise[1].slice(k) + cv.amp[2] * noise[2].slice(k)
        img = cv.img * np.clip(tex, 0.2, None) * bias.slice(float(w[k]))
        if sigma > 0:
            n = np.random.default_rng([cfg.seed, 4, k]).standard_normal((2, ny, nx), dtype=np.float32)
            img = np.sqrt((img + sigma * n[0]) ** 2 + (sigma * n[1]) ** 2)
        image[k] = img
        labels[k] = lab
    order = [v.name for v in anatomy.vertebrae if not v.sacral] + ["S1"]
    levels = [name for name in order if counts.get(name, 0) > 0]
    geometry = phantom_geometry(cfg.size, cfg.spacing)
    centres = {}
    for vert in anatomy.vertebrae:
        if vert.name in levels:
            centres[vert.name] = [
                float((vert.centre[0] - u[0]) / sx),
                float((vert.centre[1] - v[0]) / sy),
                float((anatomy.w_offset - w[0]) / sz),
            ]
    meta = {"phantom_config": {f.name: getattr(cfg, f.name) for f in fields(cfg)}}
    name = f"spine phantom {cfg.contrast}"
    return Phantom(
        image=Volume(image, geometry, name=name, metadata=dict(meta)),
        labels=Volume(labels, geometry, name=f"{name} labels", metadata={**meta, "level_centres_index": centres}),
        levels=levels,
        lesion_levels=[lesion.level for lesion in anatomy.lesions],
    )


def sample_study() -> Phantom:
    """The bundled sample: default T1 phantom with one lesion and a fixed seed."""
    return make_phantom(PhantomConfig(contrast="T1", lesions=1, seed=7))
