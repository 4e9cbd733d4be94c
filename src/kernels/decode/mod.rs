//! Paged decode attention over the FP8 (or unquantized) cache: split-K flash-decoding.
//!
//! Computes exactly [`crate::reference::paged_decode`]: for every new token `i` of sequence `b`
//! (position `p = kv_len − q_len + i`, causal among the new tokens) and every query head `h`
//! (KV head `h / (num_heads / num_kv_heads)`),
//! `s_j = (q · f32(K_j)) · k_scale · sm_scale` → softcap → ALiBi → softmax (with the sink in
//! the denominator) → `o = Σ_j (p_j · v_scale) · f32(V_j)`, f32 accumulation, output in the
//! query dtype. The unquantized cache ignores the scales.
//!
//! Two kernels: `kernel::decode_split_kernel()` (one cube per KV head, sequence, block of up
//! to `MAX_ROWS_PER_CUBE` query rows and cache split) writes f32 partial states to a
//! workspace; `kernel::decode_combine_kernel()` merges them (`plan::SplitState::merge`).
//! The split count comes from `plan::SplitPlan::new` (batch, heads, context, SM count).
//! `mma::decode_split_mma_kernel()` is the tensor-core alternative to the split kernel (same
//! workspace, same combine), chosen by [`KernelPath`]; `wide::decode_split_wide_kernel()` the
//! one for MLA's 576/512. What the split kernels share is written once: `common` (work range,
//! split scalars, FP8 bit decode) for all of them, `fragments` (MMA configuration, fragment
//! loads and conversions, softmax exchange, PV) for the two tensor-core ones.

#[allow(missing_docs)]
#[cfg(feature = "internals")]
pub mod common;
#[cfg(not(feature = "internals"))]
pub(crate) mod common;
#[allow(missing_docs)]
#[cfg(feature = "internals")]
pub mod fragments;
#[cfg(not(feature = "internals"))]
pub(crate) mod fragments;
#[allow(missing_docs)]
#[cfg(feature = "internals")]
pub mod kernel;
#[cfg(not(feature = "internals"))]
pub(crate) mod kernel;
mod launch;
#[allow(missing_docs)]
#[cfg(feature = "internals")]
pub mod mma;
#[cfg(not(feature = "internals"))]
pub(crate) mod mma;
#[cfg(feature = "internals")]
pub mod plan;
#[cfg(not(feature = "internals"))]
pub(crate) mod plan;
mod select;
#[allow(missing_docs)]
#[cfg(feature = "internals")]
pub mod wide;
#[cfg(not(feature = "internals"))]
pub(crate) mod wide;

use cubecl::Runtime;

use crate::contract::AttentionOptions;
pub use plan::KernelPath;
#[cfg(feature = "internals")]
pub use plan::{SplitPlan, SplitState, WorkspaceShape};

use crate::device::{DeviceBatch, DeviceRows, PagedKvCache};
use crate::error::{Fp8KvError, KvSide, Result};
use crate::kernels::CacheGeometry;

/// Query rows (new tokens × heads of one KV group) one cube serves from each K/V load. Larger
/// groups (or several new tokens) use several row blocks, which re-read the cache through L2.
#[cfg_attr(feature = "internals", visibility::make(pub))]
pub(crate) const MAX_ROWS_PER_CUBE: usize = 8;

/// Comptime configuration of [`kernel::decode_split_kernel()`] (the JIT key besides the
/// dtypes). Runtime: batch, lengths, block table, scales, softcap value, window size, split
/// length and count.
#[cfg_attr(feature = "internals", visibility::make(pub))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct DecodeConfig {
    /// K cache geometry (page size, KV heads, head dim, Bshd/Bhsd).
    pub k: CacheGeometry,
    /// V cache geometry.
    pub v: CacheGeometry,
    /// Query heads per KV head.
    pub group: u32,
    /// Query rows per cube (≤ [`MAX_ROWS_PER_CUBE`]).
    pub rows: u32,
    /// Cache tokens per tile ([`plan::TILE_TOKENS`]).
    pub tile_tokens: u32,
    /// Threads per cube.
    pub threads: u32,
    /// Lanes sharing one token's K row (a power of two ≤ 8).
    pub k_lanes: u32,
    /// Elements per K vector load (16 bytes).
    pub k_vec: u32,
    /// Elements per V vector load (16 bytes, narrower when the rows' accumulators would need
    /// more than 32 registers).
    pub v_vec: u32,
    /// FP8 caches: the bit position of the code's exponent in the decoded f32 (20 for E4M3, 21
    /// for E5M2), see [`kernel::decode_vector()`]; `None` for the f16/bf16 cache (plain cast).
    pub fp8_shift: Option<u32>,
    /// Keep this lane's query values in registers (otherwise read from shared memory).
    pub q_in_regs: bool,
    /// Issue all of a tile's K loads before the first score (off when that needs too many
    /// registers: then each pass loads its own).
    pub k_prefetch: bool,
    /// Issue a tile's V loads before its K phase (off when that needs too many registers).
    pub v_prefetch: bool,
    /// Logit softcap on.
    pub softcap: bool,
    /// ALiBi on.
    pub alibi: bool,
    /// Sliding window on.
    pub window: bool,
}

/// Optional controls of [`paged_decode_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitChoice {
    /// Plan from the problem and the device's SM count (`SplitPlan::new`).
    #[default]
    Auto,
    /// Force slices of this many cache tokens (rounded up to whole tiles).
    Tokens(usize),
}

/// Paged decode attention: `out[t, h, :] = attention(q[t, h, :], cache of t's sequence)`.
///
/// - `q`: `[num_tokens, num_heads * head_dim_k]` rows (f32/f16/bf16; a row stride above the row
///   length is allowed, e.g. a slice of a fused QKV output), `num_tokens` = the batch's packed
///   new-token count (`batch` built with [`DeviceBatch::new`]).
/// - `cache`: the layer's paged K/V cache; `batch` must have been validated against its layout.
/// - `out`: `[num_tokens, num_heads * head_dim_v]`, contiguous, same dtype as `q`. Rows that
///   belong to no sequence are not written; a query that sees no key (an empty window) gets 0.
///
/// Errors: [`Fp8KvError::HeadRatio`], [`Fp8KvError::ShapeMismatch`], [`Fp8KvError::UnsupportedDtype`],
/// [`Fp8KvError::InvalidOption`] (from [`AttentionOptions::validate`], or a batch built with
/// [`DeviceBatch::for_reads`]), and [`Fp8KvError::TooLarge`] for more than 65535 sequences or
/// new tokens in one sequence (CUDA's grid limits) and sizes past the kernels' 32-bit indexing.
pub fn paged_decode<R: Runtime>(
    q: &DeviceRows<R>,
    num_heads: usize,
    cache: &PagedKvCache<R>,
    batch: &DeviceBatch<R>,
    opts: &AttentionOptions,
    out: &mut DeviceRows<R>,
) -> Result<()> {
    paged_decode_with(q, num_heads, cache, batch, opts, SplitChoice::Auto, out)
}

/// [`paged_decode`] with an explicit split choice (tests use it to force many splits).
pub fn paged_decode_with<R: Runtime>(
    q: &DeviceRows<R>,
    num_heads: usize,
    cache: &PagedKvCache<R>,
    batch: &DeviceBatch<R>,
    opts: &AttentionOptions,
    split: SplitChoice,
    out: &mut DeviceRows<R>,
) -> Result<()> {
    paged_decode_path(
        q,
        num_heads,
        cache,
        batch,
        opts,
        split,
        KernelPath::Auto,
        out,
    )
}

/// [`paged_decode_with`] with an explicit split kernel: tests force either path, and
/// [`KernelPath::TensorCores`] returns [`Fp8KvError::InvalidOption`] where that kernel does not
/// apply (head dims other than 64/128 with K = V).
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_path<R: Runtime>(
    q: &DeviceRows<R>,
    num_heads: usize,
    cache: &PagedKvCache<R>,
    batch: &DeviceBatch<R>,
    opts: &AttentionOptions,
    split: SplitChoice,
    path: KernelPath,
    out: &mut DeviceRows<R>,
) -> Result<()> {
    let layout = *cache.layout();
    batch.check_layout(&layout)?;
    let kv_heads = layout.num_kv_heads();
    if num_heads == 0 || !num_heads.is_multiple_of(kv_heads) {
        return Err(Fp8KvError::HeadRatio {
            num_heads,
            num_kv_heads: kv_heads,
        });
    }
    opts.validate(num_heads)?;
    let num_tokens = batch.num_tokens().ok_or_else(|| {
        Fp8KvError::InvalidOption(
            "decode needs a DeviceBatch built with DeviceBatch::new (its query fields validated), not for_reads".into(),
        )
    })?;
    let (dk, dv) = (layout.head_dim_k(), layout.head_dim_v());
    if !q.dtype().is_activation() || out.dtype() != q.dtype() {
        return Err(Fp8KvError::UnsupportedDtype(format!(
            "q and out must share one activation dtype (f32, f16, bf16), got q {} and out {}",
            q.dtype(),
            out.dtype()
        )));
    }
    if q.rows() != num_tokens || q.row_elems() != num_heads * dk {
        return Err(Fp8KvError::ShapeMismatch {
            what: "q",
            expected: format!("[{num_tokens}, {num_heads} * {dk}]"),
            actual: format!("[{}, {}]", q.rows(), q.row_elems()),
        });
    }
    if out.rows() != num_tokens
        || out.row_elems() != num_heads * dv
        || out.row_stride() != out.row_elems()
    {
        return Err(Fp8KvError::ShapeMismatch {
            what: "out",
            expected: format!("contiguous [{num_tokens}, {num_heads} * {dv}]"),
            actual: format!(
                "[{}, {}] with row stride {}",
                out.rows(),
                out.row_elems(),
                out.row_stride()
            ),
        });
    }
    let meta = batch.meta();
    // CUDA limits grid y and z to 65535: batch is grid y of both kernels, the longest query
    // grid z of the combine.
    crate::kernels::check_grid_batch(meta.batch())?;
    crate::error::check_limit(
        "new tokens of one sequence",
        meta.max_q_len(),
        crate::kernels::MAX_GRID_YZ,
        "CUDA's grid z limit: the combine kernel's grid z is the longest query",
    )?;
    // Kernels index with u32: the cache in vectors, the query/workspace/output in elements.
    let too_big = |what: &'static str, elems: usize| -> Result<()> {
        crate::error::check_limit(
            what,
            elems,
            u32::MAX as usize - 1,
            "the kernels' 32-bit indices",
        )
    };
    too_big(
        "K cache (in 16-byte vectors)",
        layout.cache_elems(KvSide::K) * cache.dtype().size_bytes() / 16,
    )?;
    too_big(
        "V cache (in 16-byte vectors)",
        layout.cache_elems(KvSide::V) * cache.dtype().size_bytes() / 16,
    )?;
    too_big("q", q.len_elems())?;
    // Every decision about the launch, made once (kernel, configuration, splits, workspace).
    let shape = launch::LaunchShape::new(cache, batch, q.dtype(), num_heads, num_tokens);
    let plan = launch::plan_decode(&shape, opts, path, split)?;
    if let launch::SplitKernel::Wide(_) = plan.kernel {
        // The wide kernel also reads K as 32-bit words.
        too_big(
            "K cache (in 4-byte words)",
            layout.cache_elems(KvSide::K) * cache.dtype().size_bytes() / 4,
        )?;
    }
    too_big("workspace", plan.workspace.o_elems())?;
    launch::launch_decode(q, cache, batch, opts, &plan, out)
}

/// A cache geometry for the applicability predicates, which do not depend on the page size,
/// the KV head count or the layout.
fn probe_geometry(head_dim: usize) -> crate::kernels::CacheGeometry {
    crate::kernels::CacheGeometry {
        page_size: 16,
        num_kv_heads: 1,
        head_dim: head_dim as u32,
        bhsd: false,
    }
}

/// Whether [`KernelPath::TensorCores`] applies to a cache of `cache_dtype` with these head
/// dims for every query dtype, group and number of new tokens (and every page size, layout
/// and option): head dims 64 and 128. See [`tensor_cores_apply_to()`] for one launch's shape.
pub fn tensor_cores_apply(
    cache_dtype: crate::policy::Dtype,
    head_dim_k: usize,
    head_dim_v: usize,
) -> bool {
    // f32 queries and two row tiles are the most the kernel can be asked for.
    tensor_cores_apply_to(
        cache_dtype,
        crate::policy::Dtype::F32,
        head_dim_k,
        head_dim_v,
        16,
        1,
    )
}

/// Whether [`KernelPath::TensorCores`] applies to one launch: a cache of `cache_dtype`, queries
/// of `query_dtype`, these head dims, `group` query heads per KV head and at most `max_q_len`
/// new tokens per sequence. Beyond [`tensor_cores_apply()`]'s head dims 64 and 128 this
/// includes head dim 256 with an FP8 cache, bf16 or f16 queries and `group × max_q_len ≤ 8`.
/// False for a group of 0, which no launch accepts.
pub fn tensor_cores_apply_to(
    cache_dtype: crate::policy::Dtype,
    query_dtype: crate::policy::Dtype,
    head_dim_k: usize,
    head_dim_v: usize,
    group: usize,
    max_q_len: usize,
) -> bool {
    if group == 0 {
        return false;
    }
    select::mma_config(
        cache_dtype,
        query_dtype,
        probe_geometry(head_dim_k),
        probe_geometry(head_dim_v),
        group as u32,
        group * max_q_len,
        &AttentionOptions::default(),
    )
    .is_some()
}

/// Whether [`KernelPath::TensorCoresKeyMajor`] applies to one launch: wherever
/// [`tensor_cores_apply_to()`] does, and for the wide heads of `wide` (MLA's K 576 / V 512)
/// with an FP8, f16 or bf16 cache and a query the MMA type holds in one part (bf16 queries,
/// or f16 queries with an FP8 or f16 cache), any group and number of new tokens.
pub fn key_major_applies_to(
    cache_dtype: crate::policy::Dtype,
    query_dtype: crate::policy::Dtype,
    head_dim_k: usize,
    head_dim_v: usize,
    group: usize,
    max_q_len: usize,
) -> bool {
    if tensor_cores_apply_to(
        cache_dtype,
        query_dtype,
        head_dim_k,
        head_dim_v,
        group,
        max_q_len,
    ) {
        return true;
    }
    group > 0
        && select::wide_config(
            cache_dtype,
            query_dtype,
            probe_geometry(head_dim_k),
            probe_geometry(head_dim_v),
            group as u32,
            group * max_q_len,
            &AttentionOptions::default(),
        )
        .is_some()
}

/// The split kernel [`KernelPath::Auto`] picks, with default [`AttentionOptions`], on
/// `client`'s device for a cache of `cache_dtype`, queries of `query_dtype`, these head dims,
/// `group` query heads per KV head and at most `max_q_len` new tokens per sequence (the
/// table of shape classes and the measurement behind each: `launch::auto_config`, in
/// ARCHITECTURE.md and `benches/PERFORMANCE.md`). [`KernelPath::TensorCoresKeyMajor`] also
/// stands for the wide MLA kernel; options other than the defaults never change the kernel.
/// [`KernelPath::CudaCores`] for a group of 0 (which no launch accepts).
pub fn auto_path<R: Runtime>(
    client: &cubecl::client::ComputeClient<R>,
    cache_dtype: crate::policy::Dtype,
    query_dtype: crate::policy::Dtype,
    head_dim_k: usize,
    head_dim_v: usize,
    group: usize,
    max_q_len: usize,
) -> KernelPath {
    let supported = plan::MMA_BY_DEFAULT && select::mma_supported(client, cache_dtype);
    auto_path_for(
        cache_dtype,
        query_dtype,
        head_dim_k,
        head_dim_v,
        group,
        max_q_len,
        supported,
    )
}

/// [`auto_path`] for a device that has (`mma_supported`) or lacks the tensor cores' MMA.
pub(crate) fn auto_path_for(
    cache_dtype: crate::policy::Dtype,
    query_dtype: crate::policy::Dtype,
    head_dim_k: usize,
    head_dim_v: usize,
    group: usize,
    max_q_len: usize,
    mma_supported: bool,
) -> KernelPath {
    if group == 0 {
        return KernelPath::CudaCores;
    }
    match select::auto_config(
        cache_dtype,
        query_dtype,
        probe_geometry(head_dim_k),
        probe_geometry(head_dim_v),
        group as u32,
        group * max_q_len,
        &AttentionOptions::default(),
        mma_supported,
    ) {
        None => KernelPath::CudaCores,
        Some(c) if c.key_major => KernelPath::TensorCoresKeyMajor,
        Some(_) => KernelPath::TensorCores,
    }
}

#[cfg(test)]
mod tests {
    use super::{auto_path_for, KernelPath};
    use crate::policy::Dtype;

    /// The shape-class table of `launch::auto_config`, one row per class (hand-written
    /// expectations: the measured winner of each class).
    #[test]
    fn auto_picks_the_measured_winner_per_shape_class() {
        use Dtype::{Bf16, E4m3, E5m2, F16, F32};
        use KernelPath::{CudaCores, TensorCores, TensorCoresKeyMajor as KeyMajor};
        // (cache, query, dk, dv, group, new tokens, MMA on the device, expected)
        let table = [
            (E4m3, Bf16, 128, 128, 4, 1, true, KeyMajor), // Llama-3-8B
            (E5m2, F16, 128, 128, 4, 1, true, KeyMajor),
            (E4m3, Bf16, 128, 128, 4, 2, true, KeyMajor), // 8 rows: one tile
            (E4m3, Bf16, 128, 128, 4, 4, true, TensorCores), // 16 rows: two tiles
            (E4m3, Bf16, 256, 256, 2, 1, true, KeyMajor), // Gemma-2
            (E4m3, Bf16, 64, 64, 3, 1, true, KeyMajor),   // SmolLM2
            (E4m3, Bf16, 64, 64, 4, 1, true, TensorCores), // Llama-3.2-1B
            (Bf16, Bf16, 128, 128, 4, 1, true, TensorCores),
            (F16, F16, 64, 64, 3, 1, true, KeyMajor), // SmolLM2, unquantized
            (Bf16, Bf16, 64, 64, 4, 1, true, TensorCores),
            (Bf16, Bf16, 64, 64, 3, 3, true, TensorCores), // 9 rows: two tiles
            (E4m3, Bf16, 576, 512, 16, 1, true, KeyMajor), // MLA: the wide kernel
            (Bf16, Bf16, 576, 512, 16, 1, true, KeyMajor),
            (E4m3, F32, 576, 512, 16, 1, true, CudaCores),
            (E4m3, F32, 128, 128, 4, 1, true, KeyMajor), // f32 queries in parts
            (E4m3, Bf16, 96, 96, 4, 1, true, CudaCores),
            (E4m3, Bf16, 128, 128, 4, 1, false, CudaCores), // no MMA on the device
            (E4m3, Bf16, 128, 128, 0, 1, true, CudaCores),
        ];
        for (cache, query, dk, dv, group, q_len, mma, expected) in table {
            assert_eq!(
                auto_path_for(cache, query, dk, dv, group, q_len, mma),
                expected,
                "{cache} cache, {query} queries, {dk}/{dv}, group {group}, {q_len} new tokens"
            );
        }
    }
}
