//! The launches `cargo xtask codegen` compiles: for each kernel family, every instantiation
//! worth inspecting, made through the public entry points on tiny valid inputs (the offline
//! client compiles instead of running, so nothing is read back). The order of the launches
//! is the order of the report's `__2`, `__3`.. variants: keep it.

use cubecl::client::ComputeClient;
use cubecl::Runtime;

use fp8kv::device::{DeviceBatch, DeviceRows, PagedKvCache};
use fp8kv::error::{KvSide, Result};
use fp8kv::kernels::fill::{fill, fill_rope, fill_with_stats};
use fp8kv::kernels::flatten::flatten_new;
use fp8kv::kernels::stats::{kv_stats, DeviceKvStats};
use fp8kv::layout::{KvLayoutKind, PagedKvLayout};
use fp8kv::policy::{Dtype, QuantPolicy};
use fp8kv::scales::KvScales;
use fp8kv::{paged_decode, CombineChoice, DecodeOptions, DecodeShape, DecodeStrategy};
use fp8kv::{AttentionOptions, FlattenLayout};
use fp8kv_llama::layer::{
    add_rms_norm, argmax_rows, gemv, gemv_swiglu, rms_norm, rope_qkv, swiglu, IndexDtype, QkvHeads,
    RopeTable,
};

/// Every cache kind the kernels serve: both FP8 formats and the unquantized cache in both half
/// types (the codegen sample hooks walk it).
const CACHE_KINDS: [(QuantPolicy, Dtype); 4] = [
    (QuantPolicy::Fp8E4m3, Dtype::E4m3),
    (QuantPolicy::Fp8E5m2, Dtype::E5m2),
    (QuantPolicy::None, Dtype::F16),
    (QuantPolicy::None, Dtype::Bf16),
];

/// The activation dtypes the kernels take.
const ACT_DTYPES: [Dtype; 3] = [Dtype::F16, Dtype::Bf16, Dtype::F32];

/// One tiny launch the codegen hooks make: a cache kind, an activation dtype and a layout.
#[derive(Debug, Clone, Copy)]
struct CodegenSample {
    /// Cache layout (4 pages of 16 tokens, 2 KV heads).
    pub layout: PagedKvLayout,
    /// Quant policy.
    pub policy: QuantPolicy,
    /// Cache element.
    pub cache: Dtype,
    /// Activation dtype (fill input, flatten output).
    pub act: Dtype,
}

/// The instantiations worth compiling offline for a streaming kernel: every head-dim pair
/// (e4m3, bf16), every (cache, activation) pair at head dim 128, and the Bhsd layout.
fn codegen_samples() -> fp8kv::Result<Vec<CodegenSample>> {
    use fp8kv::layout::SUPPORTED_HEAD_DIMS;
    let e4m3 = (QuantPolicy::Fp8E4m3, Dtype::E4m3);
    let mut combos = Vec::new();
    for (dk, dv) in SUPPORTED_HEAD_DIMS {
        combos.push((dk, dv, e4m3, Dtype::Bf16, KvLayoutKind::Bshd));
    }
    for kind in CACHE_KINDS {
        for act in ACT_DTYPES {
            combos.push((128, 128, kind, act, KvLayoutKind::Bshd));
        }
    }
    combos.push((128, 128, e4m3, Dtype::Bf16, KvLayoutKind::Bhsd));
    combos
        .into_iter()
        .map(|(dk, dv, (policy, cache), act, kind)| {
            Ok(CodegenSample {
                layout: PagedKvLayout::new(4, 16, 2, dk, dv, kind)?,
                policy,
                cache,
                act,
            })
        })
        .collect()
}

/// The Llama-like sample (head dim 128, e4m3 cache, bf16 activations, Bshd) that the hooks
/// also launch with their extra settings.
fn codegen_llama(samples: &[CodegenSample]) -> CodegenSample {
    samples
        .iter()
        .copied()
        .find(|s| s.layout.head_dim_k() == 128)
        .expect("the head-dim list includes 128")
}

/// Batch metadata valid for every [`CodegenSample`] layout: 4 packed new tokens.
fn codegen_batch() -> fp8kv::Result<fp8kv::layout::BatchMetadata> {
    fp8kv::layout::BatchMetadata::new(vec![0, 3], vec![3, 1], vec![20, 1], vec![0, 1, 2, -1], 2)
}

/// Fill: every [`CodegenSample`] at scale 0.15, the Llama sample at 1.0 and 1e-30, the
/// statistics variant at bf16, and RoPE fused into the fill for each cache kind.
pub fn fill_samples<R: Runtime>(client: &ComputeClient<R>) -> Result<()> {
    use fp8kv::policy::Dtype;
    use fp8kv::scales::KvScales;
    let samples = codegen_samples()?;
    // The shared samples at a Markstein-division scale, then the other two division modes.
    let mut launches: Vec<_> = samples.iter().map(|s| (*s, 0.15)).collect();
    launches.extend([1.0, 1e-30].map(|scale| (codegen_llama(&samples), scale)));
    for (s, scale) in launches {
        let scales = KvScales::new(scale, scale)?;
        let mut cache = PagedKvCache::new(client, s.layout, s.policy, s.cache, scales)?;
        let batch = DeviceBatch::new(client, codegen_batch()?, &s.layout, 4)?;
        let row = |side| s.layout.num_kv_heads() * s.layout.head_dim(side);
        let k = DeviceRows::empty(client, s.act, 4, row(KvSide::K), row(KvSide::K))?;
        let v = DeviceRows::empty(client, s.act, 4, row(KvSide::V), row(KvSide::V))?;
        fill(&mut cache, &k, &v, &batch)?;
        // The statistics variant of the bf16-activation samples (every head dim and cache).
        if s.act == Dtype::Bf16 && scale == 0.15 {
            let mut stats = DeviceKvStats::new(client);
            fill_with_stats(&mut cache, &k, &v, &batch, &mut stats)?;
        }
    }
    // The RoPE fill at SmolLM2's shape (9 / 3 heads of 64, page 16), bf16 in, each cache.
    let heads = fp8kv::rope::QkvHeads {
        q_heads: 9,
        kv_heads: 3,
        head_dim: 64,
    };
    let layout = fp8kv::layout::PagedKvLayout::new(4, 16, 3, 64, 64, fp8kv::KvLayoutKind::Bshd)?;
    let meta = fp8kv::layout::BatchMetadata::decode(vec![3, 5], vec![0, 1, 2, 3], 2)?;
    let batch = DeviceBatch::new(client, meta, &layout, 2)?;
    let table = DeviceRows::empty(client, Dtype::F32, 8, 64, 64)?;
    for (policy, dtype) in [
        (fp8kv::QuantPolicy::Fp8E4m3, Dtype::E4m3),
        (fp8kv::QuantPolicy::Fp8E5m2, Dtype::E5m2),
        (fp8kv::QuantPolicy::None, Dtype::Bf16),
    ] {
        let mut cache = PagedKvCache::new(client, layout, policy, dtype, KvScales::default())?;
        let qkv = DeviceRows::empty(client, Dtype::Bf16, 2, heads.row_elems(), heads.row_elems())?;
        let mut q = DeviceRows::empty(client, Dtype::Bf16, 2, 576, 576)?;
        fill_rope(&mut cache, &qkv, &batch, &table, heads, 64, &mut q)?;
    }
    Ok(())
}

/// Flatten: every [`CodegenSample`] to `hsd`, the Llama sample also to `shd`.
pub fn flatten_samples<R: Runtime>(client: &ComputeClient<R>) -> Result<()> {
    use fp8kv::scales::KvScales;
    let samples = codegen_samples()?;
    // Every shared sample into hsd, and the first (d128 e4m3 → bf16) into shd as well.
    let mut launches: Vec<_> = samples.iter().map(|s| (*s, FlattenLayout::Hsd)).collect();
    launches.push((codegen_llama(&samples), FlattenLayout::Shd));
    for (s, out_layout) in launches {
        let cache = PagedKvCache::new(
            client,
            s.layout,
            s.policy,
            s.cache,
            KvScales::new(0.5, 0.25)?,
        )?;
        let batch = DeviceBatch::for_reads(client, codegen_batch()?, &s.layout)?;
        flatten_new(client, &cache, &batch, out_layout, s.act)?;
    }
    Ok(())
}

/// Statistics: every activation dtype at two row widths.
pub fn stats_samples<R: Runtime>(client: &ComputeClient<R>) -> Result<()> {
    let scales = KvScales::new(0.5, 0.25)?;
    for act in ACT_DTYPES {
        for (kw, vw) in [(1024, 1024), (576, 512)] {
            let mut stats = DeviceKvStats::new(client);
            let k = DeviceRows::empty(client, act, 4, kw, kw)?;
            let v = DeviceRows::empty(client, act, 4, vw, vw)?;
            kv_stats(&mut stats, &k, &v, &scales, QuantPolicy::Fp8E4m3)?;
        }
    }
    Ok(())
}

/// Decode: Llama-3-8B decode with each cache dtype, the MLA dims with an e4m3 and a bf16
/// cache, 8 rows per cube, every option on; each on every split kernel that applies.
pub fn decode_samples<R: Runtime>(client: &ComputeClient<R>) -> Result<()> {
    use fp8kv::layout::{BatchMetadata, KvLayoutKind, PagedKvLayout};
    use fp8kv::policy::{Dtype, QuantPolicy};
    use fp8kv::scales::KvScales;
    /// One sample: heads / KV heads, K / V head dims, page size, policy and cache dtype, new
    /// tokens per sequence, every option on.
    struct Sample(
        usize,
        usize,
        usize,
        usize,
        usize,
        QuantPolicy,
        Dtype,
        i32,
        bool,
    );
    let samples = [
        Sample(
            32,
            8,
            128,
            128,
            64,
            QuantPolicy::Fp8E4m3,
            Dtype::E4m3,
            1,
            false,
        ),
        Sample(
            32,
            8,
            128,
            128,
            64,
            QuantPolicy::Fp8E5m2,
            Dtype::E5m2,
            1,
            false,
        ),
        Sample(
            32,
            8,
            128,
            128,
            64,
            QuantPolicy::None,
            Dtype::Bf16,
            1,
            false,
        ),
        Sample(
            16,
            8,
            256,
            256,
            64,
            QuantPolicy::Fp8E4m3,
            Dtype::E4m3,
            1,
            false,
        ),
        Sample(
            16,
            1,
            576,
            512,
            64,
            QuantPolicy::Fp8E4m3,
            Dtype::E4m3,
            1,
            false,
        ),
        Sample(
            16,
            1,
            576,
            512,
            64,
            QuantPolicy::None,
            Dtype::Bf16,
            1,
            false,
        ),
        // SmolLM2-135M (9 / 3 heads) and Llama-3.2-1B (32 / 8) at head dim 64.
        Sample(
            9,
            3,
            64,
            64,
            64,
            QuantPolicy::Fp8E4m3,
            Dtype::E4m3,
            1,
            false,
        ),
        Sample(
            32,
            8,
            64,
            64,
            64,
            QuantPolicy::Fp8E4m3,
            Dtype::E4m3,
            1,
            false,
        ),
        Sample(
            32,
            4,
            128,
            128,
            16,
            QuantPolicy::Fp8E4m3,
            Dtype::E4m3,
            1,
            true,
        ),
    ];
    for Sample(heads, kv_heads, dk, dv, page, policy, dtype, q_len, all_opts) in samples {
        let layout = PagedKvLayout::new(4, page, kv_heads, dk, dv, KvLayoutKind::Bshd)?;
        let cache = PagedKvCache::new(client, layout, policy, dtype, KvScales::default())?;
        let meta = BatchMetadata::new(vec![0], vec![q_len], vec![2 * page as i32], vec![0, 1], 2)?;
        let batch = DeviceBatch::new(client, meta, &layout, q_len as usize)?;
        let q = DeviceRows::empty(client, Dtype::Bf16, q_len as usize, heads * dk, heads * dk)?;
        let mut out =
            DeviceRows::empty(client, Dtype::Bf16, q_len as usize, heads * dv, heads * dv)?;
        let opts = if all_opts {
            AttentionOptions {
                sm_scale: Some(0.1),
                window: Some(64),
                softcap: Some(30.0),
                sinks: Some(vec![0.0; heads]),
                alibi_slopes: Some(vec![0.1; heads]),
            }
        } else {
            AttentionOptions::default()
        };
        let opts = DecodeOptions::new(opts);
        paged_decode(&q, &cache, &batch, &opts, &mut out)?;
        // The same with the combine kernel (Auto merges this plan's one split in the split
        // kernel), so both forms of the merge are compiled and checked.
        let separate = opts.clone().with_combine(CombineChoice::Separate);
        paged_decode(&q, &cache, &batch, &separate, &mut out)?;
        // The tensor-core kernels of the same sample, where they apply.
        let shape = DecodeShape {
            cache: dtype,
            query: Dtype::Bf16,
            head_dim_k: dk,
            head_dim_v: dv,
            group: heads / kv_heads,
            max_q_len: q_len as usize,
        };
        for strategy in [
            DecodeStrategy::TensorCores,
            DecodeStrategy::KeyMajor,
            DecodeStrategy::Wide,
        ] {
            if strategy.applies(&shape) {
                paged_decode(
                    &q,
                    &cache,
                    &batch,
                    &opts.clone().with_strategy(strategy),
                    &mut out,
                )?;
            }
        }
    }
    Ok(())
}

/// The SmolLM2 block kernels (hidden 576, MLP 1536, 9 / 3 heads of 64, GEMV at 1–16 rows and
/// groups of 16, its tensor-core kernel at 33 and 64 rows, argmax), for each activation dtype.
pub fn layer_samples<R: Runtime>(client: &ComputeClient<R>) -> Result<()> {
    use fp8kv::layout::{BatchMetadata, KvLayoutKind, PagedKvLayout};
    let heads = QkvHeads {
        q_heads: 9,
        kv_heads: 3,
        head_dim: 64,
    };
    let layout = PagedKvLayout::new(4, 16, 3, 64, 64, KvLayoutKind::Bshd)?;
    let meta = BatchMetadata::decode(vec![3, 5], vec![0, 1, 2, 3], 2)?;
    let batch = DeviceBatch::new(client, meta, &layout, 2)?;
    let table = RopeTable::new(1e4, 64, 64, 8)?;
    let table = DeviceRows::from_f32(client, table.values(), Dtype::F32, 8, 64, 64)?;
    let w = DeviceRows::from_f32(client, &[1.0; 576], Dtype::F32, 1, 576, 576)?;
    for act in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        let rows = |width: usize| DeviceRows::empty(client, act, 2, width, width);
        let (x, r) = (rows(576)?, rows(576)?);
        let (mut sum, mut out) = (rows(576)?, rows(576)?);
        rms_norm(&x, &w, 1e-5, &mut out)?;
        add_rms_norm(&x, &r, &w, 1e-5, &mut sum, &mut out)?;
        let (gu, mut h) = (rows(3072)?, rows(1536)?);
        swiglu(&gu, &mut h)?;
        let qkv = rows(heads.row_elems())?;
        let (mut q, mut k, mut v) = (rows(576)?, rows(192)?, rows(192)?);
        rope_qkv(&qkv, &batch, &table, heads, 64, &mut q, &mut k, &mut v)?;
        // The decode step's matmuls: every row count up to 16 compiles its own CUDA-core
        // kernel, more rows the 16-row one (f32) or the tensor-core kernel by row tiles.
        let weight = DeviceRows::empty(client, act, 960, 576, 576)?;
        for m in [1, 2, 4, 8, 16, 33, 64] {
            let xm = DeviceRows::empty(client, act, m, 576, 576)?;
            let mut om = DeviceRows::empty(client, act, m, 960, 960)?;
            gemv(&xm, &weight, &mut om)?;
            let gate_up = DeviceRows::empty(client, act, 3072, 576, 576)?;
            let mut hm = DeviceRows::empty(client, act, m, 1536, 1536)?;
            gemv_swiglu(&xm, &gate_up, &mut hm)?;
        }
        // The down projection's k (1536: 8 warps split it on tensor cores).
        let down = DeviceRows::empty(client, act, 576, 1536, 1536)?;
        let xd = DeviceRows::empty(client, act, 64, 1536, 1536)?;
        let mut od = DeviceRows::empty(client, act, 64, 576, 576)?;
        gemv(&xd, &down, &mut od)?;
        let idx = client.empty(2 * 8);
        argmax_rows(&x, &idx, IndexDtype::I32)?;
    }
    Ok(())
}
