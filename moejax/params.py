"""Parameter declarations: each leaf is declared once, everything else is derived from it.

A model builds a pytree (of registered dataclasses) whose leaves are `ParamSpec`s. From that one
tree come the abstract shapes (`abstract`, for `jax.eval_shape` and planning at full size), the
shardings on a mesh (`shardings`) and the initial values (`init`, jitted with `out_shardings` so
that weights are born sharded and never exist whole on one device).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax import sharding

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


@dataclasses.dataclass(frozen=True)
class normal_init:
    """N(0, std^2). A hashable value (not a closure) so that equal declarations share one
    compiled init."""

    std: float

    def __call__(self, key, shape, dtype):
        return self.std * jax.random.normal(key, shape, dtype)


def ones_init(key, shape, dtype):
    return jnp.ones(shape, dtype)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: shape, logical axes (one name per dimension), initializer and dtype."""

    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    init: Initializer
    dtype: str = "float32"

    def __post_init__(self):
        if len(self.shape) != len(self.logical_axes):
            raise ValueError(f"shape {self.shape} and axes {self.logical_axes} differ in rank")

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


# Leading axes of stacked layers: `layers` is the stack split over the pipeline stages, the
# others (the first-k dense layers before the pipeline, the MTP modules after it) are not split.
LAYER_AXES = ("layers", "uneven_layers", "dense_layers", "mtp_layers")


def stacked(spec: ParamSpec, num_layers: int, axis: str = "layers") -> ParamSpec:
    """The same parameter for `num_layers` layers, stacked on a leading axis named `axis`."""
    return ParamSpec((num_layers, *spec.shape), (axis, *spec.logical_axes), spec.init, spec.dtype)


def abstract(specs, mesh=None):
    """ShapeDtypeStructs of the parameters (with shardings when a mesh is given)."""

    def leaf(spec: ParamSpec):
        shard = (sharding.named_sharding(mesh, spec.logical_axes, spec.shape)
                 if mesh is not None else None)
        return jax.ShapeDtypeStruct(spec.shape, jnp.dtype(spec.dtype), sharding=shard)

    return jax.tree.map(leaf, specs, is_leaf=is_spec)


def shardings(specs, mesh):
    return jax.tree.map(lambda s: sharding.named_sharding(mesh, s.logical_axes, s.shape), specs,
                        is_leaf=is_spec)


def init(specs, key: jax.Array, mesh=None):
    """Initial parameter values; with a mesh, created already sharded by a jitted init."""
    return _compiled_init(specs, mesh)(key)


def initial_values(specs, key: jax.Array):
    """The initial values (traceable): one key per leaf, split from `key` in leaf order."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))
    values = [s.init(k, s.shape, jnp.dtype(s.dtype)) for s, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, values)


@functools.lru_cache(maxsize=32)
def _compiled_init(specs, mesh):
    """One jitted init per (declarations, mesh): specs are hashable frozen dataclasses."""
    out_shardings = shardings(specs, mesh) if mesh is not None else None
    return jax.jit(functools.partial(initial_values, specs), out_shardings=out_shardings)


def count(specs) -> int:
    return sum(s.size for s in jax.tree.leaves(specs, is_leaf=is_spec))
