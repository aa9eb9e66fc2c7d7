"""The editors' closed forms against direct computations."""

import pytest
import torch

from kedit.editors.linalg import (
    alphaedit_update,
    eig_threshold,
    memit_update,
    nullspace_projector,
    rome_sequential_update,
    rome_update,
)


def _spd(d: int, n: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return X.T @ X / n


def test_rome_update_hits_target_and_is_rank_one():
    C = _spd(16)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 16, generator=g, dtype=torch.float64)
    k, v = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    D = rome_update(C, k, v - W @ k)
    assert torch.allclose((W + D) @ k, v, atol=1e-9)
    assert torch.linalg.matrix_rank(D) == 1
    # keys C-orthogonal to k (uᵀx = 0 with u = C⁻¹k) are untouched
    x = torch.randn(16, generator=g, dtype=torch.float64)
    u = torch.linalg.solve(C, k)
    x = x - u * (u @ x) / (u @ u)
    assert torch.allclose(D @ x, torch.zeros(8, dtype=torch.float64), atol=1e-9)


def test_rome_sequential_update_equals_rank_one_updates_applied_in_order():
    C = _spd(16)
    g = torch.Generator().manual_seed(4)
    W = torch.randn(8, 16, generator=g, dtype=torch.float64)
    K, V = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    total = rome_sequential_update(C, K, V - W @ K)
    direct, Wj = torch.zeros_like(W), W.clone()
    for j in range(3):
        D = rome_update(C, K[:, j], V[:, j] - Wj @ K[:, j])
        direct, Wj = direct + D, Wj + D
    assert torch.allclose(total, direct, atol=1e-9)
    assert torch.allclose((W + total) @ K[:, 2], V[:, 2], atol=1e-9)  # the last write holds exactly
    assert torch.linalg.matrix_rank(total) == 3


def test_memit_update_matches_normal_equations():
    C = _spd(12)
    g = torch.Generator().manual_seed(2)
    K, R = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(6, 12 // 2, generator=g)[:, :5]
    D = memit_update(C, K, R, lam=3.0)
    direct = R.double() @ K.T @ torch.linalg.inv(3.0 * C + K @ K.T)
    assert torch.allclose(D, direct, atol=1e-10)
    # with λ -> 0 and n < d the keys get exactly their residual
    D0 = memit_update(C, K, R, lam=1e-9)
    assert torch.allclose(D0 @ K, R.double(), atol=1e-5)


def test_nullspace_projector_relative_threshold():
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    ev = torch.tensor([100.0, 50, 20, 10, 5, 1e-3, 1e-4, 1e-5, 1e-6, 0.0], dtype=torch.float64)
    C = U @ torch.diag(ev) @ U.T
    P, rank = nullspace_projector(C, 1e-2, "relative_mean")  # cut = 0.01 * mean = 0.186
    assert rank == 5
    assert torch.allclose(P @ P, P, atol=1e-10) and torch.allclose(P, P.T, atol=1e-12)
    assert torch.allclose(P @ U[:, :5], torch.zeros(10, 5, dtype=torch.float64), atol=1e-10)
    # scale-free: multiplying C does not change the relative projector
    P2, rank2 = nullspace_projector(1000 * C, 1e-2, "relative_mean")
    assert rank2 == rank and torch.allclose(P, P2, atol=1e-8)
    assert nullspace_projector(C, 2e-2, "absolute")[1] == 5
    assert eig_threshold(ev, 0.5, "relative_max") == pytest.approx(50.0)
    with pytest.raises(ValueError):
        eig_threshold(ev, 0.5, "nope")


def test_alphaedit_update_preserves_subspace_and_previous_keys():
    g = torch.Generator().manual_seed(4)
    d = 24
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    keep = basis[:, :12]  # preserved knowledge lives here
    K0 = keep @ torch.randn(12, 500, generator=g, dtype=torch.float64)
    C = K0 @ K0.T / 500
    P, rank = nullspace_projector(C, 1e-6, "relative_mean")
    assert rank == 12
    K1, R1 = torch.randn(d, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    D1 = alphaedit_update(P, K1, R1, None, l2=1e-3)
    assert (D1 @ K0).abs().max() < 1e-8 * K0.abs().max()
    assert torch.allclose(D1 @ K1, R1, atol=1e-2)  # the edit itself lands
    # a later batch with the earlier keys accumulated leaves their outputs (nearly) unchanged
    K2, R2 = torch.randn(d, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    D2 = alphaedit_update(P, K2, R2, K1 @ K1.T, l2=1e-3)
    D2_forgetful = alphaedit_update(P, K2, R2, None, l2=1e-3)
    assert (D2 @ K1).norm() < 0.02 * (D2_forgetful @ K1).norm()
    assert torch.allclose(D2 @ K2, R2, atol=5e-2)
    # matches the paper's closed form Δ = R K1ᵀ P (P (Kp Kpᵀ + K1 K1ᵀ) + l2 I)⁻ᵀ... via a direct solve
    A = P @ (K2 @ K2.T + K1 @ K1.T) + 1e-3 * torch.eye(d, dtype=torch.float64)
    assert torch.allclose(D2, (torch.linalg.inv(A) @ P @ K2 @ R2.T).T, atol=1e-6)


def test_reduced_alphaedit_solve_equals_the_reference_form():
    from kedit.editors.linalg import alphaedit_update_reduced, nullspace_basis

    C = _spd(20, n=12, seed=5)  # rank 12 < 20: a real null space
    U = nullspace_basis(C, 1e-3, "relative_mean")
    P, rank = nullspace_projector(C, 1e-3, "relative_mean")
    assert U.shape[1] == rank > 0 and torch.allclose(U @ U.T, P, atol=1e-10)
    g = torch.Generator().manual_seed(6)
    K, R = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    Cp = _spd(20, n=5, seed=7)
    for prev in (None, Cp):
        assert torch.allclose(alphaedit_update_reduced(U, K, R, prev, 0.5), alphaedit_update(P, K, R, prev, 0.5),
                              atol=1e-9)


def test_energy_threshold_keeps_the_smallest_eigenvalues_within_the_share():
    ev = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.9], dtype=torch.float64)  # trace 1.0
    cut = eig_threshold(ev, 0.06, "energy")  # 0.01 + 0.02 + 0.03 = 0.06 <= 0.06; adding 0.04 exceeds
    assert int((ev < cut).sum()) == 3
    assert int((ev < eig_threshold(ev, 0.005, "energy")).sum()) == 0
    assert int((ev < eig_threshold(ev, 1.0, "energy")).sum()) == 5
    g = torch.Generator().manual_seed(8)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    assert nullspace_projector(7 * Q @ torch.diag(ev) @ Q.T, 0.06, "energy")[1] == 3  # scale-free


def test_reduced_alphaedit_soft_mom2_term_matches_a_direct_solve():
    """With the λ·C term the reduced solve is argmin ‖Y'Uᵀ K - R‖² + ‖Y'Uᵀ K_p‖² + λ‖Y'Uᵀ C^½‖² + l2‖Y‖²."""
    from kedit.editors.linalg import alphaedit_update_reduced

    d, lam, l2 = 16, 3.0, 0.2
    C, Cp = _spd(d, n=40, seed=9), _spd(d, n=6, seed=10)
    g = torch.Generator().manual_seed(11)
    U, _ = torch.linalg.qr(torch.randn(d, 9, generator=g, dtype=torch.float64))  # any orthonormal basis
    K, R = torch.randn(d, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    D = alphaedit_update_reduced(U, K, R, Cp, l2, C, lam)
    A = U.T @ (K @ K.T + Cp + lam * C) @ U + l2 * torch.eye(9, dtype=torch.float64)
    assert torch.allclose(D, (U @ torch.linalg.solve(A, U.T @ K @ R.T)).T, atol=1e-10)
    # with every direction kept it is MEMIT's least squares plus the ridge, and the term shrinks the
    # update's energy on the preserved keys' distribution
    full = torch.eye(d, dtype=torch.float64)
    D_full = alphaedit_update_reduced(full, K, R, None, l2, C, lam)
    assert torch.allclose(D_full, R @ torch.linalg.solve(K @ K.T + lam * C + l2 * full, K).T, atol=1e-10)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))  # any full orthonormal basis
    assert torch.allclose(alphaedit_update_reduced(Q, K, R, Cp, l2, C, lam),
                          torch.linalg.solve(K @ K.T + Cp + lam * C + l2 * full, K @ R.T).T, atol=1e-10)
    D_plain = alphaedit_update_reduced(full, K, R, None, l2)
    assert torch.trace(D_full @ C @ D_full.T) < torch.trace(D_plain @ C @ D_plain.T)


def test_output_change_share_is_the_mean_squared_output_ratio():
    from kedit.editors.linalg import output_change_share

    g = torch.Generator().manual_seed(12)
    X = torch.randn(300, 8, generator=g, dtype=torch.float64)  # keys, one per row
    C = X.T @ X / 300
    W, D = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    direct = float(((X @ D.T) ** 2).sum(1).mean() / ((X @ W.T) ** 2).sum(1).mean())
    assert output_change_share(D, W, C) == pytest.approx(direct, rel=1e-10)
    assert output_change_share(0 * D, W, C) == 0.0
