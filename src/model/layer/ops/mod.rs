//! The block kernels on Burn tensors: [`LayerBackend`] (implemented for `CubeBackend` on the
//! tensors' buffers, `Fusion<B>` as custom operations of the stream, and NdArray through the
//! f64 references) and the checked functions a model calls: [`rms_norm`], [`add_rms_norm`],
//! [`swiglu`], [`rope_qkv`].
//!
//! # Errors
//! Each function checks ranks, shapes, dtypes and devices before any backend runs and returns
//! [`crate::Result`]; with `Fusion`, an error the inner backend still reported at execution
//! would panic with the library's message (the checks make that a bug).

mod cube;
mod fusion;
mod ndarray;

use burn_tensor::ops::{FloatTensor, IntTensor};
use burn_tensor::{DType, Int, Tensor, TensorData, TensorPrimitive};

use super::{check_eps, QkvHeads, RopeTable};
use crate::burn::{KvBatch, PagedKvBackend};
use crate::error::{Fp8KvError, Result};

/// The block operations a Burn backend provides. Users call the checked functions of this
/// module; implementations may assume their checks passed.
pub trait LayerBackend: PagedKvBackend {
    /// RMSNorm of `x` (`[rows, hidden]`) with f32 weight `w` (`[hidden]`): a new contiguous
    /// tensor of `x`'s dtype.
    fn layer_rms_norm(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f32,
    ) -> Result<FloatTensor<Self>>;

    /// `sum = x + r` and `RMSNorm(sum) · w`, both new contiguous `[rows, hidden]` tensors.
    fn layer_add_rms_norm(
        x: FloatTensor<Self>,
        r: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f32,
    ) -> Result<(FloatTensor<Self>, FloatTensor<Self>)>;

    /// `silu(gate) · up` of `[rows, 2 ff]`: a new contiguous `[rows, ff]` tensor.
    fn layer_swiglu(gate_up: FloatTensor<Self>) -> Result<FloatTensor<Self>>;

    /// RoPE on a fused QKV output `[num_tokens, row]`, split into contiguous `[num_tokens,
    /// heads, head_dim]` Q, K and V; `table` is `[positions, head_dim]` f32.
    fn layer_rope_qkv(
        qkv: FloatTensor<Self>,
        batch: &Self::KvBatchPrimitive,
        table: FloatTensor<Self>,
        heads: QkvHeads,
        rope_dims: usize,
    ) -> Result<[FloatTensor<Self>; 3]>;

    /// `x · wᵀ` for `x` `[rows, k]` with `rows <= GEMV_MAX_ROWS` and `w` `[outputs, k]`: a new
    /// contiguous `[rows, outputs]` tensor.
    fn layer_gemv(x: FloatTensor<Self>, w: FloatTensor<Self>) -> Result<FloatTensor<Self>>;

    /// Row-wise argmax of `[rows, cols]`: `[rows]` indices (the first of equal maxima).
    fn layer_argmax(x: FloatTensor<Self>) -> Result<IntTensor<Self>>;
}

/// A [`RopeTable`] on a device: `[positions, head_dim]` f32.
#[derive(Debug, Clone)]
pub struct RopeTableTensor<B: burn_tensor::backend::Backend> {
    values: Tensor<B, 2>,
    rope_dims: usize,
}

impl<B: burn_tensor::backend::Backend> RopeTableTensor<B> {
    /// Uploads `table` to `device` (one upload; every layer and step reads it).
    pub fn new(table: &RopeTable, device: &B::Device) -> Self {
        let values = Tensor::from_data(
            TensorData::new(
                table.values().to_vec(),
                [table.positions(), table.head_dim()],
            ),
            (device, DType::F32),
        );
        RopeTableTensor {
            values,
            rope_dims: table.rope_dims(),
        }
    }
    /// Positions covered.
    pub fn positions(&self) -> usize {
        self.values.dims()[0]
    }
    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.values.dims()[1]
    }
    /// Rotated dimensions per head.
    pub fn rope_dims(&self) -> usize {
        self.rope_dims
    }
}

fn float<B: burn_tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn tensor<B: burn_tensor::backend::Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn check_act(what: &'static str, dtype: DType) -> Result<()> {
    crate::burn::activation_dtype(what, dtype).map(|_| ())
}

fn check_same<B: burn_tensor::backend::Backend, const D: usize>(
    what: &'static str,
    t: &Tensor<B, D>,
    dims: [usize; D],
    dtype: DType,
    device: &B::Device,
) -> Result<()> {
    if t.dims() != dims || t.dtype() != dtype {
        return Err(Fp8KvError::ShapeMismatch {
            what,
            expected: format!("{dims:?} {dtype:?}"),
            actual: format!("{:?} {:?}", t.dims(), t.dtype()),
        });
    }
    if t.device() != *device {
        return Err(Fp8KvError::DeviceMismatch {
            what,
            expected: format!("{device:?}"),
            actual: format!("{:?}", t.device()),
        });
    }
    Ok(())
}

fn check_weight<B: burn_tensor::backend::Backend>(
    w: &Tensor<B, 1>,
    hidden: usize,
    device: &B::Device,
) -> Result<()> {
    check_same("norm weight", w, [hidden], DType::F32, device)
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) · w` per row, in f32, in `x`'s dtype (f32/f16/bf16);
/// `w` is `[hidden]` f32. One launch on GPU backends.
pub fn rms_norm<B: LayerBackend>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 1>,
    eps: f32,
) -> Result<Tensor<B, 2>> {
    check_act("x", x.dtype())?;
    check_weight(w, x.dims()[1], &x.device())?;
    check_eps(eps)?;
    Ok(tensor(B::layer_rms_norm(float(x), float(w.clone()), eps)?))
}

/// The residual add and the norm after it: returns `(x + r, RMSNorm(x + r) · w)`, the sum
/// rounded to the activation dtype before the norm reads it. One launch on GPU backends.
pub fn add_rms_norm<B: LayerBackend>(
    x: Tensor<B, 2>,
    r: Tensor<B, 2>,
    w: &Tensor<B, 1>,
    eps: f32,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>)> {
    check_act("x", x.dtype())?;
    let device = x.device();
    check_same("r", &r, x.dims(), x.dtype(), &device)?;
    check_weight(w, x.dims()[1], &device)?;
    check_eps(eps)?;
    let (sum, out) = B::layer_add_rms_norm(float(x), float(r), float(w.clone()), eps)?;
    Ok((tensor(sum), tensor(out)))
}

/// SwiGLU of a fused gate|up projection `[rows, 2 ff]`: `silu(gate) · up`, `[rows, ff]`. One
/// launch on GPU backends.
pub fn swiglu<B: LayerBackend>(gate_up: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
    check_act("gate_up", gate_up.dtype())?;
    let width = gate_up.dims()[1];
    if !width.is_multiple_of(2) {
        return Err(Fp8KvError::ShapeMismatch {
            what: "gate_up",
            expected: "[rows, 2 ff] (gate then up)".into(),
            actual: format!("{:?}", gate_up.dims()),
        });
    }
    Ok(tensor(B::layer_swiglu(float(gate_up))?))
}

/// `x · wᵀ` for `x` `[rows, k]` and a weight stored `[outputs, k]` (GGUF's `[out, in]`): the
/// matrix-vector kernel ([`super::gemv`], one launch) for `rows <= GEMV_MAX_ROWS` (decode
/// steps), Burn's matmul on the transposed view otherwise (prefill).
pub fn linear<B: LayerBackend>(x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Result<Tensor<B, 2>> {
    check_act("x", x.dtype())?;
    let [rows, k] = x.dims();
    let device = x.device();
    check_same("weight", w, [w.dims()[0], k], x.dtype(), &device)?;
    if rows == 0 || rows > super::GEMV_MAX_ROWS {
        return Ok(x.matmul(w.clone().transpose()));
    }
    Ok(tensor(B::layer_gemv(float(x), float(w.clone()))?))
}

/// Row-wise argmax of `[rows, cols]` values (f32/f16/bf16, no cast): `[rows]` indices, the
/// first of equal maxima, NaN and −inf never chosen. One launch on GPU backends.
pub fn argmax<B: LayerBackend>(x: Tensor<B, 2>) -> Result<Tensor<B, 1, Int>> {
    check_act("x", x.dtype())?;
    if x.dims()[1] == 0 {
        return Err(Fp8KvError::ZeroSize { what: "argmax row" });
    }
    Ok(Tensor::from_primitive(B::layer_argmax(float(x))?))
}

/// RoPE on a fused QKV projection `[num_tokens, (q_heads + 2 kv_heads) · head_dim]`, split into
/// `(q, k, v)`, each `[num_tokens, heads, head_dim]`; positions from `batch` (sequence `b`'s
/// new token `i` is at `kv_seqlens[b] − q_seq_length[b] + i`). One launch on GPU backends.
pub fn rope_qkv<B: LayerBackend>(
    qkv: Tensor<B, 2>,
    batch: &KvBatch<B>,
    table: &RopeTableTensor<B>,
    heads: QkvHeads,
) -> Result<(Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>)> {
    check_act("qkv", qkv.dtype())?;
    let n = batch.num_tokens().ok_or_else(|| {
        Fp8KvError::InvalidOption("RoPE needs a batch built with KvBatch::new".into())
    })?;
    let device = qkv.device();
    check_same("qkv", &qkv, [n, heads.row_elems()], qkv.dtype(), &device)?;
    if heads.q_heads == 0 || heads.kv_heads == 0 || heads.head_dim != table.head_dim() {
        return Err(Fp8KvError::ShapeMismatch {
            what: "RoPE heads",
            expected: format!(
                "non-zero heads of the table's head dim {}",
                table.head_dim()
            ),
            actual: format!("{heads:?}"),
        });
    }
    if table.values.device() != device {
        return Err(Fp8KvError::DeviceMismatch {
            what: "RoPE table",
            expected: format!("{device:?}"),
            actual: format!("{:?}", table.values.device()),
        });
    }
    if batch.max_kv_len() > table.positions() {
        return Err(Fp8KvError::InvalidOption(format!(
            "the RoPE table covers {} positions, the batch reaches position {}",
            table.positions(),
            batch.max_kv_len() - 1
        )));
    }
    let [q, k, v] = B::layer_rope_qkv(
        float(qkv),
        batch.primitive(),
        float(table.values.clone()),
        heads,
        table.rope_dims,
    )?;
    Ok((tensor(q), tensor(k), tensor(v)))
}
