//! [`PagedKvBackend`] for Burn's NdArray backend through the CPU reference kernels
//! ([`fp8kv::reference`]): Burn code written against the extension runs and is tested on a
//! machine without a GPU. Each call reads the cache into host bytes and writes it back, so it
//! is slow for large caches; the results are the reference's, exactly.

use burn_ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray,
};
use burn_tensor::backend::Backend;
use burn_tensor::{DType, Int, Tensor, TensorData, TensorPrimitive};

use super::{
    burn_dtype, flatten_shape, read_storage, side_shape, tensor_data, AttentionOptions,
    CachePrimitive, CacheSpec, FlattenLayout, KvCachePrimitive, PagedKvBackend,
};
use fp8kv::error::{Fp8KvError, KvSide, Result};
use fp8kv::kernels::stats::{reference_stats, KvStats};
use fp8kv::layout::{BatchMetadata, PagedKvLayout};
use fp8kv::policy::{Dtype, QuantPolicy};
use fp8kv::reference::{self, HostKvCache, HostRows};
use fp8kv::rope::{QkvHeads, RopeTable};
use fp8kv::scales::KvScales;

/// A step's metadata on the host, validated, as the reference kernels read it.
#[derive(Debug, Clone)]
pub struct HostBatch {
    /// The metadata.
    pub meta: BatchMetadata,
    /// Packed new tokens (`None`: validated for reads only).
    pub num_tokens: Option<usize>,
}

/// A float tensor's values as f32, in row-major order.
fn values<B: Backend>(t: burn_tensor::ops::FloatTensor<B>) -> Result<Vec<f32>> {
    tensor_data(Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(t)))?
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| Fp8KvError::Runtime(format!("reading activations failed: {e:?}")))
}

fn float_tensor<B: Backend>(
    values: Vec<f32>,
    shape: [usize; 3],
    dtype: DType,
    device: &B::Device,
) -> burn_tensor::ops::FloatTensor<B> {
    Tensor::<B, 3>::from_data(TensorData::new(values, shape), (device, dtype))
        .into_primitive()
        .tensor()
}

fn written(batch: &HostBatch, op: &str) -> Result<usize> {
    batch.num_tokens.ok_or_else(|| {
        Fp8KvError::InvalidOption(format!("{op} needs a batch validated for writing"))
    })
}

type Nd<E, I, Q> = NdArray<E, I, Q>;

fn host_cache<B: Backend>(cache: &KvCachePrimitive<B>, spec: &CacheSpec) -> Result<HostKvCache> {
    let mut host = HostKvCache::new(*spec, 0)?;
    host.k = read_storage::<B>(&cache.k, spec.dtype())?;
    host.v = read_storage::<B>(&cache.v, spec.dtype())?;
    Ok(host)
}

/// One side's storage from host bytes: codes as U8, unquantized values as f32 (NdArray has no
/// half floats; the values are already rounded to the cache dtype, so they are the same).
fn storage<B: Backend>(
    bytes: &[u8],
    spec: &CacheSpec,
    side: KvSide,
    device: &B::Device,
) -> CachePrimitive<B> {
    let shape = side_shape(spec.layout(), side);
    match spec.dtype().fp8_format() {
        Some(_) => CachePrimitive::Codes(
            Tensor::<B, 4, Int>::from_data(
                TensorData::new(bytes.to_vec(), shape),
                (device, DType::U8),
            )
            .into_primitive(),
        ),
        None => {
            let es = spec.dtype().size_bytes();
            let vals: Vec<f32> = bytes
                .chunks_exact(es)
                .map(|b| spec.dtype().load(b))
                .collect();
            CachePrimitive::Values(
                Tensor::<B, 4>::from_data(TensorData::new(vals, shape), (device, DType::F32))
                    .into_primitive()
                    .tensor(),
            )
        }
    }
}

fn host_to_storage<B: Backend>(
    host: &HostKvCache,
    spec: &CacheSpec,
    device: &B::Device,
) -> KvCachePrimitive<B> {
    KvCachePrimitive {
        k: storage::<B>(&host.k, spec, KvSide::K, device),
        v: storage::<B>(&host.v, spec, KvSide::V, device),
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> PagedKvBackend for Nd<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    type KvBatchPrimitive = HostBatch;

    fn kv_batch(
        meta: BatchMetadata,
        layout: &PagedKvLayout,
        num_tokens: Option<usize>,
        _device: &Self::Device,
    ) -> Result<HostBatch> {
        match num_tokens {
            Some(n) => meta.validate(layout, n)?,
            None => meta.validate_reads(layout)?,
        }
        Ok(HostBatch { meta, num_tokens })
    }

    fn kv_cache_empty(spec: &CacheSpec, device: &Self::Device) -> Result<KvCachePrimitive<Self>> {
        let host = HostKvCache::new(*spec, 0)?;
        Ok(host_to_storage::<Self>(&host, spec, device))
    }

    fn kv_fill(
        cache: &mut KvCachePrimitive<Self>,
        spec: &CacheSpec,
        k_new: NdArrayTensor,
        v_new: NdArrayTensor,
        batch: &HostBatch,
    ) -> Result<()> {
        let num_tokens = written(batch, "fill")?;
        let layout = spec.layout();
        let heads = layout.num_kv_heads();
        let (k, v) = (values::<Self>(k_new)?, values::<Self>(v_new)?);
        let mut host = host_cache::<Self>(cache, spec)?;
        reference::fill(
            &mut host,
            HostRows {
                data: &k,
                row_stride: heads * layout.head_dim_k(),
            },
            HostRows {
                data: &v,
                row_stride: heads * layout.head_dim_v(),
            },
            num_tokens,
            &batch.meta,
        )?;
        *cache = host_to_storage::<Self>(&host, spec, &Default::default());
        Ok(())
    }

    fn kv_fill_rope(
        cache: &mut KvCachePrimitive<Self>,
        spec: &CacheSpec,
        qkv: NdArrayTensor,
        batch: &HostBatch,
        table: NdArrayTensor,
        heads: QkvHeads,
        rope_dims: usize,
    ) -> Result<NdArrayTensor> {
        let num_tokens = written(batch, "fill_rope")?;
        let dtype = burn_tensor::TensorMetadata::dtype(&qkv);
        let act = super::activation_dtype("qkv", dtype)?;
        let positions = burn_tensor::TensorMetadata::shape(&table).dims::<3>()[0];
        let (qkv, table) = (values::<Self>(qkv)?, values::<Self>(table)?);
        let table = RopeTable::from_values(table, positions, heads.head_dim, rope_dims)?;
        let mut host = host_cache::<Self>(cache, spec)?;
        let q = reference::fill_rope(
            &mut host,
            HostRows {
                data: &qkv,
                row_stride: heads.row_elems(),
            },
            num_tokens,
            &batch.meta,
            &table,
            heads,
            act,
        )?;
        *cache = host_to_storage::<Self>(&host, spec, &Default::default());
        Ok(float_tensor::<Self>(
            q,
            [num_tokens, heads.q_heads, heads.head_dim],
            dtype,
            &Default::default(),
        ))
    }

    fn kv_stats(
        k: NdArrayTensor,
        v: NdArrayTensor,
        scales: KvScales,
        policy: QuantPolicy,
    ) -> Result<KvStats> {
        let row = |t: &NdArrayTensor| {
            let [n, heads, dim] = burn_tensor::TensorMetadata::shape(t).dims::<3>();
            (n, heads * dim)
        };
        let ((rows, kw), (v_rows, vw)) = (row(&k), row(&v));
        if rows != v_rows {
            return Err(Fp8KvError::ShapeMismatch {
                what: "v",
                expected: format!("{rows} rows, as k"),
                actual: format!("{v_rows} rows"),
            });
        }
        let (k, v) = (values::<Self>(k)?, values::<Self>(v)?);
        Ok(reference_stats(
            &k,
            &v,
            rows,
            (kw, kw),
            (vw, vw),
            &scales,
            policy,
        ))
    }

    fn kv_flatten(
        cache: &KvCachePrimitive<Self>,
        spec: &CacheSpec,
        batch: &HostBatch,
        total: usize,
        layout: FlattenLayout,
        dtype: Dtype,
    ) -> Result<(NdArrayTensor, NdArrayTensor)> {
        let host = host_cache::<Self>(cache, spec)?;
        let (k, v) = reference::flatten(&host, &batch.meta, layout, dtype)?;
        let shape = |side| flatten_shape(spec.layout(), side, total, layout);
        let (dt, device) = (burn_dtype(dtype)?, Default::default());
        Ok((
            float_tensor::<Self>(k, shape(KvSide::K), dt, &device),
            float_tensor::<Self>(v, shape(KvSide::V), dt, &device),
        ))
    }

    fn kv_decode(
        q: NdArrayTensor,
        cache: &KvCachePrimitive<Self>,
        spec: &CacheSpec,
        batch: &HostBatch,
        opts: &AttentionOptions,
    ) -> Result<NdArrayTensor> {
        let num_tokens = written(batch, "decode")?;
        let dtype = burn_tensor::TensorMetadata::dtype(&q);
        let [_, num_heads, _] = burn_tensor::TensorMetadata::shape(&q).dims::<3>();
        let act = super::activation_dtype("q", dtype)?;
        let q = values::<Self>(q)?;
        let host = host_cache::<Self>(cache, spec)?;
        let out = reference::paged_decode(&q, num_heads, &host, &batch.meta, num_tokens, opts)?;
        // The reference is f64; the output is rounded once to the query dtype, as on the GPU.
        let out: Vec<f32> = out.iter().map(|&x| act.round_trip(x as f32)).collect();
        Ok(float_tensor::<Self>(
            out,
            [num_tokens, num_heads, spec.layout().head_dim_v()],
            dtype,
            &Default::default(),
        ))
    }
}
