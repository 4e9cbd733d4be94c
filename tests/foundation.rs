//! Policy, scales, layout and metadata: accepted spellings, and each bad input's own error.

use fp8kv::layout::check_head_dims;
use fp8kv::{
    BatchMetadata, Dtype, Fp8KvError, KvLayoutKind, KvScales, KvSide, PagedKvLayout, QuantPolicy,
};
use rstest::rstest;

#[rstest]
#[case("none", QuantPolicy::None)]
#[case("AUTO", QuantPolicy::None)]
#[case("0", QuantPolicy::None)]
#[case("fp8", QuantPolicy::Fp8E4m3)]
#[case("FP8_E4M3", QuantPolicy::Fp8E4m3)]
#[case("fp8-e4m3", QuantPolicy::Fp8E4m3)]
#[case(" 16 ", QuantPolicy::Fp8E4m3)]
#[case("fp8_e5m2", QuantPolicy::Fp8E5m2)]
#[case("Fp8-E5M2", QuantPolicy::Fp8E5m2)]
#[case("17", QuantPolicy::Fp8E5m2)]
fn policy_accepts_the_spellings_users_type(#[case] input: &str, #[case] expected: QuantPolicy) {
    assert_eq!(input.parse::<QuantPolicy>().unwrap(), expected);
}

#[rstest]
#[case("int8")]
#[case("fp8_e4m3fn_typo")]
#[case("")]
#[case("8")]
#[case("fp16")]
fn unknown_policy_error_lists_valid_values(#[case] input: &str) {
    let err = input.parse::<QuantPolicy>().unwrap_err();
    assert!(matches!(err, Fp8KvError::UnknownPolicy { .. }), "{err:?}");
    let msg = err.to_string();
    for word in ["none", "fp8_e4m3", "fp8_e5m2", "16", "17"] {
        assert!(msg.contains(word), "message `{msg}` should list `{word}`");
    }
}

#[test]
fn policy_display_round_trips_and_knows_its_format() {
    for p in QuantPolicy::ALL {
        assert_eq!(p.to_string().parse::<QuantPolicy>().unwrap(), p);
    }
    assert_eq!(QuantPolicy::None.cache_elem_bytes(), 2);
    assert_eq!(QuantPolicy::Fp8E4m3.cache_elem_bytes(), 1);
    assert_eq!(QuantPolicy::Fp8E4m3.fp8_max(), Some(448.0));
    assert_eq!(QuantPolicy::Fp8E5m2.fp8_max(), Some(57344.0));
    assert_eq!(QuantPolicy::None.fp8_max(), None);
    assert_eq!(
        QuantPolicy::None.cache_dtype(Dtype::Bf16).unwrap(),
        Dtype::Bf16
    );
    assert_eq!(
        QuantPolicy::Fp8E5m2.cache_dtype(Dtype::F32).unwrap(),
        Dtype::E5m2
    );
    assert!(matches!(
        QuantPolicy::None.cache_dtype(Dtype::F32),
        Err(Fp8KvError::UnsupportedDtype(_))
    ));
    assert!(matches!(
        QuantPolicy::Fp8E4m3.cache_dtype(Dtype::E4m3),
        Err(Fp8KvError::UnsupportedDtype(_))
    ));
    assert!(matches!(
        QuantPolicy::Fp8E4m3.check_cache_dtype(Dtype::E5m2),
        Err(Fp8KvError::UnsupportedDtype(_))
    ));
}

#[rstest]
#[case(0.0, 1.0, KvSide::K)]
#[case(-1.0, 1.0, KvSide::K)]
#[case(f32::NAN, 1.0, KvSide::K)]
#[case(f32::INFINITY, 1.0, KvSide::K)]
#[case(1.0, 0.0, KvSide::V)]
#[case(1.0, f32::NEG_INFINITY, KvSide::V)]
#[case(1.0, -0.0, KvSide::V)]
fn scales_must_be_finite_and_positive(#[case] k: f32, #[case] v: f32, #[case] side: KvSide) {
    match KvScales::new(k, v) {
        Err(Fp8KvError::InvalidScale { side: s, .. }) => assert_eq!(s, side),
        other => panic!("expected InvalidScale for {side}, got {other:?}"),
    }
}

#[test]
fn default_scales_are_one() {
    let s = KvScales::default();
    assert_eq!((s.k(), s.v()), (1.0, 1.0));
}

#[test]
fn calibration_maps_amax_to_format_max() {
    let s = KvScales::calibrate(896.0, 44.8, QuantPolicy::Fp8E4m3).unwrap();
    assert_eq!((s.k(), s.v()), (2.0, 0.1));
    let s = KvScales::calibrate(57344.0, 1.0, QuantPolicy::Fp8E5m2).unwrap();
    assert_eq!(s.k(), 1.0);
    assert_eq!(
        KvScales::calibrate(5.0, 5.0, QuantPolicy::None).unwrap(),
        KvScales::default()
    );
}

#[test]
fn calibration_of_all_zero_tensor_gives_valid_scale() {
    let s = KvScales::calibrate(0.0, 0.0, QuantPolicy::Fp8E4m3).unwrap();
    assert!(s.k() > 0.0 && s.k().is_finite() && s.v() > 0.0);
    assert!(matches!(
        KvScales::calibrate(f32::NAN, 1.0, QuantPolicy::Fp8E4m3),
        Err(Fp8KvError::InvalidAmax {
            side: KvSide::K,
            ..
        })
    ));
    assert!(matches!(
        KvScales::calibrate(1.0, -2.0, QuantPolicy::Fp8E4m3),
        Err(Fp8KvError::InvalidAmax {
            side: KvSide::V,
            ..
        })
    ));
}

fn layout(page_size: usize, kind: KvLayoutKind) -> PagedKvLayout {
    PagedKvLayout::new(10, page_size, 2, 64, 64, kind).unwrap()
}

#[rstest]
#[case(0)]
#[case(8)]
#[case(24)]
#[case(48)]
fn page_size_must_be_power_of_two_at_least_16(#[case] page_size: usize) {
    assert_eq!(
        PagedKvLayout::new(4, page_size, 2, 128, 128, KvLayoutKind::Bshd).unwrap_err(),
        Fp8KvError::InvalidPageSize { page_size }
    );
}

#[rstest]
#[case(100, 100)]
#[case(128, 64)]
#[case(512, 576)]
#[case(32, 32)]
fn unsupported_head_dims_are_rejected(#[case] k: usize, #[case] v: usize) {
    assert!(matches!(
        PagedKvLayout::new(4, 16, 2, k, v, KvLayoutKind::Bshd),
        Err(Fp8KvError::UnsupportedHeadDim { .. })
    ));
}

#[test]
fn supported_head_dims_are_accepted() {
    for (k, v) in [
        (64, 64),
        (80, 80),
        (96, 96),
        (128, 128),
        (192, 192),
        (256, 256),
        (576, 512),
    ] {
        check_head_dims(k, v).unwrap();
    }
}

#[test]
fn zero_counts_are_rejected() {
    assert_eq!(
        PagedKvLayout::new(0, 16, 2, 64, 64, KvLayoutKind::Bshd).unwrap_err(),
        Fp8KvError::ZeroSize { what: "num_pages" }
    );
    assert_eq!(
        PagedKvLayout::new(4, 16, 0, 64, 64, KvLayoutKind::Bshd).unwrap_err(),
        Fp8KvError::ZeroSize {
            what: "num_kv_heads"
        }
    );
}

#[test]
fn logical_block_size_must_be_multiple_of_page_size() {
    let l = layout(32, KvLayoutKind::Bshd);
    l.check_logical_block_size(64).unwrap();
    l.check_logical_block_size(32).unwrap();
    for bad in [0, 16, 48] {
        assert!(matches!(
            l.check_logical_block_size(bad),
            Err(Fp8KvError::InvalidLogicalBlockSize { .. })
        ));
    }
}

#[test]
fn strides_address_every_element_once() {
    // Walk every (page, slot, head, d) through the strides: each offset hit exactly once.
    for kind in [KvLayoutKind::Bshd, KvLayoutKind::Bhsd] {
        let l = PagedKvLayout::new(3, 16, 3, 576, 512, kind).unwrap();
        for side in [KvSide::K, KvSide::V] {
            let t = l.tensor(side);
            let n = l.cache_elems(side);
            assert_eq!(n, l.shape(side).iter().product::<usize>());
            let mut seen = vec![false; n];
            for p in 0..3 {
                for s in 0..16 {
                    for h in 0..3 {
                        for d in 0..t.head_dim {
                            let o = t.offset(p, s, h) + d;
                            assert!(!seen[o], "{kind:?} {side} offset {o} twice");
                            seen[o] = true;
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&x| x));
        }
    }
}

#[test]
fn bytes_per_token_halves_with_fp8() {
    let l = PagedKvLayout::new(8, 64, 8, 128, 128, KvLayoutKind::Bshd).unwrap();
    assert_eq!(l.bytes_per_token(QuantPolicy::None), 8 * 256 * 2);
    assert_eq!(l.bytes_per_token(QuantPolicy::Fp8E4m3), 8 * 256);
    assert_eq!(l.cache_bytes(QuantPolicy::Fp8E5m2), 8 * 64 * 8 * 256);
}

/// Two sequences, page 16: seq 0 has 20 tokens (pages 3, 1), seq 1 has 5 (page 0); 3 new tokens.
fn meta(q_start: [i32; 2], q_len: [i32; 2], kv: [i32; 2], table: [i32; 4]) -> BatchMetadata {
    BatchMetadata::new(
        q_start.to_vec(),
        q_len.to_vec(),
        kv.to_vec(),
        table.to_vec(),
        2,
    )
    .unwrap()
}

#[test]
fn valid_metadata_passes() {
    let l = layout(16, KvLayoutKind::Bshd);
    meta([0, 2], [2, 1], [20, 5], [3, 1, 0, -1])
        .validate(&l, 3)
        .unwrap();
    assert_eq!(
        meta([0, 2], [2, 1], [20, 5], [3, 1, 0, -1]).locate(0, 17, 16),
        (1, 1)
    );
}

#[test]
fn metadata_length_mismatches_are_rejected() {
    assert!(matches!(
        BatchMetadata::new(vec![0], vec![1, 1], vec![1, 1], vec![0, 1], 1),
        Err(Fp8KvError::ShapeMismatch {
            what: "q_start_loc",
            ..
        })
    ));
    assert!(matches!(
        BatchMetadata::new(vec![0, 1], vec![1], vec![1, 1], vec![0, 1], 1),
        Err(Fp8KvError::ShapeMismatch {
            what: "q_seq_length",
            ..
        })
    ));
    assert!(matches!(
        BatchMetadata::new(vec![0, 1], vec![1, 1], vec![1, 1], vec![0, 1, 2], 1),
        Err(Fp8KvError::ShapeMismatch {
            what: "block_table",
            ..
        })
    ));
}

#[rstest]
#[case::block_table_entry_past_num_pages(meta([0, 2], [2, 1], [20, 5], [3, 10, 0, -1]), "BlockTableOutOfRange")]
#[case::negative_block_table_entry(meta([0, 2], [2, 1], [20, 5], [-1, 1, 0, 0]), "BlockTableOutOfRange")]
#[case::seq_len_past_cache(meta([0, 2], [2, 1], [33, 5], [3, 1, 0, 2]), "SeqLenPastCache")]
#[case::negative_kv_len(meta([0, 2], [0, 1], [-1, 5], [3, 1, 0, 2]), "NegativeLength")]
#[case::negative_q_len(meta([0, 2], [-1, 1], [20, 5], [3, 1, 0, 2]), "NegativeLength")]
#[case::query_longer_than_kv(meta([0, 2], [2, 6], [20, 5], [3, 1, 0, 2]), "QueryLongerThanKv")]
#[case::query_past_packed_tokens(meta([0, 2], [2, 2], [20, 5], [3, 1, 0, 2]), "QueryOutOfRange")]
#[case::overlapping_queries(meta([0, 1], [2, 1], [20, 5], [3, 1, 0, 2]), "QueryOverlap")]
#[case::two_tokens_one_slot(meta([0, 2], [2, 1], [18, 2], [3, 0, 0, 2]), "SlotConflict")]
fn bad_metadata_gets_its_own_error(#[case] m: BatchMetadata, #[case] variant: &str) {
    let l = layout(16, KvLayoutKind::Bshd);
    let err = m.validate(&l, 3).unwrap_err();
    assert!(
        format!("{err:?}").starts_with(variant),
        "expected {variant}, got {err:?}"
    );
    assert!(!err.to_string().is_empty());
}

#[test]
fn shared_prefix_pages_are_allowed_for_reading() {
    // Both sequences read page 3 (a shared prefix) and write distinct slots elsewhere.
    let l = layout(16, KvLayoutKind::Bshd);
    meta([0, 1], [1, 1], [17, 18], [3, 1, 3, 2])
        .validate(&l, 2)
        .unwrap();
}

#[test]
fn decode_metadata_packs_one_token_per_nonempty_sequence() {
    let m = BatchMetadata::decode(vec![5, 0, 9], vec![0, -1, 1, 2], 2).unwrap_err();
    assert!(matches!(
        m,
        Fp8KvError::ShapeMismatch {
            what: "block_table",
            ..
        }
    ));
    let m = BatchMetadata::decode(vec![5, 0, 9], vec![0, -1, 1, -1, 2, -1], 2).unwrap();
    assert_eq!(m.q_start_loc(), &[0, 1, 1]);
    assert_eq!(m.q_seq_length(), &[1, 0, 1]);
    m.validate(&layout(16, KvLayoutKind::Bshd), 2).unwrap();
}
