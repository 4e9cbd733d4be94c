//! `#[cube]` kernels of one transformer block outside attention: RMSNorm (with the residual
//! add fused in), SwiGLU, and RoPE on a fused QKV output. Each replaces a chain of Burn ops
//! (9 to 11 launches each) by one launch; the launchers are in `launch.rs`, the checks in
//! `mod.rs`.

use cubecl::prelude::cmma::MmaDefinition;
use cubecl::prelude::*;

use fp8kv::extend::batch_meta;

/// Rows one cube normalises: one warp (plane) per row.
pub(crate) const NORM_ROWS_PER_CUBE: u32 = 8;
/// Lanes of a plane (the norm's row reduction is one `plane_sum`).
pub(crate) const LANES: u32 = 32;
/// Threads per cube of the elementwise kernels (SwiGLU, RoPE).
pub(crate) const THREADS: u32 = 256;

/// `Σ x²` of one row, `x = a (+ b)` rounded to `F` first (what the residual stream stores),
/// over this lane's elements `lane, lane + 32, ...`; reduced over the plane. The row starts at
/// `a_base` in `a` and `b_base` in `b`.
#[cube]
fn row_sum_squares<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    a_base: u32,
    b_base: u32,
    #[comptime] hidden: u32,
    #[comptime] add: bool,
) -> f32 {
    let lane = UNIT_POS_X;
    let mut acc = 0.0f32;
    #[unroll]
    for j in 0..comptime![hidden.div_ceil(LANES)] {
        let i = lane + j * LANES;
        if i < hidden {
            let x = residual::<F>(a, b, a_base + i, b_base + i, add);
            acc += x * x;
        }
    }
    plane_sum(acc)
}

/// One element of the residual stream as f32: `a[i]`, or `RN_F(a[i] + b[j])` with `add`.
#[cube]
fn residual<F: Float>(a: &Array<F>, b: &Array<F>, i: u32, j: u32, #[comptime] add: bool) -> f32 {
    if comptime![add] {
        f32::cast_from(F::cast_from(
            f32::cast_from(a[i as usize]) + f32::cast_from(b[j as usize]),
        ))
    } else {
        f32::cast_from(a[i as usize])
    }
}

/// RMSNorm of `rows` rows of `hidden` values: `out = x / sqrt(mean(x²) + eps) · w`, in f32,
/// rounded to `F`.
///
/// Grid `(ceil(rows / 8), 1, 1)`, cube `(32, 8, 1)`: plane `UNIT_POS_Y` of cube `c` owns row
/// `8c + UNIT_POS_Y`. `x`: `[rows, hidden]` at row stride `x_stride`; `out`: `[rows, hidden]`
/// contiguous; `w`: `[hidden]` f32.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rms_norm_kernel<F: Float>(
    x: &Array<F>,
    w: &Array<f32>,
    out: &mut Array<F>,
    rows: u32,
    x_stride: u32,
    eps: f32,
    #[comptime] hidden: u32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X * NORM_ROWS_PER_CUBE + UNIT_POS_Y;
    // The whole plane leaves together, so the plane_sum below sees all 32 lanes.
    if row < rows {
        let base = row * x_stride;
        let ss = row_sum_squares::<F>(x, x, base, base, hidden, false);
        let inv = (ss / comptime![hidden as f32] + eps).sqrt().recip();
        #[unroll]
        for j in 0..comptime![hidden.div_ceil(LANES)] {
            let i = UNIT_POS_X + j * LANES;
            if i < hidden {
                let v = f32::cast_from(x[(base + i) as usize]);
                out[(row * hidden + i) as usize] = F::cast_from(v * inv * w[i as usize]);
            }
        }
    }
}

/// [`rms_norm_kernel`] of the residual stream after an add: `sum = RN_F(x + r)` is written
/// (the new residual stream) and `out = RMSNorm(sum) · w`. Grid and cube as there; `x`, `r`:
/// `[rows, hidden]` at row strides `x_stride`, `r_stride`; `sum`, `out`: `[rows, hidden]`
/// contiguous.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_rms_norm_kernel<F: Float>(
    x: &Array<F>,
    r: &Array<F>,
    w: &Array<f32>,
    sum: &mut Array<F>,
    out: &mut Array<F>,
    rows: u32,
    x_stride: u32,
    r_stride: u32,
    eps: f32,
    #[comptime] hidden: u32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X * NORM_ROWS_PER_CUBE + UNIT_POS_Y;
    if row < rows {
        let xb = row * x_stride;
        let rb = row * r_stride;
        let ss = row_sum_squares::<F>(x, r, xb, rb, hidden, true);
        let inv = (ss / comptime![hidden as f32] + eps).sqrt().recip();
        #[unroll]
        for j in 0..comptime![hidden.div_ceil(LANES)] {
            let i = UNIT_POS_X + j * LANES;
            if i < hidden {
                let v = residual::<F>(x, r, xb + i, rb + i, true);
                let o = row * hidden + i;
                sum[o as usize] = F::cast_from(v);
                out[o as usize] = F::cast_from(v * inv * w[i as usize]);
            }
        }
    }
}

/// SwiGLU of a fused gate|up projection: `out[t, j] = silu(gu[t, j]) · gu[t, ff + j]`,
/// `silu(g) = g / (1 + exp(−g))`, in f32, rounded to `F`.
///
/// Grid `(ceil(rows · ff / 256), 1, 1)`, cube `(256, 1, 1)`, one output element per thread.
/// `gu`: `[rows, 2 ff]` at row stride `gu_stride`; `out`: `[rows, ff]` contiguous.
#[cube(launch_unchecked)]
pub(crate) fn swiglu_kernel<F: Float>(
    gu: &Array<F>,
    out: &mut Array<F>,
    total: u32,
    gu_stride: u32,
    #[comptime] ff: u32,
    #[define(F)] _dtype: StorageType,
) {
    let idx = CUBE_POS_X * THREADS + UNIT_POS_X;
    if idx < total {
        let row = idx / ff;
        let j = idx % ff;
        let g = f32::cast_from(gu[(row * gu_stride + j) as usize]);
        let u = f32::cast_from(gu[(row * gu_stride + ff + j) as usize]);
        out[idx as usize] = F::cast_from(g / (1.0 + (-g).exp()) * u);
    }
}

/// Heads and dims of a fused QKV row `[q_heads + 2 kv_heads, head_dim]`: comptime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RopeDims {
    /// Query heads.
    pub q_heads: u32,
    /// KV heads.
    pub kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Rotated pairs per head (`rope_dims / 2`); the pairs after them pass through.
    pub pairs: u32,
}

/// RoPE on a fused QKV output, split into contiguous Q, K and V (the pairing of GGUF's
/// permuted Llama weights: dimensions `2i` and `2i + 1` of a head rotate together):
/// `(x₀, x₁) → (x₀ c − x₁ s, x₀ s + x₁ c)` in f32 with `(c, s) = table[pos, i]`, rounded to
/// `F`; V is copied. Sequence `b`'s new token `i` (row `q_start_loc[b] + i`) has position
/// `kv_seqlens[b] − q_seq_length[b] + i`, from the step's metadata.
///
/// Grid `(ceil(max_q_len · units / 256), batch, 1)`, cube `(256, 1, 1)`; a unit is one pair
/// of a Q or K head or two elements of V (`units = (q_heads + kv_heads) · head_dim / 2 +
/// kv_heads · head_dim / 2` per row). Rows of no sequence are not written.
///
/// - `qkv`: `[rows, row_stride]`, row `t` holds `[q_heads + 2 kv_heads, head_dim]`;
/// - `meta`: the [`fp8kv::device::DeviceBatch`] buffer (`batch` sequences);
/// - `table`: `[positions, head_dim]` f32, `(cos, sin)` of pair `i` at `2i, 2i + 1`;
/// - `q`, `k`, `v`: `[rows, q_heads · head_dim]`, `[rows, kv_heads · head_dim]` (twice).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_qkv_kernel<F: Float>(
    qkv: &Array<F>,
    meta: &Array<i32>,
    table: &Array<f32>,
    q: &mut Array<F>,
    k: &mut Array<F>,
    v: &mut Array<F>,
    batch: u32,
    row_stride: u32,
    #[comptime] dims: RopeDims,
    #[define(F)] _dtype: StorageType,
) {
    let b = CUBE_POS_Y;
    let q_start = batch_meta::q_start(meta, batch, b);
    let q_len = batch_meta::q_len(meta, batch, b);
    let first_pos = batch_meta::kv_len(meta, batch, b) - q_len;
    let d = dims.head_dim;
    let half = comptime![dims.head_dim / 2];
    let rot_units = comptime![(dims.q_heads + dims.kv_heads) * dims.head_dim / 2];
    let units = comptime![(dims.q_heads + 2 * dims.kv_heads) * dims.head_dim / 2];
    let item = CUBE_POS_X * THREADS + UNIT_POS_X;
    let i = item / units;
    if i < q_len {
        let u = item % units;
        let row = q_start + i;
        let src = row * row_stride + 2 * u;
        let x0 = qkv[src as usize];
        let x1 = qkv[(src + 1) as usize];
        let head = u / half;
        let pair = u % half;
        if u < rot_units {
            let mut y0 = x0;
            let mut y1 = x1;
            if pair < dims.pairs {
                let at = ((first_pos + i) * d + 2 * pair) as usize;
                let c = table[at];
                let s = table[at + 1];
                let a0 = f32::cast_from(x0);
                let a1 = f32::cast_from(x1);
                y0 = F::cast_from(a0 * c - a1 * s);
                y1 = F::cast_from(a0 * s + a1 * c);
            }
            if head < dims.q_heads {
                let dst = row * comptime![dims.q_heads * dims.head_dim] + 2 * u;
                q[dst as usize] = y0;
                q[(dst + 1) as usize] = y1;
            } else {
                let dst = row * comptime![dims.kv_heads * dims.head_dim]
                    + 2 * (u - comptime![dims.q_heads * dims.head_dim / 2]);
                k[dst as usize] = y0;
                k[(dst + 1) as usize] = y1;
            }
        } else {
            let dst = row * comptime![dims.kv_heads * dims.head_dim] + 2 * (u - rot_units);
            v[dst as usize] = x0;
            v[(dst + 1) as usize] = x1;
        }
    }
}

/// Output rows (warps) of one GEMV cube.
pub(crate) const GEMV_WARPS: u32 = 8;
/// Rows of `x` one GEMV cube multiplies (its accumulators live in registers); more rows take
/// more cubes along y.
pub(crate) const GEMV_GROUP_ROWS: u32 = 16;

/// Matrix-vector product for few rows, the decode step's matmul: `out[m, n] = Σ_k x[m, k] ·
/// w[n, k]` in f32, rounded to `F`. `w` is `[outputs, k]` row-major (GGUF's `[out, in]`): warp
/// `n` reads row `n` with coalesced 16-byte loads, every lane keeps `rows` partial sums, and
/// one plane reduction per row ends it.
///
/// With `glu`, `w` is a fused gate|up weight `[2 · outputs, k]` and warp `n` reads rows `n`
/// and `outputs + n`: `out[m, n] = silu(g) · u` of the two sums `g`, `u` rounded to `F` (what
/// [`swiglu_kernel`] computes from the unfused product, bit for bit), so the gate|up
/// activations never reach memory.
///
/// Grid `(ceil(outputs / 8), ceil(total_rows / rows), 1)`, cube `(32, 8, 1)`: warp
/// `UNIT_POS_Y` of cube `(c, g)` owns output `8c + UNIT_POS_Y` of rows `g·rows ..
/// g·rows + rows` (the group's cubes share each weight row through L2). `x`: `[total_rows, k]`
/// at row stride `x_stride`, `w`: `[outputs, k]` at row stride `w_stride` (both in vectors of
/// `N`: Burn pads rows to a pitch); `out`: `[total_rows, outputs]` contiguous. `k_vecs = k / N`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    out: &mut Array<F>,
    outputs: u32,
    total_rows: u32,
    x_stride: u32,
    w_stride: u32,
    #[comptime] rows: u32,
    #[comptime] k_vecs: u32,
    #[comptime] vec: u32,
    #[comptime] glu: bool,
    #[define(F)] _dtype: StorageType,
) {
    let n = CUBE_POS_X * GEMV_WARPS + UNIT_POS_Y;
    let base = CUBE_POS_Y * rows;
    // The whole warp shares `n`: it leaves together, and the plane sums see all 32 lanes.
    if n < outputs {
        let mut acc = Array::<f32>::new(comptime![rows as usize]);
        // The up rows' sums (`glu` only).
        let mut acc_up = Array::<f32>::new(comptime![(if glu { rows } else { 1 }) as usize]);
        // The last group's rows past the end read the last row again (no branch in the
        // unrolled loop) and are never written.
        let mut x_row = Array::<u32>::new(comptime![rows as usize]);
        #[unroll]
        for m in 0..rows {
            acc[m as usize] = 0.0;
            if comptime![glu] {
                acc_up[m as usize] = 0.0;
            }
            x_row[m as usize] = min(base + m, total_rows - 1) * x_stride;
        }
        let w_row = n * w_stride;
        let w_up = (n + outputs) * w_stride;
        // Fully unrolled: each lane's loads of `w` are independent and all in flight at once.
        #[unroll]
        for it in 0..comptime![k_vecs.div_ceil(LANES)] {
            let kv = UNIT_POS_X + it * LANES;
            if kv < k_vecs {
                let wv = Vector::<f32, N>::cast_from(w[(w_row + kv) as usize]);
                if comptime![glu] {
                    let wu = Vector::<f32, N>::cast_from(w[(w_up + kv) as usize]);
                    #[unroll]
                    for m in 0..rows {
                        let xv = Vector::<f32, N>::cast_from(x[(x_row[m as usize] + kv) as usize]);
                        let mut s = 0.0f32;
                        let mut su = 0.0f32;
                        #[unroll]
                        for j in 0..vec {
                            s += wv[j as usize] * xv[j as usize];
                            su += wu[j as usize] * xv[j as usize];
                        }
                        acc[m as usize] += s;
                        acc_up[m as usize] += su;
                    }
                } else {
                    #[unroll]
                    for m in 0..rows {
                        let xv = Vector::<f32, N>::cast_from(x[(x_row[m as usize] + kv) as usize]);
                        let mut s = 0.0f32;
                        #[unroll]
                        for j in 0..vec {
                            s += wv[j as usize] * xv[j as usize];
                        }
                        acc[m as usize] += s;
                    }
                }
            }
        }
        #[unroll]
        for m in 0..rows {
            let s = plane_sum(acc[m as usize]);
            let mut y = F::cast_from(s);
            if comptime![glu] {
                // The unfused path's roundings: g and u as the gate|up product stores them.
                let g = f32::cast_from(y);
                let u = f32::cast_from(F::cast_from(plane_sum(acc_up[m as usize])));
                y = F::cast_from(g / (1.0 + (-g).exp()) * u);
            }
            if UNIT_POS_X == 0 && base + m < total_rows {
                out[((base + m) * outputs + n) as usize] = y;
            }
        }
    }
}

/// Row tiles (8 rows each) one tensor-core GEMM cube covers: 64 rows; more rows take more
/// cubes along y (each reads the weight tile again, through L2).
pub(crate) const TC_MAX_ROW_TILES: u32 = 8;

/// Tensor-core product for tens of rows: `out[m, n] = Σ_k x[m, k] · w[n, k]` in f32
/// (`mma.sync.m16n8k16`, f16 or bf16 operands, exact products), rounded to `F`, computed
/// transposed (`outᵀ = w · xᵀ`): the weight's 16-row tiles fill the MMA's M, the batch rows its
/// N (8 per tile), so a cube reads each weight element once for up to 64 rows.
///
/// The k order is free (both operands agree): lane `(gq, tq)` (`lane = 4·gq + tq`) covers the
/// quarter `tq` of k, and k-step `s` its four elements `tq·k/4 + 4s + {0..3}`, one 8-byte load
/// per row (the A fragment's `a0/a2` from weight row `gq`, `a1/a3` from row `gq + 8`, the B
/// fragment from batch row `gq` of the tile). The `k_split` warps of a cube take `steps`
/// consecutive k-steps each and add their partial sums in shared memory in warp order, so the
/// sums do not depend on the grid.
///
/// With `glu`, `w` is a fused gate|up weight `[2 · outputs, k]`: the cube also multiplies the
/// up rows `outputs + n` and writes `silu(g) · u` of the two sums rounded to `F` (this kernel
/// without `glu`, then [`swiglu_kernel`], bit for bit).
///
/// Grid `(outputs / 16, ceil(total_rows / (8 · row_tiles)), 1)`, cube `(32, k_split, 1)`.
/// `x`: `[total_rows, k]` at row stride `x_stride`, `w`: `[outputs, k]` at `w_stride` (both in
/// units of 4 elements, read as pairs of u32); `out`: `[total_rows, outputs]` contiguous.
/// `k_quads = k / 16` (= `k_split · steps`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_tc_kernel<F: Float, N: Size>(
    x: &Array<Vector<u32, N>>,
    w: &Array<Vector<u32, N>>,
    out: &mut Array<F>,
    outputs: u32,
    total_rows: u32,
    x_stride: u32,
    w_stride: u32,
    #[comptime] row_tiles: u32,
    #[comptime] k_split: u32,
    #[comptime] steps: u32,
    #[comptime] glu: bool,
    #[define(F)] _dtype: StorageType,
) {
    let lane = UNIT_POS_X;
    let gq = lane / 4;
    let tq = lane % 4;
    let warp = UNIT_POS_Y;
    let f0 = CUBE_POS_X * 16;
    let r0 = CUBE_POS_Y * comptime![row_tiles * 8];
    let k_quads = comptime![k_split * steps];
    let halves = comptime![if glu { 2u32 } else { 1u32 }];
    let mma = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    // [half][row tile][2]: half 1 is the up rows (`glu` only).
    let mut acc = Array::<Vector<f32, Const<2>>>::new(comptime![(halves * row_tiles * 2) as usize]);
    #[unroll]
    for i in 0..comptime![halves * row_tiles * 2] {
        acc[i as usize] = Vector::<f32, Const<2>>::new(0.0f32);
    }
    // Rows past the end read the last row (no branch in the unrolled loop), never written.
    let mut x_row = Array::<u32>::new(comptime![row_tiles as usize]);
    #[unroll]
    for t in 0..row_tiles {
        x_row[t as usize] = min(r0 + t * 8 + gq, total_rows - 1) * x_stride;
    }
    let mut a = Array::<Vector<F, Const<2>>>::new(4usize);
    let mut b = Array::<Vector<F, Const<2>>>::new(2usize);
    let mut c = Array::<Vector<f32, Const<2>>>::new(2usize);
    #[unroll]
    for i in 0..steps {
        let q = tq * k_quads + warp * steps + i;
        #[unroll]
        for h in 0..halves {
            let w_lo = w[((f0 + h * outputs + gq) * w_stride + q) as usize];
            let w_hi = w[((f0 + h * outputs + gq + 8) * w_stride + q) as usize];
            a[0] = Vector::<F, Const<2>>::reinterpret(w_lo[0]);
            a[1] = Vector::<F, Const<2>>::reinterpret(w_hi[0]);
            a[2] = Vector::<F, Const<2>>::reinterpret(w_lo[1]);
            a[3] = Vector::<F, Const<2>>::reinterpret(w_hi[1]);
            #[unroll]
            for t in 0..row_tiles {
                let xv = x[(x_row[t as usize] + q) as usize];
                b[0] = Vector::<F, Const<2>>::reinterpret(xv[0]);
                b[1] = Vector::<F, Const<2>>::reinterpret(xv[1]);
                let at = comptime![(h * row_tiles + t) * 2];
                c[0] = acc[at as usize];
                c[1] = acc[(at + 1) as usize];
                let d = mma.execute(&a, &b, &c);
                acc[at as usize] = d[0];
                acc[(at + 1) as usize] = d[1];
            }
        }
    }
    // The warps' partial sums, added in warp order: `[half][feature 16][row 8·row_tiles]`.
    let tile_rows = comptime![row_tiles * 8];
    let mut sums = SharedMemory::<f32>::new(comptime![(halves * 16 * row_tiles * 8) as usize]);
    #[unroll]
    for wi in 0..k_split {
        if warp == wi {
            #[unroll]
            for h in 0..halves {
                #[unroll]
                for t in 0..row_tiles {
                    let at = comptime![(h * row_tiles + t) * 2];
                    #[unroll]
                    for r in 0..2u32 {
                        // C register r: feature gq + 8r, rows 2tq and 2tq + 1 of the tile.
                        let base = (h * 16 + gq + r * 8) * tile_rows + t * 8 + 2 * tq;
                        let v = acc[comptime![(at + r) as usize]];
                        if comptime![wi == 0] {
                            sums[base as usize] = v[0];
                            sums[(base + 1) as usize] = v[1];
                        } else {
                            sums[base as usize] += v[0];
                            sums[(base + 1) as usize] += v[1];
                        }
                    }
                }
            }
        }
        sync_cube();
    }
    // Features fastest: 16 consecutive outputs of a row are one 32-byte run.
    let threads = comptime![32 * k_split];
    #[unroll]
    for j in 0..comptime![(16 * row_tiles * 8).div_ceil(32 * k_split)] {
        let idx = warp * 32 + lane + j * threads;
        let feat = idx % 16;
        let row = idx / 16;
        if idx < comptime![16 * row_tiles * 8] && r0 + row < total_rows {
            let mut y = F::cast_from(sums[(feat * tile_rows + row) as usize]);
            if comptime![glu] {
                // The unfused path's roundings: g and u as the gate|up product stores them.
                let g = f32::cast_from(y);
                let u =
                    f32::cast_from(F::cast_from(sums[((16 + feat) * tile_rows + row) as usize]));
                y = F::cast_from(g / (1.0 + (-g).exp()) * u);
            }
            out[((r0 + row) * outputs + f0 + feat) as usize] = y;
        }
    }
}

/// Threads of one argmax cube (one row).
pub(crate) const ARGMAX_THREADS: u32 = 256;

/// Row-wise argmax: `out[r]` = the first index of the largest value of row `r` (NaN and −inf
/// never win; a row of only those gives 0).
///
/// Grid `(rows, 1, 1)`, cube `(256, 1, 1)`. `x`: `[rows, cols]` at row stride `stride`; `out`:
/// `[rows]` of `I`.
#[cube(launch_unchecked)]
pub(crate) fn argmax_kernel<F: Float, I: Int>(
    x: &Array<F>,
    out: &mut Array<I>,
    cols: u32,
    stride: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS_X;
    let base = row * stride;
    // CubeCL 0.10 prints an infinite literal as `inf`, which NVRTC rejects: start at f32::MIN.
    let mut best = f32::new(f32::MIN);
    let mut at = u32::new(u32::MAX as i64);
    let mut i = UNIT_POS_X;
    while i < cols {
        let v = f32::cast_from(x[(base + i) as usize]);
        // Strictly greater: the first index wins ties within a thread; NaN fails it.
        if v > best || (at == u32::MAX && v == best) {
            best = v;
            at = i;
        }
        i += ARGMAX_THREADS;
    }
    // Across the warp: the largest value, then the smallest index holding it.
    let wbest = plane_max(best);
    let mut cand = u32::new(u32::MAX as i64);
    if best == wbest {
        cand = at;
    }
    let wat = plane_min(cand);
    let mut vals = SharedMemory::<f32>::new(comptime![(ARGMAX_THREADS / LANES) as usize]);
    let mut idxs = SharedMemory::<u32>::new(comptime![(ARGMAX_THREADS / LANES) as usize]);
    let warp = UNIT_POS_X / LANES;
    if UNIT_POS_PLANE == 0 {
        vals[warp as usize] = wbest;
        idxs[warp as usize] = wat;
    }
    sync_cube();
    if UNIT_POS_X == 0 {
        let mut b = vals[0];
        let mut a = idxs[0];
        #[unroll]
        for w in 1..comptime![ARGMAX_THREADS / LANES] {
            let v = vals[w as usize];
            let j = idxs[w as usize];
            if v > b || (v == b && j < a) {
                b = v;
                a = j;
            }
        }
        if a == u32::MAX {
            a = 0;
        }
        out[row as usize] = I::cast_from(a);
    }
}
