"""The training state: everything a resumed run needs besides the data iterator position."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from moejax.config import Config
from moejax.model.transformer import RouterState, init_params, init_router_state
from moejax.training.loss_scale import LossScaleState, init_loss_scale


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
    opt_state: optax.OptState  # AdamW moments, sharded like the parameters (ZeRO-3)
    router: RouterState  # selection bias and temperature: state, never seen by the optimizer
    loss_scale: LossScaleState | None = None  # float16 compute only: dynamic loss scaling
    # steps skipped because the loss, gradients or updated parameters were not finite:
    skipped: SkippedSteps | None = None


def init_train_state(cfg: Config, key: jax.Array, mesh, optimizer) -> TrainState:
    """A fresh state, every array created directly in its sharding on `mesh`."""
    params = init_params(cfg, key, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh):
        opt_state = jax.jit(optimizer.init)(params)
    return TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        params=params,
        opt_state=opt_state,
        router=jax.device_put(init_router_state(cfg), replicated),
        loss_scale=(jax.device_put(init_loss_scale(cfg.precision.loss_scale_init), replicated)
                    if cfg.precision.uses_loss_scaling else None),
        skipped=jax.device_put(SkippedSteps.zero(), replicated),
    )


def state_shardings(state: TrainState):
    return jax.tree.map(lambda x: x.sharding, state)
