//! [`PagedKvBackend`] for `CubeBackend<CudaRuntime, ..>`: the library's validated entry points
//! on the Burn tensors' own buffers (no copies, except an activation whose rows are not
//! `[heads, dim]`-contiguous, which Burn makes contiguous first).

use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use burn_tensor::{DType, Shape};
use cubecl::cuda::CudaRuntime;
use cubecl::Runtime;

use super::{
    activation_dtype, burn_dtype, flatten_shape, side_shape, AttentionOptions, CachePrimitive,
    CacheSpec, FlattenLayout, KvCachePrimitive, PagedKvBackend,
};
use fp8kv::device::{check_dtype_support, DeviceBatch, DeviceRows, PagedKvCache};
use fp8kv::error::{KvSide, Result};
use fp8kv::kernels::stats::{kv_stats, DeviceKvStats, KvStats};
use fp8kv::kernels::{decode, fill, flatten};
use fp8kv::layout::{BatchMetadata, PagedKvLayout};
use fp8kv::policy::{Dtype, QuantPolicy};
use fp8kv::rope::QkvHeads;
use fp8kv::scales::KvScales;

type Cube<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

fn side_tensor<F: FloatElement, I: IntElement, BT: BoolElement>(
    side: &CachePrimitive<Cube<F, I, BT>>,
) -> &CubeTensor<CudaRuntime> {
    match side {
        CachePrimitive::Codes(t) | CachePrimitive::Values(t) => t,
    }
}

/// The library's view of the cache storage: the same buffers, no copy.
fn library_cache<F: FloatElement, I: IntElement, BT: BoolElement>(
    cache: &KvCachePrimitive<Cube<F, I, BT>>,
    spec: &CacheSpec,
) -> Result<PagedKvCache<CudaRuntime>> {
    let (k, v) = (side_tensor(&cache.k), side_tensor(&cache.v));
    PagedKvCache::from_handles(
        &k.client,
        *spec.layout(),
        spec.policy(),
        spec.dtype(),
        spec.scales(),
        k.handle.clone(),
        v.handle.clone(),
    )
}

/// `[rows, heads, dim]` activations as library rows: the tensor's own buffer when each row's
/// `[heads, dim]` block is contiguous (any row stride, e.g. a slice of a fused QKV output),
/// otherwise a contiguous copy by the library's gather (`kernels::gather`), which reads only
/// the elements the shape addresses. Burn's CUDA allocator pads each innermost row of a new
/// tensor to a power-of-two pitch of at most 256 bytes, so head dims whose rows are not a
/// multiple of that (d80 and d96 in f16/bf16, the MLA dims) arrive with a head stride of the
/// pitch and take the copy (`gpu_burn_pitched_activations_are_copied_exactly` pins Burn's
/// layout). Burn's own `into_contiguous` would read the unwritten padding at the buffer's end.
fn rows(t: CubeTensor<CudaRuntime>) -> Result<DeviceRows<CudaRuntime>> {
    let dtype = activation_dtype("activation", t.dtype)?;
    let [n, heads, dim] = t.meta.shape().dims::<3>();
    let strides = t.meta.strides().to_vec();
    let row_elems = heads * dim;
    let packed = (dim == 1 || strides[2] == 1) && (heads == 1 || strides[1] == dim);
    if packed && (n <= 1 || strides[0] >= row_elems) {
        let stride = if n <= 1 { row_elems } else { strides[0] };
        return DeviceRows::from_handle(&t.client, t.handle, dtype, n, row_elems, stride);
    }
    fp8kv::extend::gather_rows(
        &t.client,
        t.handle,
        dtype,
        [n, heads, dim],
        [strides[0], strides[1], strides[2]],
    )
}

/// Contiguous rows of a new tensor of `shape` wrapped as a Burn tensor.
fn to_tensor(
    out: DeviceRows<CudaRuntime>,
    client: &cubecl::client::ComputeClient<CudaRuntime>,
    device: &<CudaRuntime as Runtime>::Device,
    shape: [usize; 3],
) -> Result<CubeTensor<CudaRuntime>> {
    let dtype = burn_dtype(out.dtype())?;
    Ok(CubeTensor::new_contiguous(
        client.clone(),
        device.clone(),
        Shape::new(shape),
        out.into_handle(),
        dtype,
    ))
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> PagedKvBackend for Cube<F, I, BT> {
    type KvBatchPrimitive = DeviceBatch<CudaRuntime>;

    fn kv_batch(
        meta: BatchMetadata,
        layout: &PagedKvLayout,
        num_tokens: Option<usize>,
        device: &Self::Device,
    ) -> Result<Self::KvBatchPrimitive> {
        let client = CudaRuntime::client(device);
        match num_tokens {
            Some(n) => DeviceBatch::new(&client, meta, layout, n),
            None => DeviceBatch::for_reads(&client, meta, layout),
        }
    }

    fn kv_cache_empty(spec: &CacheSpec, device: &Self::Device) -> Result<KvCachePrimitive<Self>> {
        let client = CudaRuntime::client(device);
        check_dtype_support(&client, spec.dtype())?;
        let side = |side| {
            let shape = side_shape(spec.layout(), side);
            // Contiguous on purpose: `empty` may pad rows to a pitch the kernels do not know.
            match spec.dtype() {
                Dtype::E4m3 | Dtype::E5m2 => CachePrimitive::Codes(empty_device_contiguous_dtype(
                    client.clone(),
                    device.clone(),
                    shape,
                    DType::U8,
                )),
                half => CachePrimitive::Values(empty_device_contiguous_dtype(
                    client.clone(),
                    device.clone(),
                    shape,
                    if half == Dtype::F16 {
                        DType::F16
                    } else {
                        DType::BF16
                    },
                )),
            }
        };
        Ok(KvCachePrimitive {
            k: side(KvSide::K),
            v: side(KvSide::V),
        })
    }

    fn kv_fill(
        cache: &mut KvCachePrimitive<Self>,
        spec: &CacheSpec,
        k_new: CubeTensor<CudaRuntime>,
        v_new: CubeTensor<CudaRuntime>,
        batch: &Self::KvBatchPrimitive,
    ) -> Result<()> {
        let mut lib = library_cache(cache, spec)?;
        fill::fill(&mut lib, &rows(k_new)?, &rows(v_new)?, batch)
    }

    fn kv_fill_rope(
        cache: &mut KvCachePrimitive<Self>,
        spec: &CacheSpec,
        qkv: CubeTensor<CudaRuntime>,
        batch: &Self::KvBatchPrimitive,
        table: CubeTensor<CudaRuntime>,
        heads: QkvHeads,
        rope_dims: usize,
    ) -> Result<CubeTensor<CudaRuntime>> {
        let mut lib = library_cache(cache, spec)?;
        let n = qkv.meta.shape().dims::<3>()[0];
        let (client, device) = (qkv.client.clone(), qkv.device.clone());
        let (qkv, table) = (rows(qkv)?, rows(table)?);
        let qd = heads.q_heads * heads.head_dim;
        let mut q = DeviceRows::empty(&client, qkv.dtype(), n, qd, qd)?;
        fill::fill_rope(&mut lib, &qkv, batch, &table, heads, rope_dims, &mut q)?;
        to_tensor(q, &client, &device, [n, heads.q_heads, heads.head_dim])
    }

    fn kv_flatten(
        cache: &KvCachePrimitive<Self>,
        spec: &CacheSpec,
        batch: &Self::KvBatchPrimitive,
        total: usize,
        layout: FlattenLayout,
        dtype: Dtype,
    ) -> Result<(CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>)> {
        let lib = library_cache(cache, spec)?;
        let t = side_tensor(&cache.k);
        let (k, v) = flatten::flatten_new(&t.client, &lib, batch, layout, dtype)?;
        let shape = |side| flatten_shape(spec.layout(), side, total, layout);
        Ok((
            to_tensor(k, &t.client, &t.device, shape(KvSide::K))?,
            to_tensor(v, &t.client, &t.device, shape(KvSide::V))?,
        ))
    }

    fn kv_decode(
        q: CubeTensor<CudaRuntime>,
        cache: &KvCachePrimitive<Self>,
        spec: &CacheSpec,
        batch: &Self::KvBatchPrimitive,
        opts: &AttentionOptions,
    ) -> Result<CubeTensor<CudaRuntime>> {
        let lib = library_cache(cache, spec)?;
        let [n, num_heads, _] = q.meta.shape().dims::<3>();
        let (client, device) = (q.client.clone(), q.device.clone());
        let q = rows(q)?;
        let dv = spec.layout().head_dim_v();
        let mut out = DeviceRows::empty(&client, q.dtype(), n, num_heads * dv, num_heads * dv)?;
        decode::paged_decode(&q, &lib, batch, &opts.clone().into(), &mut out)?;
        to_tensor(out, &client, &device, [n, num_heads, dv])
    }

    fn kv_stats(
        k: CubeTensor<CudaRuntime>,
        v: CubeTensor<CudaRuntime>,
        scales: KvScales,
        policy: QuantPolicy,
    ) -> Result<KvStats> {
        let client = k.client.clone();
        let mut stats = DeviceKvStats::new(&client);
        kv_stats(&mut stats, &rows(k)?, &rows(v)?, &scales, policy)?;
        stats.read()
    }
}
