//! The batch statistics kernel (`fp8kv::kernels::stats`): per-side amax and saturated counts
//! on the GPU equal the CPU definition exactly, on LLM-like rows with outliers, NaN and ±inf,
//! strided rows whose padding must not be read, MLA's uneven K/V widths, every activation
//! dtype, two calls accumulated into one buffer. Also the CPU definition on hand-made values,
//! and the fill kernel's opt-in statistics (`fill_with_stats`): the same bytes as the CPU
//! fill, the same statistics as the CPU definition over the rows it wrote.
//! The GPU tests skip visibly without CUDA (`FP8KV_REQUIRE_GPU=1` fails instead).

use fp8kv::device::{Cuda, DeviceBatch, DeviceRows, PagedKvCache};
use fp8kv::kernels::fill::fill_with_stats;
use fp8kv::kernels::stats::{kv_stats, reference_stats, DeviceKvStats, KvStats};
use fp8kv::reference::{self, HostKvCache};
use fp8kv::testing::{fill_cases, llm_like, Problem, Rng};
use fp8kv::CacheSpec;
use fp8kv::{Dtype, KvScales, KvSide, QuantPolicy};

#[test]
fn reference_stats_on_hand_made_values() {
    // E4M3 at scale 0.5: the limit is 448 · 0.5 = 224; K has a NaN (skipped), a value at the
    // limit (not over it) and -inf (counted, and the amax).
    let scales = KvScales::new(0.5, 2.0).unwrap();
    let k = [1.0, -224.0, f32::NAN, 224.5, 3.0, f32::NEG_INFINITY];
    let v = [-900.0, 897.0, 895.0, 0.0, 1.0, 2.0];
    let s = reference_stats(&k, &v, 2, (3, 3), (3, 3), &scales, QuantPolicy::Fp8E4m3);
    assert_eq!(
        s,
        KvStats {
            k_amax: f32::INFINITY,
            v_amax: 900.0,
            k_saturated: 2,
            v_saturated: 2,
        }
    );
    // A row stride above the row: the padding (the third value of each row) is not read.
    let s = reference_stats(&k, &v, 2, (2, 3), (2, 3), &scales, QuantPolicy::Fp8E5m2);
    assert_eq!((s.k_amax, s.v_amax), (224.5, 900.0));
    assert_eq!(
        (s.k_saturated, s.v_saturated),
        (0, 0),
        "E5M2's limit is 57344 · scale"
    );
    // The unquantized policy counts nothing; calibration then refuses the infinite K amax.
    let s = reference_stats(&k, &v, 2, (3, 3), (3, 3), &scales, QuantPolicy::None);
    assert_eq!((s.k_saturated, s.v_saturated), (0, 0));
    assert!(s.calibrate(QuantPolicy::Fp8E4m3).is_err());
}

/// `rows` rows of `heads × dim` LLM-like values (outliers ×`gain`), `pad` elements of padding
/// after each holding a value far above the rest, and a few NaN / ±inf placed by `rng`.
fn rows_with_specials(
    rng: &mut Rng,
    rows: usize,
    width: usize,
    pad: usize,
    gain: f64,
    act: Dtype,
) -> Vec<f32> {
    let body = llm_like(rng, rows, 1, width, gain, act);
    let mut out = Vec::with_capacity(rows * (width + pad));
    for r in 0..rows {
        out.extend_from_slice(&body[r * width..][..width]);
        out.extend(std::iter::repeat_n(act.round_trip(30000.0), pad));
    }
    for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
        if rng.below(2) == 0 {
            let (r, c) = (rng.below(rows), rng.below(width));
            out[r * (width + pad) + c] = special;
        }
    }
    out
}

#[test]
fn gpu_kv_stats_equal_the_cpu_definition() {
    let Some(client) = fp8kv::testing::client_or_skip("gpu_kv_stats_equal_the_cpu_definition")
    else {
        return;
    };
    // (rows, K width, V width, padding): Llama-3-8B rows strided as in a fused QKV output,
    // MLA's 576 / 512, a single short row.
    let shapes = [(300, 1024, 1024, 64), (37, 576, 512, 0), (1, 64, 64, 8)];
    let mut checked = 0;
    for act in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
        for (i, &(rows, kw, vw, pad)) in shapes.iter().enumerate() {
            for policy in [
                QuantPolicy::Fp8E4m3,
                QuantPolicy::Fp8E5m2,
                QuantPolicy::None,
            ] {
                let mut rng = Rng::from_name(&format!("stats/{act}/{i}/{policy:?}"));
                // Scales that saturate K's outlier channels under E4M3 (448 · 0.03 = 13.4).
                let scales = match policy {
                    QuantPolicy::Fp8E5m2 => KvScales::new(2e-4, 1e-4).unwrap(),
                    _ => KvScales::new(0.03, 0.02).unwrap(),
                };
                let mut acc = DeviceKvStats::<Cuda>::new(&client);
                let mut want: Option<KvStats> = None;
                // Two calls into one accumulator: maxima and sums across calls.
                for call in 0..2 {
                    let gain = if call == 0 { 12.0 } else { 20.0 };
                    let k = rows_with_specials(&mut rng, rows, kw, pad, gain, act);
                    let v = rows_with_specials(&mut rng, rows, vw, pad, 4.0, act);
                    let dk = DeviceRows::from_f32(&client, &k, act, rows, kw, kw + pad).unwrap();
                    let dv = DeviceRows::from_f32(&client, &v, act, rows, vw, vw + pad).unwrap();
                    kv_stats(&mut acc, &dk, &dv, &scales, policy).unwrap();
                    let r = reference_stats(
                        &k,
                        &v,
                        rows,
                        (kw, kw + pad),
                        (vw, vw + pad),
                        &scales,
                        policy,
                    );
                    want = Some(match want {
                        None => r,
                        Some(w) => KvStats {
                            k_amax: w.k_amax.max(r.k_amax),
                            v_amax: w.v_amax.max(r.v_amax),
                            k_saturated: w.k_saturated + r.k_saturated,
                            v_saturated: w.v_saturated + r.v_saturated,
                        },
                    });
                }
                let want = want.unwrap();
                let got = acc.read().unwrap();
                assert_eq!(
                    got, want,
                    "{act} rows {rows} K {kw} V {vw} pad {pad} {policy:?}"
                );
                if policy == QuantPolicy::Fp8E4m3 && rows > 1 {
                    assert!(want.k_saturated > 0, "the case must saturate something");
                }
                checked += 1;
            }
        }
    }
    println!("kv_stats: {checked} (dtype, shape, policy) cases equal the CPU definition");
}

/// The statistics of the rows a batch writes, by the CPU definition: each sequence's
/// `q_seq_length` rows from `q_start_loc` (rows of no sequence are not counted).
fn written_rows_stats(p: &Problem, scales: &KvScales, policy: QuantPolicy) -> KvStats {
    let heads = p.layout.num_kv_heads();
    let (kw, vw) = (heads * p.layout.head_dim_k(), heads * p.layout.head_dim_v());
    let mut acc = KvStats {
        k_amax: 0.0,
        v_amax: 0.0,
        k_saturated: 0,
        v_saturated: 0,
    };
    for b in 0..p.meta.batch() {
        let (start, len) = (
            p.meta.q_start_loc()[b] as usize,
            p.meta.q_seq_length()[b] as usize,
        );
        let r = reference_stats(
            &p.k_new[start * p.k_row_stride..],
            &p.v_new[start * p.v_row_stride..],
            len,
            (kw, p.k_row_stride),
            (vw, p.v_row_stride),
            scales,
            policy,
        );
        acc = KvStats {
            k_amax: acc.k_amax.max(r.k_amax),
            v_amax: acc.v_amax.max(r.v_amax),
            k_saturated: acc.k_saturated + r.k_saturated,
            v_saturated: acc.v_saturated + r.v_saturated,
        };
    }
    acc
}

/// Cache bytes equal, except that the cache may hold any NaN code where the reference holds
/// one: the hardware converts return their own NaN (CUDA's f32 → bf16 gives 0x7FFF, the FP8
/// convert a NaN code of its choosing), the CPU keeps the sign (and the bf16 payload); the
/// fill docs promise a NaN, not its bits.
fn same_codes(dtype: Dtype, got: &[u8], want: &[u8]) -> bool {
    if let Some(format) = dtype.fp8_format() {
        let nan = |c: u8| format.decode(c).is_nan();
        return got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(&g, &w)| g == w || (nan(g) && nan(w)));
    }
    if dtype != Dtype::Bf16 {
        return got == want;
    }
    let nan = |w: u16| w & 0x7F80 == 0x7F80 && w & 0x007F != 0;
    got.len() == want.len()
        && got.chunks_exact(2).zip(want.chunks_exact(2)).all(|(g, w)| {
            let (g, w) = (
                u16::from_le_bytes([g[0], g[1]]),
                u16::from_le_bytes([w[0], w[1]]),
            );
            g == w || (nan(g) && nan(w))
        })
}

/// `fill_with_stats` writes the same bytes as the CPU reference fill (poisoned cache, no
/// other byte touched; NaN payloads aside in the bf16 cache) and adds to the accumulator exactly the CPU definition's statistics
/// over the rows it wrote: every fill case, FP8 caches and the bf16 cache, bf16 and f32
/// activations, NaN and ±inf planted, at scales that clamp K's outliers and at scale 1.0
/// over data of large range (×1000: E4M3's 448 is exceeded, which the count must show).
#[test]
fn gpu_fill_with_stats_writes_the_same_codes_and_counts_what_it_clamped() {
    let Some(client) = fp8kv::testing::client_or_skip(
        "gpu_fill_with_stats_writes_the_same_codes_and_counts_what_it_clamped",
    ) else {
        return;
    };
    const POISON: u8 = 0xCD;
    let mut checked = 0;
    let mut detected_at_unit_scale = 0;
    for case in fill_cases() {
        for act in [Dtype::Bf16, Dtype::F32] {
            for (policy, dtype) in [
                (QuantPolicy::Fp8E4m3, Dtype::E4m3),
                (QuantPolicy::Fp8E5m2, Dtype::E5m2),
                (QuantPolicy::None, Dtype::Bf16),
            ] {
                for large_range in [false, true] {
                    let mut p = Problem::generate(&case, act).unwrap();
                    let scales = if large_range {
                        for x in p.k_new.iter_mut().chain(p.v_new.iter_mut()) {
                            *x = act.round_trip(*x * 1000.0);
                        }
                        KvScales::default()
                    } else if policy == QuantPolicy::Fp8E5m2 {
                        KvScales::new(1e-4, 2e-4).unwrap()
                    } else {
                        KvScales::new(0.01, 0.005).unwrap()
                    };
                    // Specials in the first sequence's first new row (NaN padding elsewhere
                    // must never be read).
                    let s0 = p.meta.q_start_loc()[0] as usize;
                    for (i, x) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
                        .iter()
                        .enumerate()
                    {
                        p.k_new[s0 * p.k_row_stride + i] = *x;
                        p.v_new[s0 * p.v_row_stride + 2 * i] = *x;
                    }
                    let poisoned = CacheSpec::from_parts(p.layout, policy, dtype, scales)
                        .and_then(|spec| HostKvCache::new(spec, POISON))
                        .unwrap();
                    let mut want = poisoned.clone();
                    reference::fill(&mut want, p.k_rows(), p.v_rows(), p.num_tokens, &p.meta)
                        .unwrap();
                    let heads = p.layout.num_kv_heads();
                    let (kw, vw) = (heads * p.layout.head_dim_k(), heads * p.layout.head_dim_v());
                    let mut cache = PagedKvCache::from_host(&client, &poisoned).unwrap();
                    let k = DeviceRows::from_f32(
                        &client,
                        &p.k_new,
                        act,
                        p.num_tokens,
                        kw,
                        p.k_row_stride,
                    )
                    .unwrap();
                    let v = DeviceRows::from_f32(
                        &client,
                        &p.v_new,
                        act,
                        p.num_tokens,
                        vw,
                        p.v_row_stride,
                    )
                    .unwrap();
                    let batch =
                        DeviceBatch::new(&client, p.meta.clone(), &p.layout, p.num_tokens).unwrap();
                    let mut acc = DeviceKvStats::<Cuda>::new(&client);
                    fill_with_stats(&mut cache, &k, &v, &batch, &mut acc).unwrap();
                    let what = format!("{} {act} {policy} large range {large_range}", case.name);
                    let got = cache.to_host().unwrap();
                    for side in [KvSide::K, KvSide::V] {
                        assert!(
                            same_codes(dtype, got.bytes(side), want.bytes(side)),
                            "{what} {side}: the cache differs from the reference fill"
                        );
                    }
                    let want_stats = written_rows_stats(&p, &scales, policy);
                    assert_eq!(acc.read().unwrap(), want_stats, "{what}");
                    assert!(want_stats.k_amax.is_infinite(), "{what}: +inf was planted");
                    if policy != QuantPolicy::None
                        && (!large_range || policy == QuantPolicy::Fp8E4m3)
                    {
                        // ±inf always count; the finite data must clamp too (at scale 1.0
                        // only E4M3's range is exceeded by ×1000 data).
                        assert!(want_stats.k_saturated > 2, "{what}: nothing clamped");
                    }
                    if large_range && policy == QuantPolicy::Fp8E4m3 {
                        detected_at_unit_scale += 1;
                    }
                    checked += 1;
                }
            }
        }
    }
    println!(
        "fill_with_stats: {checked} (case, dtype, policy, range) runs equal the CPU fill and \
         statistics; E4M3 at scale 1.0 over ×1000 data flagged in {detected_at_unit_scale}"
    );
}
