"""Statistics over seeds (mtcpeft/experiments/stats.py): the t table against the t density, and means, standard
deviations and 95% intervals against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mtcpeft.experiments.stats import T975, StatsError, summarize, t_critical


def t_mass(q: float, dof: int) -> float:
    """P(|T| <= q) for Student's t with ``dof`` degrees of freedom: Simpson's rule on the density, independent of
    how the table was made."""
    x = np.linspace(0.0, q, 200_001)
    logc = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    f = np.exp(logc - (dof + 1) / 2 * np.log1p(x * x / dof))
    h = x[1] - x[0]
    return 2 * h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())


@pytest.mark.parametrize("dof", range(1, 31))
def test_table_holds_the_two_sided_95_percent_quantiles(dof):
    assert len(T975) == 30
    assert t_mass(T975[dof - 1], dof) == pytest.approx(0.95, abs=1e-8)
    assert t_critical(dof, use_scipy=False) == T975[dof - 1]


def test_cauchy_quantile_in_closed_form():  # dof 1 is the Cauchy distribution: q = tan(0.975 pi - pi/2)
    assert T975[0] == pytest.approx(math.tan(math.pi * 0.475), abs=1e-8)


def test_scipy_agrees_with_the_table_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for dof in range(1, 31):
        assert stats.t.ppf(0.975, dof) == pytest.approx(T975[dof - 1], abs=1e-8)
        assert t_critical(dof) == pytest.approx(T975[dof - 1], abs=1e-8)


def test_beyond_the_table_without_scipy_names_the_fix():
    with pytest.raises(StatsError, match=r"covers 31 seeds at most \(32 given\); install scipy"):
        t_critical(31, use_scipy=False)
    with pytest.raises(StatsError, match="at least 1 degree of freedom"):
        t_critical(0)


def test_summary_of_three_paired_differences_by_hand():
    # diffs -0.5, -0.4, -0.7: mean -8/15; deviations 1/30, 4/30, -5/30 -> std sqrt(42/900/2) = sqrt(7/300);
    # half-width t(0.975, 2) * std / sqrt(3) = 4.302652730 * sqrt(7) / 30
    s = summarize([-0.5, -0.4, -0.7], use_scipy=False)
    half = 4.302652730 * math.sqrt(7) / 30
    assert (s.n, s.mean, s.std, s.half) == (3, pytest.approx(-8 / 15), pytest.approx(math.sqrt(7 / 300)),
                                            pytest.approx(half))
    assert (s.low, s.high) == (pytest.approx(-8 / 15 - half), pytest.approx(-8 / 15 + half))
    assert s.high < 0 and s.excludes_zero() is True  # -0.9128 .. -0.1539


def test_two_values_use_the_cauchy_quantile():
    # -0.2, 0.3: mean 0.05, std |a - b| / sqrt(2) = 0.5 / sqrt(2), half 12.706204736 * std / sqrt(2) = 12.706.. / 4
    s = summarize([-0.2, 0.3], use_scipy=False)
    assert (s.mean, s.std, s.half) == (pytest.approx(0.05), pytest.approx(0.5 / math.sqrt(2)),
                                       pytest.approx(12.706204736 / 4))
    assert s.excludes_zero() is False


def test_one_and_no_values_have_no_interval():
    one = summarize([2.5])
    assert (one.n, one.mean, one.std, one.half, one.low, one.excludes_zero()) == (1, 2.5, None, None, None, None)
    none = summarize([])
    assert (none.n, none.mean, none.half) == (0, None, None)
    same = summarize([1.0, 1.0, 1.0])  # no spread: a zero-width interval at the mean, which excludes 0
    assert (same.std, same.half, same.excludes_zero()) == (0.0, 0.0, True)
