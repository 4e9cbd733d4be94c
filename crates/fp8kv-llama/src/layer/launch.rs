//! Launchers of the block kernels (`kernel.rs`): assume input checked by `mod.rs`, pick the
//! grid and the comptime settings.
//!
//! Comptime (JIT key): the activation dtype, the hidden size (norms), the MLP width (SwiGLU),
//! the heads and dims of a QKV row (RoPE). Runtime: rows, eps, the batch, row strides.

use cubecl::prelude::*;

use super::kernel::{
    add_rms_norm_kernel, argmax_kernel, gemm_tc_kernel, gemv_kernel, rms_norm_kernel,
    rope_qkv_kernel, swiglu_kernel, RopeDims, ARGMAX_THREADS, GEMV_GROUP_ROWS, GEMV_WARPS, LANES,
    NORM_ROWS_PER_CUBE, TC_MAX_ROW_TILES, THREADS,
};
use fp8kv::device::{storage_type, DeviceBatch, DeviceRows};
use fp8kv::extend::array_len;

fn arg<R: Runtime>(rows: &DeviceRows<R>) -> ArrayArg<R> {
    let es = rows.dtype().size_bytes();
    // SAFETY: the length is the buffer's real size in elements.
    unsafe { ArrayArg::from_raw_parts(rows.handle().clone(), array_len(rows.handle(), es)) }
}

fn norm_grid(rows: usize) -> (CubeCount, CubeDim) {
    (
        CubeCount::Static(rows.div_ceil(NORM_ROWS_PER_CUBE as usize) as u32, 1, 1),
        CubeDim::new_2d(LANES, NORM_ROWS_PER_CUBE),
    )
}

/// [`super::rms_norm`] (`r` = `None`) or [`super::add_rms_norm`].
pub(crate) fn launch_norm<R: Runtime>(
    x: &DeviceRows<R>,
    r: Option<(&DeviceRows<R>, &mut DeviceRows<R>)>,
    w: &DeviceRows<R>,
    eps: f32,
    out: &mut DeviceRows<R>,
) {
    let rows = x.rows();
    if rows == 0 {
        return;
    }
    let client = out.client().clone();
    let (count, dim) = norm_grid(rows);
    let hidden = x.row_elems() as u32;
    let dtype = storage_type(x.dtype());
    // SAFETY: `mod.rs` checked that x and r are `rows` rows of `hidden` elements at their
    // row strides (the `DeviceRows` constructors: the buffers cover them), sum and out
    // `rows` contiguous rows, all of one dtype, `w` `hidden` f32s, and every buffer below
    // `u32::MAX` elements; the kernel's indices are `row * stride + i` with `row < rows`,
    // `i < hidden` (and `i` into `w`).
    match r {
        None => unsafe {
            rms_norm_kernel::launch_unchecked::<R>(
                &client,
                count,
                dim,
                arg(x),
                arg(w),
                arg(out),
                rows as u32,
                x.row_stride() as u32,
                eps,
                hidden,
                dtype,
            )
        },
        Some((r, sum)) => unsafe {
            add_rms_norm_kernel::launch_unchecked::<R>(
                &client,
                count,
                dim,
                arg(x),
                arg(r),
                arg(w),
                arg(sum),
                arg(out),
                rows as u32,
                x.row_stride() as u32,
                r.row_stride() as u32,
                eps,
                hidden,
                dtype,
            )
        },
    }
}

/// [`super::swiglu`].
pub(crate) fn launch_swiglu<R: Runtime>(gu: &DeviceRows<R>, out: &mut DeviceRows<R>) {
    let total = out.rows() * out.row_elems();
    if total == 0 {
        return;
    }
    let client = out.client().clone();
    // SAFETY: `mod.rs` checked gu as `rows` rows of `2 ff` at its stride, out as `rows`
    // contiguous rows of `ff`, one dtype, both below `u32::MAX` elements; the kernel reads
    // `row · gu_stride + j (+ ff)` and writes `idx < total = rows · ff`.
    unsafe {
        swiglu_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(total.div_ceil(THREADS as usize) as u32, 1, 1),
            CubeDim::new_1d(THREADS),
            arg(gu),
            arg(out),
            total as u32,
            gu.row_stride() as u32,
            out.row_elems() as u32,
            storage_type(out.dtype()),
        )
    }
}

/// [`super::rope_qkv`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_rope<R: Runtime>(
    qkv: &DeviceRows<R>,
    batch: &DeviceBatch<R>,
    table: &DeviceRows<R>,
    dims: RopeDims,
    q: &mut DeviceRows<R>,
    k: &mut DeviceRows<R>,
    v: &mut DeviceRows<R>,
) {
    let meta = batch.meta();
    let max_q = meta.max_q_len();
    if meta.batch() == 0 || max_q == 0 {
        return;
    }
    let units = ((dims.q_heads + 2 * dims.kv_heads) * dims.head_dim / 2) as usize;
    let client = q.client().clone();
    // SAFETY: `mod.rs` checked, before this launch: the batch was validated for writing
    // `qkv.rows()` tokens (`DeviceBatch::new`: every sequence's rows `q_start + i < rows`,
    // `q_len <= kv_len`), the table has a row for every position `kv_len - q_len + i <
    // kv_len <= table rows`, qkv rows hold `(q_heads + 2 kv_heads) head_dim` elements at
    // `row_stride`, the outputs are contiguous `rows` rows of their heads, and every buffer
    // is below `u32::MAX` elements.
    unsafe {
        rope_qkv_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(
                (max_q * units).div_ceil(THREADS as usize) as u32,
                meta.batch() as u32,
                1,
            ),
            CubeDim::new_1d(THREADS),
            arg(qkv),
            ArrayArg::from_raw_parts(batch.handle().clone(), batch.offsets().len),
            arg(table),
            arg(q),
            arg(k),
            arg(v),
            meta.batch() as u32,
            qkv.row_stride() as u32,
            dims,
            storage_type(qkv.dtype()),
        )
    }
}

/// `(rows, k, outputs)` of a GEMV launch (`glu`: `w` holds gate and up rows), `None` when
/// there is nothing to compute.
fn gemv_dims<R: Runtime>(
    x: &DeviceRows<R>,
    w: &DeviceRows<R>,
    glu: bool,
) -> Option<(usize, usize, usize)> {
    let outputs = if glu { w.rows() / 2 } else { w.rows() };
    (x.rows() > 0 && outputs > 0).then_some((x.rows(), x.row_elems(), outputs))
}

/// [`super::gemv`] (`glu` false) and [`super::gemv_swiglu`] (`glu`: `w` holds `2 · outputs`
/// rows): `vec` elements per load (dividing k, x's row stride and both buffers' offsets).
pub(crate) fn launch_gemv<R: Runtime>(
    x: &DeviceRows<R>,
    w: &DeviceRows<R>,
    vec: usize,
    glu: bool,
    out: &mut DeviceRows<R>,
) {
    let Some((rows, k, outputs)) = gemv_dims(x, w, glu) else {
        return;
    };
    let client = out.client().clone();
    // Batches up to 16 rows compile their own row count (one cube row); more take groups of 16.
    let group = rows.min(GEMV_GROUP_ROWS as usize);
    // SAFETY: `mod.rs` checked x as `rows` rows of `k` at its stride (at most 16 · 65,535, the
    // grid's y limit), w as `outputs` rows of `k` at its stride (the `DeviceRows`
    // constructors: the buffers cover them; with `glu`, `2 · outputs` rows), out as `rows`
    // contiguous rows of `outputs`, one dtype, all below `u32::MAX` elements, and `vec`
    // divides k, both strides and the offsets; the kernel reads `x[min(m, rows − 1) ·
    // x_stride/vec + kv]`, `w[n · w_stride/vec + kv]` (and `w[(outputs + n) · ...]` with
    // `glu`) with `kv < k/vec`, `n < outputs`, and writes `out[m · outputs + n]`, `m < rows`.
    unsafe {
        gemv_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(
                outputs.div_ceil(GEMV_WARPS as usize) as u32,
                rows.div_ceil(group) as u32,
                1,
            ),
            CubeDim::new_2d(LANES, GEMV_WARPS),
            vec,
            arg(x),
            arg(w),
            arg(out),
            outputs as u32,
            rows as u32,
            (x.row_stride() / vec) as u32,
            (w.row_stride() / vec) as u32,
            group as u32,
            (k / vec) as u32,
            vec as u32,
            glu,
            storage_type(x.dtype()),
        )
    }
}

/// Warps splitting k in one tensor-core GEMM cube: the largest of 8, 6, 4, 3, 2 that divides
/// the k-steps (`k / 16`), else 1 (576: 6 warps of 6 steps; 1536: 8 of 12). A function of k
/// alone, so the fused gate|up launch and the unfused one add the same partial sums in the same
/// order. At most 256 threads a cube, so the kernel's registers (142 at most, ptxas) never
/// limit the launch.
pub(crate) fn tc_k_split(k: usize) -> usize {
    let steps = k / 16;
    [8, 6, 4, 3, 2]
        .into_iter()
        .find(|d| steps.is_multiple_of(*d))
        .unwrap_or(1)
}

/// [`super::gemv`] on tensor cores (the conditions `gemv_checked` tests held): `outputs / 16`
/// weight tiles by row blocks of up to 64 rows.
pub(crate) fn launch_gemm_tc<R: Runtime>(
    x: &DeviceRows<R>,
    w: &DeviceRows<R>,
    glu: bool,
    out: &mut DeviceRows<R>,
) {
    let Some((rows, k, outputs)) = gemv_dims(x, w, glu) else {
        return;
    };
    let client = out.client().clone();
    let row_tiles = rows.div_ceil(8).min(TC_MAX_ROW_TILES as usize);
    let k_split = tc_k_split(k);
    let quads = |h: &cubecl::server::Handle| {
        // SAFETY: the length is the buffer's real size in u32 words.
        unsafe { ArrayArg::from_raw_parts(h.clone(), array_len(h, 4)) }
    };
    // SAFETY: `mod.rs` checked x as `rows` rows of `k` at its stride, w as `outputs` rows of
    // `k` (with `glu`, `2 · outputs`) at its stride, out as `rows` contiguous rows of
    // `outputs`, one 16-bit dtype, below `u32::MAX` elements, `rows <= 64 · 65,535`, and
    // (its tensor-core test) `outputs` a multiple of 16, `k` of 16, both strides and both buffers'
    // offsets of 4 elements; the kernel reads the pair of words at `row · stride/4 + q`,
    // `q < k/4`, of rows `< rows` of x and `< outputs` (`2 · outputs`) of w, and writes
    // `out[m · outputs + n]`, `m < rows`, `n < outputs`.
    unsafe {
        gemm_tc_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(
                (outputs / 16) as u32,
                rows.div_ceil(8 * row_tiles) as u32,
                1,
            ),
            CubeDim::new_2d(LANES, k_split as u32),
            2,
            quads(x.handle()),
            quads(w.handle()),
            arg(out),
            outputs as u32,
            rows as u32,
            (x.row_stride() / 4) as u32,
            (w.row_stride() / 4) as u32,
            row_tiles as u32,
            k_split as u32,
            (k / 16 / k_split) as u32,
            glu,
            storage_type(x.dtype()),
        )
    }
}

/// [`super::argmax_rows`]: one cube per row, `out` holds `rows` integers of `out_type`.
pub(crate) fn launch_argmax<R: Runtime>(
    x: &DeviceRows<R>,
    out: &cubecl::server::Handle,
    out_type: cubecl::ir::StorageType,
) {
    let rows = x.rows();
    if rows == 0 {
        return;
    }
    let client = x.client().clone();
    let es = out_type.size();
    // SAFETY: `mod.rs` checked x (rows at its stride, below `u32::MAX` elements) and that
    // `out` holds `rows` integers of `out_type`; cube `r` reads row `r` and writes `out[r]`.
    unsafe {
        argmax_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(ARGMAX_THREADS),
            arg(x),
            ArrayArg::from_raw_parts(out.clone(), array_len(out, es)),
            x.row_elems() as u32,
            x.row_stride() as u32,
            [storage_type(x.dtype()), out_type],
        )
    }
}
