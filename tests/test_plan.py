"""The planner (moejax/tools/plan.py): per-device state bytes against hand arithmetic, and the
all-to-all bytes counted from the compiled train step against the dispatch formula."""

import math

import pytest
from helpers import load_script, tiny_config

import moejax
from moejax.tools import plan

F32 = 4
# optax adamw keeps two int32 step counts besides its moments (scale_by_adam, the LR schedule)
ADAM_COUNTS = 2 * 4


def test_tiny_state_bytes_match_hand_arithmetic():
    cfg = tiny_config("mesh.fsdp=2", "mesh.expert=4")
    m, e = cfg.model, cfg.moe
    d, v, h, kv, q = m.d_model, m.vocab_size, m.num_heads, m.num_kv_heads, m.head_dim
    attention = 2 * d * h * q + 2 * d * kv * q  # wq, wo; wk, wv
    norms = 2 * d
    dense_layer = norms + attention + 3 * d * m.ffn_dim
    moe_layer_but_routed = norms + attention + d * e.num_experts + 3 * d * e.expert_ffn_dim
    routed_per_layer = 3 * e.num_experts * d * e.expert_ffn_dim
    moe_layers = m.num_layers - m.num_dense_layers
    # every leaf has the model width (`embed`, over fsdp=2); routed experts also over expert=4
    unrouted = 2 * v * d + d + dense_layer * m.num_dense_layers + moe_layer_but_routed * moe_layers
    expected = F32 * (unrouted / 2 + routed_per_layer * moe_layers / 8)
    state = plan.state_bytes(cfg, 8)
    assert state["parameters"] == expected
    assert state["gradients"] == expected
    # ZeRO-1: the moments of weights repeated over expert=4 are split over it as well (every
    # leaf here has a dimension it divides), so each moment is 1/8 of its parameter
    assert state["optimizer"] == 2 * F32 * (unrouted + routed_per_layer * moe_layers) / 8 + ADAM_COUNTS


def test_deepseek_v3_state_bytes_on_2048_devices_without_devices():
    """DeepSeek-V3 on PP2 x EP64 x fsdp16 (2048 devices), from jax.eval_shape on an abstract
    mesh: the routed experts' share is exact; the rest lies between fully sharded and split
    over fsdp alone."""
    overrides = ("mesh.pipe=2", "mesh.expert=64", "mesh.fsdp=16", "train.microbatches=15")
    cfg = moejax.load_config("deepseek_v3_671b", overrides, num_devices=2048)
    counts = moejax.count_params(cfg)
    e, d = cfg.moe, cfg.model.d_model
    routed_layer = 3 * e.num_experts * d * e.expert_ffn_dim
    assert counts["routed_experts"] == cfg.num_moe_layers * routed_layer
    # stack layers over pipe=2, experts over expert=64, model width over fsdp=16; the MTP
    # module's routed experts are not split over pipe
    routed = F32 * routed_layer * (cfg.num_moe_layers / (2 * 64 * 16) + 1 / (64 * 16))
    rest = F32 * (counts["total"] + counts["mtp"] - routed_layer * (cfg.num_moe_layers + 1))
    state = plan.state_bytes(cfg, 2048)
    # the rest: split over fsdp (model width), over pipe (the stack by layer; everything else
    # along a dimension pipe divides) and, for MLA's up-projections, over expert by head
    assert routed + rest / 2048 <= state["parameters"] <= routed + rest / 16
    # ZeRO-1: every moment is split over the axes its parameter repeats over as well, so the
    # optimizer state is (to 1%) the whole model's two moments spread over all 2048 devices
    everything = F32 * (counts["total"] + counts["mtp"])
    assert 2 * everything / 2048 <= state["optimizer"] - ADAM_COUNTS <= 1.01 * 2 * everything / 2048


@pytest.mark.parametrize("overrides", [
    ("mesh.data=2", "mesh.expert=4", "model.remat=full", "precision.fp8_dispatch=true",
     "precision.fp8_block_size=24"),
    ("model.num_layers=5", "mesh.pipe=2", "mesh.data=2", "mesh.expert=2",
     "train.microbatches=2"),
], ids=["data2_expert4_remat_fp8_dispatch", "pipe2_data2_expert2"])
def test_all_to_all_bytes_match_the_dispatch_formula(overrides, tmp_path):
    cfg = tiny_config(*overrides)
    result = plan.plan(cfg, math.prod(cfg.mesh.axis_sizes(8)), hlo_out=tmp_path / "step.hlo")
    # a GPU's program: XLA's own GEMMs and attention, not moejax's CPU kernels (float32 here)
    assert cfg.precision.compute_dtype == "float32"
    assert "moejax_" not in (tmp_path / "step.hlo").read_text()
    counted = result["compiled"]["collectives"]["all-to-all"]
    # float32 compute is not widened on CPU; fp8 dispatch codes are (to float16). Block 24 does
    # not divide D = 32: the codes travel in 2 slices of 24 (zero-padded), 2 scales per row.
    formula = result["dispatch_formula_cpu_f32"]
    assert counted["count"] == formula["exchanges"]
    assert counted["bytes_sent"] == pytest.approx(formula["dense"], rel=1e-9)
    assert formula["ragged_bound"] <= formula["dense"]


def test_a_mesh_larger_than_the_planned_devices_is_one_sentence(capsys):
    script = load_script("plan")
    code = script.main(["--config", "tiny", "--devices", "3", "--no-compile", "mesh.expert=8"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mesh") and "needs 8 devices but only 3" in err
    assert "Traceback" not in err


def test_peak_breakdown_reads_the_first_level_of_xla_live_ranges(tmp_path):
    """plan.peak_breakdown: the module with the largest peak, its first-level values largest
    first (nested lines are parts of them, not more values)."""
    from moejax.tools.plan import peak_breakdown

    small = "  Stack trace breakdown for peak usage: 10 bytes\n      ├── a (100.0%, total: 10 bytes, current: 10 bytes, remaining: 0 bytes)\n"
    big = ("  Stack trace breakdown for peak usage: 1 500 bytes\n"
           "    main.1_spmd (100.0%, total: 1 500 bytes, current: 0 bytes, remaining: 1 500 bytes)\n"
           "      ├── jit(f)/dot (20.0%, total: 300 bytes, current: 300 bytes, remaining: 1 200 bytes)\n"
           "      │   └── inner (10.0%, total: 150 bytes, current: 150 bytes, remaining: 0 bytes)\n"
           "      └── copy.7 (80.0%, total: 1 200 bytes, current: 1 200 bytes, remaining: 0 bytes)\n")
    (tmp_path / "m1-live-range.txt").write_text(small)
    (tmp_path / "m2-live-range.txt").write_text(big)
    assert peak_breakdown(tmp_path) == {
        "peak_bytes": 1500, "values": [{"name": "copy.7", "bytes": 1200},
                                       {"name": "jit(f)/dot", "bytes": 300}]}
