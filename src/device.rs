//! Device-side types every kernel takes: a CUDA client, the paged cache, the per-step batch
//! metadata and activation rows, plus the `Dtype → StorageType` mapping.
//!
//! - [`cuda_client`] returns [`Fp8KvError::NoDevice`] instead of panicking when there is no
//!   driver or no device (cudarc loads `libcuda` dynamically; we probe for it first).
//!   [`check_dtype_support`] returns [`Fp8KvError::Fp8Unsupported`] when the device cannot
//!   convert to/from FP8 (compute capability < 8.9).
//! - [`PagedKvCache`]: one layer's K and V caches (`layout.shape(side)` elements of the cache
//!   dtype each, FP8 as 1-byte elements, no per-token metadata) plus its [`KvScales`].
//! - [`DeviceBatch`]: [`BatchMetadata`] validated against a layout and uploaded **once per
//!   engine step** into **one** `i32` buffer, reused by every layer's fill, flatten and decode.
//!   Its sections (offsets in `i32` elements, see [`DeviceBatch::offsets`]):
//!   `q_start_loc[batch] | q_seq_length[batch] | kv_seqlens[batch] | kv_start_loc[batch + 1] |
//!   block_table[batch * max_pages_per_seq]`. `kv_start_loc` is the exclusive prefix sum of
//!   `kv_seqlens` (with the total last), computed on the host during the upload: it is where each
//!   sequence starts in a flattened `[.., total_kv_tokens, ..]` tensor
//!   ([`crate::contract::flatten_start_loc`]).
//! - [`DeviceRows`]: activation rows (new K/V, queries, flatten outputs) of an activation dtype:
//!   `rows` rows of `row_elems` elements, `row_stride` elements apart (a stride above
//!   `row_elems` is a slice of a fused QKV projection).
//!
//! Uploads and downloads from/to host types exist for tests and tools; an engine keeps its
//! tensors on the device and wraps existing handles with the `from_handle` constructors.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cubecl::client::ComputeClient;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::features::TypeUsage;
use cubecl::ir::{ElemType, FloatKind, StorageType};
use cubecl::server::Handle;
use cubecl::Runtime;

use crate::contract::CacheSpec;
use crate::error::{checked_product, checked_rows_span, Fp8KvError, KvSide, Result};
use crate::layout::{BatchMetadata, PagedKvLayout};
use crate::policy::{Dtype, QuantPolicy};
use crate::reference::HostKvCache;
use crate::scales::KvScales;

/// The CUDA runtime of CubeCL, re-exported so users need not depend on `cubecl` for the name.
pub type Cuda = CudaRuntime;

/// Creates a client for CUDA device 0.
///
/// Returns [`Fp8KvError::NoDevice`] (never panics) when `libcuda` cannot be loaded, the driver
/// fails to initialise, or it reports no device. The client is cheap to clone; creating it
/// again returns a client on the same server.
pub fn cuda_client() -> Result<ComputeClient<CudaRuntime>> {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library by its usual names
    // (no CUDA call is made through a library that may be absent); it touches no memory of
    // ours.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Fp8KvError::NoDevice(
            "the CUDA driver library (libcuda) was not found".into(),
        ));
    }
    cudarc::driver::result::init()
        .map_err(|e| Fp8KvError::NoDevice(format!("cuInit failed: {e:?}")))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| Fp8KvError::NoDevice(format!("cuDeviceGetCount failed: {e:?}")))?;
    if count < 1 {
        return Err(Fp8KvError::NoDevice("the driver reports no device".into()));
    }
    // CubeCL unwraps driver errors while it sets the server up; keep a panic there from
    // taking the caller down.
    catch_unwind(AssertUnwindSafe(|| {
        CudaRuntime::client(&CudaDevice::new(0))
    }))
    .map_err(|p| Fp8KvError::NoDevice(format!("client creation panicked: {}", panic_text(&p))))
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".into()
    }
}

/// The CubeCL storage type of a dtype (FP8 as `ElemType::Float(FloatKind::E4M3 / E5M2)`):
/// what the kernels' `#[define]` generics are bound to at launch.
pub fn storage_type(dtype: Dtype) -> StorageType {
    let kind = match dtype {
        Dtype::F32 => FloatKind::F32,
        Dtype::F16 => FloatKind::F16,
        Dtype::Bf16 => FloatKind::BF16,
        Dtype::E4m3 => FloatKind::E4M3,
        Dtype::E5m2 => FloatKind::E5M2,
    };
    ElemType::Float(kind).into()
}

/// Checks that the device can store and convert `dtype`: for FP8 the runtime must register
/// conversion and buffer use (CubeCL's CUDA runtime does from compute capability 8.9 on),
/// otherwise [`Fp8KvError::Fp8Unsupported`]. Activation dtypes and f16/bf16 always pass.
pub fn check_dtype_support<R: Runtime>(client: &ComputeClient<R>, dtype: Dtype) -> Result<()> {
    if dtype.fp8_format().is_none() {
        return Ok(());
    }
    let usage = client.properties().type_usage(storage_type(dtype));
    let need = TypeUsage::Conversion | TypeUsage::Buffer;
    if usage.is_superset(need) {
        Ok(())
    } else {
        Err(Fp8KvError::Fp8Unsupported(format!(
            "the runtime does not register {dtype} conversion + buffer use (needs compute capability >= 8.9)"
        )))
    }
}

/// Reads a whole handle back as bytes.
fn read_bytes<R: Runtime>(client: &ComputeClient<R>, handle: &Handle) -> Result<Vec<u8>> {
    client
        .read_one(handle.clone())
        .map(|b| b.to_vec())
        .map_err(|e| Fp8KvError::Runtime(format!("read failed: {e:?}")))
}

/// Device buffers are never empty: a zero-length request allocates 16 bytes (never read).
fn alloc_len(bytes: usize) -> usize {
    bytes.max(16)
}

/// One layer's paged K and V caches on the device.
///
/// K holds `layout.shape(K)` elements of `dtype` (`[num_pages, page_size, num_kv_heads,
/// head_dim_k]` for Bshd), V likewise; both contiguous, row-major, in their own buffers. FP8
/// elements are 1 byte (raw codes); f16/bf16 (the `none` policy) 2 bytes, little-endian.
pub struct PagedKvCache<R: Runtime> {
    client: ComputeClient<R>,
    spec: CacheSpec,
    k: Handle,
    v: Handle,
}

impl<R: Runtime> PagedKvCache<R> {
    /// Allocates an (uninitialised) cache. `dtype` must match `policy`
    /// ([`QuantPolicy::check_cache_dtype`]) and be supported by the device.
    pub fn new(
        client: &ComputeClient<R>,
        layout: PagedKvLayout,
        policy: QuantPolicy,
        dtype: Dtype,
        scales: KvScales,
    ) -> Result<Self> {
        Self::with_spec(
            client,
            CacheSpec::from_parts(layout, policy, dtype, scales)?,
        )
    }

    /// Allocates an (uninitialised) cache as `spec` describes; its dtype must be supported by
    /// the device.
    pub fn with_spec(client: &ComputeClient<R>, spec: CacheSpec) -> Result<Self> {
        // The check first, so that a bad request allocates nothing; from_spec_handles repeats it.
        check_dtype_support(client, spec.dtype())?;
        let (layout, es) = (spec.layout(), spec.dtype().size_bytes());
        let k = client.empty(alloc_len(layout.cache_elems(KvSide::K) * es));
        let v = client.empty(alloc_len(layout.cache_elems(KvSide::V) * es));
        Self::from_spec_handles(client, spec, k, v)
    }

    /// Wraps existing K and V buffers (e.g. the storage of Burn tensors) without copying them.
    /// Each must hold at least `layout.cache_elems(side)` contiguous elements of `dtype`.
    pub fn from_handles(
        client: &ComputeClient<R>,
        layout: PagedKvLayout,
        policy: QuantPolicy,
        dtype: Dtype,
        scales: KvScales,
        k: Handle,
        v: Handle,
    ) -> Result<Self> {
        let spec = CacheSpec::from_parts(layout, policy, dtype, scales)?;
        Self::from_spec_handles(client, spec, k, v)
    }

    /// [`Self::from_handles`] for a cache `spec`.
    pub fn from_spec_handles(
        client: &ComputeClient<R>,
        spec: CacheSpec,
        k: Handle,
        v: Handle,
    ) -> Result<Self> {
        let (layout, dtype) = (spec.layout(), spec.dtype());
        check_dtype_support(client, dtype)?;
        for (what, side, handle) in [
            ("k cache buffer", KvSide::K, &k),
            ("v cache buffer", KvSide::V, &v),
        ] {
            let need = layout.cache_elems(side) * dtype.size_bytes();
            if (handle.size_in_used() as usize) < need {
                return Err(Fp8KvError::ShapeMismatch {
                    what,
                    expected: format!(
                        "at least {need} bytes ({:?} of {dtype})",
                        layout.shape(side)
                    ),
                    actual: format!("{} bytes", handle.size_in_used()),
                });
            }
        }
        Ok(PagedKvCache {
            client: client.clone(),
            spec,
            k,
            v,
        })
    }

    /// Uploads a host cache: its bytes and its spec (layout, dtype, scales). Its buffers must
    /// pass [`HostKvCache::check_shape`] (a short one would let the kernels read past the
    /// device buffer).
    pub fn from_host(client: &ComputeClient<R>, host: &HostKvCache) -> Result<Self> {
        host.check_shape()?;
        let spec = *host.spec();
        check_dtype_support(client, spec.dtype())?;
        let upload = |b: &[u8]| {
            if b.is_empty() {
                client.empty(alloc_len(0))
            } else {
                client.create_from_slice(b)
            }
        };
        Ok(PagedKvCache {
            client: client.clone(),
            spec,
            k: upload(&host.k),
            v: upload(&host.v),
        })
    }

    /// Downloads both caches into a host cache with the same spec (waits for pending work).
    pub fn to_host(&self) -> Result<HostKvCache> {
        let mut host = HostKvCache::new(self.spec, 0)?;
        let (kn, vn) = (host.k.len(), host.v.len());
        host.k
            .copy_from_slice(&read_bytes(&self.client, &self.k)?[..kn]);
        host.v
            .copy_from_slice(&read_bytes(&self.client, &self.v)?[..vn]);
        Ok(host)
    }

    /// The client the buffers live on.
    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }
    /// What the cache is: layout, element type, scales.
    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }
    /// The layout.
    pub fn layout(&self) -> &PagedKvLayout {
        self.spec.layout()
    }
    /// The quantization policy.
    pub fn policy(&self) -> QuantPolicy {
        self.spec.policy()
    }
    /// The cache element type (`E4m3`, `E5m2`, or `F16`/`Bf16` for the `none` policy).
    pub fn dtype(&self) -> Dtype {
        self.spec.dtype()
    }
    /// The layer's scales (ignored by the kernels for the `none` policy).
    pub fn scales(&self) -> KvScales {
        self.spec.scales()
    }
    /// Replaces the scales (e.g. after calibration); codes already stored are not rescaled.
    pub fn set_scales(&mut self, scales: KvScales) {
        self.spec.set_scales(scales);
    }
    /// Bytes of K plus V on the device.
    pub fn size_bytes(&self) -> usize {
        let layout = self.spec.layout();
        (layout.cache_elems(KvSide::K) + layout.cache_elems(KvSide::V)) * self.dtype().size_bytes()
    }
    /// Elements of one side's tensor.
    pub fn elems(&self, side: KvSide) -> usize {
        self.spec.layout().cache_elems(side)
    }
    /// The K cache buffer.
    pub fn k_handle(&self) -> &Handle {
        &self.k
    }
    /// The V cache buffer.
    pub fn v_handle(&self) -> &Handle {
        &self.v
    }
    /// One side's buffer.
    pub fn handle(&self, side: KvSide) -> &Handle {
        match side {
            KvSide::K => &self.k,
            KvSide::V => &self.v,
        }
    }
}

/// Offsets (in `i32` elements) of the sections of a [`DeviceBatch`] buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOffsets {
    /// `q_start_loc[batch]` (always 0).
    pub q_start_loc: usize,
    /// `q_seq_length[batch]`.
    pub q_seq_length: usize,
    /// `kv_seqlens[batch]`.
    pub kv_seqlens: usize,
    /// `kv_start_loc[batch + 1]`: exclusive prefix sum of `kv_seqlens`, total last.
    pub kv_start_loc: usize,
    /// `block_table[batch * max_pages_per_seq]`, row-major.
    pub block_table: usize,
    /// Elements of the whole buffer.
    pub len: usize,
}

impl BatchOffsets {
    /// Offsets for `batch` sequences with `max_pages_per_seq` block-table columns.
    pub fn new(batch: usize, max_pages_per_seq: usize) -> Self {
        use crate::kernels::meta::{
            BLOCK_TABLE, KV_SEQLENS, KV_START_LOC, Q_SEQ_LENGTH, Q_START_LOC,
        };
        let at = |section: u32| section as usize * batch;
        let block_table = at(BLOCK_TABLE) + 1;
        BatchOffsets {
            q_start_loc: at(Q_START_LOC),
            q_seq_length: at(Q_SEQ_LENGTH),
            kv_seqlens: at(KV_SEQLENS),
            kv_start_loc: at(KV_START_LOC),
            block_table,
            len: block_table + batch * max_pages_per_seq,
        }
    }
}

/// Checks that the [`DeviceBatch`] buffer of `batch` sequences with `max_pages_per_seq`
/// block-table columns can be indexed by the kernels, which compute its indices in `u32`
/// (`4 · batch + 1 + b · max_pages_per_seq + page`): its length ([`BatchOffsets::len`]) must fit
/// in a `u32`, else [`Fp8KvError::TooLarge`]. [`DeviceBatch::new`] and
/// [`DeviceBatch::for_reads`] call it.
pub fn check_batch_buffer_len(batch: usize, max_pages_per_seq: usize) -> Result<()> {
    // BatchOffsets::len in u128, so the check itself cannot overflow.
    let len = (batch as u128)
        .saturating_mul(max_pages_per_seq as u128 + crate::kernels::meta::BLOCK_TABLE as u128)
        .saturating_add(1);
    if len <= u32::MAX as u128 {
        Ok(())
    } else {
        Err(Fp8KvError::TooLarge {
            what: "batch metadata buffer (i32 elements)",
            actual: len,
            limit: u32::MAX as u128,
            why: "the kernels' 32-bit indices",
        })
    }
}

/// A scratch buffer and its size in bytes.
type ScratchBuffer = (usize, Handle);

/// One engine step's [`BatchMetadata`], validated against a layout and uploaded once into one
/// `i32` buffer (sections in [`BatchOffsets`]). Every layer's kernels of that step reuse it.
/// Cloning shares the device buffer, the host copy and the decode scratch (no copy per op:
/// the fused backend clones the batch into every operation it records).
pub struct DeviceBatch<R: Runtime> {
    meta: Arc<BatchMetadata>,
    layout: PagedKvLayout,
    num_tokens: Option<usize>,
    kv_start_loc: Arc<[usize]>,
    offsets: BatchOffsets,
    handle: Handle,
    // Decode's split-K workspace, allocated by the step's first decode call and reused by the
    // others (every layer of a step has the same shape): `(bytes, buffer)` per slot.
    scratch: Arc<Mutex<[Option<ScratchBuffer>; 3]>>,
    _runtime: std::marker::PhantomData<R>,
}

// Manual impls: a derive would require `R: Clone + Debug`, which runtimes need not be.
impl<R: Runtime> Clone for DeviceBatch<R> {
    fn clone(&self) -> Self {
        DeviceBatch {
            meta: Arc::clone(&self.meta),
            layout: self.layout,
            num_tokens: self.num_tokens,
            kv_start_loc: Arc::clone(&self.kv_start_loc),
            offsets: self.offsets,
            handle: self.handle.clone(),
            scratch: Arc::clone(&self.scratch),
            _runtime: std::marker::PhantomData,
        }
    }
}

impl<R: Runtime> std::fmt::Debug for DeviceBatch<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBatch")
            .field("meta", &self.meta)
            .field("layout", &self.layout)
            .field("num_tokens", &self.num_tokens)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> DeviceBatch<R> {
    /// Validates `meta` for a step that writes `num_tokens` packed new tokens into caches of
    /// `layout` ([`BatchMetadata::validate`]) and uploads it. Usable by fill, flatten, decode.
    ///
    /// Errors: every error of [`BatchMetadata::validate`], and [`Fp8KvError::TooLarge`] for a
    /// buffer past the kernels' 32-bit indices ([`check_batch_buffer_len`]).
    pub fn new(
        client: &ComputeClient<R>,
        meta: BatchMetadata,
        layout: &PagedKvLayout,
        num_tokens: usize,
    ) -> Result<Self> {
        meta.validate(layout, num_tokens)?;
        check_batch_buffer_len(meta.batch(), meta.max_pages_per_seq())?;
        Ok(Self::upload(client, meta, layout, Some(num_tokens)))
    }

    /// Validates `meta` only for reading caches of `layout` ([`BatchMetadata::validate_reads`]:
    /// kv lengths and the block-table entries they use) and uploads it. Usable by flatten; fill
    /// refuses it (its new-token fields were not checked).
    ///
    /// Errors: every error of [`BatchMetadata::validate_reads`], and [`Fp8KvError::TooLarge`]
    /// as for [`Self::new`].
    pub fn for_reads(
        client: &ComputeClient<R>,
        meta: BatchMetadata,
        layout: &PagedKvLayout,
    ) -> Result<Self> {
        meta.validate_reads(layout)?;
        check_batch_buffer_len(meta.batch(), meta.max_pages_per_seq())?;
        Ok(Self::upload(client, meta, layout, None))
    }

    fn upload(
        client: &ComputeClient<R>,
        meta: BatchMetadata,
        layout: &PagedKvLayout,
        num_tokens: Option<usize>,
    ) -> Self {
        let kv_start_loc = crate::contract::flatten_start_loc(&meta);
        let offsets = BatchOffsets::new(meta.batch(), meta.max_pages_per_seq());
        let mut buf: Vec<i32> = Vec::with_capacity(offsets.len);
        buf.extend_from_slice(meta.q_start_loc());
        buf.extend_from_slice(meta.q_seq_length());
        buf.extend_from_slice(meta.kv_seqlens());
        buf.extend(kv_start_loc.iter().map(|&s| s as i32));
        buf.extend_from_slice(meta.block_table());
        debug_assert_eq!(buf.len(), offsets.len);
        let handle = client.create_from_slice(bytemuck::cast_slice(&buf));
        DeviceBatch {
            meta: Arc::new(meta),
            layout: *layout,
            num_tokens,
            kv_start_loc: kv_start_loc.into(),
            offsets,
            handle,
            scratch: Arc::default(),
            _runtime: std::marker::PhantomData,
        }
    }

    /// Scratch buffer `slot` (0 to 2) of at least `bytes`, shared by every clone of this batch:
    /// allocated on first use (or when a call needs more), then reused. Kernels that use it
    /// run in stream order, so one call's use ends before the next call's launch starts. A
    /// `zeroed` buffer is all zeros when allocated (the kernels that use it leave it so).
    pub(crate) fn scratch(
        &self,
        client: &ComputeClient<R>,
        slot: usize,
        bytes: usize,
        zeroed: bool,
    ) -> Handle {
        let mut scratch = self
            .scratch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &scratch[slot] {
            Some((have, h)) if *have >= bytes => h.clone(),
            _ => {
                let h = if zeroed {
                    client.create_from_slice(&vec![0u8; bytes.max(4)])
                } else {
                    client.empty(bytes.max(4))
                };
                scratch[slot] = Some((bytes, h.clone()));
                h
            }
        }
    }

    /// The host copy of the metadata.
    pub fn meta(&self) -> &BatchMetadata {
        &self.meta
    }
    /// The layout the metadata was validated against; kernels require the cache's to be equal.
    pub fn layout(&self) -> &PagedKvLayout {
        &self.layout
    }
    /// The packed new-token count validated by [`Self::new`]; `None` for [`Self::for_reads`].
    pub fn num_tokens(&self) -> Option<usize> {
        self.num_tokens
    }
    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.meta.batch()
    }
    /// Block-table columns.
    pub fn max_pages_per_seq(&self) -> usize {
        self.meta.max_pages_per_seq()
    }
    /// Host copy of `kv_start_loc` (`batch + 1` entries, total last).
    pub fn kv_start_loc(&self) -> &[usize] {
        &self.kv_start_loc
    }
    /// Total cached tokens of the batch (the flattened token count).
    pub fn total_kv_tokens(&self) -> usize {
        self.kv_start_loc[self.meta.batch()]
    }
    /// Section offsets of the buffer, in `i32` elements.
    pub fn offsets(&self) -> BatchOffsets {
        self.offsets
    }
    /// The `i32` buffer (`offsets().len` elements).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Checks that a cache has the layout this batch was validated against.
    pub fn check_layout(&self, layout: &PagedKvLayout) -> Result<()> {
        if *layout == self.layout {
            Ok(())
        } else {
            Err(Fp8KvError::ShapeMismatch {
                what: "cache layout",
                expected: format!(
                    "the layout the batch was validated against ({:?})",
                    self.layout
                ),
                actual: format!("{layout:?}"),
            })
        }
    }
}

/// Activation rows on the device: `rows` rows of `row_elems` elements of an activation dtype
/// (`f32`, `f16`, `bf16`), row `r` starting at element `r * row_stride` of the buffer.
///
/// New K/V rows are `[num_tokens, num_kv_heads * head_dim]`; a flatten output is one
/// `[kv_heads * total_tokens, head_dim]` (hsd) or `[total_tokens, kv_heads * head_dim]` (shd)
/// block of rows.
pub struct DeviceRows<R: Runtime> {
    client: ComputeClient<R>,
    handle: Handle,
    dtype: Dtype,
    rows: usize,
    row_elems: usize,
    row_stride: usize,
}

/// Checks a rows shape and returns the bytes of its `rows × row_stride` elements (the
/// allocation size), or [`Fp8KvError::TooLarge`] when that overflows `usize`.
fn check_rows_shape(
    dtype: Dtype,
    rows: usize,
    row_elems: usize,
    row_stride: usize,
) -> Result<usize> {
    if !dtype.is_activation() {
        return Err(Fp8KvError::UnsupportedDtype(format!(
            "activation rows must be f32, f16 or bf16, got {dtype}"
        )));
    }
    if row_stride < row_elems {
        return Err(Fp8KvError::RowStride {
            what: "rows",
            stride: row_stride,
            row_elems,
        });
    }
    checked_product("rows bytes", &[rows, row_stride, dtype.size_bytes()])
}

impl<R: Runtime> DeviceRows<R> {
    /// The struct around a buffer whose shape the caller checked.
    fn wrap(
        client: &ComputeClient<R>,
        handle: Handle,
        dtype: Dtype,
        rows: usize,
        row_elems: usize,
        row_stride: usize,
    ) -> Self {
        DeviceRows {
            client: client.clone(),
            handle,
            dtype,
            rows,
            row_elems,
            row_stride,
        }
    }

    /// Allocates uninitialised rows (`rows * row_stride` elements).
    ///
    /// Errors (all three constructors): [`Fp8KvError::UnsupportedDtype`] (not an activation
    /// dtype), [`Fp8KvError::RowStride`] (stride below the row), [`Fp8KvError::TooLarge`]
    /// (`rows × row_stride` bytes overflow `usize`, which would otherwise wrap to a small
    /// buffer that the kernels then index past).
    pub fn empty(
        client: &ComputeClient<R>,
        dtype: Dtype,
        rows: usize,
        row_elems: usize,
        row_stride: usize,
    ) -> Result<Self> {
        let bytes = check_rows_shape(dtype, rows, row_elems, row_stride)?;
        let handle = client.empty(alloc_len(bytes));
        Ok(Self::wrap(
            client, handle, dtype, rows, row_elems, row_stride,
        ))
    }

    /// Uploads f32 values converted to `dtype` (round to nearest even). `data` holds at least
    /// `(rows - 1) * row_stride + row_elems` values; the buffer gets `rows * row_stride`
    /// elements, the missing tail of the last row's padding filled with zeros.
    pub fn from_f32(
        client: &ComputeClient<R>,
        data: &[f32],
        dtype: Dtype,
        rows: usize,
        row_elems: usize,
        row_stride: usize,
    ) -> Result<Self> {
        let bytes = check_rows_shape(dtype, rows, row_elems, row_stride)?;
        let need = checked_rows_span("rows data", rows, row_elems, row_stride)?;
        if data.len() < need {
            return Err(Fp8KvError::ShapeMismatch {
                what: "rows data",
                expected: format!("at least {need} elements"),
                actual: format!("{} elements", data.len()),
            });
        }
        let n = rows * row_stride;
        let es = dtype.size_bytes();
        let mut bytes = crate::error::try_vec("rows bytes", alloc_len(bytes), 0u8)?;
        for (i, &x) in data.iter().take(n).enumerate() {
            dtype.store(x, &mut bytes[i * es..(i + 1) * es]);
        }
        let handle = client.create_from_slice(&bytes);
        Ok(Self::wrap(
            client, handle, dtype, rows, row_elems, row_stride,
        ))
    }

    /// Wraps an existing buffer (e.g. a slice of a fused QKV output: offset the handle with
    /// [`Handle::offset_start`] first). Fails if the buffer is smaller than the rows need.
    pub fn from_handle(
        client: &ComputeClient<R>,
        handle: Handle,
        dtype: Dtype,
        rows: usize,
        row_elems: usize,
        row_stride: usize,
    ) -> Result<Self> {
        check_rows_shape(dtype, rows, row_elems, row_stride)?;
        let need =
            checked_rows_span("rows buffer", rows, row_elems, row_stride)? * dtype.size_bytes();
        if (handle.size_in_used() as usize) < need {
            return Err(Fp8KvError::ShapeMismatch {
                what: "rows buffer",
                expected: format!("at least {need} bytes"),
                actual: format!("{} bytes", handle.size_in_used()),
            });
        }
        Ok(Self::wrap(
            client, handle, dtype, rows, row_elems, row_stride,
        ))
    }

    /// Downloads all `rows * row_stride` elements as f32 (padding included; fewer if a wrapped
    /// buffer ends inside the last row's padding).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let bytes = read_bytes(&self.client, &self.handle)?;
        let es = self.dtype.size_bytes();
        let n = (self.rows * self.row_stride).min(bytes.len() / es);
        Ok((0..n)
            .map(|i| self.dtype.load(&bytes[i * es..(i + 1) * es]))
            .collect())
    }

    /// Downloads the raw element bits (for exact comparisons), `rows * row_stride` entries.
    pub fn to_bits(&self) -> Result<Vec<u32>> {
        let bytes = read_bytes(&self.client, &self.handle)?;
        let es = self.dtype.size_bytes();
        let n = (self.rows * self.row_stride).min(bytes.len() / es);
        Ok((0..n)
            .map(|i| {
                let mut b = [0u8; 4];
                b[..es].copy_from_slice(&bytes[i * es..(i + 1) * es]);
                u32::from_le_bytes(b)
            })
            .collect())
    }

    /// The buffer.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
    /// The client the buffer belongs to.
    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }
    /// The buffer, giving up the struct (to hand it to another owner, e.g. a Burn tensor).
    pub fn into_handle(self) -> Handle {
        self.handle
    }
    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Elements of one row.
    pub fn row_elems(&self) -> usize {
        self.row_elems
    }
    /// Elements between consecutive rows.
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }
    /// Elements the buffer addresses (`rows * row_stride`, the last row's padding included).
    pub fn len_elems(&self) -> usize {
        self.rows * self.row_stride
    }
}
