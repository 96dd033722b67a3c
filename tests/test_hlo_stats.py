"""Collective traffic counted from compiled HLO against hand arithmetic on 8 fake devices."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.tools.hlo_stats import collective_traffic, shape_bytes

STEPS = 5  # scan length: collectives inside the loop run this many times


@pytest.fixture(scope="module")
def traffic():
    mesh = jax.make_mesh((2, 4), ("data", "expert"))

    def per_shard(x):  # x: f32[8, 8] per device
        def body(carry, _):
            exchanged = jax.lax.all_to_all(carry, "expert", 0, 0, tiled=True)
            neighbour = jax.lax.ppermute(carry, "expert", [(i, (i + 1) % 4) for i in range(4)])
            return jax.lax.psum(exchanged, "data") + neighbour, None

        carry, _ = jax.lax.scan(body, x, None, length=STEPS)
        scattered = jax.lax.psum_scatter(carry, "expert", scatter_dimension=0, tiled=True)
        return jax.lax.all_gather(scattered, "data", tiled=True)

    step = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("data", "expert"),
                                 out_specs=P(None, "expert"), check_vma=False))
    x = jax.device_put(jnp.ones((16, 32)), NamedSharding(mesh, P("data", "expert")))
    return collective_traffic(step.lower(x).compile().as_text())


def test_shape_bytes_reads_arrays_and_tuples():
    assert shape_bytes("f32[8,8]{1,0}") == 256
    assert shape_bytes("(bf16[2,8]{1,0}, s8[3])") == 35
    assert shape_bytes("f8e4m3fn[16]") == 16
    assert shape_bytes("f32[]") == 4


def test_loop_collectives_count_once_per_iteration(traffic):
    block = 8 * 8 * 4  # bytes of one device's f32[8, 8] carry
    assert traffic["all-to-all"]["count"] == STEPS
    assert traffic["all-to-all"]["bytes_sent"] == pytest.approx(STEPS * block * 3 / 4)
    assert traffic["collective-permute"]["count"] == STEPS
    assert traffic["collective-permute"]["bytes_sent"] == pytest.approx(STEPS * block)
    assert traffic["all-reduce"]["count"] == STEPS
    assert traffic["all-reduce"]["bytes_sent"] == pytest.approx(STEPS * 2 * block / 2)


def test_collectives_outside_the_loop_count_once(traffic):
    scattered = 2 * 8 * 4  # f32[2, 8] per device after scattering over 4
    assert traffic["reduce-scatter"]["count"] == 1
    assert traffic["reduce-scatter"]["bytes_sent"] == pytest.approx(scattered * 3)
    gathered = 2 * scattered  # all-gather over data (2) doubles it
    assert traffic["all-gather"]["count"] == 1
    assert traffic["all-gather"]["bytes_sent"] == pytest.approx(gathered / 2)


def test_text_without_an_entry_is_refused():
    with pytest.raises(ValueError, match="compiled.as_text"):
        collective_traffic("HloModule m\n")


def test_mesh_form_replica_groups_give_the_named_axes_group_size():
    """Large meshes print replica_groups=mesh[...] {axes}: the group is the named axes' product."""
    groups = "replica_groups=mesh['axis_0'=2,'axis_1'=4]"
    hlo = (
        "ENTRY %main (p: f32[8,8]) -> f32[8,8] {\n"
        "  %p = f32[8,8]{1,0} parameter(0)\n"
        f"  %ar = f32[8,8]{{1,0}} all-reduce(%p), channel_id=1, {groups}, "
        "device_ids=([4,2]T(1,0)) {'axis_1'}, use_global_device_ids=true, to_apply=%add\n"
        f"  ROOT %ag = f32[8,8]{{1,0}} all-gather(%ar), channel_id=2, {groups} "
        "{'axis_0','axis_1'}, dimensions={0}, use_global_device_ids=true\n"
        "}"
    )
    traffic = collective_traffic(hlo)
    block = 8 * 8 * 4
    assert traffic["all-reduce"]["bytes_sent"] == pytest.approx(2 * block * 3 / 4)  # group 4
    assert traffic["all-gather"]["bytes_sent"] == pytest.approx(block * 7 / 8)  # group 8


def test_profile_summary_adds_up_each_op_per_step():
    """tools.profile_ops.summarise_trace: complete events by name, per step, most time first;
    the executor's own spans and the Python calls around the steps are not ops."""
    from moejax.tools.profile_ops import summarise_trace

    events = [{"ph": "X", "name": "dot.1", "dur": 3000}, {"ph": "X", "name": "dot.1", "dur": 1000},
              {"ph": "X", "name": "sort.2", "dur": 6000}, {"ph": "B", "name": "dot.1"},
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},
              {"ph": "X", "name": "$api.py:1 block_until_ready", "dur": 9000}]
    assert summarise_trace(events, steps=2) == [
        {"name": "sort.2", "ms_per_step": 3.0, "calls_per_step": 0.5},
        {"name": "dot.1", "ms_per_step": 2.0, "calls_per_step": 1.0}]
