// fp8kv `cargo xtask emulate`: a CPU stand-in for the CUDA features the generated decode split
// kernels use, so that their exact CUDA C++ (as CubeCL emits it) runs without a GPU. One
// std::thread per CUDA thread of a block; barriers for __syncthreads and for the warp
// collectives (shuffles, votes, and mma.sync m16n8k16 with the PTX ISA fragment layouts, f32
// accumulation). The CUDA half/bf16/FP8 headers supply the types and conversions (their host
// code paths). Build with -DEMU_BREAK to transpose the B fragment's element pairs: the self-check
// that the comparison fails on a wrong layout.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>

#define __global__
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
#define __shared__

struct EmuDim { unsigned x = 1, y = 1, z = 1; };
inline thread_local EmuDim threadIdx, blockIdx;
inline EmuDim blockDim, gridDim;
static const int warpSize = 32;

alignas(16) inline unsigned char dynamic_shared_mem[1 << 17];

struct EmuWarp {
  std::barrier<> bar{32};
  uint64_t slot[32];
  uint32_t a[32][4], b[32][2];
  float c[32][4];
};
struct EmuBlock {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<EmuWarp>> warps;
};
inline EmuBlock* emu_block = nullptr;
inline EmuWarp& emu_warp() { return *emu_block->warps[threadIdx.x / 32]; }
inline unsigned emu_lane() { return threadIdx.x % 32; }

inline void __syncthreads() { emu_block->bar->arrive_and_wait(); }
// Blocks run one after another here, so a fence orders nothing more than program order does;
// the atomics still go through std::atomic_ref (several threads of a block may use them).
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline uint32_t atomicAdd(uint32_t* p, uint32_t v) { return std::atomic_ref<uint32_t>(*p).fetch_add(v); }
inline uint32_t atomicExch(uint32_t* p, uint32_t v) { return std::atomic_ref<uint32_t>(*p).exchange(v); }

template <class T> inline T emu_shfl(T v, unsigned src) {
  static_assert(sizeof(T) <= 8);
  auto& w = emu_warp();
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  w.slot[emu_lane()] = raw;
  w.bar.arrive_and_wait();
  uint64_t got = w.slot[src % 32];
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}
template <class T> inline T __shfl_sync(int, T v, unsigned src) { return emu_shfl(v, src); }
template <class T> inline T __shfl_xor_sync(int, T v, unsigned m) { return emu_shfl(v, emu_lane() ^ m); }
inline bool __any_sync(int, bool p) {
  auto& w = emu_warp();
  w.slot[emu_lane()] = p;
  w.bar.arrive_and_wait();
  bool any = false;
  for (int i = 0; i < 32; i++) any = any || w.slot[i];
  w.bar.arrive_and_wait();
  return any;
}

template <class H> inline float emu_half(uint32_t w, int hi) {
  uint16_t bits = hi ? (w >> 16) : (w & 0xFFFF);
  H h;
  std::memcpy(&h, &bits, 2);
  return float(h);
}
// D = A·B + C for m16n8k16 (A row-major 16x16, B col 16x8), fragments per PTX ISA.
template <class H>
inline void emu_mma(uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1,
                    float c0, float c1, float c2, float c3, float& d0, float& d1, float& d2, float& d3) {
  auto& w = emu_warp();
  unsigned l = emu_lane();
  w.a[l][0] = a0; w.a[l][1] = a1; w.a[l][2] = a2; w.a[l][3] = a3;
  w.b[l][0] = b0; w.b[l][1] = b1;
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; lane++) {
    int gq = lane / 4, tq = lane % 4;
    for (int r = 0; r < 4; r++)
      for (int e = 0; e < 2; e++)
        A[gq + 8 * (r % 2)][2 * tq + e + 8 * (r / 2)] = emu_half<H>(w.a[lane][r], e);
    for (int r = 0; r < 2; r++)
      for (int e = 0; e < 2; e++) {
#ifdef EMU_BREAK
        B[2 * tq + (1 - e) + 8 * r][gq] = emu_half<H>(w.b[lane][r], e);
#else
        B[2 * tq + e + 8 * r][gq] = emu_half<H>(w.b[lane][r], e);
#endif
      }
  }
  w.bar.arrive_and_wait();
  int gq = l / 4, tq = l % 4;
  float cin[4] = {c0, c1, c2, c3}, out[4];
  for (int r = 0; r < 2; r++)
    for (int e = 0; e < 2; e++) {
      int m = gq + 8 * r, n = 2 * tq + e;
      float acc = cin[2 * r + e];
      for (int k = 0; k < 16; k++) acc += A[m][k] * B[k][n];
      out[2 * r + e] = acc;
    }
  d0 = out[0]; d1 = out[1]; d2 = out[2]; d3 = out[3];
}

inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(int a, unsigned b) { return (unsigned)a < b ? (unsigned)a : b; }
inline float abs(float a) { return fabsf(a); }
inline float exp(float a) { return expf(a); }
inline float tanh(float a) { return tanhf(a); }

// Runs `body` (one kernel call) for every block of the grid, one thread per CUDA thread. The
// threads are made once and walk the blocks in order together, meeting at a barrier between
// blocks, so a block's shared memory and warp state are free when the next one starts.
inline void emu_launch(EmuDim grid, EmuDim block, const std::function<void()>& body) {
  gridDim = grid;
  blockDim = block;
  unsigned n = block.x * block.y * block.z;
  EmuBlock b;
  b.bar = std::make_unique<std::barrier<>>(n);
  for (unsigned w = 0; w < (n + 31) / 32; w++) b.warps.push_back(std::make_unique<EmuWarp>());
  emu_block = &b;
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < n; t++)
    ts.emplace_back([&, t] {
      threadIdx = EmuDim{t, 0, 0};
      for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
          for (unsigned x = 0; x < grid.x; x++) {
            blockIdx = EmuDim{x, y, z};
            body();
            b.bar->arrive_and_wait();
          }
    });
  for (auto& t : ts) t.join();
}
