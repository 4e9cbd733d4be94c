//! The CUDA-core routine: `cuda_cores_kernel::decode_split_kernel` on the f32 units, for
//! every head dim, query dtype and option (the fallback where no tensor-core routine applies).
//! Its comptime configuration ([`config`]) sizes vector loads, lanes per K row, threads and
//! prefetch to a register budget.

use cubecl::prelude::*;

use super::cuda_cores_kernel::decode_split_kernel;
use super::{SplitArgs, SplitRoutine};
use crate::contract::AttentionOptions;
use crate::kernels::decode::definition::split::TILE_TOKENS;
use crate::kernels::decode::definition::{DecodeProblem, DecodeStrategy};
use crate::kernels::{handle_vec_len, CacheGeometry};
use crate::policy::Dtype;

/// Query rows (new tokens × heads of one KV group) one cube serves from each K/V load. Larger
/// groups (or several new tokens) use several row blocks, which re-read the cache through L2.
pub const MAX_ROWS_PER_CUBE: usize = 8;

/// Comptime configuration of [`super::cuda_cores_kernel::decode_split_kernel()`] (the JIT key besides the
/// dtypes). Runtime: batch, lengths, block table, scales, softcap value, window size, split
/// length and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct DecodeConfig {
    /// K cache geometry (page size, KV heads, head dim, Bshd/Bhsd).
    pub k: CacheGeometry,
    /// V cache geometry.
    pub v: CacheGeometry,
    /// Query heads per KV head.
    pub group: u32,
    /// Query rows per cube (≤ [`MAX_ROWS_PER_CUBE`]).
    pub rows: u32,
    /// Cache tokens per tile ([`TILE_TOKENS`]).
    pub tile_tokens: u32,
    /// Threads per cube.
    pub threads: u32,
    /// Lanes sharing one token's K row (a power of two ≤ 8).
    pub k_lanes: u32,
    /// Elements per K vector load (16 bytes).
    pub k_vec: u32,
    /// Elements per V vector load (16 bytes, narrower when the rows' accumulators would need
    /// more than 32 registers).
    pub v_vec: u32,
    /// FP8 caches: the bit position of the code's exponent in the decoded f32 (20 for E4M3, 21
    /// for E5M2), see `common::decode_vector`; `None` for the f16/bf16 cache (plain cast).
    pub fp8_shift: Option<u32>,
    /// Keep this lane's query values in registers (otherwise read from shared memory).
    pub q_in_regs: bool,
    /// Issue all of a tile's K loads before the first score (off when that needs too many
    /// registers: then each pass loads its own).
    pub k_prefetch: bool,
    /// Issue a tile's V loads before its K phase (off when that needs too many registers).
    pub v_prefetch: bool,
    /// Logit softcap on.
    pub softcap: bool,
    /// ALiBi on.
    pub alibi: bool,
    /// Sliding window on.
    pub window: bool,
}

/// The CUDA-core split routine.
pub(crate) struct CudaCores;

impl SplitRoutine for CudaCores {
    type Config = DecodeConfig;
    const STRATEGY: DecodeStrategy = DecodeStrategy::CudaCores;

    fn config(p: &DecodeProblem, opts: &AttentionOptions) -> Option<DecodeConfig> {
        let (rows, _) = row_blocking(p.max_rows());
        Some(config(
            p.cache,
            p.k,
            p.v,
            p.group() as u32,
            rows as u32,
            opts,
        ))
    }

    fn rows_per_cube(cfg: &DecodeConfig) -> usize {
        cfg.rows as usize
    }

    fn resident_cubes(_: &DecodeConfig) -> usize {
        TARGET_CUBES_PER_SM
    }

    unsafe fn launch<R: Runtime>(cfg: DecodeConfig, a: SplitArgs<'_, R>) {
        let es = a.cache.dtype().size_bytes();
        let (k, v) = (a.cache.k_handle(), a.cache.v_handle());
        // SAFETY: as `SplitRoutine::launch` requires; the caches as vectors of `k_vec` /
        // `v_vec` elements, whole vectors of their buffers.
        unsafe {
            decode_split_kernel::launch_unchecked::<R>(
                a.client,
                a.grid,
                CubeDim::new_1d(cfg.threads),
                cfg.k_vec as usize,
                cfg.v_vec as usize,
                ArrayArg::from_raw_parts(a.q.handle().clone(), a.q.len_elems()),
                ArrayArg::from_raw_parts(k.clone(), handle_vec_len(k, es * cfg.k_vec as usize)),
                ArrayArg::from_raw_parts(v.clone(), handle_vec_len(v, es * cfg.v_vec as usize)),
                ArrayArg::from_raw_parts(a.meta.0, a.meta.1),
                ArrayArg::from_raw_parts(a.alibi.0, a.alibi.1),
                ArrayArg::from_raw_parts(a.ws_o.0, a.ws_o.1),
                ArrayArg::from_raw_parts(a.ws_md.0, a.ws_md.1),
                ArrayArg::from_raw_parts(a.ws_o4.0, a.ws_o4.1),
                ArrayArg::from_raw_parts(a.counters.0, a.counters.1),
                ArrayArg::from_raw_parts(a.sinks.0, a.sinks.1),
                ArrayArg::from_raw_parts(a.out.0, a.out.1),
                a.params,
                cfg,
                a.merge,
                [a.act, crate::device::storage_type(a.cache.dtype())],
            );
        }
    }
}

/// Cubes per SM the planner counts on for the CUDA-core split kernel: enough loads in flight
/// to saturate HBM (about 16 KiB per SM, each cube keeping about 8 KiB in flight).
pub(crate) const TARGET_CUBES_PER_SM: usize = 4;

/// Threads per split cube in general: 4 warps, 16 tokens' K rows per pass.
pub(crate) const SPLIT_THREADS: u32 = 128;

/// Threads per split cube for head dims ≤ 128 with 8 lanes per K row: CubeCL emits
/// `__launch_bounds__(threads)` only, so 512 threads is how the kernel gets ptxas to fit 128
/// registers (16 resident warps per SM instead of 8 at ~250 registers), which the
/// latency-bound tile loop needs more than per-thread loads in flight.
pub(crate) const SPLIT_THREADS_SMALL_HEADS: u32 = 512;

/// Most f32 output accumulators per thread.
pub(crate) const MAX_ACCUMULATORS: u32 = 32;

/// Most f32 query values per thread kept in registers.
pub(crate) const MAX_QUERY_REGS: u32 = 64;

/// Most bytes of K (and, separately, of V) one thread holds in registers per tile (32 registers).
pub(crate) const MAX_PREFETCH_BYTES: usize = 128;

/// Rows per cube and row blocks per (sequence, KV head) for `max_rows` query rows.
pub(crate) fn row_blocking(max_rows: usize) -> (usize, usize) {
    let rows = max_rows.clamp(1, MAX_ROWS_PER_CUBE);
    (rows, max_rows.max(1).div_ceil(rows))
}

/// The comptime configuration for a cache and a row count.
pub(crate) fn config(
    cache: Dtype,
    k: CacheGeometry,
    v: CacheGeometry,
    group: u32,
    rows: u32,
    opts: &AttentionOptions,
) -> DecodeConfig {
    let cache_elem_bytes = cache.size_bytes();
    let k_vec = (16 / cache_elem_bytes) as u32;
    // At most 32 output accumulators per thread (registers decide occupancy): more rows take
    // narrower V vectors (still coalesced: neighbouring lanes read neighbouring vectors).
    let mut v_vec = k_vec;
    while rows * v_vec > MAX_ACCUMULATORS && v_vec > 2 {
        v_vec /= 2;
    }
    let k_vecs = k.head_dim / k_vec;
    let k_lanes = 1u32 << k_vecs.min(8).ilog2();
    let threads = if k_lanes == 8 && k.head_dim <= 128 && v.head_dim <= 128 {
        SPLIT_THREADS_SMALL_HEADS
    } else {
        SPLIT_THREADS
    };
    let v_groups = threads / (v.head_dim / v_vec);
    let v_passes = (TILE_TOKENS as u32).div_ceil(v_groups) as usize;
    let q_regs = rows * k_vecs.div_ceil(k_lanes) * k_vec;
    let k_loads = (TILE_TOKENS as u32 / (threads / k_lanes)) * k_vecs.div_ceil(k_lanes);
    DecodeConfig {
        k,
        v,
        group,
        rows,
        tile_tokens: TILE_TOKENS as u32,
        threads,
        k_lanes,
        k_vec,
        v_vec,
        fp8_shift: match cache {
            Dtype::E4m3 => Some(20),
            Dtype::E5m2 => Some(21),
            _ => None,
        },
        q_in_regs: q_regs <= MAX_QUERY_REGS,
        k_prefetch: k_loads as usize * 16 <= MAX_PREFETCH_BYTES,
        v_prefetch: v_passes * v_vec as usize * cache_elem_bytes <= MAX_PREFETCH_BYTES,
        softcap: opts.softcap.is_some(),
        alibi: opts.alibi_slopes.is_some(),
        window: opts.window.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::decode::common::PLANE_LANES;

    #[test]
    fn configs_fit_the_thread_mapping() {
        for &(dk, dv) in crate::layout::SUPPORTED_HEAD_DIMS.iter() {
            for dtype in [Dtype::E4m3, Dtype::E5m2, Dtype::Bf16, Dtype::F16] {
                for rows in 1..=MAX_ROWS_PER_CUBE as u32 {
                    let geom = |d: usize| CacheGeometry {
                        page_size: 16,
                        num_kv_heads: 2,
                        head_dim: d as u32,
                        bhsd: false,
                    };
                    let c = config(
                        dtype,
                        geom(dk),
                        geom(dv),
                        4,
                        rows,
                        &AttentionOptions::default(),
                    );
                    // K: whole passes of tokens per tile, lanes a power of two within a warp.
                    assert!(c.k_lanes.is_power_of_two() && c.k_lanes <= 8);
                    assert_eq!(c.tile_tokens % (c.threads / c.k_lanes), 0);
                    assert_eq!(dk as u32 % c.k_vec, 0);
                    // V: at least one token group, vectors tile the row.
                    assert_eq!(dv as u32 % c.v_vec, 0);
                    assert!(c.threads / (dv as u32 / c.v_vec) >= 1);
                    assert_eq!(c.tile_tokens % PLANE_LANES, 0);
                }
            }
        }
    }
}
