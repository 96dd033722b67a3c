"""Routers (which k experts each token uses, and with what weight) and the balance losses.

All router math is float32. Shapes: N tokens (any leading shape, flattened or not), E experts,
k chosen experts per token, G expert groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moejax.config import MoEConfig
from moejax.model import cpu_kernels, cpu_matmul, cpu_route


@struct.dataclass
class Routing:
    expert_ids: jax.Array  # [..., k] int32, chosen experts
    weights: jax.Array  # [..., k] float32, combine weights of the chosen experts
    probs: jax.Array  # [..., E] float32, per-token scores normalised to sum to 1 (for balance losses)
    logits: jax.Array  # [..., E] float32, raw router logits (for the z-loss)


def softmax_topk(logits: jax.Array, cfg: MoEConfig, temperature) -> Routing:
    """softmax(logits / temperature), top-k; weights optionally renormalised, then scaled."""
    probs = jax.nn.softmax(logits / temperature, axis=-1)
    ids = top_expert_ids(probs, cfg)
    weights = jnp.take_along_axis(probs, ids, axis=-1)
    if cfg.normalize_weights:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights * cfg.routed_scaling_factor
    return Routing(ids.astype(jnp.int32), weights, probs, logits)


def top_expert_ids(scores: jax.Array, cfg: MoEConfig, group_limited: bool = False) -> jax.Array:
    """scores [..., E] -> the top_k experts' ids [..., k] int32, best first (ties: lower id);
    `group_limited`: among the cfg.topk_groups best of cfg.num_groups groups (`group_mask`).
    On CPU one kernel does it (cpu_route.py: the same choice as top_k's), elsewhere top_k."""
    groups = cfg.num_groups if group_limited else 1
    if cpu_kernels.runs_here(jnp.float32):
        return cpu_route.top_expert_ids(scores, cfg.top_k, groups, cfg.topk_groups)
    if groups > 1:
        scores = jnp.where(group_mask(scores, groups, cfg.topk_groups), scores, -jnp.inf)
    return jax.lax.top_k(scores, cfg.top_k)[1].astype(jnp.int32)


def group_mask(biased_scores: jax.Array, num_groups: int, topk_groups: int) -> jax.Array:
    """Boolean [..., E]: True for experts in the `topk_groups` best groups of each token.

    A group's score is the sum of its two best biased expert scores (DeepSeek-V3).
    """
    *lead, num_experts = biased_scores.shape
    grouped = biased_scores.reshape(*lead, num_groups, num_experts // num_groups)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [..., G]
    _, kept_groups = jax.lax.top_k(group_scores, topk_groups)
    kept = jnp.any(jax.nn.one_hot(kept_groups, num_groups, dtype=bool), axis=-2)  # [..., G]
    return jnp.repeat(kept, num_experts // num_groups, axis=-1)


def deepseek_route(logits: jax.Array, bias: jax.Array, cfg: MoEConfig) -> Routing:
    """DeepSeek-V3 gate: sigmoid scores; the bias steers selection only; group-limited top-k.

    Experts outside the kept groups are set to -inf (not 0) so a negative bias can never pull
    one of them in. Weights are the unbiased scores of the chosen experts, normalised, times
    routed_scaling_factor.
    """
    scores = jax.nn.sigmoid(logits)
    ids = top_expert_ids(scores + bias, cfg, group_limited=True)
    weights = deepseek_weights(jnp.take_along_axis(scores, ids, axis=-1), cfg)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    return Routing(ids.astype(jnp.int32), weights, probs, logits)


def deepseek_weights(chosen_scores: jax.Array, cfg: MoEConfig) -> jax.Array:
    """The chosen experts' scores [..., k] -> their combine weights: normalised (if set), times
    routed_scaling_factor."""
    if cfg.normalize_weights:
        chosen_scores = chosen_scores / jnp.sum(chosen_scores, axis=-1, keepdims=True)
    return chosen_scores * cfg.routed_scaling_factor


@jax.custom_vjp
def chosen_logits(x: jax.Array, router_w: jax.Array, ids: jax.Array,
                  logits: jax.Array) -> jax.Array:
    """logits[..., ids] [..., k], differentiable as (x router_w)[..., ids] w.r.t. x [..., D] and
    router_w [D, E]; `logits` = x router_w is given (its value only), ids [..., k] int32. The
    backward does the k chosen columns a token (cpu_route.chosen_logits_backward on CPU),
    elsewhere the dense products of a d_logits zero outside them."""
    return jnp.take_along_axis(logits, ids, axis=-1)


def _chosen_logits_fwd(x, router_w, ids, logits):
    return chosen_logits(x, router_w, ids, logits), (x, router_w, ids)


def _chosen_logits_bwd(residuals, d_chosen):
    x, router_w, ids = residuals
    if cpu_kernels.runs_here(jnp.float32):
        d_x, d_w = cpu_route.chosen_logits_backward(x, router_w, ids, d_chosen)
    else:
        one_hot = jax.nn.one_hot(ids, router_w.shape[1], dtype=d_chosen.dtype)  # [..., k, E]
        d_logits = jnp.einsum("...k,...ke->...e", d_chosen, one_hot)
        d_x = jnp.einsum("...e,de->...d", d_logits, router_w)
        d_w = jnp.einsum("...d,...e->de", x, d_logits)
    return d_x, d_w, None, None


chosen_logits.defvjp(_chosen_logits_fwd, _chosen_logits_bwd)


def deepseek_route_chosen_gradient(x: jax.Array, router_w: jax.Array, logits: jax.Array,
                                   bias: jax.Array, cfg: MoEConfig) -> Routing:
    """`deepseek_route` whose combine weights reach x and router_w through the k chosen logits
    a token alone (`chosen_logits`); probs and logits keep their gradient through `logits`
    (used by the router losses only: with every loss off none flows and the dense product's
    backward is not traced). The same routing and weights."""
    routing = deepseek_route(logits, bias, cfg)
    x, router_w = cpu_kernels.alike(x, router_w)  # inside a shard_map: d_w summed over shards
    chosen = chosen_logits(x, router_w, routing.expert_ids, jax.lax.stop_gradient(logits))
    return routing.replace(weights=deepseek_weights(jax.nn.sigmoid(chosen), cfg))


def route(x: jax.Array, router_w: jax.Array, bias: jax.Array, temperature, cfg: MoEConfig) -> Routing:
    """x [B, T, D] -> Routing over [B, T, ...]; the router matmul runs in float32."""
    x, router_w = x.astype(jnp.float32), router_w.astype(jnp.float32)
    on_cpu = cpu_kernels.runs_here(jnp.float32)
    if on_cpu:  # CPU: BLAS (cpu_matmul.py); its cost grows with E
        logits = cpu_matmul.matmul(x, router_w)
    else:
        logits = jnp.einsum("btd,de->bte", x, router_w)
    if cfg.router != "deepseek":
        return softmax_topk(logits, cfg, temperature)
    if on_cpu:  # the weights' gradient through the chosen logits alone (cpu_route.py)
        return deepseek_route_chosen_gradient(x, router_w, logits, bias, cfg)
    return deepseek_route(logits, bias, cfg)


def expert_counts(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """Tokens assigned to each expert [E] (float32), over every leading axis."""
    one_hot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32)
    return jnp.sum(one_hot, axis=tuple(range(one_hot.ndim - 1)))


def balance_losses(routing: Routing, num_experts: int, top_k: int) -> dict[str, jax.Array]:
    """The three router losses, each over the whole (global) batch [B, T, ...].

    - switch: E * sum_i f_i * P_i with f_i the fraction of assignments to expert i and P_i the
      mean normalised score (1.0 when perfectly balanced);
    - seq_balance: DeepSeek-V3 sequence-wise loss, sum_i f_i * P_i per sequence with
      f_i = E / (k T) * count_i, averaged over sequences (1.0 when balanced);
    - z: mean over tokens of logsumexp(logits)^2.
    Also the mean normalised scores [E] (`mean_probs`), from which merge_microbatches rebuilds
    the switch loss of a batch seen in microbatches.
    """
    one_hot = jax.nn.one_hot(routing.expert_ids, num_experts, dtype=jnp.float32)  # [B,T,k,E]
    counts_per_seq = jnp.sum(one_hot, axis=(1, 2))  # [B, E]
    seq_len = routing.expert_ids.shape[1]
    mean_probs = jnp.mean(routing.probs, axis=(0, 1))
    switch = switch_loss(jnp.sum(counts_per_seq, axis=0), mean_probs)
    seq_f = num_experts / (top_k * seq_len) * counts_per_seq
    seq_balance = jnp.mean(jnp.sum(seq_f * jnp.mean(routing.probs, axis=1), axis=-1))
    z = jnp.mean(jnp.square(jax.nn.logsumexp(routing.logits, axis=-1)))
    return {"switch_loss": switch, "seq_balance_loss": seq_balance, "z_loss": z,
            "mean_probs": mean_probs}


def switch_loss(counts: jax.Array, mean_probs: jax.Array) -> jax.Array:
    """E * sum_i f_i * P_i from the assignment counts [E] and the mean normalised scores [E]."""
    return counts.shape[-1] * jnp.sum(counts / jnp.sum(counts) * mean_probs)


def merge_microbatches(stats: dict) -> dict:
    """Per-layer statistics of equal-sized microbatches (leaves [L, m, ...]) -> those of the
    whole batch ([L, ...]): counts add, means average, and the switch loss (a product of two
    batch means, not a mean itself) is recomputed from the merged counts and scores."""
    merged = {name: jnp.mean(value, axis=1) for name, value in stats.items()}
    merged["expert_counts"] = jnp.sum(stats["expert_counts"], axis=1)
    merged["switch_loss"] = jax.vmap(switch_loss)(merged["expert_counts"], merged["mean_probs"])
    return merged
