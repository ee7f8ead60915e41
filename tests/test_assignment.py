"""Assignment solvers: planted permutations recovered, the auction within its documented bound of
the exact optimum, the sparse solver between the identity and the optimum (and at it with every
column a candidate), worker processes giving the in-process permutations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from pipeline.assignment import (
    SOLVERS,
    SolverPool,
    SolverSettings,
    gap_to_optimum,
    guaranteed_gap,
    matched_sum,
    resolve_workers,
    solve,
    solve_many,
)
from pipeline.registry import UnknownChoiceError


@pytest.fixture(scope="module")
def pool():
    """Two worker processes that solve every width (no in-process shortcut for small matrices)."""
    with SolverPool(2, min_width=0) as p:
        yield p


def _planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities of random rows to the same rows shuffled, and the permutation that undoes it."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 64, generator=g)
    shuffle = torch.randperm(n, generator=g)
    # Column j is row shuffle[j]: row i is matched to the column holding it.
    return a @ a[shuffle].T, torch.argsort(shuffle)


def _random(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, n, generator=torch.Generator().manual_seed(seed))


def _is_permutation(perm: torch.Tensor, n: int) -> bool:
    return perm.dtype == torch.long and sorted(perm.tolist()) == list(range(n))


def test_exact_sparse_and_auction_are_registered():
    assert {"exact", "sparse", "auction"} <= set(SOLVERS.names())


@pytest.mark.parametrize("solver", SOLVERS.names())
@pytest.mark.parametrize("n", [1, 2, 7, 50, 300])
def test_every_solver_recovers_a_planted_permutation(solver, n):
    sim, planted = _planted(n, seed=n)
    found = solve(sim, solver)
    assert torch.equal(found.perm, planted)
    assert found.objective == pytest.approx(matched_sum(sim, planted))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [5, 40, 200])
@pytest.mark.parametrize("tolerance", [1e-2, 1e-4])
def test_auction_objective_is_within_its_bound_of_the_optimum(seed, n, tolerance):
    sim = _random(n, seed)
    gap = gap_to_optimum(sim, "auction", SolverSettings(tolerance=tolerance))
    assert gap["bound"] == pytest.approx(n * tolerance * float(sim.max() - sim.min()))
    assert -1e-9 <= gap["gap"] <= gap["bound"] + 1e-9
    assert _is_permutation(solve(sim, "auction", SolverSettings(tolerance=tolerance)).perm, n)


def test_auction_is_exact_on_integer_similarities_below_the_resolution():
    # n * eps < 1 on integer values: eps-optimal is optimal.
    n = 60
    sim = torch.randint(0, 6, (n, n), generator=torch.Generator().manual_seed(3)).double()
    tol = 0.5 / (n * float(sim.max() - sim.min()))
    assert solve(sim, "auction", SolverSettings(tolerance=tol)).objective == solve(sim, "exact").objective


@pytest.mark.parametrize("solver", SOLVERS.names())
def test_ties_still_give_a_permutation(solver):
    sim = torch.ones(9, 9)
    sim[:, 4] = 2.0  # every row's favourite column is the same one
    found = solve(sim, solver)
    assert _is_permutation(found.perm, 9)
    assert found.objective == pytest.approx(10.0)


def test_exact_is_scipy_on_the_given_dtype():
    sim = _random(30, 9)
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    perm = np.empty_like(cols)
    perm[rows] = cols
    assert torch.equal(solve(sim, "exact").perm, torch.as_tensor(perm))


def test_the_exact_gap_is_zero_and_identity_objective_is_the_trace():
    sim = _random(25, 1)
    assert gap_to_optimum(sim, "exact")["gap"] == pytest.approx(0.0, abs=1e-9)
    assert solve(sim, "exact").identity_objective == pytest.approx(float(sim.trace()))


def test_auction_takes_a_square_matrix():
    with pytest.raises(ValueError, match=r"square matrix, got \(3, 4\)"):
        solve(torch.zeros(3, 4), "auction")


@pytest.mark.parametrize("tolerance", [0.0, 1e-12, 1.0])
def test_auction_tolerance_out_of_range_is_refused(tolerance):
    with pytest.raises(ValueError, match=r"auction tolerance .* must be in \[1e-09, 1\)"):
        solve(_random(4, 0), "auction", SolverSettings(tolerance=tolerance))


def test_unknown_solver_lists_choices():
    with pytest.raises(
        UnknownChoiceError, match="unknown assignment solver 'greedy'; valid choices: auction, exact, sparse"
    ):
        solve(torch.zeros(2, 2), "greedy")


def test_worker_processes_give_the_in_process_permutations(pool):
    sims = [_random(n, seed) for seed, n in enumerate([3, 40, 17, 64, 5, 33])]
    serial = [a.perm for a in solve_many(sims)]
    parallel = list(solve_many(sims, pool=pool))
    assert all(torch.equal(s, p.perm) for s, p in zip(serial, parallel, strict=True))
    assert [p.objective for p in parallel] == [solve(s).objective for s in sims]


def test_pending_matrices_are_bounded_by_the_workers(pool):
    drawn: list[int] = []

    def sims():
        for seed in range(8):
            drawn.append(seed)
            yield _random(20, seed)

    results = solve_many(sims(), pool=pool)
    next(results)
    assert len(drawn) <= pool.workers
    assert len(list(results)) == 7


def test_narrow_matrices_stay_in_process():
    with SolverPool(2, min_width=100) as p:
        list(solve_many([_random(10, 0)], pool=p))
        assert p._executor is None


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (1, 1), (3, 3)])
def test_worker_counts(value, expected):
    assert resolve_workers(value) == expected
    assert resolve_workers("auto") >= 1 and resolve_workers(None) >= 1


@pytest.mark.parametrize("value", [-1, True, "many", 2.5])
def test_bad_worker_counts_are_refused(value):
    with pytest.raises(ValueError, match="give a count >= 0 or 'auto'"):
        resolve_workers(value)


def test_the_cpu_auction_restores_the_thread_count():
    before = torch.get_num_threads()
    solve(_random(30, 2), "auction")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("seed", range(3))
def test_sparse_with_every_column_a_candidate_is_exact(seed):
    sim = _random(60, seed)
    assert solve(sim, "sparse", SolverSettings(candidates=60)).objective == pytest.approx(
        solve(sim, "exact").objective
    )


@pytest.mark.parametrize("candidates", [1, 2, 4])
def test_sparse_lies_between_the_identity_and_the_optimum(candidates):
    # Few candidates on a matrix with no structure: the restricted optimum is usually below the
    # true one, but the identity edges keep it a permutation no worse than leaving things as they are.
    sim = _random(200, candidates)
    found = solve(sim, "sparse", SolverSettings(candidates=candidates))
    assert _is_permutation(found.perm, 200)
    assert found.identity_objective <= found.objective <= solve(sim, "exact").objective + 1e-9


def test_sparse_reaches_the_optimum_on_random_weight_similarities():
    # The documented measurement at a width tests can afford: 32 candidates of 512 suffice.
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(512, 256, generator=g) @ torch.randn(512, 256, generator=g).T
    gap = gap_to_optimum(sim, "sparse", SolverSettings(candidates=32))
    assert gap["gap"] == pytest.approx(0.0, abs=1e-6) and gap["bound"] is None


@pytest.mark.parametrize("candidates", [0, -3])
def test_sparse_candidates_below_one_are_refused(candidates):
    with pytest.raises(ValueError, match=r"sparse solver candidates=-?\d+ must be >= 1"):
        solve(_random(4, 0), "sparse", SolverSettings(candidates=candidates))


def test_sparse_takes_a_square_matrix():
    with pytest.raises(ValueError, match=r"the sparse solver takes a square matrix, got \(3, 4\)"):
        solve(torch.zeros(3, 4), "sparse")


@pytest.mark.parametrize("solver", SOLVERS.names())
def test_the_guaranteed_gap_is_the_one_gap_to_optimum_reports(solver):
    sim = _random(40, 2)
    settings = SolverSettings(tolerance=1e-3, candidates=4)
    expected = {"exact": 0.0, "auction": 40 * 1e-3 * float(sim.max() - sim.min()), "sparse": None}[solver]
    assert guaranteed_gap(sim, solver, settings) == pytest.approx(expected)
    assert gap_to_optimum(sim, solver, settings)["bound"] == pytest.approx(expected)
