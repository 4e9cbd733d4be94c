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

use burn_tensor::DType;
use fp8kv::{KvScales, QuantPolicy};

use fp8kv_llama::engine::Engine;
use fp8kv_llama::fetch;
use fp8kv_llama::gguf::Gguf;
use fp8kv_llama::layer::LayerBackend;
use fp8kv_llama::llama::{LayerKvStats, Llama};
use fp8kv_llama::tokenizer::Tokenizer;

use crate::model_speed::{speed, LaunchCounter};

type Cuda = burn_fusion::Fusion<burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>>;
type CubeOnly = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
type Cpu = burn_ndarray::NdArray<f32>;

pub(crate) const PAGE: usize = 16;
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

pub(crate) fn load<B: LayerBackend>(
    gguf: &Gguf,
    act: DType,
    device: &B::Device,
) -> Result<Llama<B>, String> {
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
