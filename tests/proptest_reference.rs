//! Property tests of the CPU reference kernels: fill, flatten and decode equal an independent
//! recomputation on tiny random shapes (300 cases; split from `proptest_validators.rs`, whose
//! metadata generator and runner they share).

mod proptest_support;

use fp8kv::reference::{self, HostKvCache, HostRows};
use fp8kv::testing::Rng;
use fp8kv::CacheSpec;
use fp8kv::{AttentionOptions, FlattenLayout};
use fp8kv::{Dtype, Fp8KvError, KvLayoutKind, KvScales, KvSide, QuantPolicy};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use proptest_support::*;

// ---- The reference kernels against an independent recomputation -----------------------------

/// Element offset of `(page, slot, head, dim)`, from the layout's definition.
#[allow(clippy::too_many_arguments)]
fn offset(
    kind: KvLayoutKind,
    ps: usize,
    heads: usize,
    d: usize,
    page: usize,
    slot: usize,
    h: usize,
    dim: usize,
) -> usize {
    match kind {
        KvLayoutKind::Bshd => ((page * ps + slot) * heads + h) * d + dim,
        KvLayoutKind::Bhsd => ((page * heads + h) * ps + slot) * d + dim,
    }
}

/// The stored bits of `x` in a cache of `dtype` (FP8: `x / scale` through `float8`, CUDA's
/// saturating software conversion; f16/bf16 through `half`, no scale).
fn encode(dtype: Dtype, x: f32, scale: f32) -> u16 {
    match dtype {
        Dtype::E4m3 => cubecl::e4m3::from_f32(x / scale).to_bits() as u16,
        Dtype::E5m2 => cubecl::e5m2::from_f32(x / scale).to_bits() as u16,
        Dtype::F16 => half::f16::from_f32(x).to_bits(),
        Dtype::Bf16 => half::bf16::from_f32(x).to_bits(),
        Dtype::F32 => unreachable!("not a cache dtype"),
    }
}

/// The value stored bits stand for, before any scale.
fn decode(dtype: Dtype, bits: u16) -> f32 {
    match dtype {
        Dtype::E4m3 => cubecl::e4m3::from_bits(bits as u8).to_f32(),
        Dtype::E5m2 => cubecl::e5m2::from_bits(bits as u8).to_f32(),
        Dtype::F16 => half::f16::from_bits(bits).to_f32(),
        Dtype::Bf16 => half::bf16::from_bits(bits).to_f32(),
        Dtype::F32 => unreachable!("not a cache dtype"),
    }
}

/// Rounds to an output dtype.
fn round_to(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::F16 => half::f16::from_f32(x).to_f32(),
        Dtype::Bf16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

fn get(bytes: &[u8], es: usize, e: usize) -> u16 {
    if es == 1 {
        bytes[e] as u16
    } else {
        u16::from_le_bytes([bytes[2 * e], bytes[2 * e + 1]])
    }
}

fn put(bytes: &mut [u8], es: usize, e: usize, bits: u16) {
    if es == 1 {
        bytes[e] = bits as u8;
    } else {
        bytes[2 * e..2 * e + 2].copy_from_slice(&bits.to_le_bytes());
    }
}

#[test]
fn reference_kernels_match_an_independent_recomputation() {
    const EPS: f64 = f64::EPSILON / 2.0; // unit roundoff u = 2^-53
    let tiny = (
        0u32..2,
        1usize..=2,
        1usize..=3,
        any::<bool>(),
        1usize..=3,
        1usize..=3,
        0usize..4,
        any::<u64>(),
    );
    run(
        300,
        &tiny,
        |(log, kv_heads, group, bhsd, batch, max_pages, kind, seed)| {
            let kind_l = if bhsd {
                KvLayoutKind::Bhsd
            } else {
                KvLayoutKind::Bshd
            };
            let c = build(Shape {
                page_size: 16 << log,
                heads: kv_heads,
                dims: (64, 64),
                kind: kind_l,
                batch,
                max_pages,
                spare_pages: 1,
                share_history: true,
                seed,
            });
            let mut rng = Rng::new(seed ^ 0x5eed);
            let (policy, dtype) = [
                (QuantPolicy::Fp8E4m3, Dtype::E4m3),
                (QuantPolicy::Fp8E5m2, Dtype::E5m2),
                (QuantPolicy::None, Dtype::F16),
                (QuantPolicy::None, Dtype::Bf16),
            ][kind];
            let fp8 = policy != QuantPolicy::None;
            let scales = KvScales::new(
                pick(&mut rng, &[0.01f32, 0.05, 0.3, 1.0]),
                pick(&mut rng, &[0.02f32, 0.1, 1.0]),
            )
            .unwrap();
            let (ks, vs) = if fp8 {
                (scales.k(), scales.v())
            } else {
                (1.0, 1.0)
            };
            let (l, ps, d, heads) = (c.layout, c.layout.page_size(), 64, kv_heads);
            let es = dtype.size_bytes();
            let at = |page, slot, h, dim| offset(kind_l, ps, heads, d, page, slot, h, dim);
            let fail = |e: Fp8KvError| TestCaseError::fail(e.to_string());

            // A cache whose every element holds a random value (the history), written here.
            let mut cache = CacheSpec::from_parts(l, policy, dtype, scales)
                .and_then(|spec| HostKvCache::new(spec, 0))
                .map_err(fail)?;
            let elems = l.cache_elems(KvSide::K);
            for e in 0..elems {
                put(
                    &mut cache.k,
                    es,
                    e,
                    encode(dtype, (rng.normal() * 0.3) as f32, ks),
                );
                put(
                    &mut cache.v,
                    es,
                    e,
                    encode(dtype, (rng.normal() * 0.3) as f32, vs),
                );
            }

            // Fill: the new tokens' slots get their codes, every other byte stays.
            let row = heads * d;
            let stride = row + rng.below(3) * 8;
            let mut new_k = vec![f32::NAN; c.num_tokens * stride];
            let mut new_v = new_k.clone();
            for t in 0..c.num_tokens {
                for i in 0..row {
                    new_k[t * stride + i] = (rng.normal() * 0.3) as f32;
                    new_v[t * stride + i] = (rng.normal() * 0.3) as f32;
                }
            }
            let mut want = cache.clone();
            for b in 0..c.batch() {
                let (q, kv, start) = (c.q_len[b] as usize, c.kv[b] as usize, c.q_start[b] as usize);
                for i in 0..q {
                    let pos = kv - q + i;
                    let page = c.table[b * c.max_pages + pos / ps] as usize;
                    for h in 0..heads {
                        for dim in 0..d {
                            let src = (start + i) * stride + h * d + dim;
                            let e = at(page, pos % ps, h, dim);
                            put(&mut want.k, es, e, encode(dtype, new_k[src], ks));
                            put(&mut want.v, es, e, encode(dtype, new_v[src], vs));
                        }
                    }
                }
            }
            let meta = c.meta();
            let (k_rows, v_rows) = (
                HostRows {
                    data: &new_k,
                    row_stride: stride,
                },
                HostRows {
                    data: &new_v,
                    row_stride: stride,
                },
            );
            reference::fill(&mut cache, k_rows, v_rows, c.num_tokens, &meta).map_err(fail)?;
            check(cache == want, || {
                "fill wrote other bytes than expected".into()
            })?;

            // Flatten: walk every position through the block table; exact.
            let out_dtype = pick(&mut rng, &[Dtype::F32, Dtype::F16, Dtype::Bf16]);
            let hsd = rng.below(2) == 0;
            let out_layout = if hsd {
                FlattenLayout::Hsd
            } else {
                FlattenLayout::Shd
            };
            let (fk, fv) =
                reference::flatten(&cache, &meta, out_layout, out_dtype).map_err(fail)?;
            let total: usize = c.kv.iter().map(|&k| k as usize).sum();
            check(
                fk.len() == heads * total * d && fv.len() == fk.len(),
                || format!("flatten sizes {} {}", fk.len(), fv.len()),
            )?;
            let mut tok = 0;
            for b in 0..c.batch() {
                for pos in 0..c.kv[b] as usize {
                    let page = c.table[b * c.max_pages + pos / ps] as usize;
                    for h in 0..heads {
                        let r = if hsd {
                            h * total + tok
                        } else {
                            tok * heads + h
                        };
                        for dim in 0..d {
                            let e = at(page, pos % ps, h, dim);
                            let ek = round_to(out_dtype, decode(dtype, get(&cache.k, es, e)) * ks);
                            let ev = round_to(out_dtype, decode(dtype, get(&cache.v, es, e)) * vs);
                            check(
                                fk[r * d + dim].to_bits() == ek.to_bits()
                                    && fv[r * d + dim].to_bits() == ev.to_bits(),
                                || format!("flatten seq {b} pos {pos} head {h} dim {dim}"),
                            )?;
                        }
                    }
                    tok += 1;
                }
            }

            // Decode: softmax attention over the dequantized values, written out here.
            let num_heads = kv_heads * group;
            let q: Vec<f32> = (0..c.num_tokens * num_heads * d)
                .map(|_| rng.normal() as f32)
                .collect();
            let opts = AttentionOptions {
                sm_scale: (rng.below(2) == 0).then_some(0.2),
                window: (rng.below(2) == 0).then(|| rng.below(40) + 1),
                softcap: (rng.below(2) == 0).then_some(5.0),
                sinks: (rng.below(2) == 0).then(|| vec![0.5; num_heads]),
                alibi_slopes: (rng.below(2) == 0).then(|| vec![0.05; num_heads]),
            };
            let got = reference::paged_decode(&q, num_heads, &cache, &meta, c.num_tokens, &opts)
                .map_err(fail)?;
            let sm = opts.sm_scale.map_or(1.0 / 8.0, f64::from);
            let deq =
                |bytes: &[u8], e: usize, s: f32| decode(dtype, get(bytes, es, e)) as f64 * s as f64;
            for b in 0..c.batch() {
                let (ql, kv) = (c.q_len[b] as usize, c.kv[b] as usize);
                for i in 0..ql {
                    let p = kv - ql + i;
                    let lo = opts.window.map_or(0, |w| (p + 1).saturating_sub(w));
                    let tok = c.q_start[b] as usize + i;
                    for h in 0..num_heads {
                        let g = h / group;
                        let qv = &q[(tok * num_heads + h) * d..][..d];
                        // Scores, and |Σ q·k| terms for the error bound.
                        let mut scores = Vec::new();
                        let mut delta: f64 = 0.0;
                        for j in lo..=p {
                            let page = c.table[b * c.max_pages + j / ps] as usize;
                            let (mut s, mut mag) = (0.0f64, 0.0f64);
                            for (dim, &qd) in qv.iter().enumerate() {
                                let term = qd as f64 * deq(&cache.k, at(page, j % ps, g, dim), ks);
                                s += term;
                                mag += term.abs();
                            }
                            s *= sm;
                            mag *= sm;
                            if let Some(cap) = opts.softcap {
                                let cap = cap as f64;
                                s = cap * (s / cap).tanh();
                                mag += cap;
                            }
                            if let Some(sl) = &opts.alibi_slopes {
                                let a = sl[h] as f64 * (j as f64 - p as f64);
                                s += a;
                                mag += a.abs();
                            }
                            delta = delta.max(2.0 * (d as f64 + 8.0) * EPS * mag);
                            scores.push((j, s));
                        }
                        let sink = opts.sinks.as_ref().map(|s| s[h] as f64);
                        let m = scores
                            .iter()
                            .map(|&(_, s)| s)
                            .chain(sink)
                            .fold(f64::NEG_INFINITY, f64::max);
                        let denom: f64 = scores.iter().map(|&(_, s)| (s - m).exp()).sum::<f64>()
                            + sink.map_or(0.0, |s| (s - m).exp());
                        let mut vmax: f64 = 0.0;
                        for dim in 0..d {
                            let mut o = 0.0f64;
                            for &(j, s) in &scores {
                                let page = c.table[b * c.max_pages + j / ps] as usize;
                                let v = deq(&cache.v, at(page, j % ps, g, dim), vs);
                                vmax = vmax.max(v.abs());
                                o += (s - m).exp() / denom * v;
                            }
                            // Tolerance: both sides are f64 computations of the same formula in
                            // different orders. Each score differs by at most `delta`
                            // ((d + 8)·u·Σ|terms|, doubled for the two sides); a softmax weight
                            // then by a relative 2·delta plus (kv + 8)·u for its exp, sum and
                            // division; the output, a sub-convex combination of values, by
                            // that times max|v|. Doubled again as slack for the first-order
                            // expansion (e^(2δ) − 1 ≤ 4δ for δ < 1/2).
                            let tol = 2.0 * (2.0 * delta + 2.0 * (kv as f64 + 8.0) * EPS) * vmax;
                            let r = got[(tok * num_heads + h) * d + dim];
                            check((r - o).abs() <= tol, || {
                                format!("decode seq {b} token {i} head {h} dim {dim}: {r} vs {o} (tol {tol:e})")
                            })?;
                        }
                    }
                }
            }
            // Rows that belong to no sequence stay 0.
            let mut owned = vec![false; c.num_tokens];
            for b in 0..c.batch() {
                for t in 0..c.q_len[b] as usize {
                    owned[c.q_start[b] as usize + t] = true;
                }
            }
            for (t, _) in owned.iter().enumerate().filter(|(_, &o)| !o) {
                let row = &got[t * num_heads * d..][..num_heads * d];
                check(row.iter().all(|&x| x == 0.0), || {
                    format!("unowned row {t} written")
                })?;
            }
            Ok(())
        },
    );
}
