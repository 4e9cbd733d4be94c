// fp8kv `cargo xtask emulate`: runs the generated statistics kernel (KSRC, entry KNAME: the bf16
// kv_stats kernel) under emu.h on random rows and checks the four words it accumulates (each
// side's amax bits and its count of |x| > limit) against a CPU fold of the same values. Every
// warp adds its result with atomics to one of STATS_COPIES copies of the four words after a
// warp reduction; the driver folds the copies as DeviceKvStats::read does: the check covers the
// reduction, the spread and the atomics, and that nothing lands between the copies. Prints one
// summary line; exits 1 on any mismatch.
//
// Configuration (-D): KNAME, KSRC, KVPR / VVPR (16-byte vectors per K / V row, as built),
// THREADS (per cube), PER_CUBE (vectors a cube covers), STATS_COPIES / STATS_STRIDE (the
// buffer's copies and the words between two). argv[1]: seed.
#include "emu.h"

#include <cstdio>
#include <random>

inline uint32_t atomicMax(uint32_t* p, uint32_t v) {
  std::atomic_ref<uint32_t> r(*p);
  uint32_t old = r.load();
  while (old < v && !r.compare_exchange_weak(old, v)) {
  }
  return old;
}

#define STR2(x) #x
#define STR(x) STR2(x)
#include KSRC

struct AnyPtr {
  const void* p;
  template <class T> operator const T*() const { return static_cast<const T*>(p); }
};

static float bf16_value(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

int main(int argc, char** argv) {
  std::mt19937 rng(argc > 1 ? atoi(argv[1]) : 1);
  // Rows that end inside a cube's last chunk; row strides with a gap (pitched rows).
  const int rows = 333, ks = KVPR + 3, vs = VVPR + 5;
  const float k_limit = 3.0f, v_limit = 5.0f;
  std::vector<uint16_t> k((size_t)rows * ks * 8), v((size_t)rows * vs * 8);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  auto fill = [&](std::vector<uint16_t>& x) {
    for (auto& b : x) {
      float f = normal(rng);
      uint32_t u;
      memcpy(&u, &f, 4);
      b = uint16_t(u >> 16);
    }
  };
  fill(k);
  fill(v);
  // A NaN (never the amax, never counted) in each side, in a row the kernel reads.
  k[8 * (ks * 7 + 1) + 3] = 0x7FC0;
  v[8 * (vs * 100) + 5] = 0xFFC0;
  // CPU fold over the rows' own vectors (the gap is never read).
  auto fold = [&](const std::vector<uint16_t>& x, int stride, int vpr, float limit, float& amax, uint32_t& count) {
    amax = 0.0f;
    count = 0;
    for (int r = 0; r < rows; r++)
      for (int i = 0; i < vpr * 8; i++) {
        float a = fabsf(bf16_value(x[(size_t)r * stride * 8 + i]));
        if (a > amax) amax = a;
        if (a > limit) count++;
      }
  };
  float ka, va;
  uint32_t kc, vc;
  fold(k, ks, KVPR, k_limit, ka, kc);
  fold(v, vs, VVPR, v_limit, va, vc);

  // Accumulates onto what an earlier call left: copy 0 holds a smaller amax and a count of 10,
  // the last copy a count of 5.
  std::vector<uint32_t> stats((size_t)STATS_COPIES * STATS_STRIDE, 0);
  float start = 0.5f;
  memcpy(&stats[0], &start, 4);
  memcpy(&stats[1], &start, 4);
  stats[2] = 10;
  stats[3] = 10;
  const size_t last = (size_t)(STATS_COPIES - 1) * STATS_STRIDE;
  stats[last + 2] = 5;
  stats[last + 3] = 5;
  info_st info{};
  info.scalars_float[0] = k_limit;
  info.scalars_float[1] = v_limit;
  info.scalars_uint32[0] = rows;
  info.scalars_uint32[1] = ks;
  info.scalars_uint32[2] = vs;
  const unsigned items = rows * std::max(KVPR, VVPR);
  emu_launch(EmuDim{(items + PER_CUBE - 1) / PER_CUBE, 1, 2}, EmuDim{THREADS, 1, 1},
             [&] { KNAME(AnyPtr{k.data()}, AnyPtr{v.data()}, stats.data(), info); });

  // Fold the copies: the largest amax bits (non-negative floats order as their bits), the
  // sum of the counts; every other word must still be 0.
  uint32_t amax_bits[2] = {0, 0}, sat[2] = {0, 0}, stray = 0;
  for (size_t c = 0; c < (size_t)STATS_COPIES; c++)
    for (size_t w = 0; w < (size_t)STATS_STRIDE; w++) {
      uint32_t x = stats[c * STATS_STRIDE + w];
      if (w < 2) amax_bits[w] = std::max(amax_bits[w], x);
      else if (w < 4) sat[w - 2] += x;
      else if (x != 0) stray++;
    }
  float got_k, got_v;
  memcpy(&got_k, &amax_bits[0], 4);
  memcpy(&got_v, &amax_bits[1], 4);
  int bad = 0;
  auto check = [&](const char* what, double got, double want) {
    if (got != want) {
      bad++;
      printf("%s mismatch: got %.9g want %.9g\n", what, got, want);
    }
  };
  check("k amax", got_k, ka);
  check("v amax", got_v, va);
  check("k saturated", sat[0], kc + 15);
  check("v saturated", sat[1], vc + 15);
  check("words between the copies", stray, 0);
  unsigned used = 0;
  for (size_t c = 0; c < (size_t)STATS_COPIES; c++) used += stats[c * STATS_STRIDE] != 0;
  printf("stats: k amax %.6g (%u over %.1f), v amax %.6g (%u over %.1f), %u of %d copies hit: %d mismatches\n",
         got_k, sat[0] - 15, k_limit, got_v, sat[1] - 15, v_limit, used, STATS_COPIES, bad);
  return bad ? 1 : 0;
}
