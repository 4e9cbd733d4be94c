//! [`PagedKvBackend`] for `Fusion<B>` (what `burn_cuda::Cuda` is with Burn's default
//! features): each operation is registered with the fusion stream as a custom operation that
//! runs `B`'s implementation on the inner tensors when the stream executes it, the pattern of
//! Burn's own extensions (burn-vision 0.21).
//!
//! The checks in [`super::KvCache`] run before anything is registered. An error that `B` still
//! reports at execution cannot be returned any more: it panics with the library's message.
//!
//! Fill takes the cache tensors as read-only inputs and registers the same buffers, written in
//! place by `B`, as its outputs; the cache then holds the outputs, and the old ids are dropped.
//!
//! The helpers below are public for crates that record their own custom operations over a
//! [`super::KvCache`]'s storage (`fp8kv-llama`'s fused decoder block is one).

use std::marker::PhantomData;

use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use burn_tensor::{DType, Shape};

use super::{
    burn_dtype, flatten_shape, side_shape, AttentionOptions, CachePrimitive, CacheSpec,
    FlattenLayout, KvCachePrimitive, PagedKvBackend,
};
use fp8kv::error::{KvSide, Result};
use fp8kv::kernels::stats::KvStats;
use fp8kv::layout::{BatchMetadata, PagedKvLayout};
use fp8kv::policy::{Dtype, QuantPolicy};
use fp8kv::rope::QkvHeads;
use fp8kv::scales::KvScales;

/// The fusion stream's handle container of backend `B`.
pub type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;
/// A tensor of the fusion stream over backend `B`.
pub type FTensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;

/// An error at execution time: the stream cannot hand it back, so it is the panic message.
fn or_panic<T>(op: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("fp8kv {op} (fused): {e}"))
}

/// The fusion tensor of one cache side (FP8 codes or values alike).
pub fn side_tensor<B: FusionBackend>(side: &CachePrimitive<Fusion<B>>) -> &FTensor<B> {
    match side {
        CachePrimitive::Codes(t) | CachePrimitive::Values(t) => t,
    }
}

/// The inner backend's primitive of one cache side, from the stream's handles.
fn inner_side<B: FusionBackend>(
    handles: &mut Handles<B>,
    ir: &TensorIr,
    spec: &CacheSpec,
) -> CachePrimitive<B> {
    match spec.dtype().fp8_format() {
        Some(_) => CachePrimitive::Codes(handles.get_int_tensor::<B>(ir)),
        None => CachePrimitive::Values(handles.get_float_tensor::<B>(ir)),
    }
}

/// The inner backend's K and V storage, from the stream's handles of the two sides.
pub fn inner_cache<B: FusionBackend>(
    handles: &mut Handles<B>,
    k: &TensorIr,
    v: &TensorIr,
    spec: &CacheSpec,
) -> KvCachePrimitive<B> {
    KvCachePrimitive {
        k: inner_side::<B>(handles, k, spec),
        v: inner_side::<B>(handles, v, spec),
    }
}

/// Hands one side's (updated) inner storage back to the stream as the tensor `ir`.
pub fn register_side<B: FusionBackend>(
    handles: &mut Handles<B>,
    ir: &TensorIr,
    side: CachePrimitive<B>,
) {
    match side {
        CachePrimitive::Codes(t) => handles.register_int_tensor::<B>(&ir.id, t),
        CachePrimitive::Values(t) => handles.register_float_tensor::<B>(&ir.id, t),
    }
}

/// Output descriptions of a cache's two sides.
pub fn cache_outputs<B: FusionBackend>(
    client: &burn_fusion::Client<B::FusionRuntime>,
    spec: &CacheSpec,
) -> [TensorIr; 2] {
    let dtype = match spec.dtype() {
        Dtype::E4m3 | Dtype::E5m2 => DType::U8,
        Dtype::F16 => DType::F16,
        _ => DType::BF16,
    };
    [KvSide::K, KvSide::V].map(|side| {
        TensorIr::uninit(
            client.create_empty_handle(),
            side_shape(spec.layout(), side),
            dtype,
        )
    })
}

/// A fusion tensor as the cache side of `spec`'s dtype.
pub fn wrap_side<B: FusionBackend>(spec: &CacheSpec, t: FTensor<B>) -> CachePrimitive<Fusion<B>> {
    match spec.dtype().fp8_format() {
        Some(_) => CachePrimitive::Codes(t),
        None => CachePrimitive::Values(t),
    }
}

fn two<B: FusionBackend>(outs: Vec<FTensor<B>>) -> (FTensor<B>, FTensor<B>) {
    let mut it = outs.into_iter();
    match (it.next(), it.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => unreachable!("a custom op with two outputs returns two tensors"),
    }
}

#[derive(Debug)]
struct EmptyOp<B: FusionBackend> {
    desc: CustomOpIr,
    spec: CacheSpec,
    device: B::Device,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + PagedKvBackend> Operation<B::FusionRuntime> for EmptyOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let ([], [k, v]) = self.desc.as_fixed();
        let cache = or_panic(
            "cache allocation",
            B::kv_cache_empty(&self.spec, &self.device),
        );
        register_side::<B>(handles, k, cache.k);
        register_side::<B>(handles, v, cache.v);
    }
}

#[derive(Debug)]
struct FillOp<B: FusionBackend + PagedKvBackend> {
    desc: CustomOpIr,
    spec: CacheSpec,
    batch: B::KvBatchPrimitive,
}

impl<B: FusionBackend + PagedKvBackend> Operation<B::FusionRuntime> for FillOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let ([k_cache, v_cache, k_new, v_new], [k_out, v_out]) = self.desc.as_fixed();
        let mut cache = inner_cache::<B>(handles, k_cache, v_cache, &self.spec);
        let (k_new, v_new) = (
            handles.get_float_tensor::<B>(k_new),
            handles.get_float_tensor::<B>(v_new),
        );
        or_panic(
            "fill",
            B::kv_fill(&mut cache, &self.spec, k_new, v_new, &self.batch),
        );
        register_side::<B>(handles, k_out, cache.k);
        register_side::<B>(handles, v_out, cache.v);
    }
}

#[derive(Debug)]
struct FillRopeOp<B: FusionBackend + PagedKvBackend> {
    desc: CustomOpIr,
    spec: CacheSpec,
    batch: B::KvBatchPrimitive,
    heads: QkvHeads,
    rope_dims: usize,
}

impl<B: FusionBackend + PagedKvBackend> Operation<B::FusionRuntime> for FillRopeOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let ([k_cache, v_cache, qkv, table], [k_out, v_out, q_out]) = self.desc.as_fixed();
        let mut cache = inner_cache::<B>(handles, k_cache, v_cache, &self.spec);
        let (qkv, table) = (
            handles.get_float_tensor::<B>(qkv),
            handles.get_float_tensor::<B>(table),
        );
        let q = or_panic(
            "fill_rope",
            B::kv_fill_rope(
                &mut cache,
                &self.spec,
                qkv,
                &self.batch,
                table,
                self.heads,
                self.rope_dims,
            ),
        );
        register_side::<B>(handles, k_out, cache.k);
        register_side::<B>(handles, v_out, cache.v);
        handles.register_float_tensor::<B>(&q_out.id, q);
    }
}

#[derive(Debug)]
struct FlattenOp<B: FusionBackend + PagedKvBackend> {
    desc: CustomOpIr,
    spec: CacheSpec,
    batch: B::KvBatchPrimitive,
    total: usize,
    layout: FlattenLayout,
    dtype: Dtype,
}

impl<B: FusionBackend + PagedKvBackend> Operation<B::FusionRuntime> for FlattenOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let ([k_cache, v_cache], [k_out, v_out]) = self.desc.as_fixed();
        let cache = inner_cache::<B>(handles, k_cache, v_cache, &self.spec);
        let (k, v) = or_panic(
            "flatten",
            B::kv_flatten(
                &cache,
                &self.spec,
                &self.batch,
                self.total,
                self.layout,
                self.dtype,
            ),
        );
        handles.register_float_tensor::<B>(&k_out.id, k);
        handles.register_float_tensor::<B>(&v_out.id, v);
    }
}

#[derive(Debug)]
struct DecodeOp<B: FusionBackend + PagedKvBackend> {
    desc: CustomOpIr,
    spec: CacheSpec,
    batch: B::KvBatchPrimitive,
    opts: AttentionOptions,
}

impl<B: FusionBackend + PagedKvBackend> Operation<B::FusionRuntime> for DecodeOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let ([q, k_cache, v_cache], [out]) = self.desc.as_fixed();
        let cache = inner_cache::<B>(handles, k_cache, v_cache, &self.spec);
        let q = handles.get_float_tensor::<B>(q);
        let o = or_panic(
            "decode",
            B::kv_decode(q, &cache, &self.spec, &self.batch, &self.opts),
        );
        handles.register_float_tensor::<B>(&out.id, o);
    }
}

impl<B: FusionBackend + PagedKvBackend> PagedKvBackend for Fusion<B> {
    type KvBatchPrimitive = B::KvBatchPrimitive;

    fn kv_batch(
        meta: BatchMetadata,
        layout: &PagedKvLayout,
        num_tokens: Option<usize>,
        device: &Self::Device,
    ) -> Result<Self::KvBatchPrimitive> {
        // Uploaded straight through the inner backend: the metadata is no tensor of the stream.
        B::kv_batch(meta, layout, num_tokens, device)
    }

    fn kv_cache_empty(spec: &CacheSpec, device: &Self::Device) -> Result<KvCachePrimitive<Self>> {
        let client = burn_fusion::get_client::<B>(device);
        let outputs = cache_outputs::<B>(&client, spec);
        let desc = CustomOpIr::new("fp8kv_cache_empty", &[], &outputs);
        let op = EmptyOp::<B> {
            desc: desc.clone(),
            spec: *spec,
            device: device.clone(),
            _b: PhantomData,
        };
        let (k, v) =
            two::<B>(client.register(OperationStreams::default(), OperationIr::Custom(desc), op));
        Ok(KvCachePrimitive {
            k: wrap_side::<B>(spec, k),
            v: wrap_side::<B>(spec, v),
        })
    }

    fn kv_fill(
        cache: &mut KvCachePrimitive<Self>,
        spec: &CacheSpec,
        k_new: FTensor<B>,
        v_new: FTensor<B>,
        batch: &Self::KvBatchPrimitive,
    ) -> Result<()> {
        let (k_cache, v_cache) = (side_tensor::<B>(&cache.k), side_tensor::<B>(&cache.v));
        let client = k_cache.client.clone();
        let streams = OperationStreams::with_inputs([k_cache, v_cache, &k_new, &v_new]);
        let outputs = cache_outputs::<B>(&client, spec);
        let inputs = [
            k_cache.clone().into_ir(),
            v_cache.clone().into_ir(),
            k_new.into_ir(),
            v_new.into_ir(),
        ];
        let desc = CustomOpIr::new("fp8kv_fill", &inputs, &outputs);
        let op = FillOp::<B> {
            desc: desc.clone(),
            spec: *spec,
            batch: batch.clone(),
        };
        let (k, v) = two::<B>(client.register(streams, OperationIr::Custom(desc), op));
        // The old ids are dropped here; their buffer lives on under the outputs' ids.
        *cache = KvCachePrimitive {
            k: wrap_side::<B>(spec, k),
            v: wrap_side::<B>(spec, v),
        };
        Ok(())
    }

    fn kv_fill_rope(
        cache: &mut KvCachePrimitive<Self>,
        spec: &CacheSpec,
        qkv: FTensor<B>,
        batch: &Self::KvBatchPrimitive,
        table: FTensor<B>,
        heads: QkvHeads,
        rope_dims: usize,
    ) -> Result<FTensor<B>> {
        let (k_cache, v_cache) = (side_tensor::<B>(&cache.k), side_tensor::<B>(&cache.v));
        let client = qkv.client.clone();
        let streams = OperationStreams::with_inputs([k_cache, v_cache, &qkv, &table]);
        let [k_out, v_out] = cache_outputs::<B>(&client, spec);
        let n = qkv.shape.dims::<3>()[0];
        let q_out = TensorIr::uninit(
            client.create_empty_handle(),
            Shape::new([n, heads.q_heads, heads.head_dim]),
            qkv.dtype,
        );
        let inputs = [
            k_cache.clone().into_ir(),
            v_cache.clone().into_ir(),
            qkv.into_ir(),
            table.into_ir(),
        ];
        let desc = CustomOpIr::new("fp8kv_fill_rope", &inputs, &[k_out, v_out, q_out]);
        let op = FillRopeOp::<B> {
            desc: desc.clone(),
            spec: *spec,
            batch: batch.clone(),
            heads,
            rope_dims,
        };
        let mut outs = client
            .register(streams, OperationIr::Custom(desc), op)
            .into_iter();
        let (Some(k), Some(v), Some(q)) = (outs.next(), outs.next(), outs.next()) else {
            unreachable!("fill_rope registers three outputs")
        };
        // The old ids are dropped here; their buffer lives on under the outputs' ids.
        *cache = KvCachePrimitive {
            k: wrap_side::<B>(spec, k),
            v: wrap_side::<B>(spec, v),
        };
        Ok(q)
    }

    fn kv_flatten(
        cache: &KvCachePrimitive<Self>,
        spec: &CacheSpec,
        batch: &Self::KvBatchPrimitive,
        total: usize,
        layout: FlattenLayout,
        dtype: Dtype,
    ) -> Result<(FTensor<B>, FTensor<B>)> {
        let (k_cache, v_cache) = (side_tensor::<B>(&cache.k), side_tensor::<B>(&cache.v));
        let client = k_cache.client.clone();
        let streams = OperationStreams::with_inputs([k_cache, v_cache]);
        let dt = burn_dtype(dtype)?;
        let out = |side| {
            let shape = Shape::new(flatten_shape(spec.layout(), side, total, layout));
            TensorIr::uninit(client.create_empty_handle(), shape, dt)
        };
        let outputs = [out(KvSide::K), out(KvSide::V)];
        let inputs = [k_cache.clone().into_ir(), v_cache.clone().into_ir()];
        let desc = CustomOpIr::new("fp8kv_flatten", &inputs, &outputs);
        let op = FlattenOp::<B> {
            desc: desc.clone(),
            spec: *spec,
            batch: batch.clone(),
            total,
            layout,
            dtype,
        };
        Ok(two::<B>(client.register(
            streams,
            OperationIr::Custom(desc),
            op,
        )))
    }

    fn kv_decode(
        q: FTensor<B>,
        cache: &KvCachePrimitive<Self>,
        spec: &CacheSpec,
        batch: &Self::KvBatchPrimitive,
        opts: &AttentionOptions,
    ) -> Result<FTensor<B>> {
        let (k_cache, v_cache) = (side_tensor::<B>(&cache.k), side_tensor::<B>(&cache.v));
        let client = q.client.clone();
        let streams = OperationStreams::with_inputs([&q, k_cache, v_cache]);
        let [n, heads, _] = q.shape.dims::<3>();
        let out = TensorIr::uninit(
            client.create_empty_handle(),
            Shape::new([n, heads, spec.layout().head_dim_v()]),
            q.dtype,
        );
        let inputs = [
            q.into_ir(),
            k_cache.clone().into_ir(),
            v_cache.clone().into_ir(),
        ];
        let desc = CustomOpIr::new("fp8kv_decode", &inputs, &[out]);
        let op = DecodeOp::<B> {
            desc: desc.clone(),
            spec: *spec,
            batch: batch.clone(),
            opts: opts.clone(),
        };
        let mut outs = client.register(streams, OperationIr::Custom(desc), op);
        Ok(outs.remove(0))
    }

    fn kv_stats(
        k: FTensor<B>,
        v: FTensor<B>,
        scales: KvScales,
        policy: QuantPolicy,
    ) -> Result<KvStats> {
        // The result is read back anyway: run the stream up to K and V, then the inner
        // backend's kernel on them.
        let client = k.client.clone();
        let k = client.resolve_tensor_float::<B>(k);
        let v = client.resolve_tensor_float::<B>(v);
        B::kv_stats(k, v, scales, policy)
    }
}
