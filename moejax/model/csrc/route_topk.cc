// The router's expert choice for XLA:CPU through the XLA FFI: per token, the k best experts by
// score, optionally among the best groups of experts only (DeepSeek-V3's group-limited
// routing). Called by moejax/model/cpu_route.py; its docstring says why.
//
// The choice is the one XLA:CPU's top_k makes, exactly: scores compared in the total order of
// their bits (-NaN < -inf < ... < -0 < +0 < ... < inf < NaN), ties to the lower index, the
// chosen ones best first. With groups: a group's score is the sum of its two best scores, the
// `topk_groups` best groups are kept, and every expert outside them counts as -inf.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>

#include "cpu_kernels.h"

namespace {

constexpr int64_t kRowChunk = 256;  // tokens per piece of work

// A float's place in the total order, as XLA:CPU's top_k computes it.
inline int32_t OrderKey(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return static_cast<int32_t>(bits) < 0
             ? static_cast<int32_t>(static_cast<uint32_t>(std::numeric_limits<int32_t>::max()) -
                                    bits)
             : static_cast<int32_t>(bits);
}

// The `k` best of keys[0, n) (best first, ties to the lower index) into best[0, k); `k` <= n.
// Insertion into a sorted list that grows to k: a later index never displaces an equal key.
// `best_keys` [k] is scratch.
void BestIndices(const int32_t* keys, int64_t n, int64_t k, int32_t* best, int32_t* best_keys) {
  int64_t size = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (size == k && keys[i] <= best_keys[k - 1]) continue;
    int64_t at = size < k ? size++ : k - 1;
    while (at > 0 && keys[i] > best_keys[at - 1]) {
      best_keys[at] = best_keys[at - 1];
      best[at] = best[at - 1];
      --at;
    }
    best_keys[at] = keys[i];
    best[at] = static_cast<int32_t>(i);
  }
}

// Scratch of one piece of work, allocated once for all its tokens.
struct Scratch {
  explicit Scratch(int64_t experts, int64_t groups)
      : keys(new int32_t[experts]),
        best_keys(new int32_t[experts]),
        group_keys(new int32_t[groups]),
        kept(new int32_t[groups]) {}
  std::unique_ptr<int32_t[]> keys, best_keys;  // [E] each
  std::unique_ptr<int32_t[]> group_keys, kept;  // [G] each
};

// One token's choice: scores [E] -> ids [k].
void ChooseExperts(const float* scores, int64_t experts, int64_t k, int64_t groups,
                   int64_t topk_groups, Scratch& scratch, int32_t* ids) {
  int32_t *keys = scratch.keys.get(), *best_keys = scratch.best_keys.get();
  const int64_t group_size = experts / groups;
  if (groups > 1) {
    int32_t pair[2];
    for (int64_t g = 0; g < groups; ++g) {
      const float* group_scores = scores + g * group_size;
      for (int64_t e = 0; e < group_size; ++e) keys[e] = OrderKey(group_scores[e]);
      BestIndices(keys, group_size, 2, pair, best_keys);
      scratch.group_keys[g] = OrderKey(0.0f + group_scores[pair[0]] + group_scores[pair[1]]);
    }
    int32_t* kept = scratch.kept.get();
    BestIndices(scratch.group_keys.get(), groups, topk_groups, kept, best_keys);
    const int32_t minus_inf = OrderKey(-std::numeric_limits<float>::infinity());
    for (int64_t e = 0; e < experts; ++e) keys[e] = minus_inf;
    for (int64_t i = 0; i < topk_groups; ++i) {
      const int64_t first = kept[i] * group_size;
      for (int64_t e = first; e < first + group_size; ++e) keys[e] = OrderKey(scores[e]);
    }
  } else {
    for (int64_t e = 0; e < experts; ++e) keys[e] = OrderKey(scores[e]);
  }
  BestIndices(keys, experts, k, ids, best_keys);
}

// scores [..., E] -> ids [..., k] int32.
ffi::Error RouteTopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores,
                     ffi::ResultBuffer<ffi::S32> ids, int64_t k, int64_t groups,
                     int64_t topk_groups) {
  const auto dims = scores.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("route_topk: scores must be [..., E]");
  const int64_t experts = dims[dims.size() - 1];
  if (k < 1 || k > experts || groups < 1 || experts % groups != 0 ||
      (groups > 1 && (topk_groups < 1 || topk_groups > groups || experts / groups < 2))) {
    return ffi::Error::InvalidArgument(
        "route_topk: need 1 <= k <= E, E a multiple of groups (groups of 2 experts or more), "
        "1 <= topk_groups <= groups");
  }
  int64_t tokens = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) tokens *= dims[i];
  const float* score_data = scores.typed_data();
  int32_t* id_data = ids->typed_data();
  moejax::ForEachItem(pool, (tokens + kRowChunk - 1) / kRowChunk, [&](int64_t chunk) {
    Scratch scratch(experts, groups);
    const int64_t last = std::min(tokens, (chunk + 1) * kRowChunk);
    for (int64_t t = chunk * kRowChunk; t < last; ++t) {
      ChooseExperts(score_data + t * experts, experts, k, groups, topk_groups, scratch,
                    id_data + t * k);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxRouteTopK, RouteTopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("topk_groups"));
