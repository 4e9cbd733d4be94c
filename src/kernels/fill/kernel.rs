//! The fill kernel: quantize new K/V rows into the paged cache.

use cubecl::prelude::*;

use crate::kernels::meta as batch_meta;

use super::FillConfig;
use crate::fp8::Fp8Format;
use crate::kernels::codec::{fp8_quantize_vector, ScaleDiv};
use crate::kernels::stats::{add_side_stats, vector_amax, vector_count_over};
use crate::kernels::CacheGeometry;

/// Writes each sequence's new K and V rows into its cache slots, quantizing on write.
///
/// Grid `(x: chunks of threads * unroll * rounds vectors of one sequence's new rows, y: batch,
/// z: 0 = K / 1 = V)`; cube `(threads, 1, 1)`. A cube past its sequence's rows does nothing.
///
/// - `k_new`, `v_new`: `[num_tokens, row_stride]` activations (`F`), viewed as vectors of `N`
///   elements; row `t` holds `[num_kv_heads, head_dim]`; `*_row_stride` in vectors.
/// - `k_cache`, `v_cache`: `layout.shape(side)` elements of `Q`, as vectors of `N`.
/// - `meta`: the [`crate::device::DeviceBatch`] buffer; `batch`, `max_pages` its shape.
/// - FP8 (`cfg.fp8` set): `code = encode(x / scale)`: the exact division of
///   [`crate::kernels::codec`] (`*_inv_scale = RN(1 / scale)` feeds its fast modes, `cfg.k_div`
///   / `cfg.v_div`), then the hardware's saturating convert; unquantized: a plain RNE
///   conversion `F → Q`, scales unused.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn fill_kernel<F: Float, Q: Float, N: Size>(
    k_new: &Array<Vector<F, N>>,
    v_new: &Array<Vector<F, N>>,
    k_cache: &mut Array<Vector<Q, N>>,
    v_cache: &mut Array<Vector<Q, N>>,
    meta: &Array<i32>,
    batch: u32,
    max_pages: u32,
    k_row_stride: u32,
    v_row_stride: u32,
    k_scale: f32,
    v_scale: f32,
    k_inv_scale: f32,
    v_inv_scale: f32,
    #[comptime] cfg: FillConfig,
    #[define(F, Q)] _dtypes: [StorageType; 2],
) {
    fill_cube::<F, Q, N>(
        k_new,
        v_new,
        k_cache,
        v_cache,
        meta,
        batch,
        max_pages,
        (k_row_stride, v_row_stride),
        (k_scale, v_scale),
        (k_inv_scale, v_inv_scale),
        // Without statistics the limits are never read: the scales stand in.
        (k_scale, v_scale),
        cfg,
        false,
    );
}

/// [`fill_kernel`] that also adds the statistics of the rows it writes to `stats` (copies of
/// `[k_amax_bits, v_amax_bits, k_saturated, v_saturated]`, the layout and definitions of
/// [`crate::kernels::stats`]: amax `|x|` with NaN skipped, saturated `|x| > limit` where
/// `*_limit = MAX · scale` in f32): per thread while it quantizes, then one warp reduction
/// and at most two atomics per warp.
///
/// The grid, arguments and stores are [`fill_kernel`]'s.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn fill_stats_kernel<F: Float, Q: Float, N: Size>(
    k_new: &Array<Vector<F, N>>,
    v_new: &Array<Vector<F, N>>,
    k_cache: &mut Array<Vector<Q, N>>,
    v_cache: &mut Array<Vector<Q, N>>,
    meta: &Array<i32>,
    batch: u32,
    max_pages: u32,
    k_row_stride: u32,
    v_row_stride: u32,
    k_scale: f32,
    v_scale: f32,
    k_inv_scale: f32,
    v_inv_scale: f32,
    stats: &mut Array<Atomic<u32>>,
    k_limit: f32,
    v_limit: f32,
    #[comptime] cfg: FillConfig,
    #[define(F, Q)] _dtypes: [StorageType; 2],
) {
    let (amax, count) = fill_cube::<F, Q, N>(
        k_new,
        v_new,
        k_cache,
        v_cache,
        meta,
        batch,
        max_pages,
        (k_row_stride, v_row_stride),
        (k_scale, v_scale),
        (k_inv_scale, v_inv_scale),
        (k_limit, v_limit),
        cfg,
        true,
    );
    add_side_stats(stats, CUBE_POS_Z, amax, count, cfg.threads);
}

/// The body of both fill kernels: this cube's side (`CUBE_POS_Z`: 0 = K, 1 = V) of its
/// sequence (`CUBE_POS_Y`). Each pair is (K, V). With `stats`, returns the unit's amax and
/// count of `|x| > limit` over the values it wrote, else `(0, 0)`.
// The zeros that start `amax` / `count` are overwritten in both branches, but CubeCL needs
// a mutable variable declared before a runtime branch to assign it there.
#[allow(unused_assignments)]
#[cube]
#[allow(clippy::too_many_arguments)]
fn fill_cube<F: Float, Q: Float, N: Size>(
    k_new: &Array<Vector<F, N>>,
    v_new: &Array<Vector<F, N>>,
    k_cache: &mut Array<Vector<Q, N>>,
    v_cache: &mut Array<Vector<Q, N>>,
    meta: &Array<i32>,
    batch: u32,
    max_pages: u32,
    row_stride: (u32, u32),
    scale: (f32, f32),
    inv_scale: (f32, f32),
    limit: (f32, f32),
    #[comptime] cfg: FillConfig,
    #[comptime] stats: bool,
) -> (f32, u32) {
    let b = CUBE_POS_Y;
    let q_start = batch_meta::q_start(meta, batch, b);
    let q_len = batch_meta::q_len(meta, batch, b);
    let kv_len = batch_meta::kv_len(meta, batch, b);
    let bt_base = batch_meta::block_table_row(batch, max_pages, b);
    // The new tokens occupy positions [kv_len - q_len, kv_len) of the sequence.
    let first_pos = kv_len - q_len;
    let mut amax = 0.0f32;
    let mut count = 0u32;
    if CUBE_POS_Z == 0 {
        let (a, c) = fill_side::<F, Q, N>(
            k_new,
            k_cache,
            meta,
            q_start,
            q_len,
            first_pos,
            bt_base,
            row_stride.0,
            scale.0,
            inv_scale.0,
            limit.0,
            cfg.k,
            cfg.fp8,
            cfg.k_div,
            cfg.vec,
            cfg.unroll,
            cfg.threads,
            cfg.rounds,
            stats,
        );
        amax = a;
        count = c;
    } else {
        let (a, c) = fill_side::<F, Q, N>(
            v_new,
            v_cache,
            meta,
            q_start,
            q_len,
            first_pos,
            bt_base,
            row_stride.1,
            scale.1,
            inv_scale.1,
            limit.1,
            cfg.v,
            cfg.fp8,
            cfg.v_div,
            cfg.vec,
            cfg.unroll,
            cfg.threads,
            cfg.rounds,
            stats,
        );
        amax = a;
        count = c;
    }
    (amax, count)
}

/// One side (K or V) of [`fill_kernel`]: item `i` of the cube is vector `i % vec_per_row` of
/// new row `i / vec_per_row`; a unit handles `rounds` rounds of `unroll` vectors, loading the
/// next round before quantizing and storing the current one. With `stats`, returns the
/// unit's amax and count of `|x| > limit` over the values it wrote (NaN in neither), else
/// `(0, 0)`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fill_side<F: Float, Q: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    cache: &mut Array<Vector<Q, N>>,
    meta: &Array<i32>,
    q_start: u32,
    q_len: u32,
    first_pos: u32,
    bt_base: u32,
    row_stride: u32,
    scale: f32,
    inv_scale: f32,
    limit: f32,
    #[comptime] geom: CacheGeometry,
    #[comptime] fp8: Option<Fp8Format>,
    #[comptime] div: ScaleDiv,
    #[comptime] vec: u32,
    #[comptime] unroll: u32,
    #[comptime] threads: u32,
    #[comptime] rounds: u32,
    #[comptime] stats: bool,
) -> (f32, u32) {
    let vec_per_head = comptime![geom.head_dim / vec];
    let vec_per_row = comptime![geom.num_kv_heads * geom.head_dim / vec];
    let page_size = comptime![geom.page_size];
    let page_stride = comptime![geom.page_stride() / vec];
    let slot_stride = comptime![geom.slot_stride() / vec];
    let head_stride = comptime![geom.head_stride() / vec];
    let chunk = comptime![threads * unroll];
    let base = CUBE_POS_X * comptime![threads * unroll * rounds] + UNIT_POS;

    // Two slots of `unroll` vectors: round r's values sit in slot r % 2 while round r + 1's
    // loads (issued before round r's stores) fill the other one, so loads stay in flight
    // while the unit computes. Every index is a constant once the loops are unrolled.
    let mut vals = Array::<Vector<F, N>>::new(comptime![2 * unroll as usize]);
    let mut amax = 0.0f32;
    let mut count = 0u32;
    #[unroll]
    for u in 0..unroll {
        let item = base + u * threads;
        let token = item / vec_per_row;
        if token < q_len {
            vals[u as usize] =
                new_row_vector(input, q_start, row_stride, token, item % vec_per_row);
        }
    }
    #[unroll]
    for r in 0..rounds {
        let cur = (r % 2) * unroll;
        let next = ((r + 1) % 2) * unroll;
        if r + 1 < rounds {
            #[unroll]
            for u in 0..unroll {
                let item = base + (r + 1) * chunk + u * threads;
                let token = item / vec_per_row;
                if token < q_len {
                    vals[(next + u) as usize] =
                        new_row_vector(input, q_start, row_stride, token, item % vec_per_row);
                }
            }
        }
        #[unroll]
        for u in 0..unroll {
            let item = base + r * chunk + u * threads;
            let token = item / vec_per_row;
            if token < q_len {
                let v = item % vec_per_row;
                let head = v / vec_per_head;
                let dv = v % vec_per_head;
                let pos = first_pos + token;
                let page = u32::cast_from(meta[(bt_base + pos / page_size) as usize]);
                let slot = pos % page_size;
                let idx = page * page_stride + slot * slot_stride + head * head_stride + dv;
                if comptime![stats] {
                    let vmax = vector_amax::<N>(
                        Vector::<f32, N>::cast_from(vals[(cur + u) as usize]),
                        vec,
                    );
                    amax = f32::max(amax, vmax);
                    // Rare (a value past the limit): count the vector's values past it, reading
                    // it again rather than keeping its f32 copy live (registers).
                    if vmax > limit {
                        let again = new_row_vector(input, q_start, row_stride, token, v);
                        count +=
                            vector_count_over::<N>(Vector::<f32, N>::cast_from(again), limit, vec);
                    }
                }
                cache[idx as usize] = quantize_vector::<F, Q, N>(
                    vals[(cur + u) as usize],
                    scale,
                    inv_scale,
                    fp8,
                    div,
                    vec,
                );
            }
        }
    }
    (amax, count)
}

/// Vector `v` of new row `token` of a sequence whose rows start at `q_start` (`row_stride`
/// vectors apart): the one place the fill forms an input index.
#[cube]
fn new_row_vector<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    q_start: u32,
    row_stride: u32,
    token: u32,
    v: u32,
) -> Vector<F, N> {
    input[((q_start + token) * row_stride + v) as usize]
}

/// Converts one vector to the cache element: FP8 codes through the hardware's saturating
/// convert ([`fp8_quantize_vector`]), or a plain conversion for the unquantized cache.
#[cube]
pub(crate) fn quantize_vector<F: Float, Q: Float, N: Size>(
    x: Vector<F, N>,
    scale: f32,
    inv_scale: f32,
    #[comptime] fp8: Option<Fp8Format>,
    #[comptime] div: ScaleDiv,
    #[comptime] vec: u32,
) -> Vector<Q, N> {
    match comptime![fp8] {
        Some(_) => Vector::<Q, N>::reinterpret(fp8_quantize_vector::<Q, N>(
            Vector::<f32, N>::cast_from(x),
            scale,
            inv_scale,
            div,
            vec,
        )),
        None => Vector::<Q, N>::cast_from(x),
    }
}
