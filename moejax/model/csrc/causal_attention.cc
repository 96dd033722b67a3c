// Causal attention for XLA:CPU through the XLA FFI: forward and backward, each (sequence, kv
// head) pair one piece of work, its GEMMs OpenBLAS sgemms. Called by
// moejax/model/cpu_attention.py; its docstring says why and what the layouts are.
//
// Layouts (row-major, float32): each query and key in two parts, q1 [B, T, K, G, D1] with
// q2 [B, T, K, G, D2], k1 [B, T, K, D1] with k2 [B, T, K2, D2] (K2 = K, or 1: one k2 for every
// kv head, MLA's shared RoPE key; D2 may be 0), so that q.k = q1.k1 + q2.k2 without the
// caller concatenating them; v [B, T, K, Dv]; out [B, T, K, G, Dv]; lse [B, K, T, G] (each
// query row's log-sum-exp of its scaled scores). For one (b, kv head) the G query heads at
// position t are the rows t * G + g of a [T * G, D1 + D2] matrix; query position t sees key
// positions 0..t.
//
// The queries run in chunks of kChunk positions: a chunk's rows need only the keys up to its
// last position (the causal skip), and the scores in memory are [kChunk * G, T] per thread
// whatever T is.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

namespace {

constexpr int64_t kChunk = 64;

struct Dims {
  int64_t batch, seq, kv_heads, groups, d1, d2, v_dim, k2_heads;

  int64_t qk_dim() const { return d1 + d2; }
  // First element of row t (all G heads) of q-shaped ([B, T, K, G, D]) arrays.
  int64_t QueryRow(int64_t b, int64_t t, int64_t kv, int64_t dim) const {
    return ((b * seq + t) * kv_heads + kv) * groups * dim;
  }
  // First element of position t of k-shaped ([B, T, heads, D]) arrays.
  int64_t KeyRow(int64_t b, int64_t t, int64_t kv, int64_t dim, int64_t heads) const {
    return ((b * seq + t) * heads + kv) * dim;
  }
};

ffi::Error CheckDims(const ffi::Buffer<ffi::F32>& q1, const ffi::Buffer<ffi::F32>& q2,
                     const ffi::Buffer<ffi::F32>& k1, const ffi::Buffer<ffi::F32>& k2,
                     const ffi::Buffer<ffi::F32>& v, Dims* dims) {
  const auto qd = q1.dimensions(), q2d = q2.dimensions(), kd = k1.dimensions(),
             k2d = k2.dimensions(), vd = v.dimensions();
  const bool ok =
      qd.size() == 5 && q2d.size() == 5 && kd.size() == 4 && k2d.size() == 4 && vd.size() == 4 &&
      std::equal(qd.begin(), qd.begin() + 4, q2d.begin()) && kd[0] == qd[0] && kd[1] == qd[1] &&
      kd[2] == qd[2] && kd[3] == qd[4] && k2d[0] == qd[0] && k2d[1] == qd[1] &&
      (k2d[2] == qd[2] || k2d[2] == 1) && k2d[3] == q2d[4] && vd[0] == qd[0] &&
      vd[1] == qd[1] && vd[2] == qd[2];
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "causal_attention: expected q1 [B, T, K, G, D1], q2 [B, T, K, G, D2], k1 [B, T, K, D1], "
        "k2 [B, T, K or 1, D2], v [B, T, K, Dv]");
  }
  *dims = {qd[0], qd[1], qd[2], qd[3], qd[4], q2d[4], vd[3], k2d[2]};
  return ffi::Error::Success();
}

// Copies a chunk's query rows (positions [t0, t1), all G heads) of a q-shaped array of `dim`
// per row into columns [column, column + dim) of a [(t1 - t0) * G, width] matrix, or back
// when `to_matrix` is false.
void CopyRows(const Dims& d, float* strided, float* matrix, int64_t b, int64_t kv, int64_t t0,
              int64_t t1, int64_t dim, int64_t width, int64_t column, bool to_matrix) {
  if (dim == 0) return;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t g = 0; g < d.groups; ++g) {
      float* row = strided + d.QueryRow(b, t, kv, dim) + g * dim;
      float* packed = matrix + ((t - t0) * d.groups + g) * width + column;
      std::memcpy(to_matrix ? packed : row, to_matrix ? row : packed, sizeof(float) * dim);
    }
  }
}

// A chunk's queries [(t1 - t0) * G, D1 + D2] from q1 and q2 (or their gradients back).
void CopyQueries(const Dims& d, float* q1, float* q2, float* matrix, int64_t b, int64_t kv,
                 int64_t t0, int64_t t1, bool to_matrix) {
  CopyRows(d, q1, matrix, b, kv, t0, t1, d.d1, d.qk_dim(), 0, to_matrix);
  CopyRows(d, q2, matrix, b, kv, t0, t1, d.d2, d.qk_dim(), d.d1, to_matrix);
}

// The keys of (b, kv) [T, D1 + D2] from k1 and k2, or their gradients back into d_k1
// [B, T, K, D1] and d_k2 [B, T, K, D2] (per kv head even where k2 is shared: the caller sums).
void CopyKeys(const Dims& d, float* k1, float* k2, float* matrix, int64_t b, int64_t kv,
              bool to_matrix) {
  const int64_t width = d.qk_dim(), kv2 = to_matrix && d.k2_heads == 1 ? 0 : kv;
  const int64_t heads2 = to_matrix ? d.k2_heads : d.kv_heads;
  for (int64_t t = 0; t < d.seq; ++t) {
    float* packed = matrix + t * width;
    float* row1 = k1 + d.KeyRow(b, t, kv, d.d1, d.kv_heads);
    std::memcpy(to_matrix ? packed : row1, to_matrix ? row1 : packed, sizeof(float) * d.d1);
    if (d.d2 == 0) continue;
    float* row2 = k2 + d.KeyRow(b, t, kv2, d.d2, heads2);
    std::memcpy(to_matrix ? packed + d.d1 : row2, to_matrix ? row2 : packed + d.d1,
                sizeof(float) * d.d2);
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

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q1, ffi::Buffer<ffi::F32> q2,
                   ffi::Buffer<ffi::F32> k1, ffi::Buffer<ffi::F32> k2, ffi::Buffer<ffi::F32> v,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                   float scale) {
  Dims d;
  if (auto error = CheckDims(q1, q2, k1, k2, v, &d); error.failure()) return error;
  float* out_data = out->typed_data();
  float* lse_data = lse->typed_data();
  const int64_t width = d.qk_dim(), v_stride = d.kv_heads * d.v_dim;
  moejax::ForEachItem(pool, d.batch * d.kv_heads, [&](int64_t item) {
    const int64_t b = item / d.kv_heads, kv = item % d.kv_heads;
    const float* values = v.typed_data() + d.KeyRow(b, 0, kv, d.v_dim, d.kv_heads);
    std::vector<float> keys(d.seq * width), queries(kChunk * d.groups * width),
        scores(kChunk * d.groups * d.seq), outputs(kChunk * d.groups * d.v_dim);
    CopyKeys(d, k1.typed_data(), k2.typed_data(), keys.data(), b, kv, true);
    for (int64_t t0 = 0; t0 < d.seq; t0 += kChunk) {
      const int64_t t1 = std::min(d.seq, t0 + kChunk), rows = (t1 - t0) * d.groups, n = t1;
      CopyQueries(d, q1.typed_data(), q2.typed_data(), queries.data(), b, kv, t0, t1, true);
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, width, scale,
                        queries.data(), width, keys.data(), width, 0.0f, scores.data(), n);
      CausalSoftmax(scores.data(), rows, n, d.groups, t0,
                    lse_data + item * d.seq * d.groups + t0 * d.groups, nullptr);
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d.v_dim, n, 1.0f,
                        scores.data(), n, values, v_stride, 0.0f, outputs.data(), d.v_dim);
      CopyRows(d, out_data, outputs.data(), b, kv, t0, t1, d.v_dim, d.v_dim, 0, false);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q1, ffi::Buffer<ffi::F32> q2,
                    ffi::Buffer<ffi::F32> k1, ffi::Buffer<ffi::F32> k2,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out,
                    ffi::ResultBuffer<ffi::F32> d_q1, ffi::ResultBuffer<ffi::F32> d_q2,
                    ffi::ResultBuffer<ffi::F32> d_k1, ffi::ResultBuffer<ffi::F32> d_k2,
                    ffi::ResultBuffer<ffi::F32> d_v, float scale) {
  Dims d;
  if (auto error = CheckDims(q1, q2, k1, k2, v, &d); error.failure()) return error;
  const float* lse_data = lse.typed_data();
  float* d_v_data = d_v->typed_data();
  const int64_t width = d.qk_dim(), v_stride = d.kv_heads * d.v_dim;
  moejax::ForEachItem(pool, d.batch * d.kv_heads, [&](int64_t item) {
    const int64_t b = item / d.kv_heads, kv = item % d.kv_heads;
    const float* values = v.typed_data() + d.KeyRow(b, 0, kv, d.v_dim, d.kv_heads);
    float* d_values = d_v_data + d.KeyRow(b, 0, kv, d.v_dim, d.kv_heads);
    for (int64_t t = 0; t < d.seq; ++t) {
      std::memset(d_values + t * v_stride, 0, sizeof(float) * d.v_dim);
    }
    const int64_t chunk_rows = kChunk * d.groups;
    std::vector<float> keys(d.seq * width), d_keys(d.seq * width),
        queries(chunk_rows * width), d_queries(chunk_rows * width),
        outputs(chunk_rows * d.v_dim), d_outputs(chunk_rows * d.v_dim),
        probs(chunk_rows * d.seq), d_scores(chunk_rows * d.seq), row_dot(chunk_rows);
    CopyKeys(d, k1.typed_data(), k2.typed_data(), keys.data(), b, kv, true);
    for (int64_t t0 = 0; t0 < d.seq; t0 += kChunk) {
      const int64_t t1 = std::min(d.seq, t0 + kChunk), rows = (t1 - t0) * d.groups, n = t1;
      CopyQueries(d, q1.typed_data(), q2.typed_data(), queries.data(), b, kv, t0, t1, true);
      CopyRows(d, out.typed_data(), outputs.data(), b, kv, t0, t1, d.v_dim, d.v_dim, 0, true);
      CopyRows(d, d_out.typed_data(), d_outputs.data(), b, kv, t0, t1, d.v_dim, d.v_dim, 0,
               true);
      for (int64_t r = 0; r < rows; ++r) {  // D_r = dO_r . O_r, the softmax backward's row term
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < d.v_dim; ++c) {
          dot += d_outputs[r * d.v_dim + c] * outputs[r * d.v_dim + c];
        }
        row_dot[r] = dot;
      }
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, width, scale,
                        queries.data(), width, keys.data(), width, 0.0f, probs.data(), n);
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
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, width, n, scale,
                        d_scores.data(), n, keys.data(), width, 0.0f, d_queries.data(), width);
      CopyQueries(d, d_q1->typed_data(), d_q2->typed_data(), d_queries.data(), b, kv, t0, t1,
                  false);
      scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, width, rows, scale,
                        d_scores.data(), n, queries.data(), width, 1.0f, d_keys.data(),
                        width);  // d_keys starts zeroed
    }
    CopyKeys(d, d_k1->typed_data(), d_k2->typed_data(), d_keys.data(), b, kv, false);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxCausalAttention, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxCausalAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_q1
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_q2
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_k1
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_k2, per kv head
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_v
                                  .Attr<float>("scale"));
