//! `cargo xtask demo --speed`: tokens/s and host time per step at several batch × context
//! shapes, prefill rows, the GEMV / matmul crossover, and with `--launches` each step's launches
//! and device time by kernel (split from `model_demo.rs`, which runs it).

use std::time::Instant;

use burn_tensor::{DType, Distribution, Tensor};
use fp8kv::AttentionOptions;
use fp8kv_llama::engine::Engine;
use fp8kv_llama::gguf::Gguf;
use fp8kv_llama::layer::LayerBackend;
use fp8kv_llama::llama::Attend;
use fp8kv_llama::tokenizer::Tokenizer;

use crate::model_demo::{load, PAGE};

/// Counts kernel launches and their device time: CubeCL's profiling log at its `basic` level
/// times every launch (it waits for each, so the host times of such a run mean nothing) and
/// writes `| <duration> | <kernel>` per launch to a file.
pub(crate) struct LaunchCounter {
    path: std::path::PathBuf,
}

impl LaunchCounter {
    pub(crate) fn install() -> Self {
        use cubecl::config::profiling::ProfilingLogLevel;
        use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
        let path = std::env::temp_dir().join(format!("fp8kv-launches-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut config = CubeClRuntimeConfig::default();
        config.profiling.logger.level = ProfilingLogLevel::Basic;
        config.profiling.logger.file = Some(path.clone());
        CubeClRuntimeConfig::set(config);
        LaunchCounter { path }
    }

    /// The launches logged so far, `(kernel, seconds)` each (the log is written by a
    /// background task: callers sync the device and give it a moment first).
    fn launches(&self) -> Vec<(String, f64)> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut parts = l.strip_prefix("| ")?.splitn(2, " | ");
                let (dur, name) = (parts.next()?.trim(), parts.next()?.trim());
                Some((short_kernel_name(name), parse_duration(dur)?))
            })
            .collect()
    }
}

/// A kernel's name without its module path and generic arguments.
fn short_kernel_name(name: &str) -> String {
    let base = name.split('<').next().unwrap_or(name);
    base.rsplit("::").next().unwrap_or(base).to_string()
}

/// A `Duration`'s `Debug` text (`12.5µs`, `1.2ms`, `830ns`, `1.1s`) in seconds.
fn parse_duration(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(v) = s.strip_suffix("ns") {
        (v, 1e-9)
    } else if let Some(v) = s.strip_suffix("µs") {
        (v, 1e-6)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else {
        (s.strip_suffix('s')?, 1.0)
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// Launches and device µs per step by kernel, most time first.
fn breakdown(launches: &[(String, f64)], steps: usize) -> String {
    let mut by: std::collections::BTreeMap<&str, (usize, f64)> = Default::default();
    for (name, t) in launches {
        let e = by.entry(name).or_default();
        e.0 += 1;
        e.1 += t;
    }
    let mut rows: Vec<_> = by.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    let total: f64 = launches.iter().map(|l| l.1).sum();
    let mut out = format!(
        "    device time per step {:.0} µs in {} launches:",
        total * 1e6 / steps as f64,
        launches.len() / steps
    );
    for (name, (n, t)) in rows.iter().take(10) {
        out += &format!(
            "\n      {:>5} x {:<40} {:>8.1} µs",
            n / steps,
            name,
            t * 1e6 / steps as f64
        );
    }
    out
}

/// `--speed` (GPU): prefill tokens/s, and decode tokens/s at batch 1, 32 and 128 with contexts
/// 1k and 8k, e4m3 against the bf16 cache, with KV memory and a breakdown of one decode step.
/// Every shape is warmed up first (kernel compilation is reported apart, not timed).
pub(crate) fn speed<B: LayerBackend>(
    gguf: &Gguf,
    tok: &Tokenizer,
    device: &B::Device,
    backend: &str,
    counter: Option<&LaunchCounter>,
    shapes: &[String],
) -> Result<(), String> {
    let e = |x: fp8kv_llama::ModelError| x.to_string();
    let mut model = Some(load::<B>(gguf, DType::BF16, device)?);
    let doc = include_str!("../../benches/PERFORMANCE.md").repeat(2);
    let long = tok.encode(&doc, false).map_err(e)?;
    let prompt: Vec<u32> = long.iter().copied().cycle().take(2048).collect();
    println!("\nspeed ({backend}, bf16 activations, page {PAGE}): medians of timed steps after a warm-up, each ending in a host read of the next tokens");
    println!(
        "{:<9} {:>7} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "policy",
        "batch",
        "context",
        "tokens/s",
        "step ms",
        "attn ms",
        "host ms",
        "warm-up s",
        "KV MiB",
        "vs bf16"
    );
    {
        let mut engine = Engine::new(
            model.take().expect("model"),
            "fp8_e4m3",
            1024 / PAGE + 8,
            PAGE,
        )
        .map_err(e)?;
        if shapes.is_empty() || shapes.iter().any(|s| s == "calls") {
            host_per_call(&mut engine, device)?;
            linear_crossover::<B>(device)?;
        }
        model = Some(engine.into_model());
    }
    // Prefill rows: (label, attention, chunk); batch 0 marks them.
    let prefills = [
        ("prefill", Attend::Decode, 2048),
        ("prefill-512", Attend::Decode, 512),
        ("prefill-flatten", Attend::Prefill, 512),
    ];
    let rows = prefills
        .iter()
        .map(|&(l, a, c)| (l.to_string(), 0, 2048, a, c))
        .chain(
            [
                (1, 1024),
                (1, 8192),
                (32, 1024),
                (32, 8192),
                (128, 1024),
                (128, 8192),
            ]
            .map(|(b, c)| (format!("{b}x{c}"), b, c, Attend::Decode, 0)),
        )
        .filter(|r| shapes.is_empty() || shapes.contains(&r.0));
    for (label, batch, context, attend, chunk) in rows {
        let mut bf16_tps = None;
        for policy in ["none", "fp8_e4m3"] {
            let pages = if batch == 0 {
                2048 / PAGE + 8
            } else {
                batch * (context / PAGE + 2) + 8
            };
            let mut engine =
                Engine::new(model.take().expect("model"), policy, pages, PAGE).map_err(e)?;
            if batch == 0 {
                engine.prefill_attend = attend;
                engine.prefill_chunk = chunk;
            }
            let mut launches = None;
            let (tps, step_ms, attn_ms, host_ms, warm, kv) = if batch == 0 {
                // Prefill: 2048 tokens in this row's chunks; the first prompt is the warm-up.
                let mut times = Vec::new();
                for _ in 0..4 {
                    let id = engine.add(prompt.clone()).map_err(e)?;
                    let t = Instant::now();
                    while engine.sequence(id).map(|s| s.cached) != Some(prompt.len()) {
                        let (h, _) = engine.step(&[id]).map_err(e)?;
                        engine.model.greedy(h.slice(0..1)).map_err(e)?;
                    }
                    times.push(t.elapsed().as_secs_f64());
                    engine.release(id);
                }
                if let Some(c) = counter {
                    // One more prompt with every launch logged: prefill's breakdown by kernel.
                    B::sync(device).ok();
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    let before = c.launches().len();
                    let id = engine.add(prompt.clone()).map_err(e)?;
                    while engine.sequence(id).map(|s| s.cached) != Some(prompt.len()) {
                        let (h, _) = engine.step(&[id]).map_err(e)?;
                        engine.model.greedy(h.slice(0..1)).map_err(e)?;
                    }
                    engine.release(id);
                    B::sync(device).ok();
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    let all = c.launches();
                    launches = Some(breakdown(&all[before.min(all.len())..], 1));
                }
                let warm = times.remove(0);
                times.sort_by(f64::total_cmp);
                (
                    2048.0 / times[1],
                    times[1] * 1e3,
                    f64::NAN,
                    f64::NAN,
                    warm,
                    engine.kv_bytes_per_token() * 2048,
                )
            } else {
                let ids: Vec<usize> = (0..batch)
                    .map(|_| engine.add_synthetic(context, 13))
                    .collect::<Result<_, _>>()
                    .map_err(e)?;
                let step = |engine: &mut Engine<B>| -> fp8kv_llama::error::Result<f64> {
                    let t = Instant::now();
                    let (h, rows) = engine.step(&ids)?;
                    let host = t.elapsed().as_secs_f64();
                    let next = engine.model.greedy(h)?;
                    for ((id, _), t) in rows.iter().zip(next) {
                        engine.push(*id, t.min(49151))?;
                    }
                    Ok(host)
                };
                let t = Instant::now();
                step(&mut engine).map_err(e)?;
                let warm = t.elapsed().as_secs_f64();
                let mut steps = Vec::new();
                let mut hosts = Vec::new();
                for _ in 0..8 {
                    let t = Instant::now();
                    hosts.push(step(&mut engine).map_err(e)?);
                    steps.push(t.elapsed().as_secs_f64());
                }
                if let Some(c) = counter {
                    B::sync(device).ok();
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    let before = c.launches().len();
                    for _ in 0..2 {
                        step(&mut engine).map_err(e)?;
                    }
                    B::sync(device).ok();
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    let all = c.launches();
                    launches = Some(breakdown(&all[before.min(all.len())..], 2));
                }
                steps.sort_by(f64::total_cmp);
                hosts.sort_by(f64::total_cmp);
                let step = steps[steps.len() / 2];
                // The attention calls alone: every layer's fill + decode at this step's shape.
                let attn = attention_only(&mut engine, &ids, device).map_err(e)?;
                (
                    batch as f64 / step,
                    step * 1e3,
                    attn * 1e3,
                    hosts[hosts.len() / 2] * 1e3,
                    warm,
                    engine.kv_bytes_per_token() * batch * context,
                )
            };
            let ratio = match (policy, bf16_tps) {
                ("none", _) => {
                    bf16_tps = Some(tps);
                    "-".to_string()
                }
                (_, Some(b)) => format!("{:.2}x", tps / b),
                _ => "-".into(),
            };
            println!(
                "{policy:<9} {:>7} {:>7} {tps:>10.0} {step_ms:>9.2} {attn_ms:>9.2} {host_ms:>9.2} {warm:>9.2} {:>9.1} {ratio:>8}",
                if batch == 0 { label.as_str() } else { &label[..label.find('x').unwrap_or(0)] },
                context,
                kv as f64 / (1 << 20) as f64
            );
            if let Some(l) = launches {
                println!("{l}");
            }
            model = Some(engine.into_model());
        }
    }
    println!("prefill rows: one 2048-token prompt, attention through the paged kernel in one step (prefill, the engine's default chunk) or in chunks of 512 (prefill-512), or through a flatten and Burn's tensor ops in chunks of 512 (prefill-flatten); step ms: one decode step with the next tokens' argmax read back, device included; attn ms: the 30 layers' fill + paged decode alone at that shape; host ms: time for the step's calls to return (on the fused backend, recording: its launches run at the read); with --launches, each row is followed by its launches and device time per step (prefill: per prompt) by kernel (every launch waited for: that run's times are not the speed); warm-up s: the first step (prefill: the first prompt), compilation included, not in the medians; KV MiB: the batch's contexts");
    Ok(())
}

/// Wall time of one decode step's attention calls alone (30 × fill + decode, random inputs),
/// median of 5, device included.
fn attention_only<B: LayerBackend>(
    engine: &mut Engine<B>,
    ids: &[usize],
    device: &B::Device,
) -> fp8kv_llama::error::Result<f64> {
    let c = engine.model.config().clone();
    let d = c.head_dim();
    // One more token each (the plan takes its pages), never stepped: timing only.
    for &id in ids {
        engine.push(id, 13)?;
    }
    let plan = engine.plan_step(ids)?;
    let batch = plan.step.batch;
    let n = plan.step.tokens.len();
    let rnd = |h: usize| {
        Tensor::<B, 3>::random([n, h, d], Distribution::Normal(0.0, 1.0), device).cast(DType::BF16)
    };
    let (q, k, v) = (
        rnd(c.head_count),
        rnd(c.head_count_kv),
        rnd(c.head_count_kv),
    );
    let opts = AttentionOptions::default();
    let mut times = Vec::new();
    for _ in 0..6 {
        B::sync(device).ok();
        let t = Instant::now();
        let mut last = None;
        for cache in engine.caches_mut() {
            cache.fill(k.clone(), v.clone(), &batch)?;
            last = Some(cache.decode(q.clone(), &batch, &opts)?);
        }
        if let Some(o) = last {
            let _ = o.slice(0..1).into_data();
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[3])
}

/// µs per call of `f`: one call to warm up, then `n` back to back and one sync.
fn per_call<B: LayerBackend>(
    device: &B::Device,
    n: usize,
    f: &mut dyn FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    f()?;
    B::sync(device).ok();
    let t = Instant::now();
    for _ in 0..n {
        f()?;
    }
    B::sync(device).ok();
    Ok(t.elapsed().as_secs_f64() * 1e6 / n as f64)
}

/// Device µs per matmul of the model's shapes, `layer::gemv` (CUDA cores up to 16 rows, tensor
/// cores above) against Burn's matmul on the transposed weight, by row count: 50 calls back to
/// back, then one sync (host time per call is ~10 µs, so the small rows show that floor). What
/// chose `layer::gemv_pays`.
fn linear_crossover<B: LayerBackend>(device: &B::Device) -> Result<(), String> {
    const N: usize = 50;
    let rnd = |shape: [usize; 2]| {
        Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(DType::BF16)
    };
    println!(
        "    µs per matmul, {N} back to back then one sync: layer::gemv (CUDA cores to 16 rows, tensor cores above) / Burn matmul (x · wᵀ)"
    );
    for (name, outputs, k) in [
        ("QKV 960×576", 960, 576),
        ("gate|up 3072×576", 3072, 576),
        ("down 576×1536", 576, 1536),
        ("LM head 49152×576", 49152, 576),
    ] {
        let w = rnd([outputs, k]);
        let mut line = format!("      {name:<19}");
        for rows in [16, 32, 64, 128, 256, 512, 1024, 2048] {
            let x = rnd([rows, k]);
            let time = |f: &mut dyn FnMut() -> Result<(), String>| per_call::<B>(device, N, f);
            let gemv = time(&mut || {
                let xp = x.clone().into_primitive().tensor();
                let wp = w.clone().into_primitive().tensor();
                B::layer_gemv(xp, wp).map(drop).map_err(|e| e.to_string())
            })?;
            let mm = time(&mut || {
                drop(x.clone().matmul(w.clone().transpose()));
                Ok(())
            })?;
            line += &format!(" {rows}: {gemv:.1}/{mm:.1}");
        }
        println!("{line}");
    }
    Ok(())
}

/// Host µs per call of each launch kind of a batch-1 decode step: 200 calls back to back
/// (inputs made beforehand, no read between), then one sync; the time over 200. Device time
/// per call is a few µs at this shape, so this is what issuing one launch costs the host (on
/// the fused backend: recording it and running it at the sync).
fn host_per_call<B: LayerBackend>(
    engine: &mut Engine<B>,
    device: &B::Device,
) -> Result<(), String> {
    use fp8kv_llama::layer::ops;
    let e = |x: fp8kv_llama::ModelError| x.to_string();
    let k = |x: fp8kv::Fp8KvError| x.to_string();
    let c = engine.model.config().clone();
    let (hidden, d) = (c.embedding_length, c.head_dim());
    // One pending token after 1024 cached ones: a decode step's batch.
    let id = engine.add_synthetic(1024, 13).map_err(e)?;
    let plan = engine.plan_step(&[id]).map_err(e)?;
    let batch = plan.step.batch;
    let rnd = |shape: [usize; 2]| {
        Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(DType::BF16)
    };
    let x = rnd([1, hidden]);
    let w = rnd([(c.head_count + 2 * c.head_count_kv) * d, hidden]);
    let norm_w = Tensor::<B, 1>::ones([hidden], (device, DType::F32));
    let gu = rnd([1, 2 * c.feed_forward_length]);
    let logits = rnd([1, c.vocab_size]);
    let q = rnd([1, c.head_count * d]).reshape([1, c.head_count, d]);
    let kv = rnd([1, c.head_count_kv * d]).reshape([1, c.head_count_kv, d]);
    let opts = AttentionOptions::default();
    const N: usize = 200;
    let time = |f: &mut dyn FnMut() -> Result<(), String>| per_call::<B>(device, N, f);
    let mut rows: Vec<(&str, f64)> = Vec::new();
    rows.push((
        "linear 1x576 · 960x576ᵀ (GEMV)",
        time(&mut || ops::linear(x.clone(), &w).map(drop).map_err(k))?,
    ));
    rows.push((
        "add_rms_norm",
        time(&mut || {
            ops::add_rms_norm(x.clone(), x.clone(), &norm_w, 1e-5)
                .map(drop)
                .map_err(k)
        })?,
    ));
    rows.push((
        "swiglu",
        time(&mut || ops::swiglu(gu.clone()).map(drop).map_err(k))?,
    ));
    let w_gu = rnd([2 * c.feed_forward_length, hidden]);
    rows.push((
        "linear_swiglu 1x576 · 3072x576ᵀ (GEMV)",
        time(&mut || ops::linear_swiglu(x.clone(), &w_gu).map(drop).map_err(k))?,
    ));
    rows.push((
        "argmax over the vocabulary",
        time(&mut || ops::argmax(logits.clone()).map(drop).map_err(k))?,
    ));
    rows.push((
        "Burn add (for scale)",
        time(&mut || {
            drop(x.clone() + x.clone());
            Ok(())
        })?,
    ));
    let cache = &mut engine.caches_mut()[0];
    rows.push((
        "fill (library)",
        time(&mut || cache.fill(kv.clone(), kv.clone(), &batch).map_err(k))?,
    ));
    rows.push((
        "decode (library, 2 launches)",
        time(&mut || cache.decode(q.clone(), &batch, &opts).map(drop).map_err(k))?,
    ));
    let qkv = rnd([1, (c.head_count + 2 * c.head_count_kv) * d]);
    let table = engine.model.rope_for(1100).map_err(e)?;
    let heads = fp8kv_llama::layer::QkvHeads {
        q_heads: c.head_count,
        kv_heads: c.head_count_kv,
        head_dim: d,
    };
    let cache = &mut engine.caches_mut()[0];
    rows.push((
        "fill_rope (library)",
        time(&mut || {
            cache
                .fill_rope(qkv.clone(), &batch, &table, heads)
                .map(drop)
                .map_err(k)
        })?,
    ));
    println!("    host µs per call, {N} calls back to back then one sync (batch 1, context 1024):");
    for (name, us) in rows {
        println!("      {name:<34} {us:>8.1}");
    }
    engine.release(id);
    Ok(())
}
