"""Dynamic loss scaling for fp16 training, pure-functional and jit-compatible.

Use in a train step (all of it under jit; no Python branching on traced values):

    scaled_loss_fn = lambda p: scale_loss(loss_fn(p), loss_scale)
    grads = unscale_grads(jax.grad(scaled_loss_fn)(params), loss_scale)
    finite = jnp.isfinite(global_norm(grads))
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params, opt_state = select_update(finite, (new_params, new_opt_state), (params, opt_state))
    loss_scale = update_loss_scale(loss_scale, finite)

With data parallelism, `finite` must be the same on every replica: compute it on
the all-reduced gradients (or all-reduce it) so that no replica skips alone.
optax has `apply_if_finite` (skips non-finite updates) but no loss scaling, so the
scale bookkeeping lives here; `select_update` reuses `optax.tree_utils.tree_where`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossScaleState:
    scale: jax.Array          # f32 scalar: the loss is multiplied by this
    good_steps: jax.Array     # int32 scalar: finite steps in a row since the last change
    skipped_steps: jax.Array  # int32 scalar: total steps skipped for non-finite gradients


def init_loss_scale(initial: float = 2.0**15) -> LossScaleState:
    return LossScaleState(
        scale=jnp.asarray(initial, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
        skipped_steps=jnp.zeros((), jnp.int32),
    )


def scale_loss(loss, state: LossScaleState):
    """loss * scale, in f32 at least (an f16 loss times 2^15 would overflow)."""
    return loss.astype(jnp.promote_types(loss.dtype, jnp.float32)) * state.scale


def unscale_grads(grads, state: LossScaleState):
    """Divide every gradient leaf by the scale (in f32), keeping each leaf's dtype."""
    def unscale(grad):
        return (grad.astype(jnp.float32) / state.scale).astype(grad.dtype)

    return jax.tree.map(unscale, grads)


def global_norm(tree) -> jax.Array:
    """The L2 norm over every leaf of `tree`, accumulated in float32 at least. It is not finite
    iff a leaf holds an inf or a NaN, or the norm passes float32's range (about 1.8e19 in one
    element: past what global-norm clipping can scale). On float32 leaves these are the very
    ops of optax's own norm (what optax.clip_by_global_norm computes), which XLA then shares."""
    return optax.tree.norm(
        jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree))


def update_loss_scale(
    state: LossScaleState,
    grads_finite,
    growth_interval: int = 2000,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    min_scale: float = 1.0,
) -> LossScaleState:
    """Next loss-scale state after a step whose gradients were (not) all finite.

    Finite: count the step; after `growth_interval` finite steps in a row multiply
    the scale by `growth_factor` (unless that overflows f32) and restart the count.
    Non-finite: multiply the scale by `backoff_factor` (not below `min_scale`),
    restart the count and count a skipped step.
    """
    grads_finite = jnp.asarray(grads_finite, bool)
    good_steps = state.good_steps + 1
    grow = grads_finite & (good_steps >= growth_interval)
    grown_scale = state.scale * growth_factor
    grown_scale = jnp.where(jnp.isfinite(grown_scale), grown_scale, state.scale)
    backed_off_scale = jnp.maximum(state.scale * backoff_factor, min_scale)
    scale = jnp.where(grads_finite, jnp.where(grow, grown_scale, state.scale), backed_off_scale)
    return LossScaleState(
        scale=scale.astype(jnp.float32),
        good_steps=jnp.where(grads_finite & ~grow, good_steps, 0).astype(jnp.int32),
        skipped_steps=state.skipped_steps + (~grads_finite).astype(jnp.int32),
    )


def select_update(finite, new_tree, old_tree):
    """new_tree where `finite`, else old_tree, leaf by leaf (params, optimizer state)."""
    return optax.tree_utils.tree_where(finite, new_tree, old_tree)
