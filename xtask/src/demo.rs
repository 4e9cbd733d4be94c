//! `cargo xtask demo`: a synthetic LLM workload through the KV cache, for each quant policy.
//!
//! Several layers of a GQA 32/8, head_dim 128 model, with LLM-like K/V (unit normals plus a few
//! outlier channels whose size grows with depth, as in real models), a prefill of every
//! sequence, then decode steps: each step fills one new token per sequence and runs paged
//! decode attention. Every FP8 policy is compared with the unquantized (bf16) cache on the same
//! inputs. The CPU reference kernels always run; where a CUDA device is present the same
//! workload also runs through the GPU kernels (fill, then decode steps), which report decode
//! tokens per second and their error against the CPU reference of the same policy.

use std::time::Instant;

use cubecl::client::ComputeClient;
use fp8kv::device::{cuda_client, Cuda, DeviceBatch, DeviceRows, PagedKvCache};
use fp8kv::kernels::{decode, fill};
use fp8kv::reference::{self, HostKvCache, HostRows};
use fp8kv::testing::{llm_like, Rng};
use fp8kv::AttentionOptions;
use fp8kv::{
    BatchMetadata, CacheSpec, Dtype, Fp8KvError, KvLayoutKind, KvScales, PagedKvLayout, QuantPolicy,
};

/// The workload's shape.
struct Workload {
    layers: usize,
    batch: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    page_size: usize,
    prefill_tokens: usize,
    decode_steps: usize,
}

const WORKLOAD: Workload = Workload {
    layers: 4,
    batch: 2,
    num_heads: 32,
    num_kv_heads: 8,
    head_dim: 128,
    page_size: 16,
    prefill_tokens: 384,
    decode_steps: 8,
};

/// Which scales a run uses.
#[derive(Clone, Copy, PartialEq)]
enum ScaleMode {
    /// 1.0, what engines use with no calibration data.
    Default,
    /// `amax / MAX` from the prefill's K/V of each layer.
    Calibrated,
}

/// Inputs of one layer. K/V of every sequence's tokens, prefill then decode steps, each
/// sequence's tokens contiguous: `[batch, tokens, kv_heads, d]`; queries `[steps, batch,
/// heads, d]`.
struct LayerData {
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
}

fn layer_data(w: &Workload, layer: usize) -> LayerData {
    let tokens = w.prefill_tokens + w.decode_steps;
    let mut rng = Rng::from_name(&format!("demo/layer{layer}"));
    // Outlier channels grow with depth (gain 4, 8, 12, 16 over unit normals); the last layer
    // also has one channel ~40x larger, reaching past E4M3's 448 at scale 1.0, as the K bias
    // of some models does: that is what calibration is for.
    let k_gain = 4.0 * (layer as f64 + 1.0);
    let kv_rows = tokens * w.batch;
    let mut k = llm_like(
        &mut rng,
        kv_rows,
        w.num_kv_heads,
        w.head_dim,
        k_gain,
        Dtype::Bf16,
    );
    if layer + 1 == w.layers {
        for x in k.iter_mut().skip(3).step_by(w.head_dim) {
            *x = Dtype::Bf16.round_trip(*x * 8.0);
        }
    }
    let v = llm_like(
        &mut rng,
        kv_rows,
        w.num_kv_heads,
        w.head_dim,
        3.0,
        Dtype::Bf16,
    );
    let q_rows = w.decode_steps * w.batch;
    let q = llm_like(&mut rng, q_rows, w.num_heads, w.head_dim, 1.0, Dtype::Bf16);
    LayerData { k, v, q }
}

fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

fn err(e: Fp8KvError) -> String {
    e.to_string()
}

/// Everything both paths share for one policy: layout, metadata of the prefill and of each
/// decode step, and each layer's scales.
struct Plan {
    policy: QuantPolicy,
    cache_dtype: Dtype,
    layout: PagedKvLayout,
    prefill: BatchMetadata,
    steps: Vec<BatchMetadata>,
    scales: Vec<KvScales>,
    saturated: usize,
}

impl Plan {
    fn new(
        w: &Workload,
        data: &[LayerData],
        policy: QuantPolicy,
        mode: ScaleMode,
    ) -> Result<Self, String> {
        let total = w.prefill_tokens + w.decode_steps;
        let pages_per_seq = total.div_ceil(w.page_size);
        let layout = cache_layout(w, pages_per_seq * w.batch)?;
        // Sequence b owns pages b, b + batch, b + 2·batch, ...: interleaved, as an allocator would.
        let table: Vec<i32> = (0..w.batch)
            .flat_map(|b| (0..pages_per_seq).map(move |i| (i * w.batch + b) as i32))
            .collect();
        let n = w.prefill_tokens as i32;
        let prefill = BatchMetadata::new(
            (0..w.batch as i32).map(|b| b * n).collect(),
            vec![n; w.batch],
            vec![n; w.batch],
            table.clone(),
            pages_per_seq,
        )
        .map_err(err)?;
        let steps = (0..w.decode_steps)
            .map(|s| {
                let lens = vec![(w.prefill_tokens + s + 1) as i32; w.batch];
                BatchMetadata::decode(lens, table.clone(), pages_per_seq).map_err(err)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut scales = Vec::new();
        let mut saturated = 0;
        for d in data {
            let s = match (policy.fp8_max(), mode) {
                (Some(_), ScaleMode::Calibrated) => {
                    let (kp, vp) = (prefill_rows(w, &d.k), prefill_rows(w, &d.v));
                    KvScales::calibrate(amax(&kp), amax(&vp), policy).map_err(err)?
                }
                _ => KvScales::default(),
            };
            if let Some(max) = policy.fp8_max() {
                saturated += d.k.iter().filter(|x| (*x / s.k()).abs() > max).count();
                saturated += d.v.iter().filter(|x| (*x / s.v()).abs() > max).count();
            }
            scales.push(s);
        }
        Ok(Plan {
            policy,
            cache_dtype: policy.cache_dtype(Dtype::Bf16).map_err(err)?,
            layout,
            prefill,
            steps,
            scales,
            saturated,
        })
    }
}

fn row(w: &Workload) -> usize {
    w.num_kv_heads * w.head_dim
}

/// The workload's `bshd` cache layout with `num_pages` pages.
fn cache_layout(w: &Workload, num_pages: usize) -> Result<PagedKvLayout, String> {
    let (p, kv, d) = (w.page_size, w.num_kv_heads, w.head_dim);
    PagedKvLayout::new(num_pages, p, kv, d, d, KvLayoutKind::Bshd).map_err(err)
}

/// The prefill tokens of every sequence, packed.
fn prefill_rows(w: &Workload, x: &[f32]) -> Vec<f32> {
    let per_seq = (w.prefill_tokens + w.decode_steps) * row(w);
    (0..w.batch)
        .flat_map(|b| {
            x[b * per_seq..][..w.prefill_tokens * row(w)]
                .iter()
                .copied()
        })
        .collect()
}

/// The token of decode step `step` of every sequence, packed.
fn step_rows(w: &Workload, x: &[f32], step: usize) -> Vec<f32> {
    let per_seq = (w.prefill_tokens + w.decode_steps) * row(w);
    let t = w.prefill_tokens + step;
    (0..w.batch)
        .flat_map(|b| x[b * per_seq + t * row(w)..][..row(w)].iter().copied())
        .collect()
}

fn hr<'a>(w: &Workload, x: &'a [f32]) -> HostRows<'a> {
    HostRows {
        data: x,
        row_stride: row(w),
    }
}

fn step_queries<'a>(w: &Workload, d: &'a LayerData, step: usize) -> &'a [f32] {
    let qn = w.batch * w.num_heads * w.head_dim;
    &d.q[step * qn..(step + 1) * qn]
}

/// The CPU reference path: outputs of every layer and step, in that order.
fn run_cpu(w: &Workload, data: &[LayerData], plan: &Plan) -> Result<Vec<f64>, String> {
    let mut outputs = Vec::new();
    for (d, scales) in data.iter().zip(&plan.scales) {
        let spec = CacheSpec::from_parts(plan.layout, plan.policy, plan.cache_dtype, *scales);
        let mut cache = HostKvCache::new(spec.map_err(err)?, 0).map_err(err)?;
        let (pk, pv) = (prefill_rows(w, &d.k), prefill_rows(w, &d.v));
        reference::fill(
            &mut cache,
            hr(w, &pk),
            hr(w, &pv),
            w.prefill_tokens * w.batch,
            &plan.prefill,
        )
        .map_err(err)?;
        for (step, meta) in plan.steps.iter().enumerate() {
            let (k, v) = (step_rows(w, &d.k, step), step_rows(w, &d.v, step));
            reference::fill(&mut cache, hr(w, &k), hr(w, &v), w.batch, meta).map_err(err)?;
            let q = step_queries(w, d, step);
            let opts = AttentionOptions::default();
            let o = reference::paged_decode(q, w.num_heads, &cache, meta, w.batch, &opts)
                .map_err(err)?;
            outputs.extend(o);
        }
    }
    Ok(outputs)
}

/// The GPU path: outputs of every layer and step (same order as [`run_cpu`]) and the seconds
/// the decode steps took (fill + attention of every layer, metadata upload once per step).
fn run_gpu(
    w: &Workload,
    data: &[LayerData],
    plan: &Plan,
    client: &ComputeClient<Cuda>,
) -> Result<(Vec<f32>, f64), String> {
    let rw = row(w);
    let up = |x: &[f32], rows: usize, elems: usize| {
        DeviceRows::from_f32(client, x, Dtype::Bf16, rows, elems, elems)
    };
    let mut caches = Vec::new();
    let prefill = DeviceBatch::new(
        client,
        plan.prefill.clone(),
        &plan.layout,
        w.prefill_tokens * w.batch,
    )
    .map_err(err)?;
    for (d, scales) in data.iter().zip(&plan.scales) {
        let mut cache =
            PagedKvCache::new(client, plan.layout, plan.policy, plan.cache_dtype, *scales)
                .map_err(err)?;
        let n = w.prefill_tokens * w.batch;
        let k = up(&prefill_rows(w, &d.k), n, rw).map_err(err)?;
        let v = up(&prefill_rows(w, &d.v), n, rw).map_err(err)?;
        fill::fill(&mut cache, &k, &v, &prefill).map_err(err)?;
        caches.push(cache);
    }
    // Inputs of the decode steps go up before the clock starts: an engine has them on the device.
    let mut inputs = Vec::new();
    for step in 0..w.decode_steps {
        for d in data {
            let k = up(&step_rows(w, &d.k, step), w.batch, rw).map_err(err)?;
            let v = up(&step_rows(w, &d.v, step), w.batch, rw).map_err(err)?;
            let qe = w.num_heads * w.head_dim;
            let q = up(step_queries(w, d, step), w.batch, qe).map_err(err)?;
            let out = DeviceRows::empty(client, Dtype::Bf16, w.batch, qe, qe).map_err(err)?;
            inputs.push((k, v, q, out));
        }
    }
    // Compile the step kernels before the clock: step 0 of layer 0 once, untimed. Both calls
    // are idempotent (the same token to the same slot, the same output), and the timed loop
    // repeats them.
    if let (Some(meta), Some(cache), Some((k, v, q, out))) =
        (plan.steps.first(), caches.first_mut(), inputs.first_mut())
    {
        let batch = DeviceBatch::new(client, meta.clone(), &plan.layout, w.batch).map_err(err)?;
        fill::fill(cache, k, v, &batch).map_err(err)?;
        decode::paged_decode(q, cache, &batch, &Default::default(), out).map_err(err)?;
    }
    cubecl::future::block_on(client.sync()).map_err(|e| format!("device sync: {e:?}"))?;
    let start = Instant::now();
    let mut it = inputs.iter_mut();
    for meta in &plan.steps {
        let batch = DeviceBatch::new(client, meta.clone(), &plan.layout, w.batch).map_err(err)?;
        for cache in caches.iter_mut() {
            let (k, v, q, out) = it.next().ok_or("missing step inputs")?;
            fill::fill(cache, k, v, &batch).map_err(err)?;
            decode::paged_decode(q, cache, &batch, &Default::default(), out).map_err(err)?;
        }
    }
    cubecl::future::block_on(client.sync()).map_err(|e| format!("device sync: {e:?}"))?;
    let seconds = start.elapsed().as_secs_f64();
    // Reorder from (step, layer) to (layer, step), the CPU path's order.
    let mut outputs = Vec::new();
    for layer in 0..w.layers {
        for step in 0..w.decode_steps {
            outputs.extend(inputs[step * w.layers + layer].3.to_f32().map_err(err)?);
        }
    }
    Ok((outputs, seconds))
}

/// Relative L2 error and max |error| of `got` against `want`.
fn errors(got: impl Iterator<Item = f64> + Clone, want: &[f64]) -> (f64, f64) {
    let num: f64 = got.clone().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    let max = got
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    ((num / den).sqrt(), max)
}

/// Runs the demo with the arguments after `demo` (none are taken yet).
pub fn run(_args: &[String]) -> Result<(), String> {
    let w = &WORKLOAD;
    println!(
        "fp8kv demo: {} layers, batch {}, {} q heads / {} kv heads, head_dim {}, page {}, prefill {} tokens then {} decode steps",
        w.layers, w.batch, w.num_heads, w.num_kv_heads, w.head_dim, w.page_size, w.prefill_tokens, w.decode_steps
    );
    let data: Vec<LayerData> = (0..w.layers).map(|l| layer_data(w, l)).collect();
    let runs = [
        (QuantPolicy::None, ScaleMode::Default, "-"),
        (QuantPolicy::Fp8E4m3, ScaleMode::Default, "1.0"),
        (QuantPolicy::Fp8E4m3, ScaleMode::Calibrated, "calibrated"),
        (QuantPolicy::Fp8E5m2, ScaleMode::Default, "1.0"),
        (QuantPolicy::Fp8E5m2, ScaleMode::Calibrated, "calibrated"),
    ];
    let bytes_layout = cache_layout(w, 1)?;
    let gpu = cuda_client();

    println!("\nCPU reference kernels (f64 attention); baseline: the unquantized bf16 cache");
    println!(
        "{:<10} {:<11} {:>14} {:>10} {:>16} {:>14}   rel-L2 per layer",
        "policy", "scales", "cache B/token", "saturated", "attn rel-L2 err", "attn max|err|"
    );
    let mut results = Vec::new();
    let mut baseline = Vec::new();
    for (policy, mode, name) in runs {
        let plan = Plan::new(w, &data, policy, mode)?;
        let out = run_cpu(w, &data, &plan)?;
        let bytes = bytes_layout.bytes_per_token(policy) * w.layers;
        if policy == QuantPolicy::None {
            baseline = out.clone();
            println!(
                "{:<10} {:<11} {:>14} {:>10} {:>16} {:>14}   baseline",
                "none", name, bytes, 0, "-", "-"
            );
        } else {
            let (rel, max) = errors(out.iter().copied(), &baseline);
            let per_layer = out.len() / w.layers;
            let layers: Vec<String> = (0..w.layers)
                .map(|l| {
                    let r = l * per_layer..(l + 1) * per_layer;
                    format!(
                        "{:.1e}",
                        errors(out[r.clone()].iter().copied(), &baseline[r]).0
                    )
                })
                .collect();
            println!(
                "{:<10} {:<11} {:>14} {:>10} {:>16.3e} {:>14.3e}   {}",
                policy.to_string(),
                name,
                bytes,
                plan.saturated,
                rel,
                max,
                layers.join(" ")
            );
        }
        results.push((plan, out, name));
    }
    println!("cache B/token: K+V bytes of one token over all layers; saturated: inputs with |x / scale| > MAX");

    match gpu {
        Err(e) => println!("\nGPU path skipped: {e}"),
        Ok(client) => {
            println!(
                "\nGPU kernels (fill + paged decode), against the CPU reference of the same policy"
            );
            println!(
                "{:<10} {:<11} {:>16} {:>14} {:>18}",
                "policy", "scales", "rel-L2 vs CPU", "max|Δ| vs CPU", "decode tokens/s"
            );
            for (plan, cpu_out, name) in &results {
                let (out, secs) = run_gpu(w, &data, plan, &client)?;
                let (rel, max) = errors(out.iter().map(|&x| x as f64), cpu_out);
                let tps = (w.batch * w.decode_steps) as f64 / secs;
                println!(
                    "{:<10} {:<11} {:>16.3e} {:>14.3e} {:>18.0}",
                    plan.policy.to_string(),
                    name,
                    rel,
                    max,
                    tps
                );
            }
            println!(
                "the GPU output is bf16: its rounding (~2e-3 relative) is most of the difference"
            );
        }
    }
    println!(
        "\nLayers 0-2 show FP8's ordinary error; layer 3's K has a channel reaching ~±600, whose coarse \
         FP8 steps move its very peaked softmax: per-tensor scales cannot help a single channel."
    );
    Ok(())
}
