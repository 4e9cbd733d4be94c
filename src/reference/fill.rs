//! Reference fill: quantize new K/V tokens into the paged cache.

use super::{quantize_value, HostKvCache, HostRows};
use crate::error::{KvSide, Result};
use crate::layout::BatchMetadata;
use crate::scales::KvScales;

/// Writes each sequence's `q_seq_length` new tokens (rows `q_start_loc..+q_len` of `k_new` and
/// `v_new`, each row `[num_kv_heads, head_dim]`) into cache positions `[kv_len - q_len,
/// kv_len)`, quantizing FP8 as `clamp(x / scale, ±MAX)` with round-to-nearest-even. Touches no
/// other slot. Validates `meta` against the cache layout first.
///
/// Non-finite inputs ([`crate::kernels::fill`] documents the same for the GPU): NaN is stored
/// as the format's NaN code with the input's sign (E4M3 `0x7F`/`0xFF`, E5M2 `0x7E`/`0xFE`);
/// ±inf saturates to ±MAX like any finite value beyond it (E4M3 `0x7E`/`0xFE`, E5M2
/// `0x7B`/`0xFB`). The unquantized (f16/bf16) cache stores NaN and ±inf as they are (and f16
/// turns a finite value past 65504 into ±inf).
///
/// Errors: [`crate::Fp8KvError::ShapeMismatch`] / [`crate::Fp8KvError::RowStride`] /
/// [`crate::Fp8KvError::TooLarge`] for rows or cache buffers of the wrong size, and every error
/// of [`BatchMetadata::validate`].
pub fn fill(
    cache: &mut HostKvCache,
    scales: &KvScales,
    k_new: HostRows<'_>,
    v_new: HostRows<'_>,
    num_tokens: usize,
    meta: &BatchMetadata,
) -> Result<()> {
    cache.check_shape()?;
    let layout = *cache.layout();
    let heads = layout.num_kv_heads();
    k_new.check("k", num_tokens, heads * layout.head_dim_k())?;
    v_new.check("v", num_tokens, heads * layout.head_dim_v())?;
    meta.validate(&layout, num_tokens)?;
    let dtype = cache.dtype();
    let es = dtype.size_bytes();
    for (side, rows, scale) in [
        (KvSide::K, k_new, scales.k()),
        (KvSide::V, v_new, scales.v()),
    ] {
        let t = layout.tensor(side);
        let dst = match side {
            KvSide::K => &mut cache.k,
            KvSide::V => &mut cache.v,
        };
        for b in 0..meta.batch() {
            let q_len = meta.q_seq_length()[b] as usize;
            let kv_len = meta.kv_seqlens()[b] as usize;
            let start = meta.q_start_loc()[b] as usize;
            for i in 0..q_len {
                let (page, slot) = meta.locate(b, kv_len - q_len + i, layout.page_size());
                let row = &rows.data[(start + i) * rows.row_stride..];
                for h in 0..heads {
                    for d in 0..t.head_dim {
                        let x = row[h * t.head_dim + d];
                        let off = (t.offset(page, slot, h) + d) * es;
                        let bits = quantize_value(dtype, x, scale).to_le_bytes();
                        dst[off..off + es].copy_from_slice(&bits[..es]);
                    }
                }
            }
        }
    }
    Ok(())
}
