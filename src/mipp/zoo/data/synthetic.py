"""Synthetic data: an easy classification task and Gaussian pairs with closed-form MI (nats)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------

_TASK_SEED = 20240601  # fixes the class means of make_separable, independent of ``seed``


def make_separable(
    n: int, *, num_classes: int = 10, dim: int = 32, seed: int = 0, margin: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian-cluster classification task: x float32 (n, dim), y int64 (n,).

    Class means are ``margin`` times random unit vectors, fixed by ``(num_classes, dim)``
    alone, so calls with different ``seed`` draw fresh samples of the same task; samples are
    mean + N(0, I). With the default margin the classes are nearly linearly separable (a small
    MLP reaches >95% accuracy in seconds). Classes are balanced up to one sample.
    """
    for label, value, low in (("n", n, 1), ("num_classes", num_classes, 2), ("dim", dim, 1)):
        if value < low:
            raise ValueError(f"{label} must be >= {low}, got {value}")
    means_gen = torch.Generator().manual_seed(_TASK_SEED + 1000 * num_classes + dim)
    means = torch.randn(num_classes, dim, generator=means_gen, dtype=torch.float64)
    means = margin * means / means.norm(dim=1, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=gen)]
    x = means[y] + torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return x.float(), y


@dataclass(frozen=True)
class GaussianPair:
    """Samples of jointly Gaussian (X, Y) and their exact mutual information.

    ``x`` (n, dim_x) and ``y`` (n, dim_y) float64; ``mi`` in nats; ``cov`` the joint
    covariance (dim_x + dim_y, dim_x + dim_y) float64, X's coordinates first.
    """

    x: torch.Tensor
    y: torch.Tensor
    mi: float
    cov: torch.Tensor


def gaussian_pair(n: int, *, dim_x: int, dim_y: int, rho: float, seed: int = 0) -> GaussianPair:
    """Draw ``y_j = rho x_j + sqrt(1 - rho^2) e_j`` for ``j < min(dim_x, dim_y)``, other ``y_j``
    pure noise, with x, e ~ N(0, I). Exact MI = -min(dim_x, dim_y) / 2 * log(1 - rho^2) nats.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if dim_x < 1 or dim_y < 1:
        raise ValueError(f"dim_x and dim_y must be >= 1, got dim_x={dim_x}, dim_y={dim_y}")
    if not abs(rho) < 1:
        raise ValueError(f"rho must satisfy |rho| < 1, got {rho}")
    k = min(dim_x, dim_y)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim_x, generator=gen, dtype=torch.float64)
    y = torch.randn(n, dim_y, generator=gen, dtype=torch.float64)
    y[:, :k] = rho * x[:, :k] + math.sqrt(1 - rho**2) * y[:, :k]
    cov = torch.eye(dim_x + dim_y, dtype=torch.float64)
    j = torch.arange(k)
    cov[j, dim_x + j] = cov[dim_x + j, j] = rho
    mi = -k / 2 * math.log1p(-(rho**2)) + 0.0  # + 0.0 turns -0.0 into 0.0
    return GaussianPair(x=x, y=y, mi=mi, cov=cov)


def gaussian_mi(cov: torch.Tensor | np.ndarray, dim_x: int) -> float:
    """I(X; Y) = 1/2 log(det S_xx det S_yy / det S) in nats, for jointly Gaussian (X, Y) with
    covariance ``cov`` (d, d) whose first ``dim_x`` coordinates are X."""
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square matrix, got shape {tuple(cov.shape)}")
    if not 1 <= dim_x < cov.shape[0]:
        raise ValueError(f"dim_x must be in 1..{cov.shape[0] - 1}, got {dim_x}")
    logdets = []
    for block in (cov, cov[:dim_x, :dim_x], cov[dim_x:, dim_x:]):
        sign, logdet = torch.linalg.slogdet(block)
        if sign <= 0:
            raise ValueError("cov is not positive definite")
        logdets.append(float(logdet))
    return 0.5 * (logdets[1] + logdets[2] - logdets[0])


def sample_gaussian(cov: torch.Tensor | np.ndarray, n: int, *, seed: int) -> torch.Tensor:
    """n samples (n, d) float64 of N(0, cov), via the Cholesky factor of ``cov`` (d, d)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cov = torch.as_tensor(cov, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise ValueError("cov is not positive definite")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, cov.shape[0], generator=gen, dtype=torch.float64) @ chol.T
