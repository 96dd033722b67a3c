"""moejax: pure-functional JAX training of DeepSeek-V3-style Mixture-of-Experts transformers.

The curated public API; everything else is importable from its module but may change.
Generation lives in `moejax.generate` (generate, load_model), Hugging Face conversion in
`moejax.convert` (load_hf, save_hf).
"""

from moejax.config import Config, ConfigError, load_config
from moejax.model.transformer import (
    KVCache,
    RouterState,
    Transformer,
    count_params,
    forward,
    forward_cached,
    init_cache,
    init_params,
    init_router_state,
    loss_fn,
    model_specs,
)
from moejax.sharding import make_mesh
from moejax.training.loop import train

__all__ = [
    "Config",
    "ConfigError",
    "KVCache",
    "RouterState",
    "Transformer",
    "count_params",
    "forward",
    "forward_cached",
    "init_cache",
    "init_params",
    "init_router_state",
    "load_config",
    "loss_fn",
    "make_mesh",
    "model_specs",
    "train",
]
__version__ = "0.1.0"
