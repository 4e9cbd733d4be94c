//! [`LayerBackend`] for `Fusion<B>`: each operation is one custom operation of the fusion
//! stream that runs `B`'s implementation on the inner tensors (the pattern of
//! `fp8kv_burn::fusion`, burn-vision 0.21's).

use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use burn_tensor::TensorPrimitive::Float;
use burn_tensor::{DType, Shape};

use super::{BlockConfig, BlockWeights, LayerBackend};
use crate::layer::QkvHeads;
use fp8kv::error::Result;
use fp8kv_burn::fusion::{cache_outputs, inner_cache, register_side, side_tensor, wrap_side};
use fp8kv_burn::{CacheSpec, KvCachePrimitive};

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
    GemvSwiglu,
    Argmax,
    Rope {
        batch: P,
        heads: QkvHeads,
        rope_dims: usize,
    },
    /// A whole decoder block; inputs `x, [pending], attn_norm, wqkv, wo, ffn_norm, w_gate_up,
    /// w_down, table, k_cache, v_cache`, outputs `x', mlp, k_cache', v_cache'`.
    Block {
        batch: P,
        spec: CacheSpec,
        pending: bool,
        block: Box<BlockConfig>,
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
            Kind::GemvSwiglu => {
                let ([x, w], [out]) = desc.as_fixed();
                let (x, w) = (get(handles, x), get(handles, w));
                let o = or_panic("gemv_swiglu", B::layer_gemv_swiglu(x, w));
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
            Kind::Block {
                batch,
                spec,
                pending,
                block,
            } => {
                let ins = &desc.inputs;
                let n = ins.len();
                let floats: Vec<_> = ins[..n - 2].iter().map(|ir| get(handles, ir)).collect();
                let mut f = floats.into_iter();
                let mut next = || f.next().expect("a decoder block's inputs");
                let x = next();
                let mlp = pending.then(&mut next);
                let attn_norm = burn_tensor::Tensor::from_primitive(Float(next()));
                let wqkv = burn_tensor::Tensor::from_primitive(Float(next()));
                let wo = burn_tensor::Tensor::from_primitive(Float(next()));
                let ffn_norm = burn_tensor::Tensor::from_primitive(Float(next()));
                let w_gate_up = burn_tensor::Tensor::from_primitive(Float(next()));
                let w_down = burn_tensor::Tensor::from_primitive(Float(next()));
                let table = next();
                let w = BlockWeights {
                    attn_norm,
                    wqkv,
                    wo,
                    ffn_norm,
                    w_gate_up,
                    w_down,
                };
                let mut cache = inner_cache::<B>(handles, &ins[n - 2], &ins[n - 1], spec);
                let [x, mlp] = or_panic(
                    "decoder block",
                    B::layer_decode_block(x, mlp, &w, &mut cache, spec, batch, table, block),
                );
                let outs = &desc.outputs;
                handles.register_float_tensor::<B>(&outs[0].id, x);
                handles.register_float_tensor::<B>(&outs[1].id, mlp);
                register_side::<B>(handles, &outs[2], cache.k);
                register_side::<B>(handles, &outs[3], cache.v);
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

    fn layer_decode_block(
        x: FTensor<B>,
        pending: Option<FTensor<B>>,
        w: &BlockWeights<Self>,
        cache: &mut KvCachePrimitive<Self>,
        spec: &CacheSpec,
        batch: &Self::KvBatchPrimitive,
        table: FTensor<B>,
        block: &BlockConfig,
    ) -> Result<[FTensor<B>; 2]> {
        let (shape, dtype) = (x.shape.clone(), x.dtype);
        let client = x.client.clone();
        let prim = |t: &burn_tensor::Tensor<Self, 2>| t.clone().into_primitive().tensor();
        let prim1 = |t: &burn_tensor::Tensor<Self, 1>| t.clone().into_primitive().tensor();
        let has_pending = pending.is_some();
        let mut inputs = vec![x];
        inputs.extend(pending);
        inputs.extend([
            prim1(&w.attn_norm),
            prim(&w.wqkv),
            prim(&w.wo),
            prim1(&w.ffn_norm),
            prim(&w.w_gate_up),
            prim(&w.w_down),
            table,
        ]);
        let (k_cache, v_cache) = (side_tensor::<B>(&cache.k), side_tensor::<B>(&cache.v));
        inputs.extend([k_cache.clone(), v_cache.clone()]);
        let streams = OperationStreams::with_inputs(inputs.iter());
        let act = |_| TensorIr::uninit(client.create_empty_handle(), shape.clone(), dtype);
        let [k_out, v_out] = cache_outputs::<B>(&client, spec);
        let outputs = [act(0), act(1), k_out, v_out];
        let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new("fp8kv_decode_block", &inputs, &outputs);
        let op = LayerOp::<B> {
            desc: desc.clone(),
            kind: Kind::Block {
                batch: batch.clone(),
                spec: *spec,
                pending: has_pending,
                block: Box::new(block.clone()),
            },
        };
        let mut outs = client
            .register(streams, OperationIr::Custom(desc), op)
            .into_iter();
        let (Some(x), Some(mlp), Some(k), Some(v)) =
            (outs.next(), outs.next(), outs.next(), outs.next())
        else {
            unreachable!("a decoder block registers four outputs")
        };
        // The old cache ids are dropped here; their buffers live on under the outputs' ids.
        *cache = KvCachePrimitive {
            k: wrap_side::<B>(spec, k),
            v: wrap_side::<B>(spec, v),
        };
        Ok([x, mlp])
    }

    fn layer_gemv_swiglu(x: FTensor<B>, w: FTensor<B>) -> Result<FTensor<B>> {
        let (rows, ff, dtype) = (x.shape.to_vec()[0], w.shape.to_vec()[0] / 2, x.dtype);
        Ok(one(register::<B>(
            "fp8kv_gemv_swiglu",
            vec![x, w],
            &[vec![rows, ff]],
            dtype,
            Kind::GemvSwiglu,
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
