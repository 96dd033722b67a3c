"""AdamW with linear warmup + cosine decay, global-norm clipping, decay on matrices only."""

from __future__ import annotations

import jax
import optax

from moejax.config import Config
from moejax.model.transformer import model_specs
from moejax.params import LAYER_AXES, is_spec

ADAM_EPS = 1e-8  # optax.adamw's default, named for training/cpu_adamw.py's kernel


def learning_rate_schedule(cfg: Config) -> optax.Schedule:
    t = cfg.train
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=t.learning_rate,
        warmup_steps=min(t.warmup_steps, t.steps - 1),
        decay_steps=t.steps,
        end_value=t.learning_rate * t.min_learning_rate_ratio,
    )


def weight_decay_mask(cfg: Config):
    """True for weight matrices; False for norms (vectors, stacked or not)."""

    def is_matrix(spec):
        return sum(axis not in LAYER_AXES for axis in spec.logical_axes) >= 2

    return jax.tree.map(is_matrix, model_specs(cfg), is_leaf=is_spec)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    t = cfg.train
    adamw = optax.adamw(
        learning_rate_schedule(cfg), b1=t.adam_b1, b2=t.adam_b2, eps=ADAM_EPS,
        weight_decay=t.weight_decay, mask=weight_decay_mask(cfg),
    )
    if t.grad_clip <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
