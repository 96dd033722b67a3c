"""The training state: everything a resumed run needs besides the data iterator position."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from moejax import params as P
from moejax import sharding
from moejax.config import Config
from moejax.model.transformer import RouterState, init_router_state, initial_params, param_specs
from moejax.training.grad_reduce import GradSyncState, init_sync_state, sync_state_shardings
from moejax.training.loss_scale import LossScaleState, init_loss_scale
from moejax.training.optim import make_optimizer


@struct.dataclass
class SkippedSteps:
    total: jax.Array  # [] int32, over the whole run
    in_row: jax.Array  # [] int32, ending at the latest step (0 after a good step)

    @classmethod
    def zero(cls) -> SkippedSteps:
        return cls(total=jnp.zeros((), jnp.int32), in_row=jnp.zeros((), jnp.int32))

    def after(self, skipped: jax.Array) -> SkippedSteps:
        skipped = skipped.astype(jnp.int32)
        return SkippedSteps(total=self.total + skipped, in_row=(self.in_row + 1) * skipped)


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, optimizer steps taken
    params: object  # Transformer, float32 master weights
    opt_state: optax.OptState  # AdamW moments: sharded like the parameters and further over
    # the data-parallel devices that hold the same parameter (moment_sharding)
    router: RouterState  # selection bias and temperature: state, never seen by the optimizer
    loss_scale: LossScaleState | None = None  # float16 compute only: dynamic loss scaling
    # steps skipped because the loss or the gradients were not finite:
    skipped: SkippedSteps | None = None
    # train.grad_compression / expert_grad_delay: error-feedback residuals, PowerSGD factors,
    # delayed expert gradients (training/grad_reduce.py); None when the config keeps none
    grad_sync: GradSyncState | None = None


def _fresh_state(cfg: Config, key: jax.Array, optimizer, mesh) -> TrainState:
    """The initial state's values (traced under jit: the shardings come from out_shardings);
    `mesh` sizes the per-replica gradient state."""
    params = initial_params(cfg, key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        router=init_router_state(cfg),
        loss_scale=(init_loss_scale(cfg.precision.loss_scale_init)
                    if cfg.precision.uses_loss_scaling else None),
        skipped=SkippedSteps.zero(),
        grad_sync=init_sync_state(cfg, mesh),
    )


def moment_sharding(moment: jax.ShapeDtypeStruct, param: NamedSharding) -> NamedSharding:
    """An AdamW moment's sharding: its parameter's, split further over each of ZERO_AXES that
    the parameter is repeated over (and that divides one of its dimensions). The update then
    runs on 1 / (those axes) of each parameter and the new parameters are gathered back: no
    device holds a moment another device with the same parameter also holds."""
    spec = sharding.spread_over(param.spec, moment.shape, param.mesh, sharding.ZERO_AXES)
    return NamedSharding(param.mesh, spec)


def train_state_shardings(cfg: Config, mesh) -> TrainState:
    """Where every leaf of the state lives on `mesh` (concrete or abstract): parameters by
    their declared logical axes; AdamW moments like their parameters and further split over the
    devices that repeat the parameter (moment_sharding); scalars and router state replicated."""
    optimizer = make_optimizer(cfg)
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = jax.eval_shape(lambda key: _fresh_state(cfg, key, optimizer, mesh),
                            jax.random.key(0))
    params = P.shardings(param_specs(cfg), mesh)
    return shapes.replace(
        step=replicated,
        params=params,
        opt_state=optax.tree_map_params(optimizer, moment_sharding, shapes.opt_state, params,
                                        transform_non_params=lambda _: replicated),
        router=jax.tree.map(lambda _: replicated, shapes.router),
        loss_scale=jax.tree.map(lambda _: replicated, shapes.loss_scale),
        skipped=jax.tree.map(lambda _: replicated, shapes.skipped),
        grad_sync=sync_state_shardings(cfg, mesh, shapes.grad_sync),
    )


def abstract_train_state(cfg: Config, mesh) -> TrainState:
    """The state as ShapeDtypeStructs carrying their shardings on `mesh`: what
    `init_train_state` creates, without creating it (for planning at full size)."""
    shapes = jax.eval_shape(lambda key: _fresh_state(cfg, key, make_optimizer(cfg), mesh),
                            jax.random.key(0))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, train_state_shardings(cfg, mesh))


def init_train_state(cfg: Config, key: jax.Array, mesh) -> TrainState:
    """A fresh state, every array created directly in its sharding on `mesh`."""
    return _compiled_init(cfg, mesh)(key)


@functools.lru_cache(maxsize=8)
def _compiled_init(cfg: Config, mesh):
    optimizer = make_optimizer(cfg)
    return jax.jit(lambda key: _fresh_state(cfg, key, optimizer, mesh),
                   out_shardings=train_state_shardings(cfg, mesh))
