//! Burn backend extension: the FP8 paged KV cache and its three operations on Burn tensors.
//!
//! A model owns one [`KvCache`] per layer (or builds them all from one [`KvCacheConfig`]),
//! builds one [`KvBatch`] per engine step from a host [`BatchMetadata`] (validated and
//! uploaded once, shared by every layer), and calls [`KvCache::fill`], [`KvCache::flatten`] and
//! [`KvCache::decode`] on `Tensor<B, 3>` activations. Any backend that implements
//! [`PagedKvBackend`] works:
//!
//! - `CubeBackend<CudaRuntime, F, I, BT>` (`cube.rs`): the library's validated entry points on
//!   the tensors' buffers, no copies;
//! - `Fusion<B>` for any such `B` (`fusion.rs`), so `burn_cuda::Cuda` with Burn's default
//!   features works: each operation is a custom operation of the fusion stream;
//! - `NdArray` (`ndarray.rs`): the CPU reference kernels, so Burn code written against the
//!   extension runs and is tested without a GPU (slow, same results).
//!
//! This layer only adapts tensors and metadata: shapes, dtypes and devices of the Burn tensors
//! are checked here, once, for every backend (so Fusion can refuse bad input before it records
//! anything); the metadata and the kernels' own checks are the library's.
//!
//! # Errors and panics
//! Every method returns [`crate::Result`]. Two things can still panic, both outside this
//! layer's control: a Burn backend call that panics on its own (out of device memory, a lost
//! device), and, with `Fusion`, an operation that fails when the fusion stream executes it
//! later (it cannot return an error then; the checks here make that a bug, and the panic
//! message is the library's error).
//!
//! # Storage
//! An FP8 cache side is an `Int` tensor of `DType::U8` holding the FP8 codes, allocated
//! contiguous (GPU backends would otherwise pad rows); the unquantized (`none`) cache is an
//! f16 or bf16 float tensor (NdArray, which has no half floats, holds f32 values rounded to
//! the cache dtype: the same numbers). Shapes are [`PagedKvLayout::shape`]. Fills write into
//! that storage in place: the cache never hands out a second reference to it, so no write can
//! make a backend copy it.

mod attention;
mod cube;
pub(crate) mod fusion;
mod ndarray;

use std::fmt::Debug;

use burn_tensor::backend::Backend;
use burn_tensor::ops::{FloatTensor, IntTensor};
use burn_tensor::{DType, Int, Shape, Tensor, TensorData, TensorPrimitive};

pub use crate::reference::{AttentionOptions, FlattenLayout};
pub use attention::causal_attention;
pub use ndarray::HostBatch;

use crate::error::{Fp8KvError, KvSide, Result};
use crate::layout::{BatchMetadata, PagedKvLayout};
use crate::policy::{Dtype, QuantPolicy};
use crate::reference::HostKvCache;
pub use crate::rope::{QkvHeads, RopeTable};
use crate::scales::KvScales;

/// What a backend needs to know about one layer's cache besides its storage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvCacheSpec {
    /// Shape of the K and V caches.
    pub layout: PagedKvLayout,
    /// Quantization policy.
    pub policy: QuantPolicy,
    /// Cache element: `E4m3`/`E5m2` for FP8, `F16`/`Bf16` for `none`.
    pub dtype: Dtype,
    /// The layer's scales (ignored by `none`).
    pub scales: KvScales,
}

/// One side (K or V) of a cache as a backend primitive.
#[derive(Debug)]
pub enum CachePrimitive<B: Backend> {
    /// FP8 codes: an `Int` tensor of `DType::U8`.
    Codes(IntTensor<B>),
    /// Unquantized values: a float tensor (f16/bf16; f32 on NdArray).
    Values(FloatTensor<B>),
}

/// A layer's K and V storage as backend primitives (what [`PagedKvBackend`] takes).
#[derive(Debug)]
pub struct KvCachePrimitive<B: Backend> {
    /// The K cache.
    pub k: CachePrimitive<B>,
    /// The V cache.
    pub v: CachePrimitive<B>,
}

/// The paged KV cache operations a Burn backend provides. Users call them through
/// [`KvCache`] and [`KvBatch`], which check the Burn tensors first; implementations may assume
/// those checks passed (shapes, dtypes, devices, a batch validated for this cache's layout).
pub trait PagedKvBackend: Backend {
    /// A step's metadata as this backend's kernels read it (a device buffer on GPUs).
    type KvBatchPrimitive: Clone + Send + Sync + Debug + 'static;

    /// Validates `meta` against `layout` (for a step writing `num_tokens` packed new tokens,
    /// or, with `None`, for reading only) and uploads it.
    fn kv_batch(
        meta: BatchMetadata,
        layout: &PagedKvLayout,
        num_tokens: Option<usize>,
        device: &Self::Device,
    ) -> Result<Self::KvBatchPrimitive>;

    /// Allocates one layer's (uninitialised) storage.
    fn kv_cache_empty(spec: &KvCacheSpec, device: &Self::Device) -> Result<KvCachePrimitive<Self>>;

    /// Quantizes `k_new` / `v_new` (`[num_tokens, num_kv_heads, head_dim]`) into the cache,
    /// in place.
    fn kv_fill(
        cache: &mut KvCachePrimitive<Self>,
        spec: &KvCacheSpec,
        k_new: FloatTensor<Self>,
        v_new: FloatTensor<Self>,
        batch: &Self::KvBatchPrimitive,
    ) -> Result<()>;

    /// The batch's sequences (`total_kv_tokens` cached tokens in all), dequantized into two
    /// contiguous tensors of `dtype`.
    fn kv_flatten(
        cache: &KvCachePrimitive<Self>,
        spec: &KvCacheSpec,
        batch: &Self::KvBatchPrimitive,
        total_kv_tokens: usize,
        layout: FlattenLayout,
        dtype: Dtype,
    ) -> Result<(FloatTensor<Self>, FloatTensor<Self>)>;

    /// RoPE fused into the fill ([`KvCache::fill_rope`], checked): `qkv` is `[num_tokens, 1,
    /// (q_heads + 2 kv_heads) · head_dim]`, `table` `[positions, 1, head_dim]` f32; returns
    /// the rotated Q `[num_tokens, q_heads, head_dim]` in `qkv`'s dtype.
    #[allow(clippy::too_many_arguments)]
    fn kv_fill_rope(
        cache: &mut KvCachePrimitive<Self>,
        spec: &KvCacheSpec,
        qkv: FloatTensor<Self>,
        batch: &Self::KvBatchPrimitive,
        table: FloatTensor<Self>,
        heads: QkvHeads,
        rope_dims: usize,
    ) -> Result<FloatTensor<Self>>;

    /// Paged decode attention of `q` (`[num_tokens, num_heads, head_dim_k]`) over the cache:
    /// `[num_tokens, num_heads, head_dim_v]` in `q`'s dtype.
    fn kv_decode(
        q: FloatTensor<Self>,
        cache: &KvCachePrimitive<Self>,
        spec: &KvCacheSpec,
        batch: &Self::KvBatchPrimitive,
        opts: &AttentionOptions,
    ) -> Result<FloatTensor<Self>>;
}

/// The library's activation dtype of a Burn dtype (f32, f16, bf16), or an error naming it.
pub fn activation_dtype(what: &'static str, dtype: DType) -> Result<Dtype> {
    match dtype {
        DType::F32 => Ok(Dtype::F32),
        DType::F16 => Ok(Dtype::F16),
        DType::BF16 => Ok(Dtype::Bf16),
        other => Err(Fp8KvError::UnsupportedDtype(format!(
            "{what} is {other:?}; activations must be f32, f16 or bf16"
        ))),
    }
}

/// The Burn dtype of an activation dtype.
pub fn burn_dtype(dtype: Dtype) -> Result<DType> {
    match dtype {
        Dtype::F32 => Ok(DType::F32),
        Dtype::F16 => Ok(DType::F16),
        Dtype::Bf16 => Ok(DType::BF16),
        other => Err(Fp8KvError::UnsupportedDtype(format!(
            "{other} has no Burn float dtype (FP8 caches are stored as U8 codes)"
        ))),
    }
}

/// Everything needed to create the caches of a model: policy, layout, scales, layers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvCacheConfig {
    /// Quantization policy.
    pub policy: QuantPolicy,
    /// Element of the unquantized (`none`) cache: f16 or bf16 (default bf16). FP8 policies
    /// ignore it.
    pub unquantized: Dtype,
    /// Every layer's layout.
    pub layout: PagedKvLayout,
    /// Initial scales of every layer (1.0 by default).
    pub scales: KvScales,
    /// Layers [`KvCacheConfig::init`] creates.
    pub num_layers: usize,
}

impl KvCacheConfig {
    /// A one-layer config from a policy as users type it (`"fp8"`, `"fp8_e5m2"`, `"none"`, ...),
    /// scales 1.0, a bf16 unquantized cache.
    pub fn new(policy: &str, layout: PagedKvLayout) -> Result<Self> {
        Ok(KvCacheConfig {
            policy: policy.parse()?,
            unquantized: Dtype::Bf16,
            layout,
            scales: KvScales::default(),
            num_layers: 1,
        })
    }

    /// The same config for `num_layers` layers (> 0).
    pub fn with_layers(mut self, num_layers: usize) -> Result<Self> {
        if num_layers == 0 {
            return Err(Fp8KvError::ZeroSize { what: "num_layers" });
        }
        self.num_layers = num_layers;
        Ok(self)
    }

    /// The same config with these scales for every layer.
    pub fn with_scales(mut self, scales: KvScales) -> Self {
        self.scales = scales;
        self
    }

    /// The same config with an f16 or bf16 unquantized cache.
    pub fn with_unquantized(mut self, dtype: Dtype) -> Result<Self> {
        QuantPolicy::None.check_cache_dtype(dtype)?;
        self.unquantized = dtype;
        Ok(self)
    }

    /// The cache element type this config stores.
    pub fn cache_dtype(&self) -> Result<Dtype> {
        let dtype = match self.policy.fp8_format() {
            Some(_) => self.policy.cache_dtype(Dtype::Bf16)?,
            None => self.unquantized,
        };
        self.policy.check_cache_dtype(dtype)?;
        Ok(dtype)
    }

    /// One layer's spec.
    pub fn spec(&self) -> Result<KvCacheSpec> {
        Ok(KvCacheSpec {
            layout: self.layout,
            policy: self.policy,
            dtype: self.cache_dtype()?,
            scales: self.scales,
        })
    }

    /// Device bytes of all layers' K and V caches.
    pub fn size_bytes(&self) -> usize {
        self.num_layers * self.layout.cache_bytes(self.policy)
    }

    /// Allocates every layer's cache on `device`.
    pub fn init<B: PagedKvBackend>(&self, device: &B::Device) -> Result<Vec<KvCache<B>>> {
        (0..self.num_layers)
            .map(|_| KvCache::new(self, device))
            .collect()
    }
}

/// One engine step's batch metadata, validated once against the caches' layout and uploaded
/// once to the device; every layer's fill, flatten and decode of the step reuse it.
#[derive(Debug, Clone)]
pub struct KvBatch<B: PagedKvBackend> {
    layout: PagedKvLayout,
    num_tokens: Option<usize>,
    max_kv_len: usize,
    kv_start_loc: Vec<usize>,
    device: B::Device,
    primitive: B::KvBatchPrimitive,
}

impl<B: PagedKvBackend> KvBatch<B> {
    /// A step that brings `num_tokens` packed new tokens (the rows of its K/V/Q tensors):
    /// usable by fill, flatten and decode. Validation errors are [`BatchMetadata::validate`]'s.
    pub fn new(
        meta: BatchMetadata,
        layout: &PagedKvLayout,
        num_tokens: usize,
        device: &B::Device,
    ) -> Result<Self> {
        Self::build(meta, layout, Some(num_tokens), device)
    }

    /// Metadata for reading only (flatten); fill and decode refuse it.
    pub fn for_reads(
        meta: BatchMetadata,
        layout: &PagedKvLayout,
        device: &B::Device,
    ) -> Result<Self> {
        Self::build(meta, layout, None, device)
    }

    fn build(
        meta: BatchMetadata,
        layout: &PagedKvLayout,
        num_tokens: Option<usize>,
        device: &B::Device,
    ) -> Result<Self> {
        let kv_start_loc = crate::reference::flatten_start_loc(&meta);
        let max_kv_len = meta.max_kv_len();
        let primitive = B::kv_batch(meta, layout, num_tokens, device)?;
        Ok(KvBatch {
            layout: *layout,
            num_tokens,
            max_kv_len,
            kv_start_loc,
            device: device.clone(),
            primitive,
        })
    }

    /// The packed new-token count (`None` for [`Self::for_reads`]).
    pub fn num_tokens(&self) -> Option<usize> {
        self.num_tokens
    }
    /// The longest sequence's cached tokens after the step (its last position + 1).
    pub fn max_kv_len(&self) -> usize {
        self.max_kv_len
    }
    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.kv_start_loc.len() - 1
    }
    /// Cached tokens of all sequences (the token count of a flatten output).
    pub fn total_kv_tokens(&self) -> usize {
        self.kv_start_loc[self.batch()]
    }
    /// Where each sequence starts in a flatten output's token dimension (`batch + 1` entries,
    /// the total last): sequence `b` is rows `kv_start_loc[b]..kv_start_loc[b + 1]`.
    pub fn kv_start_loc(&self) -> &[usize] {
        &self.kv_start_loc
    }
    /// The layout the metadata was validated against.
    pub fn layout(&self) -> &PagedKvLayout {
        &self.layout
    }
    /// The backend's copy.
    pub fn primitive(&self) -> &B::KvBatchPrimitive {
        &self.primitive
    }

    pub(crate) fn written_tokens(&self, op: &str) -> Result<usize> {
        self.num_tokens.ok_or_else(|| {
            Fp8KvError::InvalidOption(format!(
                "{op} needs a batch built with KvBatch::new (its new tokens validated), not KvBatch::for_reads"
            ))
        })
    }
}

/// A [`RopeTable`] on a device: `[positions, head_dim]` f32.
#[derive(Debug, Clone)]
pub struct RopeTableTensor<B: Backend> {
    pub(crate) values: Tensor<B, 2>,
    pub(crate) rope_dims: usize,
}

impl<B: Backend> RopeTableTensor<B> {
    /// Uploads `table` to `device` (one upload; every layer and step reads it).
    pub fn new(table: &crate::rope::RopeTable, device: &B::Device) -> Self {
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

/// One layer's paged K and V cache on a Burn backend: storage, layout, policy and scales.
///
/// Not `Clone`: the storage has exactly one owner, so fills write in place.
pub struct KvCache<B: PagedKvBackend> {
    spec: KvCacheSpec,
    device: B::Device,
    // `None` only while `copy_blocks` runs Burn's by-value ops on it (or after a panic there).
    storage: Option<KvCachePrimitive<B>>,
    // Opt-in saturation check on fill, and whether it has warned already (once per cache).
    saturation_check: Option<f64>,
    warned: bool,
}

/// How many of a batch's K and V values an FP8 cache clamps to ±MAX at its current scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Saturation {
    /// K values with `|x / k_scale| > MAX`.
    pub k: u64,
    /// V values with `|x / v_scale| > MAX`.
    pub v: u64,
    /// Values of each side looked at.
    pub per_side: u64,
}

impl Saturation {
    /// The larger side's saturated fraction.
    pub fn fraction(&self) -> f64 {
        self.k.max(self.v) as f64 / self.per_side.max(1) as f64
    }
}

/// `|x| > limit` counted on the device, read back as one scalar.
pub(crate) fn count_over<B: Backend, const D: usize>(x: &Tensor<B, D>, limit: f32) -> u64 {
    use burn_tensor::ElementConversion;
    x.clone()
        .cast(DType::F32)
        .abs()
        .greater_elem(limit)
        .int()
        .sum()
        .into_scalar()
        .elem::<i64>() as u64
}

/// `max |x|` on the device, read back as one scalar (NaN is skipped by the max; an all-NaN
/// tensor gives a NaN amax, which calibration rejects).
pub(crate) fn amax<B: Backend, const D: usize>(x: &Tensor<B, D>) -> f32 {
    use burn_tensor::ElementConversion;
    x.clone()
        .cast(DType::F32)
        .abs()
        .max()
        .into_scalar()
        .elem::<f32>()
}

impl<B: PagedKvBackend> Debug for KvCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("spec", &self.spec)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// Checks one activation tensor `[rows, heads, dim]` against what an operation expects.
fn check_activation(
    what: &'static str,
    dims: &[usize],
    dtype: DType,
    expected: [usize; 3],
    meaning: &'static str,
) -> Result<Dtype> {
    if dims.len() != 3 {
        return Err(Fp8KvError::WrongRank {
            what,
            expected: 3,
            layout: meaning,
            actual: dims.len(),
        });
    }
    if dims != expected {
        return Err(Fp8KvError::ShapeMismatch {
            what,
            expected: format!("{expected:?} {meaning}"),
            actual: format!("{dims:?}"),
        });
    }
    activation_dtype(what, dtype)
}

impl<B: PagedKvBackend> KvCache<B> {
    /// Allocates one layer's cache from `config` (its `num_layers` is ignored) on `device`.
    pub fn new(config: &KvCacheConfig, device: &B::Device) -> Result<Self> {
        let spec = config.spec()?;
        let storage = B::kv_cache_empty(&spec, device)?;
        Ok(KvCache {
            spec,
            device: device.clone(),
            storage: Some(storage),
            saturation_check: None,
            warned: false,
        })
    }

    /// The spec and the storage, for an operation that checked its inputs against this cache
    /// as [`Self::fill`] and [`Self::decode`] do (the model's fused decoder block).
    pub(crate) fn parts_mut(&mut self) -> (KvCacheSpec, &mut KvCachePrimitive<B>) {
        let storage = self
            .storage
            .as_mut()
            .expect("fp8kv: this KvCache lost its storage to a panic inside copy_blocks");
        (self.spec, storage)
    }

    /// Whether the next fill would run the opt-in saturation check (it reads K and V apart).
    pub(crate) fn saturation_check_pending(&self) -> bool {
        self.saturation_check.is_some() && !self.warned
    }

    fn storage(&self) -> &KvCachePrimitive<B> {
        self.storage
            .as_ref()
            .expect("fp8kv: this KvCache lost its storage to a panic inside copy_blocks")
    }

    /// The spec (layout, policy, dtype, scales).
    pub fn spec(&self) -> &KvCacheSpec {
        &self.spec
    }
    /// The layout.
    pub fn layout(&self) -> &PagedKvLayout {
        &self.spec.layout
    }
    /// The quantization policy.
    pub fn policy(&self) -> QuantPolicy {
        self.spec.policy
    }
    /// The cache element type.
    pub fn dtype(&self) -> Dtype {
        self.spec.dtype
    }
    /// The layer's scales.
    pub fn scales(&self) -> KvScales {
        self.spec.scales
    }
    /// Replaces the scales (after calibration, or loaded from a checkpoint); codes already
    /// stored are not rescaled.
    pub fn set_scales(&mut self, scales: KvScales) {
        self.spec.scales = scales;
    }
    /// The device the storage lives on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }
    /// Bytes of K plus V storage (FP8: 1 byte per element; `none`: 2 on GPU backends).
    pub fn size_bytes(&self) -> usize {
        self.spec.layout.cache_bytes(self.spec.policy)
    }

    pub(crate) fn check_batch(&self, batch: &KvBatch<B>) -> Result<()> {
        if batch.device != self.device {
            return Err(Fp8KvError::DeviceMismatch {
                what: "batch",
                expected: format!("{:?}", self.device),
                actual: format!("{:?}", batch.device),
            });
        }
        if batch.layout != self.spec.layout {
            return Err(Fp8KvError::ShapeMismatch {
                what: "cache layout",
                expected: format!(
                    "the layout the batch was validated against ({:?})",
                    batch.layout
                ),
                actual: format!("{:?}", self.spec.layout),
            });
        }
        Ok(())
    }

    fn check_device(&self, what: &'static str, device: &B::Device) -> Result<()> {
        if *device != self.device {
            return Err(Fp8KvError::DeviceMismatch {
                what,
                expected: format!("{:?}", self.device),
                actual: format!("{device:?}"),
            });
        }
        Ok(())
    }

    /// Scales that map this batch's K and V amax onto the FP8 format's largest value
    /// ([`KvScales::calibrate`]): one reduction per side on the device and one read of the two
    /// maxima (deterministic: a max does not depend on the order of the reduction). Call it on
    /// a prefill's K/V, then [`Self::set_scales`]; 1.0 for the `none` policy.
    pub fn calibrate<const D: usize>(
        &self,
        k: &Tensor<B, D>,
        v: &Tensor<B, D>,
    ) -> Result<KvScales> {
        KvScales::calibrate(amax(k), amax(v), self.spec.policy)
    }

    /// How many values of `k` / `v` this cache would clamp to ±MAX at its current scales (all
    /// zero for the `none` policy). Two device reductions and a read of two counts.
    pub fn saturation<const D: usize>(&self, k: &Tensor<B, D>, v: &Tensor<B, D>) -> Saturation {
        let per_side = k.dims().iter().product::<usize>() as u64;
        match self.spec.policy.fp8_max() {
            None => Saturation {
                k: 0,
                v: 0,
                per_side,
            },
            Some(max) => Saturation {
                k: count_over(k, max * self.spec.scales.k()),
                v: count_over(v, max * self.spec.scales.v()),
                per_side,
            },
        }
    }

    /// Opt-in check on every [`Self::fill`]: counts what saturates ([`Self::saturation`]; a
    /// device sync per fill, so off by default) and, the first time more than `fraction` of a
    /// side's values saturate at the current scales, warns once through the `log` crate
    /// (`log::warn!`, target `fp8kv`: your application's logger shows it) and sets
    /// [`Self::saturation_warned`]. `None` turns it off.
    pub fn set_saturation_check(&mut self, fraction: Option<f64>) {
        self.saturation_check = fraction;
    }

    /// Whether the saturation check has warned.
    pub fn saturation_warned(&self) -> bool {
        self.warned
    }

    /// Quantizes this step's new K and V tokens into the cache, in place: rows
    /// `q_start_loc[b] .. + q_seq_length[b]` of `k_new` / `v_new` (`[num_tokens,
    /// num_kv_heads, head_dim]`, f32/f16/bf16, the same dtype) go to cache positions
    /// `[kv_seqlens[b] - q_seq_length[b], kv_seqlens[b])` through the block table.
    pub fn fill<const D: usize>(
        &mut self,
        k_new: Tensor<B, D>,
        v_new: Tensor<B, D>,
        batch: &KvBatch<B>,
    ) -> Result<()> {
        self.check_batch(batch)?;
        let num_tokens = batch.written_tokens("fill")?;
        let layout = self.spec.layout;
        let heads = layout.num_kv_heads();
        let meaning = "[num_tokens, num_kv_heads, head_dim]";
        let k_dtype = check_activation(
            "k_new",
            &k_new.dims(),
            k_new.dtype(),
            [num_tokens, heads, layout.head_dim_k()],
            meaning,
        )?;
        let v_dtype = check_activation(
            "v_new",
            &v_new.dims(),
            v_new.dtype(),
            [num_tokens, heads, layout.head_dim_v()],
            meaning,
        )?;
        if k_dtype != v_dtype {
            return Err(Fp8KvError::UnsupportedDtype(format!(
                "k_new is {k_dtype} but v_new is {v_dtype}"
            )));
        }
        self.check_device("k_new", &k_new.device())?;
        self.check_device("v_new", &v_new.device())?;
        if let (Some(limit), false) = (self.saturation_check, self.warned) {
            let sat = self.saturation(&k_new, &v_new);
            if sat.fraction() > limit {
                self.warned = true;
                log::warn!(
                    target: "fp8kv",
                    "{} at scales k {} / v {} saturates {} of {} K and {} of {} V values (more than {:.3}%): calibrate the scales (KvCache::calibrate) or load them from the checkpoint",
                    self.spec.policy,
                    self.spec.scales.k(),
                    self.spec.scales.v(),
                    sat.k,
                    sat.per_side,
                    sat.v,
                    sat.per_side,
                    100.0 * limit
                );
            }
        }
        let storage = self
            .storage
            .as_mut()
            .expect("fp8kv: this KvCache lost its storage to a panic inside copy_blocks");
        B::kv_fill(
            storage,
            &self.spec,
            k_new.into_primitive().tensor(),
            v_new.into_primitive().tensor(),
            &batch.primitive,
        )
    }

    /// What RoPE against this cache needs: `heads` whose KV heads and head dim are the cache's
    /// (K and V head dims equal), a table of that width on this device covering the batch's
    /// positions. The checks of [`Self::fill_rope`] (and of the model's decoder block).
    pub(crate) fn check_rope(
        &self,
        batch: &KvBatch<B>,
        table: &RopeTableTensor<B>,
        heads: QkvHeads,
    ) -> Result<()> {
        let layout = self.spec.layout;
        let d = heads.head_dim;
        if heads.q_heads == 0
            || heads.kv_heads != layout.num_kv_heads()
            || d != layout.head_dim_k()
            || d != layout.head_dim_v()
            || d != table.head_dim()
        {
            return Err(Fp8KvError::ShapeMismatch {
                what: "RoPE fill heads",
                expected: format!(
                    "query heads and the cache's {} KV heads of {} (K) / {} (V), the table's width",
                    layout.num_kv_heads(),
                    layout.head_dim_k(),
                    layout.head_dim_v()
                ),
                actual: format!("{heads:?}, a table of width {}", table.head_dim()),
            });
        }
        if batch.max_kv_len() > table.positions() {
            return Err(Fp8KvError::InvalidOption(format!(
                "the RoPE table covers {} positions, the batch reaches position {}",
                table.positions(),
                batch.max_kv_len() - 1
            )));
        }
        self.check_device("RoPE table", &table.values.device())
    }

    /// RoPE fused into the fill, for a fused QKV projection `qkv` `[num_tokens, (q_heads + 2
    /// num_kv_heads) · head_dim]` (Q heads, then K, then V; f32/f16/bf16): one launch on GPU
    /// backends rotates Q and K by their positions (`kv_seqlens[b] − q_seq_length[b] + i`, pairs
    /// `(2i, 2i + 1)`, angles from `table`) and quantizes the rotated K and the V into the cache
    /// as [`Self::fill`] does, so K never goes through memory unquantized. Returns the rotated
    /// Q, `[num_tokens, q_heads, head_dim]` in `qkv`'s dtype (rows of no sequence unwritten on
    /// GPUs, NaN on NdArray). The rotation is computed in f64 and rounded to f32 once: bit for
    /// bit [`crate::reference::fill_rope`].
    ///
    /// `heads.kv_heads` and `heads.head_dim` must be the cache's (K and V head dims equal);
    /// the table must cover the batch's positions. Errors as [`Self::fill`], and
    /// [`Fp8KvError::ShapeMismatch`] / [`Fp8KvError::InvalidOption`] for heads or a table that
    /// do not fit. The opt-in saturation check does not run here (it reads K and V apart).
    pub fn fill_rope(
        &mut self,
        qkv: Tensor<B, 2>,
        batch: &KvBatch<B>,
        table: &RopeTableTensor<B>,
        heads: QkvHeads,
    ) -> Result<Tensor<B, 3>> {
        self.check_batch(batch)?;
        let num_tokens = batch.written_tokens("fill_rope")?;
        self.check_rope(batch, table, heads)?;
        let row = heads.row_elems();
        if qkv.dims() != [num_tokens, row] {
            return Err(Fp8KvError::ShapeMismatch {
                what: "qkv",
                expected: format!(
                    "[{num_tokens}, {row}] ([num_tokens, (q_heads + 2 num_kv_heads) · head_dim])"
                ),
                actual: format!("{:?}", qkv.dims()),
            });
        }
        activation_dtype("qkv", qkv.dtype())?;
        self.check_device("qkv", &qkv.device())?;
        let (positions, d) = (table.positions(), heads.head_dim);
        let storage = self
            .storage
            .as_mut()
            .expect("fp8kv: this KvCache lost its storage to a panic inside copy_blocks");
        let q = B::kv_fill_rope(
            storage,
            &self.spec,
            qkv.reshape([num_tokens, 1, row]).into_primitive().tensor(),
            &batch.primitive,
            table
                .values
                .clone()
                .reshape([positions, 1, d])
                .into_primitive()
                .tensor(),
            heads,
            table.rope_dims,
        )?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(q)))
    }

    /// Every sequence of `batch`, dequantized into contiguous K and V tensors of `dtype`
    /// (f32/f16/bf16), sequences concatenated in batch order: `[num_kv_heads, total_tokens,
    /// head_dim]` for [`FlattenLayout::Hsd`], `[total_tokens, num_kv_heads, head_dim]` for
    /// [`FlattenLayout::Shd`] (`total_tokens` = [`KvBatch::total_kv_tokens`]).
    pub fn flatten(
        &self,
        batch: &KvBatch<B>,
        layout: FlattenLayout,
        dtype: DType,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 3>)> {
        self.check_batch(batch)?;
        let dtype = activation_dtype("the flatten output dtype", dtype)?;
        let (k, v) = B::kv_flatten(
            self.storage(),
            &self.spec,
            &batch.primitive,
            batch.total_kv_tokens(),
            layout,
            dtype,
        )?;
        Ok((
            Tensor::from_primitive(TensorPrimitive::Float(k)),
            Tensor::from_primitive(TensorPrimitive::Float(v)),
        ))
    }

    /// Paged decode attention (also several new tokens per sequence, causal among them):
    /// `q` is `[num_tokens, num_heads, head_dim_k]` (f32/f16/bf16), the result `[num_tokens,
    /// num_heads, head_dim_v]` in `q`'s dtype. Every [`AttentionOptions`] feature applies.
    /// Rows of no sequence are left unwritten on GPUs (zero on NdArray).
    pub fn decode<const D: usize>(
        &self,
        q: Tensor<B, D>,
        batch: &KvBatch<B>,
        opts: &AttentionOptions,
    ) -> Result<Tensor<B, D>> {
        self.check_batch(batch)?;
        let num_tokens = batch.written_tokens("decode")?;
        let dims = q.dims();
        let layout = self.spec.layout;
        let num_heads = if D == 3 { dims[1] } else { 0 };
        check_activation(
            "q",
            &dims,
            q.dtype(),
            [num_tokens, num_heads, layout.head_dim_k()],
            "[num_tokens, num_heads, head_dim_k]",
        )?;
        if num_heads == 0 || !num_heads.is_multiple_of(layout.num_kv_heads()) {
            return Err(Fp8KvError::HeadRatio {
                num_heads,
                num_kv_heads: layout.num_kv_heads(),
            });
        }
        opts.validate(num_heads)?;
        self.check_device("q", &q.device())?;
        let out = B::kv_decode(
            q.into_primitive().tensor(),
            self.storage(),
            &self.spec,
            &batch.primitive,
            opts,
        )?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// Copies whole pages `src → dst` in both K and V (prefix sharing, copy-on-write before a
    /// fork writes into a shared partial page, preemption). Every page must be in range, the
    /// destinations distinct, and no page both a source and a destination (so the order of the
    /// copies cannot matter). Writes in place through Burn's `slice_assign`.
    pub fn copy_blocks(&mut self, pairs: &[(usize, usize)]) -> Result<()> {
        let num_pages = self.spec.layout.num_pages();
        let mut dsts = std::collections::HashSet::new();
        for (i, &(src, dst)) in pairs.iter().enumerate() {
            for (what, page) in [("source", src), ("destination", dst)] {
                if page >= num_pages {
                    return Err(Fp8KvError::InvalidOption(format!(
                        "copy_blocks pair {i}: {what} page {page} is outside [0, {num_pages})"
                    )));
                }
            }
            if !dsts.insert(dst) {
                return Err(Fp8KvError::InvalidOption(format!(
                    "copy_blocks: page {dst} is the destination of two pairs"
                )));
            }
        }
        if let Some(&(src, _)) = pairs.iter().find(|(src, _)| dsts.contains(src)) {
            return Err(Fp8KvError::InvalidOption(format!(
                "copy_blocks: page {src} is both a source and a destination"
            )));
        }
        if pairs.is_empty() {
            return Ok(());
        }
        let storage = self
            .storage
            .take()
            .expect("fp8kv: this KvCache lost its storage to a panic inside copy_blocks");
        self.storage = Some(KvCachePrimitive {
            k: copy_pages(storage.k, pairs, &self.device),
            v: copy_pages(storage.v, pairs, &self.device),
        });
        Ok(())
    }

    /// Reads the cache back into host memory (waits for pending work): for inspection and
    /// tests. The unquantized cache comes back in its dtype's bytes on every backend.
    pub fn to_host(&self) -> Result<HostKvCache> {
        let mut host = HostKvCache::new(self.spec.layout, self.spec.policy, self.spec.dtype, 0)?;
        let s = self.storage();
        host.k = read_storage::<B>(&s.k, self.spec.dtype)?;
        host.v = read_storage::<B>(&s.v, self.spec.dtype)?;
        Ok(host)
    }

    /// Gives up the cache: its spec and storage.
    pub fn into_parts(mut self) -> (KvCacheSpec, KvCachePrimitive<B>) {
        let storage = self
            .storage
            .take()
            .expect("fp8kv: this KvCache lost its storage to a panic inside copy_blocks");
        (self.spec, storage)
    }
}

/// Gathers the source pages into a new tensor first (`select`), then `slice_assign`s each onto
/// its destination: the cache has one owner again by then, so backends write it in place
/// (slicing it directly would keep a view alive and make `slice_assign` copy the whole cache).
fn copy_pages<B: Backend>(
    side: CachePrimitive<B>,
    pairs: &[(usize, usize)],
    device: &B::Device,
) -> CachePrimitive<B> {
    fn pages<B: Backend, K: burn_tensor::Numeric<B>>(
        mut t: Tensor<B, 4, K>,
        pairs: &[(usize, usize)],
        device: &B::Device,
    ) -> Tensor<B, 4, K> {
        let srcs: Vec<i64> = pairs.iter().map(|&(src, _)| src as i64).collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::from(srcs.as_slice()), device);
        let gathered = t.clone().select(0, index);
        for (i, &(_, dst)) in pairs.iter().enumerate() {
            t = t.slice_assign(dst..dst + 1, gathered.clone().slice(i..i + 1));
        }
        t
    }
    match side {
        CachePrimitive::Codes(t) => CachePrimitive::Codes(
            pages(Tensor::<B, 4, Int>::from_primitive(t), pairs, device).into_primitive(),
        ),
        CachePrimitive::Values(t) => CachePrimitive::Values(
            pages(
                Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t)),
                pairs,
                device,
            )
            .into_primitive()
            .tensor(),
        ),
    }
}

/// Reads a tensor's data synchronously, with the library's error.
fn tensor_data<B: Backend, const D: usize, K: burn_tensor::BasicOps<B>>(
    t: Tensor<B, D, K>,
) -> Result<TensorData> {
    t.try_into_data()
        .map_err(|e| Fp8KvError::Runtime(format!("reading a tensor back failed: {e:?}")))
}

/// One side's storage as raw cache-element bytes (what [`HostKvCache`] holds).
fn read_storage<B: Backend>(side: &CachePrimitive<B>, dtype: Dtype) -> Result<Vec<u8>> {
    match side {
        CachePrimitive::Codes(t) => {
            let data = tensor_data(Tensor::<B, 4, Int>::from_primitive(t.clone()))?;
            data.into_vec::<u8>()
                .map_err(|e| Fp8KvError::Runtime(format!("cache codes are not U8: {e:?}")))
        }
        CachePrimitive::Values(t) => {
            let data = tensor_data(Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(
                t.clone(),
            )))?;
            let values = data
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| Fp8KvError::Runtime(format!("cache values are not floats: {e:?}")))?;
            let es = dtype.size_bytes();
            let mut bytes = vec![0u8; values.len() * es];
            for (x, dst) in values.iter().zip(bytes.chunks_exact_mut(es)) {
                dtype.store(*x, dst);
            }
            Ok(bytes)
        }
    }
}

/// Shape of one side's flatten output: `[kv_heads, total, d]` (hsd) or `[total, kv_heads, d]`
/// (shd), `total` the batch's cached tokens.
fn flatten_shape(
    layout: &PagedKvLayout,
    side: KvSide,
    total: usize,
    order: FlattenLayout,
) -> [usize; 3] {
    let (heads, d) = (layout.num_kv_heads(), layout.head_dim(side));
    match order {
        FlattenLayout::Hsd => [heads, total, d],
        FlattenLayout::Shd => [total, heads, d],
    }
}

/// Shape of one cache side as a Burn shape.
fn side_shape(layout: &PagedKvLayout, side: KvSide) -> Shape {
    Shape::new(layout.shape(side))
}
