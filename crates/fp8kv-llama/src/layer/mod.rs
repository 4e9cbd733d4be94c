//! One launch for each piece of a Llama block outside attention and the matmuls:
//!
//! - [`rms_norm`] / [`add_rms_norm`]: RMSNorm, with the residual add before it fused in (the
//!   new residual stream is written too);
//! - [`swiglu`]: `silu(gate) · up` of a fused gate|up projection;
//! - [`rope_qkv`]: RoPE on a fused QKV projection, positions from the step's [`DeviceBatch`],
//!   split into contiguous Q, K and V (the model's decode and prefill use the library's RoPE
//!   fill instead, `fp8kv::kernels::fill::fill_rope`, which writes K and V into the cache);
//! - [`gemv`] / [`gemv_swiglu`]: the matmuls of few rows (CUDA cores up to 16 rows, tensor
//!   cores above for f16/bf16), SwiGLU fusable into the gate|up one ([`gemv_pays`] says when
//!   they beat Burn's matmul);
//! - [`argmax_rows`]: the greedy token of each row.
//!
//! Each replaces a chain of 9–11 Burn ops (and as many launches). The functions here check
//! their inputs and return [`fp8kv::Result`]; `launch.rs` picks the grid, `kernel.rs` computes.
//! [`reference`] holds the f64 CPU definitions the GPU tests compare with (and that the
//! NdArray backend runs); [`LayerBackend`] puts all of it on Burn tensors.

pub(crate) mod kernel;
mod launch;
pub mod ops;
pub mod reference;

use cubecl::prelude::Runtime;

pub use fp8kv::rope::{QkvHeads, RopeTable};
pub use ops::{LayerBackend, RopeTableTensor};

use fp8kv::device::{DeviceBatch, DeviceRows};
use fp8kv::error::{Fp8KvError, Result};
use fp8kv::extend::check_limit;
use fp8kv::policy::Dtype;
use kernel::RopeDims;

fn shape_err(what: &'static str, expected: String, rows: &DeviceRows<impl Runtime>) -> Fp8KvError {
    Fp8KvError::ShapeMismatch {
        what,
        expected,
        actual: format!(
            "[{}, {}] {} with row stride {}",
            rows.rows(),
            rows.row_elems(),
            rows.dtype(),
            rows.row_stride()
        ),
    }
}

/// `rows` rows of `row_elems` elements of `dtype` (contiguous unless `strided`), or an error
/// naming `what`; the buffer below the kernels' 32-bit indices.
fn check_rows<R: Runtime>(
    what: &'static str,
    t: &DeviceRows<R>,
    rows: usize,
    row_elems: usize,
    dtype: Dtype,
    strided: bool,
) -> Result<()> {
    if t.rows() != rows
        || t.row_elems() != row_elems
        || (!strided && t.row_stride() != row_elems && rows > 1)
        || t.dtype() != dtype
    {
        let kind = if strided { "" } else { "contiguous " };
        return Err(shape_err(
            what,
            format!("{kind}[{rows}, {row_elems}] {dtype}"),
            t,
        ));
    }
    check_limit(
        what,
        t.len_elems(),
        u32::MAX as usize - 1,
        "the kernels' 32-bit indices",
    )
}

fn check_weight<R: Runtime>(w: &DeviceRows<R>, hidden: usize) -> Result<()> {
    check_rows("norm weight", w, 1, hidden, Dtype::F32, false)
}

/// An RMSNorm epsilon is finite and non-negative.
pub(crate) fn check_eps(eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Fp8KvError::InvalidOption(format!(
            "RMSNorm eps must be finite and >= 0, got {eps}"
        )))
    }
}

fn check_activation<R: Runtime>(what: &'static str, x: &DeviceRows<R>) -> Result<()> {
    if x.dtype().is_activation() {
        Ok(())
    } else {
        Err(Fp8KvError::UnsupportedDtype(format!(
            "{what} must be f32, f16 or bf16, got {}",
            x.dtype()
        )))
    }
}

/// RMSNorm: `out = x / sqrt(mean(x²) + eps) · w` per row, in f32, rounded to `x`'s dtype.
///
/// `x`: `[rows, hidden]` (any row stride), `out`: `[rows, hidden]` contiguous, one activation
/// dtype; `w`: `[1, hidden]` f32.
/// Errors: [`Fp8KvError::ShapeMismatch`], [`Fp8KvError::UnsupportedDtype`],
/// [`Fp8KvError::InvalidOption`] (eps), [`Fp8KvError::TooLarge`] (past 32-bit indices).
pub fn rms_norm<R: Runtime>(
    x: &DeviceRows<R>,
    w: &DeviceRows<R>,
    eps: f32,
    out: &mut DeviceRows<R>,
) -> Result<()> {
    check_activation("x", x)?;
    let (rows, hidden) = (x.rows(), x.row_elems());
    check_rows("x", x, rows, hidden, x.dtype(), true)?;
    check_rows("out", out, rows, hidden, x.dtype(), false)?;
    check_weight(w, hidden)?;
    check_eps(eps)?;
    launch::launch_norm(x, None, w, eps, out);
    Ok(())
}

/// The residual add and the RMSNorm after it, one launch: `sum = x + r` (rounded to the
/// activation dtype: the new residual stream) and `out = RMSNorm(sum) · w` ([`rms_norm`]).
///
/// `x`, `r`: `[rows, hidden]` (any row stride); `sum`, `out`: `[rows, hidden]` contiguous; one
/// activation dtype. Errors as [`rms_norm`].
pub fn add_rms_norm<R: Runtime>(
    x: &DeviceRows<R>,
    r: &DeviceRows<R>,
    w: &DeviceRows<R>,
    eps: f32,
    sum: &mut DeviceRows<R>,
    out: &mut DeviceRows<R>,
) -> Result<()> {
    check_activation("x", x)?;
    let (rows, hidden) = (x.rows(), x.row_elems());
    check_rows("x", x, rows, hidden, x.dtype(), true)?;
    check_rows("r", r, rows, hidden, x.dtype(), true)?;
    check_rows("sum", sum, rows, hidden, x.dtype(), false)?;
    check_rows("out", out, rows, hidden, x.dtype(), false)?;
    check_weight(w, hidden)?;
    check_eps(eps)?;
    launch::launch_norm(x, Some((r, sum)), w, eps, out);
    Ok(())
}

/// SwiGLU of a fused gate|up projection: `out[t, j] = silu(gu[t, j]) · gu[t, ff + j]` with
/// `silu(g) = g / (1 + e^−g)`, in f32, rounded to the activation dtype.
///
/// `gu`: `[rows, 2 ff]` (any row stride); `out`: `[rows, ff]` contiguous, the same dtype.
/// Errors as [`rms_norm`].
pub fn swiglu<R: Runtime>(gu: &DeviceRows<R>, out: &mut DeviceRows<R>) -> Result<()> {
    check_activation("gate_up", gu)?;
    let (rows, ff) = (out.rows(), out.row_elems());
    check_rows("gate_up", gu, rows, 2 * ff, out.dtype(), true)?;
    check_rows("out", out, rows, ff, gu.dtype(), false)?;
    launch::launch_swiglu(gu, out);
    Ok(())
}

/// RoPE on a fused QKV projection, split into contiguous Q, K and V: sequence `b`'s new token
/// `i` (row `q_start_loc[b] + i` of `qkv`) is at position `kv_seqlens[b] − q_seq_length[b] +
/// i`; dimensions `2j`, `2j + 1` of each Q and K head rotate by `table`'s angle for pair `j`
/// (`j < rope_dims / 2`; the rest and V are copied), in f32, rounded to the activation dtype.
///
/// - `qkv`: `[num_tokens, heads.row_elems()]`, any row stride, `num_tokens` the batch's;
/// - `batch`: built with [`DeviceBatch::new`]; `table`: [`RopeTable::values`] uploaded as
///   `[positions, head_dim]` f32 rows, covering every sequence's `kv_seqlens`;
/// - `q`: `[num_tokens, q_heads · head_dim]`, `k`, `v`: `[num_tokens, kv_heads · head_dim]`,
///   contiguous, `qkv`'s dtype. Rows of no sequence are not written.
///
/// Errors as [`rms_norm`], and [`Fp8KvError::InvalidOption`] for a batch built for reads, a
/// position past the table or an odd head dim.
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv<R: Runtime>(
    qkv: &DeviceRows<R>,
    batch: &DeviceBatch<R>,
    table: &DeviceRows<R>,
    heads: QkvHeads,
    rope_dims: usize,
    q: &mut DeviceRows<R>,
    k: &mut DeviceRows<R>,
    v: &mut DeviceRows<R>,
) -> Result<()> {
    check_activation("qkv", qkv)?;
    let d = heads.head_dim;
    if d == 0 || !d.is_multiple_of(2) || rope_dims > d || !rope_dims.is_multiple_of(2) {
        return Err(Fp8KvError::InvalidOption(format!(
            "RoPE needs an even head dim and even rope dims <= head dim, got {d} and {rope_dims}"
        )));
    }
    if heads.q_heads == 0 || heads.kv_heads == 0 {
        return Err(Fp8KvError::ZeroSize { what: "RoPE heads" });
    }
    let n = batch.num_tokens().ok_or_else(|| {
        Fp8KvError::InvalidOption(
            "RoPE needs a DeviceBatch built with DeviceBatch::new, not for_reads".into(),
        )
    })?;
    if qkv.rows() != n || qkv.row_elems() != heads.row_elems() {
        return Err(shape_err(
            "qkv",
            format!("[{n}, {}] (the batch's tokens)", heads.row_elems()),
            qkv,
        ));
    }
    check_limit(
        "qkv",
        qkv.len_elems(),
        u32::MAX as usize - 1,
        "the kernels' 32-bit indices",
    )?;
    let dtype = qkv.dtype();
    check_rows("q", q, n, heads.q_heads * d, dtype, false)?;
    check_rows("k", k, n, heads.kv_heads * d, dtype, false)?;
    check_rows("v", v, n, heads.kv_heads * d, dtype, false)?;
    let max_kv = batch.meta().max_kv_len();
    if table.dtype() != Dtype::F32 || table.row_elems() != d || table.row_stride() != d {
        return Err(shape_err(
            "RoPE table",
            format!("contiguous [positions, {d}] f32"),
            table,
        ));
    }
    check_limit(
        "RoPE table",
        table.len_elems(),
        u32::MAX as usize - 1,
        "the kernels' 32-bit indices",
    )?;
    if table.rows() < max_kv {
        return Err(Fp8KvError::InvalidOption(format!(
            "the RoPE table covers {} positions, the batch reaches position {}",
            table.rows(),
            max_kv.saturating_sub(1)
        )));
    }
    let dims = RopeDims {
        q_heads: heads.q_heads as u32,
        kv_heads: heads.kv_heads as u32,
        head_dim: d as u32,
        pairs: (rope_dims / 2) as u32,
    };
    launch::launch_rope(qkv, batch, table, dims, q, k, v);
    Ok(())
}

/// The integer type [`argmax_rows`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexDtype {
    /// 32-bit indices.
    I32,
    /// 64-bit indices.
    I64,
}

/// Rows above which [`gemv`] runs its tensor-core kernel (f16/bf16 activations, `k` and the
/// outputs multiples of 16, rows and weights 8-byte aligned); up to here its CUDA-core kernel.
pub const GEMV_TENSOR_CORE_ROWS: usize = 16;

/// Whether [`ops::linear`] (and [`ops::linear_swiglu`]) send a product of `rows` rows with
/// `outputs` weight rows of `k` to [`gemv`] rather than Burn's matmul; `tensor_cores`: the
/// activations are f16 or bf16 and `outputs` and `k` multiples of 16 (what [`gemv`]'s
/// tensor-core kernel takes above [`GEMV_TENSOR_CORE_ROWS`] rows).
///
/// Up to 16 rows (and without tensor cores) [`gemv`] runs on CUDA cores at about 4 T
/// multiply-adds/s, so its time grows with `rows · outputs · k`; Burn's tiled matmul (autotune
/// off) costs 30–80 µs at these sizes whatever the rows, and more when few outputs leave it
/// few tiles. So: up to 2²⁷ multiply-adds, and narrow products (fewer than 1,024 outputs) of a
/// long `k` up to 256 rows. Measured on an H100 (`cargo xtask demo --speed`, CubeBackend, µs
/// per call, CUDA-core GEMV / matmul): gate|up 3072 × 576 at 32 rows 21 / 36, at 64 rows 36 /
/// 35; QKV 960 × 576 at 128 rows 27 / 34, at 256 rows 44 / 37; down 576 × 1536 at 256 rows 46
/// / 75, at 512 rows 82 / 79; LM head 49,152 × 576 at 16 rows 121 / 58.
///
/// From 17 rows with tensor cores: up to 32 rows, up to 2²⁸ multiply-adds, and narrow products
/// up to 512 rows. Measured the same way (tensor-core kernel / matmul): gate|up at 128 rows 20
/// / 34, at 256 rows 42 / 38; QKV at 256 rows 15 / 37, at 512 rows 39 / 37; down at 512 rows
/// 67 / 80, at 1024 rows 138 / 74; LM head at 32 rows 54 / 61, at 64 rows 85 / 75.
pub fn gemv_pays(rows: usize, outputs: usize, k: usize, tensor_cores: bool) -> bool {
    let macs = rows.saturating_mul(outputs).saturating_mul(k);
    if tensor_cores && rows > GEMV_TENSOR_CORE_ROWS {
        return rows <= 32 || macs <= 1 << 28 || (outputs < 1024 && rows <= 512);
    }
    rows > 0 && (macs <= 1 << 27 || (outputs < 1024 && k >= 1024 && rows <= 256))
}

/// The product of few rows with a weight stored `[outputs, k]` (GGUF's `[out, in]`): `out[m,
/// n] = Σ_k x[m, k] · w[n, k]`, accumulated in f32, rounded to the activation dtype. Up to
/// [`GEMV_TENSOR_CORE_ROWS`] rows (a decode step's matrix-vector products) each weight row is
/// read by one warp per group of 16 rows, on CUDA cores. More rows of f16/bf16 run a
/// tensor-core kernel where `outputs` and `k` are multiples of 16 and the rows 8-byte aligned
/// (each 16-row weight tile read once per 64 rows); other shapes stay on CUDA cores, which pay
/// for few rows only (see [`gemv_pays`]).
///
/// `x`: `[rows, k]`, `rows >= 1`, any row stride; `w`: `[outputs, k]`, any row stride; `out`:
/// `[rows, outputs]` contiguous; one activation dtype. Errors as [`rms_norm`], and
/// [`Fp8KvError::TooLarge`] past 16 · 65,535 rows (the grid's y limit).
pub fn gemv<R: Runtime>(
    x: &DeviceRows<R>,
    w: &DeviceRows<R>,
    out: &mut DeviceRows<R>,
) -> Result<()> {
    gemv_checked(x, w, w.rows(), false, out)
}

/// [`gemv`] with a fused gate|up weight `[2 ff, k]` (gate rows first) and SwiGLU on its two
/// halves: `out[m, j] = silu(g) · u` of `g = (x · wᵀ)[m, j]` and `u = (x · wᵀ)[m, ff + j]`,
/// each rounded to the activation dtype first, `silu` in f32: [`gemv`] then [`swiglu`], bit
/// for bit, in one launch (the gate|up activations never reach memory).
///
/// `out`: `[rows, ff]` contiguous. Errors as [`gemv`], and [`Fp8KvError::ShapeMismatch`] for
/// an odd weight row count.
pub fn gemv_swiglu<R: Runtime>(
    x: &DeviceRows<R>,
    w_gate_up: &DeviceRows<R>,
    out: &mut DeviceRows<R>,
) -> Result<()> {
    if !w_gate_up.rows().is_multiple_of(2) {
        return Err(Fp8KvError::ShapeMismatch {
            what: "w_gate_up",
            expected: "[2 ff, k] (gate rows then up rows)".into(),
            actual: format!("{} rows", w_gate_up.rows()),
        });
    }
    gemv_checked(x, w_gate_up, w_gate_up.rows() / 2, true, out)
}

fn gemv_checked<R: Runtime>(
    x: &DeviceRows<R>,
    w: &DeviceRows<R>,
    outputs: usize,
    glu: bool,
    out: &mut DeviceRows<R>,
) -> Result<()> {
    check_activation("x", x)?;
    let (rows, k) = (x.rows(), x.row_elems());
    check_limit(
        "GEMV rows",
        rows,
        kernel::GEMV_GROUP_ROWS as usize * 65_535,
        "the GEMV grid's y dimension (16 rows a cube)",
    )?;
    check_rows("x", x, rows, k, x.dtype(), true)?;
    check_rows("w", w, w.rows(), k, x.dtype(), true)?;
    check_rows("out", out, rows, outputs, x.dtype(), false)?;
    if k == 0 {
        return Err(Fp8KvError::ZeroSize { what: "GEMV k" });
    }
    let vec = fp8kv::extend::access_elems(
        x.dtype().size_bytes(),
        &[k, x.row_stride(), w.row_stride()],
        &[x.handle(), w.handle()],
    );
    let tensor_cores = rows > GEMV_TENSOR_CORE_ROWS
        && matches!(x.dtype(), Dtype::F16 | Dtype::Bf16)
        && k.is_multiple_of(16)
        && outputs.is_multiple_of(16)
        && vec.is_multiple_of(4);
    if tensor_cores {
        launch::launch_gemm_tc(x, w, glu, out);
    } else {
        launch::launch_gemv(x, w, vec, glu, out);
    }
    Ok(())
}

/// Row-wise argmax of `x` (`[rows, cols]`, any row stride): the first index of each row's
/// largest value (NaN and −inf never win; a row of only those gives 0), written as `rows` integers of
/// `out_type` (what the caller's integer tensors hold) into `out`.
///
/// Errors as [`rms_norm`], and [`Fp8KvError::ShapeMismatch`] when `out` is too small.
pub fn argmax_rows<R: Runtime>(
    x: &DeviceRows<R>,
    out: &cubecl::server::Handle,
    out_type: IndexDtype,
) -> Result<()> {
    check_activation("x", x)?;
    check_rows("x", x, x.rows(), x.row_elems(), x.dtype(), true)?;
    if x.row_elems() == 0 {
        return Err(Fp8KvError::ZeroSize { what: "argmax row" });
    }
    use cubecl::ir::{ElemType, IntKind, StorageType};
    let storage = StorageType::Scalar(ElemType::Int(match out_type {
        IndexDtype::I32 => IntKind::I32,
        IndexDtype::I64 => IntKind::I64,
    }));
    if (out.size_in_used() as usize) < x.rows() * storage.size() {
        return Err(Fp8KvError::ShapeMismatch {
            what: "argmax output",
            expected: format!("{} integers", x.rows()),
            actual: format!("{} bytes", out.size_in_used()),
        });
    }
    launch::launch_argmax(x, out, storage);
    Ok(())
}
