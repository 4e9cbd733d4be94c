//! The block kernels' definitions on the CPU, written from the math in f64 (never through the
//! kernels' code): the ground truth of their GPU tests, and what the NdArray backend runs.
//! Inputs are the activation values as f32; `dtype` is the activation dtype whose rounding the
//! kernels store (the residual sum is rounded to it before the norm reads it, as a model that
//! keeps its residual stream in bf16 does).

use super::QkvHeads;
use fp8kv::layout::BatchMetadata;
use fp8kv::policy::Dtype;

/// RMSNorm of `x` (`rows × hidden`, row-major) in f64: `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
    let hidden = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(hidden) {
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / hidden as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &g)| v as f64 * inv * g as f64));
    }
    out
}

/// The residual add before a norm: `x + r` rounded to `dtype` (what the residual stream
/// stores), then [`rms_norm`] of it. Returns `(sum, normed)`.
pub fn add_rms_norm(
    x: &[f32],
    r: &[f32],
    w: &[f32],
    eps: f32,
    dtype: Dtype,
) -> (Vec<f32>, Vec<f64>) {
    let sum: Vec<f32> = x
        .iter()
        .zip(r)
        .map(|(&a, &b)| dtype.round_trip((a as f64 + b as f64) as f32))
        .collect();
    let normed = rms_norm(&sum, w, eps);
    (sum, normed)
}

/// SwiGLU of `gu` (`rows × 2 ff`, gate then up per row) in f64: `silu(g) · u`.
pub fn swiglu(gu: &[f32], ff: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(gu.len() / 2);
    for row in gu.chunks(2 * ff) {
        let (g, u) = row.split_at(ff);
        out.extend(g.iter().zip(u).map(|(&g, &u)| {
            let g = g as f64;
            g / (1.0 + (-g).exp()) * u as f64
        }));
    }
    out
}

/// RoPE on a fused QKV output (`num_tokens` rows `row_stride` apart, row `t` = `[q_heads + 2
/// kv_heads, head_dim]`) in f64, split into `(q, k, v)` row-major; positions from the metadata
/// (`kv_seqlens[b] − q_seq_length[b] + i` for row `q_start_loc[b] + i`), angles from `table`
/// ([`super::RopeTable::values`]: `[positions, head_dim]`, `(cos, sin)` of pair `j` at `2j,
/// 2j + 1`), the first `rope_dims` dimensions of each Q and K head rotated. Rows of no
/// sequence stay NaN.
pub fn rope_qkv(
    qkv: &[f32],
    num_tokens: usize,
    row_stride: usize,
    meta: &BatchMetadata,
    table: &[f32],
    rope_dims: usize,
    heads: QkvHeads,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = heads.head_dim;
    let n = num_tokens;
    let (qw, kw) = (heads.q_heads * d, heads.kv_heads * d);
    let (mut q, mut k, mut v) = (
        vec![f64::NAN; n * qw],
        vec![f64::NAN; n * kw],
        vec![f64::NAN; n * kw],
    );
    for b in 0..meta.batch() {
        let (start, len) = (
            meta.q_start_loc()[b] as usize,
            meta.q_seq_length()[b] as usize,
        );
        let first = meta.kv_seqlens()[b] as usize - len;
        for i in 0..len {
            let (row, pos) = (start + i, first + i);
            let x = &qkv[row * row_stride..row * row_stride + heads.row_elems()];
            for h in 0..heads.q_heads + heads.kv_heads {
                let head = &x[h * d..(h + 1) * d];
                let dst: &mut [f64] = if h < heads.q_heads {
                    &mut q[row * qw + h * d..row * qw + (h + 1) * d]
                } else {
                    let h = h - heads.q_heads;
                    &mut k[row * kw + h * d..row * kw + (h + 1) * d]
                };
                for j in 0..d / 2 {
                    let (x0, x1) = (head[2 * j] as f64, head[2 * j + 1] as f64);
                    if 2 * j < rope_dims {
                        let (c, s) = (
                            table[pos * d + 2 * j] as f64,
                            table[pos * d + 2 * j + 1] as f64,
                        );
                        dst[2 * j] = x0 * c - x1 * s;
                        dst[2 * j + 1] = x0 * s + x1 * c;
                    } else {
                        dst[2 * j] = x0;
                        dst[2 * j + 1] = x1;
                    }
                }
            }
            let vs = &x[(heads.q_heads + heads.kv_heads) * d..];
            for (dst, &src) in v[row * kw..(row + 1) * kw].iter_mut().zip(vs) {
                *dst = src as f64;
            }
        }
    }
    (q, k, v)
}

/// `x · wᵀ` in f64: `x` `rows × k`, `w` `outputs × k` (row-major), the result `rows ×
/// outputs`.
pub fn gemv(x: &[f32], w: &[f32], k: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for xr in x.chunks(k) {
        for wr in w.chunks(k) {
            out.push(xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum());
        }
    }
    out
}

/// Row-wise argmax: the first index of each row's largest value, NaN and −inf never chosen
/// (0 for a row of only those).
pub fn argmax(x: &[f32], cols: usize) -> Vec<usize> {
    x.chunks(cols)
        .map(|row| {
            let mut best: Option<(usize, f32)> = None;
            for (i, &v) in row.iter().enumerate() {
                if !v.is_nan() && v != f32::NEG_INFINITY && best.is_none_or(|(_, b)| v > b) {
                    best = Some((i, v));
                }
            }
            best.map_or(0, |(i, _)| i)
        })
        .collect()
}
