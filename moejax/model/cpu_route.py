"""The router on XLA:CPU: each token's k best experts by score, with DeepSeek-V3's group limit
where set, in one XLA FFI call (csrc/route_topk.cc, built by cpu_kernels.py); and the gradient
of the chosen logits (`chosen_logits_backward`, csrc/router_backward.cc, below).

Why: XLA:CPU's top_k partially sorts an index list per token through a comparator, and the
group-limited choice is five such passes and masks over [tokens, E] arrays (the groups' top 2,
their sums, the groups' top_k, a one-hot mask, the final top_k). Both grow with E (a profile
by hand; docs/bench_moe.md's E=128 and DeepSeek-shaped rows time the layer with this kernel).
Here one pass per token keeps its k best in a sorted list of k.

The choice is XLA:CPU top_k's exactly (its total order of float bits, ties to the lower index,
best first), so this path and XLA's route every token alike (tests/test_cpu_kernels.py). The
expert ids carry no gradient; the weights are gathered from the scores by the caller, as
differentiable as top_k's values. Used where `cpu_kernels.runs_here` (float32: the router's
scores are float32 whatever the compute dtype), route running per shard of tokens on a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.model import cpu_kernels

TARGET = "moejax_route_topk"
CHOSEN_BACKWARD_TARGET = "moejax_router_chosen_backward"


def top_expert_ids(scores: jax.Array, k: int, num_groups: int = 1,
                   topk_groups: int = 1) -> jax.Array:
    """scores [..., E] float32 -> the k best experts' ids [..., k] int32, best first; with
    num_groups > 1 only among the `topk_groups` groups (of E / num_groups consecutive experts)
    whose two best scores sum highest."""
    cpu_kernels.require((scores,), "the CPU expert choice", "cpu_kernels.off() for top_k")
    call = jax.ffi.ffi_call(
        TARGET, cpu_kernels.result(scores, (*scores.shape[:-1], k), jnp.int32),
        vmap_method="broadcast_all")
    # ids are integers: nothing flows back through the choice
    return call(jax.lax.stop_gradient(scores), k=k, groups=num_groups,
                topk_groups=topk_groups if num_groups > 1 else 1)


def chosen_logits_backward(x: jax.Array, w: jax.Array, ids: jax.Array,
                           d_chosen: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The gradients of chosen = (x w)[..., ids] w.r.t. x [..., D] and w [D, E], from d_chosen
    [..., k]: d_x = sum_j d_chosen[..., j] w[:, ids[..., j]] and d_w[:, e] = the sum of
    d_chosen x over the (token, slot) pairs that chose e.

    Why: DeepSeek's sigmoid gate makes each combine weight of the chosen logits alone, so the
    weights' d_logits [..., E] is zero outside k entries a token, yet its two dense products
    (d_logits w^T, x^T d_logits) cost 2 T D E FLOPs each, E / k times the work that is there;
    this call does the k columns only (router.route; the router losses, where on, keep their
    dense backward)."""
    cpu_kernels.require((x, w, d_chosen), "the CPU router backward",
                        "cpu_kernels.off() for XLA's dense products")
    call = jax.ffi.ffi_call(
        CHOSEN_BACKWARD_TARGET, (cpu_kernels.result(x, x.shape), cpu_kernels.result(x, w.shape)),
        vmap_method="sequential")
    return call(x, w, ids.astype(jnp.int32), d_chosen)
