"""`benchmarks/common.kernel_seconds`, the benchmarks' XLA-kernel floor: its bookkeeping (which
forms it times, the faster weight layout, the weight copies, the counts), with the clock replaced by
a fake whose seconds are known, so every number can be checked by hand."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from blip2_jax.train.flops import matmul_equations

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _equations():
    """In a 4-step scan: an attention-like batched dot (heads b=2, queries 5, keys 7, head_dim 3) and
    two equal (6,8)x(8,16) weight matmuls; then that matmul once more: four equations of two forms,
    counted 4, 4, 4 and 1 times."""
    def work(h, w):
        def body(carry, _):
            scores = jnp.einsum("bqd,bkd->bqk", h[:, :5], h[:, 5:])
            x = jnp.ones((6, 8)) * scores.sum()
            return carry + (x @ w).sum() + (x @ w).sum(), None
        return jax.lax.scan(body, 0.0, None, length=4)[0] + (jnp.ones((6, 8)) @ w).sum()

    return matmul_equations(jax.make_jaxpr(work)(jnp.ones((2, 12, 3)), jnp.ones((8, 16))).jaxpr)


def test_matmul_forms_are_the_dot_as_a_batched_product_in_both_weight_layouts(common):
    """'bqd,bkd->bqk' is batch 2 of M=5, K=3, N=7; x @ w is batch 1 of M=6, K=8, N=16."""
    forms = [common._matmul_forms(eqn) for eqn, _ in _equations()]
    assert forms[0] == [(((2, 5, 3), (2, 3, 7)), 1), (((2, 5, 3), (2, 7, 3)), 2)]
    assert forms[1] == forms[2] == forms[3] == [(((1, 6, 8), (1, 8, 16)), 1), (((1, 6, 8), (1, 16, 8)), 2)]
    assert [n for _, n in _equations()] == [4, 4, 4, 1]


def test_kernel_seconds_sums_the_faster_layout_per_copy_times_each_count(common, monkeypatch):
    """Fake clock: a program of c copies of a batch-b M x K by K x N form takes c * b*M*K*N
    microseconds in the (N, K) weight layout and 3x that in (K, N). Then every call costs b*M*K*N us
    whatever the copy budget, and the floor is 4 * (2*5*3*7) + (4 + 4 + 1) * (6*8*16) = 7752 us. Each
    of the 2 forms is timed in its 2 layouts once (a first call, then the best of several), with as
    many weight copies as its most frequent equation runs (4) or as the byte budget allows (1)."""
    timed = []

    def fake_best_seconds(run, first, *weights, reps):
        del run, reps
        (b, m, k), (_, rows, cols) = first.shape, weights[0].shape
        n, slower = (cols, 3) if rows == k else (rows, 1)
        timed.append((first.shape, weights[0].shape, len(weights)))
        return len(weights) * slower * b * m * k * n * 1e-6

    monkeypatch.setattr(common, "best_seconds", fake_best_seconds)
    equations = _equations()
    assert common.kernel_seconds(equations) == pytest.approx(7752e-6, rel=1e-12)
    assert len(timed) == 2 * 2 * 2 and all(copies == 4 for *_, copies in timed)
    timed.clear()
    assert common.kernel_seconds(equations, budget=1) == pytest.approx(7752e-6, rel=1e-12)
    assert all(copies == 1 for *_, copies in timed)
