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
//! Every method returns [`fp8kv::Result`]. Two things can still panic, both outside this
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

#![warn(missing_docs)]

mod attention;
mod batch;
mod cache;
mod config;
mod cube;
pub mod fusion;
mod ndarray;

use std::fmt::Debug;

use burn_tensor::backend::Backend;
use burn_tensor::ops::{FloatTensor, IntTensor};
use burn_tensor::{DType, Shape};

pub use attention::causal_attention;
pub use batch::{KvBatch, RopeTableTensor};
pub(crate) use cache::{read_storage, tensor_data};
pub use cache::{KvCache, Saturation};
pub use config::KvCacheConfig;
pub use fp8kv::CacheSpec;
use fp8kv::{AttentionOptions, FlattenLayout};
pub use ndarray::HostBatch;

use fp8kv::error::{Fp8KvError, KvSide, Result};
use fp8kv::kernels::stats::KvStats;
use fp8kv::layout::{BatchMetadata, PagedKvLayout};
use fp8kv::policy::{Dtype, QuantPolicy};
pub use fp8kv::rope::{QkvHeads, RopeTable};
use fp8kv::scales::KvScales;

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
    fn kv_cache_empty(spec: &CacheSpec, device: &Self::Device) -> Result<KvCachePrimitive<Self>>;

    /// Quantizes `k_new` / `v_new` (`[num_tokens, num_kv_heads, head_dim]`) into the cache,
    /// in place.
    fn kv_fill(
        cache: &mut KvCachePrimitive<Self>,
        spec: &CacheSpec,
        k_new: FloatTensor<Self>,
        v_new: FloatTensor<Self>,
        batch: &Self::KvBatchPrimitive,
    ) -> Result<()>;

    /// The batch's sequences (`total_kv_tokens` cached tokens in all), dequantized into two
    /// contiguous tensors of `dtype`.
    fn kv_flatten(
        cache: &KvCachePrimitive<Self>,
        spec: &CacheSpec,
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
        spec: &CacheSpec,
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
        spec: &CacheSpec,
        batch: &Self::KvBatchPrimitive,
        opts: &AttentionOptions,
    ) -> Result<FloatTensor<Self>>;

    /// Per side, the largest `|x|` of `k` / `v` (`[rows, heads, dim]`, f32/f16/bf16) and how
    /// many values lie beyond `MAX · scale` under `policy` (none for `none`): the library's
    /// statistics kernel on GPU backends (one launch, one 4 KiB read), its CPU definition on
    /// NdArray. Reads the result back (a device sync).
    fn kv_stats(
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scales: KvScales,
        policy: QuantPolicy,
    ) -> Result<KvStats>;
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
