// Shared by moejax's XLA:CPU kernels (grouped_swiglu.cc, causal_attention.cc), which are compiled
// into one library by moejax/model/cpu_kernels.py.
//
// Threads: OpenBLAS runs single-threaded; a kernel's independent pieces of work (expert
// groups, attention heads) are shared out over XLA's own intra-op thread pool (the caller works
// too), so a custom call adds no threads of its own to those XLA already runs (8 fake devices
// on 2 cores would otherwise each start OpenBLAS's).
#ifndef MOEJAX_CPU_KERNELS_H_
#define MOEJAX_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace moejax {

inline const bool kSingleThreadedBlas = [] {
  scipy_openblas_set_num_threads(1);
  return true;
}();

// exp(x), written so that the compiler vectorizes the loops calling it (libm's expf is a call
// per element): 2^n e^r with n = round(x / ln 2) and a degree-6 polynomial for e^r on
// |r| <= ln(2) / 2, about 2 float32 ulps. x is clamped to [-87, 88] (e^88 ~ 1.7e38 is still
// finite; e^-87 ~ 2e-38); the clamp vectorizes under -fno-trapping-math (cpu_kernels.py's flags).
inline float VectorExp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to int
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return p * scale;
}

// Runs work(i) for i in [0, count) on the caller and on the pool's other threads. A helper
// claims items one at a time; one that starts after every item is claimed returns at once,
// so the caller waits only for items in progress (never for a helper still queued: no
// deadlock when every pool thread is busy).
inline void ForEachItem(ffi::ThreadPool& pool, int64_t count,
                        std::function<void(int64_t)> work) {
  struct Shared {
    std::function<void(int64_t)> work;
    int64_t count;
    std::atomic<int64_t> next{0}, finished{0};
  };
  auto shared = std::make_shared<Shared>();
  shared->work = std::move(work);
  shared->count = count;
  auto drain = [](Shared& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.count;) {
      s.work(i);
      s.finished.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, count - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([shared, drain] { drain(*shared); });
  }
  drain(*shared);
  while (shared->finished.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace moejax

#endif  // MOEJAX_CPU_KERNELS_H_
