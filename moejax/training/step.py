"""One jitted training step: loss and gradients, AdamW update, router-state update, metrics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from moejax import sharding
from moejax.config import Config
from moejax.model.transformer import RouterState, loss_fn
from moejax.training import cpu_adamw, grad_reduce
from moejax.training import loss_scale as ls
from moejax.training.optim import learning_rate_schedule, make_optimizer
from moejax.training.state import TrainState, train_state_shardings


def router_temperature(cfg: Config, step: jax.Array) -> jax.Array:
    """softmax_topk temperature: initial x decay^(step // every) (1.0, x0.95 per 1000 steps)."""
    t = cfg.train
    return cfg.moe.temperature * t.temperature_decay ** (step // t.temperature_decay_every)


def mtp_loss_weight(cfg: Config, step: jax.Array) -> jax.Array:
    """lambda of the multi-token-prediction loss: the first weight for the first
    mtp_weight_switch_fraction of the run, then the final weight."""
    t = cfg.train
    switch_step = int(t.mtp_weight_switch_fraction * t.steps)
    return jnp.where(step < switch_step, t.mtp_loss_weight, t.mtp_loss_weight_final)


def update_router_bias(bias: jax.Array, expert_counts: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing: bias [L, E] += rate * sign(mean load - load).

    `expert_counts` [L, E] are token counts over the whole global batch, so every shard applies
    the same update; overloaded experts become less likely to be selected, idle ones more.
    """
    mean_load = jnp.mean(expert_counts, axis=-1, keepdims=True)
    return bias + rate * jnp.sign(mean_load - expert_counts)


def load_statistics(expert_counts: jax.Array, bias: jax.Array) -> dict[str, jax.Array]:
    """Per-layer [L] expert-load summaries: max/mean load, coefficient of variation, bias spread."""
    mean = jnp.mean(expert_counts, axis=-1)
    return {
        "load_max_over_mean": jnp.max(expert_counts, axis=-1) / jnp.maximum(mean, 1e-9),
        "load_cv": jnp.std(expert_counts, axis=-1) / jnp.maximum(mean, 1e-9),
        "router_bias_spread": jnp.max(bias, axis=-1) - jnp.min(bias, axis=-1),
    }


def _value_and_grad(params, batch: dict, extras, cfg: Config):
    """(loss, metrics, grads) of `batch`; extras = (router state, MTP weight, loss scale or
    None). With float16 compute the loss is scaled and the grads unscaled."""
    router, mtp_weight, loss_scale = extras
    if loss_scale is None:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, cfg, router, mtp_weight)
        return loss, metrics, grads

    def scaled(params_):
        loss, metrics = loss_fn(params_, batch, cfg, router, mtp_weight)
        return ls.scale_loss(loss, loss_scale), (loss, metrics)

    (_, (loss, metrics)), grads = jax.value_and_grad(scaled, has_aux=True)(params)
    return loss, metrics, ls.unscale_grads(grads, loss_scale)


def _gradients(state: TrainState, batch: dict, cfg: Config, router: RouterState, mesh):
    """(loss, metrics, grads, grad_sync): GSPMD's implicit reduction (train.grad_compression
    none), or each replica's gradients reduced (and compressed) explicitly (grad_reduce); then
    with train.expert_grad_delay the expert leaves swapped for the previous step's."""
    extras = (router, mtp_loss_weight(cfg, state.step), state.loss_scale)
    value_and_grad = functools.partial(_value_and_grad, cfg=cfg)
    sync = state.grad_sync
    if grad_reduce.uses_explicit(cfg):
        loss, metrics, grads, reduced_sync = grad_reduce.explicit_gradients(
            value_and_grad, state.params, batch, extras, sync, cfg, mesh)
        if sync is not None:  # None: f32 without a delay keeps no state
            sync = sync.replace(error=reduced_sync.error, q=reduced_sync.q)
    else:
        loss, metrics, grads = value_and_grad(state.params, batch, extras)
    if cfg.train.expert_grad_delay:
        grads, delayed = grad_reduce.delay_expert_gradients(grads, sync.delayed, cfg, mesh)
        sync = sync.replace(delayed=delayed)
    return loss, metrics, grads, sync


def _optimizer_step(state: TrainState, grads, grad_norm, apply, cfg: Config, optimizer, mesh):
    """(params, optimizer state) after `optimizer`'s step (make_optimizer(cfg)) where `apply`,
    else the old ones: one kernel over every leaf where cpu_adamw applies, else optax's chain.
    Decided before the update (not from the updated parameters), the choice fuses into the
    update's own element-wise pass over each leaf: no second pass to check and select."""
    if cpu_adamw.applies(state.params, mesh):
        return cpu_adamw.update(cfg, grads, state.opt_state, state.params, grad_norm, apply)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return ls.select_update(apply, (params, opt_state), (state.params, state.opt_state))


def train_step(state: TrainState, batch: dict, cfg: Config, optimizer, mesh=None):
    """state, batch {"tokens": [B, T + 1]} -> (new state, metrics). `mesh`: the mesh the
    explicit gradient reduction runs on (train.grad_compression other than none).

    A step whose loss or gradient norm is not finite (an inf or a NaN in any gradient) changes
    nothing but the skipped-step counts (and, with float16 compute, halves the loss scale), so
    the state, and every checkpoint of it, only ever holds finite values: from finite
    parameters and gradients AdamW's step is finite too (a finite norm bounds every squared
    gradient, so the moments stay finite)."""
    mesh = sharding.current_mesh() if mesh is None else mesh
    router = state.router.replace(temperature=router_temperature(cfg, state.step))
    loss, metrics, grads, grad_sync = _gradients(state, batch, cfg, router, mesh)
    grad_norm = ls.global_norm(grads)
    grads_finite = jnp.isfinite(grad_norm)
    finite = grads_finite & jnp.isfinite(loss)
    params, opt_state = _optimizer_step(state, grads, grad_norm, finite, cfg, optimizer, mesh)
    if cfg.num_moe_layers:
        bias = update_router_bias(router.bias, metrics["expert_counts"], cfg.moe.bias_update_rate)
        router = router.replace(bias=bias)
        metrics.update(load_statistics(metrics["expert_counts"], router.bias))
    router, grad_sync = ls.select_update(finite, (router, grad_sync),
                                         (state.router, state.grad_sync))
    loss_scale = state.loss_scale
    if loss_scale is not None:
        loss_scale = ls.update_loss_scale(loss_scale, grads_finite,
                                          cfg.precision.loss_scale_growth_interval)
        metrics.update(loss_scale=loss_scale.scale)
    skipped = state.skipped.after(~finite)
    metrics.update(
        loss=loss,
        grad_norm=grad_norm,
        learning_rate=learning_rate_schedule(cfg)(state.step),
        router_temperature=router.temperature,
        skipped_steps=skipped.total,
        skipped_in_row=skipped.in_row,
    )
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           router=router, loss_scale=loss_scale, skipped=skipped,
                           grad_sync=grad_sync)
    return new_state, metrics


@functools.lru_cache(maxsize=8)
def compiled_train_step(cfg: Config, mesh):
    """The jitted step with the state's shardings (train_state_shardings) in and out and the
    old state donated; cached so that runs of the same config on the same mesh in one process
    share one compilation."""
    shardings = train_state_shardings(cfg, mesh)
    optimizer = make_optimizer(cfg)
    return jax.jit(
        lambda state, batch: train_step(state, batch, cfg, optimizer, mesh),
        in_shardings=(shardings, None),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )


def eval_step(params, batch: dict, cfg: Config, router: RouterState) -> jax.Array:
    """Mean next-token cross-entropy (nats/token) of one batch."""
    return loss_fn(params, batch, cfg, router)[1]["cross_entropy"]


@functools.lru_cache(maxsize=8)
def compiled_eval_step(cfg: Config):
    return jax.jit(lambda params, batch, router: eval_step(params, batch, cfg, router))
