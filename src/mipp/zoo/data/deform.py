"""Fixed random deformations of images: a random affine map composed with an elastic field.

The deformed-MNIST study of the MIPP paper (Westphal et al., arXiv 2411.00147), here applied
to any image tensor. Each image gets its own deformation, drawn once from ``seed``:

* an affine map ``M p + t`` about the image centre, ``M = s R(theta) H(h)`` with a rotation
  ``R`` by ``theta`` degrees (counter-clockwise as displayed, rows pointing down), a shear
  ``H = [[1, h], [0, 1]]`` (x moves by ``h`` times y) and an isotropic scale ``s``; ``t`` in
  pixels, positive x to the right, positive y down;
* an elastic displacement field ``d`` (Simard, Steinkraus & Platt 2003, "Best practices for
  convolutional neural networks applied to visual document analysis", section 2): uniform
  noise in [-1, 1] per pixel and axis, Gaussian-smoothed with ``sigma`` pixels (zero padding,
  kernel truncated at 4 sigma, as ``scipy.ndimage.gaussian_filter(mode="constant")``) and
  scaled by ``alpha`` pixels.

The output samples the input by bilinear interpolation (``grid_sample``, zero padding,
``align_corners=False``) at ``src(q) = M^-1 (q + d(q) - t)`` for every output pixel centre
``q`` (pixel coordinates relative to the image centre): the affine map moves the content, then
the elastic field displaces where the result is read. Parameters equal to the identity
(``theta = h = 0``, ``s = 1``, ``t = d = 0``) reproduce the input exactly up to rounding.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F

__all__ = ["deform_images", "elastic_displacement", "warp_images"]


def _check_real(
    name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = False
) -> float:
    """``value`` as a float if it is a finite real in [low, high] (or (low, high])."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a real number in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def _check_images(images: object) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (n, c, h, w), got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a floating tensor, got {images.dtype}; convert uint8 pixels with "
            "images.float() / 255"
        )
    return images


def elastic_displacement(noise: torch.Tensor, *, alpha: float, sigma: float) -> torch.Tensor:
    """Simard-style elastic field ``alpha * (G_sigma * noise)`` in pixels, per image and axis.

    ``noise`` (n, 2, h, w), typically uniform in [-1, 1]; channel 0 is the x (column) and
    channel 1 the y (row) displacement. The Gaussian ``G_sigma`` (``sigma`` pixels, truncated
    at radius ``round(4 sigma)``, normalised to sum 1) is applied separably with zero padding,
    as banded matrices: ``K_h @ noise @ K_w.T``. Returns a tensor shaped like ``noise``.

    >>> field = elastic_displacement(torch.ones(1, 2, 5, 5), alpha=2.0, sigma=0.1)
    >>> torch.allclose(field, torch.full((1, 2, 5, 5), 2.0))
    True
    """
    if noise.ndim != 4 or noise.shape[1] != 2:
        raise ValueError(f"noise must be (n, 2, h, w), got {tuple(noise.shape)}")
    alpha = _check_real("elastic_alpha", alpha, 0.0)
    sigma = _check_real("elastic_sigma", sigma, 0.0, low_open=True)
    radius = int(4.0 * sigma + 0.5)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    taps = taps / taps.sum()

    def banded(size: int) -> torch.Tensor:
        offset = torch.arange(size)[:, None] - torch.arange(size)[None, :]
        inside = offset.abs() <= radius
        weights = taps[(offset + radius).clamp(0, 2 * radius)] * inside
        return weights.to(noise.dtype)

    h, w = noise.shape[-2:]
    return alpha * (banded(h) @ noise @ banded(w).T)


def _sampling_grid(
    angle: torch.Tensor,
    scale: torch.Tensor,
    shear: torch.Tensor,
    shift: torch.Tensor,
    displacement: torch.Tensor | None,
    *,
    size: tuple[int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """``grid_sample`` grid (n, h, w, 2) reading the input at ``M^-1 (q + d(q) - t)``."""
    h, w = size
    rad = torch.deg2rad(angle.double())
    cos, sin = torch.cos(rad), torch.sin(rad)
    sh, inv_s = shear.double(), 1.0 / scale.double()
    # M^-1 = H^-1 R^-1 / s with H^-1 = [[1, -h], [0, 1]], R^-1 = [[cos, -sin], [sin, cos]]
    # (R = [[cos, sin], [-sin, cos]] turns content counter-clockwise when rows point down).
    inv = (
        torch.stack(
            [
                torch.stack([cos - sh * sin, -sin - sh * cos], -1),
                torch.stack([sin, cos], -1),
            ],
            -2,
        )
        * inv_s[:, None, None]
    )  # (n, 2, 2)
    # The 2x2 maps are built in float64 (cos 90 degrees is 0 to 1e-16), the grid in ``dtype``.
    inv = (inv * inv.new_tensor([2.0 / w, 2.0 / h])[:, None]).to(dtype)
    # Output pixel centres relative to the image centre, in pixels, minus the shift: (n, h, w).
    qx = (
        torch.arange(w, dtype=dtype, device=shift.device)
        - (w - 1) / 2
        - shift[:, 0, None, None].to(dtype)
    )
    qy = (
        torch.arange(h, dtype=dtype, device=shift.device)[:, None]
        - (h - 1) / 2
        - shift[:, 1, None, None].to(dtype)
    )
    qx, qy = qx.expand(-1, h, w), qy.expand(-1, h, w)
    if displacement is not None:
        qx, qy = qx + displacement[:, 0].to(dtype), qy + displacement[:, 1].to(dtype)
    # Rows of inv were scaled by (2 / w, 2 / h): with align_corners=False pixel centre j sits
    # at (2j + 1) / w - 1, i.e. at 2 x / w for x = j - (w - 1) / 2.
    return torch.stack(
        [
            inv[:, 0, 0, None, None] * qx + inv[:, 0, 1, None, None] * qy,
            inv[:, 1, 0, None, None] * qx + inv[:, 1, 1, None, None] * qy,
        ],
        -1,
    )


def warp_images(
    images: torch.Tensor,
    *,
    angle: torch.Tensor,
    scale: torch.Tensor,
    shear: torch.Tensor,
    shift: torch.Tensor,
    displacement: torch.Tensor | None = None,
) -> torch.Tensor:
    """Warp each image of ``images`` (n, c, h, w) by explicit per-image parameters.

    ``angle`` (n,) degrees counter-clockwise, ``scale`` (n,) isotropic factor, ``shear`` (n,)
    shear factor h of ``[[1, h], [0, 1]]``, ``shift`` (n, 2) translation (x right, y down) in
    pixels, ``displacement`` (n, 2, h, w) elastic field in pixels (x, y) or None; see the
    module docstring for the exact map. Bilinear sampling, zeros outside the image. Returns a
    tensor of the same shape and dtype.

    >>> x = torch.zeros(1, 1, 3, 3)
    >>> x[0, 0, 1, 1] = 1.0
    >>> one = torch.ones(1)
    >>> y = warp_images(x, angle=0 * one, scale=one, shear=0 * one, shift=torch.tensor([[1.0, 0]]))
    >>> y[0, 0].nonzero().tolist()
    [[1, 2]]
    """
    images = _check_images(images)
    n, _, h, w = images.shape
    for name, value, shape in (
        ("angle", angle, (n,)),
        ("scale", scale, (n,)),
        ("shear", shear, (n,)),
        ("shift", shift, (n, 2)),
        ("displacement", displacement, (n, 2, h, w)),
    ):
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if not bool((scale > 0).all()):
        raise ValueError(f"scale must be > 0, got min {float(scale.min())}")
    work = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    grid = _sampling_grid(angle, scale, shear, shift, displacement, size=(h, w), dtype=work).to(
        images.device
    )
    out = F.grid_sample(
        images.to(work), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out.to(images.dtype)


def deform_images(
    images: torch.Tensor,
    *,
    seed: int,
    rotation: float = 30.0,
    scale: tuple[float, float] = (0.8, 1.2),
    shear: float = 0.3,
    translate: float = 0.1,
    elastic_alpha: float = 8.0,
    elastic_sigma: float = 3.0,
    chunk: int = 4096,
) -> torch.Tensor:
    """Apply to each image of ``images`` (n, c, h, w), float, a fixed random deformation.

    Image i gets an affine map with angle uniform in ±``rotation`` degrees, isotropic scale
    uniform in ``scale``, shear factor uniform in ±``shear`` and translation uniform in
    ±``translate`` of the image width (x) / height (y), composed with an elastic field
    (:func:`elastic_displacement` of uniform [-1, 1] noise, ``elastic_alpha`` and
    ``elastic_sigma`` in pixels); see the module docstring for the map and :func:`warp_images`
    for the sampling. Every channel of an image moves together.

    Randomness comes from ``torch.Generator().manual_seed(seed)`` only: the affine parameters
    of all n images are drawn up front and the elastic noise from a second stream seeded from
    the first, image after image, so image i's deformation depends on ``seed`` and i alone --
    not on ``chunk`` (images processed at a time, bounding memory) nor on later images.
    Returns a tensor of the same shape, dtype and device.

    >>> x = torch.rand(5, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    >>> y = deform_images(x, seed=3)
    >>> y.shape == x.shape, torch.equal(y, deform_images(x, seed=3, chunk=2))
    (True, True)
    """
    images = _check_images(images)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    rotation = _check_real("rotation", rotation, 0.0, 180.0)
    if not isinstance(scale, tuple | list) or len(scale) != 2:
        raise ValueError(f"scale must be a pair (low, high) with 0 < low <= high, got {scale!r}")
    lo = _check_real("scale[0]", scale[0], 0.0, low_open=True)
    hi = _check_real("scale[1]", scale[1], lo)
    shear = _check_real("shear", shear, 0.0)
    translate = _check_real("translate", translate, 0.0, 1.0)
    elastic_alpha = _check_real("elastic_alpha", elastic_alpha, 0.0)
    elastic_sigma = _check_real("elastic_sigma", elastic_sigma, 0.0, low_open=True)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")

    n, _, h, w = images.shape
    gen = torch.Generator().manual_seed(seed)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    u = torch.rand(n, 5, generator=gen, dtype=torch.float64) * 2 - 1  # row i: image i
    angle = rotation * u[:, 0]
    scales = lo + (hi - lo) * (u[:, 1] + 1) / 2
    shears = shear * u[:, 2]
    shift = translate * u[:, 3:] * torch.tensor([w, h], dtype=torch.float64)
    noise_gen = torch.Generator().manual_seed(noise_seed)

    out = torch.empty_like(images)
    for start in range(0, n, chunk):
        part = slice(start, min(start + chunk, n))
        displacement = None
        if elastic_alpha > 0:
            noise = torch.rand(part.stop - start, 2, h, w, generator=noise_gen) * 2 - 1
            displacement = elastic_displacement(noise, alpha=elastic_alpha, sigma=elastic_sigma)
        out[part] = warp_images(
            images[part],
            angle=angle[part],
            scale=scales[part],
            shear=shears[part],
            shift=shift[part],
            displacement=displacement,
        )
    return out
