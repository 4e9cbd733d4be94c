//! The model's block operations on the CPU (runs in CI): their f64 definitions
//! (`fp8kv_llama::layer::reference`) against independent formulations (Burn's own ops on
//! NdArray in f64, RoPE as a complex rotation from the base), the NdArray backend's
//! [`LayerBackend`] against those definitions, and bad input getting its own error.

use burn_ndarray::NdArray;
use burn_tensor::{activation::silu, DType, Tensor, TensorData};
use fp8kv::testing::Rng;
use fp8kv::AttentionOptions;
use fp8kv::{BatchMetadata, Dtype, Fp8KvError, KvLayoutKind, PagedKvLayout};
use fp8kv_burn::{KvBatch, KvCache, KvCacheConfig};
use fp8kv_llama::layer::ops::{
    add_rms_norm, argmax, decode_block, linear, linear_swiglu, rms_norm, rope_qkv, swiglu,
    BlockWeights,
};
use fp8kv_llama::layer::{reference, QkvHeads, RopeTable, RopeTableTensor};

// One backend type: NdArray keeps a default float dtype per device, so a second element type
// in the same process would change the first's. Tensors name their dtype instead.
type B = NdArray<f32>;

fn normals(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * 2.0) as f32).collect()
}

fn t2(v: &[f32], rows: usize, cols: usize) -> Tensor<B, 2> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), [rows, cols]),
        (&Default::default(), DType::F32),
    )
}

fn t2_f64(v: &[f32], rows: usize, cols: usize) -> Tensor<B, 2> {
    let v: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    Tensor::from_data(
        TensorData::new(v, [rows, cols]),
        (&Default::default(), DType::F64),
    )
}

fn host<const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().into_vec::<f64>().unwrap()
}

fn close(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * w.abs().max(1e-3),
            "{what}[{i}]: {g} against {w}"
        );
    }
}

#[test]
fn reference_norm_and_swiglu_match_burn_ops_in_f64() {
    let mut rng = Rng::from_name("layer_cpu/norm");
    let (rows, hidden, ff) = (5, 96, 40);
    let x = normals(&mut rng, rows * hidden);
    let w = normals(&mut rng, hidden);
    let eps = 1e-5;
    // RMSNorm with Burn's reductions in f64 (the model's formulation before the fused kernel).
    let xt = t2_f64(&x, rows, hidden);
    let wt = t2_f64(&w, 1, hidden).reshape([hidden]);
    let inv = (xt.clone().powi_scalar(2).mean_dim(1) + eps as f64)
        .sqrt()
        .recip();
    let want = host(xt * inv * wt.unsqueeze_dim::<2>(0));
    close("rms_norm", &reference::rms_norm(&x, &w, eps), &want, 1e-12);

    // SwiGLU with Burn's silu.
    let gu = normals(&mut rng, rows * 2 * ff);
    let g = t2_f64(&gu, rows, 2 * ff);
    let want = host(silu(g.clone().slice([0..rows, 0..ff])) * g.slice([0..rows, ff..2 * ff]));
    // Burn's default sigmoid computes in f32 whatever the tensor's dtype (it casts for
    // stability): agreement to f32's precision.
    close("swiglu", &reference::swiglu(&gu, ff), &want, 1e-6);
}

#[test]
fn reference_rope_is_a_complex_rotation_by_the_position_angle() {
    let (q_heads, kv_heads, d) = (3, 1, 16);
    let heads = QkvHeads {
        q_heads,
        kv_heads,
        head_dim: d,
    };
    let mut rng = Rng::from_name("layer_cpu/rope");
    // Two sequences: 2 new tokens at positions 5, 6 and one at position 40; padded rows.
    let meta = BatchMetadata::new(
        vec![0, 2],
        vec![2, 1],
        vec![7, 41],
        vec![0, 1, 2, 3, 4, 5],
        3,
    )
    .unwrap();
    let stride = heads.row_elems() + 3;
    let qkv = normals(&mut rng, 3 * stride);
    let table = RopeTable::new(500.0, d, d, 64).unwrap();
    let (q, k, v) = reference::rope_qkv(&qkv, 3, stride, &meta, table.values(), d, heads);
    for (row, pos) in [(0usize, 5usize), (1, 6), (2, 40)] {
        for h in 0..q_heads + kv_heads {
            for j in 0..d / 2 {
                let x = &qkv[row * stride + h * d + 2 * j..];
                // (x0 + i x1) · e^{iθ}, θ = pos · 500^(−2j/d), straight from the definition.
                let theta = pos as f64 * 500f64.powf(-((2 * j) as f64) / d as f64);
                let (re, im) = (
                    x[0] as f64 * theta.cos() - x[1] as f64 * theta.sin(),
                    x[0] as f64 * theta.sin() + x[1] as f64 * theta.cos(),
                );
                let (got, w) = if h < q_heads {
                    (&q, q_heads * d)
                } else {
                    (&k, kv_heads * d)
                };
                let hh = if h < q_heads { h } else { h - q_heads };
                let at = row * w + hh * d + 2 * j;
                // The table holds cos/sin rounded to f32: a relative error of 2⁻²⁴ each.
                let tol = 1e-6 * (x[0].abs() + x[1].abs()) as f64;
                assert!(
                    (got[at] - re).abs() <= tol,
                    "row {row} head {h} pair {j}: {} vs {re}",
                    got[at]
                );
                assert!(
                    (got[at + 1] - im).abs() <= tol,
                    "row {row} head {h} pair {j}: {} vs {im}",
                    got[at + 1]
                );
            }
        }
        let vs = &qkv[row * stride + (q_heads + kv_heads) * d..][..kv_heads * d];
        let vs: Vec<f64> = vs.iter().map(|&x| x as f64).collect();
        assert_eq!(
            &v[row * kv_heads * d..(row + 1) * kv_heads * d],
            &vs[..],
            "V is copied"
        );
    }
    // Partial rotary: the dims past rope_dims pass through.
    let partial = RopeTable::new(500.0, d, 8, 64).unwrap();
    let (q, _, _) = reference::rope_qkv(&qkv, 3, stride, &meta, partial.values(), 8, heads);
    assert_eq!(q[8], qkv[8] as f64);
    assert_eq!(q[15], qkv[15] as f64);
    assert_ne!(q[2], qkv[2] as f64, "pair 1 rotates");
}

#[test]
fn ndarray_layer_ops_equal_the_reference_and_refuse_bad_input() {
    let mut rng = Rng::from_name("layer_cpu/ndarray");
    let (rows, hidden) = (4, 32);
    let x = normals(&mut rng, rows * hidden);
    let r = normals(&mut rng, rows * hidden);
    let w = normals(&mut rng, hidden);
    let wt = t2(&w, 1, hidden).reshape([hidden]);
    let f32s = |v: Vec<f64>| v.iter().map(|&x| x as f32 as f64).collect::<Vec<_>>();

    let got = host(rms_norm(t2(&x, rows, hidden), &wt, 1e-6).unwrap());
    assert_eq!(got, f32s(reference::rms_norm(&x, &w, 1e-6)));
    let (sum, out) = add_rms_norm(t2(&x, rows, hidden), t2(&r, rows, hidden), &wt, 1e-6).unwrap();
    let (want_sum, want) = reference::add_rms_norm(&x, &r, &w, 1e-6, Dtype::F32);
    assert_eq!(
        host(sum),
        want_sum.iter().map(|&v| v as f64).collect::<Vec<_>>()
    );
    assert_eq!(host(out), f32s(want));
    let got = host(swiglu(t2(&x, rows, hidden)).unwrap());
    assert_eq!(got, f32s(reference::swiglu(&x, hidden / 2)));

    // The decode matmul (x · wᵀ, w stored [outputs, k]) at 4 and 300 rows (on NdArray both the
    // GEMV's and the matmul's path are Burn's matmul), and the argmax.
    let wm = normals(&mut rng, 24 * hidden);
    for n in [rows, 300] {
        let xs = normals(&mut rng, n * hidden);
        let got = host(linear(t2(&xs, n, hidden), &t2(&wm, 24, hidden)).unwrap());
        let want = reference::gemv(&xs, &wm, hidden);
        // f32 sums of `hidden` products: within hidden · 2⁻²³ of Σ|x·w|.
        let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
        let mag = reference::gemv(&abs(&xs), &abs(&wm), hidden);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let tol = hidden as f64 * 2f64.powi(-23) * mag[i];
            assert!(
                (g - w).abs() <= tol,
                "linear {n} rows [{i}]: {g} against {w}"
            );
        }
    }
    let mut ax = x.clone();
    ax[5] = 100.0;
    ax[9] = 100.0;
    let idx: Vec<i64> = argmax(t2(&ax, rows, hidden))
        .unwrap()
        .into_data()
        .convert::<i64>()
        .into_vec()
        .unwrap();
    let want: Vec<i64> = reference::argmax(&ax, hidden)
        .iter()
        .map(|&i| i as i64)
        .collect();
    assert_eq!(idx, want);
    assert_eq!(idx[0], 5, "the first of tied maxima");

    // Bad input: an odd gate|up width, a residual of another shape, a weight of another size.
    assert!(matches!(
        swiglu(t2(&x[..rows * 31], rows, 31)),
        Err(Fp8KvError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        add_rms_norm(t2(&x, rows, hidden), t2(&r, hidden, rows), &wt, 1e-6),
        Err(Fp8KvError::ShapeMismatch { .. })
    ));
    let w_short = t2(&[1.0; 8], 1, 8).reshape([8]);
    assert!(rms_norm(t2(&x, rows, hidden), &w_short, 1e-6).is_err());
    assert!(matches!(
        rms_norm(t2(&x, rows, hidden), &wt, f32::NAN),
        Err(Fp8KvError::InvalidOption(_))
    ));

    // RoPE through a KvBatch: the reference's Q, K, V; a table too short is refused.
    let heads = QkvHeads {
        q_heads: 2,
        kv_heads: 1,
        head_dim: 64,
    };
    let layout = PagedKvLayout::new(8, 16, 1, 64, 64, KvLayoutKind::Bshd).unwrap();
    let meta =
        BatchMetadata::new(vec![0, 1], vec![1, 2], vec![30, 2], vec![0, 1, 2, 3], 2).unwrap();
    let batch = KvBatch::<B>::new(meta.clone(), &layout, 3, &Default::default()).unwrap();
    let qkv = normals(&mut rng, 3 * heads.row_elems());
    let table = RopeTable::new(10000.0, 64, 64, 32).unwrap();
    let dev_table = RopeTableTensor::<B>::new(&table, &Default::default());
    let (q, k, v) = rope_qkv(t2(&qkv, 3, heads.row_elems()), &batch, &dev_table, heads).unwrap();
    let (wq, wk, wv) =
        reference::rope_qkv(&qkv, 3, heads.row_elems(), &meta, table.values(), 64, heads);
    assert_eq!(q.dims(), [3, 2, 64]);
    assert_eq!(host(q), f32s(wq));
    assert_eq!(host(k), f32s(wk));
    assert_eq!(host(v), f32s(wv));
    let short = RopeTableTensor::<B>::new(
        &RopeTable::new(10000.0, 64, 64, 29).unwrap(),
        &Default::default(),
    );
    let err = rope_qkv(t2(&qkv, 3, heads.row_elems()), &batch, &short, heads).unwrap_err();
    assert!(err.to_string().contains("covers 29 positions"), "{err}");
}

#[test]
fn rope_table_refuses_bad_parameters() {
    assert!(RopeTable::new(0.0, 64, 64, 8).is_err());
    assert!(RopeTable::new(f64::NAN, 64, 64, 8).is_err());
    assert!(RopeTable::new(1e4, 63, 62, 8).is_err(), "odd head dim");
    assert!(
        RopeTable::new(1e4, 64, 66, 8).is_err(),
        "rope dims past the head"
    );
    assert!(RopeTable::new(1e4, 64, 7, 8).is_err(), "odd rope dims");
    let t = RopeTable::new(1e4, 64, 32, 8).unwrap();
    assert_eq!(t.cos_sin(0, 3), (1.0, 0.0));
    assert_eq!(
        t.cos_sin(5, 20),
        (0.0, 0.0),
        "pairs past rope_dims are not rotated"
    );
}

/// The weights of a small block: hidden 48, 4 / 2 heads of 64, MLP 40.
fn block_weights(rng: &mut Rng, heads: QkvHeads, hidden: usize, ff: usize) -> BlockWeights<B> {
    let (qd, kvd) = (heads.q_heads * 64, heads.kv_heads * 64);
    let mut m = |rows: usize, cols: usize| {
        let v: Vec<f32> = normals(rng, rows * cols).iter().map(|x| x * 0.2).collect();
        t2(&v, rows, cols)
    };
    let (wqkv, wo) = (m(qd + 2 * kvd, hidden), m(hidden, qd));
    let (w_gate_up, w_down) = (m(2 * ff, hidden), m(hidden, ff));
    let (attn_norm, ffn_norm) = (
        m(1, hidden).reshape([hidden]),
        m(1, hidden).reshape([hidden]),
    );
    BlockWeights {
        attn_norm,
        wqkv,
        wo,
        ffn_norm,
        w_gate_up,
        w_down,
    }
}

#[test]
fn decode_block_equals_its_operations_one_by_one_and_refuses_bad_input() {
    let mut rng = Rng::from_name("layer_cpu/decode_block");
    let heads = QkvHeads {
        q_heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let (hidden, ff, eps) = (48, 40, 1e-5);
    let w = block_weights(&mut rng, heads, hidden, ff);
    let layout = PagedKvLayout::new(4, 16, 2, 64, 64, KvLayoutKind::Bshd).unwrap();
    let cfg = KvCacheConfig::new("fp8", layout).unwrap();
    let dev = Default::default();
    let (mut a, mut b) = (
        KvCache::<B>::new(&cfg, &dev).unwrap(),
        KvCache::<B>::new(&cfg, &dev).unwrap(),
    );
    let table = RopeTableTensor::<B>::new(&RopeTable::new(1e4, 64, 64, 16).unwrap(), &dev);
    let opts = AttentionOptions::default();
    // Three decode steps of two sequences (pages 0-1 and 2-3), so attention reads earlier
    // fills; the first block has no pending MLP output, the later ones do.
    for len in 1..=3 {
        let meta = BatchMetadata::decode(vec![len, len], vec![0, 1, 2, 3], 2).unwrap();
        let batch = KvBatch::<B>::new(meta, &layout, 2, &dev).unwrap();
        let x = t2(&normals(&mut rng, 2 * hidden), 2, hidden);
        let pending = (len > 1).then(|| t2(&normals(&mut rng, 2 * hidden), 2, hidden));
        let (got_x, got_mlp) = decode_block(
            x.clone(),
            pending.clone(),
            &w,
            &mut a,
            &batch,
            &table,
            heads,
            eps,
            &opts,
        )
        .unwrap();
        // The same block through the checked functions.
        let (x, h) = match pending {
            Some(p) => add_rms_norm(x, p, &w.attn_norm, eps).unwrap(),
            None => (x.clone(), rms_norm(x, &w.attn_norm, eps).unwrap()),
        };
        let (q, k, v) = rope_qkv(linear(h, &w.wqkv).unwrap(), &batch, &table, heads).unwrap();
        b.fill(k, v, &batch).unwrap();
        let attn = b.decode(q, &batch, &opts).unwrap().reshape([2, 4 * 64]);
        let o = linear(attn, &w.wo).unwrap();
        let (x, h) = add_rms_norm(x, o, &w.ffn_norm, eps).unwrap();
        // SwiGLU apart from its projection (the block fuses them).
        let mlp = linear(swiglu(linear(h, &w.w_gate_up).unwrap()).unwrap(), &w.w_down).unwrap();
        assert_eq!(host(got_x), host(x), "step {len}: residual");
        assert_eq!(host(got_mlp), host(mlp), "step {len}: MLP output");
        assert_eq!(
            a.to_host().unwrap(),
            b.to_host().unwrap(),
            "step {len}: cache"
        );
    }

    // Bad input: an error before anything runs.
    let odd = t2(&normals(&mut rng, 3 * hidden), 3, hidden);
    let err = linear_swiglu(t2(&normals(&mut rng, hidden), 1, hidden), &odd).unwrap_err();
    assert!(
        matches!(
            err,
            Fp8KvError::ShapeMismatch {
                what: "w_gate_up",
                ..
            }
        ),
        "{err}"
    );
    let meta = BatchMetadata::decode(vec![4, 4], vec![0, 1, 2, 3], 2).unwrap();
    let batch = KvBatch::<B>::new(meta.clone(), &layout, 2, &dev).unwrap();
    let x = t2(&normals(&mut rng, 2 * hidden), 2, hidden);
    let run = |w: &BlockWeights<B>, cache: &mut KvCache<B>, batch: &KvBatch<B>, heads| {
        decode_block(x.clone(), None, w, cache, batch, &table, heads, eps, &opts)
    };
    let mut bad = w.clone();
    bad.wo = t2(&normals(&mut rng, hidden * 64), hidden, 64);
    let err = run(&bad, &mut a, &batch, heads).unwrap_err();
    assert!(
        matches!(err, Fp8KvError::ShapeMismatch { what: "wo", .. }),
        "{err}"
    );
    let reads = KvBatch::<B>::for_reads(meta, &layout, &dev).unwrap();
    let err = run(&w, &mut a, &reads, heads).unwrap_err();
    assert!(matches!(err, Fp8KvError::InvalidOption(_)), "{err}");
    let one_head = PagedKvLayout::new(4, 16, 1, 64, 64, KvLayoutKind::Bshd).unwrap();
    let mut c = KvCache::<B>::new(&KvCacheConfig::new("fp8", one_head).unwrap(), &dev).unwrap();
    let meta1 = BatchMetadata::decode(vec![4, 4], vec![0, 1, 2, 3], 2).unwrap();
    let batch1 = KvBatch::<B>::new(meta1, &one_head, 2, &dev).unwrap();
    let err = run(&w, &mut c, &batch1, heads).unwrap_err();
    assert!(
        matches!(
            err,
            Fp8KvError::ShapeMismatch {
                what: "RoPE fill heads",
                ..
            }
        ),
        "{err}"
    );
    let late = BatchMetadata::decode(vec![17, 4], vec![0, 1, 2, 3], 2).unwrap();
    let late = KvBatch::<B>::new(late, &layout, 2, &dev).unwrap();
    let err = run(&w, &mut a, &late, heads).unwrap_err();
    assert!(err.to_string().contains("covers 16 positions"), "{err}");
}

#[test]
fn kv_cache_fill_rope_on_ndarray_equals_the_reference_and_refuses_bad_input() {
    let mut rng = Rng::from_name("layer_cpu/fill_rope");
    let heads = QkvHeads {
        q_heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let dev = Default::default();
    let layout = PagedKvLayout::new(6, 16, 2, 64, 64, KvLayoutKind::Bshd).unwrap();
    // A prefill of 5 tokens after 12 cached ones and a decode token at position 30.
    let meta =
        BatchMetadata::new(vec![0, 5], vec![5, 1], vec![17, 31], vec![0, 1, 2, 3], 2).unwrap();
    let batch = KvBatch::<B>::new(meta.clone(), &layout, 6, &dev).unwrap();
    let qkv = normals(&mut rng, 6 * heads.row_elems());
    let table = RopeTable::new(1e4, 64, 48, 32).unwrap();
    let dev_table = RopeTableTensor::<B>::new(&table, &dev);
    for policy in ["fp8_e4m3", "fp8_e5m2", "none"] {
        let cfg = KvCacheConfig::new(policy, layout).unwrap();
        let mut cache = KvCache::<B>::new(&cfg, &dev).unwrap();
        let q = cache
            .fill_rope(t2(&qkv, 6, heads.row_elems()), &batch, &dev_table, heads)
            .unwrap();
        let mut want = cache.to_host().unwrap();
        // Fresh cache: the reference starts from the same empty storage.
        let mut empty = KvCache::<B>::new(&cfg, &dev).unwrap().to_host().unwrap();
        let want_q = fp8kv::reference::fill_rope(
            &mut empty,
            fp8kv::reference::HostRows {
                data: &qkv,
                row_stride: heads.row_elems(),
            },
            6,
            &meta,
            &table,
            heads,
            Dtype::F32,
        )
        .unwrap();
        std::mem::swap(&mut want, &mut empty);
        assert_eq!(empty, want, "{policy}: cache");
        // The reference against the layer's RoPE definition (another formulation), then the
        // plain fill of its K and V.
        let (rq, rk, rv) =
            reference::rope_qkv(&qkv, 6, heads.row_elems(), &meta, table.values(), 48, heads);
        let f32s = |v: Vec<f64>| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        assert_eq!(want_q, f32s(rq), "{policy}: reference Q");
        let mut plain = KvCache::<B>::new(&cfg, &dev).unwrap().to_host().unwrap();
        let (rk, rv) = (f32s(rk), f32s(rv));
        let rows = |data| fp8kv::reference::HostRows {
            data,
            row_stride: 128,
        };
        fp8kv::reference::fill(&mut plain, rows(&rk), rows(&rv), 6, &meta).unwrap();
        assert_eq!(plain, want, "{policy}: reference cache");
        assert_eq!(q.dims(), [6, 4, 64]);
        let got: Vec<f32> = host(q).iter().map(|&x| x as f32).collect();
        assert_eq!(got, want_q, "{policy}: Q");
        // Rotation happened: a rotated pair at position 16 differs from the input.
        assert_ne!(got[2 * 256 + 2], qkv[2 * heads.row_elems() + 2]);
    }
    let cfg = KvCacheConfig::new("fp8", layout).unwrap();
    let mut cache = KvCache::<B>::new(&cfg, &dev).unwrap();
    let short = RopeTableTensor::<B>::new(&RopeTable::new(1e4, 64, 64, 30).unwrap(), &dev);
    let x = || t2(&qkv, 6, heads.row_elems());
    let err = cache.fill_rope(x(), &batch, &short, heads).unwrap_err();
    assert!(err.to_string().contains("covers 30 positions"), "{err}");
    let wrong = QkvHeads {
        kv_heads: 1,
        ..heads
    };
    let err = cache.fill_rope(x(), &batch, &dev_table, wrong).unwrap_err();
    assert!(
        matches!(
            err,
            Fp8KvError::ShapeMismatch {
                what: "RoPE fill heads",
                ..
            }
        ),
        "{err}"
    );
    let err = cache
        .fill_rope(t2(&qkv[..5 * 512], 5, 512), &batch, &dev_table, heads)
        .unwrap_err();
    assert!(
        matches!(err, Fp8KvError::ShapeMismatch { what: "qkv", .. }),
        "{err}"
    );
}

#[test]
fn gemv_pays_follows_the_measured_crossovers() {
    use fp8kv_llama::layer::gemv_pays;
    // (rows, outputs, k, tensor cores, GEMV?): the H100 points in gemv_pays' docs, SmolLM2's
    // shapes. Without tensor cores (f32) the CUDA-core crossovers; with them, the CUDA-core
    // rule up to 16 rows, then the tensor-core crossovers.
    for (rows, outputs, k, tc, gemv) in [
        (1, 49152, 576, false, true),
        (16, 49152, 576, false, false),
        (32, 3072, 576, false, true),
        (128, 3072, 576, false, false),
        (128, 960, 576, false, true),
        (256, 960, 576, false, false),
        (256, 576, 1536, false, true),
        (512, 576, 1536, false, false),
        (0, 576, 576, false, false),
        (0, 576, 576, true, false),
        (16, 49152, 576, true, false),
        (16, 3072, 576, true, true),
        (32, 49152, 576, true, true),
        (64, 49152, 576, true, false),
        (128, 3072, 576, true, true),
        (256, 3072, 576, true, false),
        (256, 960, 576, true, true),
        (512, 960, 576, true, true),
        (512, 576, 1536, true, true),
        (1024, 576, 1536, true, false),
    ] {
        assert_eq!(
            gemv_pays(rows, outputs, k, tc),
            gemv,
            "{rows} x {outputs} x {k}, tensor cores {tc}"
        );
    }
}
