"""Quadrature rules shared by the tests."""

import numpy as np


def angular_rule(dim: int, n_phi: int, n_theta: int | None = None):
    """Directions ``(K, dim)`` and weights ``(K,)`` on the unit circle (dim 2: ``n_phi``
    equispaced angles, the trapezoid rule, exact for trigonometric polynomials of degree
    < ``n_phi``) or sphere (dim 3: Gauss-Legendre with ``n_theta`` nodes in ``cos(theta)``
    times that trapezoid in ``phi``)."""
    phi = 2 * np.pi * np.arange(n_phi) / n_phi
    w_phi = np.full(n_phi, 2 * np.pi / n_phi)
    if dim == 2:
        return np.stack([np.cos(phi), np.sin(phi)], -1), w_phi
    ct, wct = np.polynomial.legendre.leggauss(n_theta)
    CT, PHI = np.meshgrid(ct, phi, indexing="ij")
    ST = np.sqrt(1 - CT**2)
    u = np.stack([ST * np.cos(PHI), ST * np.sin(PHI), CT], -1).reshape(-1, 3)
    return u, np.outer(wct, w_phi).ravel()
