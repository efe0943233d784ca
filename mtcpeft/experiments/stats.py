"""Statistics over seeds for sweeps (:mod:`.sweep_results`, :mod:`.plots`): the mean, the sample standard
deviation and the 95% Student-t interval of the mean of a few numbers (a grid point's perplexities over seeds, or
the per-seed differences specific - agnostic of a pair).

The interval is ``mean +- t(0.975, n - 1) * std / sqrt(n)``; ``t`` comes from ``scipy.stats.t`` when scipy is
installed, else from :data:`T975` (dof 1..30, i.e. up to 31 seeds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from mtcpeft.errors import MtcpeftError

# the 0.975 quantile of Student's t with 1..30 degrees of freedom (solved to 1e-9 from the regularised incomplete
# beta function; tests/experiments/test_seed_stats.py checks each against a numerical integral of the density)
T975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252, 2.306004135,
        2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688, 2.131449546, 2.119905299,
        2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
        2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456)


class StatsError(MtcpeftError, ValueError):
    """A statistic cannot be computed here; the message says what to change."""


def t_critical(dof: int, use_scipy: bool = True) -> float:
    """Half-width factor of a two-sided 95% t-interval: the 0.975 quantile of Student's t with ``dof`` degrees of
    freedom (scipy when installed and ``use_scipy``, else :data:`T975`)."""
    if isinstance(dof, bool) or not isinstance(dof, int) or dof < 1:
        raise StatsError(f"a t-interval needs at least 1 degree of freedom (2 values), got dof={dof!r}")
    if use_scipy:
        try:
            from scipy.stats import t
        except ImportError:
            pass
        else:
            return float(t.ppf(0.975, dof))
    if dof > len(T975):
        raise StatsError(f"the built-in t table covers {len(T975) + 1} seeds at most ({dof + 1} given); install scipy "
                         "(pip install scipy) for more, or sweep fewer seeds")
    return T975[dof - 1]


@dataclass(frozen=True)
class Summary:
    """``n`` numbers in brief: mean, sample std (n - 1 in the denominator) and the half-width of the 95% t-interval
    of the mean (``std`` and ``half`` are None below 2 numbers, ``mean`` too with none)."""

    n: int
    mean: float | None = None
    std: float | None = None
    half: float | None = None

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half

    def excludes_zero(self) -> bool | None:
        """Whether the interval lies wholly on one side of 0 (None without an interval)."""
        return None if self.half is None else (self.low > 0 or self.high < 0)


def summarize(values: Sequence[float], use_scipy: bool = True) -> Summary:
    """Mean, sample standard deviation and 95% t-interval half-width of ``values``."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Summary(0)
    mean = math.fsum(xs) / n
    if n == 1:
        return Summary(1, mean)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(n, mean, std, t_critical(n - 1, use_scipy) * std / math.sqrt(n))
