"""Leaf layers shared by every tower: dense, norms, embeddings, activations, scanned stacks.

Every parameter is created through `nn.with_logical_partitioning`, so each leaf carries logical
axis names (`embed`, `mlp`, `heads`, `vocab`, `layers`, ...) that `parallel/mesh.py` maps onto
mesh axes. Norms compute in float32 whatever the compute dtype (design decision 6).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from blip2_jax.models import lora, quantization

Dtype = Any
Axes = tuple[str | None, ...]

# BERT/OPT/Q-Former initialiser; the loaders overwrite it, training from scratch relies on it.
default_init = nn.initializers.normal(stddev=0.02)
# A Dense kernel stored (out, in), as `transpose_kernels` writes it for decoding: with the few rows
# of a decoding step (batch x beams), XLA:CPU's matmuls run ~25% faster reading the weights
# contracted on their last axis (the layout torch's Linear keeps).
KERNEL_T = "kernel_t"


def partitioned(init: Callable, axes: Axes) -> Callable:
    """An initializer whose parameter carries the logical axis names `axes`."""
    return nn.with_logical_partitioning(init, axes)


def dense(
    features: int,
    axes: Axes,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    use_bias: bool = True,
    kernel_init: Callable = default_init,
) -> Dense:
    """A Dense layer with kernel axes `axes` (in, out) and bias axis (out,)."""
    return Dense(features, axes, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                 name=name)


class Dense(nn.Module):
    """`nn.Dense`'s computation and parameters (`kernel` (in, out), `bias`), plus what the tree may
    make of a frozen layer: the kernel as `kernel_t` (out, in) (`transpose_kernels`), an int8
    kernel with per-channel `kernel_scale` (`models/quantization.py`) and a LoRA branch wherever
    `lora_a` is present (`models/lora.py`). LoRA's dropout runs on a training pass — one given a
    `dropout` RNG, as PEFT's runs in `train()` mode — so the objectives pass that RNG only when
    they train."""

    features: int
    axes: Axes
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = default_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.has_variable("params", KERNEL_T):
            kernel, contract = self.get_variable("params", KERNEL_T), 1
        else:
            kernel, contract = self.param("kernel", partitioned(self.kernel_init, self.axes),
                                          (x.shape[-1], self.features), self.param_dtype), 0
        bias = self.param("bias", partitioned(nn.initializers.zeros_init(), (self.axes[-1],)), (self.features,),
                          self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)  # int8 -> bf16/fp32 is exact
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (contract,)), ((), ())))
        if self.has_variable("params", quantization.SCALE):
            y = y * self.get_variable("params", quantization.SCALE).astype(y.dtype)
        if bias is not None:
            y = y + bias
        if self.has_variable("params", lora.A):
            y = y + self._lora(x)
        return y

    def _lora(self, x: jax.Array) -> jax.Array:
        get = lambda name: self.get_variable("params", name)  # noqa: E731
        a, b = (get(n).astype(x.dtype) for n in (lora.A, lora.B))
        if self.has_rng("dropout"):
            rate = get(lora.DROPOUT)
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))
        return (x @ a @ b) * get(lora.SCALING).astype(x.dtype)


def layer_norm(epsilon: float, *, param_dtype: Dtype, name: str, use_scale: bool = True,
               use_bias: bool = True) -> nn.LayerNorm:
    """LayerNorm in float32 with the exact (two-pass) variance, as torch computes it."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        use_scale=use_scale,
        use_bias=use_bias,
        use_fast_variance=False,
        scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


class RMSNorm(nn.Module):
    """T5's and LLaMA's LayerNorm: scale-only, no mean subtraction, variance in float32. Before the
    scale, T5 casts the normalised activations to the weight dtype, LLaMA back to the input's
    (`cast_to_input`)."""

    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cast_to_input: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", partitioned(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (scale * x32.astype(x.dtype if self.cast_to_input else self.param_dtype)).astype(self.dtype)


def embed(num_embeddings: int, features: int, axes: Axes, *, dtype: Dtype, param_dtype: Dtype,
          name: str, init: Callable = default_init) -> nn.Embed:
    return nn.Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
                    embedding_init=partitioned(init, axes), name=name)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's QuickGELU: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation with the Hugging Face name `name` (exact `gelu`, tanh `gelu_new`, ...)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat(block: type[nn.Module], *, remat_policy: str, static_argnums: tuple[int, ...] = (),
          prevent_cse: bool = True) -> type[nn.Module]:
    """`block` rematerialised under the named policy (`none`: unchanged); see `stack_layers`.
    Inside `nn.scan` pass `prevent_cse=False`: the scan already keeps XLA from undoing the remat."""
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
    if remat_policy == "none":
        return block
    return nn.remat(block, policy=REMAT_POLICIES[remat_policy], prevent_cse=prevent_cse,
                    static_argnums=static_argnums)


def stack_layers(block: type[nn.Module], *, length: int, remat_policy: str,
                 in_axes: Sequence[Any] = (), static_argnums: tuple[int, ...] = (),
                 scan: bool = True) -> Callable[..., nn.Module]:
    """`block` repeated `length` times with `nn.scan` (parameters stacked on a `layers` axis).

    `block.__call__(carry, *args) -> (carry, out)`; `in_axes` says per extra argument whether it is
    scanned (0) or broadcast (`nn.broadcast`; broadcast Python values stay static). Python-valued
    arguments are listed in `static_argnums` (counting `self` as 0) for `nn.remat`.

    `scan=False` builds the same computation as a Python loop over `length` separate blocks named
    "0", "1", ... (parameters from `unstack_layers`): inference inside a decoding loop then reads
    each layer's weights where they lie, where a scan slices (copies) every layer out of the stack
    at every step. A scanned argument's leaves are then either stacked arrays or lists of per-layer
    arrays, and the outputs come back as lists: a decoding cache stays one buffer per layer.
    """
    if not scan:
        def unrolled(*args: Any, name: str | None = None, **kwargs: Any) -> nn.Module:
            return _Unrolled(block, length, tuple(in_axes), args, tuple(kwargs.items()), name=name)
        return unrolled
    return nn.scan(
        remat(block, remat_policy=remat_policy, static_argnums=static_argnums, prevent_cse=False),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=tuple(in_axes),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class _Unrolled(nn.Module):
    """`length` blocks called in turn; built by `stack_layers(..., scan=False)`."""

    block: type[nn.Module]
    length: int
    in_axes: tuple[Any, ...]
    block_args: tuple[Any, ...]
    block_kwargs: tuple[tuple[str, Any], ...]

    @nn.compact
    def __call__(self, carry: Any, *args: Any) -> tuple[Any, Any]:
        axes = self.in_axes + (nn.broadcast,) * (len(args) - len(self.in_axes))
        outs = []
        for i in range(self.length):
            layer_args = [a if axis is nn.broadcast else jax.tree.map(lambda x: x[i], a, is_leaf=_is_list)
                          for a, axis in zip(args, axes)]
            carry, out = self.block(*self.block_args, **dict(self.block_kwargs), name=str(i))(carry, *layer_args)
            outs.append(out)
        return carry, jax.tree.map(lambda *xs: list(xs), *outs)


def _is_list(x: Any) -> bool:
    return isinstance(x, list)


def zero_cache(length: int, shape: tuple[int, ...], dtype: Dtype, *, stacked: bool) -> dict[str, Any]:
    """A zero K/V cache for `length` layers of `shape` each: stacked for a scanned stack, a list of
    per-layer buffers for an unrolled one (`stack_layers(..., scan=False)`)."""
    if stacked:
        return {"k": jnp.zeros((length, *shape), dtype), "v": jnp.zeros((length, *shape), dtype)}
    return {"k": [jnp.zeros(shape, dtype) for _ in range(length)], "v": [jnp.zeros(shape, dtype) for _ in range(length)]}


def transpose_kernels(tree: Any) -> Any:
    """`tree` with every Dense `kernel` (in, out) stored as `kernel_t` (out, in), which `Dense`
    computes the same from (to float32 rounding): the decoding layout of the LLM's layers. Any
    mapping (a Flax `FrozenDict` too) comes back as a plain dict, transposed all the way down."""
    if not isinstance(tree, Mapping):
        return tree
    out = {key: transpose_kernels(value) for key, value in tree.items() if key != "kernel"}
    if "kernel" in tree:
        out[KERNEL_T] = tree["kernel"].T
    return out


def dense_kernel(tree: dict[str, Any]) -> jax.Array:
    """A Dense layer's kernel (in, out) from its parameters, in either layout."""
    return tree["kernel"] if "kernel" in tree else tree[KERNEL_T].T


def unstack_layers(stacked: Any) -> dict[str, Any]:
    """A scanned stack's parameters (leaves with a leading layers axis) as the per-layer trees
    `stack_layers(..., scan=False)` reads: {"0": layer 0, "1": layer 1, ...}."""
    length = jax.tree.leaves(stacked)[0].shape[0]
    return {str(i): jax.tree.map(lambda x: x[i], stacked) for i in range(length)}
