//! The Burn extension on the GPU: for every operation, the Burn path (`CubeBackend` on the
//! whole fill table and on [`DECODE_CASES`] of the decode table, `Fusion<CubeBackend>`, i.e.
//! `burn_cuda::Cuda` with Burn's default features, on [`FUSED_CASES`]) equals the direct
//! entry-point path bit for bit; a fill into a
//! 1 GiB cache allocates no second cache; Burn's pitched activations (d80 f16) are copied
//! exactly before a kernel reads them. Skips visibly without CUDA (`FP8KV_REQUIRE_GPU=1`
//! fails instead).

mod common;

use burn_cubecl::CubeBackend;
use burn_fusion::Fusion;
use burn_tensor::{DType, Tensor, TensorData};
use cubecl::client::ComputeClient;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use fp8kv::device::{Cuda, DeviceBatch, DeviceRows, PagedKvCache};
use fp8kv::kernels::{decode, fill, flatten};
use fp8kv::testing::{decode_cases, fill_cases, PagedCase, Problem};
use fp8kv::{AttentionOptions, FlattenLayout};
use fp8kv::{BatchMetadata, Dtype, KvLayoutKind, KvScales, KvSide, PagedKvLayout, QuantPolicy};
use fp8kv_burn::{KvBatch, KvCache, KvCacheConfig, PagedKvBackend};

use common::{par_map, trace};

type Cube = CubeBackend<CudaRuntime, f32, i32, u8>;
type Fused = Fusion<Cube>;

/// Cache configurations and the activation dtype run with each: `(policy, unquantized dtype,
/// activations)`. Every cache dtype and every activation dtype appears; e4m3 with all three.
const COMBOS: [(&str, Dtype, Dtype); 7] = [
    ("none", Dtype::F16, Dtype::F16),
    ("none", Dtype::Bf16, Dtype::Bf16),
    ("none", Dtype::Bf16, Dtype::F32),
    ("fp8_e4m3", Dtype::Bf16, Dtype::Bf16),
    ("fp8_e4m3", Dtype::Bf16, Dtype::F16),
    ("fp8_e4m3", Dtype::Bf16, Dtype::F32),
    ("fp8_e5m2", Dtype::Bf16, Dtype::Bf16),
];
const ACTS: [Dtype; 3] = [Dtype::F16, Dtype::Bf16, Dtype::F32];

/// Cases the fused backend also runs (all of them run on `CubeBackend`): the fused path is the
/// same adapter behind a custom operation, and each fused run costs far more host time (the
/// whole table on both backends took over 7 minutes of the device's time). A strided-input
/// case, an odd GQA and head dim, multi-token decode, a long context, MLA dims, an empty
/// sequence.
/// Decode cases `CubeBackend` runs (a subset too: every decode case and dtype pair compiles its
/// own kernels, about 1.4 s each on the GPU machine, so the whole table takes over 8 minutes
/// while the adapter under test is the same for all of them; `gpu_decode` runs the whole table
/// on the direct path against the reference). Each GQA ratio class, MLA dims, an empty
/// sequence, multi-token decode, saturating scales, page 16 and 128.
const DECODE_CASES: [&str; 8] = [
    "decode_b17_uneven",
    "gqa7_d80_page64",
    "d96_page128_in_order",
    "mla_576_512",
    "empty_sequence",
    "saturating_scales",
    "gqa24_page16",
    "spec_decode_4_tokens",
];

const FUSED_CASES: [&str; 6] = [
    "chunked_prefill_history",
    "gqa7_d80_page64",
    "empty_sequence",
    "mla_576_512",
    "spec_decode_4_tokens",
    "long_context_2k",
];

/// Whether the fused backend runs this (case, cache, activation): its cases, e4m3 or bf16
/// caches with bf16 activations.
fn fused(case: &PagedCase, policy: &str, act: Dtype) -> bool {
    FUSED_CASES.contains(&case.name) && act == Dtype::Bf16 && policy != "fp8_e5m2"
}

fn burn_dtype(d: Dtype) -> DType {
    fp8kv_burn::burn_dtype(d).unwrap()
}

/// `rows` rows of `heads * dim` values, `stride` apart in `data`, as a `[rows, heads, dim]`
/// tensor of `act`. When the padding is whole heads, the tensor is a slice of a wider one
/// (rows `stride` apart in memory), so the strided path is what runs.
fn tensor3<B: PagedKvBackend>(
    data: &[f32],
    rows: usize,
    heads: usize,
    dim: usize,
    stride: usize,
    act: Dtype,
    device: &B::Device,
) -> Tensor<B, 3> {
    let pad = stride - heads * dim;
    let wide_heads = heads + pad / dim;
    let (src_heads, n) = if pad.is_multiple_of(dim) {
        (wide_heads, wide_heads * dim)
    } else {
        (heads, heads * dim)
    };
    let mut packed = Vec::with_capacity(rows * n);
    for r in 0..rows {
        packed.extend_from_slice(&data[r * stride..][..heads * dim]);
        packed.extend(std::iter::repeat_n(f32::NAN, n - heads * dim));
    }
    let t = Tensor::<B, 3>::from_data(
        TensorData::new(packed, [rows, src_heads, dim]),
        (device, burn_dtype(act)),
    );
    t.slice([0..rows, 0..heads])
}

/// Element bits of a tensor's data (for exact comparisons).
fn bits<B: PagedKvBackend>(t: Tensor<B, 3>) -> Vec<u32> {
    let data = t.into_data();
    let es = data.dtype.size();
    data.as_bytes()
        .chunks_exact(es)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..es].copy_from_slice(c);
            u32::from_le_bytes(b)
        })
        .collect()
}

fn config(case: &PagedCase, policy: &str, unquantized: Dtype) -> KvCacheConfig {
    let cfg = KvCacheConfig::new(policy, case.layout().unwrap())
        .unwrap()
        .with_unquantized(unquantized)
        .unwrap();
    cfg.with_scales(case.kv_scales(cfg.policy).unwrap())
}

/// The cached bytes of every written position of `meta`'s sequences (positions `[kv_len -
/// q_len, kv_len)`), K then V: what two caches must agree on (the rest is uninitialised).
fn written_bytes(host: &fp8kv::reference::HostKvCache, meta: &BatchMetadata) -> Vec<u8> {
    let layout = *host.layout();
    let es = host.dtype().size_bytes();
    let mut out = Vec::new();
    for side in [KvSide::K, KvSide::V] {
        let t = layout.tensor(side);
        for b in 0..meta.batch() {
            let (q, kv) = (
                meta.q_seq_length()[b] as usize,
                meta.kv_seqlens()[b] as usize,
            );
            for pos in kv - q..kv {
                let (page, slot) = meta.locate(b, pos, layout.page_size());
                for h in 0..layout.num_kv_heads() {
                    let off = t.offset(page, slot, h) * es;
                    out.extend_from_slice(&host.bytes(side)[off..off + t.head_dim * es]);
                }
            }
        }
    }
    out
}

/// The direct path's cache after filling `meta`'s new tokens from `k` / `v` rows.
fn direct_fill(
    client: &ComputeClient<Cuda>,
    cfg: &KvCacheConfig,
    meta: &BatchMetadata,
    rows: (&[f32], &[f32], usize, usize),
    num_tokens: usize,
    act: Dtype,
) -> fp8kv::Result<PagedKvCache<Cuda>> {
    let spec = cfg.spec()?;
    let mut cache = PagedKvCache::with_spec(client, spec)?;
    let heads = spec.layout().num_kv_heads();
    let k = DeviceRows::from_f32(
        client,
        rows.0,
        act,
        num_tokens,
        heads * spec.layout().head_dim_k(),
        rows.2,
    )?;
    let v = DeviceRows::from_f32(
        client,
        rows.1,
        act,
        num_tokens,
        heads * spec.layout().head_dim_v(),
        rows.3,
    )?;
    let batch = DeviceBatch::new(client, meta.clone(), spec.layout(), num_tokens)?;
    fill::fill(&mut cache, &k, &v, &batch)?;
    Ok(cache)
}

/// The Burn path's cache after the same fill.
fn burn_fill<B: PagedKvBackend<Device = CudaDevice>>(
    cfg: &KvCacheConfig,
    meta: &BatchMetadata,
    rows: (&[f32], &[f32], usize, usize),
    num_tokens: usize,
    act: Dtype,
) -> fp8kv::Result<KvCache<B>> {
    let device = CudaDevice::new(0);
    let layout = cfg.layout;
    let heads = layout.num_kv_heads();
    let mut cache = KvCache::<B>::new(cfg, &device)?;
    let batch = KvBatch::<B>::new(meta.clone(), &layout, num_tokens, &device)?;
    let k = tensor3::<B>(
        rows.0,
        num_tokens,
        heads,
        layout.head_dim_k(),
        rows.2,
        act,
        &device,
    );
    let v = tensor3::<B>(
        rows.1,
        num_tokens,
        heads,
        layout.head_dim_v(),
        rows.3,
        act,
        &device,
    );
    cache.fill(k, v, &batch)?;
    Ok(cache)
}

fn fill_case<B: PagedKvBackend<Device = CudaDevice>>(
    client: &ComputeClient<Cuda>,
    case: &PagedCase,
    p: &Problem,
    cfg: &KvCacheConfig,
    act: Dtype,
) -> Result<(), String> {
    let e = |e: fp8kv::Fp8KvError| e.to_string();
    let heads = p.layout.num_kv_heads();
    let (dk, dv) = (p.layout.head_dim_k(), p.layout.head_dim_v());
    let total = p.total_kv_tokens();
    // The whole history (contiguous rows), then the step's new tokens alone (strided rows).
    let steps = [
        (
            &p.prefill_meta,
            (&p.hist_k[..], &p.hist_v[..], heads * dk, heads * dv),
            total,
        ),
        (
            &p.meta,
            (&p.k_new[..], &p.v_new[..], p.k_row_stride, p.v_row_stride),
            p.num_tokens,
        ),
    ];
    for (meta, rows, n) in steps {
        let want = direct_fill(client, cfg, meta, rows, n, act)
            .map_err(e)?
            .to_host()
            .map_err(e)?;
        let got = burn_fill::<B>(cfg, meta, rows, n, act)
            .map_err(e)?
            .to_host()
            .map_err(e)?;
        let (w, g) = (written_bytes(&want, meta), written_bytes(&got, meta));
        if w != g {
            let n_diff = w.iter().zip(&g).filter(|(a, b)| a != b).count();
            return Err(format!(
                "{}: {n_diff} of {} written bytes differ",
                case.name,
                w.len()
            ));
        }
    }
    Ok(())
}

#[test]
fn gpu_burn_fill_equals_direct_path_bit_for_bit() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_burn_fill_equals_direct_path_bit_for_bit")
    else {
        return;
    };
    let tally = par_map(&fill_cases(), |case| {
        let mut out = Vec::new();
        for act in ACTS {
            let p = Problem::generate(case, act).unwrap();
            for (policy, unq, _) in COMBOS.iter().filter(|c| c.2 == act) {
                let cfg = config(case, policy, *unq);
                let what = |b| format!("{} {b} {policy}/{unq} act {act}", case.name);
                out.push((
                    what("cube"),
                    fill_case::<Cube>(&client, case, &p, &cfg, act),
                ));
                if fused(case, policy, act) {
                    out.push((
                        what("fusion"),
                        fill_case::<Fused>(&client, case, &p, &cfg, act),
                    ));
                }
            }
        }
        out
    });
    tally.finish("fill");
}

/// Both paths' caches with the whole history written (fill is checked bit for bit above).
fn prefilled<B: PagedKvBackend<Device = CudaDevice>>(
    client: &ComputeClient<Cuda>,
    p: &Problem,
    cfg: &KvCacheConfig,
    act: Dtype,
) -> fp8kv::Result<(PagedKvCache<Cuda>, KvCache<B>)> {
    let heads = p.layout.num_kv_heads();
    let rows = (
        &p.hist_k[..],
        &p.hist_v[..],
        heads * p.layout.head_dim_k(),
        heads * p.layout.head_dim_v(),
    );
    let total = p.total_kv_tokens();
    Ok((
        direct_fill(client, cfg, &p.prefill_meta, rows, total, act)?,
        burn_fill::<B>(cfg, &p.prefill_meta, rows, total, act)?,
    ))
}

fn flatten_case<B: PagedKvBackend<Device = CudaDevice>>(
    client: &ComputeClient<Cuda>,
    p: &Problem,
    cfg: &KvCacheConfig,
) -> Result<(), String> {
    let e = |e: fp8kv::Fp8KvError| e.to_string();
    trace(|| format!("flatten {:?}: prefill", cfg.layout));
    let (direct, cache) = prefilled::<B>(client, p, cfg, Dtype::Bf16).map_err(e)?;
    let device = CudaDevice::new(0);
    let dbatch = DeviceBatch::for_reads(client, p.prefill_meta.clone(), &p.layout).map_err(e)?;
    let batch = KvBatch::<B>::for_reads(p.prefill_meta.clone(), &p.layout, &device).map_err(e)?;
    for layout in [FlattenLayout::Hsd, FlattenLayout::Shd] {
        for out in ACTS {
            trace(|| format!("flatten {layout:?} -> {out}: direct"));
            let (wk, wv) =
                flatten::flatten_new(client, &direct, &dbatch, layout, out).map_err(e)?;
            trace(|| format!("flatten {layout:?} -> {out}: burn"));
            let (gk, gv) = cache.flatten(&batch, layout, burn_dtype(out)).map_err(e)?;
            trace(|| format!("flatten {layout:?} -> {out}: compare"));
            for (side, want, got) in [("k", wk, gk), ("v", wv, gv)] {
                let (w, g) = (want.to_bits().map_err(e)?, bits(got));
                if w != g {
                    let n = w.iter().zip(&g).filter(|(a, b)| a != b).count();
                    return Err(format!(
                        "{layout:?} -> {out} {side}: {n} of {} differ (len {} vs {})",
                        w.len(),
                        w.len(),
                        g.len()
                    ));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn gpu_burn_flatten_equals_direct_path_bit_for_bit() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_burn_flatten_equals_direct_path_bit_for_bit")
    else {
        return;
    };
    let tally = par_map(&fill_cases(), |case| {
        let p = Problem::generate(case, Dtype::Bf16).unwrap();
        let mut out = Vec::new();
        for (policy, unq) in [
            ("none", Dtype::F16),
            ("none", Dtype::Bf16),
            ("fp8_e4m3", Dtype::Bf16),
            ("fp8_e5m2", Dtype::Bf16),
        ] {
            let cfg = config(case, policy, unq);
            out.push((
                format!("{} cube {policy}/{unq}", case.name),
                flatten_case::<Cube>(&client, &p, &cfg),
            ));
            if fused(case, policy, Dtype::Bf16) {
                out.push((
                    format!("{} fusion {policy}/{unq}", case.name),
                    flatten_case::<Fused>(&client, &p, &cfg),
                ));
            }
        }
        out
    });
    tally.finish("flatten");
}

fn decode_case<B: PagedKvBackend<Device = CudaDevice>>(
    client: &ComputeClient<Cuda>,
    case: &PagedCase,
    p: &Problem,
    cfg: &KvCacheConfig,
    act: Dtype,
) -> Result<(), String> {
    let e = |e: fp8kv::Fp8KvError| e.to_string();
    let (direct, cache) = prefilled::<B>(client, p, cfg, act).map_err(e)?;
    let device = CudaDevice::new(0);
    let dbatch = DeviceBatch::new(client, p.meta.clone(), &p.layout, p.num_tokens).map_err(e)?;
    let batch = KvBatch::<B>::new(p.meta.clone(), &p.layout, p.num_tokens, &device).map_err(e)?;
    let (h, dk, dv) = (case.num_heads, case.head_dim_k, case.head_dim_v);
    let with_options = AttentionOptions {
        window: Some(50),
        softcap: Some(30.0),
        sinks: Some((0..h).map(|i| 0.3 - 0.05 * i as f32).collect()),
        alibi_slopes: Some((0..h).map(|i| 0.02 / (i + 1) as f32).collect()),
        sm_scale: Some(0.08),
    };
    for opts in [AttentionOptions::default(), with_options] {
        trace(|| format!("decode {} {act}: direct", case.name));
        let q = DeviceRows::from_f32(client, &p.q, act, p.num_tokens, h * dk, h * dk).map_err(e)?;
        let nan = vec![f32::NAN; p.num_tokens * h * dv];
        let mut out =
            DeviceRows::from_f32(client, &nan, act, p.num_tokens, h * dv, h * dv).map_err(e)?;
        decode::paged_decode(&q, &direct, &dbatch, &opts.clone().into(), &mut out).map_err(e)?;
        trace(|| format!("decode {} {act}: burn", case.name));
        let qt = tensor3::<B>(&p.q, p.num_tokens, h, dk, h * dk, act, &device);
        let got = cache.decode(qt, &batch, &opts).map_err(e)?;
        trace(|| format!("decode {} {act}: compare", case.name));
        let (w, g) = (out.to_bits().map_err(e)?, bits(got));
        if w != g {
            let n = w.iter().zip(&g).filter(|(a, b)| a != b).count();
            return Err(format!("opts {opts:?}: {n} of {} outputs differ", w.len()));
        }
    }
    Ok(())
}

#[test]
fn gpu_burn_decode_equals_direct_path_bit_for_bit() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_burn_decode_equals_direct_path_bit_for_bit")
    else {
        return;
    };
    let mut cases = decode_cases();
    cases.retain(|c| DECODE_CASES.contains(&c.name) || FUSED_CASES.contains(&c.name));
    let tally = par_map(&cases, |case| {
        let mut out = Vec::new();
        for act in ACTS {
            let p = Problem::generate(case, act).unwrap();
            for (policy, unq, _) in COMBOS.iter().filter(|c| c.2 == act) {
                let cfg = config(case, policy, *unq);
                let what = |b| format!("{} {b} {policy}/{unq} act {act}", case.name);
                out.push((
                    what("cube"),
                    decode_case::<Cube>(&client, case, &p, &cfg, act),
                ));
                if fused(case, policy, act) {
                    out.push((
                        what("fusion"),
                        decode_case::<Fused>(&client, case, &p, &cfg, act),
                    ));
                }
            }
        }
        out
    });
    tally.finish("decode");
}

/// A fill (and a copy_blocks) into a 1 GiB cache allocates no second cache: device memory in
/// use grows by less than 64 MiB (the new rows and the metadata), on both backends.
fn in_place_fill<B: PagedKvBackend<Device = CudaDevice>>(client: &ComputeClient<Cuda>, name: &str) {
    let device = CudaDevice::new(0);
    // 8192 pages x 64 tokens x 8 heads x 128 dims x 1 byte = 512 MiB per side.
    let layout = PagedKvLayout::new(8192, 64, 8, 128, 128, KvLayoutKind::Bshd).unwrap();
    let cfg = KvCacheConfig::new("fp8", layout)
        .unwrap()
        .with_scales(KvScales::new(0.1, 0.05).unwrap());
    assert!(cfg.size_bytes() >= 1 << 30);
    let mut cache = KvCache::<B>::new(&cfg, &device).unwrap();
    let (batch_size, ctx) = (32, 4096);
    let pages = ctx / 64;
    let table: Vec<i32> = (0..(batch_size * pages) as i32).collect();
    let meta = BatchMetadata::decode(vec![ctx as i32; batch_size], table, pages).unwrap();
    let batch = KvBatch::<B>::new(meta, &layout, batch_size, &device).unwrap();
    let rows: Vec<f32> = (0..batch_size * 8 * 128)
        .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
        .collect();
    let k = tensor3::<B>(&rows, batch_size, 8, 128, 8 * 128, Dtype::Bf16, &device);
    let v = k.clone();
    B::sync(&device).unwrap();
    let before = client.memory_usage().unwrap().bytes_in_use;
    cache.fill(k, v, &batch).unwrap();
    // Sequence b's new token went to slot 63 of its last page, b * 64 + 63.
    cache.copy_blocks(&[(63, 8000), (127, 8001)]).unwrap();
    B::sync(&device).unwrap();
    let after = client.memory_usage().unwrap().bytes_in_use;
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "{name}: device memory in use {before} -> {after} bytes around a fill and a copy_blocks of a {} byte cache",
        cfg.size_bytes()
    );
    assert!(
        after < before + (64 << 20),
        "{name}: memory in use grew from {before} to {after} bytes: the 1 GiB cache was copied"
    );
    // The writes happened: the copy of page 63 holds its codes, its slot 63 the new token's.
    let host = cache.to_host().unwrap();
    let page = layout.tensor(KvSide::K).page_stride;
    assert_eq!(
        host.k[63 * page..64 * page],
        host.k[8000 * page..8001 * page],
        "{name}: copy_blocks did not copy page 63"
    );
    let slot = &host.k[63 * page + 63 * 8 * 128..64 * page];
    assert!(
        slot.iter().any(|&c| c != 0),
        "{name}: the new token's codes are all zero"
    );
}

#[test]
fn gpu_burn_fill_into_1_gib_cache_stays_in_place() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_burn_fill_into_1_gib_cache_stays_in_place")
    else {
        return;
    };
    in_place_fill::<Cube>(&client, "cube");
    in_place_fill::<Fused>(&client, "fusion");
}

#[test]
fn gpu_burn_policy_none_and_fp8_caches_report_their_dtype_and_size() {
    let Some(_client) = fp8kv::testing::client_or_skip(
        "gpu_burn_policy_none_and_fp8_caches_report_their_dtype_and_size",
    ) else {
        return;
    };
    let device = CudaDevice::new(0);
    let layout = PagedKvLayout::new(4, 16, 2, 64, 64, KvLayoutKind::Bhsd).unwrap();
    for (policy, want, bytes) in [
        ("none", QuantPolicy::None, 2),
        ("fp8", QuantPolicy::Fp8E4m3, 1),
        ("fp8_e5m2", QuantPolicy::Fp8E5m2, 1),
    ] {
        let cfg = KvCacheConfig::new(policy, layout).unwrap();
        let cache = KvCache::<Fused>::new(&cfg, &device).unwrap();
        assert_eq!(cache.policy(), want);
        assert_eq!(cache.size_bytes(), bytes * 2 * 4 * 16 * 2 * 64);
        assert_eq!(cache.to_host().unwrap().k.len(), bytes * 4 * 16 * 2 * 64);
    }
}

/// Burn's CUDA allocator gives a new `[n, heads, dim]` tensor rows padded to a power-of-two
/// pitch of at most 256 bytes: at d80 f16, 160 bytes of values in each 256-byte row. The
/// adapter's kernels need each token's `[heads, dim]` block packed, so it copies such a tensor
/// with Burn's `into_contiguous` first (`crates/fp8kv-burn/src/cube.rs`). This pins both facts with no fp8kv
/// code involved: the strides are pitched, and Burn's copy is exact. Run alone under
/// compute-sanitizer's initcheck, it is the reproducer of the finding in `tests/README.md`:
/// CubeCL's checked reads clamp an out-of-range index to the buffer's last element, which lies
/// in the last row's padding, never written, and discard the value.
#[test]
fn gpu_burn_pitched_activations_are_copied_exactly() {
    let Some(_client) =
        fp8kv::testing::client_or_skip("gpu_burn_pitched_activations_are_copied_exactly")
    else {
        return;
    };
    let device = CudaDevice::new(0);
    let (n, heads, dim) = (3, 7, 80);
    let mut rng = fp8kv::testing::Rng::new(0x9172);
    let vals: Vec<f32> = (0..n * heads * dim).map(|_| rng.normal() as f32).collect();
    let t = Tensor::<Cube, 3>::from_data(
        TensorData::new(vals.clone(), [n, heads, dim]),
        (&device, DType::F16),
    );
    let prim = t.into_primitive().tensor();
    assert_eq!(
        prim.meta.strides().to_vec(),
        vec![heads * 128, 128, 1],
        "Burn no longer pitches d80 f16 rows to 256 bytes: the adapter's copy may be unneeded"
    );
    let packed = burn_cubecl::kernel::into_contiguous(prim);
    assert_eq!(packed.meta.strides().to_vec(), vec![heads * dim, dim, 1]);
    let got = bits(Tensor::<Cube, 3>::from_primitive(
        burn_tensor::TensorPrimitive::Float(packed),
    ));
    let want: Vec<u32> = vals
        .iter()
        .map(|&x| u32::from(half::f16::from_f32(x).to_bits()))
        .collect();
    assert_eq!(got, want, "Burn's into_contiguous changed values");
}

/// `KvCache::fill_rope` on one backend: the whole cache and Q against the reference.
fn fill_rope_case<B: PagedKvBackend<Device = CudaDevice>>(policy: &str) -> Result<(), String> {
    use fp8kv_burn::{QkvHeads, RopeTable, RopeTableTensor};
    let device = CudaDevice::default();
    let heads = QkvHeads {
        q_heads: 9,
        kv_heads: 3,
        head_dim: 64,
    };
    let layout = PagedKvLayout::new(64, 16, 3, 64, 64, KvLayoutKind::Bshd).unwrap();
    // A 5-token prefill chunk after 11 cached tokens, then a decode token at position 700.
    let table_rows: Vec<i32> = (0..2 * 44).map(|i| i * 7 % 64).collect();
    let meta = BatchMetadata::new(vec![0, 5], vec![5, 1], vec![16, 701], table_rows, 44).unwrap();
    let act = Dtype::Bf16;
    let mut rng = fp8kv::testing::Rng::from_name(&format!("gpu_burn/fill_rope/{policy}"));
    let row = heads.row_elems();
    let qkv: Vec<f32> = (0..6 * row)
        .map(|_| act.round_trip((rng.normal() * 3.0) as f32))
        .collect();
    let table = RopeTable::new(10_000.0, 64, 64, 720).unwrap();
    let cfg = KvCacheConfig::new(policy, layout).unwrap();
    let cfg = cfg.with_scales(KvScales::new(0.8, 1.3).unwrap());
    let mut cache = KvCache::<B>::new(&cfg, &device).map_err(|e| e.to_string())?;
    // Every slot written first (one 1,024-token sequence over all 64 pages), so the cache read
    // back below holds no uninitialised byte and the untouched slots are compared too.
    let all = BatchMetadata::new(vec![0], vec![1024], vec![1024], (0..64).collect(), 64).unwrap();
    let all = KvBatch::<B>::new(all, &layout, 1024, &device).unwrap();
    let kv: Vec<f32> = (0..1024 * 192).map(|_| rng.normal() as f32).collect();
    let kv_tensor = || {
        Tensor::<B, 3>::from_data(
            TensorData::new(kv.clone(), [1024, 3, 64]),
            (&device, DType::BF16),
        )
    };
    cache
        .fill(kv_tensor(), kv_tensor(), &all)
        .map_err(|e| e.to_string())?;
    let before = cache.to_host().map_err(|e| e.to_string())?;
    let batch = KvBatch::<B>::new(meta.clone(), &layout, 6, &device).unwrap();
    let x = Tensor::<B, 2>::from_data(
        TensorData::new(qkv.clone(), [6, row]),
        (&device, DType::BF16),
    );
    let q = cache
        .fill_rope(x, &batch, &RopeTableTensor::new(&table, &device), heads)
        .map_err(|e| e.to_string())?;
    let mut want = before;
    let want_q = fp8kv::reference::fill_rope(
        &mut want,
        fp8kv::reference::HostRows {
            data: &qkv,
            row_stride: row,
        },
        6,
        &meta,
        &table,
        heads,
        act,
    )
    .map_err(|e| e.to_string())?;
    let got = cache.to_host().map_err(|e| e.to_string())?;
    if got != want {
        return Err(format!("{policy}: the cache differs from the reference"));
    }
    let want_bits: Vec<u32> = want_q
        .iter()
        .map(|&x| u32::from(half::bf16::from_f32(x).to_bits()))
        .collect();
    if bits(q) != want_bits {
        return Err(format!("{policy}: Q differs from the reference"));
    }
    Ok(())
}

#[test]
fn gpu_burn_fill_rope_equals_the_reference_bit_for_bit() {
    if fp8kv::testing::client_or_skip("gpu_burn_fill_rope_equals_the_reference_bit_for_bit")
        .is_none()
    {
        return;
    }
    let mut failures = Vec::new();
    for policy in ["fp8_e4m3", "fp8_e5m2", "none"] {
        for r in [
            fill_rope_case::<Cube>(policy),
            fill_rope_case::<Fused>(policy),
        ] {
            if let Err(e) = r {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `calibrate` and `saturation` on backend `B` (the library's statistics kernel) against counts
/// and maxima taken on the host from the same values, for each FP8 format; random values
/// spanning both formats' ranges, in bf16 with a pitched head dim (80: Burn pads its rows, so
/// the kernel reads them through the adapter's gather) and in f32.
fn stats_case<B: PagedKvBackend<Device = CudaDevice>>() -> Result<(), String> {
    let e = |x: fp8kv::Fp8KvError| x.to_string();
    let device = CudaDevice::new(0);
    for (act, dim) in [(Dtype::Bf16, 80), (Dtype::F32, 64)] {
        let (n, heads) = (37, 3);
        let mut rng = fp8kv::testing::Rng::from_name(&format!("stats_case {act} {dim}"));
        // |x| up to about 1e5: beyond E4M3's 448 often, E5M2's 57344 sometimes.
        let mut draw = || {
            let x = (rng.uniform() * 2.0 - 1.0) * 10f64.powf(rng.uniform() * 5.0);
            act.round_trip(x as f32)
        };
        let kv: Vec<f32> = (0..n * heads * dim).map(|_| draw()).collect();
        let vv: Vec<f32> = (0..n * heads * dim).map(|_| draw()).collect();
        let t = |vals: &[f32]| {
            Tensor::<B, 3>::from_data(
                TensorData::new(vals.to_vec(), [n, heads, dim]),
                (&device, burn_dtype(act)),
            )
        };
        let (k, v) = (t(&kv), t(&vv));
        let layout = PagedKvLayout::new(4, 16, heads, dim, dim, KvLayoutKind::Bshd).map_err(e)?;
        let amax = |vals: &[f32]| vals.iter().fold(0f32, |m, x| m.max(x.abs()));
        let over = |vals: &[f32], lim: f32| vals.iter().filter(|x| x.abs() > lim).count() as u64;
        for (policy, max) in [("fp8_e4m3", 448.0f32), ("fp8_e5m2", 57344.0)] {
            let cfg = KvCacheConfig::new(policy, layout)
                .map_err(e)?
                .with_scales(KvScales::new(0.5, 2.0).map_err(e)?);
            let cache = KvCache::<B>::new(&cfg, &device).map_err(e)?;
            let sat = cache.saturation(&k, &v).map_err(e)?;
            let want = (over(&kv, max * 0.5), over(&vv, max * 2.0));
            if (sat.k, sat.v) != want || sat.per_side != (n * heads * dim) as u64 {
                return Err(format!(
                    "{act} d{dim} {policy}: saturation {sat:?}, want {want:?}"
                ));
            }
            let scales = cache.calibrate(&k, &v).map_err(e)?;
            let want = (amax(&kv) / max, amax(&vv) / max);
            if (scales.k(), scales.v()) != want {
                return Err(format!(
                    "{act} d{dim} {policy}: scales {scales:?}, want {want:?}"
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn gpu_burn_calibrate_and_saturation_run_the_stats_kernel() {
    if fp8kv::testing::client_or_skip("gpu_burn_calibrate_and_saturation_run_the_stats_kernel")
        .is_none()
    {
        return;
    }
    stats_case::<Cube>().unwrap_or_else(|e| panic!("CubeBackend: {e}"));
    stats_case::<Fused>().unwrap_or_else(|e| panic!("Fusion<CubeBackend>: {e}"));
}
