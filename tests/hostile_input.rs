//! Hostile input on the host-side entry points: each test is a regression test for a gap that
//! used to panic, overflow or silently accept bad input, plus the documented behaviour of
//! non-finite activations (NaN / ±inf) through fill, flatten and decode on the CPU reference.
//! (The device entry points' checks run on the offline runtime in `xtask`'s entry checks.)

use fp8kv::device::check_batch_buffer_len;
use fp8kv::reference::{self, quantize_value, HostKvCache, HostRows};
use fp8kv::CacheSpec;
use fp8kv::{AttentionOptions, FlattenLayout};
use fp8kv::{
    BatchMetadata, Dtype, Fp8Format, Fp8KvError, KvLayoutKind, KvScales, PagedKvLayout, QuantPolicy,
};

fn layout(num_pages: usize, page_size: usize, heads: usize, d: usize) -> PagedKvLayout {
    PagedKvLayout::new(num_pages, page_size, heads, d, d, KvLayoutKind::Bshd).unwrap()
}

fn rows(data: &[f32], row_stride: usize) -> HostRows<'_> {
    HostRows { data, row_stride }
}

fn too_large(r: Result<impl std::fmt::Debug, Fp8KvError>, what: &str) {
    match r {
        Err(Fp8KvError::TooLarge { what: w, .. }) => assert_eq!(w, what),
        other => panic!("expected TooLarge {{ what: {what:?} }}, got {other:?}"),
    }
}

// ---- Sizes that overflow usize or the kernels' 32-bit strides -------------------------------

#[test]
fn layout_pages_past_32_bit_strides_are_too_large() {
    // A page of page_size x heads x head_dim elements must stay below 2^31 (the kernels'
    // comptime strides are u32 and get multiplied by the 2-byte element size).
    for (page_size, heads) in [(1usize << 25, 1usize), (1 << 24, 2), (16, 1 << 27)] {
        too_large(
            PagedKvLayout::new(1, page_size, heads, 64, 64, KvLayoutKind::Bshd),
            "cache page elements",
        );
    }
    // 2^24 x 1 x 64 = 2^30 elements is fine.
    let l = layout(1, 1 << 24, 1, 64);
    assert_eq!(l.cache_elems(fp8kv::KvSide::K), 1 << 30);
    // Used to be accepted with every size method wrapping: 2^62 tokens per page.
    too_large(
        PagedKvLayout::new(1, 1 << 62, 1, 64, 64, KvLayoutKind::Bshd),
        "cache page elements",
    );
    too_large(
        PagedKvLayout::new(1, 16, usize::MAX, 64, 64, KvLayoutKind::Bhsd),
        "cache page elements",
    );
}

#[test]
fn layout_whose_bytes_overflow_usize_is_too_large() {
    too_large(
        PagedKvLayout::new(usize::MAX, 16, 1, 64, 64, KvLayoutKind::Bshd),
        "k + v cache bytes",
    );
    too_large(
        PagedKvLayout::new(1 << 48, 16, 8, 128, 128, KvLayoutKind::Bshd),
        "k + v cache bytes",
    );
    // 2^40 pages of 16 x 8 x 128: every size method is exact.
    let l = layout(1 << 40, 16, 8, 128);
    assert_eq!(l.cache_elems(fp8kv::KvSide::V), 1 << 54);
    assert_eq!(l.cache_bytes(QuantPolicy::None), 1 << 56);
    assert_eq!(l.cache_bytes(QuantPolicy::Fp8E4m3), 1 << 55);
}

#[test]
fn block_table_size_overflow_is_too_large_not_a_later_panic() {
    // batch 2 x 2^63 columns wrapped to 0 = the empty table's length: accepted, and then
    // validate_reads panicked slicing the table at 2^63.
    too_large(
        BatchMetadata::new(vec![0, 0], vec![0, 0], vec![0, 0], vec![], 1 << 63),
        "block_table (batch x max_pages_per_seq)",
    );
    too_large(
        BatchMetadata::new(vec![0; 3], vec![0; 3], vec![0; 3], vec![], usize::MAX),
        "block_table (batch x max_pages_per_seq)",
    );
    too_large(
        BatchMetadata::decode(vec![0, 0], vec![], 1 << 63),
        "block_table (batch x max_pages_per_seq)",
    );
}

#[test]
fn host_rows_whose_span_overflows_are_too_large() {
    // (2^58 + 1 - 1) x 64 + 64 wrapped to 64: one row of data passed the check for 2^58 + 1
    // rows, and fill then indexed row 1 of it and panicked.
    let l = layout(1, 16, 1, 64);
    let meta = BatchMetadata::new(vec![1], vec![1], vec![1], vec![0], 1).unwrap();
    let mut cache =
        CacheSpec::from_parts(l, QuantPolicy::Fp8E4m3, Dtype::E4m3, KvScales::default())
            .and_then(|spec| HostKvCache::new(spec, 0))
            .unwrap();
    let data = [0.5f32; 64];
    let rows = HostRows {
        data: &data,
        row_stride: 64,
    };
    let r = reference::fill(&mut cache, rows, rows, (1 << 58) + 1, &meta);
    too_large(r, "host rows span");
}

#[test]
fn decode_whose_query_size_overflows_is_too_large() {
    // 2^58 tokens x 1 head x 64 wrapped to 0, so an empty q passed the length check and the
    // query rows were then read out of it.
    let l = layout(1, 16, 1, 64);
    let cache = CacheSpec::from_parts(l, QuantPolicy::Fp8E4m3, Dtype::E4m3, KvScales::default())
        .and_then(|spec| HostKvCache::new(spec, 0))
        .unwrap();
    let meta = BatchMetadata::new(vec![0], vec![1], vec![1], vec![0], 1).unwrap();
    let r = reference::paged_decode(&[], 1, &cache, &meta, 1 << 58, &AttentionOptions::default());
    too_large(r, "q elements");
}

#[test]
fn host_cache_the_host_cannot_allocate_is_too_large() {
    // 2^59 bytes per side: a valid layout (its sizes fit usize) but not an allocation.
    let l = layout(1 << 44, 16, 8, 128);
    too_large(
        CacheSpec::from_parts(l, QuantPolicy::None, Dtype::Bf16, KvScales::default())
            .and_then(|spec| HostKvCache::new(spec, 0)),
        "host k cache bytes",
    );
}

#[test]
fn batch_buffers_past_32_bit_indices_are_too_large() {
    check_batch_buffer_len(0, 0).unwrap();
    check_batch_buffer_len(1, 100).unwrap();
    // 4 x batch + 1 + batch x max_pages: 65535 x (65536 + 4) + 1 > 2^32 - 1.
    too_large(
        check_batch_buffer_len(65535, 65536),
        "batch metadata buffer (i32 elements)",
    );
    // Exactly at the limit: batch 1, 4 + 1 + max_pages = 2^32 - 1.
    check_batch_buffer_len(1, u32::MAX as usize - 5).unwrap();
    too_large(
        check_batch_buffer_len(1, u32::MAX as usize - 4),
        "batch metadata buffer (i32 elements)",
    );
    too_large(
        check_batch_buffer_len(usize::MAX, usize::MAX),
        "batch metadata buffer (i32 elements)",
    );
}

#[test]
fn split_plans_are_total_for_any_input() {
    use fp8kv::internals::{SplitPlan, TILE_TOKENS};
    // Rounding usize::MAX up to whole tiles wrapped to 0 and then divided by it.
    let p = SplitPlan::with_split_tokens(usize::MAX, 100).unwrap();
    assert_eq!((p.num_splits, p.split_tokens), (1, 128));
    let p = SplitPlan::with_split_tokens(usize::MAX - 7, 1 << 20).unwrap();
    assert_eq!((p.num_splits, p.split_tokens), (1, 1 << 20));
    too_large(SplitPlan::with_split_tokens(64, usize::MAX), "max_kv_len");
    // SM count x residency overflowed to a zero wave size; a huge context overflowed the
    // rounding. The plan still covers every token (of the longest possible i32 sequence).
    for (base, kv, sms, resident) in [
        (1, usize::MAX, 132, 3),
        (usize::MAX, 4096, 1 << 32, 1 << 32),
        (0, 0, 0, 0),
    ] {
        let p = SplitPlan::new(base, kv, sms, resident);
        let covered = kv.clamp(1, i32::MAX as usize);
        assert!(p.num_splits >= 1 && p.split_tokens.is_multiple_of(TILE_TOKENS));
        assert!(p.num_splits * p.split_tokens >= covered, "{p:?}");
    }
}

// ---- Buffers replaced behind the cache's back ----------------------------------------------

#[test]
fn host_cache_with_resized_buffers_is_a_shape_mismatch() {
    let l = layout(2, 16, 1, 64);
    let meta = BatchMetadata::new(vec![0], vec![1], vec![1], vec![1, -1], 2).unwrap();
    let scales = KvScales::default();
    let data = [0.25f32; 64];
    let rows = HostRows {
        data: &data,
        row_stride: 64,
    };
    for (short_k, what) in [(true, "host k cache bytes"), (false, "host v cache bytes")] {
        let mut cache = CacheSpec::from_parts(l, QuantPolicy::Fp8E5m2, Dtype::E5m2, scales)
            .and_then(|spec| HostKvCache::new(spec, 0))
            .unwrap();
        if short_k {
            cache.k.pop();
        } else {
            cache.v.push(0);
        }
        let shape = |r: Result<(), Fp8KvError>| match r {
            Err(Fp8KvError::ShapeMismatch { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{what}: {other:?}"),
        };
        shape(cache.check_shape());
        shape(reference::fill(&mut cache.clone(), rows, rows, 1, &meta));
        shape(reference::flatten(&cache, &meta, FlattenLayout::Shd, Dtype::F32).map(|_| ()));
        shape(reference::paged_decode(&data, 1, &cache, &meta, 1, &Default::default()).map(|_| ()));
    }
}

// ---- Metadata edge cases that are accepted by design -----------------------------------------

#[test]
fn query_spans_need_not_be_in_batch_order() {
    // Sequence 0's new token is packed after sequence 1's three: disjoint, so valid, and fill
    // takes each sequence's rows from its own q_start_loc.
    let l = layout(2, 16, 1, 64);
    let meta = BatchMetadata::new(vec![3, 0], vec![1, 3], vec![2, 3], vec![0, 1], 1).unwrap();
    meta.validate(&l, 4).unwrap();
    let data: Vec<f32> = (0..4 * 64).map(|i| (i / 64) as f32 + 1.0).collect();
    let rows = HostRows {
        data: &data,
        row_stride: 64,
    };
    let scales = KvScales::default();
    let mut cache = CacheSpec::from_parts(l, QuantPolicy::None, Dtype::F16, scales)
        .and_then(|spec| HostKvCache::new(spec, 0))
        .unwrap();
    reference::fill(&mut cache, rows, rows, 4, &meta).unwrap();
    // Sequence 0, position 1 (page 0, slot 1) holds row 3 (value 4.0); sequence 1's
    // positions 0..3 (page 1) hold rows 0..3 (1.0, 2.0, 3.0). f16 bits: 4.0 = 0x4400.
    let f16_at = |page: usize, slot: usize| {
        let off = (page * 16 + slot) * 64 * 2;
        u16::from_le_bytes([cache.k[off], cache.k[off + 1]])
    };
    assert_eq!(f16_at(0, 1), 0x4400);
    assert_eq!(
        [f16_at(1, 0), f16_at(1, 1), f16_at(1, 2)],
        [0x3C00, 0x4000, 0x4200]
    );
}

#[test]
fn query_end_past_i32_is_out_of_range_not_an_overflow() {
    let l = layout(2, 16, 1, 64);
    let meta = BatchMetadata::new(vec![i32::MAX], vec![2], vec![2], vec![0], 1).unwrap();
    match meta.validate(&l, 4) {
        Err(Fp8KvError::QueryOutOfRange {
            seq: 0,
            start,
            end,
            num_tokens: 4,
        }) => assert_eq!((start, end), (i32::MAX as i64, i32::MAX as i64 + 2)),
        other => panic!("{other:?}"),
    }
}

// ---- Non-finite activations -----------------------------------------------------------------

/// Inputs with every kind of non-finite and beyond-MAX value, then two ordinary ones.
fn special_row() -> [f32; 8] {
    [
        f32::NAN,
        f32::from_bits(0xFFC0_0000), // -NaN
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e30,
        -1e30,
        0.5,
        -0.5,
    ]
}

/// One sequence whose single new token is written at page 0, slot 0: element `d` of head 0 is
/// byte `d` (times the element size) of each side.
fn fill_one_row(policy: QuantPolicy, dtype: Dtype, k: &[f32], v: &[f32]) -> HostKvCache {
    let l = layout(1, 16, 1, 64);
    let meta = BatchMetadata::new(vec![0], vec![1], vec![1], vec![0], 1).unwrap();
    let scales = KvScales::new(0.5, 0.25).unwrap();
    let mut cache = CacheSpec::from_parts(l, policy, dtype, scales)
        .and_then(|spec| HostKvCache::new(spec, 0x55))
        .unwrap();
    let pad = |x: &[f32]| {
        let mut r = x.to_vec();
        r.resize(64, 0.0);
        r
    };
    let (k, v) = (pad(k), pad(v));
    reference::fill(&mut cache, rows(&k, 64), rows(&v, 64), 1, &meta).unwrap();
    cache
}

#[test]
fn nan_stores_the_nan_code_and_inf_saturates_to_max() {
    // Codes written by hand from the OCP formats. ±0.5 / 0.5 = ±1.0: E4M3 exponent 7 → 0x38,
    // E5M2 exponent 15 → 0x3C; ±0.5 / 0.25 = ±2.0: 0x40 in both.
    let cases = [
        (
            QuantPolicy::Fp8E4m3,
            Dtype::E4m3,
            [0x7F, 0xFF, 0x7E, 0xFE, 0x7E, 0xFE, 0x38, 0xB8],
            [0x7F, 0xFF, 0x7E, 0xFE, 0x7E, 0xFE, 0x40, 0xC0],
        ),
        (
            QuantPolicy::Fp8E5m2,
            Dtype::E5m2,
            [0x7E, 0xFE, 0x7B, 0xFB, 0x7B, 0xFB, 0x3C, 0xBC],
            [0x7E, 0xFE, 0x7B, 0xFB, 0x7B, 0xFB, 0x40, 0xC0],
        ),
    ];
    let row = special_row();
    for (policy, dtype, k_codes, v_codes) in cases {
        let cache = fill_one_row(policy, dtype, &row, &row);
        assert_eq!(&cache.k[..8], &k_codes, "{dtype} k");
        assert_eq!(&cache.v[..8], &v_codes, "{dtype} v");
        // The software codec, element by element, says the same.
        let format = dtype.fp8_format().unwrap();
        for (i, &x) in row.iter().enumerate() {
            assert_eq!(fp8kv::fp8::quant(format, x, 0.5), k_codes[i], "{dtype} {x}");
            assert_eq!(
                quantize_value(dtype, x, 0.25),
                v_codes[i] as u32,
                "{dtype} {x}"
            );
        }
        // float8 (CUDA's saturating software conversion) agrees on the non-NaN ones.
        for (i, &x) in row.iter().enumerate().skip(2) {
            let theirs = match format {
                Fp8Format::E4m3 => cubecl::e4m3::from_f32(x / 0.5).to_bits(),
                Fp8Format::E5m2 => cubecl::e5m2::from_f32(x / 0.5).to_bits(),
            };
            assert_eq!(theirs, k_codes[i], "{dtype} {x}");
        }
        // Flatten: NaN · scale is NaN, the saturated codes are ±MAX · scale.
        let meta = BatchMetadata::new(vec![0], vec![1], vec![1], vec![0], 1).unwrap();
        // `fill_one_row` built the cache with scales 0.5 / 0.25.
        let (k, _) = reference::flatten(&cache, &meta, FlattenLayout::Shd, Dtype::F32).unwrap();
        let max = format.max_finite() * 0.5;
        assert!(k[0].is_nan() && k[1].is_nan(), "{dtype}");
        assert_eq!(&k[2..6], &[max, -max, max, -max], "{dtype}");
    }
}

#[test]
fn unquantized_cache_stores_nan_and_inf_as_they_are() {
    let row = special_row();
    // f16: NaN keeps a NaN pattern and its sign; ±inf → 0x7C00 / 0xFC00; ±1e30 overflows
    // f16 to ±inf; ±0.5 → 0x3800 / 0xB800 (scales are not applied to this cache).
    let cache = fill_one_row(QuantPolicy::None, Dtype::F16, &row, &row);
    let h: Vec<u16> = cache.k[..16]
        .chunks(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert!(
        h[0] & 0x7FFF > 0x7C00 && h[0] & 0x8000 == 0,
        "{:#06x}",
        h[0]
    );
    assert!(
        h[1] & 0x7FFF > 0x7C00 && h[1] & 0x8000 != 0,
        "{:#06x}",
        h[1]
    );
    assert_eq!(&h[2..], &[0x7C00, 0xFC00, 0x7C00, 0xFC00, 0x3800, 0xB800]);
    // bf16 has f32's range: ±1e30 stays finite (1e30 is f32 0x7149_F2CA; its low half
    // 0xF2CA is above 0x8000, so it rounds up to bf16 0x714A).
    let cache = fill_one_row(QuantPolicy::None, Dtype::Bf16, &row, &row);
    let b: Vec<u16> = cache.k[..16]
        .chunks(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert!(b[0] & 0x7FFF > 0x7F80 && b[1] & 0x8000 != 0);
    assert_eq!(&b[2..], &[0x7F80, 0xFF80, 0x714A, 0xF14A, 0x3F00, 0xBF00]);
}

/// A 5-token sequence (2 KV heads, 4 query heads, d64, E4M3, scales 1) whose token 1 holds
/// `k1` / `v1` in head `head` (other tokens: K = V = 0.5 everywhere), and the decode output
/// `[4 heads, 64]` of one query at position 4 with `window`.
fn decode_with_token1(
    head: usize,
    k1: &dyn Fn(usize) -> f32,
    v1: &dyn Fn(usize) -> f32,
    window: Option<usize>,
) -> Vec<f64> {
    let (kv_heads, d, tokens) = (2, 64, 5);
    let l = layout(1, 16, kv_heads, d);
    let mut hist_k = vec![0.5f32; tokens * kv_heads * d];
    let mut hist_v = hist_k.clone();
    for i in 0..d {
        hist_k[(kv_heads + head) * d + i] = k1(i);
        hist_v[(kv_heads + head) * d + i] = v1(i);
    }
    let prefill = BatchMetadata::new(vec![0], vec![5], vec![5], vec![0], 1).unwrap();
    let scales = KvScales::default();
    let mut cache = CacheSpec::from_parts(l, QuantPolicy::Fp8E4m3, Dtype::E4m3, scales)
        .and_then(|spec| HostKvCache::new(spec, 0))
        .unwrap();
    let stride = kv_heads * d;
    reference::fill(
        &mut cache,
        rows(&hist_k, stride),
        rows(&hist_v, stride),
        tokens,
        &prefill,
    )
    .unwrap();
    let step = BatchMetadata::new(vec![0], vec![1], vec![5], vec![0], 1).unwrap();
    let q = vec![1.0f32; 4 * d];
    let opts = AttentionOptions {
        window,
        ..Default::default()
    };
    reference::paged_decode(&q, 4, &cache, &step, 1, &opts).unwrap()
}

#[test]
fn nan_in_a_key_makes_every_dim_of_its_group_nan_and_nothing_else() {
    let nan_at_3 = |i: usize| if i == 3 { f32::NAN } else { 0.5 };
    let half = |_: usize| 0.5;
    for head in [0, 1] {
        let out = decode_with_token1(head, &nan_at_3, &half, None);
        for h in 0..4 {
            let row = &out[h * 64..][..64];
            if h / 2 == head {
                assert!(row.iter().all(|x| x.is_nan()), "kv head {head}, head {h}");
            } else {
                assert!(
                    row.iter().all(|x| x.is_finite()),
                    "kv head {head}, head {h}"
                );
            }
        }
        // A window of 3 (keys 2..=4) does not see token 1: all finite, and (every visible
        // key and value being 0.5) every output is 0.5 up to the rounding of three weights
        // of 1/3 summed in f64 (a few ulps of 0.5; 1e-15 is about 9 ulps).
        let out = decode_with_token1(head, &nan_at_3, &half, Some(3));
        assert!(
            out.iter().all(|&x| (x - 0.5).abs() <= 1e-15),
            "kv head {head}"
        );
    }
}

#[test]
fn nan_in_a_value_makes_that_dim_nan_even_at_zero_probability() {
    // Token 1's key is -MAX in every dim (from -inf, saturated) against +0.5 elsewhere, with
    // q = 1: its score is 64 · (-448) / 8 = -3584 against 64 · 0.5 / 8 = 4 for the others, so
    // its weight exp(-3588) / Σ underflows to exactly 0 in f64.
    let neg_inf = |_: usize| f32::NEG_INFINITY;
    let nan_at_5 = |i: usize| if i == 5 { f32::NAN } else { 0.5 };
    let out = decode_with_token1(1, &neg_inf, &nan_at_5, None);
    for h in 0..4 {
        for dim in 0..64 {
            let x = out[h * 64 + dim];
            if h >= 2 && dim == 5 {
                assert!(x.is_nan(), "head {h} dim {dim}");
            } else {
                // Every value carrying weight is 0.5: the output is 0.5 up to the rounding of
                // the weights (1/5 for heads 0 and 1), far below 1e-15.
                assert!((x - 0.5).abs() <= 1e-15, "head {h} dim {dim}: {x}");
            }
        }
    }
}

#[test]
fn infinite_inputs_equal_max_inputs_and_stay_finite() {
    // +inf, 1e30 and 448 (= MAX · scale with scale 1) all store code 0x7E: the caches and
    // so the decode outputs are identical and finite.
    let outs: Vec<Vec<f64>> = [f32::INFINITY, 1e30, 448.0]
        .into_iter()
        .map(|x| decode_with_token1(0, &|_| x, &|_| -x, None))
        .collect();
    assert!(outs[0].iter().all(|x| x.is_finite()));
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
    // Token 1's key dominates head 0's group, so its value -448 dominates the output.
    assert!(
        outs[0][0] < -447.0 && outs[0][0] >= -448.0,
        "{}",
        outs[0][0]
    );
}
