//! The split routines of paged decode: one file per routine ([`cuda_cores`], [`tensor_cores`],
//! [`key_major`], [`wide`]), each owning when it applies, its comptime configuration and its
//! launch behind [`SplitRoutine`]; their `#[cube]` kernels sit beside them (`*_kernel.rs`).
//! Here: the Auto table (the one place that picks a routine per shape class), the plan of one
//! launch ([`plan_decode`]) and the launch (the chosen routine, then the combine).
//!
//! Comptime (JIT key): activation and cache dtypes, K and V [`CacheGeometry`] (page size, KV
//! heads, head dims, Bshd/Bhsd), GQA group, rows per cube, tile, threads, vector widths, V
//! prefetch, softcap / ALiBi / window on-off, and for the combine the V head dim and sinks
//! on-off. Runtime: batch, every length and start, the block table, scales, softcap value,
//! window length, split length and count.

pub(crate) mod cuda_cores;
#[allow(missing_docs)]
pub(crate) mod cuda_cores_kernel;
pub(crate) mod key_major;
#[allow(missing_docs)]
pub(crate) mod mma_kernel;
pub(crate) mod tensor_cores;
pub(crate) mod wide;
#[allow(missing_docs)]
pub(crate) mod wide_kernel;

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::combine::{decode_combine_kernel, InKernelMerge, FUSED_MAX_SPLITS};
use super::common::fragments::MmaConfig;
use super::common::{SplitParamsLaunch, PLANE_LANES};
use super::definition::split::{SplitPlan, WorkspaceShape, MAX_SPLITS, MMA_BY_DEFAULT};
use super::definition::{
    check_index, CombineChoice, DecodeOptions, DecodeProblem, DecodeStrategy, SplitChoice,
};
use crate::contract::AttentionOptions;
use crate::device::{storage_type, BatchOffsets, DeviceBatch, DeviceRows, PagedKvCache};
use crate::error::{Fp8KvError, Result};
#[cfg(test)]
use crate::kernels::CacheGeometry;
use crate::policy::{Dtype, QuantPolicy};
pub(crate) use cuda_cores::DecodeConfig;
pub(crate) use tensor_cores::mma_supported;

/// Most splits for which [`CombineChoice::Auto`] merges in the split kernel (one launch a
/// call instead of two). `decode --bench --ab-combine` (H200, 2026-12-06, in-kernel /
/// separate, second pass): 0.886 at 1 × 4096 (16 splits), 0.96 at 32 × 4096 (2 splits, pages
/// of 64 and 16), 0.99 at 32 × 32768; but 1.083 at 1 × 32768, where 64 splits of 8 row
/// blocks leave the merge to 8 cubes while the combine kernel spreads it over 32. Between 17
/// and 64 splits it was not measured: those plans keep the combine kernel.
///
/// Only the tensor-core routines merge under Auto ([`auto_merges`]). H100, 2026-12-07, the
/// same bench (second pass): the tensor-core and key-major kernels 0.74–0.99 at every
/// shape of at most 16 splits but SmolLM2 32 × 8192 (1.137 at its 5-split plan of then) and
/// the bf16 cache's single split (1.007); the wide kernel at MLA 576/512 32 × 8192 1.523 (8
/// splits: one cube per sequence merges 16 rows of 512 while the combine kernel spreads them
/// over 16 cubes).
const AUTO_FUSED_MAX_SPLITS: usize = 16;
const _: () = assert!(AUTO_FUSED_MAX_SPLITS <= FUSED_MAX_SPLITS as usize);

/// Threads per combine cube: 8 warps, so a 128-wide V head reads 8 splits at a time (4 per
/// lane in flight) and a 512-wide one 2.
const COMBINE_THREADS: u32 = 256;

/// The buffers and scalars every split kernel takes, ready for one launch.
pub(crate) struct SplitArgs<'a, R: Runtime> {
    /// The client to launch on.
    pub client: &'a ComputeClient<R>,
    /// `(num_kv_heads · row_blocks, batch, num_splits)`.
    pub grid: CubeCount,
    /// Queries.
    pub q: &'a DeviceRows<R>,
    /// The layer's cache.
    pub cache: &'a PagedKvCache<R>,
    /// The batch metadata buffer and its length in `i32`.
    pub meta: (Handle, usize),
    /// ALiBi slopes (or a 1-element dummy) and their count.
    pub alibi: (Handle, usize),
    /// Workspace `o` and `(m, d)` parts, with their lengths in f32.
    pub ws_o: (Handle, usize),
    /// See `ws_o`.
    pub ws_md: (Handle, usize),
    /// The `o` part again as 4-float vectors (the fused merge reads it so).
    pub ws_o4: (Handle, usize),
    /// Arrival counters, one `u32` per grid x·y (all zero between launches).
    pub counters: (Handle, usize),
    /// Sink logits (or a 1-element dummy) and their count.
    pub sinks: (Handle, usize),
    /// The output and its length in elements.
    pub out: (Handle, usize),
    /// Whether the split kernel merges (and with sinks).
    pub merge: InKernelMerge,
    /// The runtime scalars.
    pub params: SplitParamsLaunch<R>,
    /// The query dtype.
    pub act: StorageType,
}

/// One split kernel: where it applies, its comptime configuration and its launch. Every
/// routine writes the same workspace (`definition::split::WorkspaceShape`), which the combine
/// merges.
pub(crate) trait SplitRoutine {
    /// The kernel's comptime configuration.
    type Config: Copy;
    /// The public name.
    const STRATEGY: DecodeStrategy;
    /// The configuration where this routine applies to `p`, `None` where it does not.
    fn config(p: &DecodeProblem, opts: &AttentionOptions) -> Option<Self::Config>;
    /// Query rows one cube serves.
    fn rows_per_cube(cfg: &Self::Config) -> usize;
    /// Cubes of the kernel one SM holds at once (the split planner fills the device with them).
    fn resident_cubes(cfg: &Self::Config) -> usize;
    /// Launches the split kernel.
    ///
    /// # Safety
    /// `args` come from [`launch_decode`] for a problem validated by `paged_decode`; see the
    /// SAFETY comment there for what each length and index relies on.
    unsafe fn launch<R: Runtime>(cfg: Self::Config, args: SplitArgs<'_, R>);
}

/// The routine of one launch with its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RoutineConfig {
    /// [`cuda_cores::CudaCores`].
    CudaCores(DecodeConfig),
    /// [`tensor_cores::TensorCores`].
    TensorCores(MmaConfig),
    /// [`key_major::KeyMajor`].
    KeyMajor(MmaConfig),
    /// [`wide::Wide`].
    Wide(MmaConfig),
}

/// Runs `$body` with `$r` bound to the routine type of `$cfg` and `$c` to its configuration.
macro_rules! with_routine {
    ($cfg:expr, |$r:ident, $c:ident| $body:expr) => {
        match $cfg {
            RoutineConfig::CudaCores($c) => {
                type $r = cuda_cores::CudaCores;
                $body
            }
            RoutineConfig::TensorCores($c) => {
                type $r = tensor_cores::TensorCores;
                $body
            }
            RoutineConfig::KeyMajor($c) => {
                type $r = key_major::KeyMajor;
                $body
            }
            RoutineConfig::Wide($c) => {
                type $r = wide::Wide;
                $body
            }
        }
    };
}

impl RoutineConfig {
    /// The public name of the routine.
    pub(crate) fn strategy(&self) -> DecodeStrategy {
        with_routine!(self, |R, _c| R::STRATEGY)
    }
    /// Query rows one cube serves.
    pub(crate) fn rows_per_cube(&self) -> usize {
        with_routine!(self, |R, c| R::rows_per_cube(c))
    }
    /// Cubes one SM holds at once.
    pub(crate) fn resident_cubes(&self) -> usize {
        with_routine!(self, |R, c| R::resident_cubes(c))
    }
}

/// The configuration of `strategy` for `p`, `None` where that routine does not apply.
pub(crate) fn config_for(
    strategy: DecodeStrategy,
    p: &DecodeProblem,
    opts: &AttentionOptions,
) -> Option<RoutineConfig> {
    fn of<T: SplitRoutine>(
        p: &DecodeProblem,
        opts: &AttentionOptions,
        wrap: fn(T::Config) -> RoutineConfig,
    ) -> Option<RoutineConfig> {
        T::config(p, opts).map(wrap)
    }
    match strategy {
        DecodeStrategy::CudaCores => of::<cuda_cores::CudaCores>(p, opts, RoutineConfig::CudaCores),
        DecodeStrategy::TensorCores => {
            of::<tensor_cores::TensorCores>(p, opts, RoutineConfig::TensorCores)
        }
        DecodeStrategy::KeyMajor => of::<key_major::KeyMajor>(p, opts, RoutineConfig::KeyMajor),
        DecodeStrategy::Wide => of::<wide::Wide>(p, opts, RoutineConfig::Wide),
    }
}

/// What Auto launches: the routine measured fastest for the shape class (`--ab` on the H200,
/// key-major time / default tensor-core time, batch × context 1 × 32768 to 128 × 32768, page
/// 64; `benches/PERFORMANCE.md`). The one table of measured winners:
///
/// | shape class | routine | measured |
/// |---|---|---|
/// | FP8 cache, head dim 128 or 256, one row tile | key-major | d128 0.85–0.97 (one run 1.03), d256 0.87 |
/// | FP8 cache, head dim 64, group ≤ 3, one row tile | key-major | SmolLM2 9/3: 47.6 / 65.2 µs = 0.73 |
/// | FP8 cache, head dim 64, group ≥ 4 | tensor-cores | Llama-3.2-1B 32/8: 1.094–1.157 |
/// | f16/bf16 cache, head dim 64, group ≤ 3, one row tile | key-major | SmolLM2 9/3: 0.876 (twice) |
/// | other f16/bf16 caches | tensor-cores | bf16 d128: 0.983–1.053; d64 32/8: 1.114 |
/// | two row tiles (group × new tokens > 8) | tensor-cores | key-major has one row tile |
/// | MLA 576/512, one-part query | wide | 137 / 1739 µs (CUDA cores) = 0.079 |
/// | everything else (f32 queries on wide heads, other head dims), or no MMA | cuda-cores | |
pub(crate) fn auto_strategy_for(p: &DecodeProblem) -> DecodeStrategy {
    let opts = AttentionOptions::default();
    if !(MMA_BY_DEFAULT && p.mma) || p.group() == 0 {
        return DecodeStrategy::CudaCores;
    }
    if let Some(c) = key_major::KeyMajor::config(p, &opts) {
        // One row tile: small groups at d64 on any cache; d128/d256 only on FP8 caches.
        let small_d64 = p.k.head_dim == 64 && p.group() <= 3;
        let fp8_wide = p.cache.fp8_format().is_some() && p.k.head_dim >= 128;
        if c.row_tiles == 1 && (small_d64 || fp8_wide) {
            return DecodeStrategy::KeyMajor;
        }
    }
    if tensor_cores::TensorCores::config(p, &opts).is_some() {
        return DecodeStrategy::TensorCores;
    }
    if wide::Wide::config(p, &opts).is_some() {
        return DecodeStrategy::Wide;
    }
    DecodeStrategy::CudaCores
}

/// One decode launch, decided once from the validated problem ([`plan_decode`]): the routine
/// and its configuration, how the rows and the cache are cut, and the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DecodePlan {
    /// The split routine.
    pub routine: RoutineConfig,
    /// Query rows per cube.
    pub rows: usize,
    /// Row blocks per (sequence, KV head).
    pub row_blocks: usize,
    /// Cache splits.
    pub split: SplitPlan,
    /// The workspace between the split kernel and the combine.
    pub workspace: WorkspaceShape,
    /// Whether the split kernel merges the splits itself (then no combine launch).
    pub merge: InKernelMerge,
}

/// Whether [`CombineChoice::Auto`] may merge in `strategy`'s split kernel: the tensor-core
/// routines (measured faster with it); the wide kernel measured slower, and the CUDA-core
/// kernel's merge was not measured, so both keep the combine kernel
/// ([`AUTO_FUSED_MAX_SPLITS`]).
fn auto_merges(strategy: DecodeStrategy) -> bool {
    matches!(
        strategy,
        DecodeStrategy::TensorCores | DecodeStrategy::KeyMajor
    )
}

/// Plans one launch: the forced routine (an error where it does not apply) or Auto's, rows
/// per cube, the split plan (`SplitPlan::new` over the device's SMs and the routine's
/// resident cubes, or the forced split length), the workspace.
pub(crate) fn plan_decode(p: &DecodeProblem, opts: &DecodeOptions) -> Result<DecodePlan> {
    let strategy = opts.strategy.unwrap_or_else(|| auto_strategy_for(p));
    let routine = config_for(strategy, p, &opts.attention).ok_or_else(|| {
        Fp8KvError::InvalidOption(format!(
            "the {strategy} decode kernel does not apply to head dims {}/{} with a {} cache, {} \
             queries and {} query rows per KV head",
            p.k.head_dim,
            p.v.head_dim,
            p.cache,
            p.act,
            p.max_rows()
        ))
    })?;
    let rows = routine.rows_per_cube();
    let row_blocks = p.max_rows().max(1).div_ceil(rows);
    let split = match opts.split {
        SplitChoice::Auto => {
            let base = p.k.num_kv_heads as usize * p.batch * row_blocks;
            SplitPlan::new(base, p.max_kv_len, p.sm_count, routine.resident_cubes())
        }
        SplitChoice::Tokens(n) => SplitPlan::with_split_tokens(n, p.max_kv_len)?,
    };
    let workspace = WorkspaceShape {
        num_tokens: p.num_tokens,
        num_heads: p.num_heads,
        num_splits: split.num_splits,
        head_dim_v: p.v.head_dim as usize,
    };
    check_index("workspace", workspace.o_elems())?;
    let fits = split.num_splits <= FUSED_MAX_SPLITS as usize;
    let fused = match opts.combine {
        CombineChoice::Auto => {
            auto_merges(routine.strategy()) && split.num_splits <= AUTO_FUSED_MAX_SPLITS
        }
        CombineChoice::Separate => false,
        CombineChoice::InKernel if fits => true,
        CombineChoice::InKernel => {
            return Err(Fp8KvError::InvalidOption(format!(
                "the in-kernel merge takes at most {FUSED_MAX_SPLITS} splits, the plan has {}",
                split.num_splits
            )))
        }
    };
    Ok(DecodePlan {
        routine,
        rows,
        row_blocks,
        split,
        workspace,
        merge: InKernelMerge {
            on: fused,
            sinks: fused && opts.attention.sinks.is_some(),
        },
    })
}

/// A small f32 array uploaded to the device, or (when absent) `dummy` passed as a 1-element
/// array the kernel never reads (its feature flag is off), so no upload happens per call.
fn small_f32<R: Runtime>(
    client: &ComputeClient<R>,
    v: Option<&[f32]>,
    dummy: &Handle,
) -> (Handle, usize) {
    match v {
        Some(v) if !v.is_empty() => (client.create_from_slice(f32::as_bytes(v)), v.len()),
        _ => (dummy.clone(), 1),
    }
}

/// Launches the split routine and the combine of `plan` for validated input.
pub(crate) fn launch_decode<R: Runtime>(
    q: &DeviceRows<R>,
    cache: &PagedKvCache<R>,
    batch: &DeviceBatch<R>,
    opts: &AttentionOptions,
    plan: &DecodePlan,
    out: &mut DeviceRows<R>,
) -> Result<()> {
    let meta = batch.meta();
    let num_tokens = q.rows();
    if num_tokens == 0 || meta.batch() == 0 {
        return Ok(());
    }
    let client = cache.client().clone();
    if client.properties().hardware.plane_size_max != PLANE_LANES {
        return Err(Fp8KvError::Runtime(format!(
            "the decode kernels need {PLANE_LANES}-lane planes, the device has {}",
            client.properties().hardware.plane_size_max
        )));
    }
    // The kernels read the metadata sections at these fixed offsets.
    debug_assert_eq!(
        batch.offsets(),
        BatchOffsets::new(meta.batch(), meta.max_pages_per_seq())
    );
    let layout = *cache.layout();
    let kv_heads = layout.num_kv_heads();
    let num_heads = plan.workspace.num_heads;
    let dk = layout.head_dim_k();
    let fp8 = cache.policy() != QuantPolicy::None;
    let sm_scale = opts.sm_scale.unwrap_or(1.0 / (dk as f32).sqrt());
    // The unquantized cache ignores the scales (as the reference does).
    let (k_scale, v_scale) = if fp8 {
        (cache.scales().k(), cache.scales().v())
    } else {
        (1.0, 1.0)
    };

    let ws = plan.workspace;
    // Allocated by the step's first decode call, reused by every layer after it.
    let ws_o = batch.scratch(&client, 0, ws.o_elems() * 4, false);
    let ws_md = batch.scratch(&client, 1, ws.md_elems() * 4, false);
    // The arrival counters only where the split kernel merges (otherwise it never reads them:
    // a 1-element dummy, and no zeroed allocation).
    let grid_xy = kv_heads * plan.row_blocks * meta.batch();
    let counters = if plan.merge.on {
        (batch.scratch(&client, 2, grid_xy * 4, true), grid_xy)
    } else {
        (ws_md.clone(), 1)
    };
    let alibi = small_f32(&client, opts.alibi_slopes.as_deref(), &ws_md);
    let (sinks, sinks_len) = small_f32(&client, opts.sinks.as_deref(), &ws_md);
    let act = storage_type(q.dtype());
    let params = SplitParamsLaunch::new(
        meta.batch() as u32,
        meta.max_pages_per_seq() as u32,
        num_heads as u32,
        q.row_stride() as u32,
        plan.row_blocks as u32,
        plan.split.num_splits as u32,
        plan.split.split_tokens as u32,
        k_scale * sm_scale,
        v_scale,
        opts.softcap.unwrap_or(1.0),
        kernel_window(opts.window),
    );
    let meta_len = batch.offsets().len;
    let args = SplitArgs {
        client: &client,
        grid: CubeCount::Static(
            (kv_heads * plan.row_blocks) as u32,
            meta.batch() as u32,
            plan.split.num_splits as u32,
        ),
        q,
        cache,
        meta: (batch.handle().clone(), meta_len),
        alibi,
        ws_o: (ws_o.clone(), ws.o_elems()),
        ws_md: (ws_md.clone(), ws.md_elems()),
        ws_o4: (ws_o.clone(), ws.o_elems() / 4),
        counters,
        sinks: (sinks.clone(), sinks_len),
        out: (out.handle().clone(), out.len_elems()),
        merge: plan.merge,
        params,
        act,
    };
    // SAFETY: array lengths are the buffers' real sizes (q and out: `len_elems`, the
    // workspace: the sizes allocated just above, the caches: bytes in use / word or vector
    // bytes, alibi/sinks: `num_heads` values or a 1-element dummy the kernels do not read
    // when the option is off), and every index stays below them because `paged_decode`
    // (mod.rs) and `DecodeProblem::new` checked, before this launch:
    // - metadata: the batch was validated for writing against this cache's layout
    //   (`DeviceBatch::new` -> `BatchMetadata::validate`; `check_layout`): every block-table
    //   entry a sequence reads is in `[0, num_pages)` (caches hold at least `cache_elems`
    //   elements: `PagedKvCache::new` / `from_handles` / `from_host`), `q_seq_length <=
    //   kv_seqlens`, and each sequence's query rows lie inside `[0, num_tokens)`;
    // - shapes: `q` has exactly `num_tokens` rows of `num_heads x head_dim_k` (any stride; its
    //   buffer covers them, checked by `DeviceRows`), `out` exactly `num_tokens` contiguous
    //   rows of `num_heads x head_dim_v`; sinks and slopes hold one value per query head
    //   (`AttentionOptions::validate`);
    // - 32-bit arithmetic cannot wrap: the caches in 16-byte vectors (and 4-byte words for the
    //   wide kernel), q and the workspace in elements are below `u32::MAX` (`check_index`),
    //   the metadata below `u32::MAX` entries (`check_batch_buffer_len`), the window is clamped
    //   by `kernel_window`; the grid's y (batch) and the combine's z (longest query) are at most
    //   65535.
    // The fused merge (only when on) indexes the counters by grid x·y (`grid_xy` of them, zero
    // between launches: each launch's last cube per x·y resets its own), reads `num_splits ≤
    // FUSED_MAX_SPLITS` states of rows inside `[0, num_tokens)` and writes `out` as the combine
    // kernel does.
    // The tensor-core kernels read the caches as 32-bit words in vectors of 16 (or 8) bytes:
    // every lane piece they read is a whole multiple of its vector and starts at a multiple of
    // it (rows start at multiples of the head dim; see `mma_config`).
    unsafe {
        with_routine!(plan.routine, |Routine, c| Routine::launch(c, args));
        if plan.merge.on {
            return Ok(());
        }
        decode_combine_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(
                num_heads as u32,
                meta.batch() as u32,
                meta.max_q_len() as u32,
            ),
            CubeDim::new_1d(COMBINE_THREADS),
            // Whole 4-float vectors: every supported V head dim is a multiple of 4.
            ArrayArg::from_raw_parts(ws_o, ws.o_elems() / 4),
            ArrayArg::from_raw_parts(ws_md, ws.md_elems()),
            ArrayArg::from_raw_parts(batch.handle().clone(), meta_len),
            ArrayArg::from_raw_parts(sinks, sinks_len),
            ArrayArg::from_raw_parts(out.handle().clone(), out.len_elems()),
            meta.batch() as u32,
            num_heads as u32,
            plan.split.num_splits as u32,
            layout.head_dim_v() as u32,
            COMBINE_THREADS,
            MAX_SPLITS as u32,
            opts.sinks.is_some(),
            act,
        );
    }
    Ok(())
}

/// The MMA operand type for a cache: bf16 for the bf16 cache, f16 otherwise (FP8 converts to
/// f16 exactly).
pub(crate) fn mma_type(cache: Dtype) -> Dtype {
    if cache == Dtype::Bf16 {
        Dtype::Bf16
    } else {
        Dtype::F16
    }
}

/// The window as the kernels' `u32` parameter (read only when the window is on). They test
/// `t + window > pos` in `u32`, with positions and keys below 2^31 (`kv_seqlens` are `i32`):
/// a window clamped to `i32::MAX` keeps that sum from wrapping and still exceeds every
/// position, so it limits nothing, as the unclamped window would not either. A plain `as u32`
/// would turn a window of 2^32 into 0, and one near `u32::MAX` into a sum that wraps and hides
/// keys.
fn kernel_window(window: Option<usize>) -> u32 {
    window.map_or(1, |w| w.min(i32::MAX as usize) as u32)
}

/// A test geometry: `d` wide, `kv_heads` heads, `page` tokens per page, Bshd.
#[cfg(test)]
pub(crate) fn geom(d: usize, kv_heads: usize, page: usize) -> CacheGeometry {
    CacheGeometry {
        page_size: page as u32,
        num_kv_heads: kv_heads as u32,
        head_dim: d as u32,
        bhsd: false,
    }
}

/// One launch's problem on a 132-SM device with the MMA: `heads / kv_heads`, head dims, page
/// 64, `batch` sequences of `q_len` new and `kv_len` cached tokens.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn problem(
    cache: Dtype,
    act: Dtype,
    heads: usize,
    kv_heads: usize,
    (dk, dv): (usize, usize),
    batch: usize,
    q_len: usize,
    kv_len: usize,
) -> DecodeProblem {
    DecodeProblem {
        cache,
        act,
        k: geom(dk, kv_heads, 64),
        v: geom(dv, kv_heads, 64),
        num_heads: heads,
        num_tokens: batch * q_len,
        batch,
        max_q_len: q_len,
        max_kv_len: kv_len,
        sm_count: 132,
        mma: true,
    }
}

#[cfg(test)]
mod tests;
