"""Presets load; parameter counts are right; impossible configs fail with one clear sentence."""

import math

import jax
import pytest

import moejax
from moejax.config import CONFIG_DIR, ConfigError
from moejax.model.transformer import model_specs
from moejax.params import abstract

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_has_abstract_params(name):
    cfg = moejax.load_config(name, num_devices=8)
    counts = moejax.count_params(cfg)
    shapes = jax.eval_shape(lambda: abstract(model_specs(cfg)))
    assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == (counts["total"]
                                                                        + counts["mtp"])
    assert 0 < counts["active"] <= counts["total"]
    assert 0 <= counts["mtp_active"] <= counts["mtp"]
    print(f"{name}: {counts['total']:,} parameters, {counts['active']:,} active per token")


def hand_count(v, d, layers, dense_layers, h, kv, q, f, experts, k, f_expert, shared):
    attention = d * h * q + 2 * d * kv * q + h * q * d + 2 * d  # projections + two norms
    dense_layer = attention + 3 * d * f
    routed = 3 * experts * d * f_expert
    moe_layer = attention + d * experts + routed + 3 * d * shared * f_expert
    moe_layers = layers - dense_layers
    total = 2 * v * d + d + dense_layers * dense_layer + moe_layers * moe_layer
    active = total - moe_layers * routed * (experts - k) // experts
    return total, active


def test_tiny_preset_count_matches_hand_count():
    counts = moejax.count_params(moejax.load_config("tiny", num_devices=8))
    total, active = hand_count(v=256, d=128, layers=4, dense_layers=1, h=4, kv=2, q=32, f=512,
                               experts=8, k=2, f_expert=256, shared=1)
    assert (counts["total"], counts["active"]) == (total, active)


def test_mixtral_preset_matches_published_size():
    counts = moejax.count_params(moejax.load_config("mixtral_8x7b", num_devices=8))
    assert counts["total"] == 46_702_792_704  # Mixtral-8x7B's published parameter count
    assert abs(counts["active"] / 12.9e9 - 1) < 0.01


def test_dense_preset_has_no_experts():
    cfg = moejax.load_config("dense", num_devices=8)
    assert cfg.num_moe_layers == 0 and model_specs(cfg).moe_blocks is None


def test_overrides_and_preset_paths():
    path = CONFIG_DIR / "switch.yaml"
    cfg = moejax.load_config(path, ["moe.num_experts=16", "moe.capacity_factor=null"],
                             num_devices=8)
    assert (cfg.moe.num_experts, cfg.moe.capacity_factor, cfg.moe.router) == (16, None, "softmax_topk")
    assert hash(cfg) == hash(moejax.load_config(path, ["moe.num_experts=16",
                                                       "moe.capacity_factor=null"], num_devices=8))


BAD_CONFIGS = {
    "unknown key": (["moe.num_expertz=4"], r"unknown config key 'moe.num_expertz'"),
    "wrong type": (["moe.top_k=two"], r"bad value for config key 'moe.top_k'"),
    "experts vs expert axis": (["moe.num_experts=12"], r"not divisible by the expert mesh axis"),
    "top-k > experts": (["moe.top_k=9"], r"moe.top_k=9 must be between 1 and moe.num_experts=8"),
    "topk_group > groups": (["moe.num_groups=2", "moe.topk_groups=3"],
                            r"moe.topk_groups=3 must be between 1 and moe.num_groups=2"),
    "heads vs kv heads": (["model.num_kv_heads=3"], r"not divisible by model.num_kv_heads=3"),
    "batch vs data parallel": (["train.global_batch_size=12"],
                               r"global_batch_size=12 is not divisible by the 8 data-parallel"),
    "mesh does not fit": (["mesh.data=3"], r"do not divide the 8 available devices"),
    "unknown router": (["moe.router=sinkhorn"], r"moe.router='sinkhorn' is unknown"),
    "unknown preset": ([], r"config 'nope' not found"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_gives_one_clear_sentence(case):
    overrides, message = BAD_CONFIGS[case]
    preset = "nope" if case == "unknown preset" else "tiny"
    with pytest.raises(ConfigError, match=message) as err:
        moejax.load_config(preset, overrides, num_devices=8)
    text = str(err.value)
    assert "\n" not in text and text.endswith(".")



def test_mesh_on_a_subset_of_the_devices():
    """A 1-device reference run on an 8-device host, and a 4-device mesh."""
    one = moejax.load_config("tiny", ["mesh.data=1", "mesh.expert=1", "train.global_batch_size=4"],
                             num_devices=8)
    assert moejax.make_mesh(one.mesh).devices.size == 1
    four = moejax.load_config("tiny", ["mesh.data=2", "mesh.expert=2"], num_devices=8)
    assert dict(moejax.make_mesh(four.mesh).shape) == {"pipe": 1, "data": 2, "fsdp": 1, "expert": 2}
    with pytest.raises(ConfigError, match="needs 16 devices but only 8 are available"):
        moejax.load_config("tiny", ["mesh.data=4", "mesh.expert=4"], num_devices=8)
