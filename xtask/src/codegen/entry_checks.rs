//! The GPU entry points' input validation, run in CI on the offline runtime: every check here
//! happens on the host before a launch, so it needs no GPU. Each bad input must give its own
//! typed error, and each positive control must pass (and compile its kernels) so a check that
//! rejects everything would fail here too.

use cubecl::Runtime;
use fp8kv::device::{DeviceBatch, DeviceRows, PagedKvCache};
use fp8kv::kernels::{decode, fill, flatten, stats};

use fp8kv::{AttentionOptions, DecodeOptions, DecodeStrategy};
use fp8kv::{
    BatchMetadata, CacheSpec, Dtype, Fp8KvError, KvLayoutKind, KvScales, PagedKvLayout, QuantPolicy,
};

use super::offline::OfflineCuda;

type Client = cubecl::client::ComputeClient<OfflineCuda>;

fn client() -> Client {
    OfflineCuda::client(&Default::default())
}

/// 4 pages of 16 tokens, 2 KV heads, d64; two sequences (20 and 1 cached, 3 and 1 new).
fn layout() -> PagedKvLayout {
    PagedKvLayout::new(4, 16, 2, 64, 64, KvLayoutKind::Bshd).unwrap()
}

fn meta() -> BatchMetadata {
    BatchMetadata::new(vec![0, 3], vec![3, 1], vec![20, 1], vec![0, 1, 2, -1], 2).unwrap()
}

fn cache(c: &Client) -> PagedKvCache<OfflineCuda> {
    let scales = KvScales::new(0.5, 0.25).unwrap();
    PagedKvCache::new(c, layout(), QuantPolicy::Fp8E4m3, Dtype::E4m3, scales).unwrap()
}

fn rows(c: &Client, dtype: Dtype, rows: usize, elems: usize) -> DeviceRows<OfflineCuda> {
    DeviceRows::empty(c, dtype, rows, elems, elems).unwrap()
}

fn variant(e: &Fp8KvError) -> String {
    format!("{e:?}")
        .split([' ', '(', '{'])
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn device_types_reject_bad_shapes_and_dtypes() {
    let c = client();
    let scales = KvScales::default();
    let e = PagedKvCache::new(&c, layout(), QuantPolicy::Fp8E4m3, Dtype::Bf16, scales)
        .err()
        .unwrap();
    assert_eq!(variant(&e), "UnsupportedDtype", "{e}");
    let e = DeviceRows::empty(&c, Dtype::E4m3, 4, 128, 128)
        .err()
        .unwrap();
    assert_eq!(variant(&e), "UnsupportedDtype", "{e}");
    let e = DeviceRows::empty(&c, Dtype::Bf16, 4, 128, 64)
        .err()
        .unwrap();
    assert_eq!(variant(&e), "RowStride", "{e}");
    let e = DeviceRows::from_f32(&c, &[1.0; 10], Dtype::Bf16, 4, 128, 128)
        .err()
        .unwrap();
    assert_eq!(variant(&e), "ShapeMismatch", "{e}");
    let bad_table =
        BatchMetadata::new(vec![0, 3], vec![3, 1], vec![20, 1], vec![0, 9, 2, -1], 2).unwrap();
    let e = DeviceBatch::new(&c, bad_table, &layout(), 4).err().unwrap();
    assert_eq!(variant(&e), "BlockTableOutOfRange", "{e}");
    let e = DeviceBatch::new(&c, meta(), &layout(), 3).err().unwrap();
    assert_eq!(variant(&e), "QueryOutOfRange", "{e}");
}

#[test]
fn fill_rejects_bad_input_and_accepts_good() {
    let c = client();
    let mut cache = cache(&c);
    let batch = DeviceBatch::new(&c, meta(), &layout(), 4).unwrap();
    let good = || rows(&c, Dtype::Bf16, 4, 128);
    fill::fill(&mut cache, &good(), &good(), &batch).unwrap();

    let e = fill::fill(&mut cache, &rows(&c, Dtype::Bf16, 4, 64), &good(), &batch).unwrap_err();
    assert_eq!(variant(&e), "ShapeMismatch", "{e}");
    let e = fill::fill(&mut cache, &good(), &rows(&c, Dtype::Bf16, 3, 128), &batch).unwrap_err();
    assert_eq!(variant(&e), "ShapeMismatch", "{e}");
    let e = fill::fill(&mut cache, &good(), &rows(&c, Dtype::F16, 4, 128), &batch).unwrap_err();
    assert_eq!(variant(&e), "UnsupportedDtype", "{e}");
    let reads = DeviceBatch::for_reads(&c, meta(), &layout()).unwrap();
    let e = fill::fill(&mut cache, &good(), &good(), &reads).unwrap_err();
    assert_eq!(variant(&e), "InvalidOption", "{e}");
    let other = PagedKvLayout::new(5, 16, 2, 64, 64, KvLayoutKind::Bshd).unwrap();
    let other_batch = DeviceBatch::new(&c, meta(), &other, 4).unwrap();
    let e = fill::fill(&mut cache, &good(), &good(), &other_batch).unwrap_err();
    assert_eq!(variant(&e), "ShapeMismatch", "{e}");

    // `fill_with_stats` runs the same checks before its launch.
    let mut acc = stats::DeviceKvStats::new(&c);
    fill::fill_with_stats(&mut cache, &good(), &good(), &batch, &mut acc).unwrap();
    let bad = [
        (
            rows(&c, Dtype::Bf16, 4, 64),
            good(),
            &batch,
            "ShapeMismatch",
        ),
        (
            good(),
            rows(&c, Dtype::Bf16, 3, 128),
            &batch,
            "ShapeMismatch",
        ),
        (
            good(),
            rows(&c, Dtype::F16, 4, 128),
            &batch,
            "UnsupportedDtype",
        ),
        (good(), good(), &reads, "InvalidOption"),
        (good(), good(), &other_batch, "ShapeMismatch"),
    ];
    for (k, v, b, want) in bad {
        let e = fill::fill_with_stats(&mut cache, &k, &v, b, &mut acc).unwrap_err();
        assert_eq!(variant(&e), want, "fill_with_stats: {e}");
    }
}

#[test]
fn stats_rejects_bad_input_and_accepts_good() {
    let c = client();
    let mut acc = stats::DeviceKvStats::new(&c);
    let scales = KvScales::new(0.5, 0.25).unwrap();
    let p = QuantPolicy::Fp8E4m3;
    // K and V rows of different widths (MLA) are fine; zero rows launch nothing.
    stats::kv_stats(
        &mut acc,
        &rows(&c, Dtype::Bf16, 4, 576),
        &rows(&c, Dtype::Bf16, 4, 512),
        &scales,
        p,
    )
    .unwrap();
    stats::kv_stats(
        &mut acc,
        &rows(&c, Dtype::F32, 0, 64),
        &rows(&c, Dtype::F32, 0, 64),
        &scales,
        p,
    )
    .unwrap();
    let e = stats::kv_stats(
        &mut acc,
        &rows(&c, Dtype::Bf16, 4, 64),
        &rows(&c, Dtype::F16, 4, 64),
        &scales,
        p,
    )
    .unwrap_err();
    assert_eq!(variant(&e), "UnsupportedDtype", "{e}");
    let e = stats::kv_stats(
        &mut acc,
        &rows(&c, Dtype::Bf16, 4, 64),
        &rows(&c, Dtype::Bf16, 3, 64),
        &scales,
        p,
    )
    .unwrap_err();
    assert_eq!(variant(&e), "ShapeMismatch", "{e}");
}

#[test]
fn flatten_rejects_bad_input_and_accepts_good() {
    let c = client();
    let cache = cache(&c);
    let batch = DeviceBatch::for_reads(&c, meta(), &layout()).unwrap();
    let hsd = fp8kv::FlattenLayout::Hsd;
    flatten::flatten_new(&c, &cache, &batch, hsd, Dtype::Bf16).unwrap();
    let e = flatten::flatten_new(&c, &cache, &batch, hsd, Dtype::E5m2)
        .err()
        .unwrap();
    assert_eq!(variant(&e), "UnsupportedDtype", "{e}");
    // 21 cached tokens × 2 heads = 42 rows of 64; one row short must be refused.
    let (mut k, mut v) = (rows(&c, Dtype::Bf16, 41, 64), rows(&c, Dtype::Bf16, 42, 64));
    let e = flatten::flatten(&cache, &batch, hsd, &mut k, &mut v).unwrap_err();
    assert_eq!(variant(&e), "ShapeMismatch", "{e}");
}

#[test]
fn decode_rejects_bad_input_and_accepts_good() {
    let c = client();
    let cache = cache(&c);
    let batch = DeviceBatch::new(&c, meta(), &layout(), 4).unwrap();
    let opts = DecodeOptions::default();
    let (q, mut out) = (
        rows(&c, Dtype::Bf16, 4, 8 * 64),
        rows(&c, Dtype::Bf16, 4, 8 * 64),
    );
    decode::paged_decode(&q, &cache, &batch, &opts, &mut out).unwrap();
    // The plan query agrees with the launch's validation and names a kernel.
    let plan = decode::decode_plan(&cache, &batch, Dtype::Bf16, 8, &opts).unwrap();
    assert!(plan.num_splits >= 1 && plan.workspace_bytes > 0, "{plan:?}");
    let e = decode::decode_plan(&cache, &batch, Dtype::Bf16, 3, &opts).unwrap_err();
    assert_eq!(variant(&e), "HeadRatio", "{e}");

    // The head count is the row length over head_dim_k: 3 heads do not divide over 2.
    let q3 = rows(&c, Dtype::Bf16, 4, 3 * 64);
    let e = decode::paged_decode(&q3, &cache, &batch, &opts, &mut out).unwrap_err();
    assert_eq!(variant(&e), "HeadRatio", "{e}");
    let q_ragged = rows(&c, Dtype::Bf16, 4, 8 * 64 + 2);
    let e = decode::paged_decode(&q_ragged, &cache, &batch, &opts, &mut out).unwrap_err();
    assert_eq!(variant(&e), "ShapeMismatch", "{e}");
    let e = decode::paged_decode(
        &rows(&c, Dtype::Bf16, 3, 8 * 64),
        &cache,
        &batch,
        &opts,
        &mut out,
    )
    .unwrap_err();
    assert_eq!(variant(&e), "ShapeMismatch", "{e}");
    let mut out_f16 = rows(&c, Dtype::F16, 4, 8 * 64);
    let e = decode::paged_decode(&q, &cache, &batch, &opts, &mut out_f16).unwrap_err();
    assert_eq!(variant(&e), "UnsupportedDtype", "{e}");
    let bad = DecodeOptions::new(AttentionOptions {
        softcap: Some(0.0),
        ..Default::default()
    });
    let e = decode::paged_decode(&q, &cache, &batch, &bad, &mut out).unwrap_err();
    assert_eq!(variant(&e), "InvalidOption", "{e}");
    let slopes = DecodeOptions::new(AttentionOptions {
        alibi_slopes: Some(vec![0.5; 3]),
        ..Default::default()
    });
    let e = decode::paged_decode(&q, &cache, &batch, &slopes, &mut out).unwrap_err();
    assert_eq!(variant(&e), "ShapeMismatch", "{e}");
    let reads = DeviceBatch::for_reads(&c, meta(), &layout()).unwrap();
    let e = decode::paged_decode(&q, &cache, &reads, &opts, &mut out).unwrap_err();
    assert_eq!(variant(&e), "InvalidOption", "{e}");
}

/// Forcing a tensor-core kernel where it does not apply is an `InvalidOption` error, not a
/// fallback; where one applies it launches (MLA's dims take only the wide kernel, and only
/// with queries the MMA type holds in one part).
#[test]
fn forced_tensor_core_paths_apply_or_say_why() {
    let c = client();
    let layout = PagedKvLayout::new(4, 64, 1, 576, 512, KvLayoutKind::Bshd).unwrap();
    let cache = PagedKvCache::new(
        &c,
        layout,
        QuantPolicy::Fp8E4m3,
        Dtype::E4m3,
        KvScales::default(),
    )
    .unwrap();
    let meta = BatchMetadata::new(vec![0], vec![1], vec![70], vec![0, 1], 2).unwrap();
    let batch = DeviceBatch::new(&c, meta, &layout, 1).unwrap();
    let run = |act: Dtype, path: DecodeStrategy| {
        let q = rows(&c, act, 1, 16 * 576);
        let mut out = rows(&c, act, 1, 16 * 512);
        let opts = DecodeOptions::default().with_strategy(path);
        decode::paged_decode(&q, &cache, &batch, &opts, &mut out)
    };
    run(Dtype::Bf16, DecodeStrategy::Wide).unwrap();
    run(Dtype::Bf16, DecodeStrategy::CudaCores).unwrap();
    for (act, path) in [
        (Dtype::Bf16, DecodeStrategy::TensorCores),
        (Dtype::Bf16, DecodeStrategy::KeyMajor),
        (Dtype::F32, DecodeStrategy::Wide),
    ] {
        let e = run(act, path).unwrap_err();
        assert_eq!(variant(&e), "InvalidOption", "{path:?} {act}: {e}");
        assert!(e.to_string().contains("does not apply"), "{e}");
    }
}

/// Sizes whose products used to wrap (so a huge request became a tiny buffer the kernels then
/// indexed past) and host caches whose buffers were resized behind the layout's back.
#[test]
fn device_types_reject_sizes_that_overflow_and_resized_host_caches() {
    let c = client();
    // 2^62 rows of 8 bf16: 2^66 bytes wrapped to 0 and allocated 16 bytes.
    let e = DeviceRows::empty(&c, Dtype::Bf16, 1 << 62, 8, 8)
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            Fp8KvError::TooLarge {
                what: "rows bytes",
                ..
            }
        ),
        "{e}"
    );
    // (2^61 + 1 - 1) x 8 + 8 elements wrapped to 8: a 16-byte buffer passed for 2^61 + 1 rows.
    let small = DeviceRows::empty(&c, Dtype::Bf16, 1, 8, 8).unwrap();
    let e = DeviceRows::from_handle(&c, small.handle().clone(), Dtype::Bf16, (1 << 61) + 1, 8, 8)
        .err()
        .unwrap();
    assert_eq!(variant(&e), "TooLarge", "{e}");
    let e = DeviceRows::from_f32(&c, &[0.0; 8], Dtype::F32, 1 << 62, 8, 8)
        .err()
        .unwrap();
    assert_eq!(variant(&e), "TooLarge", "{e}");

    // A host cache whose public buffer was shortened must not be uploaded.
    let spec = CacheSpec::from_parts(
        layout(),
        QuantPolicy::Fp8E4m3,
        Dtype::E4m3,
        KvScales::default(),
    );
    let mut host = fp8kv::reference::HostKvCache::new(spec.unwrap(), 0).unwrap();
    host.k.truncate(100);
    let e = PagedKvCache::from_host(&c, &host).err().unwrap();
    assert!(
        matches!(
            e,
            Fp8KvError::ShapeMismatch {
                what: "host k cache bytes",
                ..
            }
        ),
        "{e}"
    );
}

/// More than 65535 sequences (CUDA's grid y) or new tokens in one sequence (the combine's grid
/// z): fill and flatten used to launch such grids and fail on the device; every entry point
/// now refuses them on the host.
#[test]
fn entry_points_refuse_grids_past_cuda_limits() {
    let c = client();
    let mut cache = cache(&c);
    let n = 65536;
    let meta = BatchMetadata::new(vec![0; n], vec![0; n], vec![0; n], vec![0; n], 1).unwrap();
    let batch = DeviceBatch::new(&c, meta, &layout(), 0).unwrap();
    let too_many = |e: Fp8KvError| {
        assert!(
            matches!(
                e,
                Fp8KvError::TooLarge {
                    what: "batch (sequences)",
                    actual: 65536,
                    limit: 65535,
                    ..
                }
            ),
            "{e}"
        )
    };
    let k = rows(&c, Dtype::Bf16, 4, 128);
    too_many(fill::fill(&mut cache, &k, &k, &batch).unwrap_err());
    too_many(
        flatten::flatten_new(&c, &cache, &batch, fp8kv::FlattenLayout::Hsd, Dtype::Bf16)
            .err()
            .unwrap(),
    );
    let (q, mut out) = (
        rows(&c, Dtype::Bf16, 0, 8 * 64),
        rows(&c, Dtype::Bf16, 0, 8 * 64),
    );
    too_many(
        decode::paged_decode(&q, &cache, &batch, &DecodeOptions::default(), &mut out).unwrap_err(),
    );

    // One sequence with 65536 new tokens: one page of 2^17 tokens holds them.
    let big = PagedKvLayout::new(1, 1 << 17, 2, 64, 64, KvLayoutKind::Bshd).unwrap();
    let cache = PagedKvCache::new(
        &c,
        big,
        QuantPolicy::Fp8E4m3,
        Dtype::E4m3,
        KvScales::default(),
    )
    .unwrap();
    let meta = BatchMetadata::new(vec![0], vec![n as i32], vec![n as i32], vec![0], 1).unwrap();
    let batch = DeviceBatch::new(&c, meta, &big, n).unwrap();
    let (q, mut out) = (
        rows(&c, Dtype::Bf16, n, 8 * 64),
        rows(&c, Dtype::Bf16, n, 8 * 64),
    );
    let e =
        decode::paged_decode(&q, &cache, &batch, &DecodeOptions::default(), &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            Fp8KvError::TooLarge {
                what: "new tokens of one sequence",
                ..
            }
        ),
        "{e}"
    );
}
