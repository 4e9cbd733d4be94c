//! `cargo xtask demo`: a synthetic LLM workload through the KV cache, for each quant policy.
//!
//! Several layers of a GQA 32/8, head_dim 128 model, with LLM-like K/V (unit normals plus a few
//! outlier channels whose size grows with depth, as in real models), a prefill of every
//! sequence, then decode steps: each step fills one new token per sequence and runs paged
//! decode attention. Every FP8 policy is compared with the unquantized (bf16) cache on the same
//! inputs. This first version runs the CPU reference kernels.

use fp8kv::reference::{self, AttentionOptions, HostKvCache, HostRows};
use fp8kv::testing::{llm_like, Rng};
use fp8kv::{BatchMetadata, Dtype, KvLayoutKind, KvScales, PagedKvLayout, QuantPolicy};

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

/// K/V of every token of one layer: prefill then decode steps, `[tokens, batch, heads, d]`.
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
    let mut k = llm_like(
        &mut rng,
        tokens * w.batch,
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
        tokens * w.batch,
        w.num_kv_heads,
        w.head_dim,
        3.0,
        Dtype::Bf16,
    );
    let q = llm_like(
        &mut rng,
        w.decode_steps * w.batch,
        w.num_heads,
        w.head_dim,
        1.0,
        Dtype::Bf16,
    );
    LayerData { k, v, q }
}

/// Outputs of every decode step and layer, and how many inputs saturated.
struct RunResult {
    outputs: Vec<f64>,
    saturated: usize,
}

fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

fn run_policy(
    w: &Workload,
    data: &[LayerData],
    policy: QuantPolicy,
    mode: ScaleMode,
) -> Result<RunResult, String> {
    let e = |e: fp8kv::Fp8KvError| e.to_string();
    let cache_dtype = policy.cache_dtype(Dtype::Bf16).map_err(e)?;
    let total = w.prefill_tokens + w.decode_steps;
    let pages_per_seq = total.div_ceil(w.page_size);
    let layout = PagedKvLayout::new(
        pages_per_seq * w.batch,
        w.page_size,
        w.num_kv_heads,
        w.head_dim,
        w.head_dim,
        KvLayoutKind::Bshd,
    )
    .map_err(e)?;
    // Sequence b owns pages b, b + batch, b + 2·batch, ...: interleaved, as an allocator would.
    let table: Vec<i32> = (0..w.batch)
        .flat_map(|b| (0..pages_per_seq).map(move |i| (i * w.batch + b) as i32))
        .collect();
    let row = w.num_kv_heads * w.head_dim;
    let mut outputs = Vec::new();
    let mut saturated = 0;
    for d in data {
        let prefill_elems = w.prefill_tokens * w.batch * row;
        let scales = match (policy.fp8_max(), mode) {
            (Some(_), ScaleMode::Calibrated) => KvScales::calibrate(
                amax(&d.k[..prefill_elems]),
                amax(&d.v[..prefill_elems]),
                policy,
            )
            .map_err(e)?,
            _ => KvScales::default(),
        };
        if let Some(max) = policy.fp8_max() {
            saturated += d.k.iter().filter(|x| (*x / scales.k()).abs() > max).count();
            saturated += d.v.iter().filter(|x| (*x / scales.v()).abs() > max).count();
        }
        let mut cache = HostKvCache::new(layout, policy, cache_dtype, 0).map_err(e)?;
        // The data is token-major over the batch; prefill packs each sequence's tokens together.
        let mut pk = Vec::with_capacity(prefill_elems);
        let mut pv = Vec::with_capacity(prefill_elems);
        for b in 0..w.batch {
            for t in 0..w.prefill_tokens {
                let r = (t * w.batch + b) * row;
                pk.extend_from_slice(&d.k[r..r + row]);
                pv.extend_from_slice(&d.v[r..r + row]);
            }
        }
        let n = w.prefill_tokens as i32;
        let prefill = BatchMetadata::new(
            (0..w.batch as i32).map(|b| b * n).collect(),
            vec![n; w.batch],
            vec![n; w.batch],
            table.clone(),
            pages_per_seq,
        )
        .map_err(e)?;
        reference::fill(
            &mut cache,
            &scales,
            HostRows {
                data: &pk,
                row_stride: row,
            },
            HostRows {
                data: &pv,
                row_stride: row,
            },
            w.prefill_tokens * w.batch,
            &prefill,
        )
        .map_err(e)?;
        for step in 0..w.decode_steps {
            let t = w.prefill_tokens + step;
            let lens = vec![t as i32 + 1; w.batch];
            let meta = BatchMetadata::decode(lens, table.clone(), pages_per_seq).map_err(e)?;
            let r = t * w.batch * row;
            let (k_new, v_new) = (&d.k[r..r + w.batch * row], &d.v[r..r + w.batch * row]);
            reference::fill(
                &mut cache,
                &scales,
                HostRows {
                    data: k_new,
                    row_stride: row,
                },
                HostRows {
                    data: v_new,
                    row_stride: row,
                },
                w.batch,
                &meta,
            )
            .map_err(e)?;
            let qn = w.batch * w.num_heads * w.head_dim;
            let q = &d.q[step * qn..(step + 1) * qn];
            let o = reference::paged_decode(
                q,
                w.num_heads,
                &cache,
                &scales,
                &meta,
                w.batch,
                &AttentionOptions::default(),
            )
            .map_err(e)?;
            outputs.extend(o);
        }
    }
    Ok(RunResult { outputs, saturated })
}

fn errors(got: &[f64], want: &[f64]) -> (f64, f64) {
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    let max = got
        .iter()
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
    println!("path: CPU reference kernels (f64 attention); baseline: unquantized bf16 cache\n");
    let data: Vec<LayerData> = (0..w.layers).map(|l| layer_data(w, l)).collect();
    let base = run_policy(w, &data, QuantPolicy::None, ScaleMode::Default)?;
    let layout = PagedKvLayout::new(
        1,
        w.page_size,
        w.num_kv_heads,
        w.head_dim,
        w.head_dim,
        KvLayoutKind::Bshd,
    )
    .map_err(|e| e.to_string())?;
    println!(
        "{:<10} {:<11} {:>16} {:>11} {:>16} {:>13}",
        "policy", "scales", "cache B/token", "saturated", "attn rel-L2 err", "attn max|err|"
    );
    let bytes = |p: QuantPolicy| layout.bytes_per_token(p) * w.layers;
    println!(
        "{:<10} {:<11} {:>16} {:>11} {:>16} {:>13}",
        "none",
        "-",
        bytes(QuantPolicy::None),
        0,
        "baseline",
        "-"
    );
    for policy in [QuantPolicy::Fp8E4m3, QuantPolicy::Fp8E5m2] {
        for (mode, name) in [
            (ScaleMode::Default, "1.0"),
            (ScaleMode::Calibrated, "calibrated"),
        ] {
            let r = run_policy(w, &data, policy, mode)?;
            let (rel, max) = errors(&r.outputs, &base.outputs);
            println!(
                "{:<10} {:<11} {:>16} {:>11} {:>16.3e} {:>13.3e}",
                policy.to_string(),
                name,
                bytes(policy),
                r.saturated,
                rel,
                max
            );
        }
    }
    println!("\ncache B/token: K+V bytes of one token over all layers; saturated: inputs with |x / scale| > MAX");
    Ok(())
}
