// The SwiGLU of grouped experts (or of one dense layer: one group) for XLA:CPU through the XLA
// FFI, each group's GEMMs OpenBLAS sgemms (the scipy-openblas32 wheel) with the activation
// computed beside them. Called by moejax/model/cpu_swiglu.py; its docstring says why.
//
// Rows are sorted by group: group g owns rows [start_g, start_g + sizes[g]) with
// start_g = sizes[0] + ... + sizes[g - 1]. Rows past the last group are padding.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

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

// The SwiGLU's work split for threads: row chunks within each group (one group of all rows,
// the dense layer, still spreads over every thread) of kChunkElements / F rows, between
// kMinRowChunk and kMaxRowChunk: a chunk's [rows, F] pre-activations and hidden stay the same
// size whatever F, and narrow experts (F < 512) pack each weight for more rows; and for the
// weight gradients each group's hidden units whole where the groups alone give every thread
// kItemsPerThread pieces of work (each operand then packed once per group), else cut into
// column chunks of at least kColumnChunk hidden units (few groups: a dense layer is one).
constexpr int64_t kChunkElements = 256 * 512;
constexpr int64_t kMinRowChunk = 256;
constexpr int64_t kMaxRowChunk = 1024;
constexpr int64_t kColumnChunk = 128;
constexpr int64_t kItemsPerThread = 4;

// The hidden units per weight-gradient piece of work: see above.
int64_t WeightGradientColumns(int64_t groups, int64_t hidden, int64_t threads) {
  const int64_t wanted = kItemsPerThread * std::max<int64_t>(threads, 1);
  const int64_t per_group = std::max<int64_t>(1, (wanted + groups - 1) / groups);
  const int64_t columns = std::max(kColumnChunk, (hidden + per_group - 1) / per_group);
  return std::max<int64_t>(1, std::min(hidden, columns));  // 1: no work item divides by 0
}

struct RowChunk {
  int64_t group, row, rows;
};

std::vector<RowChunk> RowChunks(const int64_t* starts, int64_t groups, int64_t hidden) {
  const int64_t most = std::clamp(kChunkElements / std::max<int64_t>(hidden, 1), kMinRowChunk,
                                  kMaxRowChunk);
  std::vector<RowChunk> chunks;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t row = starts[g]; row < starts[g + 1]; row += most) {
      chunks.push_back({g, row, std::min(most, starts[g + 1] - row)});
    }
  }
  return chunks;
}

// One call's shapes and its split into row chunks.
struct SwigluWork {
  int64_t total_rows, d_model, hidden, d_out, groups;
  std::unique_ptr<int64_t[]> starts;  // GroupStarts: [groups] is the end of the used rows
  std::vector<RowChunk> chunks;
};

// Checks the operands' shapes and fills `work` (or says what is wrong).
ffi::Error PlanSwiglu(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w_gate,
                      const ffi::Buffer<ffi::F32>& w_up, const ffi::Buffer<ffi::F32>& w_down,
                      const ffi::Buffer<ffi::S32>& sizes, SwigluWork* work) {
  const auto xd = x.dimensions(), gd = w_gate.dimensions(), ud = w_up.dimensions(),
             dd = w_down.dimensions();
  if (xd.size() != 2 || gd.size() != 3 || ud.size() != 3 || dd.size() != 3 || gd[1] != xd[1] ||
      ud[0] != gd[0] || ud[1] != gd[1] || ud[2] != gd[2] || dd[0] != gd[0] || dd[1] != gd[2] ||
      sizes.dimensions().size() != 1 || sizes.dimensions()[0] != gd[0]) {
    return ffi::Error::InvalidArgument(
        "grouped_swiglu: expected x [R, D], w_gate and w_up [G, D, F], w_down [G, F, N], "
        "sizes [G]");
  }
  *work = {xd[0], xd[1], gd[2], dd[2], gd[0], GroupStarts(sizes.typed_data(), gd[0], xd[0]), {}};
  work->chunks = RowChunks(work->starts.get(), work->groups, work->hidden);
  return ffi::Error::Success();
}

// y [R, N] = (silu(x W_gate) * (x W_up)) W_down per group; also returns the pre-activations
// gate and up [R, F] (the backward's residuals). Rows past the groups: zero.
ffi::Error GroupedSwiglu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up,
                         ffi::Buffer<ffi::F32> w_down, ffi::Buffer<ffi::S32> sizes,
                         ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> gate,
                         ffi::ResultBuffer<ffi::F32> up) {
  SwigluWork d;
  if (auto error = PlanSwiglu(x, w_gate, w_up, w_down, sizes, &d); error.failure()) {
    return error;
  }
  const int64_t D = d.d_model, F = d.hidden, N = d.d_out;
  const auto& starts = d.starts;
  const auto& chunks = d.chunks;
  const float* x_data = x.typed_data();
  float *y_data = y->typed_data(), *gate_data = gate->typed_data(), *up_data = up->typed_data();
  moejax::ForEachItem(pool, chunks.size(), [&](int64_t i) {
    const RowChunk c = chunks[i];
    const float* x_c = x_data + c.row * D;
    float *gate_c = gate_data + c.row * F, *up_c = up_data + c.row * F;
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, c.rows, F, D, 1.0f, x_c, D,
                      w_gate.typed_data() + c.group * D * F, F, 0.0f, gate_c, F);
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, c.rows, F, D, 1.0f, x_c, D,
                      w_up.typed_data() + c.group * D * F, F, 0.0f, up_c, F);
    // not zeroed (a std::vector would be): every element is written just below
    std::unique_ptr<float[]> hidden(new float[c.rows * F]);
#pragma omp simd
    for (int64_t j = 0; j < c.rows * F; ++j) {
      hidden[j] = gate_c[j] / (1.0f + moejax::VectorExp(-gate_c[j])) * up_c[j];
    }
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, c.rows, N, F, 1.0f,
                      hidden.get(), F, w_down.typed_data() + c.group * F * N, N, 0.0f,
                      y_data + c.row * N, N);
  });
  const int64_t used = starts[d.groups], padding = d.total_rows - used;
  std::memset(y_data + used * N, 0, sizeof(float) * padding * N);
  std::memset(gate_data + used * F, 0, sizeof(float) * padding * F);
  std::memset(up_data + used * F, 0, sizeof(float) * padding * F);
  return ffi::Error::Success();
}

// The SwiGLU's backward from its residuals: d_x [R, D] and the weight gradients d_w_gate,
// d_w_up [G, D, F], d_w_down [G, F, N] (zero for a group with no rows). First per row chunk
// the activation's gradients (kept for the whole call in the three scratch results) and d_x,
// then per group (or chunk of its hidden columns: WeightGradientColumns) the three weight
// gradients as rows^T x gradient GEMMs.
ffi::Error GroupedSwigluBackward(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_gate,
    ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down, ffi::Buffer<ffi::S32> sizes,
    ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> d_y,
    ffi::ResultBuffer<ffi::F32> d_x, ffi::ResultBuffer<ffi::F32> d_w_gate,
    ffi::ResultBuffer<ffi::F32> d_w_up, ffi::ResultBuffer<ffi::F32> d_w_down,
    ffi::ResultBuffer<ffi::F32> d_gate_scratch, ffi::ResultBuffer<ffi::F32> d_up_scratch,
    ffi::ResultBuffer<ffi::F32> hidden_scratch) {
  SwigluWork d;
  if (auto error = PlanSwiglu(x, w_gate, w_up, w_down, sizes, &d); error.failure()) {
    return error;
  }
  const int64_t D = d.d_model, F = d.hidden, N = d.d_out;
  const auto& starts = d.starts;
  const auto& chunks = d.chunks;
  const int64_t used = starts[d.groups];
  // [R, F] each, allocated by XLA as results the caller drops, so that XLA's memory analysis
  // counts them
  float *d_gate = d_gate_scratch->typed_data(), *d_up = d_up_scratch->typed_data(),
        *hidden = hidden_scratch->typed_data();
  const float *x_data = x.typed_data(), *dy_data = d_y.typed_data();
  float* dx_data = d_x->typed_data();
  moejax::ForEachItem(pool, chunks.size(), [&](int64_t i) {
    const RowChunk c = chunks[i];
    const int64_t at = c.row * F, count = c.rows * F;
    float *dg = d_gate + at, *du = d_up + at, *h = hidden + at;
    // d_hidden into d_up's slot, then the activation's gradients in place
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c.rows, F, N, 1.0f,
                      dy_data + c.row * N, N, w_down.typed_data() + c.group * F * N, N, 0.0f,
                      du, F);
    const float *g = gate.typed_data() + at, *u = up.typed_data() + at;
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) {
      const float sig = 1.0f / (1.0f + moejax::VectorExp(-g[j])), silu = g[j] * sig;
      const float d_hidden = du[j];
      dg[j] = d_hidden * u[j] * sig * (1.0f + g[j] * (1.0f - sig));
      du[j] = d_hidden * silu;
      h[j] = silu * u[j];
    }
    float* dx_c = dx_data + c.row * D;
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c.rows, D, F, 1.0f, dg, F,
                      w_gate.typed_data() + c.group * D * F, F, 0.0f, dx_c, D);
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c.rows, D, F, 1.0f, du, F,
                      w_up.typed_data() + c.group * D * F, F, 1.0f, dx_c, D);
  });
  std::memset(dx_data + used * D, 0, sizeof(float) * (d.total_rows - used) * D);
  const int64_t columns = WeightGradientColumns(d.groups, F, pool.num_threads());
  const int64_t column_chunks = (F + columns - 1) / columns;
  float *dwg = d_w_gate->typed_data(), *dwu = d_w_up->typed_data(),
        *dwd = d_w_down->typed_data();
  moejax::ForEachItem(pool, d.groups * column_chunks, [&](int64_t i) {
    const int64_t g = i / column_chunks, f0 = (i % column_chunks) * columns;
    const int64_t cols = std::min(columns, F - f0);
    const int64_t row = starts[g], rows = starts[g + 1] - starts[g];
    float *dwg_g = dwg + g * D * F + f0, *dwu_g = dwu + g * D * F + f0,
          *dwd_g = dwd + (g * F + f0) * N;
    if (rows == 0) {
      for (int64_t r = 0; r < D; ++r) {
        std::memset(dwg_g + r * F, 0, sizeof(float) * cols);
        std::memset(dwu_g + r * F, 0, sizeof(float) * cols);
      }
      std::memset(dwd_g, 0, sizeof(float) * cols * N);
      return;
    }
    const float* x_g = x_data + row * D;
    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, D, cols, rows, 1.0f, x_g, D,
                      d_gate + row * F + f0, F, 0.0f, dwg_g, F);
    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, D, cols, rows, 1.0f, x_g, D,
                      d_up + row * F + f0, F, 0.0f, dwu_g, F);
    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, cols, N, rows, 1.0f,
                      hidden + row * F + f0, F, dy_data + row * N, N, 0.0f, dwd_g, N);
  });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxGroupedSwiglu, GroupedSwiglu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxGroupedSwigluBackward, GroupedSwigluBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_x
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_w_gate
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_w_up
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_w_down
                                  .Ret<ffi::Buffer<ffi::F32>>()  // scratch: d_gate [R, F]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // scratch: d_up [R, F]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // scratch: hidden [R, F]
