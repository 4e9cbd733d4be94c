//! RoPE fused into the cache write: one launch rotates Q and K of a fused QKV projection,
//! writes Q for attention and quantizes K (rotated) and V straight into the paged cache, so K
//! never round-trips through memory in the activation dtype.

use cubecl::prelude::*;

use super::kernel::quantize_vector;
use crate::device::{storage_type, DeviceBatch, DeviceRows, PagedKvCache};
use crate::error::KvSide;
use crate::fp8::Fp8Format;
use crate::kernels::codec::ScaleDiv;
use crate::kernels::meta as batch_meta;
use crate::kernels::{array_len, CacheGeometry};

/// Threads per cube.
const THREADS: u32 = 256;

/// Comptime configuration of [`fill_rope_kernel`] (the JIT key besides the dtypes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RopeFillConfig {
    /// Cache geometry (K and V share it: one head dim).
    pub geom: CacheGeometry,
    /// Query heads of a QKV row.
    pub q_heads: u32,
    /// Rotated pairs per head (`rope_dims / 2`); the pairs after them pass through.
    pub pairs: u32,
    /// FP8 format of the cache, `None` for the unquantized cache.
    pub fp8: Option<Fp8Format>,
    /// How K values are divided by the K scale (exact in every mode).
    pub k_div: ScaleDiv,
    /// How V values are divided by the V scale.
    pub v_div: ScaleDiv,
}

/// RoPE on a fused QKV row, then the write: Q rotated into `q`, K rotated and V as it is
/// quantized into their cache slots. Pairs `(2i, 2i + 1)` of a head rotate together (GGUF's
/// permuted Llama weights): `(x₀, x₁) → (x₀ c − x₁ s, x₀ s + x₁ c)` with `(c, s) = table[pos,
/// i]`, computed in f64 (the f32 × f32 products are exact, so one rounding, the same with or
/// without FMA contraction) and rounded to f32 once; Q is then rounded to `F`, K and V
/// quantized from those f32 values as the fill kernel does. Sequence `b`'s new token `i` (row
/// `q_start_loc[b] + i`) is at position `kv_seqlens[b] − q_seq_length[b] + i`.
///
/// Grid `(ceil(max_q_len · units / 256), batch, 1)`, cube `(256, 1, 1)`; a unit is one pair
/// (`units = (q_heads + 2 kv_heads) · head_dim / 2` per row). `N` is 2: a pair is one cache
/// vector. Rows of no sequence are not written.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn fill_rope_kernel<F: Float, Q: Float, N: Size>(
    qkv: &Array<F>,
    meta: &Array<i32>,
    table: &Array<f32>,
    q: &mut Array<F>,
    k_cache: &mut Array<Vector<Q, N>>,
    v_cache: &mut Array<Vector<Q, N>>,
    batch: u32,
    max_pages: u32,
    row_stride: u32,
    k_scale: f32,
    v_scale: f32,
    k_inv_scale: f32,
    v_inv_scale: f32,
    #[comptime] cfg: RopeFillConfig,
    #[define(F, Q)] _dtypes: [StorageType; 2],
) {
    let b = CUBE_POS_Y;
    let q_start = batch_meta::q_start(meta, batch, b);
    let q_len = batch_meta::q_len(meta, batch, b);
    let first_pos = batch_meta::kv_len(meta, batch, b) - q_len;
    let bt_base = batch_meta::block_table_row(batch, max_pages, b);
    let geom = cfg.geom;
    let d = geom.head_dim;
    let half = comptime![geom.head_dim / 2];
    let q_units = comptime![cfg.q_heads * geom.head_dim / 2];
    let rot_units = comptime![(cfg.q_heads + geom.num_kv_heads) * geom.head_dim / 2];
    let units = comptime![(cfg.q_heads + 2 * geom.num_kv_heads) * geom.head_dim / 2];
    let item = CUBE_POS_X * THREADS + UNIT_POS_X;
    let i = item / units;
    if i < q_len {
        let u = item % units;
        let row = q_start + i;
        let pos = first_pos + i;
        let src = row * row_stride + 2 * u;
        let a0 = f32::cast_from(qkv[src as usize]);
        let a1 = f32::cast_from(qkv[(src + 1) as usize]);
        let pair = u % half;
        let mut y0 = a0;
        let mut y1 = a1;
        if u < rot_units && pair < cfg.pairs {
            let at = (pos * d + 2 * pair) as usize;
            let c = f64::cast_from(table[at]);
            let s = f64::cast_from(table[at + 1]);
            let b0 = f64::cast_from(a0);
            let b1 = f64::cast_from(a1);
            y0 = f32::cast_from(b0 * c - b1 * s);
            y1 = f32::cast_from(b0 * s + b1 * c);
        }
        if u < q_units {
            let dst = row * comptime![cfg.q_heads * geom.head_dim] + 2 * u;
            q[dst as usize] = F::cast_from(y0);
            q[(dst + 1) as usize] = F::cast_from(y1);
        } else {
            let mut x = Vector::<f32, N>::empty();
            x[0usize] = y0;
            x[1usize] = y1;
            let page = u32::cast_from(meta[(bt_base + pos / geom.page_size) as usize]);
            let slot_base = page * geom.page_stride() + (pos % geom.page_size) * geom.slot_stride();
            if u < rot_units {
                let kv = u - q_units;
                let idx = slot_base + (kv / half) * geom.head_stride() + 2 * (kv % half);
                k_cache[(idx / 2) as usize] =
                    quantize_vector::<f32, Q, N>(x, k_scale, k_inv_scale, cfg.fp8, cfg.k_div, 2u32);
            } else {
                let kv = u - rot_units;
                let idx = slot_base + (kv / half) * geom.head_stride() + 2 * (kv % half);
                v_cache[(idx / 2) as usize] =
                    quantize_vector::<f32, Q, N>(x, v_scale, v_inv_scale, cfg.fp8, cfg.v_div, 2u32);
            }
        }
    }
}

/// Launches [`fill_rope_kernel`] for inputs [`super::fill_rope`] validated.
pub(crate) fn launch_fill_rope<R: Runtime>(
    cache: &mut PagedKvCache<R>,
    qkv: &DeviceRows<R>,
    batch: &DeviceBatch<R>,
    table: &DeviceRows<R>,
    q_heads: usize,
    rope_dims: usize,
    q_out: &mut DeviceRows<R>,
) {
    let meta = batch.meta();
    let max_q = meta.max_q_len();
    if meta.batch() == 0 || max_q == 0 {
        return;
    }
    let layout = *cache.layout();
    let geom = CacheGeometry::new(&layout, KvSide::K);
    let scales = cache.scales();
    let cfg = RopeFillConfig {
        geom,
        q_heads: q_heads as u32,
        pairs: (rope_dims / 2) as u32,
        fp8: cache.dtype().fp8_format(),
        k_div: ScaleDiv::for_scale(scales.k()),
        v_div: ScaleDiv::for_scale(scales.v()),
    };
    let units = (q_heads + 2 * layout.num_kv_heads()) * layout.head_dim_k() / 2;
    let cubes_x = (max_q * units).div_ceil(THREADS as usize) as u32;
    let client = cache.client().clone();
    let (act, cache_dtype) = (qkv.dtype(), cache.dtype());
    let (es_act, es_cache) = (act.size_bytes(), cache_dtype.size_bytes());
    let offsets = batch.offsets();
    // SAFETY: every array length is the buffer's real size (`array_len`; the metadata's
    // `offsets.len` i32s as uploaded; the cache arrays in vectors of 2), and `fill_rope`
    // (mod.rs) checked, before this launch: the batch validated for writing against this
    // cache's layout (so for every sequence `q_start_loc + q_seq_length <= num_tokens`,
    // `q_seq_length <= kv_seqlens <= max_pages · page_size`, every block-table entry of a
    // written position in `[0, num_pages)`: the slot index `page · page_stride + slot ·
    // slot_stride + head · head_stride + 2 · pair` is below the cache's elements, and even,
    // since every stride and the head dim are); `qkv` as at least `num_tokens` rows of `(q_heads
    // + 2 kv_heads) · head_dim` at its stride (`src + 1 < rows · row_stride`); `q_out` as
    // `num_tokens` contiguous rows of `q_heads · head_dim`; the table as f32 rows of `head_dim`
    // covering position `max kv_seqlens − 1` (`at + 1 < positions · head_dim`); every buffer,
    // both caches included, below `u32::MAX` elements (`check_copy_vectors` at one element a
    // vector) and the batch at most 65,535 sequences (the grid's y).
    unsafe {
        fill_rope_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(cubes_x, meta.batch() as u32, 1),
            CubeDim::new_1d(THREADS),
            2,
            ArrayArg::from_raw_parts(qkv.handle().clone(), array_len(qkv.handle(), es_act)),
            ArrayArg::from_raw_parts(batch.handle().clone(), offsets.len),
            ArrayArg::from_raw_parts(table.handle().clone(), array_len(table.handle(), 4)),
            ArrayArg::from_raw_parts(q_out.handle().clone(), array_len(q_out.handle(), es_act)),
            ArrayArg::from_raw_parts(
                cache.k_handle().clone(),
                array_len(cache.k_handle(), es_cache),
            ),
            ArrayArg::from_raw_parts(
                cache.v_handle().clone(),
                array_len(cache.v_handle(), es_cache),
            ),
            meta.batch() as u32,
            meta.max_pages_per_seq() as u32,
            qkv.row_stride() as u32,
            scales.k(),
            scales.v(),
            1.0 / scales.k(),
            1.0 / scales.v(),
            cfg,
            [storage_type(act), storage_type(cache_dtype)],
        )
    }
}
