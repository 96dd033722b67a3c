"""The trainer's AdamW step (make_optimizer: global-norm clipping, AdamW with its decay mask and
learning-rate schedule) as one XLA:CPU FFI call over every parameter leaf (csrc/adamw.cc in
moejax/model, built with moejax's other CPU kernels by cpu_kernels.py).

Why: optax's chain works leaf by leaf, and XLA:CPU compiles each leaf's update, the skipped
step's select and the copies its buffer aliasing then needs as kernels of their own, each
compiled and each run every step (the default preset's compile: 4.7 s at the record before
this kernel, 2.6 s with it and cpu_matmul, docs/bench_hf_model.md). The call reads each leaf's
parameter, gradient and moments once and writes the new ones in place.

It keeps optax's state (make_optimizer's init: checkpoints and shardings are unchanged) and
computes optax's arithmetic in optax's order, so the two agree to float32 rounding (tested).
Used where the parameters are float32, the CPU kernels run here (cpu_kernels.runs) and the
mesh is one device: on a mesh, a leaf's update runs on each device's shard of it, which is
optax's chain under GSPMD.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.config import Config
from moejax.model import cpu_kernels
from moejax.training import optim

TARGET = "moejax_adamw"


def applies(params, mesh) -> bool:
    """Whether `update` takes the step of `params` on `mesh` (None, no mesh set: optax's chain,
    since the arrays' own shardings may span devices)."""
    return (mesh is not None and mesh.size == 1 and cpu_kernels.runs(jnp.float32)
            and all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params)))


def update(cfg: Config, grads, opt_state, params, grad_norm: jax.Array, apply: jax.Array):
    """(new params, new optimizer state) of one step of make_optimizer(cfg) where `apply`, else
    the old ones; `grad_norm` is the gradients' global norm (loss_scale.global_norm, the
    clipping's norm)."""
    t = cfg.train
    adam = optax.tree_utils.tree_get(opt_state, "ScaleByAdamState")
    count = optax.safe_increment(adam.count)
    clip = (t.grad_clip > 0) & ~(grad_norm < t.grad_clip)  # optax clips unless norm < max
    scalars = jnp.stack([  # the order of csrc/adamw.cc's Scalar
        apply, clip, grad_norm, t.grad_clip,
        1 - t.adam_b1 ** count, 1 - t.adam_b2 ** count,  # optax's bias corrections
        -optim.learning_rate_schedule(cfg)(adam.count),
    ]).astype(jnp.float32)
    leaves, tree = jax.tree.flatten(params)
    cpu_kernels.require(leaves, "the CPU AdamW kernel", "cpu_kernels.off() for optax's chain")
    groups = [leaves, tree.flatten_up_to(grads), tree.flatten_up_to(adam.mu),
              tree.flatten_up_to(adam.nu)]
    n = len(leaves)
    call = jax.ffi.ffi_call(
        TARGET, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (*leaves, *leaves, *leaves)],
        # results: params, mu, nu; each written over its input (arguments: scalars first)
        input_output_aliases={1 + i + k * n: i + r * n
                              for r, k in enumerate((0, 2, 3)) for i in range(n)},
        vmap_method="sequential")
    decayed = tree.flatten_up_to(optim.weight_decay_mask(cfg))
    out = call(scalars, *(x for group in groups for x in group),
               b1=np.float32(t.adam_b1), one_minus_b1=np.float32(1 - t.adam_b1),
               b2=np.float32(t.adam_b2), one_minus_b2=np.float32(1 - t.adam_b2),
               eps=np.float32(optim.ADAM_EPS), weight_decay=np.float32(t.weight_decay),
               decayed=np.asarray(decayed, np.int32))
    new_params, mu, nu = (tree.unflatten(out[r * n:(r + 1) * n]) for r in range(3))
    opt_state = optax.tree_utils.tree_set(  # both counts: adam's and the schedule's
        opt_state, mu=mu, nu=nu, count=jnp.where(apply, count, adam.count))
    return new_params, opt_state
