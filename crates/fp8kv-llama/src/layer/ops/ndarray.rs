//! [`LayerBackend`] for NdArray: the f64 references of [`crate::layer::reference`],
//! rounded to the activation dtype once, so a model written against the block operations runs
//! and is tested on a machine without a GPU.

use burn_ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray,
};
use burn_tensor::backend::Backend;
use burn_tensor::ops::FloatTensor;
use burn_tensor::{DType, Tensor, TensorData, TensorPrimitive};

use super::LayerBackend;
use crate::layer::{reference, QkvHeads};
use fp8kv::error::{Fp8KvError, Result};
use fp8kv_burn::{activation_dtype, HostBatch};

type Nd<E, I, Q> = NdArray<E, I, Q>;

/// A float tensor's values (f32, row-major), its shape and dtype.
fn host<B: Backend>(t: FloatTensor<B>) -> Result<(Vec<f32>, Vec<usize>, DType)> {
    use burn_tensor::TensorMetadata;
    let (dims, dtype) = (t.shape().to_vec(), t.dtype());
    let flat = B::float_reshape(t, burn_tensor::Shape::new([dims.iter().product()]));
    let values = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(flat))
        .try_into_data()
        .map_err(|e| Fp8KvError::Runtime(format!("reading a tensor back failed: {e:?}")))?
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| Fp8KvError::Runtime(format!("reading a tensor back failed: {e:?}")))?;
    Ok((values, dims, dtype))
}

/// f64 values rounded to `dtype`, as a new tensor of `shape` on `device`.
fn device<B: Backend>(
    values: &[f64],
    shape: Vec<usize>,
    dtype: DType,
    device: &B::Device,
) -> Result<FloatTensor<B>> {
    let act = activation_dtype("output", dtype)?;
    let values: Vec<f32> = values.iter().map(|&v| act.round_trip(v as f32)).collect();
    let data = TensorData::new(values, shape);
    Ok(match data.shape.len() {
        2 => Tensor::<B, 2>::from_data(data, (device, dtype))
            .into_primitive()
            .tensor(),
        _ => Tensor::<B, 3>::from_data(data, (device, dtype))
            .into_primitive()
            .tensor(),
    })
}

fn device_of<B: Backend>(t: &FloatTensor<B>) -> B::Device {
    B::float_device(t)
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> LayerBackend for Nd<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    fn layer_rms_norm(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f32,
    ) -> Result<FloatTensor<Self>> {
        let dev = device_of::<Self>(&x);
        let (x, shape, dtype) = host::<Self>(x)?;
        let (w, _, _) = host::<Self>(w)?;
        device::<Self>(&reference::rms_norm(&x, &w, eps), shape, dtype, &dev)
    }

    fn layer_add_rms_norm(
        x: FloatTensor<Self>,
        r: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f32,
    ) -> Result<(FloatTensor<Self>, FloatTensor<Self>)> {
        let dev = device_of::<Self>(&x);
        let (x, shape, dtype) = host::<Self>(x)?;
        let (r, _, _) = host::<Self>(r)?;
        let (w, _, _) = host::<Self>(w)?;
        let act = activation_dtype("x", dtype)?;
        let (sum, out) = reference::add_rms_norm(&x, &r, &w, eps, act);
        let sum: Vec<f64> = sum.iter().map(|&v| v as f64).collect();
        Ok((
            device::<Self>(&sum, shape.clone(), dtype, &dev)?,
            device::<Self>(&out, shape, dtype, &dev)?,
        ))
    }

    fn layer_swiglu(gate_up: FloatTensor<Self>) -> Result<FloatTensor<Self>> {
        let dev = device_of::<Self>(&gate_up);
        let (gu, shape, dtype) = host::<Self>(gate_up)?;
        let ff = shape[1] / 2;
        device::<Self>(&reference::swiglu(&gu, ff), vec![shape[0], ff], dtype, &dev)
    }

    fn layer_rope_qkv(
        qkv: FloatTensor<Self>,
        batch: &HostBatch,
        table: FloatTensor<Self>,
        heads: QkvHeads,
        rope_dims: usize,
    ) -> Result<[FloatTensor<Self>; 3]> {
        let dev = device_of::<Self>(&qkv);
        let (x, shape, dtype) = host::<Self>(qkv)?;
        let (table, _, _) = host::<Self>(table)?;
        let n = shape[0];
        let (q, k, v) = reference::rope_qkv(&x, n, shape[1], &batch.meta, &table, rope_dims, heads);
        let d = heads.head_dim;
        // Rows of no sequence are NaN (the GPU leaves them unwritten).
        let side = |vals: &[f64], h: usize| device::<Self>(vals, vec![n, h, d], dtype, &dev);
        Ok([
            side(&q, heads.q_heads)?,
            side(&k, heads.kv_heads)?,
            side(&v, heads.kv_heads)?,
        ])
    }

    fn layer_gemv(x: FloatTensor<Self>, w: FloatTensor<Self>) -> Result<FloatTensor<Self>> {
        // Burn's own matmul: the CPU path needs no kernel of its own.
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        let w = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(w));
        Ok(x.matmul(w.transpose()).into_primitive().tensor())
    }

    fn layer_argmax(x: FloatTensor<Self>) -> Result<burn_tensor::ops::IntTensor<Self>> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        let rows = x.dims()[0];
        Ok(x.argmax(1).reshape([rows]).into_primitive())
    }
}
