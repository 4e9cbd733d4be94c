//! Flatten: paged cache → contiguous, dequantized K and V for a batch of sequences.
//!
//! Values are `f32(q) * scale` (one f32 multiply) rounded to the output dtype for FP8 caches,
//! the stored value rounded to the output dtype for the unquantized cache (scales ignored):
//! exactly [`crate::reference::flatten`]. Sequences are concatenated in batch order; sequence
//! `b` starts at [`DeviceBatch::kv_start_loc`]`[b]` (uploaded with the batch, so the kernel
//! needs no extra tensor).

pub(crate) mod kernel;
mod launch;

use cubecl::client::ComputeClient;
use cubecl::Runtime;

use crate::contract::FlattenLayout;

use crate::device::{DeviceBatch, DeviceRows, PagedKvCache};
use crate::error::{Fp8KvError, KvSide, Result};
use crate::kernels::CacheGeometry;
use crate::policy::Dtype;

/// Comptime configuration of the `flatten_kernel` (the JIT key besides the dtypes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlattenConfig {
    /// K cache geometry.
    pub k: CacheGeometry,
    /// V cache geometry.
    pub v: CacheGeometry,
    /// Whether the cache is FP8 (apply the scales).
    pub fp8: bool,
    /// `[kv_heads, total, d]` rather than `[total, kv_heads, d]`.
    pub hsd: bool,
    /// Elements per vector access (16-byte output stores).
    pub vec: u32,
    /// Vectors per thread (loads issued before the first store).
    pub unroll: u32,
    /// Threads per cube.
    pub threads: u32,
}

/// The `(rows, row_elems)` a flatten output of one side has: `[kv_heads * total, d]` rows for
/// hsd, `[total, kv_heads * d]` for shd (both contiguous).
pub fn output_rows(
    cache_heads: usize,
    head_dim: usize,
    total_tokens: usize,
    layout: FlattenLayout,
) -> (usize, usize) {
    match layout {
        FlattenLayout::Hsd => (cache_heads * total_tokens, head_dim),
        FlattenLayout::Shd => (total_tokens, cache_heads * head_dim),
    }
}

/// Gathers every sequence of `batch` out of `cache` into `k_out` / `v_out` (contiguous rows
/// as given by [`output_rows`], dtype f32/f16/bf16, both the same).
///
/// Errors: a batch validated for another layout or outputs of the wrong shape
/// ([`Fp8KvError::ShapeMismatch`]), outputs of different or non-activation dtypes
/// ([`Fp8KvError::UnsupportedDtype`]), more than 65535 sequences, more than `u32::MAX` cached
/// tokens in all (the kernel reads `kv_start_loc` as 32-bit) or buffers past its 32-bit vector
/// indices ([`Fp8KvError::TooLarge`]).
pub fn flatten<R: Runtime>(
    cache: &PagedKvCache<R>,
    batch: &DeviceBatch<R>,
    out_layout: FlattenLayout,
    k_out: &mut DeviceRows<R>,
    v_out: &mut DeviceRows<R>,
) -> Result<()> {
    let layout = *cache.layout();
    batch.check_layout(&layout)?;
    crate::kernels::check_grid_batch(batch.batch())?;
    crate::error::check_limit(
        "cached tokens of the batch",
        batch.total_kv_tokens(),
        u32::MAX as usize,
        "kv_start_loc is uploaded as 32-bit entries",
    )?;
    if k_out.dtype() != v_out.dtype() || !k_out.dtype().is_activation() {
        return Err(Fp8KvError::UnsupportedDtype(format!(
            "flatten outputs must both be f32, f16 or bf16, got k {} and v {}",
            k_out.dtype(),
            v_out.dtype()
        )));
    }
    let total = batch.total_kv_tokens();
    for (what, side, out) in [("k_out", KvSide::K, &*k_out), ("v_out", KvSide::V, &*v_out)] {
        let (rows, row_elems) = output_rows(
            layout.num_kv_heads(),
            layout.head_dim(side),
            total,
            out_layout,
        );
        if out.rows() != rows || out.row_elems() != row_elems || out.row_stride() != row_elems {
            return Err(Fp8KvError::ShapeMismatch {
                what,
                expected: format!(
                    "{rows} contiguous rows of {row_elems} elements ({out_layout:?})"
                ),
                actual: format!(
                    "{} rows of {} elements, stride {}",
                    out.rows(),
                    out.row_elems(),
                    out.row_stride()
                ),
            });
        }
    }
    launch::launch_flatten(cache, batch, out_layout, k_out, v_out)
}

/// Allocates the two outputs and runs [`flatten`].
pub fn flatten_new<R: Runtime>(
    client: &ComputeClient<R>,
    cache: &PagedKvCache<R>,
    batch: &DeviceBatch<R>,
    out_layout: FlattenLayout,
    out_dtype: Dtype,
) -> Result<(DeviceRows<R>, DeviceRows<R>)> {
    let layout = cache.layout();
    let total = batch.total_kv_tokens();
    let mk = |side| {
        let (rows, elems) = output_rows(
            layout.num_kv_heads(),
            layout.head_dim(side),
            total,
            out_layout,
        );
        DeviceRows::empty(client, out_dtype, rows, elems, elems)
    };
    let (mut k, mut v) = (mk(KvSide::K)?, mk(KvSide::V)?);
    flatten(cache, batch, out_layout, &mut k, &mut v)?;
    Ok((k, v))
}
