"""FLOPs of a step from its jaxpr: every dot and convolution, scan bodies times their length.

XLA's `cost_analysis()` counts the body of a loop once, and every layer stack here is a scan, so
it undercounts a BLIP-2 step by about the number of layers. Matrix work dominates the step, so
counting dots and convolutions gives the figure MFU needs.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core


def _sub_jaxprs(value: Any) -> list[Any]:
    """The jaxprs inside an equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
    if isinstance(value, core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def equation_flops(eqn: Any) -> float:
    """FLOPs of one dot_general or conv_general_dilated equation."""
    if eqn.primitive.name == "dot_general":
        (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
        return 2.0 * np.prod(lhs) * np.prod(free)
    kernel = eqn.invars[1].aval.shape
    out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(kernel) / out_features


def matmul_equations(jaxpr: Any) -> list[tuple[Any, int]]:
    """The dots and convolutions in `jaxpr`, each with how often one call runs it: scan bodies
    `length` times, only the costlier branch of a cond."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append((eqn, 1))
        inner = [matmul_equations(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if eqn.primitive.name == "cond":
            inner = [max(inner, key=equations_flops)] if inner else []
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        found += [(e, n * times) for branch in inner for e, n in branch]
    return found


def equations_flops(equations: list[tuple[Any, int]]) -> float:
    """FLOPs of (equation, count) pairs as `matmul_equations` lists them."""
    return float(sum(n * equation_flops(eqn) for eqn, n in equations))


def matmul_flops(jaxpr: Any) -> float:
    """FLOPs of the dots and convolutions in `jaxpr` (`matmul_equations`)."""
    return equations_flops(matmul_equations(jaxpr))


def step_flops(fn: Callable, *args: Any) -> float:
    """Matrix FLOPs of one call `fn(*args)` over the global batch (all devices together)."""
    return matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)
