"""Finite-difference grid baseline: the sparse eigensolver the neural method is compared with.

``H = -kinetic * Lap + V`` is discretised on the tensor grid of ``n`` nodes per axis
(``N = n^d`` unknowns, spacing ``h``) with the second-order 3-point stencil on every axis,

    H_h = kinetic * sum_k I ⊗ .. ⊗ D_k ⊗ .. ⊗ I + diag(V(x_j)),
    D = tridiag(-1, 2, -1) / h^2   (+ -1/h^2 in the corners on a periodic axis),

a Kronecker sum of 1-D matrices with at most ``(2d + 1) N`` nonzeros (fewer on a Dirichlet
boundary, whose outside neighbours are zero). Its ``L`` lowest eigenvalues, found by ARPACK
(``scipy.sparse.linalg.eigsh``), approximate the ``L`` lowest energies with error ``O(h^2)``.
The domain follows the problem: its box with a Dirichlet (interior nodes,
``h = (high - low) / (n + 1)``) or periodic (``h = (high - low) / n``) boundary; on ``R^d``
the box ``[-radius, radius]^d`` with a zero Dirichlet boundary, which adds a truncation error
that decays like the eigenfunctions at ``radius``.

The cost is the point: memory and time grow like ``n^d``. For the 10 lowest oscillator states
(radius 8) a 1e-3 error needs ``n ~ 160``: in 3-D 4 * 10^6 points and ~2 GB, in 4-D
6.5 * 10^8 points and ~350 GB (:func:`estimate_memory_bytes`). :func:`grid_baseline_sweep`
runs a list of grid sizes, each in a fresh process (to measure its peak memory and stop it at
a time limit), and records where the grid stops fitting.

scipy is an optional dependency (``pip install nestedlora-jax[bench]``); it is imported inside
the functions only.
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nestedlora_jax._checks import check_choice
from nestedlora_jax.problems import check_problem

__all__ = [
    "finite_difference_hamiltonian",
    "finite_difference_eigensolver",
    "grid_baseline_sweep",
    "grid_domain",
    "Grid",
    "estimate_memory_bytes",
    "METHODS",
]

# "auto" picks shift-invert for d <= 2 and Lanczos for d >= 3 (see `_choose_method`).
METHODS = ("auto", "lanczos", "shift-invert")

# Points per potential evaluation: 2^18 points x d float64 coordinates stay a few MB even for a
# 10^7-point grid, and the chunk is large enough that the per-call overhead does not matter.
_POTENTIAL_CHUNK = 2**18

# Peak resident memory of a fresh child (Python, numpy, scipy, JAX on CPU) on a tiny grid:
# measured 0.26-0.28 GB (0.18 GB after the imports, JAX's compilation and runtime the rest).
_BASE_RSS_BYTES = 0.3e9


# --------------------------------------------------------------------------- the grid


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    return int(value)


class Grid(NamedTuple):
    """The 1-D grid shared by every axis."""

    nodes: np.ndarray  # (n,) float64 coordinates
    h: float  # spacing
    periodic: bool  # periodic wrap-around (else a zero Dirichlet boundary outside the nodes)
    low: float  # the box [low, high] the nodes discretise
    high: float


def grid_domain(problem, num_points: int, *, radius: float | None = None) -> Grid:
    """The 1-D grid of every axis (a :class:`Grid`), float64.

    Box problems use ``problem.box``: periodic ones (``problem.periodic``) take ``n`` nodes
    ``low + h j`` with ``h = (high - low) / n`` (the node at ``high`` is the one at ``low``);
    the others (Dirichlet, e.g. ``InfiniteWell``) the ``n`` interior nodes ``low + h j``,
    ``j = 1..n``, ``h = (high - low) / (n + 1)``. Problems on ``R^d`` (``box`` is None) use the
    interior nodes of ``[-radius, radius]`` with a zero Dirichlet boundary.
    """
    check_problem(problem, "grid_domain")
    n = _check_int(num_points, "num_points (grid nodes per axis)", 3)
    box = problem.box
    periodic = bool(problem.periodic)
    if box is None:
        if periodic:
            raise ValueError(f"{type(problem).__name__} is periodic but has no box.")
        if radius is None:
            raise ValueError(
                f"{type(problem).__name__} lives on R^d (problem.box is None): pass radius=R to "
                "solve on the truncated box [-R, R]^d with a zero boundary (R where the wanted "
                "eigenfunctions have decayed, e.g. 8 for the harmonic oscillator's first states)."
            )
        if not (np.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a finite number > 0; got {radius!r}.")
        low, high = -float(radius), float(radius)
    else:
        if radius is not None:
            raise ValueError(
                f"{type(problem).__name__} has its own box {tuple(box)}; radius is only for "
                "problems on R^d (leave it None)."
            )
        low, high = float(box[0]), float(box[1])
    if periodic:
        h = (high - low) / n
        nodes = low + h * np.arange(n, dtype=np.float64)
    else:
        h = (high - low) / (n + 1)
        nodes = low + h * np.arange(1, n + 1, dtype=np.float64)
    return Grid(nodes, h, periodic, low, high)


def _grid_potential(problem, nodes: np.ndarray, chunk: int = _POTENTIAL_CHUNK) -> np.ndarray:
    """``V`` at every grid point, C order (last axis fastest), float64 ``(n^d,)``.

    The points of each chunk are generated from their flat indices inside the compiled
    function, so no ``(N, d)`` coordinate array is ever built beyond one chunk.
    """
    n, d = len(nodes), problem.dim
    N = n**d
    chunk = max(1, min(chunk, N))
    out = np.empty(N, np.float64)
    with jax.enable_x64(True):
        table = jnp.asarray(nodes, jnp.float64)
        strides = jnp.asarray([n ** (d - 1 - k) for k in range(d)], jnp.int64)

        @jax.jit
        def block(start):
            # The last chunk is padded by repeating the final point: one compiled shape only.
            flat = jnp.minimum(start + jnp.arange(chunk, dtype=jnp.int64), N - 1)
            x = table[(flat[:, None] // strides) % n]
            return jax.vmap(problem.potential)(x)

        for start in range(0, N, chunk):
            stop = min(start + chunk, N)
            out[start:stop] = np.asarray(block(np.int64(start)), np.float64)[: stop - start]
    if not np.all(np.isfinite(out)):
        bad = int(np.argmax(~np.isfinite(out)))
        point = nodes[np.array(np.unravel_index(bad, (n,) * d))]
        raise ValueError(
            f"{type(problem).__name__}.potential is not finite at the grid point {point}; "
            "choose a grid that avoids its singularities."
        )
    return out


def finite_difference_hamiltonian(problem, num_points: int, *, radius: float | None = None):
    """The finite-difference Hamiltonian on the ``num_points^dim`` grid (module docstring).

    Args:
      problem: a ``Problem`` (``dim``, ``potential``, ``box``, ``periodic``; see
        :func:`grid_domain` for the domain and boundary condition).
      num_points: nodes per axis ``n >= 3``.
      radius: half-width of the box for problems on ``R^d`` (required there, refused for box
        problems). A symmetric box with odd ``n`` has a node at the origin: take ``n`` even
        for potentials singular there (``Hydrogen`` clamps ``1/|x|`` to a finite but huge
        value).

    Returns:
      ``(H, h, nodes)``: ``H`` a ``scipy.sparse.csr_matrix`` ``(N, N)`` float64, ``N = n^d``,
      rows in C order of the grid index (last axis fastest); ``h`` the spacing; ``nodes``
      ``(n,)`` the coordinates along every axis (the grid is ``nodes^d``).
    """
    import scipy.sparse as sp

    nodes, h, periodic, _, _ = grid_domain(problem, num_points, radius=radius)
    n, d = len(nodes), problem.dim
    kinetic = float(problem.kinetic)
    V = _grid_potential(problem, nodes)

    # The constant diagonal of the Laplacian goes in with V, so the Kronecker terms only carry
    # the 2d off-diagonals: one diagonal merge instead of d + 1 overlapping ones.
    offsets = [-1, 1] + ([1 - n, n - 1] if periodic else [])  # distinct for n >= 3
    off = sp.diags(
        [np.full(n - abs(k), -kinetic / h**2) for k in offsets], offsets, shape=(n, n),
        format="csr",
    )
    H = None
    for k in range(d):
        term = sp.kron(
            sp.kron(sp.identity(n**k, format="csr"), off, format="csr"),
            sp.identity(n ** (d - 1 - k), format="csr"),
            format="csr",
        )
        H = term if H is None else H + term
        del term
    V += 2.0 * d * kinetic / h**2
    H = (H + sp.diags(V, format="csr")).tocsr()
    del V
    H.sort_indices()
    return H, h, nodes


# --------------------------------------------------------------------------- the eigensolver


def _choose_method(method: str, dim: int) -> str:
    check_choice("method", method, METHODS)
    if method != "auto":
        return method
    # Measured with L = 10 (harmonic oscillator, radius 8, one BLAS thread, solve time): in
    # 1-D and 2-D the sparse LU of a grid Laplacian has little fill (4 N log2 N nonzeros in 2-D
    # with the symmetric MMD ordering) and shift-invert converges in a few dozen solves, while
    # plain Lanczos needs restarts that grow with the spectral width 4 d / h^2: 1-D n = 2000
    # 0.01 s against 1.4 s, 2-D n = 200 1.7 s against 4.1 s. In 3-D the fill grows like N^(4/3)
    # (15 N^(4/3)): n = 40 takes 34 s and 1.4 GB against 3.3 s and 0.1 GB for Lanczos, so
    # Lanczos wins there and in every higher dimension.
    return "shift-invert" if dim <= 2 else "lanczos"


def _spectrum_lower_bound(problem, H, h: float, n: int) -> float:
    """A lower bound of ``H``'s spectrum: ``min V`` plus the lowest kinetic eigenvalue.

    ``H = kinetic * K + diag(V)`` with ``K >= d mu_1`` (``mu_1`` the lowest eigenvalue of the
    1-D matrix: 0 periodic, ``(4 / h^2) sin^2(pi / (2 (n + 1)))`` Dirichlet), so
    ``H >= min V + kinetic d mu_1``.
    """
    d = problem.dim
    kinetic = float(problem.kinetic)
    diag = H.diagonal() - 2.0 * d * kinetic / h**2  # = V
    if problem.periodic:
        mu1 = 0.0
    else:
        mu1 = (4 / h**2) * math.sin(math.pi / (2 * (n + 1))) ** 2
    return float(diag.min()) + kinetic * d * mu1


def finite_difference_eigensolver(
    problem,
    L: int,
    num_points: int,
    *,
    radius: float | None = None,
    tol: float = 0,
    method: str = "auto",
) -> dict:
    """The ``L`` lowest eigenvalues of the finite-difference Hamiltonian, against the exact ones.

    Args:
      problem: a ``Problem``; ``L`` the number of states (``1 <= L < n^d``).
      num_points: nodes per axis ``n >= 3``; ``radius``: see :func:`finite_difference_hamiltonian`.
      tol: ARPACK's relative tolerance on the eigenvalues (0: machine precision).
      method: ``"lanczos"`` (``eigsh(H, which="SA")``), ``"shift-invert"`` (``eigsh`` on
        ``(H - sigma)^-1`` with ``sigma`` below the spectrum, one sparse LU), or ``"auto"``:
        shift-invert for ``d <= 2``, Lanczos for ``d >= 3`` (faster there; see the comment in
        ``_choose_method``).

    Returns:
      A dict: ``energies`` ``(L,)`` ascending; ``exact`` ``(L,)`` (``problem.energies(L)``, or
      None where unknown); ``rel_error`` ``(L,)`` ``|E - E_exact| / |E_exact|``,
      ``mean_rel_error``, ``max_rel_error`` (None without exact energies); ``dim``,
      ``num_points_per_axis``, ``grid_points`` (``n^d``), ``h``, ``nnz``, ``method``,
      ``boundary`` (``"periodic"`` / ``"dirichlet"``), ``domain`` ``(low, high)`` of the grid's
      box, ``build_time_s`` (potential and matrix), ``solve_time_s`` (factorisation and
      ``eigsh``), ``wall_time_s``.
    """
    import scipy.sparse as sp
    import scipy.sparse.linalg as sla

    t_start = time.perf_counter()
    check_problem(problem, "finite_difference_eigensolver")
    L = _check_int(L, "L (the number of states)", 1)
    n = _check_int(num_points, "num_points (grid nodes per axis)", 3)
    d = int(problem.dim)
    N = n**d
    if L >= N:
        raise ValueError(
            f"L={L} must be smaller than the number of grid points n^d = {n}^{d} = {N} "
            "(ARPACK finds at most N - 1 eigenvalues); use a finer grid."
        )
    method = _choose_method(method, d)

    grid = grid_domain(problem, n, radius=radius)
    H, h, nodes = finite_difference_hamiltonian(problem, n, radius=radius)
    t_built = time.perf_counter()

    # A seeded Gaussian start vector: the iteration counts (so the timings) repeat from run to
    # run, and it overlaps every eigenvector. A smooth or constant start (e.g. ones, or the
    # ground-state guess exp(-V/4)) saved few iterations in measurements and is wrong for the
    # symmetric problems here: it has no odd component, so odd states are found only through
    # rounding (with v0 = ones, eigsh returned 8.73 instead of 6.89 for the 10th 3-D oscillator
    # state).
    v0 = np.random.default_rng(0).standard_normal(N)
    if method == "lanczos":
        values = sla.eigsh(H, k=L, which="SA", tol=tol, v0=v0, return_eigenvectors=False)
    else:
        lower = _spectrum_lower_bound(problem, H, h, n)
        # sigma just below a lower bound of the spectrum keeps H - sigma positive definite (the
        # LU needs no pivoting) and makes the L lowest eigenvalues the largest of
        # (H - sigma)^-1, without ARPACK having to sort out eigenvalues on both sides of sigma.
        sigma = lower - max(1e-3 * abs(lower), 1e-2)
        A = (H - sigma * sp.identity(N, format="csr")).tocsc()
        # MMD on A^T + A with symmetric mode and diagonal pivots: about half the fill and
        # factorisation time of SuperLU's default COLAMD on these symmetric matrices.
        lu = sla.splu(
            A, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True}
        )
        del A
        OPinv = sla.LinearOperator((N, N), matvec=lu.solve, dtype=np.float64)
        values = sla.eigsh(
            H, k=L, sigma=sigma, which="LM", OPinv=OPinv, tol=tol, v0=v0,
            return_eigenvectors=False,
        )
        del lu, OPinv
    energies = np.sort(np.asarray(values, np.float64))
    t_solved = time.perf_counter()

    exact = problem.known_energies(L)
    if exact is not None:
        rel = np.abs(energies - exact) / np.abs(exact)
        mean_rel, max_rel = float(np.mean(rel)), float(np.max(rel))
    else:
        rel = mean_rel = max_rel = None
    return {
        "energies": energies,
        "exact": exact,
        "rel_error": rel,
        "mean_rel_error": mean_rel,
        "max_rel_error": max_rel,
        "dim": d,
        "num_points_per_axis": n,
        "grid_points": N,
        "h": float(h),
        "nnz": int(H.nnz),
        "method": method,
        "boundary": "periodic" if grid.periodic else "dirichlet",
        "domain": (grid.low, grid.high),
        "build_time_s": t_built - t_start,
        "solve_time_s": t_solved - t_built,
        "wall_time_s": time.perf_counter() - t_start,
    }


# --------------------------------------------------------------------------- memory estimate


def estimate_memory_bytes(dim: int, num_points: int, L: int, *, method: str = "auto") -> float:
    """Estimated peak resident memory (bytes) of one :func:`finite_difference_eigensolver` run
    in a fresh process, on the ``num_points^dim`` grid; calibrated on the measured peaks below.

    ``N = n^d`` points, ``nnz = (2d + 1) N``; CSR at 12 bytes a nonzero (int32 indices while
    ``nnz < 2^31``, else 16) plus the row pointers. Building ``H`` peaks at about three CSR
    copies (the Kronecker terms, their running sum and its result). Lanczos then holds ``H``,
    ARPACK's ``ncv = max(2L + 1, 20)`` basis vectors and about 10 more ``N``-vectors (work
    space, start vector, products). Shift-invert adds a CSC copy of ``H - sigma`` and SuperLU's
    factors: fill about ``4 N log2 N`` nonzeros in 2-D (measured, symmetric MMD ordering),
    ``4 N`` in 1-D, ``15 N^(4/3)`` in 3-D (nested dissection's order ``N^(2 (d-1) / d)`` beyond),
    at 16 bytes a nonzero while factorising (its workspace is at least ``10 nnz`` entries) and
    11 once done. The arrays get a 15% margin, and the interpreter with numpy, scipy and JAX
    ``_BASE_RSS_BYTES``.

    Measured peak RSS (L = 10 unless given, estimate in brackets): 3-D Lanczos 80^3 0.43 GB
    (0.50), 60^3 with L = 30 0.39 GB (0.46); 4-D 24^4 0.39 GB (0.44); 2-D shift-invert 1000^2
    1.65 GB (1.91), 600^2 0.71 GB (0.84); 1-D 10^6 0.86 GB (0.94).
    """
    d = _check_int(dim, "dim", 1)
    n = _check_int(num_points, "num_points (grid nodes per axis)", 3)
    L = _check_int(L, "L (the number of states)", 1)
    method = _choose_method(method, d)
    N = float(n) ** d
    nnz = (2 * d + 1) * N
    wide = nnz >= 2**31
    csr = (16 if wide else 12) * nnz + (8 if wide else 4) * (N + 1)
    vectors = 8 * N
    ncv = min(N, max(2 * L + 1, 20))
    build = 3 * csr + 2 * vectors
    if method == "lanczos":
        solve = csr + (ncv + 10) * vectors
    else:
        if d == 1:
            fill = 4 * N
        elif d == 2:
            fill = 4 * N * math.log2(N)
        else:
            fill = 15 * N ** (2 * (d - 1) / d)
        factorise = csr + 16 * max(fill, 10 * nnz)
        solve = csr + max(factorise, 11 * fill + (ncv + 10) * vectors)
    return _BASE_RSS_BYTES + 1.15 * max(build, solve)


# --------------------------------------------------------------------------- the sweep


# Runs in the child: the payload holds only builtins and bytes, so it unpickles before the
# parent's sys.path is in place; the problem itself unpickles after.
_CHILD_CODE = (
    "import pickle, sys\n"
    "with open(sys.argv[1], 'rb') as f:\n"
    "    payload = pickle.load(f)\n"
    "sys.path[:0] = [p for p in payload['sys_path'] if p not in sys.path]\n"
    "from nestedlora_jax.grid_baseline import _child_main\n"
    "_child_main(payload, sys.argv[2])\n"
)


def _proc_status_bytes(pid: int | str, field: str) -> int | None:
    """A memory field (``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status`` in bytes; None where
    unavailable (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _peak_rss_self() -> int:
    peak = _proc_status_bytes("self", "VmHWM")
    if peak is None:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, kB else
    return int(peak)


def _child_main(payload: dict, out_path: str) -> None:
    """One sweep size in a fresh process: solve, then report the result and the peak RSS."""
    base = _proc_status_bytes("self", "VmRSS")
    try:
        problem = pickle.loads(payload["problem"])
        result = finite_difference_eigensolver(
            problem, payload["L"], payload["num_points"], radius=payload["radius"],
            tol=payload["tol"], method=payload["method"],
        )
        result.update(status="ok", reason=None)
    except MemoryError as e:
        result = {"status": "out of memory", "reason": f"MemoryError in the solver: {e}"}
    except Exception as e:  # reported to the parent as a failed size
        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    result["peak_rss_bytes"] = _peak_rss_self()
    result["base_rss_bytes"] = base
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    os.replace(tmp, out_path)  # the parent never reads a half-written result


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and anything it started
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()
    proc.wait()


def _run_in_child(payload: dict, time_limit_s, memory_limit_bytes, blas_threads=None) -> dict:
    """Run one size in a fresh interpreter; returns the child's result dict, or a status record
    when the child timed out, exceeded the memory limit, was killed or crashed."""
    with tempfile.TemporaryDirectory(prefix="grid_baseline_") as tmp:
        in_path, out_path = os.path.join(tmp, "in.pkl"), os.path.join(tmp, "out.pkl")
        log_path = os.path.join(tmp, "log.txt")
        with open(in_path, "wb") as f:
            pickle.dump(payload, f)
        env = dict(os.environ)
        # The child only evaluates V with JAX: on CPU it cannot take a GPU (and its memory)
        # from the parent, which may be training the neural method.
        env["JAX_PLATFORMS"] = "cpu"
        if blas_threads is not None:
            for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[name] = str(blas_threads)
        t0 = time.perf_counter()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_CODE, in_path, out_path],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
            killed = None
            max_rss, poll = 0, 0.02
            try:
                while proc.poll() is None:
                    elapsed = time.perf_counter() - t0
                    rss = _proc_status_bytes(proc.pid, "VmRSS") or 0
                    max_rss = max(max_rss, rss)
                    if time_limit_s is not None and elapsed > time_limit_s:
                        _kill(proc)
                        killed = {
                            "status": "timeout",
                            "reason": f"still running after {time_limit_s:g} s (killed)",
                        }
                    elif memory_limit_bytes is not None and rss > memory_limit_bytes:
                        _kill(proc)
                        killed = {
                            "status": "out of memory",
                            "reason": f"resident memory {rss / 1e9:.2f} GB exceeded the limit "
                            f"{memory_limit_bytes / 1e9:.2f} GB (killed)",
                        }
                    else:
                        # Short polls for the small sizes, at most 4 a second for the long ones.
                        time.sleep(poll)
                        poll = min(0.25, poll * 1.5)
            except BaseException:  # KeyboardInterrupt: do not leave the child running
                if proc.poll() is None:
                    _kill(proc)
                raise
        elapsed = time.perf_counter() - t0
        if killed is not None:
            killed["peak_rss_bytes"] = max_rss or None  # as last sampled: a lower bound
            killed["child_time_s"] = elapsed
            return killed
        if proc.returncode == 0 and os.path.exists(out_path):
            with open(out_path, "rb") as f:
                result = pickle.load(f)
            result["child_time_s"] = elapsed
            return result
        with open(log_path, "rb") as f:
            tail = f.read()[-2000:].decode(errors="replace").strip()
        rc = proc.returncode
        if rc is not None and rc < 0:
            sig = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
            if -rc == signal.SIGKILL:
                status = "out of memory"
                reason = (f"killed by SIGKILL after {elapsed:.1f} s (most likely the kernel's "
                          f"out-of-memory killer; last sampled RSS {max_rss / 1e9:.2f} GB)")
            else:
                status, reason = "failed", f"killed by {sig} after {elapsed:.1f} s"
        else:
            status = "failed"
            reason = f"exit status {rc}: " + (tail.splitlines()[-1] if tail else "no output")
        return {"status": status, "reason": reason, "peak_rss_bytes": max_rss or None,
                "child_time_s": elapsed, "log_tail": tail}


def _check_picklable(problem) -> bytes:
    cls = type(problem)
    if cls.__module__ == "__main__":
        raise ValueError(
            f"{cls.__name__} is defined in __main__: the sweep's child process cannot import it. "
            "Define the problem class in an importable module."
        )
    try:
        data = pickle.dumps(problem)
        pickle.loads(data)
    except Exception as e:
        raise ValueError(
            f"the problem {problem!r} must be picklable to run in a child process: {e}"
        ) from e
    return data


def grid_baseline_sweep(
    problem,
    L: int,
    sizes: Sequence[int],
    *,
    radius: float | None = None,
    time_limit_s: float | None = 600,
    memory_limit_bytes: float | None = 20e9,
    progress: Callable[[str], Any] | None = print,
    tol: float = 0,
    method: str = "auto",
    blas_threads: int | None = 1,
) -> list[dict]:
    """:func:`finite_difference_eigensolver` for each grid size, each in a fresh process.

    A fresh interpreter per size gives its own peak resident memory (``VmHWM``) and can be
    killed at ``time_limit_s`` (or when its resident memory passes ``memory_limit_bytes``)
    without harm to the caller. Before a size starts, :func:`estimate_memory_bytes` predicts
    its peak; a size over ``memory_limit_bytes`` is not run.

    Args:
      problem: a picklable ``Problem`` whose class is importable (frozen dataclasses are).
      L: number of states; sizes: nodes per axis, one run each, in the order given.
      radius, tol, method: passed to :func:`finite_difference_eigensolver`.
      time_limit_s, memory_limit_bytes: per size (the child's wall time, its interpreter's
        start of a few seconds included, and its resident memory); None for no limit.
      progress: called with one line per size (None: silent).
      blas_threads: BLAS / OpenMP threads of the child (None: inherit the environment). One by
        default: scipy's sparse products are single-threaded and the BLAS calls on these grids
        are small (ARPACK's vector operations, SuperLU's supernodes), while threads on busy
        cores spin (on a loaded 2-core machine a 40^3 Lanczos solve took 2.1 s with one
        thread, 14 s with two).

    Returns:
      One dict per size with ``status``, ``reason`` (None when ok), ``num_points_per_axis``,
      ``grid_points``, ``dim``, ``estimated_memory_bytes``, and:

      * ``"ok"``: the eigensolver's dict plus ``peak_rss_bytes`` (the child's high-water mark,
        interpreter included), ``base_rss_bytes`` (its resident memory before solving),
        ``child_time_s`` (wall time of the process, interpreter start included) and
        ``blas_threads``;
      * ``"does not fit"``: the estimate exceeds ``memory_limit_bytes`` (not run);
      * ``"timeout"``: killed at ``time_limit_s``;
      * ``"out of memory"``: ``MemoryError``, killed by the OS (SIGKILL), or past
        ``memory_limit_bytes``;
      * ``"failed"``: any other error (``reason`` says which).

      After ``"does not fit"``, ``"timeout"`` or ``"out of memory"``, every size at least as
      large is not run and gets the same status.
    """
    check_problem(problem, "grid_baseline_sweep")
    L = _check_int(L, "L (the number of states)", 1)
    d = int(problem.dim)
    if isinstance(sizes, (int, np.integer)) or len(sizes) == 0:
        raise ValueError(f"sizes must be a non-empty sequence of nodes per axis; got {sizes!r}.")
    sizes = [_check_int(n, "each size (grid nodes per axis)", 3) for n in sizes]
    for n in sizes:
        if L >= n**d:
            raise ValueError(
                f"L={L} must be smaller than the grid's n^d points; size {n} has {n**d}."
            )
    grid_domain(problem, sizes[0], radius=radius)  # domain errors here, not in every child
    _choose_method(method, d)
    for name, limit in (("time_limit_s", time_limit_s), ("memory_limit_bytes", memory_limit_bytes)):
        if limit is not None and not limit > 0:
            raise ValueError(f"{name} must be > 0 or None; got {limit!r}.")
    if blas_threads is not None:
        blas_threads = _check_int(blas_threads, "blas_threads", 1)
    data = _check_picklable(problem)
    say = progress if progress is not None else (lambda _: None)

    results, blocked = [], None  # blocked: (size, status) of the smallest size that stopped
    for n in sizes:
        N = n**d
        estimate = estimate_memory_bytes(d, n, L, method=method)
        record = {"num_points_per_axis": n, "grid_points": N, "dim": d,
                  "estimated_memory_bytes": estimate}
        label = f"{type(problem).__name__} d={d} n={n} ({N:.3g} points)"
        if blocked is not None and n >= blocked[0]:
            record.update(status=blocked[1],
                          reason=f"not run: size {blocked[0]} was already '{blocked[1]}'")
        elif memory_limit_bytes is not None and estimate > memory_limit_bytes:
            record.update(status="does not fit",
                          reason=f"estimated {estimate / 1e9:.3g} GB > limit "
                                 f"{memory_limit_bytes / 1e9:.3g} GB")
        else:
            payload = {"sys_path": list(sys.path), "problem": data, "L": L, "num_points": n,
                       "radius": radius, "tol": tol, "method": method}
            record.update(_run_in_child(payload, time_limit_s, memory_limit_bytes, blas_threads))
            record["blas_threads"] = blas_threads
            record["estimated_memory_bytes"] = estimate
        status = record["status"]
        if status in ("does not fit", "timeout", "out of memory"):
            if blocked is None or n < blocked[0]:
                blocked = (n, status)
        if status == "ok":
            err = record["mean_rel_error"]
            say(f"{label}: ok in {record['wall_time_s']:.3g} s (build "
                f"{record['build_time_s']:.2g} s, solve {record['solve_time_s']:.3g} s), peak "
                f"{record['peak_rss_bytes'] / 1e9:.3g} GB (estimate {estimate / 1e9:.3g} GB)"
                + ("" if err is None else f", mean rel. error {err:.3g}"))
        else:
            say(f"{label}: {status}: {record['reason']}")
        results.append(record)
    return results
