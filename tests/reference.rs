//! Properties of the CPU reference kernels on the shared case tables.

use fp8kv::reference::{self, flatten, paged_decode, HostKvCache};
use fp8kv::testing::{decode_cases, fill_cases, PagedCase, Problem};
use fp8kv::CacheSpec;
use fp8kv::{flatten_start_loc, AttentionOptions, FlattenLayout};
use fp8kv::{
    BatchMetadata, Dtype, Fp8KvError, KvLayoutKind, KvScales, KvSide, PagedKvLayout, QuantPolicy,
};

const POISON: u8 = 0xCD;

fn cache_dtypes() -> [(QuantPolicy, Dtype); 4] {
    [
        (QuantPolicy::None, Dtype::F16),
        (QuantPolicy::None, Dtype::Bf16),
        (QuantPolicy::Fp8E4m3, Dtype::E4m3),
        (QuantPolicy::Fp8E5m2, Dtype::E5m2),
    ]
}

fn act_for(cache: Dtype) -> Dtype {
    match cache {
        Dtype::F16 => Dtype::F16,
        _ => Dtype::Bf16,
    }
}

/// What the cache must hold for input `x`: the codec applied to `clamp(x / scale)` for FP8,
/// `x` itself for the unquantized cache (inputs are already in the activation dtype).
fn expected_dequant(dtype: Dtype, x: f32, scale: f32) -> f32 {
    match dtype.fp8_format() {
        Some(f) => f.decode(f.encode((x / scale).clamp(-f.max_finite(), f.max_finite()))) * scale,
        None => dtype.round_trip(x),
    }
}

#[test]
fn fill_then_flatten_equals_input_rounded_through_codec() {
    for case in fill_cases() {
        for (policy, dtype) in cache_dtypes() {
            let p = Problem::generate(&case, act_for(dtype)).unwrap();
            let scales = case.kv_scales(policy).unwrap();
            let cache = p.full_cache(policy, dtype, &scales, POISON).unwrap();
            for out_layout in [FlattenLayout::Hsd, FlattenLayout::Shd] {
                let (k, v) = flatten(&cache, &p.prefill_meta, out_layout, Dtype::F32).unwrap();
                let total = p.total_kv_tokens();
                let heads = case.num_kv_heads;
                for (side, out, src, scale) in [
                    (KvSide::K, &k, &p.hist_k, scales.k()),
                    (KvSide::V, &v, &p.hist_v, scales.v()),
                ] {
                    let d_len = p.layout.head_dim(side);
                    assert_eq!(out.len(), total * heads * d_len);
                    let mut bad = 0;
                    for t in 0..total {
                        for h in 0..heads {
                            let row = match out_layout {
                                FlattenLayout::Hsd => h * total + t,
                                FlattenLayout::Shd => t * heads + h,
                            };
                            for d in 0..d_len {
                                let want = expected_dequant(
                                    dtype,
                                    src[(t * heads + h) * d_len + d],
                                    scale,
                                );
                                if out[row * d_len + d].to_bits() != want.to_bits() {
                                    bad += 1;
                                }
                            }
                        }
                    }
                    assert_eq!(
                        bad, 0,
                        "{} {policy} {side} {out_layout:?}: {bad} elements differ",
                        case.name
                    );
                }
            }
        }
    }
}

#[test]
fn fill_touches_only_the_new_tokens_slots() {
    for case in fill_cases() {
        for (policy, dtype) in cache_dtypes() {
            let p = Problem::generate(&case, act_for(dtype)).unwrap();
            let scales = case.kv_scales(policy).unwrap();
            let mut cache = CacheSpec::from_parts(p.layout, policy, dtype, scales)
                .and_then(|spec| HostKvCache::new(spec, POISON))
                .unwrap();
            reference::fill(&mut cache, p.k_rows(), p.v_rows(), p.num_tokens, &p.meta).unwrap();
            let es = dtype.size_bytes();
            for side in [KvSide::K, KvSide::V] {
                let t = p.layout.tensor(side);
                let mut written = vec![false; p.layout.cache_elems(side)];
                for (b, s) in case.seqs.iter().enumerate() {
                    for pos in s.kv_len - s.q_len..s.kv_len {
                        let (page, slot) = p.meta.locate(b, pos, case.page_size);
                        for h in 0..case.num_kv_heads {
                            for d in 0..t.head_dim {
                                written[t.offset(page, slot, h) + d] = true;
                            }
                        }
                    }
                }
                let bytes = cache.bytes(side);
                for (e, &w) in written.iter().enumerate() {
                    if !w {
                        assert!(
                            bytes[e * es..(e + 1) * es].iter().all(|&b| b == POISON),
                            "{}: {side} element {e} was written",
                            case.name
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn fill_rejects_bad_input_with_typed_errors() {
    let case = &fill_cases()[1];
    let p = Problem::generate(case, Dtype::Bf16).unwrap();
    let scales = KvScales::default();
    let mut cache = CacheSpec::from_parts(p.layout, QuantPolicy::Fp8E4m3, Dtype::E4m3, scales)
        .and_then(|spec| HostKvCache::new(spec, 0))
        .unwrap();
    let short = fp8kv::reference::HostRows {
        data: &p.k_new[..10],
        row_stride: p.k_row_stride,
    };
    assert!(matches!(
        reference::fill(&mut cache, short, p.v_rows(), p.num_tokens, &p.meta),
        Err(Fp8KvError::ShapeMismatch { what: "k", .. })
    ));
    let narrow = fp8kv::reference::HostRows {
        data: &p.k_new,
        row_stride: 7,
    };
    assert!(matches!(
        reference::fill(&mut cache, narrow, p.v_rows(), p.num_tokens, &p.meta),
        Err(Fp8KvError::RowStride { what: "k", .. })
    ));
    assert!(matches!(
        reference::fill(
            &mut cache,
            p.k_rows(),
            p.v_rows(),
            p.num_tokens - 1,
            &p.meta
        ),
        Err(Fp8KvError::ShapeMismatch { .. }) | Err(Fp8KvError::QueryOutOfRange { .. })
    ));
    assert!(matches!(
        CacheSpec::from_parts(
            p.layout,
            QuantPolicy::Fp8E4m3,
            Dtype::Bf16,
            KvScales::default()
        )
        .and_then(|spec| HostKvCache::new(spec, 0)),
        Err(Fp8KvError::UnsupportedDtype(_))
    ));
}

#[test]
fn saturating_case_saturates_to_max_not_nan() {
    let case = fill_cases()
        .into_iter()
        .find(|c| c.name == "saturating_scales")
        .unwrap();
    for (policy, dtype) in cache_dtypes().into_iter().skip(2) {
        let p = Problem::generate(&case, Dtype::Bf16).unwrap();
        let scales = case.kv_scales(policy).unwrap();
        let cache = p.full_cache(policy, dtype, &scales, 0).unwrap();
        let (k, _) = flatten(&cache, &p.prefill_meta, FlattenLayout::Shd, Dtype::F32).unwrap();
        let max = policy.fp8_max().unwrap() * scales.k();
        let saturated = k.iter().filter(|x| x.abs() == max).count();
        assert!(
            saturated > 0,
            "{policy}: expected some values at ±MAX·scale"
        );
        assert!(
            k.iter().all(|x| x.is_finite()),
            "{policy}: saturation must not give NaN/inf"
        );
    }
}

/// Independent attention over contiguous `[tokens, kv_heads, d]` K/V of one sequence (f64).
#[allow(clippy::too_many_arguments)]
fn contiguous_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv_len: usize,
    q_len: usize,
    num_heads: usize,
    kv_heads: usize,
    dk: usize,
    dv: usize,
    opts: &AttentionOptions,
) -> Vec<f64> {
    let group = num_heads / kv_heads;
    let sm = opts.sm_scale.map_or(1.0 / (dk as f64).sqrt(), |s| s as f64);
    let mut out = vec![0f64; q_len * num_heads * dv];
    for i in 0..q_len {
        let p = kv_len - q_len + i;
        for h in 0..num_heads {
            let g = h / group;
            let keys: Vec<usize> = (0..=p)
                .filter(|&j| opts.window.is_none_or(|w| p - j < w))
                .collect();
            let logits: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    let mut s = 0f64;
                    for d in 0..dk {
                        s += q[(i * num_heads + h) * dk + d] as f64
                            * k[(j * kv_heads + g) * dk + d] as f64;
                    }
                    s *= sm;
                    if let Some(c) = opts.softcap {
                        s = c as f64 * (s / c as f64).tanh();
                    }
                    if let Some(a) = &opts.alibi_slopes {
                        s -= a[h] as f64 * (p - j) as f64;
                    }
                    s
                })
                .collect();
            let mut all = logits.clone();
            if let Some(s) = &opts.sinks {
                all.push(s[h] as f64);
            }
            let m = all.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = all.iter().map(|x| (x - m).exp()).sum();
            for (n, &j) in keys.iter().enumerate() {
                let w = (logits[n] - m).exp() / z;
                for d in 0..dv {
                    out[(i * num_heads + h) * dv + d] += w * v[(j * kv_heads + g) * dv + d] as f64;
                }
            }
        }
    }
    out
}

fn max_rel_err(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

fn option_sets(num_heads: usize) -> Vec<(&'static str, AttentionOptions)> {
    vec![
        ("plain", AttentionOptions::default()),
        (
            "window_7",
            AttentionOptions {
                window: Some(7),
                ..Default::default()
            },
        ),
        (
            "softcap_5",
            AttentionOptions {
                softcap: Some(5.0),
                sm_scale: Some(0.3),
                ..Default::default()
            },
        ),
        (
            "sinks",
            AttentionOptions {
                sinks: Some((0..num_heads).map(|h| h as f32 * 0.25 - 2.0).collect()),
                ..Default::default()
            },
        ),
        (
            "alibi",
            AttentionOptions {
                alibi_slopes: Some(
                    (0..num_heads)
                        .map(|h| 0.5f32.powi(h as i32 % 8 + 1))
                        .collect(),
                ),
                ..Default::default()
            },
        ),
    ]
}

#[test]
fn decode_over_fp8_cache_equals_attention_over_flattened_dequantized_cache() {
    for case in decode_cases() {
        for (policy, dtype) in cache_dtypes().into_iter().skip(1) {
            let p = Problem::generate(&case, Dtype::Bf16).unwrap();
            let scales = case.kv_scales(policy).unwrap();
            let cache = p.full_cache(policy, dtype, &scales, POISON).unwrap();
            let (k, v) = flatten(&cache, &p.prefill_meta, FlattenLayout::Shd, Dtype::F32).unwrap();
            let starts = flatten_start_loc(&p.prefill_meta);
            let (dk, dv, kvh, nh) = (
                case.head_dim_k,
                case.head_dim_v,
                case.num_kv_heads,
                case.num_heads,
            );
            // Every option with E4M3; plain attention with the other caches keeps the test quick.
            let sets = option_sets(nh)
                .into_iter()
                .filter(|(n, _)| policy == QuantPolicy::Fp8E4m3 || *n == "plain");
            for (opt_name, opts) in sets {
                let got = paged_decode(&p.q, nh, &cache, &p.meta, p.num_tokens, &opts).unwrap();
                for (b, s) in case.seqs.iter().enumerate() {
                    if s.q_len == 0 {
                        continue;
                    }
                    let t0 = p.meta.q_start_loc()[b] as usize;
                    let want = contiguous_attention(
                        &p.q[t0 * nh * dk..(t0 + s.q_len) * nh * dk],
                        &k[starts[b] * kvh * dk..],
                        &v[starts[b] * kvh * dv..],
                        s.kv_len,
                        s.q_len,
                        nh,
                        kvh,
                        dk,
                        dv,
                        &opts,
                    );
                    let got_b = &got[t0 * nh * dv..(t0 + s.q_len) * nh * dv];
                    let err = max_rel_err(got_b, &want);
                    // Flatten rounds each K·k_scale and V·v_scale to f32 (relative 2^-24 each) while
                    // paged_decode applies the scales in f64; logits here stay below ~100, so the
                    // relative difference stays under 100 · 2^-24 · a few ≈ 1e-5.
                    assert!(
                        err < 1e-5,
                        "{} {policy} {opt_name} seq {b}: rel err {err:e}",
                        case.name
                    );
                }
            }
        }
    }
}

/// Re-lays a problem's history into a cache where each sequence sits in one page, in order.
fn one_page_per_sequence(
    case: &PagedCase,
    p: &Problem,
    policy: QuantPolicy,
    dtype: Dtype,
    scales: &KvScales,
) -> (HostKvCache, BatchMetadata) {
    let max_len = case.seqs.iter().map(|s| s.kv_len).max().unwrap();
    let page_size = max_len.next_power_of_two().max(16);
    let layout = PagedKvLayout::new(
        case.seqs.len(),
        page_size,
        case.num_kv_heads,
        case.head_dim_k,
        case.head_dim_v,
        KvLayoutKind::Bshd,
    )
    .unwrap();
    let batch = case.seqs.len() as i32;
    let table: Vec<i32> = (0..batch).rev().collect(); // one page each, reversed order
    let kv: Vec<i32> = case.seqs.iter().map(|s| s.kv_len as i32).collect();
    let prefill = BatchMetadata::new(
        p.prefill_meta.q_start_loc().to_vec(),
        kv.clone(),
        kv.clone(),
        table.clone(),
        1,
    )
    .unwrap();
    let mut cache = CacheSpec::from_parts(layout, policy, dtype, *scales)
        .and_then(|spec| HostKvCache::new(spec, POISON))
        .unwrap();
    let rows_k = reference::HostRows {
        data: &p.hist_k,
        row_stride: case.num_kv_heads * case.head_dim_k,
    };
    let rows_v = reference::HostRows {
        data: &p.hist_v,
        row_stride: case.num_kv_heads * case.head_dim_v,
    };
    reference::fill(&mut cache, rows_k, rows_v, p.total_kv_tokens(), &prefill).unwrap();
    let step = BatchMetadata::new(
        p.meta.q_start_loc().to_vec(),
        p.meta.q_seq_length().to_vec(),
        kv,
        table,
        1,
    )
    .unwrap();
    (cache, step)
}

#[test]
fn decode_with_one_page_equals_decode_over_shuffled_pages() {
    for case in decode_cases() {
        for (policy, dtype) in [
            (QuantPolicy::Fp8E4m3, Dtype::E4m3),
            (QuantPolicy::None, Dtype::Bf16),
        ] {
            let p = Problem::generate(&case, Dtype::Bf16).unwrap();
            let scales = case.kv_scales(policy).unwrap();
            let paged = p.full_cache(policy, dtype, &scales, POISON).unwrap();
            let (single, step) = one_page_per_sequence(&case, &p, policy, dtype, &scales);
            let opts = AttentionOptions {
                window: Some(40),
                ..Default::default()
            };
            let a =
                paged_decode(&p.q, case.num_heads, &paged, &p.meta, p.num_tokens, &opts).unwrap();
            let b =
                paged_decode(&p.q, case.num_heads, &single, &step, p.num_tokens, &opts).unwrap();
            assert_eq!(a, b, "{} {policy}: paging changed the result", case.name);
        }
    }
}

#[test]
fn decode_rejects_bad_input_with_typed_errors() {
    let case = &decode_cases()[0];
    let p = Problem::generate(case, Dtype::Bf16).unwrap();
    let scales = case.kv_scales(QuantPolicy::Fp8E4m3).unwrap();
    let cache = p
        .full_cache(QuantPolicy::Fp8E4m3, Dtype::E4m3, &scales, 0)
        .unwrap();
    let run = |nh: usize, q: &[f32], opts: AttentionOptions| {
        paged_decode(q, nh, &cache, &p.meta, p.num_tokens, &opts)
    };
    assert!(matches!(
        run(30, &p.q, Default::default()),
        Err(Fp8KvError::HeadRatio { .. })
    ));
    assert!(matches!(
        run(case.num_heads, &p.q[1..], Default::default()),
        Err(Fp8KvError::ShapeMismatch { what: "q", .. })
    ));
    for bad in [
        AttentionOptions {
            window: Some(0),
            ..Default::default()
        },
        AttentionOptions {
            softcap: Some(-1.0),
            ..Default::default()
        },
        AttentionOptions {
            sm_scale: Some(f32::NAN),
            ..Default::default()
        },
        AttentionOptions {
            sinks: Some(vec![f32::INFINITY; case.num_heads]),
            ..Default::default()
        },
    ] {
        assert!(matches!(
            run(case.num_heads, &p.q, bad),
            Err(Fp8KvError::InvalidOption(_))
        ));
    }
    let wrong_len = AttentionOptions {
        alibi_slopes: Some(vec![0.1; 3]),
        ..Default::default()
    };
    assert!(matches!(
        run(case.num_heads, &p.q, wrong_len),
        Err(Fp8KvError::ShapeMismatch {
            what: "alibi_slopes",
            ..
        })
    ));
}
