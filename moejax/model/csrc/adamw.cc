// AdamW with global-norm clipping over every parameter leaf in one XLA FFI call, for XLA:CPU.
// Called by moejax/training/cpu_adamw.py; its docstring says why.
//
// Arguments: a float32 [kScalars] vector of the step's scalars (below), then 4 x N leaves in
// the order params, grads, first moments, second moments. Results: 3 x N leaves, the new
// params, first and second moments, each the same shape as its input (and normally the same
// buffer: the caller aliases them). Every leaf float32. Per element, in optax's order of
// operations (clip_by_global_norm, scale_by_adam, add_decayed_weights, scale_by_learning_rate,
// apply_updates), so that the result matches optax's to float32 rounding:
//   g = clip ? (g / norm) * max_norm : g
//   m = (1 - b1) g + b1 m;  v = (1 - b2) g^2 + b2 v
//   u = (m / bias1) / (sqrt(v / bias2) + eps) [+ weight_decay p where decayed]
//   p = p + step_size u        (step_size: minus the learning rate)
// When `apply` is 0 (a skipped step) nothing changes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

namespace {

enum Scalar { kApply, kClip, kNorm, kMaxNorm, kBias1, kBias2, kStepSize, kScalars };

constexpr int64_t kChunk = 1 << 15;  // elements per piece of work shared over threads

struct Leaf {
  const float *param, *grad, *mu, *nu;
  float *new_param, *new_mu, *new_nu;
  int64_t size;
  bool decayed;
};

struct Piece {
  int64_t leaf, start, size;
};

struct Hyper {
  float b1, one_minus_b1, b2, one_minus_b2, eps, weight_decay;
};

void Update(const Leaf& leaf, int64_t start, int64_t size, const float* s, const Hyper& h) {
  const bool clip = s[kClip] != 0.0f;
  const float norm = s[kNorm], max_norm = s[kMaxNorm], bias1 = s[kBias1], bias2 = s[kBias2];
  const float step_size = s[kStepSize];
  // 0 for an undecayed leaf: u + 0 p is u (parameters are finite). No branch in the loop, so
  // that it vectorizes.
  const float decay = leaf.decayed ? h.weight_decay : 0.0f;
#pragma omp simd
  for (int64_t i = start; i < start + size; ++i) {
    const float grad = leaf.grad[i];
    const float g = clip ? (grad / norm) * max_norm : grad;
    const float m = h.one_minus_b1 * g + h.b1 * leaf.mu[i];
    const float v = h.one_minus_b2 * (g * g) + h.b2 * leaf.nu[i];
    const float u = (m / bias1) / (std::sqrt(v / bias2) + h.eps) + decay * leaf.param[i];
    leaf.new_param[i] = leaf.param[i] + step_size * u;
    leaf.new_mu[i] = m;
    leaf.new_nu[i] = v;
  }
}

void Keep(const Leaf& leaf, int64_t start, int64_t size) {
  const auto copy = [&](float* to, const float* from) {
    if (to != from) std::memcpy(to + start, from + start, sizeof(float) * size);
  };
  copy(leaf.new_param, leaf.param);
  copy(leaf.new_mu, leaf.mu);
  copy(leaf.new_nu, leaf.nu);
}

ffi::Error AdamW(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                 ffi::RemainingRets rets, float b1, float one_minus_b1, float b2,
                 float one_minus_b2, float eps, float weight_decay,
                 ffi::Span<const int32_t> decayed) {
  if (scalars.element_count() != kScalars) {
    return ffi::Error::InvalidArgument("adamw: the scalars vector has the wrong length");
  }
  const int64_t leaves = static_cast<int64_t>(decayed.size());
  if (static_cast<int64_t>(args.size()) != 4 * leaves ||
      static_cast<int64_t>(rets.size()) != 3 * leaves) {
    return ffi::Error::InvalidArgument("adamw: expected 4 arguments and 3 results per leaf");
  }
  std::vector<Leaf> table(leaves);
  std::vector<Piece> pieces;
  for (int64_t n = 0; n < leaves; ++n) {
    const float* in[4];
    for (int64_t k = 0; k < 4; ++k) {
      auto buffer = args.get<ffi::Buffer<ffi::F32>>(k * leaves + n);
      if (!buffer.has_value()) return buffer.error();
      in[k] = buffer->typed_data();
      if (k == 0) table[n].size = static_cast<int64_t>(buffer->element_count());
      if (static_cast<int64_t>(buffer->element_count()) != table[n].size) {
        return ffi::Error::InvalidArgument("adamw: a leaf's four arrays differ in size");
      }
    }
    float* out[3];
    for (int64_t k = 0; k < 3; ++k) {
      auto buffer = rets.get<ffi::Buffer<ffi::F32>>(k * leaves + n);
      if (!buffer.has_value()) return buffer.error();
      out[k] = (*buffer)->typed_data();
    }
    table[n] = {in[0], in[1], in[2], in[3], out[0], out[1], out[2], table[n].size,
                decayed[n] != 0};
    for (int64_t start = 0; start < table[n].size; start += kChunk) {
      pieces.push_back({n, start, std::min(kChunk, table[n].size - start)});
    }
  }
  const float* s = scalars.typed_data();
  const Hyper hyper{b1, one_minus_b1, b2, one_minus_b2, eps, weight_decay};
  const bool apply = s[kApply] != 0.0f;
  moejax::ForEachItem(pool, static_cast<int64_t>(pieces.size()), [&](int64_t i) {
    const Piece& piece = pieces[i];
    if (apply) {
      Update(table[piece.leaf], piece.start, piece.size, s, hyper);
    } else {
      Keep(table[piece.leaf], piece.start, piece.size);
    }
  });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the step's scalars
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")  // rounded from double, as optax's
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay")
                                  .Attr<ffi::Span<const int32_t>>("decayed"));
