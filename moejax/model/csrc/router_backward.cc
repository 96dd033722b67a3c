// The gradient of the router's chosen logits for XLA:CPU through the XLA FFI, called by
// moejax/model/cpu_route.py (`chosen_logits_backward`); its docstring says why.
//
// logits = x w (x [T, D], w [D, E]); chosen[t, j] = logits[t, ids[t, j]] (ids [T, k]). From
// d_chosen [T, k]:
//   d_x[t] = sum_j d_chosen[t, j] w[:, ids[t, j]]
//   d_w[:, e] = sum over (t, j) with ids[t, j] == e of d_chosen[t, j] x[t]
// k columns of w per token instead of all E: the work of a dense d_logits [T, E] product that
// is zero outside the chosen entries, without the zeros. An id outside [0, E) adds nothing.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

namespace {

constexpr int64_t kTokenChunk = 256;  // tokens per piece of work of the reduction into d_w
constexpr int64_t kMostParts = 8;  // partial d_w^T [E, D] held at once, one per part

ffi::Error RouterChosenBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> ids,
                                ffi::Buffer<ffi::F32> d_chosen, ffi::ResultBuffer<ffi::F32> d_x,
                                ffi::ResultBuffer<ffi::F32> d_w) {
  const auto xd = x.dimensions(), wd = w.dimensions(), id = ids.dimensions();
  if (wd.size() != 2 || xd.size() == 0 || xd[xd.size() - 1] != wd[0] || id.size() == 0 ||
      d_chosen.dimensions().size() != id.size() ||
      d_chosen.element_count() != ids.element_count()) {
    return ffi::Error::InvalidArgument(
        "router_chosen_backward: expected x [..., D], w [D, E], ids and d_chosen [..., k]");
  }
  const int64_t width = wd[0], experts = wd[1], k = id[id.size() - 1];
  const int64_t tokens = x.element_count() / std::max<int64_t>(width, 1);  // D = 0: no tokens
  if (ids.element_count() != tokens * k) {
    return ffi::Error::InvalidArgument("router_chosen_backward: ids must be [tokens, k]");
  }
  const float *x_data = x.typed_data(), *w_data = w.typed_data(), *dc = d_chosen.typed_data();
  const int32_t* id_data = ids.typed_data();
  std::vector<float> w_t(experts * width);  // w^T [E, D]: an expert's column as one row
  for (int64_t d = 0; d < width; ++d) {
    for (int64_t e = 0; e < experts; ++e) w_t[e * width + d] = w_data[d * experts + e];
  }
  // d_w^T [E, D] summed per part of the tokens (one part per thread), then added up
  const int64_t chunks = (tokens + kTokenChunk - 1) / kTokenChunk;
  const int64_t parts =
      std::max<int64_t>(1, std::min({pool.num_threads(), chunks, kMostParts}));
  std::vector<float> partial(parts * experts * width, 0.0f);
  float* dx_data = d_x->typed_data();
  moejax::ForEachItem(pool, parts, [&](int64_t part) {
    float* acc = partial.data() + part * experts * width;
    const int64_t first = part * tokens / parts, last = (part + 1) * tokens / parts;
    for (int64_t t = first; t < last; ++t) {
      float* dx_t = dx_data + t * width;
      const float* x_t = x_data + t * width;
      std::memset(dx_t, 0, sizeof(float) * width);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = id_data[t * k + j];
        if (e < 0 || e >= experts) continue;
        const float g = dc[t * k + j];
        const float* w_e = w_t.data() + e * width;
        float* acc_e = acc + e * width;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) {
          dx_t[c] += g * w_e[c];
          acc_e[c] += g * x_t[c];
        }
      }
    }
  });
  float* dw_data = d_w->typed_data();
  moejax::ForEachItem(pool, width, [&](int64_t d) {
    for (int64_t e = 0; e < experts; ++e) {
      float sum = 0.0f;
      for (int64_t p = 0; p < parts; ++p) sum += partial[(p * experts + e) * width + d];
      dw_data[d * experts + e] = sum;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxRouterChosenBackward, RouterChosenBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [D, E]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids [..., k]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_chosen [..., k]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_x [..., D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_w [D, E]
