// A dense float32 matmul and its backward for XLA:CPU through the XLA FFI, as OpenBLAS sgemms
// shared out over XLA's thread pool. Called by moejax/model/cpu_matmul.py; its docstring says
// why.
//
// Forward: y [M, N] = x [M, K] w [K, N], by chunks of rows. Backward: d_x [M, K] = d_y w^T by
// chunks of rows, and d_w [K, N] = x^T d_y by tiles of d_w, in one call; the transposes are
// sgemm's, nothing is transposed in memory.
#include <algorithm>
#include <cstdint>

#include "cpu_kernels.h"

namespace {

constexpr int64_t kRowChunk = 256;      // rows of x (and of d_x) per piece of work
constexpr int64_t kWeightRowChunk = 64;  // rows (K) of a d_w tile
constexpr int64_t kWeightColChunk = 128;  // columns (N) of a d_w tile

struct Shape {
  int64_t m, k, n;
};

// The matmul's M, K, N from x [..., K] and w [K, N] into `shape`, or an error.
ffi::Error MatmulShape(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w,
                       Shape& shape) {
  const auto w_dims = w.dimensions();
  if (w_dims.size() != 2) return ffi::Error::InvalidArgument("matmul: w must be [K, N]");
  const int64_t k = w_dims[0], n = w_dims[1];
  const auto x_dims = x.dimensions();
  if (x_dims.size() == 0 || x_dims[x_dims.size() - 1] != k) {
    return ffi::Error::InvalidArgument("matmul: x's last dimension must be w's first");
  }
  int64_t m = 1;  // the product of x's leading dimensions (also when K is 0)
  for (size_t i = 0; i + 1 < x_dims.size(); ++i) m *= x_dims[i];
  shape = {m, k, n};
  return ffi::Error::Success();
}

int64_t Chunks(int64_t size, int64_t chunk) { return (size + chunk - 1) / chunk; }

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  Shape shape;
  if (ffi::Error error = MatmulShape(x, w, shape); error.failure()) return error;
  const auto [m, k, n] = shape;
  const float *x_data = x.typed_data(), *w_data = w.typed_data();
  float* y_data = y->typed_data();
  moejax::ForEachItem(pool, Chunks(m, kRowChunk), [&](int64_t chunk) {
    const int64_t row = chunk * kRowChunk, rows = std::min(kRowChunk, m - row);
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, n, k, 1.0f,
                      x_data + row * k, k, w_data, n, 0.0f, y_data + row * n, n);
  });
  return ffi::Error::Success();
}

ffi::Error MatmulBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> d_y,
                          ffi::ResultBuffer<ffi::F32> d_x, ffi::ResultBuffer<ffi::F32> d_w) {
  Shape shape;
  if (ffi::Error error = MatmulShape(x, w, shape); error.failure()) return error;
  const auto [m, k, n] = shape;
  const float *x_data = x.typed_data(), *w_data = w.typed_data(), *dy = d_y.typed_data();
  float *dx = d_x->typed_data(), *dw = d_w->typed_data();
  const int64_t row_chunks = Chunks(m, kRowChunk);
  const int64_t tile_rows = Chunks(k, kWeightRowChunk), tile_cols = Chunks(n, kWeightColChunk);
  moejax::ForEachItem(pool, row_chunks + tile_rows * tile_cols, [&](int64_t item) {
    if (item < row_chunks) {  // d_x rows = d_y rows w^T
      const int64_t row = item * kRowChunk, rows = std::min(kRowChunk, m - row);
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, k, n, 1.0f,
                        dy + row * n, n, w_data, n, 0.0f, dx + row * k, k);
      return;
    }
    const int64_t tile = item - row_chunks;  // d_w tile = x[:, k0:k1]^T d_y[:, n0:n1]
    const int64_t k0 = (tile / tile_cols) * kWeightRowChunk;
    const int64_t n0 = (tile % tile_cols) * kWeightColChunk;
    const int64_t ks = std::min(kWeightRowChunk, k - k0), ns = std::min(kWeightColChunk, n - n0);
    if (m == 0) {
      for (int64_t r = 0; r < ks; ++r) std::fill_n(dw + (k0 + r) * n + n0, ns, 0.0f);
      return;
    }
    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, ks, ns, m, 1.0f, x_data + k0, k,
                      dy + n0, n, 0.0f, dw + k0 * n + n0, n);
  });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [..., N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxMatmulBackward, MatmulBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [K, N]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_y [..., N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_x [..., K]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_w [K, N]
