"""moejax.tools.bench_hf_model and the profile_ops pieces it uses: the HF DeepseekV3ForCausalLM
the benchmark builds from a moejax config and its weights is the same model (same initial
cross-entropy, a nonzero router bias included) trained with moejax's optimizer settings; the
op-to-category mapping reads the compiled HLO's stack frames; busy time is not double
counted."""

import jax
import numpy as np
import pytest

import moejax
from moejax.tools import bench_hf_model as tool
from moejax.tools import profile_ops

# a smaller DeepSeek-shaped model: 1 dense + 1 MoE layer (MLA, 4 groups of 2 experts, top-2
# groups, a shared expert), a short batch, so that the eval step compiles in seconds; weights
# 5x the default scale, so that the loss is far from uniform's and a mapping error shows
# (a zeroed router bias moves it by 1e-2, at the default scale by 7e-4)
SMALL = ("model.num_layers=2", "model.d_model=64", "model.ffn_dim=128", "moe.expert_ffn_dim=32",
         "train.seq_len=32", "train.global_batch_size=2", "model.init_std=0.1")


def test_hf_model_from_moejax_weights_has_the_same_initial_loss():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from moejax.training.optim import learning_rate_schedule
    from moejax.training.step import compiled_eval_step

    cfg = tool.deepseek_config(steps=40, extra=SMALL, num_devices=1)
    params = moejax.init_params(cfg, jax.random.key(0))
    router = moejax.init_router_state(cfg)
    bias = 0.05 * np.random.default_rng(1).standard_normal(router.bias.shape)
    router = router.replace(bias=jax.numpy.asarray(bias, jax.numpy.float32))  # moves choices
    model = tool.hf_model(cfg, params, router)
    assert tool.hf_implementations(model) == {"experts": "grouped_mm", "attention": "sdpa"}
    assert sum(p.numel() for p in model.parameters()) == moejax.count_params(cfg)["total"]

    t = cfg.train
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size,
                                               (t.global_batch_size, t.seq_len + 1), np.int32)
    losses = tool.initial_losses(compiled_eval_step(cfg), params, router, model, tokens)
    assert losses["same"], losses

    trainer = tool.HFTrainer(model, cfg)
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == t.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in no_decay["params"])  # norms only
    assert decay["betas"] == (t.adam_b1, t.adam_b2)
    schedule = learning_rate_schedule(cfg)
    for step in (0, 5, t.warmup_steps, t.steps - 1):
        lr = trainer.scheduler.lr_lambdas[0](step) * t.learning_rate
        assert lr == pytest.approx(float(schedule(step)), rel=1e-6, abs=1e-12)
    loss = trainer.step(tool.torch_batch(tokens))
    assert torch.isfinite(loss)


# Stack frames as jax 0.10 prints them: a row's parent_frame_id is one above its parent's id
# (a root shows its own id), so frame 3 is _latent_attend <- _Layers.attention <- _run_stack.
HLO = """HloModule jit__lambda, is_scheduled=true

FileNames
1 "/src/moejax/model/attention.py"
2 "/src/moejax/model/transformer.py"
3 "/src/moejax/model/dispatch/dropless.py"

FunctionNames
1 "_latent_attend"
2 "_Layers.attention"
3 "grouped_experts"
4 "_run_stack"

FileLocations
1 {file_name_id=1 function_name_id=1 line=300 end_line=300 column=1 end_column=9}
2 {file_name_id=2 function_name_id=2 line=259 end_line=259 column=1 end_column=9}
3 {file_name_id=3 function_name_id=3 line=133 end_line=133 column=1 end_column=9}
4 {file_name_id=2 function_name_id=4 line=186 end_line=186 column=1 end_column=9}

StackFrames
1 {file_location_id=4 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=1 parent_frame_id=3}
4 {file_location_id=3 parent_frame_id=2}

%body (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %dot.1 = f32[4]{0} multiply(%p, %p), metadata={op_name="w/mul" stack_frame_id=4}
}

ENTRY %main.9 (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %exp_fusion = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused.1,
    metadata={op_name="exp" stack_frame_id=3}
  %copy.3 = f32[4]{0} copy(%a), metadata={op_name="copy" stack_frame_id=1}
  %wrapped_broadcast = f32[4]{0} fusion(%constant.1), kind=kLoop, calls=%bc.2
  ROOT %while.2 = f32[4]{0} while(%wrapped_broadcast), condition=%cond, body=%body,
    metadata={op_name="while" stack_frame_id=4}
}
""".replace(",\n    ", ", ")  # one line per instruction, as XLA prints them


def test_ops_map_to_categories_through_their_stack_frames():
    module = profile_ops.parse_hlo(HLO)
    assert module.name == "jit__lambda"
    assert [f.function for f in module.frames[3]] == [
        "_latent_attend", "_Layers.attention", "_run_stack"]
    assert module.ops["while.2"].calls == ("cond", "body")
    assert module.ops["dot.1"].computation == "body"
    categories = tool.category_of_ops(module)
    assert categories["exp_fusion"] == "attention"
    assert categories["dot.1"] == "MoE"  # in the grouped GEMM's loop body
    assert categories["copy.3"] == "layer scan"
    # no metadata: categorised by its user, the MoE loop it feeds
    assert categories["wrapped_broadcast"] == "MoE"


def test_busy_time_is_split_among_overlapping_ops_and_loops_count_once():
    interval = profile_ops.OpInterval
    intervals = [interval(0, 10, "a", 1), interval(5, 15, "b", 2), interval(12, 14, "c", 1),
                 interval(0, 20, "while.1", 1)]
    busy = profile_ops.attribute_busy_time(intervals, containers={"while.1"})
    # [0,5] a; [5,10] a and b share; [10,12] b; [12,14] b and c; [14,15] b; [15,20] the loop
    assert busy == pytest.approx({"a": 7.5, "b": 6.5, "c": 1.0, "while.1": 5.0})
    assert sum(busy.values()) == pytest.approx(20.0)  # the union of the intervals
