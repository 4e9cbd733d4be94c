//! Which split kernel a decode launch takes, and its comptime configuration: where the
//! tensor-core kernels apply (`mma_config`, `wide_config`), what Auto picks per shape class
//! (`auto_config`, the one table of measured winners) and the CUDA-core kernel's
//! configuration (`config`). `launch.rs` plans and launches with these.

use cubecl::prelude::*;

use super::fragments::{wide_dims, CacheBits, MmaConfig, MMA_TILE_ROWS};
use super::plan::TILE_TOKENS;
use super::{AttentionOptions, DecodeConfig, MAX_ROWS_PER_CUBE};
use crate::device::storage_type;
use crate::kernels::CacheGeometry;
use crate::policy::Dtype;

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

/// Rows per cube and row blocks of the chosen split kernel.
pub(crate) fn row_blocking_for(mma: Option<&MmaConfig>, max_rows: usize) -> (usize, usize) {
    match mma {
        Some(m) => {
            let rows = (MMA_TILE_ROWS * m.row_tiles) as usize;
            (rows, max_rows.max(1).div_ceil(rows))
        }
        None => row_blocking(max_rows),
    }
}

/// The tensor-core configuration where that kernel applies, `None` where it does not: K and V
/// head dims equal and 64 or 128 with any cache dtype, any query dtype, any group (blocks of 8
/// rows where every sequence has at most `max_rows` = group × q_len ≤ 8, else of 16), every
/// option; and head dim 256 with an FP8 cache, a one-part query (bf16 or f16) and one row tile
/// (`max_rows` ≤ 8): its 16 output tiles, 16 query k-steps and 64-byte K / 32-byte V pieces
/// per lane take 255 registers there (ptxas: 20 bytes of spills), so a second row tile, a
/// second query part or 16-bit cache elements would spill far more (those keep the CUDA-core
/// kernel).
pub(crate) fn mma_config(
    cache: Dtype,
    act: Dtype,
    k: CacheGeometry,
    v: CacheGeometry,
    group: u32,
    max_rows: usize,
    opts: &AttentionOptions,
) -> Option<MmaConfig> {
    if k.head_dim != v.head_dim || !matches!(k.head_dim, 64 | 128 | 256) {
        return None;
    }
    let (bits, mma_bf16) = mma_operands(cache)?;
    // Query parts: one where the query dtype converts exactly (f16 → f16, bf16 → bf16, bf16 →
    // f16 once its row is scaled by a power of two into f16's range, see `q_scaled`), else
    // enough parts for 22+ bits (f32: 2 f16 / 3 bf16 of 11 / 8 bits; f16 → bf16: 2).
    // Probabilities are f32: 2 f16 parts (22 bits) or 3 bf16 (24).
    let q_parts = match (act, mma_bf16) {
        (Dtype::F32, false) => 2,
        (Dtype::F32, true) => 3,
        (Dtype::F16, true) => 2,
        _ => 1,
    };
    let piece_bytes = v.head_dim / 8 * bits.elem_bytes();
    let row_tiles = if max_rows <= MMA_TILE_ROWS as usize {
        1
    } else {
        2
    };
    if k.head_dim == 256 && (bits == CacheBits::Half || q_parts != 1 || row_tiles != 1) {
        return None;
    }
    Some(MmaConfig {
        k,
        v,
        group,
        bits,
        v_words: if piece_bytes >= 16 { 4 } else { 2 },
        row_tiles,
        q_parts,
        p_parts: if mma_bf16 { 3 } else { 2 },
        // bf16 and f32 queries reach beyond f16's range (±65504, normal from 2^-14): each row
        // is scaled by a power of two that puts its largest element at 2^14..2^15, so only
        // elements below 2^-28 of the row's largest lose bits (an absolute error ≤ 2^-39 of
        // it, far inside the score bound). bf16 MMAs need no scale.
        q_scaled: !mma_bf16 && act != Dtype::F16,
        softcap: opts.softcap.is_some(),
        alibi: opts.alibi_slopes.is_some(),
        window: opts.window.is_some(),
        key_major: false,
    })
}

/// How a cache's elements become MMA operands, and whether the MMA type is bf16 (for the bf16
/// cache; f16 otherwise, which every FP8 value converts to exactly); `None` for an f32 cache.
pub(crate) fn mma_operands(cache: Dtype) -> Option<(CacheBits, bool)> {
    match cache {
        Dtype::E4m3 => Some((CacheBits::E4m3, false)),
        Dtype::E5m2 => Some((CacheBits::E5m2, false)),
        Dtype::F16 => Some((CacheBits::Half, false)),
        Dtype::Bf16 => Some((CacheBits::Half, true)),
        Dtype::F32 => None,
    }
}

/// The wide-head tensor-core configuration ([`super::wide`]) where that kernel applies, `None`
/// elsewhere: K/V head dims that [`wide_dims`] accepts (MLA's 576/512), an FP8, f16 or bf16
/// cache, and a query that converts to the MMA type in one part (f16/bf16; bf16 rows with the
/// f16 MMA are scaled by a power of two as in the other kernel).
pub(crate) fn wide_config(
    cache: Dtype,
    act: Dtype,
    k: CacheGeometry,
    v: CacheGeometry,
    group: u32,
    max_rows: usize,
    opts: &AttentionOptions,
) -> Option<MmaConfig> {
    if !wide_dims(k.head_dim, v.head_dim) {
        return None;
    }
    let (bits, mma_bf16) = mma_operands(cache)?;
    let one_part = match act {
        Dtype::Bf16 => true,
        Dtype::F16 => !mma_bf16,
        _ => false,
    };
    if !one_part {
        return None;
    }
    Some(MmaConfig {
        k,
        v,
        group,
        bits,
        v_words: 4,
        row_tiles: if max_rows <= MMA_TILE_ROWS as usize {
            1
        } else {
            2
        },
        q_parts: 1,
        p_parts: if mma_bf16 { 3 } else { 2 },
        q_scaled: !mma_bf16 && act != Dtype::F16,
        softcap: opts.softcap.is_some(),
        alibi: opts.alibi_slopes.is_some(),
        window: opts.window.is_some(),
        key_major: true,
    })
}

/// What [`KernelPath::Auto`] launches: the split kernel measured fastest for the shape class
/// (`--ab` on the H200, key-major time / default tensor-core time, batch × context 1 × 32768
/// to 128 × 32768, page 64; `benches/PERFORMANCE.md`), `None` for the CUDA-core kernel:
///
/// | shape class | kernel | measured |
/// |---|---|---|
/// | FP8 cache, head dim 128 or 256, one row tile | key-major | d128 0.85–0.97 (one run 1.03), d256 0.87 |
/// | FP8 cache, head dim 64, group ≤ 3, one row tile | key-major | SmolLM2 9/3: 47.6 / 65.2 µs = 0.73 |
/// | FP8 cache, head dim 64, group ≥ 4 | default tensor-core | Llama-3.2-1B 32/8: 1.094–1.157 |
/// | f16/bf16 cache, head dim 64, group ≤ 3, one row tile | key-major | SmolLM2 9/3: 0.876 (twice) |
/// | other f16/bf16 caches | default tensor-core | bf16 d128: 0.983–1.053; d64 32/8: 1.114 |
/// | two row tiles (group × new tokens > 8) | default tensor-core | not measured on key-major |
/// | MLA 576/512, one-part query | wide (key-major family) | 137 / 1739 µs = 0.079 |
/// | everything else (f32 queries, other head dims), or no MMA | CUDA cores | |
#[allow(clippy::too_many_arguments)]
pub(crate) fn auto_config(
    cache: Dtype,
    act: Dtype,
    k: CacheGeometry,
    v: CacheGeometry,
    group: u32,
    max_rows: usize,
    opts: &AttentionOptions,
    mma_supported: bool,
) -> Option<MmaConfig> {
    if !mma_supported {
        return None;
    }
    match mma_config(cache, act, k, v, group, max_rows, opts) {
        Some(c) => {
            // Small groups at d64 on any cache; d128/d256 only on FP8 caches.
            let small_d64 = k.head_dim == 64 && group <= 3;
            let fp8_wide = cache.fp8_format().is_some() && k.head_dim >= 128;
            let key_major = c.row_tiles == 1 && (small_d64 || fp8_wide);
            Some(MmaConfig { key_major, ..c })
        }
        None => wide_config(cache, act, k, v, group, max_rows, opts),
    }
}

/// Whether the runtime reports the `m16n8k16` MMA (f32 accumulators) the tensor-core kernel
/// emits for a cache of `cache` dtype (bf16 operands for the bf16 cache, f16 otherwise): CUDA
/// sm_80 and later.
pub(crate) fn mma_supported<R: Runtime>(client: &ComputeClient<R>, cache: Dtype) -> bool {
    let mma_type = if cache == Dtype::Bf16 {
        Dtype::Bf16
    } else {
        Dtype::F16
    };
    client.properties().features.matmul.mma.iter().any(|c| {
        c.m == 16
            && c.n == 8
            && c.k == 16
            && c.a_type == storage_type(mma_type)
            && c.b_type == storage_type(mma_type)
            && c.cd_type == storage_type(Dtype::F32)
    })
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
