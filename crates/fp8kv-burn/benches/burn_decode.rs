//! Decode through the Burn extension against the library's direct entry point, same shape,
//! same run: Llama-3-8B attention (32 query heads, 8 KV heads, head dim 128), batch 32 × 4096,
//! e4m3 cache, page 64, bf16 queries, on `CubeBackend` and `Fusion<CubeBackend>` (what
//! `burn_cuda::Cuda` is by default). Prints each path's wall time per call (the device time
//! when the host runs ahead: the Burn path must add no device work) and its host µs per call.
//!
//! Run: `cargo bench -p fp8kv-burn --bench burn_decode` (needs a CUDA device; without one it
//! prints why and exits). Wall-clock on purpose: a profile of CubeCL's cannot see work that
//! Burn's fusion launches from its own queue.

use burn_cubecl::CubeBackend;
use burn_fusion::Fusion;
use burn_tensor::{DType, Tensor, TensorData};
use cubecl::prelude::*;

use fp8kv::device::{cuda_client, Cuda, DeviceBatch, DeviceRows, PagedKvCache};
use fp8kv::{paged_decode, DecodeOptions};

use fp8kv::testing::Rng;
use fp8kv::AttentionOptions;
use fp8kv::{BatchMetadata, Dtype, KvLayoutKind, KvScales, PagedKvLayout, QuantPolicy};
use fp8kv_burn::{KvBatch, KvCache, KvCacheConfig, PagedKvBackend};

type Cube = CubeBackend<cubecl::cuda::CudaRuntime, half::bf16, i32, u8>;
type Fused = Fusion<Cube>;

const BATCH: usize = 32;
const CONTEXT: usize = 4096;
const PAGE: usize = 64;
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const DIM: usize = 128;
/// The H100's L2 is 50 MB and the H200's 60 MB: rotated caches span at least 6 times that.
const ROTATE_BYTES: usize = 400 << 20;
/// Timed runs (the median is reported).
const RUNS: usize = 9;
/// Calls per timed run (queued back to back, then one device sync).
const CALLS: usize = 200;

fn layout() -> fp8kv::Result<PagedKvLayout> {
    let pages = BATCH * CONTEXT.div_ceil(PAGE);
    PagedKvLayout::new(pages, PAGE, KV_HEADS, DIM, DIM, KvLayoutKind::Bshd)
}

/// One decode token per sequence, pages in shuffled order (a long-running engine's pool).
fn meta() -> fp8kv::Result<BatchMetadata> {
    let per_seq = CONTEXT.div_ceil(PAGE);
    let mut pages: Vec<i32> = (0..(BATCH * per_seq) as i32).collect();
    Rng::new(7).shuffle(&mut pages);
    BatchMetadata::decode(vec![CONTEXT as i32; BATCH], pages, per_seq)
}

fn q_values() -> Vec<f32> {
    (0..BATCH * HEADS * DIM)
        .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
        .collect()
}

/// `(wall µs per call, host µs per call)`, medians of [`RUNS`] runs of [`CALLS`] calls. The
/// host time is the time to issue the calls (a lazy backend's `drain` included).
fn wall_host_us(f: &dyn Fn(usize), drain: &dyn Fn(), sync: &dyn Fn()) -> (f64, f64) {
    for i in 0..5 {
        f(i);
    }
    drain();
    sync();
    let (mut wall, mut host) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let t = std::time::Instant::now();
        for i in 0..CALLS {
            f(i);
        }
        drain();
        host.push(t.elapsed().as_secs_f64() * 1e6 / CALLS as f64);
        sync();
        wall.push(t.elapsed().as_secs_f64() * 1e6 / CALLS as f64);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[RUNS / 2]
    };
    (median(wall), median(host))
}

/// Decode through the Burn extension on backend `B`.
fn bench_backend<B: PagedKvBackend<Device = cubecl::cuda::CudaDevice>>(
    drain: &dyn Fn(),
) -> fp8kv::Result<(f64, f64)> {
    let device = cubecl::cuda::CudaDevice::new(0);
    let layout = layout()?;
    let cfg = KvCacheConfig::new("fp8_e4m3", layout)?.with_scales(KvScales::new(0.05, 0.02)?);
    let copies = ROTATE_BYTES.div_ceil(cfg.size_bytes()).max(1);
    let caches = (0..copies)
        .map(|_| KvCache::<B>::new(&cfg, &device))
        .collect::<fp8kv::Result<Vec<_>>>()?;
    let batch = KvBatch::<B>::new(meta()?, &layout, BATCH, &device)?;
    let q = Tensor::<B, 3>::from_data(
        TensorData::new(q_values(), [BATCH, HEADS, DIM]),
        (&device, DType::BF16),
    );
    let opts = AttentionOptions::default();
    let f = |i: usize| {
        caches[i % copies]
            .decode(q.clone(), &batch, &opts)
            .expect("burn decode");
    };
    let sync = || B::sync(&device).expect("sync");
    Ok(wall_host_us(&f, drain, &sync))
}

/// The direct entry point, timed the same way (a fresh output per call, as the Burn path
/// allocates one).
fn bench_direct(client: &ComputeClient<Cuda>) -> fp8kv::Result<(f64, f64)> {
    let layout = layout()?;
    let scales = KvScales::new(0.05, 0.02)?;
    let policy = QuantPolicy::Fp8E4m3;
    let copies = ROTATE_BYTES.div_ceil(layout.cache_bytes(policy)).max(1);
    let caches = (0..copies)
        .map(|_| PagedKvCache::new(client, layout, policy, Dtype::E4m3, scales))
        .collect::<fp8kv::Result<Vec<_>>>()?;
    let batch = DeviceBatch::new(client, meta()?, &layout, BATCH)?;
    let w = HEADS * DIM;
    let q = DeviceRows::from_f32(client, &q_values(), Dtype::Bf16, BATCH, w, w)?;
    let opts = DecodeOptions::default();
    let f = |i: usize| {
        let mut out = DeviceRows::empty(client, Dtype::Bf16, BATCH, w, w).expect("out");
        paged_decode(&q, &caches[i % copies], &batch, &opts, &mut out).expect("decode");
    };
    let sync = || cubecl::future::block_on(client.sync()).expect("sync");
    Ok(wall_host_us(&f, &|| (), &sync))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run only for the former.
    if !std::env::args().any(|a| a == "--bench") {
        println!("burn_decode bench: pass --bench to run");
        return;
    }
    let client = match cuda_client() {
        Ok(c) => c,
        Err(err) => return println!("SKIPPED burn_decode bench: {err}"),
    };
    let (direct, direct_host) = match bench_direct(&client) {
        Ok(t) => t,
        Err(err) => return println!("  error: {err}"),
    };
    println!("direct entry point, b32 ctx 4096 e4m3, {CALLS} calls + sync: {direct:.1} µs/call wall, host {direct_host:.1} µs/call");
    let device = cubecl::cuda::CudaDevice::new(0);
    let drain = || burn_fusion::get_client::<Cube>(&device).sync(|| ());
    let cube = || bench_backend::<Cube>(&|| ());
    let fused = || bench_backend::<Fused>(&drain);
    type Run<'a> = &'a dyn Fn() -> fp8kv::Result<(f64, f64)>;
    let runs: [(&str, Run); 2] = [
        ("CubeBackend", &cube),
        ("Fusion<CubeBackend> (burn_cuda::Cuda)", &fused),
    ];
    for (name, run) in runs {
        match run() {
            Ok((us, host)) => println!(
                "burn decode b32 ctx 4096 e4m3 via {name}: {us:.1} µs/call wall ({:+.1}% vs direct: {}), host {host:.1} µs/call (extra {:+.1} µs/call)",
                100.0 * (us / direct - 1.0),
                if us <= direct * 1.03 { "within 3%" } else { "MORE THAN 3%" },
                host - direct_host,
            ),
            Err(err) => println!("  {name}: error: {err}"),
        }
    }
}
