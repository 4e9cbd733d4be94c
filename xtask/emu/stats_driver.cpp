// fp8kv `cargo xtask emulate`: runs the generated statistics kernel (KSRC, entry KNAME: the bf16
// kv_stats kernel) under emu.h on random rows and checks the four words it accumulates (each
// side's amax bits and its count of |x| > limit) against a CPU fold of the same values. Every
// cube adds its result with one atomic after a reduction through shared memory: the check
// covers the reduction, the barrier and the atomics. Prints one summary line; exits 1 on any
// mismatch.
//
// Configuration (-D): KNAME, KSRC, KVPR / VVPR (16-byte vectors per K / V row, as built),
// THREADS (per cube), PER_CUBE (vectors a cube covers). argv[1]: seed.
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

  // Accumulates onto what an earlier call left: start from a smaller amax and a count of 10.
  uint32_t stats[4];
  float start = 0.5f;
  memcpy(&stats[0], &start, 4);
  memcpy(&stats[1], &start, 4);
  stats[2] = 10;
  stats[3] = 10;
  info_st info{};
  info.scalars_float[0] = k_limit;
  info.scalars_float[1] = v_limit;
  info.scalars_uint32[0] = rows;
  info.scalars_uint32[1] = ks;
  info.scalars_uint32[2] = vs;
  const unsigned items = rows * std::max(KVPR, VVPR);
  emu_launch(EmuDim{(items + PER_CUBE - 1) / PER_CUBE, 1, 2}, EmuDim{THREADS, 1, 1},
             [&] { KNAME(AnyPtr{k.data()}, AnyPtr{v.data()}, stats, info); });

  float got_k, got_v;
  memcpy(&got_k, &stats[0], 4);
  memcpy(&got_v, &stats[1], 4);
  int bad = 0;
  auto check = [&](const char* what, double got, double want) {
    if (got != want) {
      bad++;
      printf("%s mismatch: got %.9g want %.9g\n", what, got, want);
    }
  };
  check("k amax", got_k, ka);
  check("v amax", got_v, va);
  check("k saturated", stats[2], kc + 10);
  check("v saturated", stats[3], vc + 10);
  printf("stats: k amax %.6g (%u over %.1f), v amax %.6g (%u over %.1f): %d mismatches\n", got_k, stats[2] - 10,
         k_limit, got_v, stats[3] - 10, v_limit, bad);
  return bad ? 1 : 0;
}
