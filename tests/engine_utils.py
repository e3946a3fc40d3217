"""Helpers the engine tests share: run requests to the end, and the
chi-square test of homogeneity the sampling-exactness tests use."""

from __future__ import annotations

from collections import Counter


def generate_all(engine, prompts, params) -> list:
    """Add ``prompts`` (ids ``r0``, ``r1``, ...) and step ``engine`` until
    every request is done; their final outputs, in order."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[f"r{i}"] for i in range(len(prompts))]


def chi_square_quantile_999(df: int) -> float:
    """Wilson-Hilferty: the 0.999 quantile of chi-square with ``df`` degrees of freedom."""
    z = 3.0902
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def assert_one_distribution(plain: Counter, other: Counter, num: int) -> None:
    """``plain`` and ``other`` (``num`` draws each) are draws of one
    distribution: chi-square homogeneity at 0.999 over the categories with
    at least 20 draws in both, the rest pooled into one."""
    keys = sorted(set(plain) | set(other), key=lambda k: -(plain[k] + other[k]))
    rows = [[plain[k], other[k]] for k in keys if plain[k] + other[k] >= 20]
    rest = [num - sum(r[0] for r in rows), num - sum(r[1] for r in rows)]
    if sum(rest) > 0:
        rows.append(rest)
    stat = sum((x - (a + b) / 2) ** 2 / ((a + b) / 2) for a, b in rows for x in (a, b))
    assert len(rows) >= 4
    assert stat < chi_square_quantile_999(len(rows) - 1), (stat, rows)
