// fp8kv `cargo xtask emulate`: runs one generated decode split kernel (KSRC, entry KNAME) under
// emu.h on random paged input and checks every partial state it writes (each sequence, head
// and split: output, running max, sum) against a double-precision reference computed here from
// the same cache codes and bf16 queries. Prints one summary line; exits 1 on any mismatch.
//
// Configuration (-D, all required unless a default is given): KNAME, KSRC, WIDE (1: the wide
// kernel's extra K-as-words argument), HEADS, KVH, DK, DV, PAGE (the kernel's comptime page
// size), ROWS (query rows per cube, as the kernel was built), SPLIT (tokens per split, a
// multiple of the kernel's tile), THREADS (per cube; default 128), CACHE (0 e4m3, 1 e5m2, 2
// bf16; default 0), OPTS (1: softcap, ALiBi, window on, as the kernel was built; default 0),
// FUSED (1: the kernel merges the splits itself, as built; then its output is checked too,
// against the exact merge of the reference states, and its arrival counters must end at 0).
// argv[1]: seed.
#include "emu.h"

#include <cstdio>
#include <random>

#define STR2(x) #x
#define STR(x) STR2(x)
#include KSRC

#ifndef CACHE
#define CACHE 0
#endif
#ifndef OPTS
#define OPTS 0
#endif
#ifndef THREADS
#define THREADS 128
#endif
#ifndef FUSED
#define FUSED 0
#endif

// A raw pointer that converts to any pointer-to-const parameter.
struct AnyPtr {
  const void* p;
  template <class T> operator const T*() const { return static_cast<const T*>(p); }
};
// The same for a writable parameter.
struct AnyMut {
  void* p;
  template <class T> operator T*() const { return static_cast<T*>(p); }
};

static float bf16_value(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

#if CACHE == 2
typedef uint16_t code_t;
static float decode(uint16_t c) { return bf16_value(c); }
static uint16_t random_code(std::mt19937& rng) {
  float f = std::uniform_real_distribution<float>(-2, 2)(rng);
  uint32_t u;
  memcpy(&u, &f, 4);
  return u >> 16;
}
#else
typedef uint8_t code_t;
static float decode(uint8_t c) {
  __half_raw r = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)c, CACHE == 0 ? __NV_E4M3 : __NV_E5M2);
  return float(__half(r));
}
// Any finite code (e4m3: not 0x7F / 0xFF; e5m2: exponent not all ones).
static uint8_t random_code(std::mt19937& rng) {
  for (;;) {
    uint8_t c = rng() & 0xFF;
    if (CACHE == 0 ? (c & 0x7F) != 0x7F : (c & 0x7C) != 0x7C) return c;
  }
}
#endif

int main(int argc, char** argv) {
  std::mt19937 rng(argc > 1 ? atoi(argv[1]) : 1);
  // (new tokens, cached tokens incl. the new ones): several splits, multi-token rows, a
  // sequence shorter than a block, one token, and an empty sequence.
  const std::vector<std::pair<int, int>> seqs = {{1, 333}, {2, 97}, {1, 9}, {1, 1}, {0, 0}, {3, 200}};
  const int B = seqs.size(), G = HEADS / KVH;
  int max_kv = 0, max_q = 0, ntok = 0;
  for (auto [q, k] : seqs) {
    max_kv = std::max(max_kv, k);
    max_q = std::max(max_q, q);
    ntok += q;
  }
  const int max_pages = (max_kv + PAGE - 1) / PAGE, num_pages = B * max_pages + 3;
  const int splits = (max_kv + SPLIT - 1) / SPLIT, row_blocks = (max_q * G + ROWS - 1) / ROWS;

  // bshd caches, [page][slot][kv head][dim], and bf16 queries [token][head][dim].
  std::vector<code_t> kc((size_t)num_pages * PAGE * KVH * DK), vc((size_t)num_pages * PAGE * KVH * DV);
  for (auto& c : kc) c = random_code(rng);
  for (auto& c : vc) c = random_code(rng);
  std::vector<uint16_t> q((size_t)ntok * HEADS * DK);
  std::uniform_real_distribution<float> unit(-1, 1);
  for (auto& x : q) {
    float f = unit(rng);
    uint32_t u;
    memcpy(&u, &f, 4);
    x = u >> 16;
  }
  // The DeviceBatch buffer: q_start, q_len, kv_len, kv_start (B + 1), block table (shuffled).
  std::vector<int32_t> meta(4 * B + 1 + B * max_pages, 0);
  std::vector<int> pages(num_pages);
  for (int i = 0; i < num_pages; i++) pages[i] = i;
  std::shuffle(pages.begin(), pages.end(), rng);
  for (int b = 0, qs = 0, ks = 0; b < B; b++) {
    meta[b] = qs;
    meta[B + b] = seqs[b].first;
    meta[2 * B + b] = seqs[b].second;
    meta[3 * B + b] = ks;
    qs += seqs[b].first;
    ks += seqs[b].second;
    meta[4 * B] = ks;
    for (int j = 0; j < max_pages; j++) meta[4 * B + 1 + b * max_pages + j] = pages[b * max_pages + j];
  }
  auto page_of = [&](int b, int t) { return meta[4 * B + 1 + b * max_pages + t / PAGE]; };

  // The unquantized cache ignores the scales, as the launcher does.
  const float k_scale = CACHE == 2 ? 1.0f : 0.05f, v_scale = CACHE == 2 ? 1.0f : 0.02f;
  const float sm_scale = OPTS ? 0.1f : 1.0f / sqrtf(DK), softcap = 30.0f;
  const int window = 64;
  std::vector<float> slopes(HEADS);
  for (int h = 0; h < HEADS; h++) slopes[h] = 0.01f * (h + 1);

  // Poisoned outputs: an element the kernel does not write fails the comparison.
  std::vector<float> ws_o((size_t)ntok * HEADS * splits * DV, NAN), ws_md((size_t)ntok * HEADS * splits * 2, NAN);
  info_st info{};
  info.scalars_float[0] = k_scale * sm_scale;
  info.scalars_float[1] = v_scale;
  info.scalars_float[2] = OPTS ? softcap : 1.0f;
  // SplitParams' u32 fields in declaration order.
  const unsigned params[8] = {(unsigned)B, (unsigned)max_pages, HEADS, HEADS * DK, (unsigned)row_blocks,
                              (unsigned)splits, SPLIT, OPTS ? (unsigned)window : 1u};
  memcpy(info.scalars_uint32, params, sizeof params);
  // The fused merge's arrival counters (zero, as the launcher keeps them), the sinks (a dummy:
  // off), and the bf16 output, poisoned.
  const unsigned grid_x = KVH * row_blocks;
  std::vector<uint32_t> counters((size_t)grid_x * B, 0);
  std::vector<uint16_t> out((size_t)ntok * HEADS * DV, 0x7FC0);
  // Each kernel views the caches through its own vector types: AnyPtr converts to them.
  emu_launch(EmuDim{(unsigned)(KVH * row_blocks), (unsigned)B, (unsigned)splits}, EmuDim{THREADS, 1, 1}, [&] {
    KNAME((const __nv_bfloat16*)q.data(), AnyPtr{kc.data()},
#if WIDE
          AnyPtr{kc.data()},
#endif
          AnyPtr{vc.data()}, meta.data(), slopes.data(), ws_o.data(), ws_md.data(), AnyMut{ws_o.data()},
          AnyMut{counters.data()}, slopes.data(), (__nv_bfloat16*)out.data(), info);
  });

  // The largest |output| any state can have.
  double v_max = 0;
  for (auto c : vc) v_max = std::max(v_max, (double)fabs(decode(c)) * v_scale);
  long bad = 0, checked = 0;
  // Exact merges of the reference states, per (token, head): Σ_s w_s·o_s / Σ_s w_s with
  // w_s = d_s·exp(m_s − M); filled below, compared after.
  std::vector<double> merged_num((size_t)ntok * HEADS * DV, 0.0), merged_den((size_t)ntok * HEADS, 0.0),
      merged_m((size_t)ntok * HEADS, -INFINITY), merged_bound((size_t)ntok * HEADS * DV, 0.0);
  double worst = 0;
  auto fail = [&](const char* what, int tok, int h, int sp, double got, double want) {
    if (bad++ < 8) printf("%s mismatch: token %d head %d split %d: got %.6g want %.6g\n", what, tok, h, sp, got, want);
  };
  for (int b = 0; b < B; b++) {
    const int ql = seqs[b].first, kl = seqs[b].second;
    for (int i = 0; i < ql; i++)
      for (int h = 0; h < HEADS; h++)
        for (int sp = 0; sp < splits; sp++) {
          const int tok = meta[b] + i, g = h / G, pos = kl - ql + i;
          int lo = sp * SPLIT;
          const int hi = std::min(std::min(kl, lo + SPLIT), pos + 1);
          if (OPTS) lo = std::max(lo, pos + 1 - window);
          // Scores, and a bound on each one's f32 error: the dot product's (DK terms, 2^-23 each
          // of Σ|q·k|, twice the classic γ_n) plus the scale's rounding.
          std::vector<double> s, s_err;
          for (int t = lo; t < hi; t++) {
            const code_t* k = &kc[(((size_t)page_of(b, t) * PAGE + t % PAGE) * KVH + g) * DK];
            double dot = 0, mag = 0;
            for (int d = 0; d < DK; d++) {
              double p = (double)bf16_value(q[((size_t)tok * HEADS + h) * DK + d]) * decode(k[d]);
              dot += p;
              mag += fabs(p);
            }
            double x = dot * k_scale * sm_scale;
            if (OPTS) x = softcap * tanh(x / softcap) + slopes[h] * (t - pos);
            s.push_back(x);
            s_err.push_back((DK * ldexp(1.0, -23) * mag + ldexp(1.0, -22) * fabs(dot)) * k_scale * sm_scale);
          }
          const size_t state = ((size_t)tok * HEADS + h) * splits + sp;
          double m = -INFINITY, den = 0;
          for (double x : s) m = std::max(m, x);
          for (double x : s) den += exp(x - m);
          // This split joins the running merge of (tok, h): old terms scale by a, its by c.
          const size_t th = (size_t)tok * HEADS + h;
          double a = 1, c = 0;
          if (!s.empty()) {
            const double mm = std::max(merged_m[th], m);
            a = exp(merged_m[th] - mm);
            c = exp(m - mm);
            merged_m[th] = mm;
            merged_den[th] = merged_den[th] * a + den * c;
          }
          for (int d = 0; d < DV; d++) {
            auto v_at = [&](int t) {
              return (double)decode(vc[(((size_t)page_of(b, t) * PAGE + t % PAGE) * KVH + g) * DV + d]) * v_scale;
            };
            double o = 0;
            for (int t = lo; t < hi; t++) o += exp(s[t - lo] - m) * v_at(t);
            const double want = s.empty() ? 0.0 : o / den, got = ws_o[state * DV + d];
            // A score error e_j moves the output by about w_j·e_j·|v_j − o| (w_j its weight);
            // the probabilities' two f16 parts and the f32 sums add a relative 1e-5, and
            // 1e-6 of the largest |v| covers outputs near zero.
            double bound = 1e-6 * v_max + 1e-5 * fabs(want);
            for (int t = lo; t < hi; t++)
              bound += exp(s[t - lo] - m) / den * s_err[t - lo] * fabs(v_at(t) - want);
            if (!s.empty()) {
              merged_num[th * DV + d] = merged_num[th * DV + d] * a + o * c;
              merged_bound[th * DV + d] = merged_bound[th * DV + d] * a + bound * den * c;
            }
            const double err = fabs(got - want) / bound;
            checked++;
            if (!(err <= 1.0)) fail("output", tok, h, sp, got, want);
            worst = std::max(worst, std::isnan(err) ? INFINITY : err);
          }
          const double got_d = ws_md[state * 2 + 1], got_m = ws_md[state * 2];
          if (s.empty() ? got_d != 0 : !(fabs(got_d - den) <= 1e-3 * den)) fail("sum", tok, h, sp, got_d, den);
          if (!s.empty() && !(fabs(got_m - m) <= 1e-4 * (1 + fabs(m)))) fail("max", tok, h, sp, got_m, m);
        }
  }
#if FUSED
  // The merged output (bf16: half an ulp more), and the counters back at zero.
  double worst_out = 0;
  for (size_t th = 0; th < (size_t)ntok * HEADS; th++)
    for (int d = 0; d < DV; d++) {
      const double den = merged_den[th];
      const double want = den > 0 ? merged_num[th * DV + d] / den : 0.0;
      const double bound = (den > 0 ? merged_bound[th * DV + d] / den : 0.0) + ldexp(1.0, -8) * fabs(want) + 1e-6 * v_max;
      const double got = bf16_value(out[th * DV + d]), err = fabs(got - want) / bound;
      checked++;
      if (!(err <= 1.0)) fail("merged output", (int)(th / HEADS), (int)(th % HEADS), -1, got, want);
      worst_out = std::max(worst_out, std::isnan(err) ? INFINITY : err);
    }
  for (auto c : counters)
    if (c != 0) fail("arrival counter", -1, -1, -1, c, 0);
  printf("merged output: worst error %.3g of the bound\n", worst_out);
#endif
  printf("%s: %ld outputs checked, %ld mismatches, worst error %.3g of the bound\n", STR(KNAME), checked, bad, worst);
  return bad ? 1 : 0;
}
