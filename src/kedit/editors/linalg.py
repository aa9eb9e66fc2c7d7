"""The editors' pure math, in float64, with solves (LU / Cholesky) and never an explicit inverse.

Shapes: keys ``K`` are ``[d_key, n]`` (one column per request), residuals ``R`` are ``[d_out, n]``,
updates ``Δ`` are ``[d_out, d_key]`` (the ``[out, in]`` view of the edited matrix).
"""

from __future__ import annotations

import torch


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def rome_update(C: torch.Tensor, k: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Rank-one ROME update: ``Δ = r uᵀ / (uᵀ k)`` with ``u = C⁻¹ k``, so ``(W + Δ) k = W k + r``
    while inputs orthogonal to ``u`` in the C-metric are untouched. ``k`` [d_key], ``r`` [d_out]."""
    C, k, r = _f64(C), _f64(k), _f64(r)
    u = torch.linalg.solve(C, k)
    denom = torch.dot(u, k)
    if not torch.isfinite(denom) or denom.abs() < 1e-30:
        raise ValueError(f"ROME: degenerate key (kᵀC⁻¹k = {denom.item():.3g})")
    return torch.outer(r, u) / denom


def rome_sequential_update(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Rank-one ROME updates for the columns of ``K`` [d_key, n] / ``R`` [d_out, n] written one after
    another, each correcting for the earlier ones (``r_j - Δ k_j``): the sum of what :func:`rome_update`
    would give applied in order. ``C`` is factored once (Cholesky) for all keys instead of per key."""
    C, K, R = _f64(C), _f64(K), _f64(R)
    L, info = torch.linalg.cholesky_ex((C + C.T) / 2)
    Ucols = torch.cholesky_solve(K, L) if int(info) == 0 else torch.linalg.solve(C, K)  # C⁻¹K
    total = torch.zeros(R.shape[0], K.shape[0], dtype=torch.float64, device=K.device)
    for j in range(K.shape[1]):
        k, u = K[:, j], Ucols[:, j]
        denom = torch.dot(u, k)
        if not torch.isfinite(denom) or denom.abs() < 1e-30:
            raise ValueError(f"ROME: degenerate key #{j} (kᵀC⁻¹k = {denom.item():.3g})")
        total = total + torch.outer(R[:, j] - total @ k, u) / denom
    return total


def memit_update(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, lam: float,
                 C_prev: torch.Tensor | None = None) -> torch.Tensor:
    """MEMIT least squares: ``Δ = R Kᵀ (λC + C_prev + K Kᵀ)⁻¹`` (solved by Cholesky; the system is SPD)."""
    C, K, R = _f64(C), _f64(K), _f64(R)
    A = lam * C + K @ K.T
    if C_prev is not None:
        A = A + _f64(C_prev)
    A = (A + A.T) / 2
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        adj = torch.cholesky_solve(K, L)
    else:  # numerically semi-definite: fall back to LU
        adj = torch.linalg.solve(A, K)
    return R @ adj.T


def eig_threshold(eigvals: torch.Tensor, threshold: float, mode: str) -> float:
    """The eigenvalue cut: absolute, relative to the spectrum's mean or max, or ``energy``: the cut below
    which the eigenvalues sum to at most ``threshold`` of the trace (the share of the preserved keys'
    energy an update in the kept directions can touch). The last three are scale-free."""
    ev = eigvals.clamp_min(0)
    if mode == "absolute":
        return float(threshold)
    if mode == "relative_mean":
        return float(threshold * ev.mean())
    if mode == "relative_max":
        return float(threshold * ev.max())
    if mode == "energy":  # the smallest eigenvalues that together hold at most this share of the trace
        cum = torch.cumsum(ev.sort().values, 0)
        n = int((cum <= threshold * cum[-1]).sum())
        return float(ev.sort().values[n]) if n < ev.numel() else float("inf")
    raise ValueError(f"unknown null-space threshold mode {mode!r}")


def nullspace_basis(C: torch.Tensor, threshold: float, mode: str = "relative_mean") -> torch.Tensor:
    """Orthonormal basis U [d, r] of C's eigenvectors with eigenvalue below the cut (P = U Uᵀ)."""
    C = _f64(C)
    C = (C + C.T) / 2
    vals, vecs = torch.linalg.eigh(C)
    return vecs[:, vals < eig_threshold(vals, threshold, mode)].contiguous()


def nullspace_projector(C: torch.Tensor, threshold: float, mode: str = "relative_mean"
                        ) -> tuple[torch.Tensor, int]:
    """Projector onto the span of C's eigenvectors with eigenvalue below the cut, and its rank.

    Keys of preserved knowledge live (almost) in the span of the large eigenvalues, so ``P k0 ≈ 0``
    and an update ``Δ = X P`` leaves ``W k0`` unchanged."""
    C = _f64(C)
    C = (C + C.T) / 2
    vals, vecs = torch.linalg.eigh(C)
    cut = eig_threshold(vals, threshold, mode)
    mask = vals < cut
    U = vecs[:, mask]
    return U @ U.T, int(mask.sum())


def alphaedit_update(P: torch.Tensor, K: torch.Tensor, R: torch.Tensor, C_prev: torch.Tensor | None,
                     l2: float) -> torch.Tensor:
    """AlphaEdit (paper Eq. 14, reference code): ``X = solve(P(K Kᵀ + C_p) + l2·I, P K Rᵀ)``, ``Δ = Xᵀ``.

    ``X = P(...)/l2`` lies in the range of P, so ``Δ k0 = 0`` for every ``k0`` with ``P k0 = 0``; the
    ``C_p = Σ K_p K_pᵀ`` term keeps earlier batches' outputs (nearly) unchanged."""
    P, K, R = _f64(P), _f64(K), _f64(R)
    d = P.shape[0]
    M = K @ K.T
    if C_prev is not None:
        M = M + _f64(C_prev)
    A = P @ M + l2 * torch.eye(d, dtype=torch.float64, device=P.device)
    X = torch.linalg.solve(A, P @ K @ R.T)
    return X.T


def alphaedit_update_reduced(U: torch.Tensor, K: torch.Tensor, R: torch.Tensor, C_prev: torch.Tensor | None,
                             l2: float, C: torch.Tensor | None = None, lam: float = 0.0) -> torch.Tensor:
    """The same update as :func:`alphaedit_update`, solved inside the null space: ``X = U Y`` with
    ``(Uᵀ M U + l2·I) Y = Uᵀ K Rᵀ``, ``M = K Kᵀ + C_p``. Since ``X`` lies in range(P) = range(U) the
    two systems are equivalent; this one is r×r, symmetric positive definite (Cholesky) and cheaper.

    With ``lam > 0`` the preserved keys' second moment also enters as MEMIT's soft term, ``M += lam·C``:
    where C has no true null space (a flat spectrum keeps directions that still carry part of the
    general keys' energy), the update is steered to the kept directions that carry the least."""
    U, K, R = _f64(U), _f64(K), _f64(R)
    r = U.shape[1]
    if r == 0:
        return torch.zeros(R.shape[0], U.shape[0], dtype=torch.float64, device=U.device)
    full = r == U.shape[0]  # every direction kept: U is orthogonal and X solves the same system unrotated

    def rot(M: torch.Tensor) -> torch.Tensor:
        return M if full else U.T @ M @ U

    UK = K if full else U.T @ K  # [r, n]
    A = UK @ UK.T
    if C_prev is not None:
        A = A + rot(_f64(C_prev))
    if lam and C is not None:
        A = A + lam * rot(_f64(C))
    A = (A + A.T) / 2 + l2 * torch.eye(r, dtype=torch.float64, device=U.device)
    L = torch.linalg.cholesky(A)
    Y = torch.cholesky_solve(UK @ R.T, L)  # [r, d_out]
    return Y.T if full else (U @ Y).T


def output_change_share(delta: torch.Tensor, W: torch.Tensor, C: torch.Tensor) -> float:
    """``tr(Δ C Δᵀ) / tr(W C Wᵀ)``: the update's mean squared output on keys drawn from C, relative to
    the layer's own. An analytic proxy for the damage to general text (C = second moment of its keys);
    ``Δ`` and ``W`` are ``[d_out, d_key]``."""
    D, W, C = _f64(delta), _f64(W), _f64(C)
    return float(torch.einsum("ij,jk,ik->", D, C, D) / torch.einsum("ij,jk,ik->", W, C, W))
