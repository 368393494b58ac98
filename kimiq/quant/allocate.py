"""Bit allocation: one format per weight group, minimising the predicted KL under a byte budget.

The problem is a multiple-choice knapsack.  Group ``g`` has options ``o`` = (format, bytes ``b_go``,
predicted KL increase ``d_go``); pick exactly one per group to

    minimise  sum_g d_g,o(g)      subject to   sum_g b_g,o(g) <= budget.

``allocate`` solves it exactly by dynamic programming over a byte grid: every option's bytes are
rounded *up* to a multiple of ``unit`` bytes, so any plan that fits the grid fits the budget, and
``best[u]`` = the least total KL of the groups seen so far within ``u`` units is built one group at a
time (``best'[u] = min_o best[u - c_o] + d_o``), remembering the option taken at each ``u`` to walk
back.  ``unit`` depends only on the options (``resolution`` cells cover the largest plan), not on the
budget, so a bigger budget never predicts more KL; the grid wastes under ``G`` units in the worst case
(< 0.2 % of the largest plan for ``G`` = 120 groups at the default resolution).  Unlike a Lagrangian /
greedy marginal-gain allocation it also takes options off the lower convex hull of a group's
(bytes, KL) curve, and it respects the budget exactly.  Cost: ``G x options x resolution`` array
operations (about 50 ms for the default model).  Ties go to the smaller option.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Allocation", "Option", "allocate", "min_bytes"]


@dataclass(frozen=True)
class Option:
    """One way to store a group: its format, stored bytes and predicted KL increase (nats/token)."""

    format: str
    nbytes: int
    dkl: float


@dataclass(frozen=True)
class Allocation:
    choice: dict[str, Option]  # group -> the chosen option
    budget: int

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.choice.values())

    @property
    def dkl(self) -> float:
        return sum(o.dkl for o in self.choice.values())


def _pareto(options: Sequence[Option]) -> list[Option]:
    """Options sorted by bytes, without those another option beats on both bytes and KL (first of equals kept)."""
    out: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.dkl)):
        if not out or o.dkl < out[-1].dkl:
            out.append(o)
    return out


def min_bytes(options: Mapping[str, Sequence[Option]]) -> int:
    """The smallest plan: every group at its smallest option."""
    return sum(min(o.nbytes for o in opts) for opts in options.values())


def allocate(options: Mapping[str, Sequence[Option]], budget: int, resolution: int = 1 << 16) -> Allocation:
    """The options (one per group) of least total ``dkl`` whose bytes sum to at most ``budget``."""
    groups = list(options)
    if not groups:
        return Allocation({}, budget)
    opts = {g: _pareto(options[g]) for g in groups}
    if any(not o for o in opts.values()):
        raise ValueError(f"groups without options: {[g for g in groups if not opts[g]]}")
    largest = sum(o[-1].nbytes for o in opts.values())
    unit = max(1, math.ceil(largest / resolution))
    cost = {g: np.array([math.ceil(o.nbytes / unit) for o in opts[g]]) for g in groups}
    need = min_bytes(opts)
    U = min(budget // unit, int(sum(c[-1] for c in cost.values())))
    if sum(int(c[0]) for c in cost.values()) > U:
        raise ValueError(f"budget {budget:,} bytes is below the smallest plan ({need:,} bytes"
                         + (f", {unit}-byte grid" if unit > 1 and need <= budget else "") + ")")
    best = np.zeros(U + 1)  # no group yet: 0 KL within any number of units
    taken = []
    for g in groups:
        new = np.full(U + 1, np.inf)
        arg = np.zeros(U + 1, dtype=np.int16)
        for i, (c, o) in enumerate(zip(cost[g], opts[g])):
            if c > U:
                break
            cand = np.full(U + 1, np.inf)
            cand[c:] = best[: U + 1 - c] + o.dkl
            better = cand < new
            new[better], arg[better] = cand[better], i
        best = new
        taken.append(arg)
    choice, u = {}, U
    for g, arg in zip(reversed(groups), reversed(taken)):
        i = int(arg[u])
        choice[g] = opts[g][i]
        u -= int(cost[g][i])
    return Allocation({g: choice[g] for g in groups}, budget)
