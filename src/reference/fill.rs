//! Reference fill: quantize new K/V tokens into the paged cache.

use super::{quantize_value, HostKvCache, HostRows};
use crate::error::{KvSide, Result};
use crate::layout::BatchMetadata;

/// Writes each sequence's `q_seq_length` new tokens (rows `q_start_loc..+q_len` of `k_new` and
/// `v_new`, each row `[num_kv_heads, head_dim]`) into cache positions `[kv_len - q_len,
/// kv_len)`, quantizing FP8 as `clamp(x / scale, ±MAX)` with round-to-nearest-even, `scale` the
/// side's scale from [`HostKvCache::scales`] (the unquantized cache ignores the scales). Touches
/// no other slot. Validates `meta` against the cache layout first.
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
    let (dtype, scales) = (cache.dtype(), cache.scales());
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

/// The RoPE fill ([`crate::kernels::fill::fill_rope`]): for each sequence's new tokens, rows of
/// a fused QKV projection `[q_heads + 2 kv_heads, head_dim]` (Q, then K, then V): pairs `(2i,
/// 2i + 1)` of each Q and K head with `i < table.rope_dims() / 2` rotate by the angle of the
/// token's position (`kv_seqlens − q_seq_length + i`): `(x₀ c − x₁ s, x₀ s + x₁ c)` in f64,
/// rounded to f32 once; K (rotated) and V then go through [`fill`] (with the cache's scales),
/// and Q is returned rounded to `act`, `[num_tokens, q_heads · head_dim]`, NaN in the rows of
/// no sequence.
///
/// Errors: [`crate::Fp8KvError::ShapeMismatch`] for heads that do not match the cache's
/// layout or the table, or a table too short for the batch's positions; those of [`fill`].
pub fn fill_rope(
    cache: &mut HostKvCache,
    qkv: HostRows<'_>,
    num_tokens: usize,
    meta: &BatchMetadata,
    table: &crate::rope::RopeTable,
    heads: crate::rope::QkvHeads,
    act: crate::policy::Dtype,
) -> Result<Vec<f32>> {
    let layout = *cache.layout();
    let d = heads.head_dim;
    if heads.kv_heads != layout.num_kv_heads()
        || d != layout.head_dim_k()
        || d != layout.head_dim_v()
        || d != table.head_dim()
        || meta.max_kv_len() > table.positions()
    {
        return Err(crate::Fp8KvError::ShapeMismatch {
            what: "reference RoPE fill",
            expected: format!(
                "the cache's {} KV heads of {} and a table of that width covering position {}",
                layout.num_kv_heads(),
                layout.head_dim_k(),
                meta.max_kv_len().saturating_sub(1)
            ),
            actual: format!(
                "{heads:?}, a table of {} positions of {}",
                table.positions(),
                table.head_dim()
            ),
        });
    }
    qkv.check("qkv", num_tokens, heads.row_elems())?;
    meta.validate(&layout, num_tokens)?;
    let (qd, kvd) = (heads.q_heads * d, heads.kv_heads * d);
    let mut q = vec![f32::NAN; num_tokens * qd];
    let mut k = vec![0f32; num_tokens * kvd];
    let mut v = vec![0f32; num_tokens * kvd];
    let pairs = table.rope_dims() / 2;
    for b in 0..meta.batch() {
        let q_len = meta.q_seq_length()[b] as usize;
        let kv_len = meta.kv_seqlens()[b] as usize;
        let start = meta.q_start_loc()[b] as usize;
        for i in 0..q_len {
            let (row, pos) = (start + i, kv_len - q_len + i);
            let x = &qkv.data[row * qkv.row_stride..][..heads.row_elems()];
            let rotate = |at: usize| {
                let (x0, x1) = (x[at] as f64, x[at + 1] as f64);
                let pair = (at % d) / 2;
                if pair >= pairs {
                    return (x[at], x[at + 1]);
                }
                let (c, s) = table.cos_sin(pos, pair);
                let (c, s) = (c as f64, s as f64);
                ((x0 * c - x1 * s) as f32, (x0 * s + x1 * c) as f32)
            };
            for at in (0..qd).step_by(2) {
                let (y0, y1) = rotate(at);
                q[row * qd + at] = act.round_trip(y0);
                q[row * qd + at + 1] = act.round_trip(y1);
            }
            for at in (0..kvd).step_by(2) {
                let (y0, y1) = rotate(qd + at);
                k[row * kvd + at] = y0;
                k[row * kvd + at + 1] = y1;
            }
            v[row * kvd..(row + 1) * kvd].copy_from_slice(&x[qd + kvd..qd + 2 * kvd]);
        }
    }
    let rows = |data| HostRows {
        data,
        row_stride: kvd,
    };
    fill(cache, rows(&k), rows(&v), num_tokens, meta)?;
    Ok(q)
}
