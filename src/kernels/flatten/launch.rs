//! Launcher of [`super::kernel::flatten_kernel`]: assumes validated input, picks the vector
//! width (16-byte output stores), the cube shape and the comptime configuration.
//!
//! Comptime (JIT key): cache and output dtypes, the K and V [`CacheGeometry`], FP8 or not,
//! output layout, vector width, unroll, threads per cube. Runtime: batch, block-table width,
//! scales, every sequence length and start.

use cubecl::prelude::*;

use super::kernel::flatten_kernel;
use super::FlattenConfig;
use crate::contract::FlattenLayout;
use crate::device::{storage_type, DeviceBatch, DeviceRows, PagedKvCache};
use crate::error::{KvSide, Result};
use crate::kernels::{access_elems, array_len, check_copy_vectors, copy_cube_shape, CacheGeometry};

/// Vectors per thread on the big path (from `COPY_UNROLL_THRESHOLD_VECS` vectors on) (measured on an H100, 8×4096 e4m3 → bf16 hsd: unroll 4
/// 2.55–2.62 TB/s, 8 2.53, 16 2.47).
const UNROLL: u32 = 4;
/// Threads per cube on the big path.
const THREADS: u32 = 256;

/// Launches flatten for already validated inputs (see [`super::flatten`]).
pub(crate) fn launch_flatten<R: Runtime>(
    cache: &PagedKvCache<R>,
    batch: &DeviceBatch<R>,
    out_layout: FlattenLayout,
    k_out: &mut DeviceRows<R>,
    v_out: &mut DeviceRows<R>,
) -> Result<()> {
    let meta = batch.meta();
    let max_kv = meta.max_kv_len();
    if meta.batch() == 0 || max_kv == 0 {
        return Ok(());
    }
    let layout = *cache.layout();
    let out = k_out.dtype();
    let cache_dtype = cache.dtype();
    let (dk, dv) = (layout.head_dim_k(), layout.head_dim_v());
    let vec = access_elems(
        out.size_bytes(),
        &[dk, dv],
        &[k_out.handle(), v_out.handle()],
    );
    check_copy_vectors(
        &layout,
        vec,
        [("k_out", k_out.len_elems()), ("v_out", v_out.len_elems())],
    )?;
    let vec_per_row = layout.num_kv_heads() * dk.max(dv) / vec;
    let items = max_kv * vec_per_row;
    let (threads, unroll, _) = copy_cube_shape("FLATTEN", items, (THREADS, UNROLL, 1));
    let cfg = FlattenConfig {
        k: CacheGeometry::new(&layout, KvSide::K),
        v: CacheGeometry::new(&layout, KvSide::V),
        fp8: cache_dtype.fp8_format().is_some(),
        hsd: out_layout == FlattenLayout::Hsd,
        vec: vec as u32,
        unroll,
        threads,
    };
    let cubes_x = items.div_ceil((threads * unroll) as usize) as u32;
    let client = cache.client().clone();
    let scales = cache.scales();
    let (es_out, es_cache) = (out.size_bytes(), cache_dtype.size_bytes());
    // SAFETY: every array length is the buffer's real size (`array_len`: bytes in use / element
    // size, in scalars as `ArrayArg` wants; the metadata buffer's `offsets.len` i32s as
    // uploaded), and every index the kernel forms stays below it because `flatten` (mod.rs)
    // and the types it takes checked, before this launch:
    // - metadata: the batch was validated for reading against this cache's layout
    //   (`DeviceBatch::for_reads`/`new` -> `validate_reads`; `check_layout`): `0 <= kv_seqlens
    //   <= max_pages x page_size` and every block-table entry a sequence reads in
    //   `[0, num_pages)`, so every cache vector read is below `layout.cache_elems(side) / vec`
    //   (caches hold at least `cache_elems` elements: `PagedKvCache::new` / `from_handles` /
    //   `from_host`);
    // - outputs: exactly `output_rows(..)` contiguous rows for `total_kv_tokens` tokens, and
    //   `kv_start_loc` is the prefix sum of `kv_seqlens` computed on the host at upload (at
    //   most `u32::MAX` in all, checked), so token `kv_start_loc[b] + pos < total` and the row
    //   `h total + tok` (hsd) or `tok heads + h` (shd) is inside;
    // - `access_elems` made `vec` divide the head dims and the buffer offsets;
    // - 32-bit arithmetic cannot wrap: `check_copy_vectors` bounded each buffer to `u32::MAX`
    //   vectors, `check_batch_buffer_len` the metadata to `u32::MAX` entries, and
    //   `PagedKvLayout::new` a page to `MAX_PAGE_ELEMS`; the grid's y (the batch) is at most
    //   65535 (`check_grid_batch`).
    unsafe {
        flatten_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(cubes_x, meta.batch() as u32, 2),
            CubeDim::new_1d(threads),
            vec,
            ArrayArg::from_raw_parts(
                cache.k_handle().clone(),
                array_len(cache.k_handle(), es_cache),
            ),
            ArrayArg::from_raw_parts(
                cache.v_handle().clone(),
                array_len(cache.v_handle(), es_cache),
            ),
            ArrayArg::from_raw_parts(k_out.handle().clone(), array_len(k_out.handle(), es_out)),
            ArrayArg::from_raw_parts(v_out.handle().clone(), array_len(v_out.handle(), es_out)),
            ArrayArg::from_raw_parts(batch.handle().clone(), batch.offsets().len),
            meta.batch() as u32,
            meta.max_pages_per_seq() as u32,
            scales.k(),
            scales.v(),
            cfg,
            [storage_type(cache_dtype), storage_type(out)],
        );
    }
    Ok(())
}
