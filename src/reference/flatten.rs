//! Reference flatten: paged cache to contiguous, dequantized K/V.

use super::HostKvCache;
use crate::contract::{flatten_start_loc, FlattenLayout};
use crate::error::{checked_product, try_vec, Fp8KvError, KvSide, Result};
use crate::layout::BatchMetadata;
use crate::policy::Dtype;

/// Gathers every sequence's `kv_seqlens[b]` cached tokens into contiguous K and V tensors in
/// `out_layout`, sequences concatenated in batch order (see [`flatten_start_loc`]), values
/// [`HostKvCache::dequant`] (`f32(q) * scale` with the cache's scales; the stored value for the
/// unquantized cache) rounded to `out_dtype`. Returns `(k, v)` as f32 values of `out_dtype`.
///
/// Errors: [`Fp8KvError::UnsupportedDtype`] (an FP8 output), a cache whose buffers fail
/// [`HostKvCache::check_shape`], every error of [`BatchMetadata::validate_reads`], and
/// [`Fp8KvError::TooLarge`] for an output the host cannot hold.
pub fn flatten(
    cache: &HostKvCache,
    meta: &BatchMetadata,
    out_layout: FlattenLayout,
    out_dtype: Dtype,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if !out_dtype.is_activation() {
        return Err(Fp8KvError::UnsupportedDtype(format!(
            "flatten output must be f32, f16 or bf16, got {out_dtype}"
        )));
    }
    cache.check_shape()?;
    let layout = *cache.layout();
    meta.validate_reads(&layout)?;
    let starts = flatten_start_loc(meta);
    let total = starts[meta.batch()];
    let heads = layout.num_kv_heads();
    let mut out = Vec::with_capacity(2);
    for side in [KvSide::K, KvSide::V] {
        let d_len = layout.head_dim(side);
        let elems = checked_product("flatten output elements", &[heads, total, d_len])?;
        let mut o = try_vec("flatten output elements", elems, 0f32)?;
        for (b, &seq_start) in starts[..meta.batch()].iter().enumerate() {
            for pos in 0..meta.kv_seqlens()[b] as usize {
                let (page, slot) = meta.locate(b, pos, layout.page_size());
                let tok = seq_start + pos;
                for h in 0..heads {
                    let row = match out_layout {
                        FlattenLayout::Hsd => h * total + tok,
                        FlattenLayout::Shd => tok * heads + h,
                    };
                    for d in 0..d_len {
                        let x = cache.dequant(side, page, slot, h, d);
                        o[row * d_len + d] = out_dtype.round_trip(x);
                    }
                }
            }
        }
        out.push(o);
    }
    let v = out.pop().unwrap_or_default();
    let k = out.pop().unwrap_or_default();
    Ok((k, v))
}
