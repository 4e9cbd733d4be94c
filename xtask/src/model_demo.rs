//! `cargo xtask demo`: SmolLM2-135M-Instruct generating text on Burn through the FP8 paged
//! KV cache, under `none`, `fp8_e4m3` and `fp8_e5m2`, with tokens/s, KV bytes per token and a
//! quality table against the unquantized cache. With CUDA it runs on the GPU
//! (`burn_cuda::Cuda`'s fused backend, bf16); without, on NdArray (f32, the CPU reference
//! kernels; a short generation).
//!
//! Flags: `--prompt TEXT`, `--max-tokens N`, `--policy P[,P..]`, `--batch N` (N prompts of
//! different lengths decoded together), `--cpu` (NdArray even with a GPU), `--no-quality`,
//! `--quality-only`, `--speed` (GPU: prefill and decode tokens/s at batch 1/32/128, contexts
//! 1k/8k, FP8 against the bf16 cache, on the fused backend and on `CubeBackend`; `--shapes
//! calls,prefill,1x1024,..` runs only those parts; with
//! `--launches`, also the kernel launches and device time per decode step by kernel, from
//! CubeCL's profiling log, which waits for every launch: run it apart from the timing run). The model is fetched on first use
//! (`FP8KV_MODEL_DIR` or `.models/`).

use std::time::Instant;

use burn_tensor::{DType, Distribution, Tensor};
use fp8kv::AttentionOptions;
use fp8kv::{KvScales, QuantPolicy};

use fp8kv_llama::engine::Engine;
use fp8kv_llama::fetch;
use fp8kv_llama::gguf::Gguf;
use fp8kv_llama::layer::LayerBackend;
use fp8kv_llama::llama::{Attend, LayerKvStats, Llama};
use fp8kv_llama::tokenizer::Tokenizer;

type Cuda = burn_fusion::Fusion<burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>>;
type CubeOnly = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
type Cpu = burn_ndarray::NdArray<f32>;

const PAGE: usize = 16;
const DEFAULT_PROMPT: &str =
    "What is the capital of France? Answer in one sentence, then name two famous sights there.";

/// Extra prompts for `--batch` and the quality table.
const MORE_PROMPTS: [&str; 3] = [
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three tips for writing clear code.",
];

struct Opts {
    prompt: String,
    max_tokens: Option<usize>,
    policies: Vec<String>,
    batch: usize,
    cpu: bool,
    quality: bool,
    generate: bool,
    speed: bool,
    launches: bool,
    /// `--shapes`: the `--speed` parts to run (`calls` for the per-call tables, `prefill`,
    /// `prefill-512`, `prefill-flatten`, `1x1024`, ...); empty: all of them.
    shapes: Vec<String>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        prompt: DEFAULT_PROMPT.into(),
        max_tokens: None,
        policies: vec!["none".into(), "fp8_e4m3".into(), "fp8_e5m2".into()],
        batch: 1,
        cpu: false,
        quality: true,
        generate: true,
        speed: false,
        launches: false,
        shapes: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--prompt" => o.prompt = val("--prompt")?,
            "--max-tokens" => {
                o.max_tokens = Some(
                    val("--max-tokens")?
                        .parse()
                        .map_err(|e| format!("--max-tokens: {e}"))?,
                )
            }
            "--policy" => {
                o.policies = val("--policy")?.split(',').map(str::to_string).collect();
                for p in &o.policies {
                    p.parse::<QuantPolicy>().map_err(|e| e.to_string())?;
                }
            }
            "--batch" => {
                o.batch = val("--batch")?
                    .parse()
                    .map_err(|e| format!("--batch: {e}"))?
            }
            "--cpu" => o.cpu = true,
            "--no-quality" => o.quality = false,
            "--quality-only" => o.generate = false,
            "--speed" => o.speed = true,
            "--launches" => o.launches = true,
            "--shapes" => o.shapes = val("--shapes")?.split(',').map(str::to_string).collect(),
            other => return Err(format!("unknown demo flag `{other}`")),
        }
    }
    if o.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    Ok(o)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let path = fetch::ensure_model(&fetch::default_model_dir()).map_err(|e| e.to_string())?;
    let gguf = Gguf::open(&path).map_err(|e| e.to_string())?;
    let tok = Tokenizer::from_gguf(&gguf).map_err(|e| e.to_string())?;
    // CubeCL reads its configuration once, when the first client starts: the execution log
    // must be set before that.
    let counter = o.launches.then(LaunchCounter::install);
    let gpu = if o.cpu {
        Err("--cpu".to_string())
    } else {
        fp8kv::device::cuda_client().map_err(|e| e.to_string())
    };
    match gpu {
        Ok(_) => {
            println!("SmolLM2-135M-Instruct on the GPU (burn_cuda::Cuda, fused; bf16 activations)");
            if o.generate || o.quality {
                run_on::<Cuda>(&gguf, &tok, &o, DType::BF16, &Default::default(), true)?;
            }
            if o.speed {
                speed::<Cuda>(
                    &gguf,
                    &tok,
                    &Default::default(),
                    "fused burn_cuda::Cuda",
                    counter.as_ref(),
                    &o.shapes,
                )?;
                speed::<CubeOnly>(
                    &gguf,
                    &tok,
                    &Default::default(),
                    "CubeBackend",
                    counter.as_ref(),
                    &o.shapes,
                )?;
            }
            Ok(())
        }
        Err(why) => {
            println!("SmolLM2-135M-Instruct on the CPU (Burn NdArray, f32, reference kernels; no GPU: {why})");
            if o.speed {
                println!("--speed needs a GPU: skipped");
            }
            run_on::<Cpu>(&gguf, &tok, &o, DType::F32, &Default::default(), false)
        }
    }
}

fn load<B: LayerBackend>(gguf: &Gguf, act: DType, device: &B::Device) -> Result<Llama<B>, String> {
    let t = Instant::now();
    let m = Llama::<B>::load(gguf, act, device).map_err(|e| e.to_string())?;
    eprintln!("  model loaded in {:.1} s", t.elapsed().as_secs_f64());
    Ok(m)
}

fn run_on<B: LayerBackend>(
    gguf: &Gguf,
    tok: &Tokenizer,
    o: &Opts,
    act: DType,
    device: &B::Device,
    gpu: bool,
) -> Result<(), String> {
    let e = |x: fp8kv_llama::ModelError| x.to_string();
    let mut model = Some(load::<B>(gguf, act, device)?);
    let max_new = o.max_tokens.unwrap_or(if gpu { 64 } else { 12 });
    let mut prompts = vec![o.prompt.clone()];
    prompts.extend(MORE_PROMPTS.iter().take(o.batch - 1).map(|s| s.to_string()));
    let prompt_ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(&tok.chat_prompt(None, p), true).map_err(e))
        .collect::<Result<_, _>>()?;
    if o.generate {
        println!(
            "\nprompt: {:?} ({} tokens){}",
            o.prompt,
            prompt_ids[0].len(),
            if o.batch > 1 {
                format!(", batch of {} prompts", o.batch)
            } else {
                String::new()
            }
        );
        println!(
            "{:<9} {:>10} {:>12} {:>10}  text",
            "policy", "tokens/s", "KV B/token", "pages"
        );
        // Pages for every sequence's prompt and continuation (the CPU path reads the whole cache
        // per call: no more than needed).
        let pages: usize = prompt_ids
            .iter()
            .map(|p| (p.len() + max_new).div_ceil(PAGE) + 1)
            .sum();
        for policy in &o.policies {
            let mut engine =
                Engine::new(model.take().expect("model"), policy, pages, PAGE).map_err(e)?;
            // Warm-up on the GPU: kernel compilation stays out of the tokens/s.
            let warm = if gpu {
                let t = Instant::now();
                engine
                    .generate(&prompt_ids, 3, &|_| false, |_, _| {})
                    .map_err(e)?;
                format!(" (warm-up {:.2} s)", t.elapsed().as_secs_f64())
            } else {
                String::new()
            };
            let mut first: Vec<Option<Instant>> = vec![None; prompt_ids.len()];
            let t0 = Instant::now();
            let out = engine
                .generate(
                    &prompt_ids,
                    max_new,
                    &|t| tok.is_end_of_generation(t),
                    |i, _| {
                        first[i].get_or_insert_with(Instant::now);
                        if !gpu {
                            eprint!(".");
                        }
                    },
                )
                .map_err(e)?;
            if !gpu {
                eprintln!();
            }
            // Decode tokens per second: every token after each sequence's first (which the
            // prefill produced), over the time since the first one.
            let decoded: usize = out.iter().map(|t| t.len().saturating_sub(1)).sum();
            let since = first.iter().flatten().min().copied().unwrap_or(t0);
            let tps = decoded as f64 / since.elapsed().as_secs_f64().max(1e-9);
            let text = tok.decode(&out[0]).map_err(e)?;
            println!(
                "{policy:<9} {tps:>10.1} {:>12} {:>10}  {:?}{warm}",
                engine.kv_bytes_per_token(),
                format!("{}/{pages}", engine.pool().free_pages()),
                text.trim_end_matches("<|im_end|>")
            );
            for (i, t) in out.iter().enumerate().skip(1) {
                println!(
                    "{:<9} {:>10} {:>12} {:>10}  [{}] {:?}",
                    "",
                    "",
                    "",
                    "",
                    i,
                    tok.decode(t).map_err(e)?.trim_end_matches("<|im_end|>")
                );
            }
            model = Some(engine.into_model());
        }
        println!("tokens/s: decode tokens of all sequences over the decode time, after a warm-up generation (compilation) timed apart; KV B/token: K+V bytes of one token over all 30 layers; pages: free pages after the run (all returned)");
    }
    if o.quality {
        quality::<B>(model.take().expect("model"), tok, gpu)?;
    }
    Ok(())
}

/// KL(p ‖ q) of two logit rows, natural log, f64.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let ls = |r: &[f32]| {
        let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        m + r.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (ls(p), ls(q));
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let la = a as f64 - lp;
            la.exp() * (la - (b as f64 - lq))
        })
        .sum()
}

fn nll(row: &[f32], token: u32) -> f64 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    lse - row[token as usize] as f64
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// The quality table: for each FP8 policy and scale choice, next-token KL against the
/// unquantized cache, top-1 agreement and perplexity over teacher-forced positions (the
/// unquantized cache's greedy continuation of several prompts, one past 2k tokens on the GPU),
/// and per layer the K/V amax and what saturates at scale 1.0.
fn quality<B: LayerBackend>(model: Llama<B>, tok: &Tokenizer, gpu: bool) -> Result<(), String> {
    let e = |x: fp8kv_llama::ModelError| x.to_string();
    let mut texts: Vec<String> = std::iter::once(DEFAULT_PROMPT.to_string())
        .chain(MORE_PROMPTS.iter().map(|s| s.to_string()))
        .collect();
    let cont = if gpu { 128 } else { 8 };
    if gpu {
        // A long context (about 11k tokens): this repository's longer documents, to summarise.
        let doc = format!(
            "{}\n\n{}\n\n{}",
            include_str!("../../benches/PERFORMANCE.md"),
            include_str!("../../tests/README.md"),
            include_str!("../../ARCHITECTURE.md")
        );
        texts.push(format!(
            "{doc}\n\nSummarise the text above in three sentences."
        ));
    } else {
        texts.truncate(1);
    }
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode(&tok.chat_prompt(None, t), true).map_err(e))
        .collect::<Result<_, _>>()?;
    let layers = model.config().block_count;
    let pages = prompts
        .iter()
        .map(|p| (p.len() + cont).div_ceil(PAGE) + 1)
        .max()
        .unwrap_or(1)
        + 8;

    // The unquantized cache: the continuations, their logits, and the prefill's K/V statistics.
    let mut engine = Engine::new(model, "none", pages, PAGE).map_err(e)?;
    let mut seqs = Vec::new();
    let mut stats: Vec<Vec<LayerKvStats>> = Vec::new();
    for p in &prompts {
        engine.kv_stats = Some(vec![LayerKvStats::default(); layers]);
        let id = engine.add(p.clone()).map_err(e)?;
        while engine.sequence(id).map(|s| s.cached) != Some(p.len()) {
            engine.step(&[id]).map_err(e)?;
        }
        engine.release(id);
        stats.push(engine.kv_stats.take().unwrap_or_default());
        let c = engine
            .generate(std::slice::from_ref(p), cont, &|_| false, |_, _| {})
            .map_err(e)?;
        seqs.push([p.clone(), c[0].clone()].concat());
        if !gpu {
            eprint!(".");
        }
    }
    let reference: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .zip(&seqs)
        .map(|(p, s)| engine.score(s, p.len()).map_err(e))
        .collect::<Result<_, _>>()?;
    let positions: usize = reference.iter().map(Vec::len).sum();
    let context_max = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut model = Some(engine.into_model());
    let ppl = |rows: &[Vec<Vec<f32>>]| {
        let mut sum = 0.0;
        for ((r, s), p) in rows.iter().zip(&seqs).zip(&prompts) {
            for (i, row) in r.iter().enumerate() {
                sum += nll(row, s[p.len() + i]);
            }
        }
        (sum / positions as f64).exp()
    };
    println!(
        "\nquality against the unquantized cache: {positions} teacher-forced positions over {} prompts (contexts up to {context_max} tokens), the unquantized cache's greedy continuations",
        prompts.len()
    );
    println!(
        "{:<9} {:<11} {:>12} {:>12} {:>8} {:>10}",
        "policy", "scales", "mean KL", "max KL", "top-1", "ppl"
    );
    println!(
        "{:<9} {:<11} {:>12} {:>12} {:>8} {:>10.4}",
        "none",
        "-",
        "-",
        "-",
        "-",
        ppl(&reference)
    );
    for policy in ["fp8_e4m3", "fp8_e5m2"] {
        let pol: QuantPolicy = policy
            .parse()
            .map_err(|x: fp8kv::Fp8KvError| x.to_string())?;
        for calibrated in [false, true] {
            let mut engine =
                Engine::new(model.take().expect("model"), policy, pages, PAGE).map_err(e)?;
            let mut rows = Vec::new();
            for ((p, s), st) in prompts.iter().zip(&seqs).zip(&stats) {
                for (l, ls) in st.iter().enumerate() {
                    let scales = if calibrated {
                        KvScales::calibrate(ls.k_amax, ls.v_amax, pol)
                    } else {
                        Ok(KvScales::default())
                    };
                    engine
                        .set_scales(l, scales.map_err(|x| x.to_string())?)
                        .map_err(e)?;
                }
                rows.push(engine.score(s, p.len()).map_err(e)?);
            }
            let (mut kl_sum, mut kl_max, mut agree) = (0.0, 0f64, 0);
            for (r, want) in rows.iter().zip(&reference) {
                for (a, b) in want.iter().zip(r) {
                    let k = kl(a, b);
                    kl_sum += k;
                    kl_max = kl_max.max(k);
                    agree += usize::from(argmax(a) == argmax(b));
                }
            }
            println!(
                "{policy:<9} {:<11} {:>12.3e} {:>12.3e} {:>7.1}% {:>10.4}",
                if calibrated { "calibrated" } else { "1.0" },
                kl_sum / positions as f64,
                kl_max,
                100.0 * agree as f64 / positions as f64,
                ppl(&rows)
            );
            model = Some(engine.into_model());
        }
    }
    println!("KL: next-token KL(unquantized ‖ fp8), nats; top-1: argmax agreement; ppl: perplexity of the continuation; calibrated: scale = prefill amax / MAX per layer and prompt");
    println!("\nper layer, over the prompts' prefill ({} K and V values each): amax, and values past MAX at scale 1.0 (e4m3 448 / e5m2 57344)", stats.iter().map(|s| s[0].values).sum::<u64>());
    println!(
        "{:>5} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "layer", "K amax", "V amax", "K>448", "V>448", "K>57344", "V>57344"
    );
    for l in 0..layers {
        let mut t = LayerKvStats::default();
        for s in &stats {
            let x = s[l];
            t.k_amax = t.k_amax.max(x.k_amax);
            t.v_amax = t.v_amax.max(x.v_amax);
            t.k_over_e4m3 += x.k_over_e4m3;
            t.v_over_e4m3 += x.v_over_e4m3;
            t.k_over_e5m2 += x.k_over_e5m2;
            t.v_over_e5m2 += x.v_over_e5m2;
        }
        println!(
            "{l:>5} {:>9.2} {:>9.2} {:>10} {:>10} {:>10} {:>10}",
            t.k_amax, t.v_amax, t.k_over_e4m3, t.v_over_e4m3, t.k_over_e5m2, t.v_over_e5m2
        );
    }
    Ok(())
}

/// Counts kernel launches and their device time: CubeCL's profiling log at its `basic` level
/// times every launch (it waits for each, so the host times of such a run mean nothing) and
/// writes `| <duration> | <kernel>` per launch to a file.
struct LaunchCounter {
    path: std::path::PathBuf,
}

impl LaunchCounter {
    fn install() -> Self {
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
fn speed<B: LayerBackend>(
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
