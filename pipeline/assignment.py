"""Linear assignment solvers for expert alignment: a similarity matrix in, the permutation that
maximises the summed matched similarity out.

``exact`` is scipy's Hungarian-type solver (cubic, CPU, optimal; the authors' behaviour and the
default). ``sparse`` solves the same problem exactly on a candidate graph: each row's ``candidates``
most similar columns plus the identity match (scipy's LAPJVsp on a sparse matrix), so its result
is never below the unaligned objective and equals the optimum whenever every optimal match is a
candidate (on random 3072- and 6144-wide matrices from 32 candidates on; 8 already came within
0.15%). ``auction`` is Bertsekas' auction algorithm with epsilon scaling, written in torch so it
runs where the similarity matrix lives (a GPU): each phase ends with every neuron matched under
epsilon-complementary slackness (each row's match within ``eps`` of its best net value), which
bounds the objective to within ``n * eps`` of the optimum. Its final ``eps`` is
``tolerance * (max(sim) - min(sim))``, so for an ``n x n`` matrix

    objective(auction) >= optimum - n * tolerance * (max(sim) - min(sim))

(``tolerance``: ``align.solver_tolerance``; per matched neuron, at most ``tolerance`` of the matrix's
value range below the optimum on average). The result is a permutation by construction (every row
owns a distinct column when an auction phase ends).

:class:`SolverPool` runs exact solves in worker processes; :func:`solve_many` keeps at most one
pending matrix per worker, so memory stays bounded whatever the number of pairs.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from pipeline.registry import Registry


@dataclass(frozen=True)
class SolverSettings:
    """What the approximate solvers are told: the auction's ``tolerance`` (share of the similarity
    range per neuron) and the sparse solver's ``candidates`` (columns kept per row)."""

    tolerance: float = 1e-4
    candidates: int = 32


# A solver maps a square similarity matrix (to maximise) and its settings to a permutation:
# ``perm[i]`` is the column matched to row i.
Solver = Callable[[torch.Tensor, SolverSettings], torch.Tensor]
SOLVERS: Registry[Solver] = Registry("assignment solver")

DEFAULT_TOLERANCE = SolverSettings.tolerance
DEFAULT_CANDIDATES = SolverSettings.candidates
DEFAULT_SETTINGS = SolverSettings()
MIN_TOLERANCE = 1e-9
# Matrices narrower than this are solved in the calling process: starting the workers costs seconds
# (each imports torch), a scipy solve of a 1024 x 1024 matrix about 50 ms.
POOL_MIN_WIDTH = 1024
# Epsilon shrinks by this factor between auction phases (Bertsekas suggests 4 to 10).
_EPS_FACTOR = 8.0
# Rows of the [rows, n] bidding table computed at once, so it stays near 64 MiB in float64.
_BID_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class Assignment:
    """A solved matching: ``perm`` (long, CPU), its objective sum_i sim[i, perm[i]] and the
    identity's (sum_i sim[i, i]: the objective before alignment)."""

    perm: torch.Tensor
    objective: float
    identity_objective: float


def matched_sum(sim: torch.Tensor, perm: torch.Tensor) -> float:
    """sum_i sim[i, perm[i]] in float64."""
    return float(sim.gather(1, perm.to(sim.device).view(-1, 1)).double().sum())


def _lsa(cost: np.ndarray) -> np.ndarray:
    """scipy's exact maximising assignment as a permutation (module level: worker processes run it)."""
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return perm


@SOLVERS.register("exact")
def exact_assignment(sim: torch.Tensor, settings: SolverSettings = SolverSettings()) -> torch.Tensor:
    """The optimal permutation (scipy ``linear_sum_assignment`` on the CPU, in ``sim``'s dtype)."""
    return torch.as_tensor(_lsa(sim.cpu().numpy()), dtype=torch.long)


@SOLVERS.register("sparse")
def sparse_assignment(sim: torch.Tensor, settings: SolverSettings = SolverSettings()) -> torch.Tensor:
    """The optimal permutation among each row's ``settings.candidates`` most similar columns and the
    identity match (the candidates chosen on ``sim``'s device, the matching by scipy on the CPU)."""
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"the sparse solver takes a square matrix, got {tuple(sim.shape)}")
    if settings.candidates < 1:
        raise ValueError(f"sparse solver candidates={settings.candidates} must be >= 1")
    if n < 2:
        return torch.arange(n)
    k = min(settings.candidates, n)
    top = sim.topk(k, dim=1)
    # The identity edges make a full matching always exist (and the result never worse than
    # leaving the expert unaligned); np.unique drops the ones already among the candidates.
    keys = np.concatenate(
        [
            (np.arange(n, dtype=np.int64)[:, None] * n + top.indices.cpu().numpy()).ravel(),
            np.arange(n, dtype=np.int64) * (n + 1),
        ]
    )
    values = np.concatenate(
        [top.values.double().cpu().numpy().ravel(), sim.diagonal().double().cpu().numpy()]
    )
    keys, first = np.unique(keys, return_index=True)
    values = values[first]
    rows, cols = np.divmod(keys, n)
    # A minimising matcher on strictly positive weights (a sparse matrix drops explicit zeros).
    cost = csr_matrix((values.max() - values + 1.0, (rows, cols)), shape=(n, n))
    matched_rows, matched_cols = min_weight_full_bipartite_matching(cost)
    perm = np.empty(n, dtype=np.int64)
    perm[matched_rows] = matched_cols
    return torch.as_tensor(perm)


def _top2(values: torch.Tensor, prices: torch.Tensor, rows: torch.Tensor):
    """Best column, best and second-best net value (value minus price) of each row in ``rows``."""
    n = values.shape[1]
    step = max(1, _BID_CHUNK_ELEMENTS // n)
    best, first, second = [], [], []
    for i in range(0, len(rows), step):
        top = (values[rows[i : i + step]] - prices).topk(2, dim=1)
        best.append(top.indices[:, 0])
        first.append(top.values[:, 0])
        second.append(top.values[:, 1])
    return torch.cat(best), torch.cat(first), torch.cat(second)


def _loose_rows(values: torch.Tensor, prices: torch.Tensor, col_of: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows whose match is worth less than their best net value minus ``eps``."""
    n = values.shape[1]
    step = max(1, _BID_CHUNK_ELEMENTS // n)
    loose = []
    for i in range(0, n, step):
        net = values[i : i + step] - prices
        own = net.gather(1, col_of[i : i + step].view(-1, 1)).view(-1)
        loose.append((own < net.max(1).values - eps).nonzero().view(-1) + i)
    return torch.cat(loose)


@SOLVERS.register("auction")
def auction_assignment(sim: torch.Tensor, settings: SolverSettings = SolverSettings()) -> torch.Tensor:
    """Bertsekas' auction with epsilon scaling, all unmatched rows bidding at once (Jacobi), on
    ``sim``'s device in float64; objective within ``n * tolerance * (max(sim) - min(sim))`` of optimal."""
    tolerance = settings.tolerance
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"the auction solver takes a square matrix, got {tuple(sim.shape)}")
    if not MIN_TOLERANCE <= tolerance < 1:
        # Below it, eps would vanish against float64 prices and bidding would not end.
        raise ValueError(f"auction tolerance {tolerance} must be in [{MIN_TOLERANCE}, 1)")
    device = sim.device if sim.device.type != "mps" else torch.device("cpu")  # MPS has no float64
    values = sim.to(device, torch.float64)
    spread = float(values.max() - values.min()) if n else 0.0
    if n < 2 or spread == 0.0:
        return torch.arange(n)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Bidding rounds are many small ops: intra-op threads cost more than they give (on a busy
        # 2-core machine a 3072-wide auction took 32 s with 2 threads, 1.8 s with one).
        torch.set_num_threads(1)
    try:
        perm = _auction(values, tolerance * spread, spread / 4)
    finally:
        torch.set_num_threads(threads)
    if not torch.equal(perm.sort().values, torch.arange(n)):  # cannot happen: a phase ends matched
        raise RuntimeError("auction ended without a permutation")
    return perm


def _auction(values: torch.Tensor, eps_final: float, eps: float) -> torch.Tensor:
    """Epsilon-scaling phases from ``eps`` down to ``eps_final``; the final matching, on the CPU."""
    n, device = len(values), values.device
    eps = max(eps, eps_final)
    prices = torch.zeros(n, dtype=torch.float64, device=device)
    col_of = torch.full((n,), -1, dtype=torch.long, device=device)
    row_of = torch.full((n,), -1, dtype=torch.long, device=device)
    top_bid = torch.empty(n, dtype=torch.float64, device=device)
    winner = torch.empty(n, dtype=torch.long, device=device)
    free = torch.arange(n, device=device)
    while True:
        while len(free):
            cols, first, second = _top2(values, prices, free)
            bids = prices[cols] + (first - second) + eps
            top_bid.fill_(-torch.inf).scatter_reduce_(0, cols, bids, "amax")
            wins = bids == top_bid[cols]
            # One winner per column among equal top bids: the highest row index.
            winner.fill_(-1).scatter_reduce_(0, cols[wins], free[wins], "amax")
            won = (winner >= 0).nonzero().view(-1)
            outbid = row_of[won]
            col_of[outbid[outbid >= 0]] = -1
            row_of[won] = winner[won]
            col_of[winner[won]] = won
            prices[won] = top_bid[won]
            free = (col_of < 0).nonzero().view(-1)
        if eps <= eps_final:
            break
        eps = max(eps / _EPS_FACTOR, eps_final)
        # The next phase starts from these prices and keeps every match that already satisfies
        # eps-complementary slackness for the smaller eps (prices only rise, so it keeps doing so).
        loose = _loose_rows(values, prices, col_of, eps)
        row_of[col_of[loose]] = -1
        col_of[loose] = -1
        free = loose
    return col_of.cpu()


def solve(
    sim: torch.Tensor, solver: str = "exact", settings: SolverSettings = DEFAULT_SETTINGS
) -> Assignment:
    """The permutation maximising sum_i sim[i, perm[i]] by the registered ``solver``, with objectives."""
    perm = SOLVERS.get(solver)(sim, settings)
    return Assignment(perm, matched_sum(sim, perm), float(sim.diagonal().double().sum()))


def guaranteed_gap(
    sim: torch.Tensor, solver: str, settings: SolverSettings = DEFAULT_SETTINGS
) -> float | None:
    """The most ``solver``'s objective on ``sim`` can fall short of the optimum: 0 for ``exact``,
    ``n * tolerance * (max(sim) - min(sim))`` for ``auction``, None for ``sparse`` (it guarantees
    only the identity's objective)."""
    SOLVERS.get(solver)
    if solver == "exact":
        return 0.0
    if solver == "auction":
        return len(sim) * settings.tolerance * float(sim.max() - sim.min())
    return None


def gap_to_optimum(sim: torch.Tensor, solver: str, settings: SolverSettings = DEFAULT_SETTINGS) -> dict:
    """How far ``solver``'s objective is from the exact optimum (where an exact solve is affordable):
    the optimum, the objective, their gap (>= 0 up to rounding), the gap relative to |optimum| and
    the bound the solver guarantees (:func:`guaranteed_gap`)."""
    optimum = solve(sim, "exact").objective
    found = solve(sim, solver, settings).objective
    bound = guaranteed_gap(sim, solver, settings)
    return {
        "optimum": optimum,
        "objective": found,
        "gap": optimum - found,
        "relative_gap": (optimum - found) / abs(optimum) if optimum else 0.0,
        "bound": bound,
    }


def resolve_workers(workers: int | str | None) -> int:
    """``align.workers``: an int (0 or 1: solve in this process), or ``auto``/None: every usable core."""
    if workers is None or workers == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers={workers!r}: give a count >= 0 or 'auto'")
    return workers


class SolverPool:
    """Worker processes for exact solves, started on the first matrix at least ``min_width`` wide
    (narrower ones, and every one when ``workers`` <= 1, are solved in this process). Use it as a
    context manager; one pool serves every layer of a run."""

    def __init__(self, workers: int | str | None = "auto", min_width: int = POOL_MIN_WIDTH) -> None:
        self.workers = resolve_workers(workers)
        self.min_width = min_width
        self._executor: ProcessPoolExecutor | None = None

    def submit(self, cost: np.ndarray) -> Future:
        """The exact permutation of ``cost``, solved by a worker (or here, already done)."""
        if self.workers <= 1 or cost.shape[0] < self.min_width:
            done: Future = Future()
            done.set_result(_lsa(cost))
            return done
        if self._executor is None:
            # spawn: a forked child of a process holding CUDA or OpenMP state can hang.
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn")
            )
        return self._executor.submit(_lsa, cost)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None

    def __enter__(self) -> SolverPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def solve_many(
    sims: Iterable[torch.Tensor],
    solver: str = "exact",
    settings: SolverSettings = DEFAULT_SETTINGS,
    pool: SolverPool | None = None,
) -> Iterator[Assignment]:
    """:func:`solve` each matrix of ``sims`` (consumed lazily), in order. Exact solves go to ``pool``
    when given, at most one pending matrix per worker; other solvers run here, on each matrix's device."""
    SOLVERS.get(solver)
    if solver != "exact" or pool is None or pool.workers <= 1:
        for sim in sims:
            yield solve(sim, solver, settings)
        return
    pending: deque[tuple[torch.Tensor, Future]] = deque()

    def finish(sim: torch.Tensor, fut: Future) -> Assignment:
        perm = torch.as_tensor(fut.result(), dtype=torch.long)
        return Assignment(perm, matched_sum(sim, perm), float(sim.diagonal().double().sum()))

    for sim in sims:
        pending.append((sim, pool.submit(sim.cpu().numpy())))
        if len(pending) >= pool.workers:
            yield finish(*pending.popleft())
    while pending:
        yield finish(*pending.popleft())
