//! GPU fill and flatten against the CPU references on the shared case table
//! (`fp8kv::testing::fill_cases`): fill must write bit-identical codes and touch no other
//! byte (both caches start poisoned with 0xCD); flatten must be exact (bitwise on the stored
//! output dtype, outputs poisoned with NaN first).

use fp8kv::device::{Cuda, DeviceBatch, DeviceRows, PagedKvCache};
use fp8kv::kernels::fill::{fill, fill_rope};
use fp8kv::kernels::flatten::{flatten, output_rows};
use fp8kv::reference::{self, HostKvCache};
use fp8kv::rope::{QkvHeads, RopeTable};
use fp8kv::testing::{fill_cases, PagedCase, Problem};
use fp8kv::CacheSpec;
use fp8kv::FlattenLayout;
use fp8kv::{Dtype, KvSide, QuantPolicy};

use cubecl::client::ComputeClient;

/// Every cache configuration: the unquantized cache in both half types, and both FP8 formats.
const CACHES: [(QuantPolicy, Dtype); 4] = [
    (QuantPolicy::None, Dtype::F16),
    (QuantPolicy::None, Dtype::Bf16),
    (QuantPolicy::Fp8E4m3, Dtype::E4m3),
    (QuantPolicy::Fp8E5m2, Dtype::E5m2),
];
const ACTS: [Dtype; 3] = [Dtype::F16, Dtype::Bf16, Dtype::F32];
const POISON: u8 = 0xCD;

/// Byte mismatches between two buffers: (count, first index, got, want).
fn byte_diff(got: &[u8], want: &[u8]) -> (usize, Option<(usize, u8, u8)>) {
    let mut n = 0;
    let mut first = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g != w {
            n += 1;
            first.get_or_insert((i, g, w));
        }
    }
    (n, first)
}

fn fill_one(
    client: &ComputeClient<Cuda>,
    case: &PagedCase,
    policy: QuantPolicy,
    dtype: Dtype,
    act: Dtype,
) -> Result<(), String> {
    let p = Problem::generate(case, act).map_err(|e| e.to_string())?;
    let scales = case.kv_scales(policy).map_err(|e| e.to_string())?;
    let poisoned = CacheSpec::from_parts(p.layout, policy, dtype, scales)
        .and_then(|spec| HostKvCache::new(spec, POISON))
        .map_err(|e| e.to_string())?;
    let mut want = poisoned.clone();
    reference::fill(&mut want, p.k_rows(), p.v_rows(), p.num_tokens, &p.meta)
        .map_err(|e| e.to_string())?;

    let heads = p.layout.num_kv_heads();
    let mut cache = PagedKvCache::from_host(client, &poisoned).map_err(|e| e.to_string())?;
    let k = DeviceRows::from_f32(
        client,
        &p.k_new,
        act,
        p.num_tokens,
        heads * p.layout.head_dim_k(),
        p.k_row_stride,
    )
    .map_err(|e| e.to_string())?;
    let v = DeviceRows::from_f32(
        client,
        &p.v_new,
        act,
        p.num_tokens,
        heads * p.layout.head_dim_v(),
        p.v_row_stride,
    )
    .map_err(|e| e.to_string())?;
    let batch = DeviceBatch::new(client, p.meta.clone(), &p.layout, p.num_tokens)
        .map_err(|e| e.to_string())?;
    fill(&mut cache, &k, &v, &batch).map_err(|e| e.to_string())?;
    let got = cache.to_host().map_err(|e| e.to_string())?;
    for side in [KvSide::K, KvSide::V] {
        let (n, first) = byte_diff(got.bytes(side), want.bytes(side));
        if n > 0 {
            return Err(format!(
                "{} {policy}/{dtype} act {act} {side}: {n} of {} bytes differ; first (byte index, gpu, cpu): {first:?}",
                case.name,
                want.bytes(side).len()
            ));
        }
    }
    Ok(())
}

#[test]
fn gpu_fill_matches_reference_bit_for_bit() {
    let Some(client) = fp8kv::testing::client_or_skip("gpu_fill_matches_reference_bit_for_bit")
    else {
        return;
    };
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in fill_cases() {
        for (policy, dtype) in CACHES {
            for act in ACTS {
                runs += 1;
                if let Err(e) = fill_one(&client, &case, policy, dtype, act) {
                    failures.push(e);
                }
            }
        }
    }
    println!(
        "fill: {runs} (case, cache dtype, activation) runs, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {runs} fill runs differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn flatten_one(
    client: &ComputeClient<Cuda>,
    case: &PagedCase,
    policy: QuantPolicy,
    dtype: Dtype,
    out_layout: FlattenLayout,
    out: Dtype,
) -> Result<(), String> {
    let e = |e: fp8kv::Fp8KvError| e.to_string();
    let p = Problem::generate(case, Dtype::Bf16).map_err(e)?;
    let scales = case.kv_scales(policy).map_err(e)?;
    let host = p.full_cache(policy, dtype, &scales, POISON).map_err(e)?;
    let (want_k, want_v) =
        reference::flatten(&host, &p.prefill_meta, out_layout, out).map_err(e)?;
    let cache = PagedKvCache::from_host(client, &host).map_err(e)?;
    let batch = DeviceBatch::for_reads(client, p.prefill_meta.clone(), &p.layout).map_err(e)?;
    let total = batch.total_kv_tokens();
    let heads = p.layout.num_kv_heads();
    let mut outs = Vec::new();
    for (side, want) in [(KvSide::K, &want_k), (KvSide::V, &want_v)] {
        let (rows, elems) = output_rows(heads, p.layout.head_dim(side), total, out_layout);
        let nan = vec![f32::NAN; rows * elems];
        outs.push((
            DeviceRows::from_f32(client, &nan, out, rows, elems, elems).map_err(e)?,
            side,
            want,
        ));
    }
    let (mut v_out, mut k_out) = (outs.pop().unwrap(), outs.pop().unwrap());
    flatten(&cache, &batch, out_layout, &mut k_out.0, &mut v_out.0).map_err(e)?;
    for (rows, side, want) in [k_out, v_out] {
        let got = rows.to_bits().map_err(e)?;
        let mut n = 0;
        let mut first = None;
        for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
            let wb = out.encode_bits(w);
            let same = g == wb || (out.decode_bits(g).is_nan() && w.is_nan());
            if !same {
                n += 1;
                first.get_or_insert((i, g, wb));
            }
        }
        if n > 0 || got.len() != want.len() {
            return Err(format!(
                "{} {policy}/{dtype} -> {out} {out_layout:?} {side}: {n} of {} differ (len {} vs {}); first (index, gpu bits, cpu bits): {first:?}",
                case.name,
                want.len(),
                got.len(),
                want.len()
            ));
        }
    }
    Ok(())
}

#[test]
fn gpu_flatten_is_exact() {
    let Some(client) = fp8kv::testing::client_or_skip("gpu_flatten_is_exact") else {
        return;
    };
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in fill_cases() {
        for (policy, dtype) in CACHES {
            for out_layout in [FlattenLayout::Hsd, FlattenLayout::Shd] {
                for out in ACTS {
                    runs += 1;
                    if let Err(e) = flatten_one(&client, &case, policy, dtype, out_layout, out) {
                        failures.push(e);
                    }
                }
            }
        }
    }
    println!(
        "flatten: {runs} (case, cache dtype, layout, out dtype) runs, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {runs} flatten runs differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn fill_rejects_a_read_only_batch_and_wrong_rows() {
    let Some(client) =
        fp8kv::testing::client_or_skip("fill_rejects_a_read_only_batch_and_wrong_rows")
    else {
        return;
    };
    let case = &fill_cases()[1];
    let p = Problem::generate(case, Dtype::Bf16).unwrap();
    let scales = case.kv_scales(QuantPolicy::Fp8E4m3).unwrap();
    let mut cache =
        PagedKvCache::<Cuda>::new(&client, p.layout, QuantPolicy::Fp8E4m3, Dtype::E4m3, scales)
            .unwrap();
    let heads = p.layout.num_kv_heads();
    let k = DeviceRows::from_f32(
        &client,
        &p.k_new,
        Dtype::Bf16,
        p.num_tokens,
        heads * p.layout.head_dim_k(),
        p.k_row_stride,
    )
    .unwrap();
    let read_only = DeviceBatch::for_reads(&client, p.meta.clone(), &p.layout).unwrap();
    assert!(matches!(
        fill(&mut cache, &k, &k, &read_only),
        Err(fp8kv::Fp8KvError::InvalidOption(_))
    ));
    let short = DeviceRows::from_f32(
        &client,
        &p.k_new,
        Dtype::Bf16,
        p.num_tokens - 1,
        heads * p.layout.head_dim_k(),
        p.k_row_stride,
    )
    .unwrap();
    let batch = DeviceBatch::new(&client, p.meta.clone(), &p.layout, p.num_tokens).unwrap();
    assert!(matches!(
        fill(&mut cache, &short, &short, &batch),
        Err(fp8kv::Fp8KvError::ShapeMismatch { .. })
    ));
}

/// K and V sliced out of one fused QKV projection output (`[tokens, (heads + 2·kv_heads)·d]`,
/// bf16): wrapped with offset handles and the fused row stride, fill must equal the reference
/// fed the same strided rows.
#[test]
fn gpu_fill_reads_k_and_v_from_a_fused_qkv_buffer() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_fill_reads_k_and_v_from_a_fused_qkv_buffer")
    else {
        return;
    };
    let case = fp8kv::testing::case(&fill_cases(), "chunked_prefill_history").clone();
    let p = Problem::generate(&case, Dtype::Bf16).unwrap();
    let (q_row, kv_row) = (
        case.num_heads * case.head_dim_k,
        case.num_kv_heads * case.head_dim_k,
    );
    let stride = q_row + 2 * kv_row;
    let mut fused = vec![0f32; p.num_tokens * stride];
    let mut rng = fp8kv::testing::Rng::from_name("fused_qkv");
    for t in 0..p.num_tokens {
        let row = &mut fused[t * stride..(t + 1) * stride];
        for x in &mut row[..q_row] {
            *x = Dtype::Bf16.round_trip(rng.normal() as f32);
        }
        row[q_row..q_row + kv_row].copy_from_slice(&p.k_new[t * p.k_row_stride..][..kv_row]);
        row[q_row + kv_row..].copy_from_slice(&p.v_new[t * p.v_row_stride..][..kv_row]);
    }
    let dev =
        DeviceRows::from_f32(&client, &fused, Dtype::Bf16, p.num_tokens, stride, stride).unwrap();
    let slice = |offset_elems: usize| {
        let handle = dev.handle().clone().offset_start((offset_elems * 2) as u64);
        DeviceRows::from_handle(&client, handle, Dtype::Bf16, p.num_tokens, kv_row, stride).unwrap()
    };
    let (k, v) = (slice(q_row), slice(q_row + kv_row));
    let policy = QuantPolicy::Fp8E4m3;
    let scales = case.kv_scales(policy).unwrap();
    let mut want = CacheSpec::from_parts(p.layout, policy, Dtype::E4m3, scales)
        .and_then(|spec| HostKvCache::new(spec, POISON))
        .unwrap();
    let rows = |off: usize| reference::HostRows {
        data: &fused[off..],
        row_stride: stride,
    };
    reference::fill(
        &mut want,
        rows(q_row),
        rows(q_row + kv_row),
        p.num_tokens,
        &p.meta,
    )
    .unwrap();
    let poisoned = CacheSpec::from_parts(p.layout, policy, Dtype::E4m3, scales)
        .and_then(|spec| HostKvCache::new(spec, POISON))
        .unwrap();
    let mut cache = PagedKvCache::from_host(&client, &poisoned).unwrap();
    let batch = DeviceBatch::new(&client, p.meta.clone(), &p.layout, p.num_tokens).unwrap();
    fill(&mut cache, &k, &v, &batch).unwrap();
    let got = cache.to_host().unwrap();
    for side in [KvSide::K, KvSide::V] {
        let (n, first) = byte_diff(got.bytes(side), want.bytes(side));
        assert_eq!(n, 0, "fused QKV {side}: {n} bytes differ, first {first:?}");
    }
}

/// The RoPE fill of one case: Q, K, V packed as a fused QKV row (with padding), rotated at
/// `rope_dims`; the cache (poisoned beforehand) and Q compared with the reference bit for bit.
fn fill_rope_one(
    client: &ComputeClient<Cuda>,
    case: &PagedCase,
    policy: QuantPolicy,
    dtype: Dtype,
    act: Dtype,
    rope_dims: usize,
) -> Result<(), String> {
    let e = |e: fp8kv::Fp8KvError| e.to_string();
    let p = Problem::generate(case, act).map_err(e)?;
    let scales = case.kv_scales(policy).map_err(e)?;
    let d = case.head_dim_k;
    let heads = QkvHeads {
        q_heads: case.num_heads,
        kv_heads: case.num_kv_heads,
        head_dim: d,
    };
    let (qd, kvd) = (heads.q_heads * d, heads.kv_heads * d);
    let stride = heads.row_elems() + 6;
    let mut rng = fp8kv::testing::Rng::from_name(&format!("fill_rope/{}", case.name));
    let mut qkv = vec![act.round_trip(1.0e4); p.num_tokens * stride];
    for t in 0..p.num_tokens {
        let row = &mut qkv[t * stride..];
        for x in &mut row[..qd] {
            *x = act.round_trip((rng.normal() * 2.0) as f32);
        }
        row[qd..qd + kvd].copy_from_slice(&p.k_new[t * p.k_row_stride..][..kvd]);
        row[qd + kvd..qd + 2 * kvd].copy_from_slice(&p.v_new[t * p.v_row_stride..][..kvd]);
    }
    let positions = p.meta.max_kv_len() + 3;
    let table = RopeTable::new(10_000.0, d, rope_dims, positions).map_err(e)?;
    let poisoned = CacheSpec::from_parts(p.layout, policy, dtype, scales)
        .and_then(|spec| HostKvCache::new(spec, POISON))
        .map_err(e)?;
    let mut want = poisoned.clone();
    let want_q = reference::fill_rope(
        &mut want,
        reference::HostRows {
            data: &qkv,
            row_stride: stride,
        },
        p.num_tokens,
        &p.meta,
        &table,
        heads,
        act,
    )
    .map_err(e)?;

    let mut cache = PagedKvCache::from_host(client, &poisoned).map_err(e)?;
    let rows = DeviceRows::from_f32(client, &qkv, act, p.num_tokens, heads.row_elems(), stride)
        .map_err(e)?;
    let table_dev =
        DeviceRows::from_f32(client, table.values(), Dtype::F32, positions, d, d).map_err(e)?;
    let mut q = DeviceRows::from_f32(
        client,
        &vec![f32::NAN; p.num_tokens * qd],
        act,
        p.num_tokens,
        qd,
        qd,
    )
    .map_err(e)?;
    let batch = DeviceBatch::new(client, p.meta.clone(), &p.layout, p.num_tokens).map_err(e)?;
    fill_rope(
        &mut cache, &rows, &batch, &table_dev, heads, rope_dims, &mut q,
    )
    .map_err(e)?;
    let what = format!("{} {policy}/{dtype} act {act} rope {rope_dims}", case.name);
    let got = cache.to_host().map_err(e)?;
    for side in [KvSide::K, KvSide::V] {
        let (n, first) = byte_diff(got.bytes(side), want.bytes(side));
        if n > 0 {
            return Err(format!(
                "{what} {side}: {n} of {} bytes differ; first (byte index, gpu, cpu): {first:?}",
                want.bytes(side).len()
            ));
        }
    }
    let got_q = q.to_f32().map_err(e)?;
    let bad = got_q
        .iter()
        .zip(&want_q)
        .filter(|(g, w)| {
            if w.is_nan() {
                !g.is_nan()
            } else {
                g.to_bits() != w.to_bits()
            }
        })
        .count();
    if bad > 0 {
        return Err(format!("{what} Q: {bad} of {} values differ", want_q.len()));
    }
    Ok(())
}

#[test]
fn gpu_fill_rope_matches_reference_bit_for_bit() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_fill_rope_matches_reference_bit_for_bit")
    else {
        return;
    };
    let mut failures = Vec::new();
    let mut runs = 0;
    // The cases whose K and V heads are one size (what a fused QKV row holds); every cache
    // and activation dtype; all dims rotated, and half of them (partial rotary).
    for case in fill_cases().iter().filter(|c| c.head_dim_k == c.head_dim_v) {
        for (policy, dtype) in CACHES {
            for act in ACTS {
                for rope_dims in [case.head_dim_k, case.head_dim_k / 2] {
                    runs += 1;
                    if let Err(e) = fill_rope_one(&client, case, policy, dtype, act, rope_dims) {
                        failures.push(e);
                    }
                }
            }
        }
    }
    println!("fill_rope: {runs} runs, {} failed", failures.len());
    assert!(
        runs >= 24,
        "only {runs} runs: the cases lost their equal head dims"
    );
    assert!(
        failures.is_empty(),
        "{} of {runs} RoPE fill runs differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn fill_rope_refuses_heads_tables_and_outputs_that_do_not_fit() {
    let Some(client) = fp8kv::testing::client_or_skip(
        "fill_rope_refuses_heads_tables_and_outputs_that_do_not_fit",
    ) else {
        return;
    };
    let layout = fp8kv::PagedKvLayout::new(4, 16, 2, 64, 64, fp8kv::KvLayoutKind::Bshd).unwrap();
    let meta = fp8kv::BatchMetadata::decode(vec![20, 3], vec![0, 1, 2, 3], 2).unwrap();
    let batch = DeviceBatch::new(&client, meta, &layout, 2).unwrap();
    let mut cache = PagedKvCache::new(
        &client,
        layout,
        QuantPolicy::Fp8E4m3,
        Dtype::E4m3,
        fp8kv::KvScales::default(),
    )
    .unwrap();
    let heads = QkvHeads {
        q_heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let rows = |n: usize, w: usize, dtype| {
        DeviceRows::from_f32(&client, &vec![0.5; n * w], dtype, n, w, w).unwrap()
    };
    let qkv = rows(2, heads.row_elems(), Dtype::Bf16);
    let table = |positions| {
        let t = RopeTable::new(1e4, 64, 64, positions).unwrap();
        DeviceRows::from_f32(&client, t.values(), Dtype::F32, positions, 64, 64).unwrap()
    };
    let mut q = rows(2, 256, Dtype::Bf16);
    let mut run = |qkv: &DeviceRows<Cuda>, table: &DeviceRows<Cuda>, heads, rope, q: &mut _| {
        fill_rope(&mut cache, qkv, &batch, table, heads, rope, q)
            .unwrap_err()
            .to_string()
    };
    // Position 19 is past a 19-position table.
    assert!(run(&qkv, &table(19), heads, 64, &mut q).contains("RoPE table"));
    let wrong = QkvHeads {
        kv_heads: 1,
        ..heads
    };
    assert!(run(&qkv, &table(20), wrong, 64, &mut q).contains("RoPE fill heads"));
    assert!(run(&qkv, &table(20), heads, 63, &mut q).contains("rope_dims"));
    let mut q_f32 = rows(2, 256, Dtype::F32);
    assert!(run(&qkv, &table(20), heads, 64, &mut q_f32).contains("q_out"));
}
