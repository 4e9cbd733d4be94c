//! Launcher of [`super::kernel::fill_kernel`]: assumes validated input, picks the vector width,
//! the cube shape and the comptime configuration.
//!
//! Comptime (JIT key): activation and cache dtypes, the K and V [`CacheGeometry`] (page size,
//! KV heads, head dims, Bshd/Bhsd), FP8 format, vector width, unroll, threads per cube.
//! Runtime: batch, block-table width, row strides, scales, every sequence length.

use cubecl::prelude::*;

use super::kernel::{fill_kernel, fill_stats_kernel};
use super::FillConfig;
use crate::device::{storage_type, DeviceBatch, DeviceRows, PagedKvCache};
use crate::error::{KvSide, Result};
use crate::kernels::codec::ScaleDiv;
use crate::kernels::stats::{limit, DeviceKvStats, STATS_WORDS};
use crate::kernels::{access_elems, array_len, check_copy_vectors, copy_cube_shape, CacheGeometry};

/// Vectors per thread on the big path (from `COPY_UNROLL_THRESHOLD_VECS` vectors on).
const UNROLL: u32 = 4;
/// Threads per cube on the big path.
const THREADS: u32 = 256;
/// Rounds per thread on the big path (software pipelining: load the next, store this one).
///
/// Measured on an H100 (prefill 8×2048, d128, 8 KV heads, bf16 → e4m3, calibrated scales):
/// (unroll, rounds) = (4, 1) 2.09 TB/s, (4, 2) 2.11, (2, 4) 2.00, (2, 8) 1.98, (4, 4) 1.60;
/// 128 threads per cube as fast as 256, 512 slower (1.83). The kernel is limited by issue
/// (about 21–24 instructions per element for the exact division and RNE encode, 65% issue
/// active, 51 registers) rather than by bytes in flight, so pipelining does not pay; the knob
/// stays for other shapes and devices (`--fill-shape` of the fill_flatten bench).
const ROUNDS: u32 = 1;

/// Launches fill for already validated inputs (see [`super::fill`]); with `stats`, the
/// kernel that also accumulates the written rows' statistics there
/// ([`super::fill_with_stats`]).
pub(crate) fn launch_fill<R: Runtime>(
    cache: &mut PagedKvCache<R>,
    k_new: &DeviceRows<R>,
    v_new: &DeviceRows<R>,
    batch: &DeviceBatch<R>,
    stats: Option<&mut DeviceKvStats<R>>,
) -> Result<()> {
    let meta = batch.meta();
    let max_q = meta.max_q_len();
    if meta.batch() == 0 || max_q == 0 {
        return Ok(());
    }
    let layout = *cache.layout();
    let act = k_new.dtype();
    let cache_dtype = cache.dtype();
    let (dk, dv) = (layout.head_dim_k(), layout.head_dim_v());
    let vec = access_elems(
        act.size_bytes(),
        &[dk, dv, k_new.row_stride(), v_new.row_stride()],
        &[k_new.handle(), v_new.handle()],
    );
    check_copy_vectors(
        &layout,
        vec,
        [("k_new", k_new.len_elems()), ("v_new", v_new.len_elems())],
    )?;
    let heads = layout.num_kv_heads();
    let vec_per_row = heads * dk.max(dv) / vec;
    let items = max_q * vec_per_row;
    let (threads, unroll, rounds) = copy_cube_shape("FILL", items, (THREADS, UNROLL, ROUNDS));
    let scales = cache.scales();
    let cfg = FillConfig {
        k: CacheGeometry::new(&layout, KvSide::K),
        v: CacheGeometry::new(&layout, KvSide::V),
        fp8: cache_dtype.fp8_format(),
        k_div: ScaleDiv::for_scale(scales.k()),
        v_div: ScaleDiv::for_scale(scales.v()),
        vec: vec as u32,
        unroll,
        threads,
        rounds,
    };
    let cubes_x = items.div_ceil((threads * unroll * rounds) as usize) as u32;
    let client = cache.client().clone();
    let es_act = act.size_bytes();
    let es_cache = cache_dtype.size_bytes();
    let offsets = batch.offsets();
    // SAFETY (both launches below): every array length is the buffer's real size (`array_len`: bytes in use / element
    // size, in scalars as `ArrayArg` wants; the metadata buffer's `offsets.len` i32s as
    // uploaded), and every index the kernel forms stays below it because `fill` (mod.rs) and
    // the types it takes checked, before this launch:
    // - metadata: the batch was validated for writing against this cache's layout
    //   (`DeviceBatch::new` -> `BatchMetadata::validate`; `check_layout`): for every sequence,
    //   `q_start_loc + q_seq_length <= num_tokens`, `q_seq_length <= kv_seqlens <= max_pages x
    //   page_size`, and each block-table entry of a written position in `[0, num_pages)`; so
    //   the metadata index `4 batch + 1 + b max_pages + pos / page_size` is inside the buffer,
    //   and the cache vector `page page_stride + slot slot_stride + head head_stride + v`
    //   is below `num_pages x page_stride = layout.cache_elems(side) / vec`;
    // - caches: `PagedKvCache::new` allocates `cache_elems` elements, `from_handles` checks at
    //   least that many, `from_host` checks `HostKvCache::check_shape`;
    // - rows: `check_rows` checked `num_tokens <= rows` and the row width, and `DeviceRows`'
    //   constructors that the buffer covers `(rows - 1) row_stride + row_elems` elements, so
    //   `(q_start + token) row_stride / vec + v` is inside;
    // - `access_elems` made `vec` divide the head dims, the row strides and the buffer
    //   offsets, so no vector straddles a buffer's end;
    // - 32-bit arithmetic cannot wrap: `check_copy_vectors` bounded each buffer to `u32::MAX`
    //   vectors, `check_batch_buffer_len` the metadata to `u32::MAX` entries, and
    //   `PagedKvLayout::new` a page to `MAX_PAGE_ELEMS` (the comptime strides); the grid's y
    //   (the batch) is at most 65535 (`check_grid_batch`).
    let count = CubeCount::Static(cubes_x, meta.batch() as u32, 2);
    // SAFETY: the lengths are the buffers' real sizes (see the launches' SAFETY above).
    let (k_in, v_in, k_out, v_out, meta_arg) = unsafe {
        (
            ArrayArg::from_raw_parts(k_new.handle().clone(), array_len(k_new.handle(), es_act)),
            ArrayArg::from_raw_parts(v_new.handle().clone(), array_len(v_new.handle(), es_act)),
            ArrayArg::from_raw_parts(
                cache.k_handle().clone(),
                array_len(cache.k_handle(), es_cache),
            ),
            ArrayArg::from_raw_parts(
                cache.v_handle().clone(),
                array_len(cache.v_handle(), es_cache),
            ),
            ArrayArg::from_raw_parts(batch.handle().clone(), offsets.len),
        )
    };
    let (k_rs, v_rs) = (
        (k_new.row_stride() / vec) as u32,
        (v_new.row_stride() / vec) as u32,
    );
    let dtypes = [storage_type(act), storage_type(cache_dtype)];
    match stats {
        // SAFETY: as above.
        None => unsafe {
            fill_kernel::launch_unchecked::<R>(
                &client,
                count,
                CubeDim::new_1d(threads),
                vec,
                k_in,
                v_in,
                k_out,
                v_out,
                meta_arg,
                meta.batch() as u32,
                meta.max_pages_per_seq() as u32,
                k_rs,
                v_rs,
                scales.k(),
                scales.v(),
                1.0 / scales.k(),
                1.0 / scales.v(),
                cfg,
                dtypes,
            );
        },
        // SAFETY: as above, and `stats` holds the `STATS_WORDS` `u32`s the kernel addresses
        // (`copy · STATS_COPY_STRIDE + slot`, copy < `STATS_COPIES`, slot `CUBE_POS_Z` or
        // `CUBE_POS_Z + 2` with grid z = 2).
        Some(stats) => unsafe {
            let policy = cache.policy();
            fill_stats_kernel::launch_unchecked::<R>(
                &client,
                count,
                CubeDim::new_1d(threads),
                vec,
                k_in,
                v_in,
                k_out,
                v_out,
                meta_arg,
                meta.batch() as u32,
                meta.max_pages_per_seq() as u32,
                k_rs,
                v_rs,
                scales.k(),
                scales.v(),
                1.0 / scales.k(),
                1.0 / scales.v(),
                ArrayArg::from_raw_parts(stats.handle.clone(), STATS_WORDS),
                limit(policy, scales.k()),
                limit(policy, scales.v()),
                cfg,
                dtypes,
            );
        },
    }
    Ok(())
}
