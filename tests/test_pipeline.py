"""Pipeline parallelism (moejax/model/pipeline.py): the same loss and gradients as one device
on meshes with a `pipe` axis, for every schedule, with MLA, MTP, first-k dense layers, group-
limited routing, every router loss and the default dropless dispatch; the config refusals."""

import functools

import jax
import pytest
from helpers import max_relative_error, tiny_config
from test_mesh_equivalence import CONFIGS, _batch, _loss_and_grads, _router_state, shardings

import moejax
from moejax.config import ConfigError, MeshConfig
from moejax.model.pipeline import Schedule
from moejax.sharding import batch_sharding

# one dense layer, then 4 MoE layers: 2 stages of 2, 4 of 1, or 2 stages x 2 virtual of 1
PIPELINE_CONFIG = (*CONFIGS["deepseek_v3"], "model.num_layers=5")
SCHEDULES = {"gpipe": ("train.microbatches=2",),
             "interleaved": ("train.microbatches=2", "train.pipeline_schedule=interleaved",
                             "train.virtual_stages=2")}
MESHES = {  # MeshConfig(data, fsdp, expert, pipe)
    "pipe2_expert4": MeshConfig(1, 1, 4, 2),
    "pipe2_data2_expert2": MeshConfig(2, 1, 2, 2),
    "pipe4_expert2": MeshConfig(1, 1, 2, 4),
    "pipe2_fsdp2_expert2": MeshConfig(1, 2, 2, 2),
}
CASES = [("gpipe", mesh) for mesh in MESHES] + [
    ("interleaved", "pipe2_expert4"), ("interleaved", "pipe2_fsdp2_expert2")]


@functools.cache
def reference():
    cfg = tiny_config(*PIPELINE_CONFIG)
    params = moejax.init_params(cfg, jax.random.key(0))
    return params, _loss_and_grads(cfg, params, _batch(cfg), _router_state(cfg))


@pytest.mark.parametrize("schedule,mesh_name", CASES)
def test_loss_and_grads_match_single_device(schedule, mesh_name):
    params, (expected_loss, expected_metrics, expected_grads) = reference()
    cfg = tiny_config(*PIPELINE_CONFIG, *SCHEDULES[schedule]).replace(mesh=MESHES[mesh_name])
    mesh = moejax.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(params, shardings(cfg, mesh))
        batch = jax.device_put(_batch(cfg), batch_sharding(mesh))
        loss, metrics, grads = _loss_and_grads(cfg, sharded, batch, _router_state(cfg))

    assert abs(float(loss) - float(expected_loss)) <= 1e-5 * abs(float(expected_loss))
    for name in ("switch_loss", "seq_balance_loss", "z_loss", "aux_loss", "mtp_aux_loss",
                 "mtp_cross_entropy_1", "cross_entropy"):
        assert max_relative_error(metrics[name], expected_metrics[name]) <= 1e-5, name
    assert float(expected_metrics["switch_loss"]) > 0
    assert jax.numpy.array_equal(metrics["expert_counts"], expected_metrics["expert_counts"])
    assert max_relative_error(grads, expected_grads) <= 1e-5
