//! Fill and flatten bandwidth on the device (issue 3's cases).
//!
//! Each case declares its bytes (read + written) from the problem alone, rotates several
//! input/cache sets so the 50 MB L2 cannot serve them, times many back-to-back launches
//! between two device syncs (wall clock; CubeCL's CUDA runtime reports `TimingMethod::System`),
//! and prints the median over repetitions, GB/s and the fraction of a device-to-device copy
//! (`Vector<u32, 4>` per thread) measured in the same run. Without a device it prints why and
//! exits 0. Criterion drives the timed repetitions (`benches/common`), so `cargo bench` also
//! prints its statistics and throughput and keeps its reports. `-- --bench --fill-shape 256,4,1`
//! (or `--flatten-shape`) runs with that streaming launch shape instead of the defaults;
//! `-- --bench --ab-stats` times `fill_with_stats` against the plain fill, A B A B.

mod common;

use std::time::Instant;

use cubecl::prelude::*;
use cubecl::server::Handle;
use fp8kv::device::{cuda_client, Cuda, DeviceBatch, DeviceRows, PagedKvCache};
use fp8kv::kernels::fill::{fill, fill_with_stats};
use fp8kv::kernels::flatten::{flatten, output_rows};
use fp8kv::kernels::stats::DeviceKvStats;
use fp8kv::reference::HostKvCache;
use fp8kv::testing::Rng;
use fp8kv::FlattenLayout;
use fp8kv::{
    BatchMetadata, CacheSpec, Dtype, KvLayoutKind, KvScales, KvSide, PagedKvLayout, QuantPolicy,
};

/// Plain copy: one 16-byte vector per thread. Grid 1-d over `src.len()` vectors (the
/// `ArrayArg` lengths are in `u32` scalars; CubeCL divides them by the vector size).
#[cube(launch_unchecked)]
fn copy_kernel(src: &Array<Vector<u32, Const<4>>>, dst: &mut Array<Vector<u32, Const<4>>>) {
    let i = ABSOLUTE_POS;
    if i < src.len() {
        dst[i] = src[i];
    }
}

const SETS: usize = 3;
const REPS: usize = 9;

fn sync(client: &ComputeClient<Cuda>) {
    cubecl::future::block_on(client.sync()).expect("device sync");
}

/// Median seconds per launch of `launch(i)` (`i` rotates over the sets).
fn time_launches(client: &ComputeClient<Cuda>, iters: usize, mut launch: impl FnMut(usize)) -> f64 {
    for i in 0..SETS * 2 {
        launch(i % SETS);
    }
    sync(client);
    let mut samples = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        let t = Instant::now();
        for i in 0..iters {
            launch(i % SETS);
        }
        sync(client);
        samples.push(t.elapsed().as_secs_f64() / iters as f64);
    }
    samples.sort_by(f64::total_cmp);
    samples[REPS / 2]
}

/// Seconds per launch of case `name` (`bytes` moved per launch): through criterion when it
/// runs, else [`time_launches`] with `iters` launches per repetition; `None` when criterion's
/// filter excludes the case.
fn time_case(
    client: &ComputeClient<Cuda>,
    name: &str,
    bytes: usize,
    iters: usize,
    mut launch: impl FnMut(usize),
) -> Option<f64> {
    let timed = common::measure("fill_flatten", name, bytes as u64, &mut |n| {
        let t = Instant::now();
        for i in 0..n as usize {
            launch(i % SETS);
        }
        sync(client);
        t.elapsed().as_secs_f64()
    });
    match timed {
        common::Timed::Median(secs) => Some(secs),
        common::Timed::Filtered => None,
        common::Timed::Off => Some(time_launches(client, iters, launch)),
    }
}

fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(n);
    v
}

fn copy_bandwidth(client: &ComputeClient<Cuda>) -> f64 {
    let bytes = 512usize << 20;
    let vecs = bytes / 16;
    let mut rng = Rng::new(1);
    let data = random_bytes(&mut rng, bytes);
    let srcs: Vec<Handle> = (0..SETS).map(|_| client.create_from_slice(&data)).collect();
    let dsts: Vec<Handle> = (0..SETS).map(|_| client.create_from_slice(&data)).collect();
    let t = time_launches(client, 20, |i| unsafe {
        copy_kernel::launch_unchecked::<Cuda>(
            client,
            CubeCount::Static((vecs as u32).div_ceil(256), 1, 1),
            CubeDim::new_1d(256),
            ArrayArg::from_raw_parts(srcs[i].clone(), bytes / 4),
            ArrayArg::from_raw_parts(dsts[i].clone(), bytes / 4),
        )
    });
    // The copy must really have happened, or the ceiling is meaningless.
    let zeros = client.create_from_slice(&vec![0u8; bytes]);
    unsafe {
        copy_kernel::launch_unchecked::<Cuda>(
            client,
            CubeCount::Static((vecs as u32).div_ceil(256), 1, 1),
            CubeDim::new_1d(256),
            ArrayArg::from_raw_parts(srcs[0].clone(), bytes / 4),
            ArrayArg::from_raw_parts(zeros.clone(), bytes / 4),
        )
    }
    let back = client.read_one(zeros).expect("read copy");
    assert!(back[..] == data[..], "the copy kernel did not copy");
    2.0 * bytes as f64 / t / 1e9
}

/// `batch` sequences of `q_len` new tokens with `kv_len` cached (new included), pages in order.
fn problem(
    batch: usize,
    q_len: usize,
    kv_len: usize,
    page: usize,
) -> (PagedKvLayout, BatchMetadata, usize) {
    let pages_per_seq = kv_len.div_ceil(page);
    let layout =
        PagedKvLayout::new(batch * pages_per_seq, page, 8, 128, 128, KvLayoutKind::Bshd).unwrap();
    let starts = (0..batch).map(|b| (b * q_len) as i32).collect();
    let bt = (0..batch * pages_per_seq).map(|p| p as i32).collect();
    let meta = BatchMetadata::new(
        starts,
        vec![q_len as i32; batch],
        vec![kv_len as i32; batch],
        bt,
        pages_per_seq,
    )
    .unwrap();
    (layout, meta, batch * q_len)
}

fn report(name: &str, secs: f64, bytes: usize, copy_gbs: f64) {
    let gbs = bytes as f64 / secs / 1e9;
    println!(
        "{name:<48} {:>9.2} us  {:>8.1} GB/s  {:>5.1}% of copy  ({:.1} MB moved)",
        secs * 1e6,
        gbs,
        100.0 * gbs / copy_gbs,
        bytes as f64 / 1e6
    );
}

/// A fill problem's device data: `SETS` caches and new K/V rows to rotate over, the batch, and
/// `fill_with_stats`' accumulator.
struct FillCase {
    caches: Vec<PagedKvCache<Cuda>>,
    ks: Vec<DeviceRows<Cuda>>,
    vs: Vec<DeviceRows<Cuda>>,
    dbatch: DeviceBatch<Cuda>,
    acc: DeviceKvStats<Cuda>,
    tokens: usize,
    /// Bytes a call moves: bf16 K and V rows read, FP8 codes written.
    bytes: usize,
}

impl FillCase {
    fn new(
        client: &ComputeClient<Cuda>,
        batch: usize,
        q_len: usize,
        page: usize,
        scales: (f32, f32),
    ) -> Self {
        let (layout, meta, tokens) = problem(batch, q_len, q_len, page);
        let scales = KvScales::new(scales.0, scales.1).unwrap();
        let row = 8 * 128;
        let mut rng = Rng::new(7);
        let data: Vec<f32> = (0..tokens * row).map(|_| rng.normal() as f32).collect();
        let rows = || -> Vec<DeviceRows<Cuda>> {
            (0..SETS)
                .map(|_| {
                    DeviceRows::from_f32(client, &data, Dtype::Bf16, tokens, row, row).unwrap()
                })
                .collect()
        };
        FillCase {
            caches: (0..SETS)
                .map(|_| {
                    PagedKvCache::new(client, layout, QuantPolicy::Fp8E4m3, Dtype::E4m3, scales)
                        .unwrap()
                })
                .collect(),
            ks: rows(),
            vs: rows(),
            dbatch: DeviceBatch::new(client, meta, &layout, tokens).unwrap(),
            acc: DeviceKvStats::new(client),
            tokens,
            bytes: tokens * 2 * row * (2 + 1),
        }
    }

    /// One call on set `i`: `fill`, or `fill_with_stats` with `stats`.
    fn call(&mut self, i: usize, stats: bool) {
        if stats {
            fill_with_stats(
                &mut self.caches[i],
                &self.ks[i],
                &self.vs[i],
                &self.dbatch,
                &mut self.acc,
            )
            .unwrap()
        } else {
            fill(&mut self.caches[i], &self.ks[i], &self.vs[i], &self.dbatch).unwrap()
        }
    }
}

/// `--ab-stats`: `fill_with_stats` against the plain `fill` on the 8 × 2048 prefill (page 64,
/// calibrated scales), A B A B in one process on the same data, each pass this bench's own
/// timer (median of `REPS` runs of 50 calls between two syncs); prints both and the ratio.
fn ab_stats(client: &ComputeClient<Cuda>, copy_gbs: f64) {
    let mut case = FillCase::new(client, 8, 2048, 64, (0.15, 0.05));
    let mut ratios = Vec::new();
    for pass in 1..=4 {
        let with = time_launches(client, 50, |i| case.call(i, true));
        let plain = time_launches(client, 50, |i| case.call(i, false));
        report(
            &format!("fill+stats prefill 8x2048 (pass {pass})"),
            with,
            case.bytes,
            copy_gbs,
        );
        report(
            &format!("fill prefill 8x2048 (pass {pass})"),
            plain,
            case.bytes,
            copy_gbs,
        );
        println!("  fill+stats / fill (pass {pass}): {:.3}", with / plain);
        ratios.push(with / plain);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "fill+stats / fill, median of 4 passes: {:.3} (range {:.3}-{:.3})",
        (ratios[1] + ratios[2]) / 2.0,
        ratios[0],
        ratios[3]
    );
}

#[allow(clippy::too_many_arguments)]
fn bench_fill(
    client: &ComputeClient<Cuda>,
    name: &str,
    batch: usize,
    q_len: usize,
    page: usize,
    scales: (f32, f32),
    stats: bool,
    copy_gbs: f64,
) {
    let mut case = FillCase::new(client, batch, q_len, page, scales);
    let (tokens, bytes) = (case.tokens, case.bytes);
    let iters = if tokens > 1000 { 50 } else { 2000 };
    let Some(t) = time_case(client, name, bytes, iters, |i| case.call(i, stats)) else {
        return;
    };
    report(name, t, bytes, copy_gbs);
    if tokens <= 1000 && !stats {
        // Host-side cost of one call: no sync, so the launches queue.
        sync(client);
        let n = 2000;
        let t0 = Instant::now();
        for i in 0..n {
            case.call(i % SETS, false);
        }
        let host = t0.elapsed().as_secs_f64() / n as f64;
        sync(client);
        println!(
            "{:<48} {:>9.2} us  host-side cost of one fill() call",
            format!("{name} (host)"),
            host * 1e6
        );
    }
}

fn bench_flatten(
    client: &ComputeClient<Cuda>,
    name: &str,
    batch: usize,
    kv_len: usize,
    page: usize,
    copy_gbs: f64,
) {
    let (layout, meta, _) = problem(batch, 0, kv_len, page);
    let scales = KvScales::new(0.15, 0.05).unwrap();
    // Random codes (NaN codes masked out), so the reads are of real data.
    let spec = CacheSpec::from_parts(layout, QuantPolicy::Fp8E4m3, Dtype::E4m3, scales).unwrap();
    let mut host = HostKvCache::new(spec, 0).unwrap();
    let mut rng = Rng::new(3);
    for b in host.k.iter_mut().chain(host.v.iter_mut()) {
        *b = (rng.next_u64() as u8) & 0xF7;
    }
    let caches: Vec<PagedKvCache<Cuda>> = (0..SETS)
        .map(|_| PagedKvCache::from_host(client, &host).unwrap())
        .collect();
    let dbatch = DeviceBatch::for_reads(client, meta, &layout).unwrap();
    let total = dbatch.total_kv_tokens();
    let (rows, elems) = output_rows(8, 128, total, FlattenLayout::Hsd);
    let mut outs: Vec<(DeviceRows<Cuda>, DeviceRows<Cuda>)> = (0..SETS)
        .map(|_| {
            (
                DeviceRows::empty(client, Dtype::Bf16, rows, elems, elems).unwrap(),
                DeviceRows::empty(client, Dtype::Bf16, rows, elems, elems).unwrap(),
            )
        })
        .collect();
    let bytes = (layout.cache_elems(KvSide::K) + layout.cache_elems(KvSide::V)) * (1 + 2);
    let Some(t) = time_case(client, name, bytes, 50, |i| {
        let (k, v) = &mut outs[i];
        flatten(&caches[i], &dbatch, FlattenLayout::Hsd, k, v).unwrap()
    }) else {
        return;
    };
    report(name, t, bytes, copy_gbs);
}

fn main() {
    let client = match cuda_client() {
        Ok(c) => c,
        Err(e) => {
            println!("fill_flatten bench skipped: {e}");
            return;
        }
    };
    // `--fill-shape T,U,R` / `--flatten-shape T,U,R`: a tuning run's launch shape (threads per
    // cube, vectors per thread, rounds) for the streaming path instead of the defaults.
    let args: Vec<String> = std::env::args().collect();
    for (flag, family) in [("--fill-shape", "FILL"), ("--flatten-shape", "FLATTEN")] {
        if let Some(at) = args.iter().position(|a| a == flag) {
            let parsed: Option<Vec<u32>> = args
                .get(at + 1)
                .map(|v| v.split(',').map(|x| x.parse().ok()).collect())
                .unwrap_or(None);
            match parsed.as_deref() {
                Some(&[t, u, r]) => fp8kv::internals::override_copy_shape(family, Some((t, u, r))),
                _ => return println!("{flag} wants THREADS,UNROLL,ROUNDS, e.g. 256,4,1"),
            }
        }
    }
    // `--bench` comes from cargo; any other argument filters cases by substring (a shape
    // flag's value aside).
    let filter: Vec<String> = args
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(i, a)| {
            !a.starts_with("--")
                && !matches!(args[i - 1].as_str(), "--fill-shape" | "--flatten-shape")
        })
        .map(|(_, a)| a.clone())
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let copy = copy_bandwidth(&client);
    // Criterion drives the timing; its command line is cargo's `--bench` and the filter, which
    // it reads only where no shape flag is there.
    common::start(
        !args
            .iter()
            .any(|a| a == "--fill-shape" || a == "--flatten-shape" || a == "--ab-stats"),
    );
    println!("device-to-device copy (Vector<u32,4>/thread, 512 MiB, {SETS} buffers rotated): {copy:.1} GB/s");
    if args.iter().any(|a| a == "--ab-stats") {
        ab_stats(&client, copy);
        common::finish();
        return;
    }
    // Calibrated scales (0.15, 0.05) take the Markstein division; power-of-two scales (1.0,
    // the uncalibrated default) a single multiply.
    let calibrated = (0.15, 0.05);
    let fills = [
        (
            "fill prefill 8x2048 d128 h8 page64 bf16->e4m3",
            8,
            2048,
            64,
            calibrated,
        ),
        (
            "fill prefill 8x2048 d128 h8 page16 bf16->e4m3",
            8,
            2048,
            16,
            calibrated,
        ),
        (
            "fill prefill 8x2048 d128 h8 page64 bf16->e4m3 scale 1.0",
            8,
            2048,
            64,
            (1.0, 1.0),
        ),
        (
            "fill decode 128x1 d128 h8 page64 bf16->e4m3",
            128,
            1,
            64,
            calibrated,
        ),
    ];
    // The opt-in statistics (`fill_with_stats`): its cost against the plain fill above.
    let with_stats = [
        (
            "fill+stats prefill 8x2048 d128 h8 page64 bf16->e4m3",
            8,
            2048,
            64,
            calibrated,
        ),
        (
            "fill+stats decode 128x1 d128 h8 page64 bf16->e4m3",
            128,
            1,
            64,
            calibrated,
        ),
    ];
    let runs = fills
        .iter()
        .map(|c| (c, false))
        .chain(with_stats.iter().map(|c| (c, true)));
    for (&(name, batch, q_len, page, scales), stats) in runs {
        if wanted(name) {
            bench_fill(&client, name, batch, q_len, page, scales, stats, copy);
        }
    }
    let flattens = [
        ("flatten 8x4096 e4m3->bf16 hsd page64", 8, 4096, 64),
        ("flatten 8x4096 e4m3->bf16 hsd page16", 8, 4096, 16),
    ];
    for (name, batch, kv_len, page) in flattens {
        if wanted(name) {
            bench_flatten(&client, name, batch, kv_len, page, copy);
        }
    }
    common::finish();
}
