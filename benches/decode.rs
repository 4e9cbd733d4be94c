//! Paged decode attention throughput (Llama-3-8B attention shape: 32 query heads, 8 KV heads,
//! head dim 128, bf16 queries), FP8 e4m3 vs the unquantized bf16 cache, page 64 (and 16), `bshd`
//! (and `bhsd` at 32 × 32768, to compare the layouts' DRAM locality).
//!
//! Work is declared from the problem alone: bytes = the K and V cache bytes every sequence's
//! context occupies (what decode must read at least). Time is device time (CubeCL's profiler:
//! device events around a run of back-to-back calls) after warm-up, median of several runs;
//! caches are rotated among copies so that each call's cache is at least 8 × the L2 away.
//! Every line also prints the fraction of a device-to-device copy's bandwidth measured in the
//! same run (a vectorised copy kernel, bytes read + written).
//!
//! Run: `cargo bench --bench decode` (needs a CUDA device; without one it prints why and exits).
//! Criterion drives the timed runs of every mode but `--shape` (`benches/common`):
//! its statistics, throughput in bytes and reports come with this bench's own lines.
//! `-- --bench --models` runs a catalogue of real models' attention shapes instead (batch 32 ×
//! 8192, SmolLM2 also 128 × 8192; e4m3 and bf16 caches).
//! `-- --bench --paths` instead compares the CUDA-core and tensor-core split kernels on a few
//! shapes (e4m3 and bf16, page 64); `-- --bench --shape 1x32768` runs one e4m3 shape alone,
//! with `--split-tokens N` at that split length instead of the planned one, `--model NAME`
//! at a catalogue model's heads and dims (e.g. `SmolLM2-135M`), `--depth N` at that
//! pipeline depth, `--combine in-kernel|separate` with that merge and `--cache bf16` on the
//! unquantized cache. At batch 1 a line also prints the host's µs per call in bursts of 32
//! calls after a sync (a long run's figure is the device's once the launch queue fills).
//! `--key-major` runs every tensor-core shape of any mode on the key-major kernel
//! (`DecodeStrategy::KeyMajor`, the wide kernel at the MLA dims) instead of Auto's pick; `-- --bench --ab` compares it, A B A B, with the other kernel for each shape
//! class of Auto's table (the tensor-core kernel, or CUDA cores at the MLA dims) and prints
//! Auto's pick. `-- --bench --ab-combine` compares the in-kernel merge with the combine
//! kernel, and `-- --bench --ab-depth` two 16-token blocks in flight per warp in the
//! tensor-core kernels with one, each A B A B.
//! `-- --bench --read-probe` measures the streaming read alone at the split kernels'
//! occupancies (cubes of 128 threads, 2–8 a SM) against the bytes in flight, register loads and
//! `memcpy_async` into shared memory.
//! Decode through the Burn extension is `cargo bench -p fp8kv-burn --bench burn_decode`.

mod common;

use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;

use fp8kv::device::{cuda_client, Cuda, DeviceBatch, DeviceRows, PagedKvCache};
use fp8kv::testing::Rng;
use fp8kv::AttentionOptions;
use fp8kv::{
    auto_strategy, decode_plan, paged_decode, CombineChoice, DecodeOptions, DecodeShape,
    DecodeStrategy, SplitChoice,
};
use fp8kv::{BatchMetadata, Dtype, KvLayoutKind, KvScales, PagedKvLayout, QuantPolicy};

/// The H100's L2 is 50 MB and the H200's 60 MB: rotated caches span at least 6 times that.
const ROTATE_BYTES: usize = 400 << 20;
/// Timed runs per shape (the median is reported).
const RUNS: usize = 9;
/// The copy bandwidth (read + write) the targets were set against: this bench's copy
/// kernel on an H100 80GB HBM3 (2.92–2.97 TB/s over several sessions). On another device each
/// target is also printed scaled by that device's copy bandwidth over this one.
const H100_COPY_TBPS: f64 = 2.93;
/// Device time one timed run aims for.
const RUN_TARGET_US: f64 = 3000.0;

/// A vectorised copy: each thread moves `unroll` 16-byte vectors, loads before stores.
#[cube(launch_unchecked)]
fn copy_kernel(
    src: &Array<Vector<u32, Const<4>>>,
    dst: &mut Array<Vector<u32, Const<4>>>,
    #[comptime] unroll: u32,
) {
    let base = CUBE_POS as u32 * CUBE_DIM * unroll + UNIT_POS;
    let mut v = Array::<Vector<u32, Const<4>>>::new(comptime![unroll as usize]);
    #[unroll]
    for u in 0..unroll {
        v[u as usize] = src[(base + u * CUBE_DIM) as usize];
    }
    #[unroll]
    for u in 0..unroll {
        dst[(base + u * CUBE_DIM) as usize] = v[u as usize];
    }
}

/// Stores a read kernel's fold only in the never-taken case that it hits a constant, so the
/// compiler keeps the loads and nothing but them costs.
#[cube]
fn keep_fold(sink: &mut Array<u32>, x: u32) {
    if x == 0x9E37_79B9u32 {
        sink[CUBE_POS] = x;
    }
}

/// A streaming read: each thread loads `unroll` 16-byte vectors and folds them, so nothing but
/// the reads costs (the fold is stored only in the never-taken case that it hits a constant).
/// Its rate is the read limit each line's share is of.
#[cube(launch_unchecked)]
fn read_kernel(src: &Array<Vector<u32, Const<4>>>, sink: &mut Array<u32>, #[comptime] unroll: u32) {
    let base = CUBE_POS as u32 * CUBE_DIM * unroll + UNIT_POS;
    let mut x = 0u32;
    #[unroll]
    for u in 0..unroll {
        let v = src[(base + u * CUBE_DIM) as usize];
        x ^= v[0] ^ v[1] ^ v[2] ^ v[3];
    }
    keep_fold(sink, x);
}

/// `--read-probe`: a persistent streaming read at a chosen occupancy. `CUBE_COUNT` cubes walk
/// the buffer in steps of the whole grid; each thread issues `unroll` 16-byte loads, folds
/// them, then issues the next step's (so `unroll` loads a thread are in flight at a time, as a
/// split kernel's warp keeps one block in flight while it computes).
#[cube(launch_unchecked)]
fn read_probe_kernel(
    src: &Array<Vector<u32, Const<4>>>,
    sink: &mut Array<u32>,
    #[comptime] unroll: u32,
) {
    let grid_step = CUBE_COUNT as u32 * CUBE_DIM * unroll;
    let n = src.len() as u32;
    let mut base = CUBE_POS as u32 * CUBE_DIM * unroll + UNIT_POS;
    let mut x = 0u32;
    let mut v = Array::<Vector<u32, Const<4>>>::new(comptime![unroll as usize]);
    while base + (unroll - 1) * CUBE_DIM < n {
        #[unroll]
        for u in 0..unroll {
            v[u as usize] = src[(base + u * CUBE_DIM) as usize];
        }
        #[unroll]
        for u in 0..unroll {
            let w = v[u as usize];
            x ^= w[0] ^ w[1] ^ w[2] ^ w[3];
        }
        base += grid_step;
    }
    keep_fold(sink, x);
}

/// `--read-probe`'s shared-memory variant: each cube streams chunks of `chunk` 16-byte vectors
/// through two shared-memory stages filled by `Barrier::memcpy_async` (one unit issues the
/// copy; on sm_90 a 16-byte-aligned element takes libcu++'s bulk-copy path), so the bytes in
/// flight need no registers: while the cube folds one stage, the other is loading.
#[cube(launch_unchecked)]
fn read_bulk_probe_kernel(
    src: &Array<Vector<u32, Const<4>>>,
    sink: &mut Array<u32>,
    #[comptime] chunk: u32,
) {
    let mut smem = SharedMemory::<Vector<u32, Const<4>>>::new(comptime![(2 * chunk) as usize]);
    let b0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let b1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    sync_cube();
    let chunks = src.len() as u32 / chunk;
    let step = CUBE_COUNT as u32;
    let first = CUBE_POS as u32;
    if UNIT_POS == 0 {
        if first < chunks {
            let at = (first * chunk) as usize;
            b0.memcpy_async(
                &src.slice(at, at + chunk as usize),
                &mut smem.slice_mut(0usize, chunk as usize),
            );
        }
        if first + step < chunks {
            let at = ((first + step) * chunk) as usize;
            b1.memcpy_async(
                &src.slice(at, at + chunk as usize),
                &mut smem.slice_mut(chunk as usize, (2 * chunk) as usize),
            );
        }
    }
    let mut x = 0u32;
    let mut c = first;
    let mut i = 0u32;
    while c < chunks {
        let stage = i % 2;
        if stage == 0 {
            b0.arrive_and_wait();
        } else {
            b1.arrive_and_wait();
        }
        let mut k = UNIT_POS;
        while k < chunk {
            let w = smem[(stage * chunk + k) as usize];
            x ^= w[0] ^ w[1] ^ w[2] ^ w[3];
            k += CUBE_DIM;
        }
        // Every unit is done with this stage before it is refilled.
        sync_cube();
        let next = c + 2 * step;
        if UNIT_POS == 0 && next < chunks {
            let at = (next * chunk) as usize;
            let to = (stage * chunk) as usize;
            if stage == 0 {
                b0.memcpy_async(
                    &src.slice(at, at + chunk as usize),
                    &mut smem.slice_mut(to, to + chunk as usize),
                );
            } else {
                b1.memcpy_async(
                    &src.slice(at, at + chunk as usize),
                    &mut smem.slice_mut(to, to + chunk as usize),
                );
            }
        }
        c += step;
        i += 1;
    }
    keep_fold(sink, x);
}

/// `--read-probe`: the streaming read rate at the occupancies the split kernels run at (cubes
/// of 128 threads, `cubes` a SM) against the bytes each keeps in flight, register loads
/// ([`read_probe_kernel`], 1–8 vectors a thread) and shared-memory stages filled by
/// `memcpy_async` ([`read_bulk_probe_kernel`]). Prints TB/s and the share of the read limit.
fn read_probe(client: &ComputeClient<Cuda>) {
    let vecs = (1usize << 30) / 16;
    let src = client.empty(vecs * 16);
    let sms = client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .unwrap_or(132);
    let read = READ_TBPS.get().copied().unwrap_or(f64::NAN);
    let threads = 128u32;
    for cubes in [2u32, 3, 4, 6, 8] {
        let grid = sms * cubes;
        let sink = client.empty(grid as usize * 4);
        for unroll in [1u32, 2, 4, 8] {
            let f = |_: usize| unsafe {
                read_probe_kernel::launch_unchecked::<Cuda>(
                    client,
                    CubeCount::Static(grid, 1, 1),
                    CubeDim::new_1d(threads),
                    // In u32 scalars: the kernels read `src.len()` in vectors of 4.
                    ArrayArg::from_raw_parts(src.clone(), vecs * 4),
                    ArrayArg::from_raw_parts(sink.clone(), grid as usize),
                    unroll,
                )
            };
            // Whole grid steps only (the kernel leaves the last partial one).
            let step = (grid * threads * unroll) as usize;
            let read_bytes = vecs / step * step * 16;
            let tbps = read_bytes as f64 / (median_us(client, &f) * 1e-6) / 1e12;
            println!(
                "read probe: registers, {cubes} cubes of {threads} a SM, {unroll} x 16 B a thread \
                 ({} KiB in flight a SM): {tbps:.2} TB/s, {:.1}% of read",
                cubes * threads * unroll * 16 / 1024,
                100.0 * tbps / read
            );
        }
    }
    for cubes in [2u32, 3, 4, 6] {
        let grid = sms * cubes;
        let sink = client.empty(grid as usize * 4);
        for chunk_kib in [4u32, 8, 16] {
            let chunk = chunk_kib * 1024 / 16;
            let f = |_: usize| unsafe {
                read_bulk_probe_kernel::launch_unchecked::<Cuda>(
                    client,
                    CubeCount::Static(grid, 1, 1),
                    CubeDim::new_1d(threads),
                    // In u32 scalars: the kernels read `src.len()` in vectors of 4.
                    ArrayArg::from_raw_parts(src.clone(), vecs * 4),
                    ArrayArg::from_raw_parts(sink.clone(), grid as usize),
                    chunk,
                )
            };
            let read_bytes = vecs / chunk as usize * chunk as usize * 16;
            let tbps = read_bytes as f64 / (median_us(client, &f) * 1e-6) / 1e12;
            println!(
                "read probe: memcpy_async, {cubes} cubes of {threads} a SM, two stages of {chunk_kib} \
                 KiB ({} KiB in flight a SM): {tbps:.2} TB/s, {:.1}% of read",
                cubes * chunk_kib * 2,
                100.0 * tbps / read
            );
        }
    }
}

/// The streaming read rate (TB/s) of [`read_kernel`] over 1 GiB, set once by `main`.
static READ_TBPS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

fn read_tbps(client: &ComputeClient<Cuda>) -> f64 {
    let bytes = 1usize << 30;
    let (threads, unroll) = (256u32, 8u32);
    let vecs = bytes / 16;
    let src = client.empty(bytes);
    let cubes = (vecs / (threads * unroll) as usize) as u32;
    let sink = client.empty(cubes as usize * 4);
    let f = |_: usize| unsafe {
        read_kernel::launch_unchecked::<Cuda>(
            client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_1d(threads),
            ArrayArg::from_raw_parts(src.clone(), vecs),
            ArrayArg::from_raw_parts(sink.clone(), cubes as usize),
            unroll,
        )
    };
    let us = median_us(client, &f);
    bytes as f64 / (us * 1e-6) / 1e12
}

/// Calls per burst in [`burst_host_us`]: far below the depth of CUDA's launch queue, so no call
/// waits for a slot in it.
const BURST: usize = 32;

/// The host's µs per call of `f` issued in bursts of [`BURST`] calls, each after a device sync
/// (median of 40 bursts): what a call costs the host while the device keeps up. A long run of
/// back-to-back calls measures the device instead wherever the device is the slower: once
/// CUDA's launch queue is full, each launch waits for a kernel to finish (the bench's long-run
/// host figure at batch 1 was 0.93–0.95 of the device time, at 1 × 32768 30 µs).
fn burst_host_us(client: &ComputeClient<Cuda>, f: &(dyn Fn(usize) + Sync)) -> f64 {
    let mut per_call: Vec<f64> = (0..40)
        .map(|r| {
            cubecl::future::block_on(client.sync()).expect("device sync");
            let t = std::time::Instant::now();
            for i in 0..BURST {
                f(r * BURST + i);
            }
            t.elapsed().as_secs_f64() * 1e6 / BURST as f64
        })
        .collect();
    cubecl::future::block_on(client.sync()).expect("device sync");
    per_call.sort_by(f64::total_cmp);
    per_call[per_call.len() / 2]
}

/// The host's µs per launch of [`read_kernel`] on one cube (two arrays and a comptime value),
/// in bursts ([`burst_host_us`]): CubeCL's own cost of a launch, the floor under any kernel's.
fn small_launch_host_us(client: &ComputeClient<Cuda>) -> f64 {
    let src = client.empty(4096);
    let sink = client.empty(4);
    let f = |_: usize| unsafe {
        read_kernel::launch_unchecked::<Cuda>(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(32),
            ArrayArg::from_raw_parts(src.clone(), 256),
            ArrayArg::from_raw_parts(sink.clone(), 1),
            1,
        )
    };
    burst_host_us(client, &f)
}

/// Device microseconds of `f` per call (`calls` back-to-back calls inside one profile), and
/// the host's microseconds per call to issue them: where the second is the larger, the device
/// waits on the host and the first measures the host.
fn device_us(client: &ComputeClient<Cuda>, calls: usize, f: &(dyn Fn(usize) + Sync)) -> (f64, f64) {
    let mut host = 0.0;
    let (_, dur) = client
        .profile(
            || {
                let t = std::time::Instant::now();
                for i in 0..calls {
                    f(i);
                }
                host = t.elapsed().as_secs_f64() * 1e6 / calls as f64;
            },
            "bench",
        )
        .expect("profile");
    let ticks = cubecl::future::block_on(dur.resolve());
    (ticks.duration().as_secs_f64() * 1e6 / calls as f64, host)
}

/// Median device µs per call after warm-up, choosing the calls per run from a first estimate.
fn median_us(client: &ComputeClient<Cuda>, f: &(dyn Fn(usize) + Sync)) -> f64 {
    median_device_host_us(client, f).0
}

/// Median device and host µs per call (see [`device_us`]) after warm-up.
fn median_device_host_us(client: &ComputeClient<Cuda>, f: &(dyn Fn(usize) + Sync)) -> (f64, f64) {
    let (first, _) = device_us(client, 3, f);
    let calls = ((RUN_TARGET_US / first).ceil() as usize).clamp(3, 2000);
    let runs: Vec<(f64, f64)> = (0..RUNS).map(|_| device_us(client, calls, f)).collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[RUNS / 2]
    };
    (
        median(runs.iter().map(|r| r.0).collect()),
        median(runs.iter().map(|r| r.1).collect()),
    )
}

/// Copy bandwidth in TB/s (bytes read + written) over 1 GiB.
fn copy_tbps(client: &ComputeClient<Cuda>) -> f64 {
    let bytes = 1usize << 30;
    let (threads, unroll) = (256u32, 4u32);
    let vecs = bytes / 16;
    let src = client.empty(bytes);
    let dst = client.empty(bytes);
    let cubes = (vecs / (threads * unroll) as usize) as u32;
    let f = |_: usize| unsafe {
        copy_kernel::launch_unchecked::<Cuda>(
            client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_1d(threads),
            ArrayArg::from_raw_parts(src.clone(), vecs),
            ArrayArg::from_raw_parts(dst.clone(), vecs),
            unroll,
        )
    };
    let us = median_us(client, &f);
    2.0 * bytes as f64 / (us * 1e-6) / 1e12
}

/// An attention shape of a real model: what decode's cost depends on.
#[derive(Clone, Copy)]
struct Model {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    head_dim_k: usize,
    head_dim_v: usize,
}

impl Model {
    /// The decode shape of one new token per sequence, bf16 queries, on a `cache` cache.
    fn shape(&self, cache: Dtype) -> DecodeShape {
        DecodeShape {
            cache,
            query: Dtype::Bf16,
            head_dim_k: self.head_dim_k,
            head_dim_v: self.head_dim_v,
            group: self.heads / self.kv_heads,
            max_q_len: 1,
        }
    }
}

/// Llama-3-8B: the shape of the targets.
const LLAMA3_8B: Model = Model {
    name: "Llama-3-8B",
    heads: 32,
    kv_heads: 8,
    head_dim_k: 128,
    head_dim_v: 128,
};

/// SmolLM2-135M, the model of `cargo xtask demo`: small heads over few KV heads, where FP8
/// gains least.
const SMOLLM2: Model = Model {
    name: "SmolLM2-135M",
    heads: 9,
    kv_heads: 3,
    head_dim_k: 64,
    head_dim_v: 64,
};

/// The model catalogue of `--models` (DESIGN.md §3.11): GQA 8 and 7, head dims 64 and 256, and
/// an MLA-like latent cache (one KV head, K 576 / V 512), and the demo's SmolLM2 (GQA 3, d64).
const CATALOGUE: [Model; 7] = [
    LLAMA3_8B,
    Model {
        name: "Llama-3-70B",
        heads: 64,
        ..LLAMA3_8B
    },
    Model {
        name: "Qwen2.5-7B",
        heads: 28,
        kv_heads: 4,
        ..LLAMA3_8B
    },
    Model {
        name: "Llama-3.2-1B(d64)",
        heads: 32,
        kv_heads: 8,
        head_dim_k: 64,
        head_dim_v: 64,
    },
    Model {
        name: "Gemma-2-9B",
        heads: 16,
        kv_heads: 8,
        head_dim_k: 256,
        head_dim_v: 256,
    },
    Model {
        name: "MLA 576/512",
        heads: 16,
        kv_heads: 1,
        head_dim_k: 576,
        head_dim_v: 512,
    },
    SMOLLM2,
];

struct Shape {
    model: Model,
    batch: usize,
    context: usize,
    page_size: usize,
    policy: QuantPolicy,
    target_us: Option<f64>,
    /// Which split kernel (`None`, Auto's pick, in the default table).
    path: Option<DecodeStrategy>,
    /// Cache layout (`bshd`, vLLM's and LMDeploy's default, unless a line says otherwise).
    kind: KvLayoutKind,
    /// Split plan (`Auto` except under `--split-tokens`).
    split: SplitChoice,
    /// Where the splits merge (`Auto` except in `--ab-combine`).
    combine: CombineChoice,
    /// Blocks the tensor-core kernels' loads run ahead (`None`: the default; `--ab-depth`).
    depth: Option<u32>,
}

impl Shape {
    /// An e4m3 `bshd` shape on the default path (the key-major kernel under `--key-major`),
    /// without a target.
    fn e4m3(batch: usize, context: usize, page_size: usize) -> Self {
        Shape {
            model: LLAMA3_8B,
            batch,
            context,
            page_size,
            policy: QuantPolicy::Fp8E4m3,
            target_us: None,
            path: std::env::args()
                .any(|a| a == "--key-major")
                .then_some(DecodeStrategy::KeyMajor),
            kind: KvLayoutKind::Bshd,
            split: SplitChoice::Auto,
            combine: CombineChoice::Auto,
            depth: None,
        }
    }
}

impl Shape {
    /// Exactly the pages the batch's contexts need.
    fn layout(&self) -> fp8kv::Result<PagedKvLayout> {
        let m = self.model;
        let pages = self.batch * self.context.div_ceil(self.page_size);
        PagedKvLayout::new(
            pages,
            self.page_size,
            m.kv_heads,
            m.head_dim_k,
            m.head_dim_v,
            self.kind,
        )
    }

    /// One decode token per sequence, pages handed out in shuffled order, as a long-running
    /// engine's block manager does.
    fn meta(&self) -> fp8kv::Result<BatchMetadata> {
        let pages_per_seq = self.context.div_ceil(self.page_size);
        let mut pages: Vec<i32> = (0..(self.batch * pages_per_seq) as i32).collect();
        Rng::new(7).shuffle(&mut pages);
        BatchMetadata::decode(vec![self.context as i32; self.batch], pages, pages_per_seq)
    }
}

/// A host cache of `layout` holding quantized normal(0, 1) K and V values (a 1 MiB random
/// pattern, tiled): the decode kernels skip the output rescale where no row's max grew, so
/// their time can depend on the data, and with uninitialised caches (whatever an allocation
/// held before) the same kernel and plan measured up to 1.8× apart from one run to the next.
fn random_host_cache(
    layout: PagedKvLayout,
    policy: QuantPolicy,
    dtype: Dtype,
    scales: KvScales,
) -> fp8kv::Result<fp8kv::reference::HostKvCache> {
    let spec = fp8kv::CacheSpec::from_parts(layout, policy, dtype, scales)?;
    let mut host = fp8kv::reference::HostKvCache::new(spec, 0)?;
    let es = dtype.size_bytes();
    let mut rng = Rng::new(0x5eed);
    for (bytes, scale) in [(&mut host.k, scales.k()), (&mut host.v, scales.v())] {
        let pattern: Vec<u8> = (0..(1 << 20) / es)
            .flat_map(|_| {
                let x = rng.normal() as f32;
                let bits = fp8kv::reference::quantize_value(dtype, x, scale).to_le_bytes();
                bits.into_iter().take(es)
            })
            .collect();
        for chunk in bytes.chunks_mut(pattern.len()) {
            chunk.copy_from_slice(&pattern[..chunk.len()]);
        }
    }
    Ok(host)
}

fn bench_shape(client: &ComputeClient<Cuda>, s: &Shape, copy: f64) -> Result<f64, String> {
    let e = |x: fp8kv::Fp8KvError| x.to_string();
    // Every shape sets the depth it wants (the default unless `--ab-depth`), before the plan.
    fp8kv::internals::override_decode_depth(s.depth);
    let m = s.model;
    let layout = s.layout().map_err(e)?;
    let cache_dtype = s.policy.cache_dtype(Dtype::Bf16).map_err(e)?;
    // The key-major kernel covers what the tensor-core kernel does; at the MLA dims its
    // family is the wide kernel, and other shapes keep Auto's pick under `--key-major`.
    let shape = m.shape(cache_dtype);
    let path = match s.path {
        Some(DecodeStrategy::KeyMajor) if !DecodeStrategy::KeyMajor.applies(&shape) => {
            Some(DecodeStrategy::Wide).filter(|w| w.applies(&shape))
        }
        p => p,
    };
    let cache_bytes = layout.cache_bytes(s.policy);
    let copies = ROTATE_BYTES.div_ceil(cache_bytes).max(1);
    let scales = KvScales::new(0.05, 0.02).map_err(e)?;
    let host = random_host_cache(layout, s.policy, cache_dtype, scales).map_err(e)?;
    let caches = (0..copies)
        .map(|_| PagedKvCache::from_host(client, &host))
        .collect::<Result<Vec<_>, _>>()
        .map_err(e)?;
    drop(host);
    let meta = s.meta().map_err(e)?;
    let batch = DeviceBatch::new(client, meta, &layout, s.batch).map_err(e)?;
    let (q_width, out_width) = (m.heads * m.head_dim_k, m.heads * m.head_dim_v);
    let q_vals: Vec<f32> = (0..s.batch * q_width)
        .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
        .collect();
    let q =
        DeviceRows::from_f32(client, &q_vals, Dtype::Bf16, s.batch, q_width, q_width).map_err(e)?;
    let out = std::sync::Mutex::new(
        DeviceRows::empty(client, Dtype::Bf16, s.batch, out_width, out_width).map_err(e)?,
    );
    let mut opts = DecodeOptions {
        attention: AttentionOptions::default(),
        strategy: path,
        split: s.split,
        combine: s.combine,
    };
    // A plan with more splits than the in-kernel merge takes keeps the combine kernel (the
    // line says which ran).
    let plan = match decode_plan(&caches[0], &batch, Dtype::Bf16, m.heads, &opts) {
        Err(_) if opts.combine == CombineChoice::InKernel => {
            opts.combine = CombineChoice::Auto;
            decode_plan(&caches[0], &batch, Dtype::Bf16, m.heads, &opts)
        }
        plan => plan,
    }
    .map_err(e)?;
    let f = |i: usize| {
        let mut o = out.lock().unwrap();
        paged_decode(&q, &caches[i % copies], &batch, &opts, &mut o).expect("decode");
    };
    // At batch 1, where the host's cost per call is the question: how much of it is the
    // validation and plan (`decode_plan`: the same checks, no launch), and what one launch of
    // a two-argument kernel costs in CubeCL.
    let breakdown = if s.batch == 1 {
        let n = 2000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let p = decode_plan(&caches[0], &batch, Dtype::Bf16, m.heads, &opts);
            std::hint::black_box(p.is_ok());
        }
        let plan_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        format!(
            "; in bursts of {BURST} after a sync {:.1} µs/call, of which the plan {plan_us:.2}; a \
             2-argument launch {:.1} µs",
            burst_host_us(client, &f),
            small_launch_host_us(client)
        )
    } else {
        String::new()
    };
    // Bytes of K and V the sequences' contexts occupy.
    let bytes = s.batch * s.context * layout.bytes_per_token(s.policy);
    let mut hosts = Vec::new();
    let name = format!(
        "b{} ctx {} page {} {} {:?} {:?} {:?} {:?} {}",
        s.batch, s.context, s.page_size, s.policy, path, s.kind, s.combine, s.depth, m.name
    );
    let timed = common::measure("decode", &name, bytes as u64, &mut |iters| {
        let (us, host) = device_us(client, iters as usize, &f);
        hosts.push(host);
        us * iters as f64 * 1e-6
    });
    let (us, host_us) = match timed {
        common::Timed::Median(secs) => {
            let mut last: Vec<f64> = hosts.iter().rev().take(10).copied().collect();
            last.sort_by(f64::total_cmp);
            (secs * 1e6, last[last.len() / 2])
        }
        common::Timed::Filtered => return Ok(f64::NAN),
        common::Timed::Off => median_device_host_us(client, &f),
    };
    let tbps = bytes as f64 / (us * 1e-6) / 1e12;
    let verdict = |t: f64| if us <= t { "met" } else { "MISSED" };
    let target = s.target_us.map_or(String::new(), |t| {
        // The same fraction of this device's copy bandwidth as the H100 target asks of an H100.
        let scaled = t * H100_COPY_TBPS / copy;
        if (scaled / t - 1.0).abs() < 0.05 {
            format!("  target ≤ {t:.0} µs: {}", verdict(t))
        } else {
            format!(
                "  H100 target ≤ {t:.0} µs: {}; scaled to this copy ≤ {scaled:.0} µs: {}",
                verdict(t),
                verdict(scaled)
            )
        }
    });
    let kind = match s.kind {
        KvLayoutKind::Bshd => "",
        KvLayoutKind::Bhsd => " [bhsd]",
    };
    let path = path.map_or(String::new(), |p| format!(" [{p}]"));
    // The host's cost per call at batch 1, and wherever it is at least half the device time:
    // near or above it, the device time includes waits for the host.
    let host = if host_us * 2.0 >= us || s.batch == 1 {
        format!("  (host {host_us:.1} µs/call in a long run{breakdown})")
    } else {
        String::new()
    };
    let model = if m.name == LLAMA3_8B.name {
        String::new()
    } else {
        format!(
            " [{}: {}/{} heads, d {}/{}]",
            m.name, m.heads, m.kv_heads, m.head_dim_k, m.head_dim_v
        )
    };
    let merge = format!(
        " [{} split{}{}{}]",
        plan.num_splits,
        if plan.num_splits == 1 { "" } else { "s" },
        if plan.combine_in_kernel {
            ", in-kernel merge"
        } else {
            ", combine kernel"
        },
        s.depth.map_or(String::new(), |d| format!(", depth {d}"))
    );
    println!(
        "decode b{:<3} ctx {:>5} page {:>3} {:<9} {:>9.1} µs {:>6.2} TB/s  {:>5.1}% of copy {:>5.1}% of read{target}{path}{merge}{kind}{model}{host}",
        s.batch,
        s.context,
        s.page_size,
        s.policy.to_string(),
        us,
        tbps,
        100.0 * tbps / copy,
        100.0 * tbps / READ_TBPS.get().copied().unwrap_or(f64::NAN),
    );
    Ok(us)
}

/// Benches `a` then `b` and prints the time ratio `a / b` as `  {label} time: R{note}`, or
/// both results where either failed.
fn bench_ratio(
    client: &ComputeClient<Cuda>,
    copy: f64,
    a: &Shape,
    b: &Shape,
    label: &str,
    note: &str,
) {
    match (bench_shape(client, a, copy), bench_shape(client, b, copy)) {
        // NaN: criterion's filter left one out.
        (Ok(ta), Ok(tb)) if ta.is_nan() || tb.is_nan() => {}
        (Ok(ta), Ok(tb)) => println!("  {label} time: {:.3}{note}", ta / tb),
        (ra, rb) => println!("  error: {ra:?} {rb:?}"),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run only for the former.
    if !std::env::args().any(|a| a == "--bench") {
        println!("decode bench: pass --bench to run");
        return;
    }
    let client = match cuda_client() {
        Ok(c) => c,
        Err(err) => {
            println!("SKIPPED decode bench: {err}");
            return;
        }
    };
    let copy = copy_tbps(&client);
    println!("device-to-device copy (vectorised kernel, read + write): {copy:.2} TB/s");
    let read = read_tbps(&client);
    let _ = READ_TBPS.set(read);
    println!(
        "streaming read (the read limit): {read:.2} TB/s (copy / read {:.3})",
        copy / read
    );
    let args: Vec<String> = std::env::args().collect();
    let own = [
        "--models",
        "--ab",
        "--ab-combine",
        "--ab-depth",
        "--paths",
        "--key-major",
        "--shape",
        "--read-probe",
    ];
    let has = |flag: &str| args.iter().any(|a| a == flag);
    // Criterion times every mode but `--shape` (a
    // profiler's run); it reads the command line only where none of this bench's flags is.
    if !has("--shape") {
        common::start(!own.iter().any(|f| has(f)));
    }
    run_mode(&client, copy, &args);
    common::finish();
}

/// The value after flag `name` in `args`, parsed by `parse`: `None` where the flag is absent,
/// an error naming what it `wants` where its value is missing or does not parse.
fn flag<T>(
    args: &[String],
    name: &str,
    wants: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, String> {
    let Some(at) = args.iter().position(|a| a == name) else {
        return Ok(None);
    };
    match args.get(at + 1).and_then(|v| parse(v)) {
        Some(v) => Ok(Some(v)),
        None => Err(format!("{name} wants {wants}")),
    }
}

/// The mode the command line asks for (see the module docs).
fn run_mode(client: &ComputeClient<Cuda>, copy: f64, args: &[String]) {
    let client = client.clone();
    // `--shape BxC`: only that shape, e4m3, page 64, Auto (for a profiler run).
    if args.iter().any(|a| a == "--shape") {
        let flags = || -> Result<Shape, String> {
            let (batch, context) = flag(args, "--shape", "BATCHxCONTEXT, e.g. 1x32768", |v| {
                let (b, c) = v.split_once('x')?;
                Some((b.parse().ok()?, c.parse().ok()?))
            })?
            .unwrap_or_default();
            // `--split-tokens N`: that split length instead of the planned one (to test the plan).
            let split = flag(args, "--split-tokens", "a token count, e.g. 512", |v| {
                v.parse().ok().map(SplitChoice::Tokens)
            })?
            .unwrap_or(SplitChoice::Auto);
            // `--model NAME`: a catalogue model's heads and dims instead of Llama-3-8B's.
            let names: Vec<_> = CATALOGUE.iter().map(|m| m.name).collect();
            let model = flag(args, "--model", &format!("one of {names:?}"), |v| {
                CATALOGUE
                    .iter()
                    .find(|m| m.name.eq_ignore_ascii_case(v))
                    .copied()
            })?
            .unwrap_or(LLAMA3_8B);
            // `--depth N`: the tensor-core kernels' loads N blocks ahead instead of the default.
            let depth = flag(args, "--depth", "1 or 2", |v| v.parse().ok())?;
            // `--combine in-kernel|separate`: where the splits merge instead of Auto's choice.
            let combine = flag(args, "--combine", "in-kernel or separate", |v| match v {
                "in-kernel" => Some(CombineChoice::InKernel),
                "separate" => Some(CombineChoice::Separate),
                _ => None,
            })?
            .unwrap_or(CombineChoice::Auto);
            // `--cache bf16`: the unquantized bf16 cache instead of e4m3.
            let policy = flag(args, "--cache", "e4m3 or bf16", |v| match v {
                "bf16" => Some(QuantPolicy::None),
                "e4m3" => Some(QuantPolicy::Fp8E4m3),
                _ => None,
            })?
            .unwrap_or(QuantPolicy::Fp8E4m3);
            Ok(Shape {
                split,
                model,
                depth,
                combine,
                policy,
                ..Shape::e4m3(batch, context, 64)
            })
        };
        match flags() {
            Ok(shape) => {
                if let Err(err) = bench_shape(&client, &shape, copy) {
                    println!("  error: {err}");
                }
            }
            Err(usage) => println!("{usage}"),
        }
        return;
    }
    if std::env::args().any(|a| a == "--read-probe") {
        read_probe(&client);
        return;
    }
    if std::env::args().any(|a| a == "--models") {
        // The catalogue at batch 32 × 8192, e4m3 against the bf16 cache, each on its default
        // kernel (tensor cores for head dims 64 and 128, and 256 at these small groups; CUDA cores
        // for the MLA dims).
        // SmolLM2 also at batch 128 (the performance issue's table).
        let runs = CATALOGUE
            .iter()
            .map(|&m| (m, 32))
            .chain(std::iter::once((SMOLLM2, 128)));
        for (model, batch) in runs {
            let shape = |policy| Shape {
                model,
                policy,
                ..Shape::e4m3(batch, 8192, 64)
            };
            bench_ratio(
                &client,
                copy,
                &shape(QuantPolicy::Fp8E4m3),
                &shape(QuantPolicy::None),
                "e4m3 / bf16",
                "",
            );
        }
        return;
    }
    if std::env::args().any(|a| a == "--ab-combine") {
        // The merge in the split kernel against the separate combine kernel, A B A B, on the
        // target shapes and the catalogue (shapes whose plan has more splits than the fused
        // merge takes keep the kernel on both sides: ratio 1).
        let ab = |s: Shape| {
            let a = Shape {
                combine: CombineChoice::InKernel,
                ..s
            };
            let b = Shape {
                combine: CombineChoice::Separate,
                ..s
            };
            bench_ratio(
                &client,
                copy,
                &a,
                &b,
                "in-kernel / separate (first pass)",
                "",
            );
            bench_ratio(&client, copy, &a, &b, "in-kernel / separate", "");
        };
        for (batch, context, page) in [
            (1, 32768, 64),
            (1, 4096, 64),
            (32, 4096, 64),
            (32, 4096, 16),
            (32, 32768, 64),
        ] {
            ab(Shape::e4m3(batch, context, page));
        }
        ab(Shape {
            policy: QuantPolicy::None,
            ..Shape::e4m3(32, 32768, 64)
        });
        for model in CATALOGUE.iter().skip(1) {
            ab(Shape {
                model: *model,
                ..Shape::e4m3(32, 8192, 64)
            });
        }
        ab(Shape {
            model: SMOLLM2,
            ..Shape::e4m3(128, 8192, 64)
        });
        ab(Shape {
            model: SMOLLM2,
            ..Shape::e4m3(1, 1024, 64)
        });
        return;
    }
    if std::env::args().any(|a| a == "--ab-depth") {
        // Two 16-token blocks in flight per warp against one, A B A B, on Auto's kernel, each
        // with its own split plan (the planner counts the cubes each depth leaves resident):
        // the target shapes, the catalogue at 32 × 8192 (the depth changes only the
        // tensor-core kernels; MLA and d256 are controls) and SmolLM2 at 128 × 8192.
        let ab = |s: Shape| {
            let a = Shape {
                depth: Some(2),
                ..s
            };
            let b = Shape {
                depth: Some(1),
                ..s
            };
            bench_ratio(&client, copy, &a, &b, "depth 2 / 1 (first pass)", "");
            bench_ratio(&client, copy, &a, &b, "depth 2 / 1", "");
        };
        for model in CATALOGUE.iter().filter(|m| m.head_dim_k == 64) {
            ab(Shape {
                model: *model,
                ..Shape::e4m3(32, 8192, 64)
            });
        }
        ab(Shape {
            model: SMOLLM2,
            ..Shape::e4m3(128, 8192, 64)
        });
        for (batch, context, page) in [
            (32, 4096, 64),
            (32, 4096, 16),
            (1, 32768, 64),
            (32, 32768, 64),
        ] {
            ab(Shape::e4m3(batch, context, page));
        }
        for model in CATALOGUE.iter().skip(1).filter(|m| m.head_dim_k != 64) {
            ab(Shape {
                model: *model,
                ..Shape::e4m3(32, 8192, 64)
            });
        }
        return;
    }
    if std::env::args().any(|a| a == "--ab") {
        // Per shape class of Auto's table: the key-major kernel (the wide one at the MLA dims)
        // against the other kernel for that shape (the default tensor-core kernel where it
        // applies, CUDA cores otherwise), same shapes, same run, and which one Auto picks.
        let ab = |s: Shape| {
            let m = s.model;
            let Ok(cache) = s.policy.cache_dtype(Dtype::Bf16) else {
                return;
            };
            let shape = m.shape(cache);
            let other = if DecodeStrategy::TensorCores.applies(&shape) {
                DecodeStrategy::TensorCores
            } else {
                DecodeStrategy::CudaCores
            };
            let auto = auto_strategy(&client, &shape);
            let a = Shape {
                path: Some(DecodeStrategy::KeyMajor),
                ..s
            };
            let b = Shape {
                path: Some(other),
                ..a
            };
            // A B A B: read the second pair (the first measurement in a process can run
            // slow; the first pair shows what order effect is left).
            bench_ratio(&client, copy, &a, &b, "key-major / other (first pass)", "");
            bench_ratio(
                &client,
                copy,
                &a,
                &b,
                "key-major / other",
                &format!("  (Auto picks {auto})"),
            );
        };
        // 128 × 32768 is the class of 32 × 32768 (its bf16 cache alone is 17 GB of host
        // pattern to upload): left out.
        for (batch, context) in [(1, 32768), (32, 4096), (32, 32768)] {
            for policy in [QuantPolicy::Fp8E4m3, QuantPolicy::None] {
                ab(Shape {
                    policy,
                    ..Shape::e4m3(batch, context, 64)
                });
            }
        }
        for model in CATALOGUE.iter().skip(1) {
            for policy in [QuantPolicy::Fp8E4m3, QuantPolicy::None] {
                // The bf16 cache at d64 only: the other dims' bf16 class is measured above.
                if policy == QuantPolicy::None && model.head_dim_k != 64 {
                    continue;
                }
                ab(Shape {
                    model: *model,
                    policy,
                    ..Shape::e4m3(32, 8192, 64)
                });
            }
        }
        return;
    }
    if std::env::args().any(|a| a == "--paths") {
        for (batch, context) in [(1, 32768), (32, 4096), (32, 32768)] {
            for policy in [QuantPolicy::Fp8E4m3, QuantPolicy::None] {
                for path in [
                    DecodeStrategy::CudaCores,
                    DecodeStrategy::TensorCores,
                    DecodeStrategy::KeyMajor,
                ] {
                    let shape = Shape {
                        policy,
                        path: Some(path),
                        ..Shape::e4m3(batch, context, 64)
                    };
                    if let Err(err) = bench_shape(&client, &shape, copy) {
                        println!("  error: {err}");
                    }
                }
            }
        }
        return;
    }
    let shapes = [
        (1, 32768, Some(30.0)),
        (32, 4096, Some(100.0)),
        (32, 32768, Some(745.0)),
        (128, 32768, Some(2980.0)),
    ];
    for (batch, context, target) in shapes {
        let fp8 = Shape {
            target_us: target,
            ..Shape::e4m3(batch, context, 64)
        };
        let bf16 = Shape {
            policy: QuantPolicy::None,
            ..Shape::e4m3(batch, context, 64)
        };
        let note = if context >= 16384 {
            " (target ≤ 0.53)"
        } else {
            ""
        };
        bench_ratio(&client, copy, &fp8, &bf16, "e4m3 / bf16", note);
    }
    // Layout: each head's page contiguous (bhsd) against heads interleaved per token (bshd).
    for policy in [QuantPolicy::Fp8E4m3, QuantPolicy::None] {
        let shape = |kind| Shape {
            policy,
            kind,
            ..Shape::e4m3(32, 32768, 64)
        };
        let (bhsd, bshd) = (shape(KvLayoutKind::Bhsd), shape(KvLayoutKind::Bshd));
        bench_ratio(&client, copy, &bhsd, &bshd, "bhsd / bshd", "");
    }
    for (batch, context) in [(32, 4096), (32, 32768)] {
        let (p16, p64) = (
            Shape::e4m3(batch, context, 16),
            Shape::e4m3(batch, context, 64),
        );
        bench_ratio(
            &client,
            copy,
            &p16,
            &p64,
            "page 16 / page 64",
            " (target ≤ 1.10)",
        );
    }
}
