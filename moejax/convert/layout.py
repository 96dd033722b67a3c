"""Checkpoint layouts: for every tensor name in a checkpoint, its shape there and where its values
live in the moejax parameter pytree (`moejax.model.transformer.Transformer`).

A layout is a list of `TensorMap`s. Each names one checkpoint tensor and one or more
`Placement`s: a leaf of the pytree (an attribute path such as ("moe_blocks", "attn", "wq")), the
leading indices into that stacked leaf (layer, and expert for per-expert tensors) and the
conversions in both directions. Layouts are pure data computed from a `Config`; the file
reading and writing lives in `moejax.convert.shards`.

Leaf paths under ROUTER_STATE name the leaves of a `moejax.RouterState` rather than parameters
(DeepSeek's `e_score_correction_bias` is a row of its selection bias). A tensor with
`duplicate_of` set is a second copy of another tensor's values (DeepSeek's MTP layers repeat the
embedding and the output head): it is written on export and checked equal on import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from moejax.params import is_spec

LeafPath = tuple[str, ...]  # attribute names from the Transformer root down to one leaf
# leaves under these are stacked [layers, ...] (the MTP modules [depth, ...])
BLOCK_STACKS = ("dense_blocks", "moe_blocks", "mtp")
ROUTER_STATE = "router_state"  # leaf paths (ROUTER_STATE, field) name RouterState's leaves
ROUTER_BIAS: LeafPath = (ROUTER_STATE, "bias")  # [L_moe + D_mtp, E] float32


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where (part of) one checkpoint tensor lives in the parameters."""

    leaf: LeafPath
    index: tuple[int, ...]  # leading indices into the leaf: (), (layer,) or (layer, expert)
    to_moejax: Callable[[np.ndarray], np.ndarray]  # checkpoint tensor -> leaf[index]
    # leaf[index] -> checkpoint tensor; None for parts of a tensor that is only ever read
    to_checkpoint: Callable[[np.ndarray], np.ndarray] | None


@dataclasses.dataclass(frozen=True)
class TensorMap:
    name: str
    shape: tuple[int, ...]  # in the checkpoint
    placements: tuple[Placement, ...]
    dtype: str | None = None  # written in this dtype whatever the export dtype (router bias)
    duplicate_of: str | None = None  # the tensor whose values this one repeats

    @property
    def writable(self) -> bool:
        return len(self.placements) == 1 and self.placements[0].to_checkpoint is not None


def single(name: str, leaf: LeafPath, index: tuple[int, ...], to_moejax, to_checkpoint,
           shape: tuple[int, ...], **options) -> TensorMap:
    """A checkpoint tensor that is exactly one (slice of a) leaf."""
    return TensorMap(name, shape, (Placement(leaf, index, to_moejax, to_checkpoint),), **options)


def leaf_specs(specs) -> tuple[dict[LeafPath, object], object]:
    """({leaf path: ParamSpec} in pytree order, treedef) of a Transformer of ParamSpecs."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
    return {tuple(key.name for key in path): spec for path, spec in flat}, treedef


# Conversions. torch's nn.Linear stores [out, in]; moejax stores [in, out] (heads split out).


def identity(x: np.ndarray) -> np.ndarray:
    return x


def swap_last_axes(x: np.ndarray) -> np.ndarray:
    """[..., out, in] <-> [..., in, out]: nn.Linear weights, one expert or a fused stack."""
    return np.swapaxes(x, -1, -2)


def linear_to_heads(x: np.ndarray, heads: int) -> np.ndarray:
    """q/k/v_proj [H Q, D] -> [D, H, Q]."""
    return x.T.reshape(x.shape[1], heads, x.shape[0] // heads)


def heads_to_linear(w: np.ndarray) -> np.ndarray:
    """[D, H, Q] -> q/k/v_proj [H Q, D]."""
    return w.reshape(w.shape[0], -1).T


def out_linear_to_heads(x: np.ndarray, heads: int) -> np.ndarray:
    """o_proj [D, H Q] -> [H, Q, D]."""
    return x.T.reshape(heads, x.shape[1] // heads, x.shape[0])


def heads_to_out_linear(w: np.ndarray) -> np.ndarray:
    """[H, Q, D] -> o_proj [D, H Q]."""
    return w.reshape(-1, w.shape[-1]).T


def fused_gate_up_half(x: np.ndarray, half: int) -> np.ndarray:
    """Fused experts gate_up_proj [E, 2F, D] (gate rows first, then up) -> w_gate (half 0) or
    w_up (half 1) [E, D, F]."""
    width = x.shape[1] // 2
    return np.swapaxes(x[:, half * width:(half + 1) * width], 1, 2)


def rope_halves_from_pairs(x: np.ndarray, rope_dim: int) -> np.ndarray:
    """Reorder the last `rope_dim` (> 0) entries of the last axis from adjacent RoPE pairs
    (2i, 2i + 1), as DeepSeek's interleaved weights are rotated, to moejax's halves
    (i, i + rope_dim / 2): the even entries first, then the odd ones. Scores q . k do not
    change when the query and the key dims move alike."""
    rest, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    return np.concatenate([rest, rope[..., 0::2], rope[..., 1::2]], axis=-1)


def rope_pairs_from_halves(x: np.ndarray, rope_dim: int) -> np.ndarray:
    """The inverse of rope_halves_from_pairs."""
    rest, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    half = rope_dim // 2
    pairs = np.stack([rope[..., :half], rope[..., half:]], axis=-1).reshape(rope.shape)
    return np.concatenate([rest, pairs], axis=-1)


def native_layout(specs) -> list[TensorMap]:
    """moejax's own layout: one tensor per leaf, split per layer for the block stacks and per
    depth for the MTP modules ("moe_blocks.3.ffn.w_gate" [E, D, F], "mtp.0.proj" [2D, D]);
    names follow the attribute paths."""
    maps = []
    for path, spec in leaf_specs(specs)[0].items():
        if path[0] not in BLOCK_STACKS:
            maps.append(TensorMap(".".join(path), spec.shape,
                                  (Placement(path, (), identity, identity),)))
            continue
        for layer in range(spec.shape[0]):
            name = ".".join((path[0], str(layer), *path[1:]))
            maps.append(TensorMap(name, spec.shape[1:],
                                  (Placement(path, (layer,), identity, identity),)))
    return maps
