"""Small symmetric linear algebra on the device, with no read of a tensor value (for the
``solver = "device"`` paths of IMTL-G, IMTL, ConFIG and Aligned-MTL).

On CUDA ``torch.linalg.eigh`` / ``svd`` / ``pinv`` wait for the device (they read LAPACK's
error flag) and ``lstsq`` has only a full-rank driver, while these methods need a
minimum-norm solve that holds for a singular matrix (identical gradients) or the
eigenvectors themselves. So the K x K (K <= ~10) symmetric matrix is diagonalised here by
Jacobi rotations, each a few tensor ops, with a fixed number of sweeps and no branch on a
value; the pseudo-inverse then treats eigenvalues below a relative cutoff as 0 by a mask.

Parallel (round-robin) cyclic Jacobi: the K indices (padded to an even n with a row and
column of zeros, which every rotation leaves untouched) are split into n/2 disjoint pairs;
one rotation per pair zeroes the pair's off-diagonal entries, all at once (one orthogonal
n x n matrix J, A <- J^T A J). n - 1 rounds of the circle schedule visit every pair once:
a sweep. Like the cyclic method, it converges quadratically once the off-diagonal part is
small; a few sweeps of that reach float64 rounding for these sizes (6 at K <= 10: the
tests measure it). At convergence a rotation's angle is 0 (exactly, when the pair's entry
is 0), so extra sweeps change nothing: the count is a fixed budget, never a test.

Cost per round: about 18 small tensor ops (one gather of the pairs' entries, about 10
elementwise ops for the rotations, one scatter building J, three n x n matrix products); a
sweep is n - 1 rounds, so the default 8 sweeps are 72 rounds at K = 10 (about 1300 tiny
kernels), 24 at K = 3 or 4.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from pydantic import Field
from torch import Tensor

from mtlkit.step_context import to_device

from ._common import SolverParams

DEFAULT_SWEEPS = 8
EPS64 = float(torch.finfo(torch.float64).eps)
TINY = float(torch.finfo(torch.float64).tiny)


class JacobiSolverParams(SolverParams):
    """Params of a method whose device solver diagonalises the K x K matrix (``sym_eig``)."""

    sweeps: int = Field(DEFAULT_SWEEPS, ge=1, le=50, description="solver = device: Jacobi sweeps of the K x K "
                        "eigendecomposition (each K - 1 rounds, K rounded up to even); 6 reach float64 rounding "
                        "for K <= 10, the default leaves slack")


def circle_schedule(n: int) -> list[list[tuple[int, int]]]:
    """n - 1 rounds of n / 2 disjoint pairs of 0..n-1 (n even) covering every pair once."""
    rounds = []
    for r in range(n - 1):
        pairs = [(r, n - 1)] + [((r + i) % (n - 1), (r - i) % (n - 1)) for i in range(1, n // 2)]
        rounds.append(pairs)
    return rounds


@lru_cache(maxsize=64)
def _indices(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per round: flat indices of (a_pp, a_qq, a_pq) of every pair (gathered), and of J's
    entries (pp, qq, pq, qp) (scattered), on ``device`` (copied once per n and device)."""
    gather, scatter = [], []
    for pairs in circle_schedule(n):
        p = [a for a, _ in pairs]
        q = [b for _, b in pairs]
        pp = [i * n + i for i in p]
        qq = [j * n + j for j in q]
        pq = [i * n + j for i, j in zip(p, q)]
        qp = [j * n + i for i, j in zip(p, q)]
        gather.append(pp + qq + pq)
        scatter.append(pp + qq + pq + qp)
    return to_device(gather, device, torch.long), to_device(scatter, device, torch.long)


def sym_eig(a: Tensor, sweeps: int = DEFAULT_SWEEPS) -> tuple[Tensor, Tensor]:
    """Eigenvalues (unsorted) and eigenvectors (columns) of the symmetric K x K float64
    matrix ``a``: a = V diag(lam) V^T, with V orthogonal, by ``sweeps`` Jacobi sweeps."""
    k = a.shape[0]
    a = (a + a.T) * 0.5
    n = k + k % 2
    if n != k:  # an index that pairs with the padding is left alone in that round
        a = torch.nn.functional.pad(a, (0, 1, 0, 1))
    v = torch.eye(n, dtype=a.dtype, device=a.device)
    if n < 2:
        return a.diagonal().clone(), v
    h = n // 2
    gather, scatter = _indices(n, a.device)
    zeros = torch.zeros(n * n, dtype=a.dtype, device=a.device)
    for _ in range(sweeps):
        for r in range(n - 1):
            ent = a.reshape(-1)[gather[r]]
            app, aqq, apq = ent[:h], ent[h:2 * h], ent[2 * h:]
            # t = tan of the smaller angle that zeroes a_pq (GVL's sym.schur2, multiplied
            # out): t = 2 a_pq sgn(d) / (|d| + hypot(d, 2 a_pq)) = 2 a_pq / (d + sgn(d) hypot),
            # d = a_qq - a_pp; a_pq = 0 gives t = 0, no rotation (TINY: never 0 / 0)
            d = aqq - app
            two = 2.0 * apq
            t = two / (d + torch.copysign(torch.hypot(d, two) + TINY, d))
            c = (t * t + 1.0).rsqrt()
            s = t * c
            j = zeros.index_put((scatter[r],), torch.cat([c, c, s, -s])).view(n, n)
            a = j.T @ a @ j
            v = v @ j
        a = (a + a.T) * 0.5  # keep it symmetric against the products' rounding
    return a.diagonal()[:k].clone(), v[:k, :k]


def range_mask(lam: Tensor, rcond: float | Tensor) -> Tensor:
    """The eigenvalues kept as nonzero: |lam| > rcond * max |lam| (none when all are 0)."""
    mag = lam.abs()
    return mag > rcond * mag.max()


def pinv_solve(a: Tensor, b: Tensor, sweeps: int = DEFAULT_SWEEPS, rcond: float | Tensor | None = None,
               refine: int = 1) -> Tensor:
    """The minimum-norm least-squares solution of a x = b (a symmetric K x K, float64): the
    pseudo-inverse with eigenvalues |lam| <= rcond * max |lam| treated as 0 (rcond default
    K * eps, LAPACK gelsd's ``rcond=None``). ``refine`` steps of iterative refinement
    (x += a^+ (b - a x)) take the residual from about cond * eps down to the
    rounding of the matrix products."""
    k = a.shape[0]
    lam, v = sym_eig(a, sweeps)
    keep = range_mask(lam, k * EPS64 if rcond is None else rcond)
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
    x = v @ (inv * (v.T @ b))
    for _ in range(refine):
        x = x + v @ (inv * (v.T @ (b - a @ x)))
    return x
