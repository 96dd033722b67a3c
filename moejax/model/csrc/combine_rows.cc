// The backward of the dropless combine (moejax/model/dispatch/grouped.py combine_rows) for
// XLA:CPU through the XLA FFI, called by moejax/model/cpu_combine.py; its docstring says why.
//
// Buffer row r holds the result of one assignment of token token_of_row[r] (M or more: a
// padding row, no token) with combine weight weight_of_row[r]. Given d_y [M, D]:
//   d_computed[r] = weight_of_row[r] * d_y[token_of_row[r]]     (a zero row for padding)
//   d_weight_of_row[r] = d_y[token_of_row[r]] . computed[r]     (0 for padding)
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

namespace {

constexpr int64_t kRowChunk = 256;  // buffer rows per piece of work shared out over the threads

ffi::Error CombineRowsBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> d_y,
                               ffi::Buffer<ffi::F32> computed, ffi::Buffer<ffi::S32> token_of_row,
                               ffi::Buffer<ffi::F32> weight_of_row,
                               ffi::ResultBuffer<ffi::F32> d_computed,
                               ffi::ResultBuffer<ffi::F32> d_weight_of_row) {
  const auto yd = d_y.dimensions(), cd = computed.dimensions();
  if (yd.size() != 2 || cd.size() != 2 || yd[1] != cd[1] ||
      token_of_row.dimensions().size() != 1 || token_of_row.dimensions()[0] != cd[0] ||
      weight_of_row.dimensions().size() != 1 || weight_of_row.dimensions()[0] != cd[0]) {
    return ffi::Error::InvalidArgument(
        "combine_rows_backward: expected d_y [M, D], computed [R, D], token_of_row [R], "
        "weight_of_row [R]");
  }
  const int64_t tokens = yd[0], width = yd[1], rows = cd[0];
  const float *dy = d_y.typed_data(), *c = computed.typed_data(),
              *weight = weight_of_row.typed_data();
  const int32_t* token = token_of_row.typed_data();
  float *dc = d_computed->typed_data(), *dw = d_weight_of_row->typed_data();
  moejax::ForEachItem(pool, (rows + kRowChunk - 1) / kRowChunk, [&](int64_t chunk) {
    const int64_t last = std::min(rows, (chunk + 1) * kRowChunk);
    for (int64_t r = chunk * kRowChunk; r < last; ++r) {
      float* dc_r = dc + r * width;
      const int64_t t = token[r];
      if (t < 0 || t >= tokens) {
        std::memset(dc_r, 0, sizeof(float) * width);
        dw[r] = 0.0f;
        continue;
      }
      const float *dy_t = dy + t * width, *c_r = c + r * width, w = weight[r];
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < width; ++j) {
        dc_r[j] = w * dy_t[j];
        dot += dy_t[j] * c_r[j];
      }
      dw[r] = dot;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxCombineRowsBackward, CombineRowsBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_y [M, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // computed [R, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // token_of_row [R]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight_of_row [R]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_computed [R, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_weight_of_row [R]
