//! [`LayerBackend`] for `Fusion<B>`: each operation is one custom operation of the fusion
//! stream that runs `B`'s implementation on the inner tensors (the pattern of
//! `crate::burn::fusion`, burn-vision 0.21's).

use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use burn_tensor::{DType, Shape};

use super::LayerBackend;
use crate::error::Result;
use crate::model::layer::QkvHeads;

type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;
type FTensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;

/// What one custom operation computes, with its non-tensor arguments.
#[derive(Debug)]
enum Kind<P> {
    Norm {
        eps: f32,
    },
    AddNorm {
        eps: f32,
    },
    Swiglu,
    Gemv,
    Argmax,
    Rope {
        batch: P,
        heads: QkvHeads,
        rope_dims: usize,
    },
}

#[derive(Debug)]
struct LayerOp<B: FusionBackend + LayerBackend> {
    desc: CustomOpIr,
    kind: Kind<B::KvBatchPrimitive>,
}

/// An error at execution time: the stream cannot hand it back, so it is the panic message.
fn or_panic<T>(op: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("fp8kv {op} (fused): {e}"))
}

impl<B: FusionBackend + LayerBackend> Operation<B::FusionRuntime> for LayerOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let desc = &self.desc;
        let get = |h: &mut Handles<B>, ir: &TensorIr| h.get_float_tensor::<B>(ir);
        match &self.kind {
            Kind::Norm { eps } => {
                let ([x, w], [out]) = desc.as_fixed();
                let (x, w) = (get(handles, x), get(handles, w));
                let o = or_panic("rms_norm", B::layer_rms_norm(x, w, *eps));
                handles.register_float_tensor::<B>(&out.id, o);
            }
            Kind::AddNorm { eps } => {
                let ([x, r, w], [sum, out]) = desc.as_fixed();
                let (x, r, w) = (get(handles, x), get(handles, r), get(handles, w));
                let (s, o) = or_panic("add_rms_norm", B::layer_add_rms_norm(x, r, w, *eps));
                handles.register_float_tensor::<B>(&sum.id, s);
                handles.register_float_tensor::<B>(&out.id, o);
            }
            Kind::Swiglu => {
                let ([gu], [out]) = desc.as_fixed();
                let o = or_panic("swiglu", B::layer_swiglu(get(handles, gu)));
                handles.register_float_tensor::<B>(&out.id, o);
            }
            Kind::Gemv => {
                let ([x, w], [out]) = desc.as_fixed();
                let (x, w) = (get(handles, x), get(handles, w));
                let o = or_panic("gemv", B::layer_gemv(x, w));
                handles.register_float_tensor::<B>(&out.id, o);
            }
            Kind::Argmax => {
                let ([x], [out]) = desc.as_fixed();
                let o = or_panic("argmax", B::layer_argmax(get(handles, x)));
                handles.register_int_tensor::<B>(&out.id, o);
            }
            Kind::Rope {
                batch,
                heads,
                rope_dims,
            } => {
                let ([qkv, table], outs) = desc.as_fixed::<2, 3>();
                let (qkv, table) = (get(handles, qkv), get(handles, table));
                let res = B::layer_rope_qkv(qkv, batch, table, *heads, *rope_dims);
                for (ir, t) in outs.iter().zip(or_panic("rope_qkv", res)) {
                    handles.register_float_tensor::<B>(&ir.id, t);
                }
            }
        }
    }
}

/// Registers `kind` over `inputs` with outputs of these shapes (all of `dtype`).
fn register<B: FusionBackend + LayerBackend>(
    name: &'static str,
    inputs: Vec<FTensor<B>>,
    outputs: &[Vec<usize>],
    dtype: DType,
    kind: Kind<B::KvBatchPrimitive>,
) -> Vec<FTensor<B>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outputs: Vec<TensorIr> = outputs
        .iter()
        .map(|s| TensorIr::uninit(client.create_empty_handle(), Shape::from(s.clone()), dtype))
        .collect();
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    let op = LayerOp::<B> {
        desc: desc.clone(),
        kind,
    };
    client.register(streams, OperationIr::Custom(desc), op)
}

fn one<T>(v: Vec<T>) -> T {
    v.into_iter()
        .next()
        .expect("a custom op returns its outputs")
}

impl<B: FusionBackend + LayerBackend> LayerBackend for Fusion<B> {
    fn layer_rms_norm(x: FTensor<B>, w: FTensor<B>, eps: f32) -> Result<FTensor<B>> {
        let (shape, dtype) = (x.shape.to_vec(), x.dtype);
        Ok(one(register::<B>(
            "fp8kv_rms_norm",
            vec![x, w],
            &[shape],
            dtype,
            Kind::Norm { eps },
        )))
    }

    fn layer_add_rms_norm(
        x: FTensor<B>,
        r: FTensor<B>,
        w: FTensor<B>,
        eps: f32,
    ) -> Result<(FTensor<B>, FTensor<B>)> {
        let (shape, dtype) = (x.shape.to_vec(), x.dtype);
        let mut outs = register::<B>(
            "fp8kv_add_rms_norm",
            vec![x, r, w],
            &[shape.clone(), shape],
            dtype,
            Kind::AddNorm { eps },
        )
        .into_iter();
        match (outs.next(), outs.next()) {
            (Some(s), Some(o)) => Ok((s, o)),
            _ => unreachable!("add_rms_norm registers two outputs"),
        }
    }

    fn layer_swiglu(gate_up: FTensor<B>) -> Result<FTensor<B>> {
        let dims = gate_up.shape.to_vec();
        let dtype = gate_up.dtype;
        Ok(one(register::<B>(
            "fp8kv_swiglu",
            vec![gate_up],
            &[vec![dims[0], dims[1] / 2]],
            dtype,
            Kind::Swiglu,
        )))
    }

    fn layer_rope_qkv(
        qkv: FTensor<B>,
        batch: &Self::KvBatchPrimitive,
        table: FTensor<B>,
        heads: QkvHeads,
        rope_dims: usize,
    ) -> Result<[FTensor<B>; 3]> {
        let (n, dtype, d) = (qkv.shape.to_vec()[0], qkv.dtype, heads.head_dim);
        let outs = register::<B>(
            "fp8kv_rope_qkv",
            vec![qkv, table],
            &[
                vec![n, heads.q_heads, d],
                vec![n, heads.kv_heads, d],
                vec![n, heads.kv_heads, d],
            ],
            dtype,
            Kind::Rope {
                batch: batch.clone(),
                heads,
                rope_dims,
            },
        );
        let [q, k, v]: [FTensor<B>; 3] = outs
            .try_into()
            .unwrap_or_else(|_| unreachable!("rope_qkv registers three outputs"));
        Ok([q, k, v])
    }

    fn layer_gemv(x: FTensor<B>, w: FTensor<B>) -> Result<FTensor<B>> {
        let (rows, outputs, dtype) = (x.shape.to_vec()[0], w.shape.to_vec()[0], x.dtype);
        Ok(one(register::<B>(
            "fp8kv_gemv",
            vec![x, w],
            &[vec![rows, outputs]],
            dtype,
            Kind::Gemv,
        )))
    }

    fn layer_argmax(x: FTensor<B>) -> Result<FTensor<B>> {
        use burn_tensor::Element;
        let rows = x.shape.to_vec()[0];
        Ok(one(register::<B>(
            "fp8kv_argmax",
            vec![x],
            &[vec![rows]],
            <B::IntElem as Element>::dtype(),
            Kind::Argmax,
        )))
    }
}
