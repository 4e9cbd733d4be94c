//! Using fp8kv from Burn: a two-layer FP8 cache, one prefill step and one decode step for two
//! sequences, generic over the backend.
//!
//! ```text
//! cargo run --release --example burn_paged_kv           # NdArray (CPU reference kernels)
//! cargo run --release --example burn_paged_kv -- --cuda # burn_cuda::Cuda (fused), needs a GPU
//! ```

use burn_tensor::{DType, Distribution, ElementConversion, Tensor};
use fp8kv::{AttentionOptions, FlattenLayout};
use fp8kv::{BatchMetadata, KvLayoutKind, KvScales, PagedKvLayout};
use fp8kv_burn::{causal_attention, KvBatch, KvCacheConfig, PagedKvBackend};

const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;

fn run<B: PagedKvBackend>(device: &B::Device, act: DType) -> fp8kv::Result<()> {
    // Every layer's cache from one config: 64 pages of 16 tokens, FP8 E4M3, calibrated scales.
    let layout = PagedKvLayout::new(64, 16, KV_HEADS, HEAD_DIM, HEAD_DIM, KvLayoutKind::Bshd)?;
    let config = KvCacheConfig::new("fp8", layout)?
        .with_layers(2)?
        .with_scales(KvScales::new(0.02, 0.01)?);
    let mut caches = config.init::<B>(device)?;
    println!(
        "{} layers, {} bytes of KV cache",
        caches.len(),
        config.size_bytes()
    );

    // Two sequences with prompts of 20 and 7 tokens; pages 0-3 and 4-7 are theirs.
    let (pages_per_seq, table) = (4, vec![0, 1, 2, 3, 4, 5, 6, 7]);
    let random = |shape: [usize; 3]| {
        Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(act)
    };

    // Prefill: 27 packed tokens. The metadata is validated and uploaded once for all layers.
    let meta = BatchMetadata::new(
        vec![0, 20],
        vec![20, 7],
        vec![20, 7],
        table.clone(),
        pages_per_seq,
    )?;
    let step = KvBatch::<B>::new(meta, &layout, 27, device)?;
    for cache in &mut caches {
        let (q, k, v) = (
            random([27, HEADS, HEAD_DIM]),
            random([27, KV_HEADS, HEAD_DIM]),
            random([27, KV_HEADS, HEAD_DIM]),
        );
        cache.fill(k, v, &step)?;
        // Attend over what the cache now holds: the paged decode kernel takes any number of
        // new tokens per sequence (causal among them), reading the FP8 pages in place.
        let out = cache.decode(q.clone(), &step, &AttentionOptions::default())?;
        println!("prefill: attention output {:?}", out.dims());
        // The same through contiguous K/V: flatten (dequantized) and Burn's tensor ops.
        let (k_all, v_all) = cache.flatten(&step, FlattenLayout::Shd, act)?;
        let starts = step.kv_start_loc();
        for (b, q_range) in [(0, 0..20), (1, 20..27)] {
            let kv = starts[b]..starts[b + 1];
            let flat = causal_attention(
                q.clone().slice(q_range.clone()),
                k_all.clone().slice(kv.clone()),
                v_all.clone().slice(kv),
                None,
            )?;
            let diff: f32 = (flat.cast(DType::F32) - out.clone().slice(q_range).cast(DType::F32))
                .abs()
                .max()
                .into_scalar()
                .elem();
            println!("prefill seq {b}: flatten + causal_attention within {diff:.1e} of it");
        }
    }

    // Decode: one new token per sequence.
    let meta = BatchMetadata::decode(vec![21, 8], table, pages_per_seq)?;
    let step = KvBatch::<B>::new(meta, &layout, 2, device)?;
    for cache in &mut caches {
        cache.fill(
            random([2, KV_HEADS, HEAD_DIM]),
            random([2, KV_HEADS, HEAD_DIM]),
            &step,
        )?;
        let out = cache.decode(
            random([2, HEADS, HEAD_DIM]),
            &step,
            &AttentionOptions::default(),
        )?;
        let sample: Vec<f32> = out
            .clone()
            .cast(DType::F32)
            .slice([0..1, 0..1, 0..4])
            .into_data()
            .to_vec()
            .unwrap_or_default();
        println!("decode: output {:?}, first values {sample:?}", out.dims());
    }
    Ok(())
}

fn main() -> fp8kv::Result<()> {
    if std::env::args().any(|a| a == "--cuda") {
        type Cuda =
            burn_fusion::Fusion<burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>>;
        fp8kv::device::cuda_client()?; // Err(NoDevice) instead of a panic
        run::<Cuda>(&Default::default(), DType::BF16)
    } else {
        run::<burn_ndarray::NdArray>(&Default::default(), DType::F32)
    }
}
