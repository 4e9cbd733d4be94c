//! Reference paged attention (decode and multi-token decode), f64 throughout.

use super::HostKvCache;
use crate::contract::AttentionOptions;
use crate::error::{checked_product, try_vec, Fp8KvError, KvSide, Result};
use crate::layout::BatchMetadata;

/// Attention of `q` (`[num_tokens, num_heads, head_dim_k]`, row-major, packed as `meta` says)
/// over the paged cache. Query `i` of sequence `b` sits at position `p = kv_len - q_len + i`
/// and sees keys `j ≤ p` (causal among the new tokens), limited by the window. GQA: head `h`
/// reads KV head `h / (num_heads / num_kv_heads)`.
///
/// `s_j = (q · f32(K_j)) · k_scale · sm_scale`, then softcap, then ALiBi; `p = softmax(s)`
/// with the sink in the denominator; `o = Σ_j (p_j · v_scale) · f32(V_j)`, with the scales of
/// the cache's [`HostKvCache::scales`] (1 for the unquantized cache, whose scales are ignored). Returns
/// `[num_tokens, num_heads, head_dim_v]` in f64; rows that belong to no sequence stay 0, and a
/// query that sees no key gets 0.
///
/// Non-finite cache values (fill stores a NaN input as the format's NaN code, see
/// [`crate::reference::fill`]): a NaN in any dim of key `j` makes score `s_j` NaN for every
/// query head of that KV group whose window contains `j`; the running maximum skips it
/// (`f64::max`), but the softmax denominator becomes NaN, so **every dim** of those heads'
/// output rows is NaN. A NaN in dim `d` of value `j` makes **dim `d` only** of those rows NaN,
/// even where `p_j` underflows to 0 (`0 · NaN = NaN`). Queries whose window excludes `j`, other
/// KV heads and other sequences are unaffected. Saturated ±MAX codes are finite and give
/// finite scores and outputs. (An E5M2 ±inf code, which fill never writes, gives ±inf or NaN
/// scores.)
///
/// Errors: [`Fp8KvError::HeadRatio`], [`Fp8KvError::ShapeMismatch`] (q of the wrong length, a
/// cache that fails [`HostKvCache::check_shape`]), [`Fp8KvError::TooLarge`], every error of
/// [`AttentionOptions::validate`] and [`BatchMetadata::validate`].
pub fn paged_decode(
    q: &[f32],
    num_heads: usize,
    cache: &HostKvCache,
    meta: &BatchMetadata,
    num_tokens: usize,
    opts: &AttentionOptions,
) -> Result<Vec<f64>> {
    let layout = *cache.layout();
    let (dk, dv) = (layout.head_dim_k(), layout.head_dim_v());
    let kv_heads = layout.num_kv_heads();
    if num_heads == 0 || !num_heads.is_multiple_of(kv_heads) {
        return Err(Fp8KvError::HeadRatio {
            num_heads,
            num_kv_heads: kv_heads,
        });
    }
    cache.check_shape()?;
    let q_elems = checked_product("q elements", &[num_tokens, num_heads, dk])?;
    let out_elems = checked_product("decode output elements", &[num_tokens, num_heads, dv])?;
    if q.len() != q_elems {
        return Err(Fp8KvError::ShapeMismatch {
            what: "q",
            expected: format!("[{num_tokens}, {num_heads}, {dk}]"),
            actual: format!("{} elements", q.len()),
        });
    }
    opts.validate(num_heads)?;
    meta.validate(&layout, num_tokens)?;
    let group = num_heads / kv_heads;
    let sm_scale = opts.sm_scale.map_or(1.0 / (dk as f64).sqrt(), f64::from);
    // Unquantized caches ignore the scales (see HostKvCache::dequant); FP8 scales are applied
    // in f64 to the unscaled codes.
    let raw = |side, page, slot, h, d| cache.raw(side, page, slot, h, d) as f64;
    let (k_scale, v_scale) = match cache.policy() {
        crate::policy::QuantPolicy::None => (1.0, 1.0),
        _ => {
            let scales = cache.scales();
            (scales.k() as f64, scales.v() as f64)
        }
    };
    let page_size = layout.page_size();
    // Attention of query `i` of sequence `b`, all heads: `[num_heads, dv]`.
    let query_rows = |b: usize, i: usize| -> Vec<f64> {
        let q_len = meta.q_seq_length()[b] as usize;
        let kv_len = meta.kv_seqlens()[b] as usize;
        let tok = meta.q_start_loc()[b] as usize + i;
        let p = kv_len - q_len + i;
        let first = opts.window.map_or(0, |w| (p + 1).saturating_sub(w));
        let mut rows = vec![0f64; num_heads * dv];
        let mut scores = Vec::with_capacity(p + 1 - first);
        for h in 0..num_heads {
            let g = h / group;
            let qv = &q[(tok * num_heads + h) * dk..][..dk];
            scores.clear();
            for j in first..=p {
                let (page, slot) = meta.locate(b, j, page_size);
                let dot: f64 = (0..dk)
                    .map(|d| qv[d] as f64 * raw(KvSide::K, page, slot, g, d))
                    .sum();
                let mut s = dot * k_scale * sm_scale;
                if let Some(c) = opts.softcap {
                    let c = c as f64;
                    s = c * (s / c).tanh();
                }
                if let Some(sl) = &opts.alibi_slopes {
                    s += sl[h] as f64 * (j as f64 - p as f64);
                }
                scores.push(s);
            }
            if scores.is_empty() {
                continue;
            }
            let sink = opts.sinks.as_ref().map(|s| s[h] as f64);
            let m = scores
                .iter()
                .copied()
                .chain(sink)
                .fold(f64::NEG_INFINITY, f64::max);
            let denom: f64 = scores
                .iter()
                .chain(sink.iter())
                .map(|s| (s - m).exp())
                .sum();
            let o = &mut rows[h * dv..][..dv];
            for (jj, s) in scores.iter().enumerate() {
                let w = (s - m).exp() / denom * v_scale;
                let (page, slot) = meta.locate(b, first + jj, page_size);
                for (d, od) in o.iter_mut().enumerate() {
                    *od += w * raw(KvSide::V, page, slot, g, d);
                }
            }
        }
        rows
    };
    let queries: Vec<(usize, usize)> = (0..meta.batch())
        .flat_map(|b| (0..meta.q_seq_length()[b] as usize).map(move |i| (b, i)))
        .collect();
    // Queries are independent and each is summed in the same order by one thread, so the
    // result does not depend on the thread count; threads only make the GPU tests' ground
    // truth affordable on large cases.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(queries.len().max(1));
    let done: Vec<Vec<(usize, Vec<f64>)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (queries, query_rows) = (&queries, &query_rows);
                scope.spawn(move || {
                    queries
                        .iter()
                        .skip(t)
                        .step_by(threads)
                        .map(|&(b, i)| (meta.q_start_loc()[b] as usize + i, query_rows(b, i)))
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("reference decode worker panicked"))
            .collect()
    });
    let mut out = try_vec("decode output elements", out_elems, 0f64)?;
    for (tok, rows) in done.into_iter().flatten() {
        out[tok * num_heads * dv..][..num_heads * dv].copy_from_slice(&rows);
    }
    Ok(out)
}
