"""Configuration: frozen dataclasses, YAML presets and dotted overrides, validated at load time.

A `Config` is immutable and hashable, so it can be passed to `jax.jit` as a static argument.
Loading goes through an OmegaConf structured schema, which rejects unknown keys and wrong types;
`validate` then rejects impossible combinations. Every failure is a `ConfigError` whose message
is one sentence saying what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# the presets ship inside the package (`configs/` in a checkout links here)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MESH_AXES = ("pipe", "data", "fsdp", "expert")  # pipe outermost: stages may span hosts


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


ATTENTION_KERNELS = ("auto", "plain", "blockwise", "cudnn", "blas")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128  # D
    num_layers: int = 4  # L, dense + MoE layers
    num_dense_layers: int = 1  # the first k layers use a dense FFN (DeepSeek first_k_dense_replace)
    num_heads: int = 4  # H
    num_kv_heads: int = 2  # K (grouped-query attention)
    head_dim: int = 32  # Q
    qk_norm: bool = False  # RMSNorm on each query and key head before RoPE (Qwen3)
    attention: str = "gqa"  # gqa | mla (DeepSeek multi-head latent attention)
    # MLA shapes (attention=mla; head_dim and num_kv_heads are then unused):
    q_lora_rank: int = 0  # query latent width; 0 projects queries directly from the model width
    kv_lora_rank: int = 64  # key/value latent width: what a generation cache stores per token
    qk_nope_head_dim: int = 32  # per-head query/key dims without position information
    qk_rope_head_dim: int = 16  # decoupled RoPE dims; one RoPE key is shared by all heads
    v_head_dim: int = 32
    mtp_depth: int = 0  # D multi-token-prediction modules (DeepSeek-V3: 1)
    ffn_dim: int = 512  # F of the dense FFN layers
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | yarn (context extension of the RoPE dims)
    yarn_factor: float = 1.0  # context length / yarn_original_max_len
    yarn_beta_fast: float = 32.0  # rotations above which a frequency is kept (extrapolated)
    yarn_beta_slow: float = 1.0  # rotations below which a frequency is divided by the factor
    yarn_original_max_len: int = 4096  # the pre-training context length
    yarn_mscale: float = 1.0  # cos/sin get mscale(factor, yarn_mscale) / mscale(factor, all_dim)
    yarn_mscale_all_dim: float = 1.0  # MLA's softmax scale gets mscale(factor, all_dim)^2
    norm_eps: float = 1e-6
    init_std: float = 0.02
    remat: str = "none"  # none | full | dots
    # a layer stack of at most this many layers runs unrolled (straight-line code) rather than
    # as a jax.lax.scan, outside a pipeline: on the 2-core CPU the scan's stacked per-layer
    # buffers cost the tiny DeepSeek-shaped step ~10% of its time and unrolling 3 layers did
    # not lengthen the compile (docs/bench_hf_model.md); 0: always a scan
    unroll_layers: int = 4
    # Training attention in blocks of this many positions (moejax/model/blockwise.py: memory
    # linear in T) when the sequence is longer than one block, cuDNN's flash attention on NVIDIA
    # GPUs where it takes the shapes; 0 or null: the materialised [T, T] scores everywhere.
    # 256: on the 2-core CPU the small preset's layer (fwd+bwd) took 0.49x, 0.22x and 0.17x the
    # materialised step's time at T = 512, 1024, 2048 in 256-blocks, as fast as or faster than
    # 128, 512, 1024 (docs/attention.md). T <= 256 (the tiny presets' 128) is one block: it
    # keeps the plain path (except on CPU in float32, where auto below runs blas).
    attention_block: int | None = 256
    # Training attention's kernel (moejax/model/attention.py, attention_kernel): auto | plain |
    # blockwise | cudnn | blas. auto: the rules above, and on CPU in float32 blas (OpenBLAS GEMMs
    # in one XLA custom call per direction, moejax/model/cpu_attention.py) where it builds.
    attention_kernel: str = "auto"


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8  # E routed experts; 0 makes every layer dense (the baseline model)
    top_k: int = 2  # k experts per token
    expert_ffn_dim: int = 256  # F of one routed (and one shared) expert
    num_shared_experts: int = 0
    router: str = "deepseek"  # deepseek | softmax_topk
    num_groups: int = 1  # G expert groups for group-limited routing (deepseek router)
    topk_groups: int = 1  # groups kept per token
    routed_scaling_factor: float = 1.0
    normalize_weights: bool = True  # renormalise the top-k weights to sum to 1 (before scaling)
    temperature: float = 1.0  # softmax_topk: initial temperature of softmax(logits / temperature)
    # dropless: sorted token copies and a grouped GEMM, nothing dropped (DeepSeek);
    # capacity: fixed buffers of capacity_factor x the mean load, overflow dropped (Switch);
    # dense: every expert on every token (a test oracle)
    dispatch: str = "dropless"
    tile_rows: int = 256  # dropless: the largest row tile (docs/bench_moe.md); see row_tile
    # dropless: tiles (a tiled grouped GEMM, dense all_to_all: CPU) | blocks (each expert's
    # first ~N k / E rows in one batched GEMM, the overflow in tiles: CPU, more memory;
    # dispatch/dropless.py blocks_then_tiles) | blas (each expert's rows as OpenBLAS GEMMs,
    # the whole SwiGLU one XLA FFI call, no padding: CPU, float32; model/cpu_swiglu.py) | ragged
    # (ragged_dot and ragged_all_to_all: GPU/TPU) | auto (ragged off CPU; on CPU blas for
    # float32 compute where its library builds, else tiles)
    kernels: str = "auto"
    # dropless under expert parallelism: each (source, destination) exchange buffer holds
    # receive_factor x the rows a pair expects under balanced routing; rows beyond it travel in
    # further exchange rounds (never dropped). null: buffers for the worst case (every token of
    # every shard to one shard's experts), one round (dispatch/dropless.py pair_capacity)
    receive_factor: float | None = None
    # run the layer as two sequence halves, each dispatch -> experts -> combine -> + shared, so
    # one half's all-to-all can be in flight while the other computes (model/moe.py in_halves)
    overlap_halves: bool = False
    capacity_factor: float | None = None  # capacity: None gives worst-case buffers (no drops)
    drop_policy: str = "position"  # position | probs
    switch_loss_coef: float = 0.0  # Switch Transformer load-balance loss
    seq_balance_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss (alpha)
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    bias_update_rate: float = 0.001  # aux-loss-free balancing step (gamma); 0 freezes the bias


@dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = 1
    expert: int = -1  # -1: whatever devices are left
    # pipeline stages: the layer stack is split over them (moejax/model/pipeline.py); last so
    # that MeshConfig(data, fsdp, expert) keeps its meaning
    pipe: int = 1

    def axis_sizes(self, num_devices: int) -> tuple[int, int, int, int]:
        """Resolve -1 to the remaining devices; raises ConfigError if the sizes cannot fit.

        Explicit sizes may use fewer devices than are visible (e.g. a 1-device reference run on
        an 8-device host); the mesh then takes the first of them."""
        sizes = [getattr(self, axis) for axis in MESH_AXES]
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ConfigError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))} are invalid: use positive sizes and at "
                "most one -1 (meaning 'the remaining devices')."
            )
        known = math.prod(s for s in sizes if s != -1)
        if known > num_devices:
            raise ConfigError(
                f"mesh {dict(zip(MESH_AXES, sizes))} needs {known} devices but only "
                f"{num_devices} are available: make the product of the mesh sizes at most "
                f"{num_devices}."
            )
        if -1 in sizes and num_devices % known:
            raise ConfigError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {num_devices} "
                "available devices, so -1 has no whole size: choose sizes whose product divides "
                "the device count, or give every axis explicitly."
            )
        return tuple(num_devices // known if s == -1 else s for s in sizes)


@dataclass(frozen=True)
class PrecisionConfig:
    param_dtype: str = "float32"  # master weights
    compute_dtype: str = "bfloat16"  # matmul inputs; router, norms and softmax stay float32
    # the residual stream between layers (and so the activations a pipeline or remat keeps):
    # float32, or bfloat16 (Megatron's default) for half the activation memory; norms, the
    # router, softmax and the loss still compute in float32
    residual_dtype: str = "float32"
    fp8: str = "none"  # none | tensor (per-tensor scaling, cuBLASLt fp8) | block (DeepSeek 1x128/128x128)
    fp8_layers: str = "attention,dense_ffn,shared,experts"  # comma-separated layer groups
    fp8_block_size: int = 128  # tile / block edge of the block recipe
    # send MoE dispatch payloads as e4m3 with power-of-two scales (dropless: one per 1 x
    # fp8_block_size slice of a token row, as DeepSeek-V3; capacity: one per token)
    fp8_dispatch: bool = False
    loss_scale_init: float = 32768.0  # float16 only: dynamic loss scaling start value
    loss_scale_growth_interval: int = 2000  # float16 only: finite steps before the scale doubles

    @property
    def fp8_layer_groups(self) -> tuple[str, ...]:
        return tuple(g.strip() for g in self.fp8_layers.split(",") if g.strip())

    @property
    def uses_loss_scaling(self) -> bool:
        return self.compute_dtype == "float16"


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 128  # tokens per example (the model sees seq_len, predicts seq_len targets)
    global_batch_size: int = 16  # examples per step over all hosts
    steps: int = 300
    seed: int = 0  # parameter init and data order
    learning_rate: float = 3e-3  # peak, after linear warmup
    min_learning_rate_ratio: float = 0.1  # cosine decays to peak * ratio
    warmup_steps: int = 30  # linear warmup; a short run warms up for at most steps - 1
    weight_decay: float = 0.1  # AdamW, on matrices only (not norms, biases or router state)
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    temperature_decay: float = 0.95  # softmax_topk temperature x decay every decay_every steps
    temperature_decay_every: int = 1000
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8
    checkpoint_every: int = 100  # 0: only at the end (and on SIGTERM/SIGINT)
    keep_checkpoints: int = 2
    peak_flops_per_device: float = 0.0  # for MFU; 0 measures a large matmul at start-up
    # XLA's persistent compilation cache (moejax.train and scripts/train.py): a relaunch or
    # resume of the same config on the same machine loads its compiled steps from here instead
    # of compiling them again. null: off. Left alone where jax's own setting is already made
    # (JAX_COMPILATION_CACHE_DIR)
    compilation_cache: str | None = "~/.cache/moejax/xla"
    # a step whose loss or gradients are not finite is skipped (the state
    # is kept); this many skipped in a row stop the run as diverged
    max_skipped_steps_in_row: int = 10
    # a Hugging Face or moejax checkpoint directory whose weights and router state a fresh run
    # starts from (fine-tuning); None: random initialisation with `seed`
    init_from: str | None = None
    # multi-token prediction (model.mtp_depth > 0): loss weight lambda, then a lower one for the
    # rest of the run (DeepSeek-V3: 0.3 for the first 10T of 14.8T tokens, then 0.1)
    mtp_loss_weight: float = 0.3
    mtp_loss_weight_final: float = 0.1
    mtp_weight_switch_fraction: float = 0.676  # fraction of train.steps spent at the first weight
    # pipeline parallelism (mesh.pipe > 1): the batch is split into this many microbatches that
    # flow through the stages; with one stage it has no effect
    microbatches: int = 1
    # gpipe: every microbatch forward, then every backward (one block of layers per stage);
    # interleaved: each stage holds virtual_stages blocks, visited in turn (circular), which
    # shrinks the bubble from (p - 1) / (m + p - 1) to (p - 1) / (v m + p - 1); 1f1b: each
    # microbatch's backward as soon as the last stage has its loss, so a stage keeps at most
    # 2p - 1 microbatches' inputs whatever m (recomputing its forward in the backward)
    pipeline_schedule: str = "gpipe"
    virtual_stages: int = 1  # v blocks per stage; more than 1 needs pipeline_schedule=interleaved
    # layers of the pipelined stack on each stage, first to last (e.g. [4, 4, 3, 3]; gpipe);
    # None: as even as the layer count allows, the first stages taking one more
    pipeline_layers_per_stage: list[int] | None = None
    # data-parallel gradient reduction (moejax/training/grad_reduce.py, docs/grad_compression.md):
    # none: GSPMD's implicit reduction; f32 | bf16 | fp8 | powersgd: each replica's gradients
    # reduced explicitly onto the AdamW moments' shards, the payload in float32, bfloat16,
    # e4m3 with one scale per 128 values, or as a rank powersgd_rank PowerSGD factorisation
    grad_compression: str = "none"
    powersgd_rank: int = 4
    grad_error_feedback: bool = True  # add what compression lost to the next step's gradient
    # update the routed experts with the previous step's gradient (zero at step 0), so their
    # reduction can overlap the next step (the seed's asynchronous expert updates)
    expert_grad_delay: bool = False


@dataclass(frozen=True)
class DataConfig:
    corpus_dir: str | None = None  # a prepared token directory; None: the stdlib corpus
    cache_dir: str | None = None  # where the default corpus is cached; None: ~/.cache/moejax


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def num_moe_layers(self) -> int:
        return self.model.num_layers - self.model.num_dense_layers if self.moe.num_experts else 0

    @property
    def num_dense_layers(self) -> int:
        return self.model.num_layers - self.num_moe_layers

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)


def preset_path(name_or_path: str | Path) -> Path:
    """A path as given, or the name of a preset in configs/ (with or without .yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    preset = CONFIG_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if preset.exists():
        return preset
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(name_or_path)!r} not found: give a YAML path or one of {names}.")


def load_config(
    path: str | Path | None = None, overrides=(), *, num_devices: int | None = None
) -> Config:
    """Load a YAML preset (or defaults), apply `key=value` overrides, and validate.

    `num_devices` defaults to `jax.device_count()`; it resolves and checks the mesh.
    """
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            layers.append(load_yaml_mapping(
                preset_path(path), "config file",
                "correct the file, or give another YAML file or a preset name from configs/"))
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = _to_frozen(Config, OmegaConf.to_container(merged, resolve=True))
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_sentence(err)) from None
    validate(cfg, num_devices)
    return cfg


def load_yaml_mapping(path: Path, what: str, advice: str, error: type = ConfigError
                      ) -> DictConfig:
    """The mapping of settings in the YAML file `path` (empty for an empty file). A file that
    cannot be read, is not UTF-8 text, does not parse, or holds something other than a mapping
    raises `error` with one sentence: `what` and the path, the line and column where known,
    what is wrong, then `advice` (what to do)."""
    name = f"{what} {path}"
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise error(f"cannot read {name} ({err.strerror or err}); {advice}.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - raw.rfind(b"\n", 0, err.start)
        raise error(f"{name} is not UTF-8 text (byte 0x{raw[err.start]:02x} at line {line}, "
                    f"column {column}); {advice}.") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # syntax, and what the top level is
        if node is not None and not isinstance(node, yaml.MappingNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
            mark = node.start_mark
            raise error(f"{name} holds {kind} at line {mark.line + 1}, column {mark.column + 1}, "
                        "not a mapping of settings (sections such as 'train:' with "
                        f"'steps: 100' indented under them); {advice}.")
        loaded = OmegaConf.load(io.StringIO(text))  # OmegaConf's own YAML rules (floats, keys)
    except yaml.YAMLError as err:
        raise error(f"{name} is not valid YAML{_yaml_problem(err)}; {advice}.") from None
    return loaded


def _yaml_problem(err: yaml.YAMLError) -> str:
    """"at line 4, column 6: expected ',' or ']', but got ':' (while parsing a flow sequence
    from line 3, column 9)": where PyYAML stopped, what it found and what it was reading."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return ": " + " ".join(str(err).split())

    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = err.problem_mark or err.context_mark
    problem = " ".join((err.problem or err.context or "a syntax error").split())
    text = (f" at {at(mark)}" if mark else "") + ": " + problem.removeprefix("but ")
    if err.problem and err.context:
        text += f" ({' '.join(err.context.split())}"
        if err.context_mark is not None and err.context_mark is not mark:
            text += f" from {at(err.context_mark)}"
        text += ")"
    return text


def _to_frozen(cls, values: dict):
    """Build nested frozen dataclasses from plain dicts (OmegaConf's to_object keeps mutability)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        section = f.default_factory
        is_section = dataclasses.is_dataclass(section)
        value = _to_frozen(section, values[f.name]) if is_section else values[f.name]
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value  # hashable
    return cls(**kwargs)


def _omegaconf_sentence(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", "") or ""
    message = str(err).splitlines()[0]
    if "not in" in message or "Key" in message and "not" in message:
        return f"unknown config key {key!r}: check the spelling against moejax/config.py."
    return f"bad value for config key {key!r}: {message}; give a value of the declared type."


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg)))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config, num_devices: int | None = None) -> None:
    """Reject impossible combinations with one sentence each."""
    m, e = cfg.model, cfg.moe
    _check(m.attention_kernel in ATTENTION_KERNELS,
           f"model.attention_kernel={m.attention_kernel!r} is unknown: use "
           f"{', '.join(ATTENTION_KERNELS)}.")
    _check(m.attention_kernel != "blockwise" or bool(m.attention_block),
           "model.attention_kernel=blockwise needs a block size: set model.attention_block "
           "(e.g. 256).")
    _check(m.attention_kernel != "blas" or cfg.precision.compute_dtype == "float32",
           f"model.attention_kernel=blas runs float32 GEMMs only (precision.compute_dtype="
           f"{cfg.precision.compute_dtype}): use model.attention_kernel=auto.")
    _check(m.unroll_layers >= 0,
           f"model.unroll_layers={m.unroll_layers} must be 0 (always scan) or positive.")
    _check(m.remat in ("none", "full", "dots"),
           f"model.remat={m.remat!r} is unknown: use none, full or dots.")
    _validate_sizes(cfg)
    _validate_attention(m)
    _check(0 <= m.num_dense_layers <= m.num_layers,
           f"model.num_dense_layers={m.num_dense_layers} must be between 0 and "
           f"model.num_layers={m.num_layers}.")
    for name in ("param_dtype", "compute_dtype"):
        value = getattr(cfg.precision, name)
        _check(value in ("float32", "bfloat16", "float16"),
               f"precision.{name}={value!r} is unknown: use float32, bfloat16 or float16.")
    _check(cfg.precision.residual_dtype in ("float32", "bfloat16"),
           f"precision.residual_dtype={cfg.precision.residual_dtype!r} is unknown: use float32 "
           "or bfloat16.")
    _validate_precision(cfg.precision)
    if e.num_experts:
        _validate_moe(e)
        _check(e.kernels != "blas" or cfg.precision.compute_dtype == "float32",
               f"moe.kernels=blas runs float32 GEMMs only (precision.compute_dtype="
               f"{cfg.precision.compute_dtype}): set precision.compute_dtype=float32 or "
               "moe.kernels=auto.")
    if num_devices is None:
        import jax

        num_devices = jax.device_count()
    sizes = dict(zip(MESH_AXES, cfg.mesh.axis_sizes(num_devices)))
    if e.num_experts:
        _check(e.num_experts % sizes["expert"] == 0,
               f"moe.num_experts={e.num_experts} is not divisible by the expert mesh axis "
               f"({sizes['expert']}): choose a number of experts that is a multiple of mesh.expert.")
    _validate_train(cfg.train)
    batch_shards = math.prod(size for axis, size in sizes.items() if axis != "pipe")
    _check(cfg.train.global_batch_size % batch_shards == 0,
           f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by the "
           f"{batch_shards} data-parallel shards (data x fsdp x expert = {sizes}): use a multiple.")
    _validate_pipeline(cfg, sizes["pipe"], batch_shards)
    _validate_grad_compression(cfg.train, sizes["pipe"])


def _validate_grad_compression(t: TrainConfig, stages: int) -> None:
    kinds = ("none", "f32", "bf16", "fp8", "powersgd")
    _check(t.grad_compression in kinds, f"train.grad_compression={t.grad_compression!r} is "
           f"unknown: use one of {', '.join(kinds)}.")
    _check(t.powersgd_rank >= 1, f"train.powersgd_rank={t.powersgd_rank} must be at least 1.")
    _check(t.grad_compression == "none" or stages == 1,
           f"train.grad_compression={t.grad_compression} reduces gradients outside the "
           f"pipeline, which {stages} stages (mesh.pipe) do not support yet: use "
           "train.grad_compression=none with mesh.pipe > 1.")


def staged_layers(cfg: Config) -> int:
    """Layers of the stack split over the pipeline stages: the MoE layers (the first-k dense
    layers run before the pipeline), or every layer of a dense model."""
    return cfg.num_moe_layers or cfg.num_dense_layers


def stage_layer_counts(cfg: Config, stages: int | None = None) -> tuple[int, ...]:
    """Layers of the pipelined stack on each of `stages` (default mesh.pipe) stages, first to
    last: train.pipeline_layers_per_stage, else as even as the count allows (the first
    stages take one more)."""
    stages = cfg.mesh.pipe if stages is None else stages
    if cfg.train.pipeline_layers_per_stage:
        return tuple(cfg.train.pipeline_layers_per_stage)
    base, extra = divmod(staged_layers(cfg), max(stages, 1))
    return tuple(base + (stage < extra) for stage in range(stages))


def unevenly_staged(cfg: Config) -> bool:
    """Whether the pipeline stages hold different numbers of layers (mesh.pipe > 1)."""
    return cfg.mesh.pipe > 1 and len(set(stage_layer_counts(cfg))) > 1


def _validate_pipeline(cfg: Config, stages: int, batch_shards: int) -> None:
    t = cfg.train
    _check(t.pipeline_schedule in ("gpipe", "interleaved", "1f1b"),
           f"train.pipeline_schedule={t.pipeline_schedule!r} is unknown: use gpipe, interleaved "
           "or 1f1b.")
    _check(t.pipeline_schedule != "1f1b" or stages == 1 or cfg.moe.switch_loss_coef == 0,
           f"train.pipeline_schedule=1f1b runs each microbatch's backward before the batch's "
           f"forward is done, so it cannot train the switch loss (a product of two whole-batch "
           f"means): set moe.switch_loss_coef=0 (it is {cfg.moe.switch_loss_coef}) or use gpipe.")
    _check(t.microbatches >= 1, f"train.microbatches={t.microbatches} must be at least 1.")
    _check(t.virtual_stages >= 1, f"train.virtual_stages={t.virtual_stages} must be at least 1.")
    _check((t.virtual_stages > 1) == (t.pipeline_schedule == "interleaved"),
           f"train.pipeline_schedule={t.pipeline_schedule} with train.virtual_stages="
           f"{t.virtual_stages}: the interleaved schedule needs virtual_stages >= 2 and gpipe "
           "and 1f1b need virtual_stages=1.")
    if stages == 1:
        return
    blocks = stages * t.virtual_stages
    layers = staged_layers(cfg)
    _check(layers >= blocks,
           f"the {layers} pipelined layers are fewer than the {blocks} stages (mesh.pipe x "
           "train.virtual_stages): lower mesh.pipe or train.virtual_stages.")
    _check(t.virtual_stages == 1 or layers % blocks == 0,
           f"the {layers} pipelined layers do not split evenly into {blocks} blocks (mesh.pipe x "
           "train.virtual_stages): the interleaved schedule needs equal blocks; choose sizes that "
           "divide it, or use pipeline_schedule=gpipe, which takes uneven stages.")
    _check(cfg.mesh.pipe == stages or layers % stages == 0,
           f"mesh.pipe=-1 resolves to {stages} stages, which do not split the {layers} pipelined "
           f"layers evenly: give mesh.pipe={stages} explicitly for uneven stages.")
    counts = t.pipeline_layers_per_stage
    if counts:
        _check(len(counts) == stages and min(counts) >= 1 and sum(counts) == layers,
               f"train.pipeline_layers_per_stage={list(counts)} must give each of the {stages} "
               f"stages at least one layer, {layers} in all (the pipelined stack).")
        _check(t.virtual_stages == 1,
               "train.pipeline_layers_per_stage places layers on stages for gpipe and 1f1b: use it "
               "without the interleaved schedule.")
    _check(t.global_batch_size % (t.microbatches * batch_shards) == 0,
           f"train.global_batch_size={t.global_batch_size} is not divisible by "
           f"train.microbatches={t.microbatches} x the {batch_shards} data-parallel shards: "
           "choose microbatches so that each holds a whole number of rows per shard.")
    _check(t.virtual_stages == 1 or t.microbatches % stages == 0,
           f"the interleaved schedule sends microbatches round the {stages} stages in groups of "
           f"{stages}: make train.microbatches={t.microbatches} a multiple of mesh.pipe.")


def _validate_sizes(cfg: Config) -> None:
    m, e = cfg.model, cfg.moe
    sizes = {"model.vocab_size": m.vocab_size, "model.d_model": m.d_model,
             "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
             "model.ffn_dim": m.ffn_dim}
    if m.attention == "gqa":
        sizes.update({"model.num_kv_heads": m.num_kv_heads, "model.head_dim": m.head_dim})
    if e.num_experts:
        sizes["moe.expert_ffn_dim"] = e.expert_ffn_dim
    for name, value in sizes.items():
        _check(value >= 1, f"{name}={value} must be a positive size.")
    _check(e.num_experts >= 0 and e.num_shared_experts >= 0,
           "moe.num_experts and moe.num_shared_experts must not be negative.")
    _check(0 < m.init_std <= 1, f"model.init_std={m.init_std} must be in (0, 1]: larger "
           "weights saturate the softmax and the gradients vanish (0.02 is usual).")


def _validate_train(t: TrainConfig) -> None:
    _check(t.steps >= 1 and t.seq_len >= 1 and t.log_every >= 1,
           "train.steps, train.seq_len and train.log_every must be positive.")
    _check(t.global_batch_size >= 1 and t.eval_batches >= 1,
           f"train.global_batch_size={t.global_batch_size} and train.eval_batches="
           f"{t.eval_batches} must be positive.")
    _check(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must not be negative.")
    _check(t.learning_rate > 0 and math.isfinite(t.learning_rate),
           f"train.learning_rate={t.learning_rate} must be a positive number (e.g. 3e-3).")
    _check(0 <= t.min_learning_rate_ratio <= 1,
           f"train.min_learning_rate_ratio={t.min_learning_rate_ratio} must be in [0, 1].")
    _check(t.eval_every >= 0 and t.checkpoint_every >= 0 and t.keep_checkpoints >= 1,
           "train.eval_every and train.checkpoint_every must not be negative, and "
           "train.keep_checkpoints must be at least 1.")
    _check(t.grad_clip >= 0 and t.weight_decay >= 0,
           "train.grad_clip and train.weight_decay must not be negative.")
    _check(t.peak_flops_per_device >= 0,
           "train.peak_flops_per_device must not be negative (0 measures it at start-up).")
    _check(0 < t.temperature_decay <= 1,
           f"train.temperature_decay={t.temperature_decay} must be in (0, 1]: the softmax "
           "router's temperature is multiplied by it every train.temperature_decay_every steps "
           "(1.0 keeps it constant).")
    _check(t.temperature_decay_every >= 1,
           f"train.temperature_decay_every={t.temperature_decay_every} must be at least 1 step.")
    _check(t.max_skipped_steps_in_row >= 1,
           f"train.max_skipped_steps_in_row={t.max_skipped_steps_in_row} must be at least 1.")


def _validate_attention(m: ModelConfig) -> None:
    _check(m.attention in ("gqa", "mla"),
           f"model.attention={m.attention!r} is unknown: use gqa or mla.")
    if m.attention == "gqa":
        _check(m.num_heads % m.num_kv_heads == 0,
               f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads="
               f"{m.num_kv_heads}: grouped-query attention needs whole groups of query heads.")
        _check(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even for RoPE.")
    else:
        _check(m.qk_rope_head_dim % 2 == 0 and m.qk_rope_head_dim > 0,
               f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be positive and even for RoPE.")
        _check(m.kv_lora_rank > 0 and m.q_lora_rank >= 0 and m.v_head_dim > 0
               and m.qk_nope_head_dim >= 0,
               "MLA needs model.kv_lora_rank and model.v_head_dim > 0 and non-negative "
               "model.q_lora_rank and model.qk_nope_head_dim.")
        _check(not m.qk_norm, "model.qk_norm is a grouped-query attention option: MLA already "
               "normalises its latents; set model.qk_norm=false.")
    _check(m.rope_scaling in ("none", "yarn"),
           f"model.rope_scaling={m.rope_scaling!r} is unknown: use none or yarn.")
    if m.rope_scaling == "yarn":
        _check(m.yarn_factor >= 1.0 and m.yarn_original_max_len > 0,
               f"YaRN needs model.yarn_factor >= 1 (got {m.yarn_factor}) and a positive "
               "model.yarn_original_max_len.")
    _check(m.mtp_depth >= 0, f"model.mtp_depth={m.mtp_depth} must not be negative.")
    _check(m.attention_block is None or m.attention_block >= 0,
           f"model.attention_block={m.attention_block} must be a block size in positions, or 0 "
           "or null for the materialised attention.")


def _validate_precision(p: PrecisionConfig) -> None:
    groups = ("attention", "dense_ffn", "shared", "experts")
    _check(p.fp8 in ("none", "tensor", "block"),
           f"precision.fp8={p.fp8!r} is unknown: use none, tensor or block.")
    unknown = [g for g in p.fp8_layer_groups if g not in groups]
    _check(not unknown, f"precision.fp8_layers names unknown groups {unknown}: use a "
           f"comma-separated subset of {','.join(groups)}.")
    _check(p.fp8_block_size >= 1, "precision.fp8_block_size must be positive.")
    _check(p.loss_scale_init >= 1, "precision.loss_scale_init must be at least 1.")


def _validate_moe(e: MoEConfig) -> None:
    _check(e.router in ("deepseek", "softmax_topk"),
           f"moe.router={e.router!r} is unknown: use deepseek or softmax_topk.")
    _check(e.dispatch in ("dropless", "capacity", "dense"),
           f"moe.dispatch={e.dispatch!r} is unknown: use dropless, capacity or dense.")
    _check(e.kernels in ("auto", "tiles", "blocks", "blas", "ragged"),
           f"moe.kernels={e.kernels!r} is unknown: use auto, tiles, blocks, blas or ragged.")
    _check(e.tile_rows >= 1, f"moe.tile_rows={e.tile_rows} must be positive.")
    _check(e.receive_factor is None or e.receive_factor > 0,
           f"moe.receive_factor={e.receive_factor} must be positive, or null for worst-case "
           "dropless buffers.")
    _check(e.drop_policy in ("position", "probs"),
           f"moe.drop_policy={e.drop_policy!r} is unknown: use position or probs.")
    _check(1 <= e.top_k <= e.num_experts,
           f"moe.top_k={e.top_k} must be between 1 and moe.num_experts={e.num_experts}.")
    _check(e.capacity_factor is None or e.dispatch == "capacity",
           f"moe.capacity_factor={e.capacity_factor} applies only to moe.dispatch=capacity "
           f"(this config has {e.dispatch}, which never drops): set moe.dispatch=capacity or "
           "moe.capacity_factor=null.")
    _check(e.capacity_factor is None or e.capacity_factor > 0,
           f"moe.capacity_factor={e.capacity_factor} must be positive, or null for no drops.")
    _check(e.temperature > 0, f"moe.temperature={e.temperature} must be positive.")
    _check(e.num_groups >= 1 and e.num_experts % e.num_groups == 0,
           f"moe.num_experts={e.num_experts} is not divisible by moe.num_groups={e.num_groups}.")
    _check(1 <= e.topk_groups <= e.num_groups,
           f"moe.topk_groups={e.topk_groups} must be between 1 and moe.num_groups={e.num_groups}.")
    if e.num_groups > 1:
        _check(e.router == "deepseek",
               "group-limited routing (moe.num_groups > 1) needs moe.router=deepseek.")
        _check(e.num_experts // e.num_groups >= 2,
               "each expert group needs at least 2 experts (groups are scored by their top-2).")
        _check(e.top_k <= e.topk_groups * (e.num_experts // e.num_groups),
               f"moe.top_k={e.top_k} exceeds the experts in the {e.topk_groups} kept groups: "
               "raise moe.topk_groups or lower moe.top_k.")
