// Grouped GEMMs for XLA:CPU through the XLA FFI, each group one BLAS sgemm (OpenBLAS from the
// scipy-openblas32 wheel). Called by moejax/model/dispatch/cpu_gemm.py; its docstring says why.
//
// Rows are sorted by group: group g owns rows [start_g, start_g + sizes[g]) with
// start_g = sizes[0] + ... + sizes[g - 1]. Rows past the last group are padding.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu_kernels.h"

namespace {

// Each group's first row, and at [groups] the end of the last group (sizes clipped to the
// rows there are; negative sizes count as 0).
std::unique_ptr<int64_t[]> GroupStarts(const int32_t* sizes, int64_t groups, int64_t total_rows) {
  std::unique_ptr<int64_t[]> starts(new int64_t[groups + 1]);
  int64_t row = 0;
  for (int64_t g = 0; g < groups; ++g) {
    starts[g] = row;
    row = std::min(total_rows, row + std::max<int64_t>(sizes[g], 0));
  }
  starts[groups] = row;
  return starts;
}

// out [R, N]: out_g = x_g w[g], x [R, K], w [G, K, N] (or out_g = x_g w[g]^T with w [G, N, K]
// when transpose_w). Padding rows of out are zero.
ffi::Error GroupedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> out,
                         bool transpose_w) {
  const auto x_dims = x.dimensions(), w_dims = w.dimensions(), out_dims = out->dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3 || out_dims.size() != 2 ||
      sizes.dimensions().size() != 1 || sizes.dimensions()[0] != w_dims[0]) {
    return ffi::Error::InvalidArgument("grouped_matmul: expected x [R, K], w [G, ., .], sizes [G]");
  }
  const int64_t total_rows = x_dims[0], k = x_dims[1], groups = w_dims[0], n = out_dims[1];
  if ((transpose_w ? w_dims[2] : w_dims[1]) != k || (transpose_w ? w_dims[1] : w_dims[2]) != n ||
      out_dims[0] != total_rows) {
    return ffi::Error::InvalidArgument("grouped_matmul: x, w and out shapes disagree");
  }
  const float* x_data = x.typed_data();
  const float* w_data = w.typed_data();
  float* out_data = out->typed_data();
  const auto starts = GroupStarts(sizes.typed_data(), groups, total_rows);
  moejax::ForEachItem(pool, groups, [&](int64_t g) {
    const int64_t row = starts[g], rows = starts[g + 1] - starts[g];
    if (rows == 0) return;
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, transpose_w ? CblasTrans : CblasNoTrans,
                      rows, n, k, 1.0f, x_data + row * k, k, w_data + g * k * n,
                      transpose_w ? k : n, 0.0f, out_data + row * n, n);
  });
  const int64_t used_rows = starts[groups];
  std::memset(out_data + used_rows * n, 0, sizeof(float) * (total_rows - used_rows) * n);
  return ffi::Error::Success();
}

// out [G, K, N]: out[g] = x_g^T dy_g, x [R, K], dy [R, N]; a group with no rows gets zeros.
ffi::Error GroupedOuter(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                        ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> out) {
  const auto x_dims = x.dimensions(), dy_dims = dy.dimensions(), out_dims = out->dimensions();
  if (x_dims.size() != 2 || dy_dims.size() != 2 || out_dims.size() != 3 ||
      x_dims[0] != dy_dims[0] || out_dims[1] != x_dims[1] || out_dims[2] != dy_dims[1] ||
      sizes.dimensions().size() != 1 || sizes.dimensions()[0] != out_dims[0]) {
    return ffi::Error::InvalidArgument("grouped_outer: expected x [R, K], dy [R, N], out [G, K, N]");
  }
  const int64_t total_rows = x_dims[0], k = x_dims[1], n = dy_dims[1], groups = out_dims[0];
  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  float* out_data = out->typed_data();
  const auto starts = GroupStarts(sizes.typed_data(), groups, total_rows);
  moejax::ForEachItem(pool, groups, [&](int64_t g) {
    const int64_t row = starts[g], rows = starts[g + 1] - starts[g];
    float* out_g = out_data + g * k * n;
    if (rows == 0) {
      std::memset(out_g, 0, sizeof(float) * k * n);
      return;
    }
    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, n, rows, 1.0f,
                      x_data + row * k, k, dy_data + row * n, n, 0.0f, out_g, n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxGroupedMatmul, GroupedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxGroupedOuter, GroupedOuter,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
