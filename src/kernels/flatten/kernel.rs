//! The flatten kernel: gather a batch's cached tokens into contiguous, dequantized K and V.

use cubecl::prelude::*;

use crate::kernels::meta as batch_meta;

use super::FlattenConfig;
use crate::kernels::CacheGeometry;

/// Gathers every sequence's `kv_seqlens[b]` cached tokens into contiguous outputs, sequences
/// concatenated (sequence `b` starts at flattened token `kv_start_loc[b]`, total
/// `kv_start_loc[batch]`), values `f32(q) * scale` (FP8) or `q` (unquantized) rounded to `O`.
///
/// Grid `(x: chunks of threads * unroll vectors of one sequence's tokens, y: batch,
/// z: 0 = K / 1 = V)`; cube `(threads, 1, 1)`.
///
/// - `k_cache`, `v_cache`: `layout.shape(side)` elements of `Q`, as vectors of `N`.
/// - `k_out`, `v_out`: `[num_kv_heads, total, head_dim]` (hsd) or `[total, num_kv_heads,
///   head_dim]` (shd) elements of `O`, as vectors of `N`.
/// - `meta`: the [`crate::device::DeviceBatch`] buffer; `batch`, `max_pages` its shape.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn flatten_kernel<Q: Float, O: Float, N: Size>(
    k_cache: &Array<Vector<Q, N>>,
    v_cache: &Array<Vector<Q, N>>,
    k_out: &mut Array<Vector<O, N>>,
    v_out: &mut Array<Vector<O, N>>,
    meta: &Array<i32>,
    batch: u32,
    max_pages: u32,
    k_scale: f32,
    v_scale: f32,
    #[comptime] cfg: FlattenConfig,
    #[define(Q, O)] _dtypes: [StorageType; 2],
) {
    let b = CUBE_POS_Y;
    let kv_len = batch_meta::kv_len(meta, batch, b);
    let start = batch_meta::kv_start(meta, batch, b);
    let total = batch_meta::kv_total(meta, batch);
    let bt_base = batch_meta::block_table_row(batch, max_pages, b);
    if CUBE_POS_Z == 0 {
        flatten_side::<Q, O, N>(
            k_cache,
            k_out,
            meta,
            kv_len,
            start,
            total,
            bt_base,
            k_scale,
            cfg.k,
            cfg.fp8,
            cfg.hsd,
            cfg.vec,
            cfg.unroll,
            cfg.threads,
        );
    } else {
        flatten_side::<Q, O, N>(
            v_cache,
            v_out,
            meta,
            kv_len,
            start,
            total,
            bt_base,
            v_scale,
            cfg.v,
            cfg.fp8,
            cfg.hsd,
            cfg.vec,
            cfg.unroll,
            cfg.threads,
        );
    }
}

/// One side of [`flatten_kernel`]: item `i` is vector `i % vec_per_row` of token
/// `i / vec_per_row` of the sequence; loads first (`unroll` in flight), then stores.
/// Token, KV head and vector within the head of work item `item` (items enumerate the vectors
/// of the sequence's token rows, all heads of a token in a row).
#[cube]
fn item_coords(
    item: u32,
    #[comptime] vec_per_row: u32,
    #[comptime] vec_per_head: u32,
) -> (u32, u32, u32) {
    let v = item % vec_per_row;
    (item / vec_per_row, v / vec_per_head, v % vec_per_head)
}

#[cube]
#[allow(clippy::too_many_arguments)]
fn flatten_side<Q: Float, O: Float, N: Size>(
    cache: &Array<Vector<Q, N>>,
    out: &mut Array<Vector<O, N>>,
    meta: &Array<i32>,
    kv_len: u32,
    start: u32,
    total: u32,
    bt_base: u32,
    scale: f32,
    #[comptime] geom: CacheGeometry,
    #[comptime] fp8: bool,
    #[comptime] hsd: bool,
    #[comptime] vec: u32,
    #[comptime] unroll: u32,
    #[comptime] threads: u32,
) {
    let vec_per_head = comptime![geom.head_dim / vec];
    let heads = comptime![geom.num_kv_heads];
    let vec_per_row = comptime![geom.num_kv_heads * geom.head_dim / vec];
    let page_size = comptime![geom.page_size];
    let page_stride = comptime![geom.page_stride() / vec];
    let slot_stride = comptime![geom.slot_stride() / vec];
    let head_stride = comptime![geom.head_stride() / vec];
    let base = CUBE_POS_X * comptime![threads * unroll] + UNIT_POS;

    let mut vals = Array::<Vector<Q, N>>::new(comptime![unroll as usize]);
    #[unroll]
    for u in 0..unroll {
        let (token, head, dv) = item_coords(base + u * threads, vec_per_row, vec_per_head);
        if token < kv_len {
            let page = u32::cast_from(meta[(bt_base + token / page_size) as usize]);
            let slot = token % page_size;
            vals[u as usize] =
                cache[(page * page_stride + slot * slot_stride + head * head_stride + dv) as usize];
        }
    }
    #[unroll]
    for u in 0..unroll {
        let (token, head, dv) = item_coords(base + u * threads, vec_per_row, vec_per_head);
        if token < kv_len {
            let row = if hsd {
                head * total + start + token
            } else {
                (start + token) * heads + head
            };
            let x = Vector::<f32, N>::cast_from(vals[u as usize]);
            // The unquantized cache ignores the scales (as the reference does).
            let y = if fp8 { x * Vector::new(scale) } else { x };
            out[(row * vec_per_head + dv) as usize] = Vector::<O, N>::cast_from(y);
        }
    }
}
