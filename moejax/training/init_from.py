"""Start training from an imported model (`train.init_from`): a Hugging Face checkpoint
directory (config.json) or a moejax one (scripts/convert_hf.py to-moejax, config.yaml). The
weights and the router state (e.g. DeepSeek's e_score_correction_bias) come from it; the
optimizer starts fresh."""

from __future__ import annotations

from pathlib import Path

import jax

from moejax.config import Config, ConfigError, config_to_dict

# Settings that shape training but not the model's function, so they may differ from the
# checkpoint's config.
TRAINING_ONLY = {"model.remat", "model.unroll_layers", "model.init_std", "moe.dispatch",
                 "moe.tile_rows", "moe.kernels",
                 "moe.capacity_factor", "moe.drop_policy", "moe.switch_loss_coef",
                 "moe.seq_balance_loss_coef", "moe.z_loss_coef", "moe.bias_update_rate",
                 "moe.temperature", "model.attention_block"}


def check_init_from(cfg: Config) -> Path:
    """train.init_from as a directory, or ConfigError saying what is wrong with it."""
    path = Path(cfg.train.init_from)
    if not path.is_dir():
        found = "is a file, not a directory" if path.exists() else "does not exist"
        raise ConfigError(f"train.init_from={str(path)!r} {found}: give a Hugging Face "
                          "checkpoint directory or one written by scripts/convert_hf.py "
                          "to-moejax.")
    return path


def load_initial_model(cfg: Config, mesh):
    """(params without the carried router state, router bias [L, E]) from train.init_from,
    placed on `mesh` in precision.param_dtype; ConfigError if it holds another model."""
    from moejax.convert import load_hf, load_moejax

    path = check_init_from(cfg)
    dtype = f"precision.param_dtype={cfg.precision.param_dtype}"
    if (path / "config.json").is_file():
        loaded_cfg, params = load_hf(path, mesh, overrides=[dtype])[:2]
    elif (path / "config.yaml").is_file():
        loaded_cfg, params = load_moejax(path, mesh)[:2]
        weights = jax.tree.map(lambda x: x.astype(cfg.precision.param_dtype),
                               params.replace(router_state=None))
        params = weights.replace(router_state=params.router_state)
    else:
        raise ConfigError(f"train.init_from={str(path)!r} holds no checkpoint (no config.json or "
                          "config.yaml): give a Hugging Face checkpoint directory or one written "
                          "by scripts/convert_hf.py to-moejax.")
    differences = model_differences(loaded_cfg, cfg)
    if differences:
        raise ConfigError(f"train.init_from={str(path)!r} holds a different model: "
                          f"{', '.join(differences)}; set these in the config to match it.")
    return params.replace(router_state=None), params.router_state.bias


def model_differences(checkpoint: Config, cfg: Config) -> list[str]:
    """'key (checkpoint -> config)' for each model or MoE setting that differs."""
    found = []
    for section in ("model", "moe"):
        ours, theirs = config_to_dict(cfg)[section], config_to_dict(checkpoint)[section]
        found += [f"{section}.{key} ({theirs[key]!r} -> {value!r})"
                  for key, value in ours.items()
                  if f"{section}.{key}" not in TRAINING_ONLY and theirs[key] != value]
    return found
