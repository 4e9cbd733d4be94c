//! GPU paged decode attention against the CPU reference (`fp8kv::reference::paged_decode`)
//! on the shared decode case table, fed the *same* cache bytes (so the same dequantized K/V):
//! the only differences allowed are those of f32 accumulation and the output rounding, with
//! the bound derived in [`error_bound`]. Outputs are poisoned with NaN before each launch.
//! The quantization error (FP8 cache vs the unquantized bf16 cache) is printed separately.

use cubecl::client::ComputeClient;
use fp8kv::device::{Cuda, DeviceBatch, DeviceRows, PagedKvCache};
use fp8kv::internals::TILE_TOKENS;
use fp8kv::reference::{self, HostKvCache};
use fp8kv::testing::{case, decode_cases, PagedCase, Problem};
use fp8kv::{
    auto_strategy, paged_decode, CombineChoice, DecodeOptions, DecodeShape, DecodeStrategy,
    SplitChoice,
};
use fp8kv::{Dtype, Fp8KvError, KvSide, QuantPolicy};

use fp8kv::testing::client_or_skip;
use fp8kv::AttentionOptions;

/// Most splits the in-kernel merge takes (`CombineChoice::InKernel` refuses more).
const MERGE_MAX_SPLITS: usize = 64;

/// f32 unit roundoff.
const U32: f64 = 1.0 / (1u64 << 24) as f64;
/// Allowance for one `exp` evaluation, relative: CUDA's `expf` is within 2 ulp and `__expf`
/// within `2 + 1.2|x|` ulp; a term with |x| > 25 weighs < 2^-36, so 64 ulp covers both.
const EXP_REL: f64 = 64.0 * U32;

/// Everything one comparison needs.
#[derive(Clone)]
struct Run<'a> {
    case: &'a PagedCase,
    policy: QuantPolicy,
    cache_dtype: Dtype,
    act: Dtype,
    opts: AttentionOptions,
    split: SplitChoice,
    /// Which split kernel, `None` for Auto's ([`both_paths`] makes one run per kernel that
    /// applies).
    path: Option<DecodeStrategy>,
    /// Where the splits merge (Auto: in the split kernel where the plan allows it).
    combine: CombineChoice,
    /// Launch a second time on the same batch (so the same workspace and arrival counters)
    /// and require the same output bit for bit.
    twice: bool,
    /// Power of two the generated queries are multiplied by (exact in every query dtype).
    q_gain: f32,
}

/// Result of one comparison.
struct Outcome {
    mismatches: usize,
    max_abs: f64,
    max_idx: usize,
    worst_ratio: f64,
    elems: usize,
    gpu: Vec<f32>,
}

/// Half an ulp of the output dtype, relative to the value: the last rounding the GPU does.
fn out_half_ulp_rel(act: Dtype) -> f64 {
    match act {
        Dtype::Bf16 => 2f64.powi(-8),
        Dtype::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    }
}

/// Per-element error bound of the GPU result against the f64 reference on the same cache.
///
/// Derivation (u = 2^-24, c = k_scale·sm_scale, query row q, n = keys of the sequence):
/// - Scores: the kernel forms `q·c` once (one rounding) and sums `d_k` products in f32, split
///   across lanes and shuffled: `|Δs_j| ≤ (d_k + 3)·u·c·Σ_d |q_d·K_jd|` ≤ `E_s := (d_k + 3)·u·c·Σ_d
///   |q_d|·max_j |K_jd|`; softcap is 1-Lipschitz (+4 ulp of `cap` for `tanhf`); ALiBi adds one
///   rounding of `slope·(j − p)`: `u·|slope|·n`.
/// - Softmax: shifting every score by at most `E_s` changes each `p_j` by a factor within
///   `exp(±2·E_s)`; each `exp` adds `EXP_REL`, the online rescales and the split merge multiply
///   by factors each rounded once.
/// - PV: recursive f32 summation of at most `n` terms plus the cross-lane reductions:
///   `γ_(n+16)·Σ_j p_j·|v_scale·V_jd|` ≤ `(n + 16)·u·W_d` with `W_d := v_scale·max_j |V_jd|`
///   (since Σ p_j ≤ 1).
/// - Output: rounding to the query dtype adds half an ulp: `h·|o|` (h = 2^-8 for bf16, 2^-11
///   for f16), plus the smallest f16 subnormal as an absolute floor.
///
/// So `|Δo_d| ≤ (e^{2·E_s} − 1 + 3·EXP_REL + (n + S + 16)·u)·W_d·(1 + h) + h·|ref_d| + 2^-24`.
fn error_bound(
    e_s: f64,
    n_keys: usize,
    num_splits: usize,
    w_d: f64,
    reference: f64,
    act: Dtype,
) -> f64 {
    let h = out_half_ulp_rel(act);
    let rel = (2.0 * e_s).exp_m1() + 3.0 * EXP_REL + (n_keys + num_splits + 16) as f64 * U32;
    rel * w_d * (1.0 + h) + h * reference.abs() + 2f64.powi(-24)
}

/// Largest |value| per dim over a sequence's first `kv_len` cached positions of KV head `g`.
fn col_max(
    cache: &HostKvCache,
    side: KvSide,
    scale: f64,
    p: &Problem,
    b: usize,
    g: usize,
) -> Vec<f64> {
    let layout = cache.layout();
    let d = layout.head_dim(side);
    let kv_len = p.meta.kv_seqlens()[b] as usize;
    let mut m = vec![0f64; d];
    for j in 0..kv_len {
        let (page, slot) = p.meta.locate(b, j, layout.page_size());
        for (dd, mx) in m.iter_mut().enumerate() {
            let x = cache.raw(side, page, slot, g, dd) as f64 * scale;
            *mx = mx.max(x.abs());
        }
    }
    m
}

fn run_one(client: &ComputeClient<Cuda>, run: &Run) -> Result<Outcome, String> {
    let e = |x: Fp8KvError| x.to_string();
    let c = run.case;
    let mut p = Problem::generate(c, run.act).map_err(e)?;
    for x in &mut p.q {
        *x *= run.q_gain;
    }
    let scales = c.kv_scales(run.policy).map_err(e)?;
    let host = p
        .full_cache(run.policy, run.cache_dtype, &scales, 0xCD)
        .map_err(e)?;
    let (dk, dv) = (p.layout.head_dim_k(), p.layout.head_dim_v());
    let h = c.num_heads;
    let want =
        reference::paged_decode(&p.q, h, &host, &p.meta, p.num_tokens, &run.opts).map_err(e)?;

    let cache = PagedKvCache::from_host(client, &host).map_err(e)?;
    let batch = DeviceBatch::new(client, p.meta.clone(), &p.layout, p.num_tokens).map_err(e)?;
    let q = DeviceRows::from_f32(client, &p.q, run.act, p.num_tokens, h * dk, h * dk).map_err(e)?;
    let poison = vec![f32::NAN; p.num_tokens * h * dv];
    let mut out =
        DeviceRows::from_f32(client, &poison, run.act, p.num_tokens, h * dv, h * dv).map_err(e)?;
    let opts = DecodeOptions {
        attention: run.opts.clone(),
        strategy: run.path,
        split: run.split,
        combine: run.combine,
    };
    paged_decode(&q, &cache, &batch, &opts, &mut out).map_err(e)?;
    let got = out.to_f32().map_err(e)?;
    if run.twice {
        // The fused merge's counters must be back at zero: a second call on the same batch
        // (workspace and counters reused) gives the same bits.
        let mut again =
            DeviceRows::from_f32(client, &poison, run.act, p.num_tokens, h * dv, h * dv)
                .map_err(e)?;
        paged_decode(&q, &cache, &batch, &opts, &mut again).map_err(e)?;
        let second = again.to_f32().map_err(e)?;
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != second[i].to_bits()) {
            return Err(format!(
                "second call on the same batch differs at {i}: {} then {}",
                got[i], second[i]
            ));
        }
    }

    let fp8 = run.policy != QuantPolicy::None;
    let (ks, vs) = if fp8 {
        (scales.k() as f64, scales.v() as f64)
    } else {
        (1.0, 1.0)
    };
    let sm = run
        .opts
        .sm_scale
        .map_or(1.0 / (dk as f64).sqrt(), f64::from);
    let num_splits = match run.split {
        SplitChoice::Tokens(n) => p
            .meta
            .max_kv_len()
            .div_ceil(n.next_multiple_of(TILE_TOKENS))
            .max(1),
        SplitChoice::Auto => 256,
    };
    let group = h / c.num_kv_heads;
    let mut o = Outcome {
        mismatches: 0,
        max_abs: 0.0,
        max_idx: 0,
        worst_ratio: 0.0,
        elems: 0,
        gpu: got.clone(),
    };
    for b in 0..p.meta.batch() {
        let q_len = p.meta.q_seq_length()[b] as usize;
        let kv_len = p.meta.kv_seqlens()[b] as usize;
        for g in 0..c.num_kv_heads {
            let kmax = col_max(&host, KvSide::K, ks, &p, b, g);
            let vmax = col_max(&host, KvSide::V, vs, &p, b, g);
            for i in 0..q_len {
                let tok = p.meta.q_start_loc()[b] as usize + i;
                for hh in 0..group {
                    let head = g * group + hh;
                    let qrow = &p.q[(tok * h + head) * dk..][..dk];
                    let dot_abs: f64 = qrow
                        .iter()
                        .zip(&kmax)
                        .map(|(q, k)| (*q as f64).abs() * k)
                        .sum();
                    let mut e_s = (dk + 3) as f64 * U32 * sm * dot_abs;
                    if let Some(cap) = run.opts.softcap {
                        e_s += 4.0 * U32 * cap as f64;
                    }
                    if let Some(sl) = &run.opts.alibi_slopes {
                        e_s += U32 * (sl[head] as f64).abs() * kv_len as f64;
                    }
                    for (d, &w_d) in vmax.iter().enumerate() {
                        let idx = (tok * h + head) * dv + d;
                        let (gv, rv) = (got[idx] as f64, want[idx]);
                        let bound = error_bound(e_s, kv_len, num_splits, w_d, rv, run.act);
                        let diff = (gv - rv).abs();
                        o.elems += 1;
                        // NaN compares false: count it as a mismatch explicitly.
                        if diff.is_nan() || diff > bound {
                            o.mismatches += 1;
                        }
                        if diff.is_nan() || diff > o.max_abs {
                            o.max_abs = diff;
                            o.max_idx = idx;
                        }
                        o.worst_ratio = o.worst_ratio.max(diff / bound);
                    }
                }
            }
        }
    }
    Ok(o)
}

fn describe(run: &Run) -> String {
    let o = &run.opts;
    let mut opts = Vec::new();
    if let Some(s) = o.sm_scale {
        opts.push(format!("sm_scale={s}"));
    }
    if let Some(w) = o.window {
        opts.push(format!("window={w}"));
    }
    if let Some(c) = o.softcap {
        opts.push(format!("softcap={c}"));
    }
    if o.sinks.is_some() {
        opts.push("sinks".into());
    }
    if o.alibi_slopes.is_some() {
        opts.push("alibi".into());
    }
    let split = match run.split {
        SplitChoice::Auto => "auto".to_string(),
        SplitChoice::Tokens(n) => format!("{n}-token splits"),
    };
    let path = run.path.map_or("auto", DecodeStrategy::name);
    let combine = match run.combine {
        CombineChoice::Auto => "",
        CombineChoice::InKernel => " in-kernel merge",
        CombineChoice::Separate => " separate combine",
    };
    if run.q_gain != 1.0 {
        opts.push(format!("q×2^{}", run.q_gain.log2()));
    }
    format!(
        "{} cache {}/{} act {} [{}] {split} {path}{combine}",
        run.case.name,
        run.policy,
        run.cache_dtype,
        run.act,
        opts.join(",")
    )
}

/// Runs every run, prints one result line each, fails listing the bad ones.
fn check_all(client: &ComputeClient<Cuda>, runs: &[Run]) {
    // The f64 CPU references dominate the time: compute the runs on a few threads (the device
    // queue is shared), then report in order.
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(4, |n| n.get().min(8));
    let mut results: Vec<Option<Result<Outcome, String>>> = (0..runs.len()).map(|_| None).collect();
    let done = std::sync::Mutex::new(&mut results);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= runs.len() {
                    break;
                }
                let r = run_one(client, &runs[i]);
                done.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    let mut failures = Vec::new();
    for (run, result) in runs.iter().zip(results) {
        match result.expect("every run was computed") {
            Ok(o) => {
                let line = format!(
                    "{}: {} of {} outside the bound; max |Δ| {:.3e} at {}; worst |Δ|/bound {:.3}",
                    describe(run),
                    o.mismatches,
                    o.elems,
                    o.max_abs,
                    o.max_idx,
                    o.worst_ratio
                );
                println!("{line}");
                if o.mismatches > 0 {
                    failures.push(line);
                }
            }
            Err(err) => {
                let line = format!("{}: error {err}", describe(run));
                println!("{line}");
                failures.push(line);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing runs:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

const CACHES: [(QuantPolicy, Dtype); 3] = [
    (QuantPolicy::Fp8E4m3, Dtype::E4m3),
    (QuantPolicy::Fp8E5m2, Dtype::E5m2),
    (QuantPolicy::None, Dtype::Bf16),
];

fn plain(case: &PagedCase, policy: QuantPolicy, cache_dtype: Dtype, act: Dtype) -> Run<'_> {
    Run {
        case,
        policy,
        cache_dtype,
        act,
        opts: AttentionOptions::default(),
        split: SplitChoice::Auto,
        path: None,
        combine: CombineChoice::Auto,
        twice: false,
        q_gain: 1.0,
    }
}

/// Each run once per split kernel: the CUDA-core kernel always, each tensor-core kernel
/// (query-major, key-major, wide) where it applies. `FP8KV_DECODE_TEST_PATHS` keeps those it
/// names, comma-separated (`cuda`, `tensor`, `key-major`, `wide`; device time).
fn both_paths(runs: Vec<Run<'_>>) -> Vec<Run<'_>> {
    let only = std::env::var("FP8KV_DECODE_TEST_PATHS").unwrap_or_default();
    let keep = |name: &str| only.is_empty() || only.split(',').any(|n| n.trim() == name);
    let mut out = Vec::new();
    for run in runs {
        let c = run.case;
        let shape = DecodeShape {
            cache: run.cache_dtype,
            query: run.act,
            head_dim_k: c.head_dim_k,
            head_dim_v: c.head_dim_v,
            group: c.num_heads / c.num_kv_heads,
            max_q_len: c.seqs.iter().map(|s| s.q_len).max().unwrap_or(0),
        };
        for (name, strategy) in [
            ("tensor", DecodeStrategy::TensorCores),
            ("key-major", DecodeStrategy::KeyMajor),
            ("wide", DecodeStrategy::Wide),
        ] {
            if strategy.applies(&shape) && keep(name) {
                out.push(Run {
                    path: Some(strategy),
                    ..run.clone()
                });
            }
        }
        if keep("cuda") {
            out.push(Run {
                path: Some(DecodeStrategy::CudaCores),
                ..run
            });
        }
    }
    out
}

#[test]
fn gpu_decode_matches_reference_on_every_case() {
    let Some(client) = client_or_skip("gpu_decode_matches_reference_on_every_case") else {
        return;
    };
    let cases = decode_cases();
    let mut runs = Vec::new();
    for c in &cases {
        for (policy, dt) in CACHES {
            runs.push(plain(c, policy, dt, Dtype::Bf16));
        }
    }
    // f16 queries with the f16 cache and with FP8, and f32 queries with FP8, on a few shapes.
    for name in [
        "decode_b17_uneven",
        "gqa7_d80_page64",
        "mla_576_512",
        "spec_decode_4_tokens",
    ] {
        let c = case(&cases, name);
        runs.push(plain(c, QuantPolicy::None, Dtype::F16, Dtype::F16));
        runs.push(plain(c, QuantPolicy::Fp8E4m3, Dtype::E4m3, Dtype::F16));
        runs.push(plain(c, QuantPolicy::Fp8E5m2, Dtype::E5m2, Dtype::F32));
    }
    check_all(&client, &both_paths(runs));
}

#[test]
fn gpu_decode_many_splits_merge_exactly() {
    let Some(client) = client_or_skip("gpu_decode_many_splits_merge_exactly") else {
        return;
    };
    let cases = decode_cases();
    let mut runs = Vec::new();
    // One tile per split: many splits, most of them empty for the short sequences.
    for name in [
        "decode_b17_uneven",
        "long_context_2k",
        "spec_decode_4_tokens",
        "empty_sequence",
        "gqa24_page16",
        "mla_long_context",
    ] {
        let c = case(&cases, name);
        // The merge in the split kernel where the plan has few enough splits for it (twice on
        // one batch: the arrival counters reset), and the separate combine kernel.
        let longest = c.seqs.iter().map(|s| s.kv_len).max().unwrap_or(0);
        let fused = if longest.div_ceil(64) <= MERGE_MAX_SPLITS {
            CombineChoice::InKernel
        } else {
            CombineChoice::Auto
        };
        for (policy, dt) in CACHES {
            for (combine, twice) in [(fused, true), (CombineChoice::Separate, false)] {
                runs.push(Run {
                    split: SplitChoice::Tokens(64),
                    combine,
                    twice,
                    ..plain(c, policy, dt, Dtype::Bf16)
                });
            }
        }
    }
    check_all(&client, &both_paths(runs));
}

/// Queries far above f16's largest value (2^20 × the usual, up to about 10^6 > 65504) and far
/// below its smallest normal (2^-30 ×, about 10^-9 < 2^-14), in bf16 and f32: the tensor-core
/// kernel's f16 MMAs see each query row scaled by a power of two into f16's range (without it
/// the first overflows to inf and the second flushes to zero). `sm_scale` takes the gain back
/// out, so the scores, and the bound, are those of the plain case.
#[test]
fn gpu_decode_queries_beyond_f16_range() {
    let Some(client) = client_or_skip("gpu_decode_queries_beyond_f16_range") else {
        return;
    };
    let cases = decode_cases();
    let c = case(&cases, "decode_b17_uneven");
    let mut runs = Vec::new();
    for gain in [2f32.powi(20), 2f32.powi(-30)] {
        let opts = AttentionOptions {
            sm_scale: Some(1.0 / ((c.head_dim_k as f32).sqrt() * gain)),
            ..Default::default()
        };
        for (policy, dt, act) in [
            (QuantPolicy::Fp8E4m3, Dtype::E4m3, Dtype::Bf16),
            (QuantPolicy::Fp8E4m3, Dtype::E4m3, Dtype::F32),
            (QuantPolicy::Fp8E5m2, Dtype::E5m2, Dtype::Bf16),
            (QuantPolicy::None, Dtype::Bf16, Dtype::Bf16),
        ] {
            runs.push(Run {
                opts: opts.clone(),
                q_gain: gain,
                ..plain(c, policy, dt, act)
            });
        }
    }
    check_all(&client, &both_paths(runs));
}

fn alibi_slopes(num_heads: usize) -> Vec<f32> {
    // The ALiBi paper's geometric slopes 2^(-8(h+1)/H).
    (0..num_heads)
        .map(|h| 2f32.powf(-8.0 * (h as f32 + 1.0) / num_heads as f32))
        .collect()
}

fn sinks(num_heads: usize) -> Vec<f32> {
    (0..num_heads)
        .map(|h| (h as f32 * 0.7).sin() * 3.0 + 1.0)
        .collect()
}

#[test]
fn gpu_decode_options_with_fp8() {
    let Some(client) = client_or_skip("gpu_decode_options_with_fp8") else {
        return;
    };
    let cases = decode_cases();
    let mut runs = Vec::new();
    for name in [
        "decode_b17_uneven",
        "spec_decode_4_tokens",
        "long_context_2k",
        "gqa7_d80_page64",
        "empty_sequence",
        "mla_long_context",
    ] {
        let c = case(&cases, name);
        let h = c.num_heads;
        let options = [
            AttentionOptions {
                window: Some(37),
                ..Default::default()
            },
            AttentionOptions {
                window: Some(1),
                ..Default::default()
            },
            AttentionOptions {
                softcap: Some(5.0),
                ..Default::default()
            },
            AttentionOptions {
                sinks: Some(sinks(h)),
                ..Default::default()
            },
            AttentionOptions {
                alibi_slopes: Some(alibi_slopes(h)),
                ..Default::default()
            },
            AttentionOptions {
                sm_scale: Some(0.3),
                ..Default::default()
            },
            AttentionOptions {
                sm_scale: Some(0.05),
                window: Some(100),
                softcap: Some(30.0),
                sinks: Some(sinks(h)),
                alibi_slopes: Some(alibi_slopes(h)),
            },
        ];
        for opts in options {
            for (policy, dt) in [
                (QuantPolicy::Fp8E4m3, Dtype::E4m3),
                (QuantPolicy::Fp8E5m2, Dtype::E5m2),
            ] {
                for split in [SplitChoice::Auto, SplitChoice::Tokens(64)] {
                    runs.push(Run {
                        opts: opts.clone(),
                        split,
                        ..plain(c, policy, dt, Dtype::Bf16)
                    });
                }
            }
        }
    }
    check_all(&client, &both_paths(runs));
}

#[test]
fn gpu_decode_empty_sequence_gives_defined_rows() {
    let Some(client) = client_or_skip("gpu_decode_empty_sequence_gives_defined_rows") else {
        return;
    };
    let cases = decode_cases();
    let c = case(&cases, "empty_sequence");
    for opts in [
        AttentionOptions::default(),
        AttentionOptions {
            sinks: Some(sinks(c.num_heads)),
            ..Default::default()
        },
    ] {
        let run = Run {
            opts,
            ..plain(c, QuantPolicy::Fp8E4m3, Dtype::E4m3, Dtype::Bf16)
        };
        let o = run_one(&client, &run).unwrap();
        let nans = o.gpu.iter().filter(|x| x.is_nan()).count();
        println!("{}: {nans} NaN of {}", describe(&run), o.gpu.len());
        assert_eq!(
            nans, 0,
            "every packed row belongs to a sequence and must be written"
        );
        assert_eq!(o.mismatches, 0);
    }
}

/// Quantization error: GPU FP8 decode against the f64 reference on the unquantized (bf16)
/// cache of the same inputs. Reported, not asserted beyond sanity (it is the format's error,
/// not the kernel's).
#[test]
fn gpu_decode_reports_quantization_error() {
    let Some(client) = client_or_skip("gpu_decode_reports_quantization_error") else {
        return;
    };
    let cases = decode_cases();
    for name in [
        "decode_b17_uneven",
        "long_context_2k",
        "mla_576_512",
        "saturating_scales",
    ] {
        let c = case(&cases, name);
        let p = Problem::generate(c, Dtype::Bf16).unwrap();
        let none = p
            .full_cache(QuantPolicy::None, Dtype::Bf16, &Default::default(), 0)
            .unwrap();
        let opts = AttentionOptions::default();
        let exact = reference::paged_decode(&p.q, c.num_heads, &none, &p.meta, p.num_tokens, &opts)
            .unwrap();
        let rms_ref = (exact.iter().map(|x| x * x).sum::<f64>() / exact.len().max(1) as f64).sqrt();
        for (policy, dt) in [
            (QuantPolicy::Fp8E4m3, Dtype::E4m3),
            (QuantPolicy::Fp8E5m2, Dtype::E5m2),
        ] {
            let o = run_one(&client, &plain(c, policy, dt, Dtype::Bf16)).unwrap();
            let (mut max, mut se) = (0f64, 0f64);
            for (g, w) in o.gpu.iter().zip(&exact) {
                let d = (*g as f64 - w).abs();
                max = max.max(d);
                se += d * d;
            }
            let rms = (se / exact.len().max(1) as f64).sqrt();
            println!(
                "quantization error {name} {policy}: max |Δ| {max:.3e}, rms {rms:.3e} ({:.2}% of rms output {rms_ref:.3e}); kernel vs same-cache reference: max |Δ| {:.3e}",
                100.0 * rms / rms_ref,
                o.max_abs
            );
            assert!(max.is_finite());
        }
    }
}

#[test]
fn gpu_decode_rejects_bad_input() {
    let Some(client) = client_or_skip("gpu_decode_rejects_bad_input") else {
        return;
    };
    let cases = decode_cases();
    let c = case(&cases, "decode_b17_uneven");
    let p = Problem::generate(c, Dtype::Bf16).unwrap();
    let scales = c.kv_scales(QuantPolicy::Fp8E4m3).unwrap();
    let host = p
        .full_cache(QuantPolicy::Fp8E4m3, Dtype::E4m3, &scales, 0)
        .unwrap();
    let cache = PagedKvCache::from_host(&client, &host).unwrap();
    let batch = DeviceBatch::new(&client, p.meta.clone(), &p.layout, p.num_tokens).unwrap();
    let (dk, dv, h) = (p.layout.head_dim_k(), p.layout.head_dim_v(), c.num_heads);
    let q = DeviceRows::from_f32(&client, &p.q, Dtype::Bf16, p.num_tokens, h * dk, h * dk).unwrap();
    let mut out = DeviceRows::empty(&client, Dtype::Bf16, p.num_tokens, h * dv, h * dv).unwrap();
    let opts = DecodeOptions::default();
    // One head more than the cache's KV heads divide: the head count is the row length / dk.
    let wide_q: Vec<f32> = (0..p.num_tokens * (h + 1) * dk)
        .map(|i| p.q[i % p.q.len()])
        .collect();
    let q_bad = DeviceRows::from_f32(
        &client,
        &wide_q,
        Dtype::Bf16,
        p.num_tokens,
        (h + 1) * dk,
        (h + 1) * dk,
    )
    .unwrap();
    assert!(matches!(
        paged_decode(&q_bad, &cache, &batch, &opts, &mut out),
        Err(Fp8KvError::HeadRatio { .. })
    ));
    let bad = DecodeOptions::new(AttentionOptions {
        softcap: Some(-1.0),
        ..Default::default()
    });
    assert!(matches!(
        paged_decode(&q, &cache, &batch, &bad, &mut out),
        Err(Fp8KvError::InvalidOption(_))
    ));
    let mut wrong_out =
        DeviceRows::empty(&client, Dtype::F16, p.num_tokens, h * dv, h * dv).unwrap();
    assert!(matches!(
        paged_decode(&q, &cache, &batch, &opts, &mut wrong_out),
        Err(Fp8KvError::UnsupportedDtype(_))
    ));
    let short_q =
        DeviceRows::from_f32(&client, &p.q, Dtype::Bf16, p.num_tokens - 1, h * dk, h * dk).unwrap();
    assert!(matches!(
        paged_decode(&short_q, &cache, &batch, &opts, &mut out),
        Err(Fp8KvError::ShapeMismatch { .. })
    ));
    paged_decode(&q, &cache, &batch, &opts, &mut out).unwrap();
}

/// Reports which split kernel the default path picks on this device (the tensor-core kernel
/// needs the m16n8k16 MMA the runtime registers from sm_80 on), and that forcing the
/// tensor-core kernel where it does not apply is an error rather than a silent fallback.
#[test]
fn gpu_decode_reports_the_default_kernel_path() {
    let Some(client) = client_or_skip("gpu_decode_reports_the_default_kernel_path") else {
        return;
    };
    let shape = |cache, dk: usize, dv: usize, group| DecodeShape {
        cache,
        query: Dtype::Bf16,
        head_dim_k: dk,
        head_dim_v: dv,
        group,
        max_q_len: 1,
    };
    for dt in [Dtype::E4m3, Dtype::E5m2, Dtype::Bf16, Dtype::F16] {
        println!(
            "default split kernel, {dt} cache, bf16 queries, decode: d128 group 4 {}; \
             d64 group 3 {}; d64 group 4 {}; 576/512 group 16 {}",
            auto_strategy(&client, &shape(dt, 128, 128, 4)),
            auto_strategy(&client, &shape(dt, 64, 64, 3)),
            auto_strategy(&client, &shape(dt, 64, 64, 4)),
            auto_strategy(&client, &shape(dt, 576, 512, 16))
        );
    }
    // Hopper has the MMA: the measured winner of the Llama-3-8B class is key-major, of MLA
    // the wide kernel.
    assert_eq!(
        auto_strategy(&client, &shape(Dtype::E4m3, 128, 128, 4)),
        DecodeStrategy::KeyMajor
    );
    assert_eq!(
        auto_strategy(&client, &shape(Dtype::E4m3, 576, 512, 16)),
        DecodeStrategy::Wide
    );
    let cases = decode_cases();
    let c = case(&cases, "mla_576_512");
    let run = Run {
        path: Some(DecodeStrategy::TensorCores),
        ..plain(c, QuantPolicy::Fp8E4m3, Dtype::E4m3, Dtype::Bf16)
    };
    let err = run_one(&client, &run)
        .err()
        .expect("the default tensor-core kernel does not apply to 576/512");
    assert!(err.contains("does not apply"), "{err}");
    // The wide kernel covers 576/512, but not with f32 queries.
    let run = Run {
        path: Some(DecodeStrategy::Wide),
        ..plain(c, QuantPolicy::Fp8E4m3, Dtype::E4m3, Dtype::F32)
    };
    let err = run_one(&client, &run)
        .err()
        .expect("no wide kernel for f32 queries at 576/512");
    assert!(err.contains("does not apply"), "{err}");
}
