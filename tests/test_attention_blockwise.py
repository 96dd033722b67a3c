"""Blockwise attention (moejax/model/blockwise.py) and the CPU BLAS kernel
(moejax/model/cpu_attention.py) equal the materialised attention: outputs and gradients
(float32, 1e-5) for MHA, GQA and MLA with YaRN at an odd length (the last block padded), on one
device, on the meshes of the mesh-equivalence test and inside a shard_map (the pipeline's
context), and the BLAS kernel across its 64-position chunks; the kernel choice (plain /
blockwise / cudnn / blas) by backend, dtype, head dims and model.attention_kernel; cuDNN's call
plumbing (head padding and grouping) through jax's XLA implementation, since CPU cannot run
cuDNN; generation's cached path; and the compiled temporaries growing linearly in T, not
quadratically."""

import functools

import jax
import jax.numpy as jnp
import pytest
from helpers import max_relative_error, tiny_config
from jax.sharding import PartitionSpec

import moejax
from moejax import params as P
from moejax.config import ConfigError, MeshConfig
from moejax.model import attention as A
from moejax.model import cpu_attention
from moejax.model.layers import layer_matmuls
from moejax.sharding import BATCH_AXES, batch_sharding

SEQ, BLOCK, BATCH = 13, 4, 8  # 4 blocks, the last holding one real position and 3 of padding
MLA_YARN = ("model.attention=mla", "model.q_lora_rank=16", "model.kv_lora_rank=16",
            "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=8",
            "model.rope_scaling=yarn", "model.yarn_factor=4", "model.yarn_original_max_len=8")
CASES = {"mha": ("model.num_kv_heads=4",), "gqa": (), "mla_yarn": MLA_YARN}
MESHES = {"data2_expert4": (2, 1, 4), "fsdp2_expert4": (1, 2, 4), "expert8": (1, 1, 8)}


KERNELS = ("blockwise", "blas")


def _config(case: str, block, mesh=(1, 1, 1), kernel="blockwise"):
    # init_std 0.3: scores of a few units, so the softmax is peaked, not the near-uniform
    # average that small weights give (which would hide errors in the online softmax)
    kernel = kernel if block else "auto"  # (auto with block 0: plain)
    cfg = tiny_config(*CASES[case], "model.init_std=0.3", f"model.attention_block={block}",
                      f"model.attention_kernel={kernel}")
    return cfg.replace(mesh=MeshConfig(*mesh))


def _layer_loss(cfg):
    """sum(out * w) of one attention layer at positions 0 .. T-1 (w fixed: every output
    element gets its own cotangent)."""
    matmul = layer_matmuls(cfg.precision)["attention"]

    def loss(params, x, w):
        out, _ = A.causal_attention(params, x, jnp.arange(x.shape[1]), cfg.model, matmul)
        return jnp.sum(out * w)

    return loss


@functools.cache
def _inputs(case: str):
    cfg = _config(case, 0)
    params = P.init(A.attention_specs(cfg.model), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, cfg.model.d_model))
    w = jax.random.normal(jax.random.key(2), (BATCH, SEQ, cfg.model.d_model))
    return params, x, w


@functools.cache
def _plain_and(case: str, kernel: str):
    """(loss, (d params, d x)) of the plain and the `kernel` layer, one compiled program."""
    plain, fused = (_layer_loss(_config(case, block, kernel=kernel)) for block in (0, BLOCK))
    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    return jax.jit(lambda *a: (grad(plain)(*a), grad(fused)(*a)))(*_inputs(case))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_plain(case, kernel):
    cfg = _config(case, BLOCK, kernel=kernel)
    assert A.attention_kernel(cfg.model, SEQ, jnp.float32) == kernel
    jaxpr = str(jax.make_jaxpr(_layer_loss(cfg))(*_inputs(case)))
    assert "custom_vjp_call" in jaxpr  # the kernel really ran: blockwise's loop, or the FFI call
    assert ("while" in jaxpr) == (kernel == "blockwise")
    assert (cpu_attention.FORWARD_TARGET in jaxpr) == (kernel == "blas")
    (plain_loss, plain_grads), (loss, grads) = _plain_and(case, kernel)
    assert abs(float(loss - plain_loss)) <= 1e-5 * abs(float(plain_loss))
    assert max_relative_error(grads, plain_grads) <= 1e-5
    if case == "mla_yarn":  # YaRN's mscale^2 is in the softmax scale both kernels use
        m = cfg.model
        assert A.softmax_scale(m) > 1.2 * (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mesh_name", MESHES)
def test_kernel_on_meshes_equals_single_device_plain(mesh_name, kernel):
    """MLA with YaRN, batch over the mesh's data axes and weights over fsdp."""
    cfg = _config("mla_yarn", BLOCK, MESHES[mesh_name], kernel)
    params, x, w = _inputs("mla_yarn")
    mesh = moejax.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        params = jax.device_put(params, P.shardings(A.attention_specs(cfg.model), mesh))
        x, w = jax.device_put((x, w), batch_sharding(mesh))
        loss, grads = jax.jit(jax.value_and_grad(_layer_loss(cfg), argnums=(0, 1)))(params, x, w)
    plain_loss, plain_grads = _plain_and("mla_yarn", kernel)[0]
    assert abs(float(loss - plain_loss)) <= 1e-5 * abs(float(plain_loss))
    assert max_relative_error(grads, plain_grads) <= 1e-5


def _qkv(seq=SEQ, qk_dim=8, v_dim=8):
    """q [B, T, K=2, G=2, Qk], k [B, T, 2, Qk], v [B, T, 2, Qv], a cotangent like the output."""
    keys = jax.random.split(jax.random.key(3), 4)
    return (jax.random.normal(keys[0], (BATCH, seq, 2, 2, qk_dim)),
            jax.random.normal(keys[1], (BATCH, seq, 2, qk_dim)),
            jax.random.normal(keys[2], (BATCH, seq, 2, v_dim)),
            jax.random.normal(keys[3], (BATCH, seq, 2, 2, v_dim)))


def _reference(q, k, v, scale):
    """The materialised causal attention on the same layout."""
    seq = q.shape[1]
    scores = jnp.einsum("btkgq,bskq->bkgts", q, k) * scale
    visible = jnp.arange(seq)[None, :] <= jnp.arange(seq)[:, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bkgts,bskv->btkgv", probs, v)


def _value_and_grads(attend, q, k, v, cotangent):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(attend(*a) * cotangent),
                                      argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_inside_shard_map(kernel):
    """Manual over every mesh axis, as inside the pipeline: the loop carries (blockwise) and
    the FFI results (blas) must vary over the same axes as the inputs."""
    q, k, v, cotangent = _qkv()
    mesh = moejax.make_mesh(MeshConfig(2, 1, 4))
    spec = PartitionSpec(BATCH_AXES)
    sharded = jax.shard_map(lambda q_, k_, v_: A.fused_attention(q_, k_, v_, 0.3, kernel, BLOCK),
                            mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    expected = _value_and_grads(lambda *a: _reference(*a, 0.3), q, k, v, cotangent)
    actual = _value_and_grads(sharded, q, k, v, cotangent)
    assert max_relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("seq", [64, 150])
def test_blas_kernel_across_chunks(seq):
    """The BLAS kernel's query chunks of 64 positions (each against the keys it can see): one
    whole chunk, and two and a part, with G = 2 query heads per kv head and Qk != Qv."""
    q, k, v, cotangent = _qkv(seq=seq, qk_dim=12, v_dim=8)
    actual = _value_and_grads(lambda *a: cpu_attention.causal_attention(*a, 0.3), q, k, v,
                              cotangent)
    expected = _value_and_grads(lambda *a: _reference(*a, 0.3), q, k, v, cotangent)
    assert max_relative_error(actual, expected) <= 1e-5


def test_blas_kernel_with_a_shared_second_key_part():
    """MLA's form: queries and keys in two parts whose dot products add, the second key part
    one for every kv head ([B, T, 1, R]); against the materialised attention on the
    concatenated parts, the shared part repeated per head, across chunks."""
    q, k, v, cotangent = _qkv(seq=150, qk_dim=12, v_dim=8)
    keys = jax.random.split(jax.random.key(4), 2)
    q_rope = jax.random.normal(keys[0], (*q.shape[:-1], 4))
    k_rope = jax.random.normal(keys[1], (*k.shape[:2], 1, 4))

    def two_parts(q_, k_, v_, q_rope_, k_rope_):
        return cpu_attention.causal_attention(q_, k_, v_, 0.3, q_rope=q_rope_, k_rope=k_rope_)

    def concatenated(q_, k_, v_, q_rope_, k_rope_):
        shared = jnp.broadcast_to(k_rope_, (*k_.shape[:-1], k_rope_.shape[-1]))
        return _reference(jnp.concatenate([q_, q_rope_], -1), jnp.concatenate([k_, shared], -1),
                          v_, 0.3)

    def value_and_grads(attend):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(attend(*a) * cotangent),
                                          argnums=(0, 1, 2, 3, 4)))(q, k, v, q_rope, k_rope)

    actual, expected = value_and_grads(two_parts), value_and_grads(concatenated)
    assert actual[1][4].shape == k_rope.shape  # the shared part's gradient, summed over heads
    assert max_relative_error(actual, expected) <= 1e-5


def test_blas_kernel_refuses_other_dtypes():
    q, k, v, _ = _qkv()
    with pytest.raises(TypeError, match="model.attention_kernel=blas takes float32, not "
                                        "bfloat16: use model.attention_kernel=blockwise"):
        cpu_attention.causal_attention(q.astype(jnp.bfloat16), k, v, 0.3)


@pytest.mark.parametrize("qk_dim,v_dim", [(8, 8), (12, 8), (8, 16)])
def test_cudnn_call_plumbing(monkeypatch, qk_dim, v_dim):
    """fused_attention's cuDNN branch (head dims padded to one, query heads k * G + g), run
    through jax's XLA implementation of the same call: CPU cannot run cuDNN itself."""
    calls = []
    original = jax.nn.dot_product_attention

    def xla_instead(*args, implementation=None, **kwargs):
        calls.append((implementation, kwargs["is_causal"], args[0].shape, args[2].shape))
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
    q, k, v, cotangent = _qkv(qk_dim=qk_dim, v_dim=v_dim)
    actual = _value_and_grads(lambda *a: A.fused_attention(*a, 0.3, "cudnn", BLOCK),
                              q, k, v, cotangent)
    expected = _value_and_grads(lambda *a: _reference(*a, 0.3), q, k, v, cotangent)
    head_dim = max(qk_dim, v_dim)
    assert calls[0] == ("cudnn", True, (BATCH, SEQ, 4, head_dim), (BATCH, SEQ, 2, head_dim))
    assert max_relative_error(actual, expected) <= 1e-5


def test_cudnn_refusal_falls_back_to_blockwise(monkeypatch):
    """jax refuses cuDNN while tracing where its version or the GPU is too old (beyond what
    `cudnn_allows` checks): the blockwise kernel runs instead, with a warning."""
    def refuse(*args, **kwargs):
        raise NotImplementedError("mla requires cudnn version >= 9.10")

    monkeypatch.setattr(jax.nn, "dot_product_attention", refuse)
    q, k, v, _ = _qkv(qk_dim=12, v_dim=8)
    with pytest.warns(UserWarning, match="cuDNN attention refused"):
        out = A.fused_attention(q, k, v, 0.3, "cudnn", BLOCK)
    assert max_relative_error(out, _reference(q, k, v, 0.3)) <= 1e-5


def _model(*overrides):
    return tiny_config(*overrides).model


@pytest.mark.parametrize("model,seq,dtype,backend,capability,expected", [
    (_model(), 256, jnp.float32, "cpu", None, "blas"),  # CPU, float32: at every length
    (_model(), 8192, jnp.float32, "cpu", None, "blas"),
    (_model(), 256, jnp.bfloat16, "cpu", None, "plain"),  # one block of the default 256
    (_model(), 257, jnp.bfloat16, None, None, "blockwise"),  # this machine: CPU
    (_model(), 257, jnp.float32, "gpu", 7.0, "blockwise"),
    (_model("model.attention_block=0"), 8192, jnp.float32, "cpu", None, "plain"),
    (_model("model.attention_block=null"), 8192, jnp.bfloat16, "gpu", 9.0, "plain"),
    (_model("model.attention_kernel=plain"), 8192, jnp.float32, "cpu", None, "plain"),
    (_model("model.attention_kernel=blockwise"), 16, jnp.float32, "cpu", None, "blockwise"),
    (_model("model.attention_kernel=blas"), 16, jnp.float32, "cpu", None, "blas"),
    (_model("model.head_dim=64"), 16, jnp.bfloat16, "gpu", 9.0, "cudnn"),
    (_model("model.head_dim=64"), 16, jnp.float16, "gpu", 8.0, "cudnn"),
    (_model("model.head_dim=64"), 4096, jnp.float32, "gpu", 9.0, "blockwise"),  # cuDNN: 16-bit
    (_model("model.head_dim=64"), 4096, jnp.bfloat16, "gpu", 7.5, "blockwise"),  # pre-Ampere
    (_model("model.head_dim=64"), 4096, jnp.bfloat16, "tpu", None, "blockwise"),
    (_model("model.head_dim=36"), 4096, jnp.bfloat16, "gpu", 9.0, "blockwise"),  # not x8
    (_model(*MLA_YARN[:1], "model.qk_nope_head_dim=128", "model.qk_rope_head_dim=64",
            "model.v_head_dim=128"), 4096, jnp.bfloat16, "gpu", 9.0, "cudnn"),  # 192 <= 256
    (_model(*MLA_YARN[:1], "model.qk_nope_head_dim=128", "model.qk_rope_head_dim=64",
            "model.v_head_dim=128"), 4096, jnp.bfloat16, "gpu", 8.0, "blockwise"),  # > 128
])
def test_kernel_choice(model, seq, dtype, backend, capability, expected):
    assert A.attention_kernel(model, seq, dtype, backend, capability) == expected


def test_attention_block_validation():
    with pytest.raises(ConfigError, match="model.attention_block=-1"):
        tiny_config("model.attention_block=-1")
    with pytest.raises(ConfigError, match="model.attention_kernel='flash' is unknown"):
        tiny_config("model.attention_kernel=flash")
    with pytest.raises(ConfigError, match="blockwise needs a block size"):
        tiny_config("model.attention_kernel=blockwise", "model.attention_block=0")
    with pytest.raises(ConfigError, match="attention_kernel=blas runs float32 GEMMs only"):
        tiny_config("model.attention_kernel=blas", "precision.compute_dtype=bfloat16")
    with pytest.raises(ValueError, match="attention_kernel=blas runs on CPU only .this is gpu."):
        A.attention_kernel(_model("model.attention_kernel=blas"), 16, jnp.float32, "gpu")


@pytest.mark.parametrize("case", ["gqa", "mla_yarn"])
def test_cached_prefill_equals_blockwise(case):
    """Generation keeps the plain path (MLA: absorbed) on its cache; its prefill equals the
    blockwise training attention."""
    cfg = _config(case, BLOCK)
    params, x, _ = _inputs(case)
    matmul = layer_matmuls(cfg.precision)["attention"]
    positions = jnp.arange(SEQ)
    cache = tuple(jnp.zeros((BATCH, SEQ + 3, *s)) for s in A.cache_entry_shapes(cfg.model))

    @jax.jit
    def both(params, x, cache):
        return (A.causal_attention(params, x, positions, cfg.model, matmul, cache)[0],
                A.causal_attention(params, x, positions, cfg.model, matmul)[0])

    cached, uncached = both(params, x, cache)
    assert max_relative_error(cached, uncached) <= 1e-5


def test_compiled_temporaries_grow_linearly():
    """memory_analysis of the layer's fwd+bwd (scripts/bench_attention.py's measure): doubling
    T multiplies the plain temporaries by ~4 and the blockwise and BLAS ones by at most ~2."""
    from moejax.tools.attention_memory import compiled_memory

    def temp(kernel, seq):
        block = 0 if kernel == "plain" else 32
        return compiled_memory(tiny_config(f"model.attention_block={block}",
                                           f"model.attention_kernel={kernel}"), seq)["temp"]

    assert temp("plain", 512) > 3 * temp("plain", 256)
    for kernel in ("blockwise", "blas"):
        assert temp(kernel, 512) < 2.2 * temp(kernel, 256)
        assert temp(kernel, 512) < temp("plain", 512) / 4
