//! [`LayerBackend`] for `CubeBackend<CudaRuntime, ..>`: the checked entry points of
//! [`crate::layer`] on the tensors' own buffers (inputs at any row stride), outputs in
//! new contiguous buffers.

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use burn_tensor::{DType, Shape};
use cubecl::cuda::CudaRuntime;

use super::LayerBackend;
use crate::layer::{self, QkvHeads};
use fp8kv::device::{DeviceBatch, DeviceRows};
use fp8kv::error::Result;
use fp8kv::policy::Dtype;
use fp8kv_burn::{activation_dtype, burn_dtype};

type Cube<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

/// A `[rows, cols]` tensor as library rows: its own buffer when rows are unit-stride inside
/// (any row stride, e.g. Burn's pitched rows or a column slice), else a contiguous gather.
fn rows2(t: CubeTensor<CudaRuntime>, dtype: Dtype) -> Result<DeviceRows<CudaRuntime>> {
    let dims = t.meta.shape().to_vec();
    let strides = t.meta.strides().to_vec();
    let (rows, cols) = match dims[..] {
        [r, c] => (r, c),
        [c] => (1, c),
        _ => (
            dims[..dims.len() - 1].iter().product(),
            dims[dims.len() - 1],
        ),
    };
    let last = strides.len() - 1;
    let packed_tail = dims.len() <= 2 && (cols == 1 || strides[last] == 1);
    if packed_tail && (rows <= 1 || strides[0] >= cols) {
        let stride = if rows <= 1 { cols } else { strides[0] };
        return DeviceRows::from_handle(&t.client, t.handle, dtype, rows, cols, stride);
    }
    // Not unit-stride inside, or more than two dims: the library's gather, which reads only
    // the addressed elements (Burn's into_contiguous reads a pitched buffer's unwritten tail).
    let t = if dims.len() <= 2 {
        t
    } else {
        burn_cubecl::kernel::into_contiguous(t)
    };
    let s = t.meta.strides().to_vec();
    let (s0, s1) = if dims.len() == 2 {
        (s[0], s[1])
    } else {
        (cols, 1)
    };
    fp8kv::extend::gather_rows(&t.client, t.handle, dtype, [rows, 1, cols], [s0, 0, s1])
}

fn new_rows(
    like: &CubeTensor<CudaRuntime>,
    dtype: Dtype,
    rows: usize,
    cols: usize,
) -> Result<DeviceRows<CudaRuntime>> {
    DeviceRows::empty(&like.client, dtype, rows, cols, cols)
}

fn wrap(
    like: &CubeTensor<CudaRuntime>,
    out: DeviceRows<CudaRuntime>,
    shape: Vec<usize>,
) -> Result<CubeTensor<CudaRuntime>> {
    let dtype = burn_dtype(out.dtype())?;
    Ok(CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        out.into_handle(),
        dtype,
    ))
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> LayerBackend for Cube<F, I, BT> {
    fn layer_rms_norm(
        x: CubeTensor<CudaRuntime>,
        w: CubeTensor<CudaRuntime>,
        eps: f32,
    ) -> Result<CubeTensor<CudaRuntime>> {
        let dtype = activation_dtype("x", x.dtype)?;
        let like = x.clone();
        let (x, w) = (rows2(x, dtype)?, rows2(w, Dtype::F32)?);
        let mut out = new_rows(&like, dtype, x.rows(), x.row_elems())?;
        layer::rms_norm(&x, &w, eps, &mut out)?;
        let shape = vec![x.rows(), x.row_elems()];
        wrap(&like, out, shape)
    }

    fn layer_add_rms_norm(
        x: CubeTensor<CudaRuntime>,
        r: CubeTensor<CudaRuntime>,
        w: CubeTensor<CudaRuntime>,
        eps: f32,
    ) -> Result<(CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>)> {
        let dtype = activation_dtype("x", x.dtype)?;
        let like = x.clone();
        let (x, r, w) = (rows2(x, dtype)?, rows2(r, dtype)?, rows2(w, Dtype::F32)?);
        let (rows, hidden) = (x.rows(), x.row_elems());
        let mut sum = new_rows(&like, dtype, rows, hidden)?;
        let mut out = new_rows(&like, dtype, rows, hidden)?;
        layer::add_rms_norm(&x, &r, &w, eps, &mut sum, &mut out)?;
        Ok((
            wrap(&like, sum, vec![rows, hidden])?,
            wrap(&like, out, vec![rows, hidden])?,
        ))
    }

    fn layer_swiglu(gate_up: CubeTensor<CudaRuntime>) -> Result<CubeTensor<CudaRuntime>> {
        let dtype = activation_dtype("gate_up", gate_up.dtype)?;
        let like = gate_up.clone();
        let gu = rows2(gate_up, dtype)?;
        let (rows, ff) = (gu.rows(), gu.row_elems() / 2);
        let mut out = new_rows(&like, dtype, rows, ff)?;
        layer::swiglu(&gu, &mut out)?;
        wrap(&like, out, vec![rows, ff])
    }

    fn layer_rope_qkv(
        qkv: CubeTensor<CudaRuntime>,
        batch: &DeviceBatch<CudaRuntime>,
        table: CubeTensor<CudaRuntime>,
        heads: QkvHeads,
        rope_dims: usize,
    ) -> Result<[CubeTensor<CudaRuntime>; 3]> {
        let dtype = activation_dtype("qkv", qkv.dtype)?;
        let like = qkv.clone();
        let (qkv, table) = (rows2(qkv, dtype)?, rows2(table, Dtype::F32)?);
        let n = qkv.rows();
        let d = heads.head_dim;
        let mut q = new_rows(&like, dtype, n, heads.q_heads * d)?;
        let mut k = new_rows(&like, dtype, n, heads.kv_heads * d)?;
        let mut v = new_rows(&like, dtype, n, heads.kv_heads * d)?;
        layer::rope_qkv(
            &qkv, batch, &table, heads, rope_dims, &mut q, &mut k, &mut v,
        )?;
        Ok([
            wrap(&like, q, vec![n, heads.q_heads, d])?,
            wrap(&like, k, vec![n, heads.kv_heads, d])?,
            wrap(&like, v, vec![n, heads.kv_heads, d])?,
        ])
    }

    fn layer_gemv(
        x: CubeTensor<CudaRuntime>,
        w: CubeTensor<CudaRuntime>,
    ) -> Result<CubeTensor<CudaRuntime>> {
        gemv_tensor(x, w, false)
    }

    fn layer_gemv_swiglu(
        x: CubeTensor<CudaRuntime>,
        w: CubeTensor<CudaRuntime>,
    ) -> Result<CubeTensor<CudaRuntime>> {
        gemv_tensor(x, w, true)
    }

    fn layer_argmax(x: CubeTensor<CudaRuntime>) -> Result<CubeTensor<CudaRuntime>> {
        let dtype = activation_dtype("x", x.dtype)?;
        let like = x.clone();
        let x = rows2(x, dtype)?;
        let (index, int) = match I::dtype() {
            DType::I64 => (layer::IndexDtype::I64, DType::I64),
            _ => (layer::IndexDtype::I32, DType::I32),
        };
        let out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
            like.client.clone(),
            like.device.clone(),
            Shape::new([x.rows()]),
            int,
        );
        layer::argmax_rows(&x, &out.handle, index)?;
        Ok(out)
    }
}

/// [`layer::gemv`], or with `glu` [`layer::gemv_swiglu`], on Burn tensors. Weights keep Burn's
/// pitched rows: the kernel reads them in place.
fn gemv_tensor(
    x: CubeTensor<CudaRuntime>,
    w: CubeTensor<CudaRuntime>,
    glu: bool,
) -> Result<CubeTensor<CudaRuntime>> {
    let dtype = activation_dtype("x", x.dtype)?;
    let like = x.clone();
    let (x, w) = (rows2(x, dtype)?, rows2(w, dtype)?);
    let rows = x.rows();
    let outputs = if glu { w.rows() / 2 } else { w.rows() };
    let mut out = new_rows(&like, dtype, rows, outputs)?;
    if glu {
        layer::gemv_swiglu(&x, &w, &mut out)?;
    } else {
        layer::gemv(&x, &w, &mut out)?;
    }
    wrap(&like, out, vec![rows, outputs])
}
