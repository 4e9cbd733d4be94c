//! The model's block kernels (`fp8kv_llama::layer`: RMSNorm with the residual add fused in,
//! SwiGLU, RoPE on a fused QKV output) on the GPU against their f64 CPU definitions, on fresh
//! random inputs, every activation dtype, strided inputs, outputs poisoned with NaN before the
//! launch. The GPU tests skip visibly without CUDA (`FP8KV_REQUIRE_GPU=1` fails instead).

use fp8kv::device::{Cuda, DeviceBatch, DeviceRows};
use fp8kv::testing::Rng;
use fp8kv::{BatchMetadata, Dtype, KvLayoutKind, PagedKvLayout};
use fp8kv_llama::layer::{self, reference, QkvHeads, RopeTable};

const ACTS: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

/// Relative size of one unit in the last place of `dtype` (its rounding of an exact result is
/// within half of it; an f32 computation that lands on the other side of a rounding boundary
/// moves it by one unit).
fn ulp(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::Bf16 => 2f64.powi(-7),
        Dtype::F16 => 2f64.powi(-10),
        _ => 2f64.powi(-23),
    }
}

/// `n` unit normals rounded to `dtype`, a row stride of `stride` (padding holds a large value
/// that must never be read).
fn random_rows(rng: &mut Rng, rows: usize, width: usize, stride: usize, dtype: Dtype) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * stride);
    for _ in 0..rows {
        out.extend((0..width).map(|_| dtype.round_trip((rng.normal() * 2.0) as f32)));
        out.extend(std::iter::repeat_n(dtype.round_trip(3.0e4), stride - width));
    }
    out
}

/// Dense rows (stride dropped) of strided ones.
fn dense(v: &[f32], rows: usize, width: usize, stride: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| v[r * stride..r * stride + width].iter().copied())
        .collect()
}

fn poisoned(
    client: &cubecl::client::ComputeClient<Cuda>,
    dtype: Dtype,
    rows: usize,
    width: usize,
) -> DeviceRows<Cuda> {
    DeviceRows::from_f32(
        client,
        &vec![f32::NAN; rows * width],
        dtype,
        rows,
        width,
        width,
    )
    .unwrap()
}

/// Compares the GPU's `got` with the f64 definition `want`: `|got − want| ≤ tol(want)`, and no
/// NaN; reports the count of mismatches, the largest |Δ| and where.
fn check(what: &str, got: &[f32], want: &[f64], tol: impl Fn(f64) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut bad = 0;
    let (mut worst, mut at) = (0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w).abs();
        if g.is_nan() || d > tol(w) {
            bad += 1;
        }
        if d > worst || g.is_nan() {
            (worst, at) = (if g.is_nan() { f64::INFINITY } else { d }, i);
        }
    }
    assert_eq!(
        bad,
        0,
        "{what}: {bad} of {} values outside the bound; max |Δ| {worst:e} at {at} (got {}, want {})",
        got.len(),
        got[at],
        want[at]
    );
}

#[test]
fn gpu_rms_norm_and_add_rms_norm_match_the_f64_definition() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_rms_norm_and_add_rms_norm_match_the_f64_definition")
    else {
        return;
    };
    // (rows, hidden, x row stride): SmolLM2's 576 at batch 1 and a prefill chunk, a hidden
    // that is not a multiple of the 32 lanes, Burn-style pitched rows.
    for (rows, hidden, stride) in [(1, 576, 576), (37, 576, 640), (9, 100, 100), (300, 64, 72)] {
        for act in ACTS {
            let name = format!("norm/{rows}x{hidden}/{act}");
            let mut rng = Rng::from_name(&name);
            let eps = 1e-5f32;
            let x = random_rows(&mut rng, rows, hidden, stride, act);
            let r = random_rows(&mut rng, rows, hidden, hidden, act);
            let w: Vec<f32> = (0..hidden)
                .map(|_| (1.0 + 0.3 * rng.normal()) as f32)
                .collect();
            let xd = DeviceRows::from_f32(&client, &x, act, rows, hidden, stride).unwrap();
            let rd = DeviceRows::from_f32(&client, &r, act, rows, hidden, hidden).unwrap();
            let wd = DeviceRows::from_f32(&client, &w, Dtype::F32, 1, hidden, hidden).unwrap();
            // f32 accumulation of `hidden` squares (relative error ≲ hidden · 2⁻²⁴), then one
            // rounding to the activation dtype (one unit where the f32 result straddles a
            // rounding boundary).
            let tol = |v: f64| v.abs() * (ulp(act) + hidden as f64 * 2f64.powi(-23)) + 1e-30;

            let mut out = poisoned(&client, act, rows, hidden);
            layer::rms_norm(&xd, &wd, eps, &mut out).unwrap();
            let want = reference::rms_norm(&dense(&x, rows, hidden, stride), &w, eps);
            check(
                &format!("{name} rms_norm"),
                &out.to_f32().unwrap(),
                &want,
                tol,
            );

            let (mut sum, mut out) = (
                poisoned(&client, act, rows, hidden),
                poisoned(&client, act, rows, hidden),
            );
            layer::add_rms_norm(&xd, &rd, &wd, eps, &mut sum, &mut out).unwrap();
            let (want_sum, want) =
                reference::add_rms_norm(&dense(&x, rows, hidden, stride), &r, &w, eps, act);
            // The sum is one correctly rounded add: bit for bit.
            let got_sum = sum.to_f32().unwrap();
            assert_eq!(
                got_sum.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want_sum.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{name}: the residual sum"
            );
            check(
                &format!("{name} add_rms_norm"),
                &out.to_f32().unwrap(),
                &want,
                tol,
            );
        }
    }
}

#[test]
fn gpu_swiglu_matches_the_f64_definition() {
    let Some(client) = fp8kv::testing::client_or_skip("gpu_swiglu_matches_the_f64_definition")
    else {
        return;
    };
    // SmolLM2's 1536 at batch 1 and 33 rows (with a row stride), an odd width.
    for (rows, ff, stride) in [(1, 1536, 3072), (33, 1536, 3200), (5, 77, 154)] {
        for act in ACTS {
            let name = format!("swiglu/{rows}x{ff}/{act}");
            let mut rng = Rng::from_name(&name);
            let gu = random_rows(&mut rng, rows, 2 * ff, stride, act);
            let gd = DeviceRows::from_f32(&client, &gu, act, rows, 2 * ff, stride).unwrap();
            let mut out = poisoned(&client, act, rows, ff);
            layer::swiglu(&gd, &mut out).unwrap();
            let want = reference::swiglu(&dense(&gu, rows, 2 * ff, stride), ff);
            // f32 exp, divide and multiply (a few units of 2⁻²³ of |g|·|u|, and of the small
            // results near g = 0), then one rounding to the activation dtype.
            check(&name, &out.to_f32().unwrap(), &want, |v| {
                v.abs() * (ulp(act) + 8.0 * 2f64.powi(-23)) + 1e-6
            });
        }
    }
}

#[test]
fn gpu_rope_qkv_matches_the_f64_definition() {
    let Some(client) = fp8kv::testing::client_or_skip("gpu_rope_qkv_matches_the_f64_definition")
    else {
        return;
    };
    // Sequences: (new tokens, cached tokens after the step). Positions up to 8199 (past
    // SmolLM2's 8192 training context), a prefill of 13, decode steps, one empty sequence; row
    // 0 belongs to no sequence and must stay unwritten.
    let seqs = [(1usize, 8200usize), (13, 13), (0, 5), (3, 700), (1, 1)];
    let page = 16;
    let max_pages = 8200usize.div_ceil(page);
    let mut q_start = Vec::new();
    let mut at = 1;
    for &(q, _) in &seqs {
        q_start.push(at as i32);
        at += q;
    }
    let n = at;
    let mut table = Vec::new();
    for b in 0..seqs.len() {
        table.extend((0..max_pages).map(|p| ((b * max_pages + p) % 64) as i32));
    }
    let meta = BatchMetadata::new(
        q_start,
        seqs.iter().map(|s| s.0 as i32).collect(),
        seqs.iter().map(|s| s.1 as i32).collect(),
        table,
        max_pages,
    )
    .unwrap();
    // SmolLM2 (9 / 3 heads, d64, all dims rotated), Llama-3-8B's shape, partial rotary.
    for (q_heads, kv_heads, d, rope_dims) in [(9, 3, 64, 64), (32, 8, 128, 128), (4, 2, 64, 32)] {
        let heads = QkvHeads {
            q_heads,
            kv_heads,
            head_dim: d,
        };
        let layout = PagedKvLayout::new(64, page, kv_heads, d, d, KvLayoutKind::Bshd).unwrap();
        let batch = DeviceBatch::new(&client, meta.clone(), &layout, n).unwrap();
        let rope = RopeTable::new(10000.0, d, rope_dims, 8200).unwrap();
        let td = DeviceRows::from_f32(&client, rope.values(), Dtype::F32, 8200, d, d).unwrap();
        for act in ACTS {
            let name = format!("rope/{q_heads}-{kv_heads}-d{d}-r{rope_dims}/{act}");
            let mut rng = Rng::from_name(&name);
            let (w, stride) = (heads.row_elems(), heads.row_elems() + 8);
            let qkv = random_rows(&mut rng, n, w, stride, act);
            let xd = DeviceRows::from_f32(&client, &qkv, act, n, w, stride).unwrap();
            let mut q = poisoned(&client, act, n, q_heads * d);
            let mut k = poisoned(&client, act, n, kv_heads * d);
            let mut v = poisoned(&client, act, n, kv_heads * d);
            layer::rope_qkv(&xd, &batch, &td, heads, rope_dims, &mut q, &mut k, &mut v).unwrap();
            let (wq, wk, wv) =
                reference::rope_qkv(&qkv, n, stride, &meta, rope.values(), rope_dims, heads);
            let (gq, gk, gv) = (
                q.to_f32().unwrap(),
                k.to_f32().unwrap(),
                v.to_f32().unwrap(),
            );
            // Row 0 (no sequence) is untouched: still NaN, as in the reference.
            for (side, got) in [("q", &gq), ("k", &gk), ("v", &gv)] {
                let width = got.len() / n;
                assert!(
                    got[..width].iter().all(|x| x.is_nan()),
                    "{name}: {side} row 0 was written"
                );
            }
            // Two f32 products and a sum of values below 2·max(|x0|, |x1|): a few units of 2⁻²³
            // of that, then one rounding to the activation dtype. V is copied: exact.
            let tol = |v: f64| v.abs() * ulp(act) + 8.0 * 2f64.powi(-23) * 20.0;
            let w0 = q_heads * d;
            check(&format!("{name} q"), &gq[w0..], &wq[w0..], tol);
            let w0 = kv_heads * d;
            check(&format!("{name} k"), &gk[w0..], &wk[w0..], tol);
            check(&format!("{name} v"), &gv[w0..], &wv[w0..], |_| 0.0);
        }
    }
}

#[test]
fn gpu_rope_refuses_a_table_shorter_than_the_batch() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_rope_refuses_a_table_shorter_than_the_batch")
    else {
        return;
    };
    let heads = QkvHeads {
        q_heads: 2,
        kv_heads: 1,
        head_dim: 64,
    };
    let layout = PagedKvLayout::new(8, 16, 1, 64, 64, KvLayoutKind::Bshd).unwrap();
    let meta = BatchMetadata::decode(vec![40], vec![0, 1, 2], 3).unwrap();
    let batch = DeviceBatch::new(&client, meta, &layout, 1).unwrap();
    let rope = RopeTable::new(10000.0, 64, 64, 32).unwrap();
    let td = DeviceRows::from_f32(&client, rope.values(), Dtype::F32, 32, 64, 64).unwrap();
    let xd = DeviceRows::from_f32(&client, &vec![1.0; 256], Dtype::F32, 1, 256, 256).unwrap();
    let mut q = poisoned(&client, Dtype::F32, 1, 128);
    let mut k = poisoned(&client, Dtype::F32, 1, 64);
    let mut v = poisoned(&client, Dtype::F32, 1, 64);
    let err = layer::rope_qkv(&xd, &batch, &td, heads, 64, &mut q, &mut k, &mut v).unwrap_err();
    assert!(err.to_string().contains("covers 32 positions"), "{err}");
}

#[test]
fn gpu_gemv_matches_the_f64_definition() {
    let Some(client) = fp8kv::testing::client_or_skip("gpu_gemv_matches_the_f64_definition") else {
        return;
    };
    // (rows, outputs, k, x row stride): SmolLM2's QKV, MLP down and LM head at batch 1, row
    // counts up to 16 (one cube row), past 16 (f32: groups of 16, a partial last one; f16 and
    // bf16: the tensor-core kernel, by row blocks of 64 with a partial last one, k split over
    // 8, 6 or 4 warps or 1), a k that takes 4-element loads, a strided x, and shapes the
    // tensor-core kernel does not take (outputs not a multiple of 16, a row stride not a
    // multiple of 4), which stay on CUDA cores.
    for (rows, outputs, k, stride) in [
        (1, 960, 576, 576),
        (16, 576, 1536, 1536),
        (3, 49152, 576, 576),
        (7, 100, 100, 100),
        (9, 33, 64, 72),
        (17, 960, 576, 576),
        (128, 3072, 576, 576),
        (37, 33, 64, 72),
        (33, 576, 1536, 1536),
        (64, 48, 64, 72),
        (130, 64, 96, 100),
        (21, 32, 80, 84),
        (20, 32, 64, 66),
    ] {
        for act in ACTS {
            let name = format!("gemv/{rows}x{outputs}x{k}/{act}");
            let mut rng = Rng::from_name(&name);
            let x = random_rows(&mut rng, rows, k, stride, act);
            let w: Vec<f32> = (0..outputs * k)
                .map(|_| act.round_trip((rng.normal() * 0.05) as f32))
                .collect();
            let xd = DeviceRows::from_f32(&client, &x, act, rows, k, stride).unwrap();
            // The weight at Burn's pitch for odd widths (576 bf16 → 768), dense otherwise.
            let ws = if k == 576 { 768 } else { k };
            let wp: Vec<f32> = (0..outputs)
                .flat_map(|n| {
                    let row = &w[n * k..(n + 1) * k];
                    row.iter()
                        .copied()
                        .chain(std::iter::repeat_n(f32::NAN, ws - k))
                })
                .collect();
            let wd = DeviceRows::from_f32(&client, &wp, act, outputs, k, ws).unwrap();
            let mut out = poisoned(&client, act, rows, outputs);
            layer::gemv(&xd, &wd, &mut out).unwrap();
            let want = reference::gemv(&dense(&x, rows, k, stride), &w, k);
            // f32 accumulation of k products in any order: |Δ| ≤ k · 2⁻²³ · Σ|x·w| (bounded
            // here by the row's Σ|x|·|w|), then one rounding to the activation dtype.
            let mag: Vec<f64> = reference::gemv(
                &dense(&x, rows, k, stride)
                    .iter()
                    .map(|v| v.abs())
                    .collect::<Vec<_>>(),
                &w.iter().map(|v| v.abs()).collect::<Vec<_>>(),
                k,
            );
            let got = out.to_f32().unwrap();
            let mut bad = 0;
            for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                let tol = r.abs() * ulp(act) + k as f64 * 2f64.powi(-23) * mag[i] + 1e-30;
                if g.is_nan() || (g as f64 - r).abs() > tol {
                    bad += 1;
                }
            }
            assert_eq!(bad, 0, "{name}: {bad} of {} outside the bound", got.len());
        }
    }
    // Past 16 · 65,535 rows the grid's y dimension runs out: an error, not a launch.
    let (act, rows) = (Dtype::F32, 16 * 65_535 + 1);
    let xd = DeviceRows::from_f32(&client, &vec![1.0; rows], act, rows, 1, 1).unwrap();
    let wd = DeviceRows::from_f32(&client, &[1.0], act, 1, 1, 1).unwrap();
    let mut out = poisoned(&client, act, rows, 1);
    let err = layer::gemv(&xd, &wd, &mut out).unwrap_err();
    assert!(err.to_string().contains("GEMV rows"), "{err}");
}

#[test]
fn gpu_gemv_swiglu_equals_the_definition_on_the_gemv_output() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_gemv_swiglu_equals_the_definition_on_the_gemv_output")
    else {
        return;
    };
    // (rows, ff, k, x row stride): SmolLM2's gate|up at batch 1, 16 rows, groups of 16 with a
    // partial one (tensor cores for f16 and bf16), an odd ff with a strided x, two row blocks
    // of the tensor-core kernel with k over 8 warps.
    for (rows, ff, k, stride) in [
        (1, 1536, 576, 576),
        (16, 1536, 576, 576),
        (37, 1536, 576, 576),
        (3, 77, 64, 72),
        (70, 48, 1536, 1536),
    ] {
        for act in ACTS {
            let name = format!("gemv_swiglu/{rows}x{ff}x{k}/{act}");
            let mut rng = Rng::from_name(&name);
            let x = random_rows(&mut rng, rows, k, stride, act);
            let w: Vec<f32> = (0..2 * ff * k)
                .map(|_| act.round_trip((rng.normal() * 0.05) as f32))
                .collect();
            let xd = DeviceRows::from_f32(&client, &x, act, rows, k, stride).unwrap();
            let wd = DeviceRows::from_f32(&client, &w, act, 2 * ff, k, k).unwrap();
            // The gate|up product by the plain GEMV (checked against f64 above), then SwiGLU
            // in f64 on exactly those values: the fused kernel must round the same g and u.
            let mut gu = poisoned(&client, act, rows, 2 * ff);
            layer::gemv(&xd, &wd, &mut gu).unwrap();
            let gu = gu.to_f32().unwrap();
            let want = reference::swiglu(&gu, ff);
            let mut out = poisoned(&client, act, rows, ff);
            layer::gemv_swiglu(&xd, &wd, &mut out).unwrap();
            let got = out.to_f32().unwrap();
            // f32 exp, divide and multiply, then one rounding to the activation dtype (the
            // bound of the SwiGLU test).
            check(&name, &got, &want, |v| {
                v.abs() * (ulp(act) + 8.0 * 2f64.powi(-23)) + 1e-6
            });
            // And the unfused kernels' result, bit for bit.
            let gd = DeviceRows::from_f32(&client, &gu, act, rows, 2 * ff, 2 * ff).unwrap();
            let mut h = poisoned(&client, act, rows, ff);
            layer::swiglu(&gd, &mut h).unwrap();
            let unfused = h.to_f32().unwrap();
            let diff = got
                .iter()
                .zip(&unfused)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                diff,
                0,
                "{name}: {diff} of {} differ from gemv + swiglu",
                got.len()
            );
        }
    }
    // An odd row count cannot be gate|up.
    let xd = DeviceRows::from_f32(&client, &[1.0; 64], Dtype::F32, 1, 64, 64).unwrap();
    let wd = DeviceRows::from_f32(&client, &[1.0; 3 * 64], Dtype::F32, 3, 64, 64).unwrap();
    let mut out = poisoned(&client, Dtype::F32, 1, 1);
    let err = layer::gemv_swiglu(&xd, &wd, &mut out).unwrap_err();
    assert!(err.to_string().contains("w_gate_up"), "{err}");
}

#[test]
fn gpu_argmax_matches_the_definition_with_ties_and_nan() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_argmax_matches_the_definition_with_ties_and_nan")
    else {
        return;
    };
    for act in ACTS {
        for (rows, cols, stride) in [
            (1, 49152, 49152),
            (33, 49152, 49160),
            (4, 7, 7),
            (3, 1000, 1000),
        ] {
            let name = format!("argmax/{rows}x{cols}/{act}");
            let mut rng = Rng::from_name(&name);
            let mut x = random_rows(&mut rng, rows, cols, stride, act);
            // Row 0: a tie between two far-apart positions (the first must win) and a NaN.
            let top = act.round_trip(1.0e4);
            x[cols / 3] = top;
            x[cols - 1] = top;
            x[cols / 5] = f32::NAN;
            if rows > 1 {
                // Row 1: all NaN but one negative value.
                for v in &mut x[stride..stride + cols] {
                    *v = f32::NAN;
                }
                x[stride + cols / 2] = -3.0;
            }
            if rows > 2 {
                // Row 2: all NaN: index 0.
                for v in &mut x[2 * stride..2 * stride + cols] {
                    *v = f32::NAN;
                }
            }
            let xd = DeviceRows::from_f32(&client, &x, act, rows, cols, stride).unwrap();
            for (index, bytes) in [(layer::IndexDtype::I32, 4), (layer::IndexDtype::I64, 8)] {
                let out = client.create_from_slice(&vec![0xFFu8; rows * bytes]);
                layer::argmax_rows(&xd, &out, index).unwrap();
                let raw = client.read_one(out).unwrap();
                let got: Vec<usize> = raw
                    .chunks(bytes)
                    .map(|c| {
                        let mut b = [0u8; 8];
                        b[..bytes].copy_from_slice(c);
                        u64::from_le_bytes(b) as usize
                    })
                    .collect();
                let want = reference::argmax(&dense(&x, rows, cols, stride), cols);
                assert_eq!(got, want, "{name} {index:?}");
                assert_eq!(want[0], cols / 3, "{name}: the first of tied maxima");
            }
        }
    }
}
