"""Finite test problems shared by the objective and baseline tests."""

import numpy as np


def symmetric_matrix(n, top, rest_low, rest_high, seed):
    """Symmetric (n, n) matrix with the given top eigenvalues and the rest uniform in
    [rest_low, rest_high], in a random orthonormal basis."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    rest = rng.uniform(rest_low, rest_high, n - len(top))
    eig = np.concatenate([np.asarray(top, float), rest])
    return (q * eig) @ q.T
