// Causal attention for XLA:CPU through the XLA FFI: forward and backward, each (sequence, kv
// head) pair one piece of work, its GEMMs OpenBLAS sgemms. Called by
// moejax/model/cpu_attention.py; its docstring says why and what the layouts are.
//
// Layouts (row-major, float32): q [B, T, K, G, Dq], k [B, T, K, Dq], v [B, T, K, Dv],
// out [B, T, K, G, Dv], lse [B, K, T, G] (each query row's log-sum-exp of its scaled scores).
// For one (b, kv head) the G query heads at position t are the rows t * G + g of a
// [T * G, Dq] matrix; query position t sees key positions 0..t.
//
// The queries run in chunks of kChunk positions: a chunk's rows need only the keys up to its
// last position (the causal skip), and the scores in memory are [kChunk * G, T] per thread
// whatever T is.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_kernels.h"

namespace {

constexpr int64_t kChunk = 64;

struct Dims {
  int64_t batch, seq, kv_heads, groups, qk_dim, v_dim;

  // First element of row t (all G heads) of q-shaped ([B, T, K, G, D]) arrays.
  int64_t QueryRow(int64_t b, int64_t t, int64_t kv, int64_t dim) const {
    return ((b * seq + t) * kv_heads + kv) * groups * dim;
  }
  // First element of position t of k-shaped ([B, T, K, D]) arrays; rows kv_heads * dim apart.
  int64_t KeyRow(int64_t b, int64_t t, int64_t kv, int64_t dim) const {
    return ((b * seq + t) * kv_heads + kv) * dim;
  }
};

ffi::Error CheckDims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                     const ffi::Buffer<ffi::F32>& v, Dims* dims) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || vd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] ||
      kd[2] != qd[2] || kd[3] != qd[4] || vd[0] != qd[0] || vd[1] != qd[1] || vd[2] != qd[2]) {
    return ffi::Error::InvalidArgument(
        "causal_attention: expected q [B, T, K, G, Dq], k [B, T, K, Dq], v [B, T, K, Dv]");
  }
  *dims = {qd[0], qd[1], qd[2], qd[3], qd[4], vd[3]};
  return ffi::Error::Success();
}

// Copies a chunk's query rows (positions [t0, t1), all G heads) of a q-shaped array into a
// [(t1 - t0) * G, dim] matrix, or back when `to_matrix` is false.
void CopyRows(const Dims& d, float* strided, float* matrix, int64_t b, int64_t kv, int64_t t0,
              int64_t t1, int64_t dim, bool to_matrix) {
  const int64_t width = d.groups * dim;
  for (int64_t t = t0; t < t1; ++t) {
    float* row = strided + d.QueryRow(b, t, kv, dim);
    float* packed = matrix + (t - t0) * width;
    std::memcpy(to_matrix ? packed : row, to_matrix ? row : packed, sizeof(float) * width);
  }
}

// scores [rows, keys] -> probabilities in place: row r (position t0 + r / G) keeps keys
// 0..t0 + r / G, the rest become 0. With lse null, writes each row's log-sum-exp to lse_out;
// otherwise takes it from lse (the backward's recomputation).
void CausalSoftmax(float* scores, int64_t rows, int64_t keys, int64_t groups, int64_t t0,
                   float* lse_out, const float* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * keys;
    const int64_t visible = t0 + r / groups + 1;
    if (lse == nullptr) {
      float peak = row[0];
#pragma omp simd reduction(max : peak)
      for (int64_t j = 1; j < visible; ++j) peak = std::max(peak, row[j]);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < visible; ++j) {
        row[j] = moejax::VectorExp(row[j] - peak);
        sum += row[j];
      }
      const float inverse = 1.0f / sum;
      for (int64_t j = 0; j < visible; ++j) row[j] *= inverse;
      lse_out[r] = peak + std::log(sum);
    } else {
      const float log_sum = lse[r];
      for (int64_t j = 0; j < visible; ++j) row[j] = moejax::VectorExp(row[j] - log_sum);
    }
    std::fill(row + visible, row + keys, 0.0f);
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, float scale) {
  Dims d;
  if (auto error = CheckDims(q, k, v, &d); error.failure()) return error;
  float* q_data = q.typed_data();
  const float* k_data = k.typed_data();
  const float* v_data = v.typed_data();
  float* out_data = out->typed_data();
  float* lse_data = lse->typed_data();
  moejax::ForEachItem(pool, d.batch * d.kv_heads, [&](int64_t item) {
    const int64_t b = item / d.kv_heads, kv = item % d.kv_heads;
    const float* keys = k_data + d.KeyRow(b, 0, kv, d.qk_dim);
    const float* values = v_data + d.KeyRow(b, 0, kv, d.v_dim);
    std::vector<float> queries(kChunk * d.groups * d.qk_dim), scores(kChunk * d.groups * d.seq),
        outputs(kChunk * d.groups * d.v_dim);
    for (int64_t t0 = 0; t0 < d.seq; t0 += kChunk) {
      const int64_t t1 = std::min(d.seq, t0 + kChunk), rows = (t1 - t0) * d.groups, n = t1;
      CopyRows(d, q_data, queries.data(), b, kv, t0, t1, d.qk_dim, true);
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, d.qk_dim, scale,
                        queries.data(), d.qk_dim, keys, d.kv_heads * d.qk_dim, 0.0f,
                        scores.data(), n);
      CausalSoftmax(scores.data(), rows, n, d.groups, t0,
                    lse_data + item * d.seq * d.groups + t0 * d.groups, nullptr);
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d.v_dim, n, 1.0f,
                        scores.data(), n, values, d.kv_heads * d.v_dim, 0.0f, outputs.data(),
                        d.v_dim);
      CopyRows(d, out_data, outputs.data(), b, kv, t0, t1, d.v_dim, false);
    }
  });
  return ffi::Error::Success();
}

// Zeroes the [T, dim] block of (b, kv) in a k-shaped array (rows kv_heads * dim apart).
void ZeroKeyRows(const Dims& d, float* data, int64_t b, int64_t kv, int64_t dim) {
  for (int64_t t = 0; t < d.seq; ++t) {
    std::memset(data + d.KeyRow(b, t, kv, dim), 0, sizeof(float) * dim);
  }
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out,
                    ffi::ResultBuffer<ffi::F32> d_q, ffi::ResultBuffer<ffi::F32> d_k,
                    ffi::ResultBuffer<ffi::F32> d_v, float scale) {
  Dims d;
  if (auto error = CheckDims(q, k, v, &d); error.failure()) return error;
  float* q_data = q.typed_data();
  float* out_data = out.typed_data();
  float* d_out_data = d_out.typed_data();
  const float* lse_data = lse.typed_data();
  float* d_q_data = d_q->typed_data();
  float* d_k_data = d_k->typed_data();
  float* d_v_data = d_v->typed_data();
  moejax::ForEachItem(pool, d.batch * d.kv_heads, [&](int64_t item) {
    const int64_t b = item / d.kv_heads, kv = item % d.kv_heads;
    const int64_t k_stride = d.kv_heads * d.qk_dim, v_stride = d.kv_heads * d.v_dim;
    const float* keys = k.typed_data() + d.KeyRow(b, 0, kv, d.qk_dim);
    const float* values = v.typed_data() + d.KeyRow(b, 0, kv, d.v_dim);
    float* d_keys = d_k_data + d.KeyRow(b, 0, kv, d.qk_dim);
    float* d_values = d_v_data + d.KeyRow(b, 0, kv, d.v_dim);
    ZeroKeyRows(d, d_k_data, b, kv, d.qk_dim);
    ZeroKeyRows(d, d_v_data, b, kv, d.v_dim);
    const int64_t chunk_rows = kChunk * d.groups;
    std::vector<float> queries(chunk_rows * d.qk_dim), d_queries(chunk_rows * d.qk_dim),
        outputs(chunk_rows * d.v_dim), d_outputs(chunk_rows * d.v_dim),
        probs(chunk_rows * d.seq), d_scores(chunk_rows * d.seq), row_dot(chunk_rows);
    for (int64_t t0 = 0; t0 < d.seq; t0 += kChunk) {
      const int64_t t1 = std::min(d.seq, t0 + kChunk), rows = (t1 - t0) * d.groups, n = t1;
      CopyRows(d, q_data, queries.data(), b, kv, t0, t1, d.qk_dim, true);
      CopyRows(d, out_data, outputs.data(), b, kv, t0, t1, d.v_dim, true);
      CopyRows(d, d_out_data, d_outputs.data(), b, kv, t0, t1, d.v_dim, true);
      for (int64_t r = 0; r < rows; ++r) {  // D_r = dO_r . O_r, the softmax backward's row term
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < d.v_dim; ++c) {
          dot += d_outputs[r * d.v_dim + c] * outputs[r * d.v_dim + c];
        }
        row_dot[r] = dot;
      }
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, d.qk_dim, scale,
                        queries.data(), d.qk_dim, keys, k_stride, 0.0f, probs.data(), n);
      CausalSoftmax(probs.data(), rows, n, d.groups, t0, nullptr,
                    lse_data + item * d.seq * d.groups + t0 * d.groups);
      // dV += P^T dO; dP = dO V^T; dS = P (dP - D); dQ = scale dS K; dK += scale dS^T Q
      scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, d.v_dim, rows, 1.0f,
                        probs.data(), n, d_outputs.data(), d.v_dim, 1.0f, d_values, v_stride);
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, d.v_dim, 1.0f,
                        d_outputs.data(), d.v_dim, values, v_stride, 0.0f, d_scores.data(), n);
      for (int64_t r = 0; r < rows; ++r) {
        float* ds = d_scores.data() + r * n;
        const float* p = probs.data() + r * n;
        for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - row_dot[r]);
      }
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d.qk_dim, n, scale,
                        d_scores.data(), n, keys, k_stride, 0.0f, d_queries.data(), d.qk_dim);
      CopyRows(d, d_q_data, d_queries.data(), b, kv, t0, t1, d.qk_dim, false);
      scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, d.qk_dim, rows, scale,
                        d_scores.data(), n, queries.data(), d.qk_dim, 1.0f, d_keys, k_stride);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxCausalAttention, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxCausalAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
