//! The block kernels on Burn tensors: [`LayerBackend`] (implemented for `CubeBackend` on the
//! tensors' buffers, `Fusion<B>` as custom operations of the stream, and NdArray through the
//! f64 references) and the checked functions a model calls: [`rms_norm`], [`add_rms_norm`],
//! [`swiglu`], [`rope_qkv`], [`linear`], [`linear_swiglu`], [`argmax`], and [`decode_block`]
//! (a whole decoder block of a decode step).
//!
//! # Errors
//! Each function checks ranks, shapes, dtypes and devices before any backend runs and returns
//! [`fp8kv::Result`]; with `Fusion`, an error the inner backend still reported at execution
//! would panic with the library's message (the checks make that a bug).

mod cube;
mod fusion;
mod ndarray;

use burn_tensor::ops::{FloatTensor, IntTensor};
use burn_tensor::{DType, Int, Tensor, TensorPrimitive};

use super::{check_eps, QkvHeads};
use fp8kv::error::{Fp8KvError, Result};
use fp8kv::AttentionOptions;
pub use fp8kv_burn::RopeTableTensor;
use fp8kv_burn::{CacheSpec, KvBatch, KvCache, KvCachePrimitive, PagedKvBackend};

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

    /// `x · wᵀ` for `x` `[rows, k]` and `w` `[outputs, k]` (`linear` sends the shapes
    /// [`super::gemv_pays`] picks): a new contiguous `[rows, outputs]` tensor.
    fn layer_gemv(x: FloatTensor<Self>, w: FloatTensor<Self>) -> Result<FloatTensor<Self>>;

    /// `swiglu(x · wᵀ)` for a fused gate|up weight `w` `[2 ff, k]`: a new contiguous `[rows,
    /// ff]` tensor. The default runs [`Self::layer_gemv`] then [`Self::layer_swiglu`]; GPU
    /// backends fuse them into one launch with the same result.
    fn layer_gemv_swiglu(x: FloatTensor<Self>, w: FloatTensor<Self>) -> Result<FloatTensor<Self>> {
        Self::layer_swiglu(Self::layer_gemv(x, w)?)
    }

    /// Row-wise argmax of `[rows, cols]`: `[rows]` indices (the first of equal maxima).
    fn layer_argmax(x: FloatTensor<Self>) -> Result<IntTensor<Self>>;

    /// One decoder block of a decode step, as [`decode_block`] describes it: returns the
    /// residual stream and the MLP output (which the next block's norm adds). The default runs
    /// the block's operations one by one on this backend; `Fusion` records the whole block as
    /// one custom operation that runs the inner backend's, so its per-operation host cost is
    /// paid once a block instead of nine times.
    #[allow(clippy::too_many_arguments)]
    fn layer_decode_block(
        x: FloatTensor<Self>,
        pending: Option<FloatTensor<Self>>,
        w: &BlockWeights<Self>,
        cache: &mut KvCachePrimitive<Self>,
        spec: &CacheSpec,
        batch: &Self::KvBatchPrimitive,
        table: FloatTensor<Self>,
        block: &BlockConfig,
    ) -> Result<[FloatTensor<Self>; 2]> {
        let (eps, heads) = (block.eps, block.heads);
        let (x, h) = match pending {
            None => {
                let h = Self::layer_rms_norm(x.clone(), float(w.attn_norm.clone()), eps)?;
                (x, h)
            }
            Some(mlp) => Self::layer_add_rms_norm(x, mlp, float(w.attn_norm.clone()), eps)?,
        };
        let qkv: Tensor<Self, 2> = tensor(linear_unchecked::<Self>(h, &w.wqkv)?);
        let [n, row] = qkv.dims();
        let table: Tensor<Self, 2> = tensor(table);
        let [positions, d] = table.dims();
        // RoPE fused into the cache write: K never goes through memory unquantized.
        let q = Self::kv_fill_rope(
            cache,
            spec,
            float(qkv.reshape([n, 1, row])),
            batch,
            float(table.reshape([positions, 1, d])),
            heads,
            block.rope_dims,
        )?;
        let attn: Tensor<Self, 3> = tensor(Self::kv_decode(q, cache, spec, batch, &block.opts)?);
        let [n, h_, d] = attn.dims();
        let o = linear_unchecked::<Self>(float(attn.reshape([n, h_ * d])), &w.wo)?;
        let (x, h) = Self::layer_add_rms_norm(x, o, float(w.ffn_norm.clone()), eps)?;
        let mlp =
            linear_unchecked::<Self>(linear_swiglu_unchecked::<Self>(h, &w.w_gate_up)?, &w.w_down)?;
        Ok([x, mlp])
    }
}

/// The weights of one Llama decoder block, as [`decode_block`] takes them (projections stored
/// `[out, in]`, as GGUF stores them; one activation dtype; norms f32).
#[derive(Debug, Clone)]
pub struct BlockWeights<B: burn_tensor::backend::Backend> {
    /// RMSNorm weight before attention, `[hidden]`.
    pub attn_norm: Tensor<B, 1>,
    /// Fused Q|K|V projection, `[(q_heads + 2 kv_heads) · head_dim, hidden]`.
    pub wqkv: Tensor<B, 2>,
    /// Output projection, `[hidden, q_heads · head_dim]`.
    pub wo: Tensor<B, 2>,
    /// RMSNorm weight before the MLP, `[hidden]`.
    pub ffn_norm: Tensor<B, 1>,
    /// Fused gate|up projection, `[2 ff, hidden]` (gate rows first).
    pub w_gate_up: Tensor<B, 2>,
    /// Down projection, `[hidden, ff]`.
    pub w_down: Tensor<B, 2>,
}

/// The non-tensor arguments of [`decode_block`].
#[derive(Debug, Clone, PartialEq)]
pub struct BlockConfig {
    /// Query and KV heads and their size.
    pub heads: QkvHeads,
    /// RMSNorm epsilon (finite, `>= 0`).
    pub eps: f32,
    /// Rotated dimensions per head (the RoPE table's; set by [`decode_block`]).
    pub rope_dims: usize,
    /// Attention options of the decode kernel.
    pub opts: AttentionOptions,
}

/// `x · wᵀ` on primitives, the choice of [`linear`] without its checks.
fn linear_unchecked<B: LayerBackend>(
    x: FloatTensor<B>,
    w: &Tensor<B, 2>,
) -> Result<FloatTensor<B>> {
    let x: Tensor<B, 2> = tensor(x);
    let [rows, k] = x.dims();
    let outputs = w.dims()[0];
    if !super::gemv_pays(rows, outputs, k, tensor_cores(x.dtype(), outputs, k)) {
        return Ok(float(x.matmul(w.clone().transpose())));
    }
    B::layer_gemv(float(x), float(w.clone()))
}

/// Whether [`super::gemv`]'s tensor-core kernel takes these activations and weight shape.
fn tensor_cores(dtype: DType, outputs: usize, k: usize) -> bool {
    matches!(dtype, DType::F16 | DType::BF16) && outputs.is_multiple_of(16) && k.is_multiple_of(16)
}

/// `swiglu(x · wᵀ)` on primitives, the choice of [`linear_swiglu`] without its checks.
fn linear_swiglu_unchecked<B: LayerBackend>(
    x: FloatTensor<B>,
    w: &Tensor<B, 2>,
) -> Result<FloatTensor<B>> {
    let x: Tensor<B, 2> = tensor(x);
    let [rows, k] = x.dims();
    let tc = tensor_cores(x.dtype(), w.dims()[0] / 2, k);
    let x = float(x);
    if !super::gemv_pays(rows, w.dims()[0], k, tc) {
        return B::layer_swiglu(linear_unchecked::<B>(x, w)?);
    }
    B::layer_gemv_swiglu(x, float(w.clone()))
}

/// One Llama decoder block of a decode step: `h = RMSNorm(x + pending)`, the fused QKV
/// projection, RoPE fused into the cache write ([`KvCache::fill_rope`]), paged decode attention, the output
/// projection, `x' = x + pending + o`, `RMSNorm(x')`, the fused gate|up projection, SwiGLU and
/// the down projection. Returns `(x', mlp)`: the next block adds `mlp` in its first norm
/// (`pending`; `None` for the first block). Nine launches on GPU backends (SwiGLU is fused
/// into the gate|up GEMV), one custom operation on `Fusion`.
///
/// `x` and `pending`: `[num_tokens, hidden]` of the batch's new tokens (f32/f16/bf16); the
/// weights as [`BlockWeights`] says; `cache`'s layout must hold `heads.kv_heads` heads of
/// `heads.head_dim` for K and V; `table` must cover the batch's positions.
///
/// # Errors
/// What [`rms_norm`], [`add_rms_norm`], [`linear`], [`rope_qkv`], [`KvCache::fill`] and
/// [`KvCache::decode`] return for the same inputs, checked before anything runs. With
/// [`KvCache::set_saturation_check`] pending, the block runs those functions one by one (the
/// check reads K and V apart; K is then rounded to the activation dtype before the cache's
/// codec, one more rounding than the fused write).
#[allow(clippy::too_many_arguments)]
pub fn decode_block<B: LayerBackend>(
    x: Tensor<B, 2>,
    pending: Option<Tensor<B, 2>>,
    w: &BlockWeights<B>,
    cache: &mut KvCache<B>,
    batch: &KvBatch<B>,
    table: &RopeTableTensor<B>,
    heads: QkvHeads,
    eps: f32,
    opts: &AttentionOptions,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>)> {
    check_act("x", x.dtype())?;
    let (device, dtype) = (x.device(), x.dtype());
    let n = batch.written_tokens("a decoder block")?;
    let hidden = x.dims()[1];
    let ff = w.w_down.dims()[1];
    let (qd, kvd) = (
        heads.q_heads * heads.head_dim,
        heads.kv_heads * heads.head_dim,
    );
    check_same("x", &x, [n, hidden], dtype, &device)?;
    if let Some(p) = &pending {
        check_same("pending", p, [n, hidden], dtype, &device)?;
    }
    check_weight(&w.attn_norm, hidden, &device)?;
    check_weight(&w.ffn_norm, hidden, &device)?;
    check_same("wqkv", &w.wqkv, [qd + 2 * kvd, hidden], dtype, &device)?;
    check_same("wo", &w.wo, [hidden, qd], dtype, &device)?;
    check_same("w_gate_up", &w.w_gate_up, [2 * ff, hidden], dtype, &device)?;
    check_same("w_down", &w.w_down, [hidden, ff], dtype, &device)?;
    check_eps(eps)?;
    cache.check_batch(batch)?;
    cache.check_rope(batch, table, heads)?;
    if !heads.q_heads.is_multiple_of(heads.kv_heads) {
        return Err(Fp8KvError::HeadRatio {
            num_heads: heads.q_heads,
            num_kv_heads: heads.kv_heads,
        });
    }
    opts.validate(heads.q_heads)?;
    if cache.device() != &device {
        return Err(Fp8KvError::DeviceMismatch {
            what: "cache",
            expected: format!("{device:?}"),
            actual: format!("{:?}", cache.device()),
        });
    }
    if cache.saturation_check_pending() {
        let h = match pending {
            None => rms_norm(x.clone(), &w.attn_norm, eps)?,
            Some(mlp) => {
                let (sum, h) = add_rms_norm(x.clone(), mlp, &w.attn_norm, eps)?;
                return finish_block(sum, h, w, cache, batch, table, heads, eps, opts);
            }
        };
        return finish_block(x, h, w, cache, batch, table, heads, eps, opts);
    }
    let block = BlockConfig {
        heads,
        eps,
        rope_dims: table.rope_dims(),
        opts: opts.clone(),
    };
    let (spec, storage) = cache.parts_mut();
    let [x, mlp] = B::layer_decode_block(
        float(x),
        pending.map(float),
        w,
        storage,
        &spec,
        batch.primitive(),
        float(table.values().clone()),
        &block,
    )?;
    Ok((tensor(x), tensor(mlp)))
}

/// The rest of a block through the checked functions (the saturation check's path).
#[allow(clippy::too_many_arguments)]
fn finish_block<B: LayerBackend>(
    x: Tensor<B, 2>,
    h: Tensor<B, 2>,
    w: &BlockWeights<B>,
    cache: &mut KvCache<B>,
    batch: &KvBatch<B>,
    table: &RopeTableTensor<B>,
    heads: QkvHeads,
    eps: f32,
    opts: &AttentionOptions,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>)> {
    let (q, k, v) = rope_qkv(linear(h, &w.wqkv)?, batch, table, heads)?;
    cache.fill(k, v, batch)?;
    let attn = cache.decode(q, batch, opts)?;
    let [n, hq, d] = attn.dims();
    let o = linear(attn.reshape([n, hq * d]), &w.wo)?;
    let (x, h) = add_rms_norm(x, o, &w.ffn_norm, eps)?;
    let mlp = linear(linear_swiglu(h, &w.w_gate_up)?, &w.w_down)?;
    Ok((x, mlp))
}

fn float<B: burn_tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn tensor<B: burn_tensor::backend::Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn check_act(what: &'static str, dtype: DType) -> Result<()> {
    fp8kv_burn::activation_dtype(what, dtype).map(|_| ())
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

/// `x · wᵀ` for `x` `[rows, k]` and a weight stored `[outputs, k]` (GGUF's `[out, in]`):
/// [`super::gemv`] (one launch: CUDA cores to 16 rows, tensor cores above) where
/// [`super::gemv_pays`] (decode steps, prefill chunks of up to 32–512 rows by shape), Burn's
/// matmul on the transposed view otherwise.
pub fn linear<B: LayerBackend>(x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Result<Tensor<B, 2>> {
    check_act("x", x.dtype())?;
    let k = x.dims()[1];
    let device = x.device();
    check_same("weight", w, [w.dims()[0], k], x.dtype(), &device)?;
    Ok(tensor(linear_unchecked::<B>(float(x), w)?))
}

/// `swiglu(x · wᵀ)` for `x` `[rows, k]` and a fused gate|up weight `[2 ff, k]` (gate rows
/// first, stored `[out, in]`): `[rows, ff]`. One launch where [`super::gemv_pays`] on GPU
/// backends (the GEMV with SwiGLU on its two halves: [`linear`] then [`swiglu`], bit for bit);
/// those two otherwise.
pub fn linear_swiglu<B: LayerBackend>(
    x: Tensor<B, 2>,
    w_gate_up: &Tensor<B, 2>,
) -> Result<Tensor<B, 2>> {
    check_act("x", x.dtype())?;
    let k = x.dims()[1];
    let device = x.device();
    let two_ff = w_gate_up.dims()[0];
    check_same("w_gate_up", w_gate_up, [two_ff, k], x.dtype(), &device)?;
    if !two_ff.is_multiple_of(2) {
        return Err(Fp8KvError::ShapeMismatch {
            what: "w_gate_up",
            expected: "[2 ff, k] (gate rows then up rows)".into(),
            actual: format!("{:?}", w_gate_up.dims()),
        });
    }
    Ok(tensor(linear_swiglu_unchecked::<B>(float(x), w_gate_up)?))
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
    check_table(table, heads, batch, &device)?;
    let [q, k, v] = B::layer_rope_qkv(
        float(qkv),
        batch.primitive(),
        float(table.values().clone()),
        heads,
        table.rope_dims(),
    )?;
    Ok((tensor(q), tensor(k), tensor(v)))
}

/// The RoPE table against the heads, the batch's positions and the device.
fn check_table<B: LayerBackend>(
    table: &RopeTableTensor<B>,
    heads: QkvHeads,
    batch: &KvBatch<B>,
    device: &B::Device,
) -> Result<()> {
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
    if table.values().device() != *device {
        return Err(Fp8KvError::DeviceMismatch {
            what: "RoPE table",
            expected: format!("{device:?}"),
            actual: format!("{:?}", table.values().device()),
        });
    }
    if batch.max_kv_len() > table.positions() {
        return Err(Fp8KvError::InvalidOption(format!(
            "the RoPE table covers {} positions, the batch reaches position {}",
            table.positions(),
            batch.max_kv_len() - 1
        )));
    }
    Ok(())
}
