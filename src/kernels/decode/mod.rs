//! Paged decode attention over the FP8 (or unquantized) cache: split-K flash-decoding.
//!
//! Computes exactly [`crate::reference::paged_decode`]: for every new token `i` of sequence `b`
//! (position `p = kv_len − q_len + i`, causal among the new tokens) and every query head `h`
//! (KV head `h / (num_heads / num_kv_heads)`),
//! `s_j = (q · f32(K_j)) · k_scale · sm_scale` → softcap → ALiBi → softmax (with the sink in
//! the denominator) → `o = Σ_j (p_j · v_scale) · f32(V_j)`, f32 accumulation, output in the
//! query dtype. The unquantized cache ignores the scales.
//!
//! A skeleton with routines:
//! - `definition`: the problem ([`DecodeOptions`], [`DecodeShape`], the validated problem of one
//!   launch) and `definition::split` (the split plan, the workspace, the partial-state merge);
//! - `common`: what every split kernel shares (work range, split scalars, FP8 bit decode) and,
//!   in `common::fragments`, what the tensor-core kernels share (MMA configuration, fragment
//!   loads and conversions, softmax exchange, PV);
//! - `routines`: one file per split kernel ([`DecodeStrategy`]: CUDA cores, tensor cores,
//!   key-major, wide), each owning when it applies, its configuration and its launch behind
//!   one trait, the Auto table in one place, and the plan and launch of a call;
//! - `combine`: the merge of the splits' partial states into the output, as the split kernel's
//!   tail (the last cube of a row block merges; Auto's choice for the tensor-core kernels up
//!   to 16 splits) or as a second kernel.

pub(crate) mod combine;
pub(crate) mod common;
pub(crate) mod definition;
pub(crate) mod routines;

use cubecl::client::ComputeClient;
use cubecl::Runtime;

pub use definition::{CombineChoice, DecodeOptions, DecodeShape, DecodeStrategy, SplitChoice};

use crate::device::{DeviceBatch, DeviceRows, PagedKvCache};
use crate::error::{Fp8KvError, KvSide, Result};
use crate::policy::Dtype;
use definition::{check_index, DecodeProblem};

/// Paged decode attention: `out[t, h, :] = attention(q[t, h, :], cache of t's sequence)`.
///
/// - `q`: `[num_tokens, num_heads * head_dim_k]` rows (f32/f16/bf16; a row stride above the row
///   length is allowed, e.g. a slice of a fused QKV output), `num_tokens` = the batch's packed
///   new-token count (`batch` built with [`DeviceBatch::new`]); the head count is the row
///   length over the cache's `head_dim_k`.
/// - `cache`: the layer's paged K/V cache; `batch` must have been validated against its layout.
/// - `opts`: the attention options, and optionally a forced split kernel or split length
///   ([`DecodeOptions::default`] for the defaults; `&attention.clone().into()` from plain
///   [`crate::AttentionOptions`]).
/// - `out`: `[num_tokens, num_heads * head_dim_v]`, contiguous, same dtype as `q`. Rows that
///   belong to no sequence are not written; a query that sees no key (an empty window) gets 0.
///
/// Errors: [`Fp8KvError::HeadRatio`], [`Fp8KvError::ShapeMismatch`],
/// [`Fp8KvError::UnsupportedDtype`], [`Fp8KvError::InvalidOption`] (from
/// [`crate::AttentionOptions::validate`], a forced kernel that does not apply, or a batch built
/// with [`DeviceBatch::for_reads`]), and [`Fp8KvError::TooLarge`] for more than 65535
/// sequences or new tokens in one sequence (CUDA's grid limits) and sizes past the kernels'
/// 32-bit indexing.
pub fn paged_decode<R: Runtime>(
    q: &DeviceRows<R>,
    cache: &PagedKvCache<R>,
    batch: &DeviceBatch<R>,
    opts: &DecodeOptions,
    out: &mut DeviceRows<R>,
) -> Result<()> {
    let layout = *cache.layout();
    let (dk, dv) = (layout.head_dim_k(), layout.head_dim_v());
    if !q.row_elems().is_multiple_of(dk) {
        return Err(Fp8KvError::ShapeMismatch {
            what: "q",
            expected: format!("rows of num_heads × {dk} (the cache's head_dim_k)"),
            actual: format!("rows of {}", q.row_elems()),
        });
    }
    let num_heads = q.row_elems() / dk;
    if out.dtype() != q.dtype() {
        return Err(Fp8KvError::UnsupportedDtype(format!(
            "q and out must share one activation dtype (f32, f16, bf16), got q {} and out {}",
            q.dtype(),
            out.dtype()
        )));
    }
    let p = DecodeProblem::new(cache, batch, q.dtype(), num_heads, &opts.attention)?;
    if q.rows() != p.num_tokens {
        return Err(Fp8KvError::ShapeMismatch {
            what: "q",
            expected: format!("[{}, {num_heads} * {dk}]", p.num_tokens),
            actual: format!("[{}, {}]", q.rows(), q.row_elems()),
        });
    }
    if out.rows() != p.num_tokens
        || out.row_elems() != num_heads * dv
        || out.row_stride() != out.row_elems()
    {
        return Err(Fp8KvError::ShapeMismatch {
            what: "out",
            expected: format!("contiguous [{}, {num_heads} * {dv}]", p.num_tokens),
            actual: format!(
                "[{}, {}] with row stride {}",
                out.rows(),
                out.row_elems(),
                out.row_stride()
            ),
        });
    }
    check_index("q", q.len_elems())?;
    // Every decision about the launch, made once (routine, configuration, splits, workspace).
    let plan = routines::plan_decode(&p, opts)?;
    if let routines::RoutineConfig::Wide(_) = plan.routine {
        // The wide kernel also reads K as 32-bit words.
        check_index(
            "K cache (in 4-byte words)",
            layout.cache_elems(KvSide::K) * cache.dtype().size_bytes() / 4,
        )?;
    }
    routines::launch_decode(q, cache, batch, &opts.attention, &plan, out)
}

/// What [`paged_decode`] decides for one launch, before launching anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlanInfo {
    /// The split kernel it runs.
    pub strategy: DecodeStrategy,
    /// Query rows (new tokens × heads of one KV group) one cube serves.
    pub rows_per_cube: usize,
    /// Blocks of `rows_per_cube` rows per (sequence, KV head).
    pub row_blocks: usize,
    /// Slices each sequence's cache is cut into.
    pub num_splits: usize,
    /// Cache tokens per slice.
    pub split_tokens: usize,
    /// Bytes of the f32 workspace the split kernel writes its partial states to.
    pub workspace_bytes: usize,
    /// Whether the split kernel merges the splits itself (one launch) rather than a separate
    /// combine kernel.
    pub combine_in_kernel: bool,
}

/// The plan [`paged_decode`] makes for queries of `query` dtype with `num_heads` heads on
/// `cache` and `batch` with `opts`: the same validation (apart from the query and output
/// buffers) and the same errors, nothing launched.
pub fn decode_plan<R: Runtime>(
    cache: &PagedKvCache<R>,
    batch: &DeviceBatch<R>,
    query: Dtype,
    num_heads: usize,
    opts: &DecodeOptions,
) -> Result<DecodePlanInfo> {
    let p = DecodeProblem::new(cache, batch, query, num_heads, &opts.attention)?;
    let plan = routines::plan_decode(&p, opts)?;
    Ok(DecodePlanInfo {
        strategy: plan.routine.strategy(),
        rows_per_cube: plan.rows,
        row_blocks: plan.row_blocks,
        num_splits: plan.split.num_splits,
        split_tokens: plan.split.split_tokens,
        workspace_bytes: plan.workspace.bytes(),
        combine_in_kernel: plan.merge.on,
    })
}

/// The split kernel [`paged_decode`] picks without a forced one, on `client`'s device, for a
/// launch of `shape` (the table of shape classes and the measurement behind each:
/// `routines::auto_strategy_for`, ARCHITECTURE.md and `benches/PERFORMANCE.md`). Attention
/// options never change the pick. [`DecodeStrategy::CudaCores`] for a group of 0 (which no
/// launch accepts).
pub fn auto_strategy<R: Runtime>(client: &ComputeClient<R>, shape: &DecodeShape) -> DecodeStrategy {
    routines::auto_strategy_for(&shape.probe(routines::mma_supported(client, shape.cache)))
}
