//! The Burn extension on NdArray (CPU, runs in CI): fill, flatten and decode through
//! `KvCache<NdArray>` equal the reference API exactly on the shared case tables, for `none`,
//! `fp8_e4m3` and `fp8_e5m2` (f32 activations: NdArray has no half floats), and bad input gets
//! its own error.

use burn_ndarray::NdArray;
use burn_tensor::{DType, Tensor, TensorData};
use fp8kv::reference::{self, HostKvCache};
use fp8kv::testing::{decode_cases, fill_cases, PagedCase, Problem};
use fp8kv::CacheSpec;
use fp8kv::{AttentionOptions, FlattenLayout};
use fp8kv::{Dtype, Fp8KvError, KvSide, QuantPolicy};
use fp8kv_burn::{KvBatch, KvCache, KvCacheConfig};

type B = NdArray<f32>;

const POLICIES: [&str; 3] = ["none", "fp8_e4m3", "fp8_e5m2"];

fn device() -> burn_ndarray::NdArrayDevice {
    Default::default()
}

/// `rows` rows of `heads * dim` values, each `stride` apart in `data`, as `[rows, heads, dim]`.
fn tensor3(data: &[f32], rows: usize, heads: usize, dim: usize, stride: usize) -> Tensor<B, 3> {
    let mut packed = Vec::with_capacity(rows * heads * dim);
    for r in 0..rows {
        packed.extend_from_slice(&data[r * stride..][..heads * dim]);
    }
    Tensor::from_data(TensorData::new(packed, [rows, heads, dim]), &device())
}

fn values(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().expect("f32 tensor")
}

fn config(case: &PagedCase, policy: &str) -> KvCacheConfig {
    let layout = case.layout().unwrap();
    let cfg = KvCacheConfig::new(policy, layout).unwrap();
    cfg.with_scales(case.kv_scales(cfg.policy).unwrap())
}

/// A cache with every position of every sequence written through the extension (one prefill
/// fill of the whole history), and the same through the reference.
fn filled(case: &PagedCase, p: &Problem, policy: &str) -> (KvCache<B>, HostKvCache) {
    let cfg = config(case, policy);
    let mut cache = KvCache::<B>::new(&cfg, &device()).unwrap();
    let heads = p.layout.num_kv_heads();
    let total = p.total_kv_tokens();
    let (dk, dv) = (p.layout.head_dim_k(), p.layout.head_dim_v());
    let batch = KvBatch::<B>::new(p.prefill_meta.clone(), &p.layout, total, &device()).unwrap();
    cache
        .fill(
            tensor3(&p.hist_k, total, heads, dk, heads * dk),
            tensor3(&p.hist_v, total, heads, dv, heads * dv),
            &batch,
        )
        .unwrap();
    let want = p
        .full_cache(cfg.policy, cfg.cache_dtype().unwrap(), &cfg.scales, 0)
        .unwrap();
    (cache, want)
}

#[test]
fn fill_equals_reference_on_every_case_and_policy() {
    for case in fill_cases() {
        let p = Problem::generate(&case, Dtype::F32).unwrap();
        for policy in POLICIES {
            // The prefill of the whole history.
            let (cache, want) = filled(&case, &p, policy);
            assert!(
                cache.to_host().unwrap() == want,
                "{}/{policy}: prefill fill differs from the reference",
                case.name
            );
            // The step's new tokens alone (strided rows in the padded cases), into a fresh cache.
            let cfg = config(&case, policy);
            let mut cache = KvCache::<B>::new(&cfg, &device()).unwrap();
            let heads = p.layout.num_kv_heads();
            let batch =
                KvBatch::<B>::new(p.meta.clone(), &p.layout, p.num_tokens, &device()).unwrap();
            cache
                .fill(
                    tensor3(
                        &p.k_new,
                        p.num_tokens,
                        heads,
                        p.layout.head_dim_k(),
                        p.k_row_stride,
                    ),
                    tensor3(
                        &p.v_new,
                        p.num_tokens,
                        heads,
                        p.layout.head_dim_v(),
                        p.v_row_stride,
                    ),
                    &batch,
                )
                .unwrap();
            let mut want =
                CacheSpec::from_parts(p.layout, cfg.policy, cfg.cache_dtype().unwrap(), cfg.scales)
                    .and_then(|spec| HostKvCache::new(spec, 0))
                    .unwrap();
            reference::fill(&mut want, p.k_rows(), p.v_rows(), p.num_tokens, &p.meta).unwrap();
            let got = cache.to_host().unwrap();
            assert!(
                got == want,
                "{}/{policy}: step fill differs from the reference",
                case.name
            );
            // Something was written: the cache is not all zeros where the new tokens went.
            if p.num_tokens > 0 {
                assert!(
                    got.k.iter().any(|&b| b != 0),
                    "{}/{policy}: nothing written",
                    case.name
                );
            }
        }
    }
}

#[test]
fn flatten_equals_reference_on_every_case_policy_and_layout() {
    for case in fill_cases() {
        let p = Problem::generate(&case, Dtype::F32).unwrap();
        for policy in POLICIES {
            let (cache, want_cache) = filled(&case, &p, policy);
            let batch = KvBatch::<B>::for_reads(p.meta.clone(), &p.layout, &device()).unwrap();
            for layout in [FlattenLayout::Hsd, FlattenLayout::Shd] {
                let (k, v) = cache.flatten(&batch, layout, DType::F32).unwrap();
                let total = batch.total_kv_tokens();
                let heads = p.layout.num_kv_heads();
                let expect_dims = |d| match layout {
                    FlattenLayout::Hsd => [heads, total, d],
                    FlattenLayout::Shd => [total, heads, d],
                };
                assert_eq!(k.dims(), expect_dims(p.layout.head_dim_k()));
                assert_eq!(v.dims(), expect_dims(p.layout.head_dim_v()));
                let (wk, wv) =
                    reference::flatten(&want_cache, &p.meta, layout, Dtype::F32).unwrap();
                let (gk, gv) = (values(k), values(v));
                assert!(
                    gk.iter().zip(&wk).all(|(a, b)| a.to_bits() == b.to_bits())
                        && gk.len() == wk.len(),
                    "{}/{policy}/{layout:?}: flattened K differs",
                    case.name
                );
                assert!(
                    gv.iter().zip(&wv).all(|(a, b)| a.to_bits() == b.to_bits())
                        && gv.len() == wv.len(),
                    "{}/{policy}/{layout:?}: flattened V differs",
                    case.name
                );
            }
        }
    }
}

#[test]
fn decode_equals_reference_on_every_case_and_policy() {
    let with_options = AttentionOptions {
        window: Some(40),
        softcap: Some(30.0),
        ..Default::default()
    };
    for case in decode_cases() {
        let p = Problem::generate(&case, Dtype::F32).unwrap();
        for policy in POLICIES {
            let (cache, want_cache) = filled(&case, &p, policy);
            let batch =
                KvBatch::<B>::new(p.meta.clone(), &p.layout, p.num_tokens, &device()).unwrap();
            let mut sinks_alibi = AttentionOptions {
                sinks: Some((0..case.num_heads).map(|h| 0.5 - 0.1 * h as f32).collect()),
                alibi_slopes: Some((0..case.num_heads).map(|h| 0.01 * (h + 1) as f32).collect()),
                ..Default::default()
            };
            sinks_alibi.sm_scale = Some(0.07);
            for opts in [
                AttentionOptions::default(),
                with_options.clone(),
                sinks_alibi,
            ] {
                let q = tensor3(
                    &p.q,
                    p.num_tokens,
                    case.num_heads,
                    case.head_dim_k,
                    case.num_heads * case.head_dim_k,
                );
                let out = cache.decode(q, &batch, &opts).unwrap();
                assert_eq!(out.dims(), [p.num_tokens, case.num_heads, case.head_dim_v]);
                let want = reference::paged_decode(
                    &p.q,
                    case.num_heads,
                    &want_cache,
                    &p.meta,
                    p.num_tokens,
                    &opts,
                )
                .unwrap();
                let got = values(out);
                let bad = got
                    .iter()
                    .zip(&want)
                    .position(|(g, w)| g.to_bits() != (*w as f32).to_bits());
                assert!(
                    bad.is_none() && got.len() == want.len(),
                    "{}/{policy}/{opts:?}: decode differs at {bad:?}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn multi_layer_config_allocates_every_layer_and_reports_its_footprint() {
    let layout = fp8kv::PagedKvLayout::new(10, 16, 3, 64, 64, fp8kv::KvLayoutKind::Bshd).unwrap();
    let cfg = KvCacheConfig::new("fp8", layout)
        .unwrap()
        .with_layers(30)
        .unwrap();
    assert_eq!(cfg.policy, QuantPolicy::Fp8E4m3);
    let caches = cfg.init::<B>(&device()).unwrap();
    assert_eq!(caches.len(), 30);
    // 10 pages x 16 tokens x 3 heads x (64 + 64) dims x 1 byte, per layer.
    assert_eq!(caches[0].size_bytes(), 10 * 16 * 3 * 128);
    assert_eq!(cfg.size_bytes(), 30 * 10 * 16 * 3 * 128);
    let none = KvCacheConfig::new("none", layout).unwrap();
    assert_eq!(none.spec().unwrap().dtype(), Dtype::Bf16);
    assert_eq!(
        KvCache::<B>::new(&none, &device()).unwrap().size_bytes(),
        2 * 10 * 16 * 3 * 128
    );
    assert!(matches!(
        cfg.with_layers(0),
        Err(Fp8KvError::ZeroSize { .. })
    ));
    assert!(matches!(
        KvCacheConfig::new("int4", layout),
        Err(Fp8KvError::UnknownPolicy { .. })
    ));
    assert!(matches!(
        none.with_unquantized(Dtype::E4m3),
        Err(Fp8KvError::UnsupportedDtype(_))
    ));
}

#[test]
fn copy_blocks_copies_whole_pages_of_both_sides_and_nothing_else() {
    let case = fp8kv::testing::case(&fill_cases(), "prefill_page_edges").clone();
    let p = Problem::generate(&case, Dtype::F32).unwrap();
    for policy in POLICIES {
        let (mut cache, _) = filled(&case, &p, policy);
        let before = cache.to_host().unwrap();
        let num_pages = p.layout.num_pages();
        let pairs = [(0, num_pages - 1), (3, num_pages - 2)];
        cache.copy_blocks(&pairs).unwrap();
        let after = cache.to_host().unwrap();
        for side in [KvSide::K, KvSide::V] {
            let page_bytes = p.layout.tensor(side).page_stride * before.dtype().size_bytes();
            let page =
                |c: &HostKvCache, i: usize| c.bytes(side)[i * page_bytes..][..page_bytes].to_vec();
            for i in 0..num_pages {
                let want = match pairs.iter().find(|&&(_, d)| d == i) {
                    Some(&(s, _)) => page(&before, s),
                    None => page(&before, i),
                };
                assert!(
                    page(&after, i) == want,
                    "{policy}: page {i} of {side} is wrong"
                );
            }
        }
        let mut err = |pairs: &[(usize, usize)]| cache.copy_blocks(pairs).unwrap_err().to_string();
        assert!(err(&[(0, num_pages)]).contains("outside"));
        assert!(err(&[(0, 1), (2, 1)]).contains("destination of two pairs"));
        assert!(err(&[(0, 1), (1, 2)]).contains("both a source and a destination"));
    }
}

#[test]
fn bad_input_gets_its_own_error() {
    let case = fp8kv::testing::case(&decode_cases(), "spec_decode_4_tokens").clone();
    let p = Problem::generate(&case, Dtype::F32).unwrap();
    let (mut cache, _) = filled(&case, &p, "fp8");
    let (heads, dk) = (p.layout.num_kv_heads(), p.layout.head_dim_k());
    let batch = KvBatch::<B>::new(p.meta.clone(), &p.layout, p.num_tokens, &device()).unwrap();
    let q = || tensor3(&p.q, p.num_tokens, case.num_heads, dk, case.num_heads * dk);
    let kv = || tensor3(&p.k_new, p.num_tokens, heads, dk, p.k_row_stride);
    let opts = AttentionOptions::default();

    // Rank.
    let q2: Tensor<B, 2> = q().reshape([p.num_tokens as i32, -1]);
    assert!(matches!(
        cache.decode(q2, &batch, &opts),
        Err(Fp8KvError::WrongRank { what: "q", .. })
    ));
    let k2: Tensor<B, 2> = kv().reshape([p.num_tokens as i32, -1]);
    assert!(matches!(
        cache.fill(k2.clone(), k2, &batch),
        Err(Fp8KvError::WrongRank { what: "k_new", .. })
    ));
    // Shape: one token short, a head too many.
    let short = kv().slice(0..p.num_tokens - 1);
    assert!(matches!(
        cache.fill(short, kv(), &batch),
        Err(Fp8KvError::ShapeMismatch { what: "k_new", .. })
    ));
    let q_odd = tensor3(&p.q, p.num_tokens, 7, dk, case.num_heads * dk);
    assert!(matches!(
        cache.decode(q_odd, &batch, &opts),
        Err(Fp8KvError::HeadRatio { .. })
    ));
    // Dtype: f64 activations.
    let q64 = q().cast(DType::F64);
    assert!(matches!(
        cache.decode(q64, &batch, &opts),
        Err(Fp8KvError::UnsupportedDtype(_))
    ));
    assert!(matches!(
        cache.flatten(&batch, FlattenLayout::Hsd, DType::U8),
        Err(Fp8KvError::UnsupportedDtype(_))
    ));
    // A batch for reads only, a batch of another layout, metadata for another batch.
    let reads = KvBatch::<B>::for_reads(p.meta.clone(), &p.layout, &device()).unwrap();
    assert!(matches!(
        cache.fill(kv(), kv(), &reads),
        Err(Fp8KvError::InvalidOption(_))
    ));
    assert!(matches!(
        cache.decode(q(), &reads, &opts),
        Err(Fp8KvError::InvalidOption(_))
    ));
    let other_layout = fp8kv::PagedKvLayout::new(
        p.layout.num_pages() + 1,
        p.layout.page_size(),
        heads,
        dk,
        dk,
        p.layout.kind(),
    )
    .unwrap();
    let other = KvBatch::<B>::new(p.meta.clone(), &other_layout, p.num_tokens, &device()).unwrap();
    assert!(matches!(
        cache.decode(q(), &other, &opts),
        Err(Fp8KvError::ShapeMismatch {
            what: "cache layout",
            ..
        })
    ));
    let decode_meta = fp8kv::BatchMetadata::decode(
        vec![5],
        p.meta.block_table()[..p.meta.max_pages_per_seq()].to_vec(),
        p.meta.max_pages_per_seq(),
    )
    .unwrap();
    let one = KvBatch::<B>::new(decode_meta, &p.layout, 1, &device()).unwrap();
    assert!(matches!(
        cache.decode(q(), &one, &opts),
        Err(Fp8KvError::ShapeMismatch { what: "q", .. })
    ));
    // Metadata that does not fit the cache is refused when the batch is built.
    let mut table = p.meta.block_table().to_vec();
    table[0] = p.layout.num_pages() as i32;
    let bad = fp8kv::BatchMetadata::new(
        p.meta.q_start_loc().to_vec(),
        p.meta.q_seq_length().to_vec(),
        p.meta.kv_seqlens().to_vec(),
        table,
        p.meta.max_pages_per_seq(),
    )
    .unwrap();
    assert!(matches!(
        KvBatch::<B>::new(bad, &p.layout, p.num_tokens, &device()),
        Err(Fp8KvError::BlockTableOutOfRange { .. })
    ));
    // Options are validated against the head count.
    let sinks = AttentionOptions {
        sinks: Some(vec![0.0; 3]),
        ..Default::default()
    };
    assert!(matches!(
        cache.decode(q(), &batch, &sinks),
        Err(Fp8KvError::ShapeMismatch { what: "sinks", .. })
    ));
    // The cache still works after all of that.
    assert!(cache.decode(q(), &batch, &opts).is_ok());
}

#[test]
fn causal_attention_over_the_flattened_cache_equals_the_reference_decode() {
    // Chunked prefill reads the cache through flatten + causal_attention; decode through the
    // paged kernel. Both must compute the same attention (f32 against the f64 reference).
    for name in [
        "spec_decode_4_tokens",
        "chunked_prefill_history",
        "gqa7_d80_page64",
    ] {
        let case = fp8kv::testing::case(&decode_cases(), name).clone();
        let p = Problem::generate(&case, Dtype::F32).unwrap();
        for policy in POLICIES {
            let (cache, want_cache) = filled(&case, &p, policy);
            let batch =
                KvBatch::<B>::new(p.meta.clone(), &p.layout, p.num_tokens, &device()).unwrap();
            let (k, v) = cache
                .flatten(&batch, FlattenLayout::Shd, DType::F32)
                .unwrap();
            let q = tensor3(
                &p.q,
                p.num_tokens,
                case.num_heads,
                case.head_dim_k,
                case.num_heads * case.head_dim_k,
            );
            let want = reference::paged_decode(
                &p.q,
                case.num_heads,
                &want_cache,
                &p.meta,
                p.num_tokens,
                &AttentionOptions::default(),
            )
            .unwrap();
            let starts = batch.kv_start_loc();
            let row = case.num_heads * case.head_dim_v;
            for b in 0..p.meta.batch() {
                let q_len = p.meta.q_seq_length()[b] as usize;
                if q_len == 0 {
                    continue;
                }
                let q0 = p.meta.q_start_loc()[b] as usize;
                let out = fp8kv_burn::causal_attention(
                    q.clone().slice(q0..q0 + q_len),
                    k.clone().slice(starts[b]..starts[b + 1]),
                    v.clone().slice(starts[b]..starts[b + 1]),
                    None,
                )
                .unwrap();
                let got = values(out);
                // f32 dot products and sums over at most a few hundred terms of O(10) values:
                // a relative error of a few 1e-6 of the largest |value|; 1e-4 absolute covers it.
                for (i, g) in got.iter().enumerate() {
                    let w = want[q0 * row + i];
                    assert!(
                        (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{name}/{policy} seq {b} element {i}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn calibration_and_saturation_detect_data_of_large_range() {
    // K of range ±2000 and V of ±100000 (a large-range model): E4M3 at scale 1.0 clamps K past
    // 448, E5M2 clamps V past 57344; the calibrated scales are amax / MAX exactly.
    let layout = fp8kv::PagedKvLayout::new(4, 16, 2, 64, 64, fp8kv::KvLayoutKind::Bshd).unwrap();
    let n = 10;
    let k_vals: Vec<f32> = (0..n * 2 * 64)
        .map(|i| ((i % 41) as f32 - 20.0) * 100.0)
        .collect(); // ±2000
    let v_vals: Vec<f32> = (0..n * 2 * 64)
        .map(|i| ((i % 21) as f32 - 10.0) * 10000.0)
        .collect(); // ±100000
    let k = || Tensor::<B, 3>::from_data(TensorData::new(k_vals.clone(), [n, 2, 64]), &device());
    let v = || Tensor::<B, 3>::from_data(TensorData::new(v_vals.clone(), [n, 2, 64]), &device());
    let count = |vals: &[f32], limit: f32| vals.iter().filter(|x| x.abs() > limit).count() as u64;
    for (policy, max) in [("fp8_e4m3", 448.0f32), ("fp8_e5m2", 57344.0)] {
        let cfg = KvCacheConfig::new(policy, layout).unwrap();
        let mut cache = KvCache::<B>::new(&cfg, &device()).unwrap();
        let sat = cache.saturation(&k(), &v()).unwrap();
        assert_eq!(sat.k, count(&k_vals, max), "{policy} K");
        assert_eq!(sat.v, count(&v_vals, max), "{policy} V");
        assert!(
            sat.fraction() > 0.1,
            "{policy}: large-range data must show as saturated"
        );
        // The opt-in check warns on the first fill that saturates.
        cache.set_saturation_check(Some(0.001));
        let meta =
            fp8kv::BatchMetadata::new(vec![0], vec![n as i32], vec![n as i32], vec![0], 1).unwrap();
        let batch = KvBatch::<B>::new(meta, &layout, n, &device()).unwrap();
        cache.fill(k(), v(), &batch).unwrap();
        assert!(cache.saturation_warned(), "{policy}: no warning");
        // Calibrated scales: amax / MAX, and then nothing saturates.
        let scales = cache.calibrate(&k(), &v()).unwrap();
        assert_eq!(scales.k(), 2000.0 / max);
        assert_eq!(scales.v(), 100000.0 / max);
        cache.set_scales(scales);
        let after = cache.saturation(&k(), &v()).unwrap();
        assert_eq!(
            (after.k, after.v),
            (0, 0),
            "{policy}: calibrated scales still saturate"
        );
    }
    // The unquantized cache never saturates and calibrates to 1.0.
    let none = KvCache::<B>::new(&KvCacheConfig::new("none", layout).unwrap(), &device()).unwrap();
    assert_eq!(none.saturation(&k(), &v()).unwrap().k, 0);
    assert_eq!(
        none.calibrate(&k(), &v()).unwrap(),
        fp8kv::KvScales::default()
    );
}
