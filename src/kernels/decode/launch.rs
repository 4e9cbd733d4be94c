//! Launchers of the decode kernels: assume validated input (see [`super::paged_decode_with`]),
//! plan the splits and pick cube counts and the comptime configuration.
//!
//! Comptime (JIT key): activation and cache dtypes, K and V [`CacheGeometry`] (page size, KV
//! heads, head dims, Bshd/Bhsd), GQA group, rows per cube, tile, threads, vector widths, V
//! prefetch, softcap / ALiBi / window on-off, and for the combine the V head dim and sinks
//! on-off. Runtime: batch, every length and start, the block table, scales, softcap value,
//! window length, split length and count.

use cubecl::prelude::*;

use super::common::{SplitParamsLaunch, PLANE_LANES};
use super::fragments::{wide_dims, MmaConfig, MMA_WARPS};
use super::kernel::{decode_combine_kernel, decode_split_kernel};
use super::mma::decode_split_mma_kernel;
use super::plan::{
    KernelPath, SplitPlan, WorkspaceShape, MAX_SPLITS, MMA_BY_DEFAULT, TARGET_CUBES_PER_SM,
};
use super::select::{
    auto_config, config, mma_config, mma_supported, row_blocking_for, wide_config,
};
use super::wide::decode_split_wide_kernel;
use super::{AttentionOptions, DecodeConfig, SplitChoice};
use crate::device::{storage_type, BatchOffsets, DeviceBatch, DeviceRows, PagedKvCache};
use crate::error::{Fp8KvError, KvSide, Result};
use crate::kernels::{array_len, handle_vec_len, CacheGeometry};
use crate::policy::{Dtype, QuantPolicy};

/// Threads per combine cube: 8 warps, so a 128-wide V head reads 8 splits at a time (4 per
/// lane in flight) and a 512-wide one 2.
const COMBINE_THREADS: u32 = 256;

/// SM count assumed when the runtime does not report one (an H100 SXM's).
const DEFAULT_SM_COUNT: usize = 132;

/// What decides one launch's plan: the validated inputs' shape and two facts of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaunchShape {
    /// Cache element dtype.
    pub cache: Dtype,
    /// Query (and output) dtype.
    pub act: Dtype,
    /// K cache geometry.
    pub k: CacheGeometry,
    /// V cache geometry.
    pub v: CacheGeometry,
    /// Query heads.
    pub num_heads: usize,
    /// Packed new tokens (query rows).
    pub num_tokens: usize,
    /// Sequences.
    pub batch: usize,
    /// Most new tokens of one sequence.
    pub max_q_len: usize,
    /// Longest cached sequence.
    pub max_kv_len: usize,
    /// SMs the split planner fills.
    pub sm_count: usize,
    /// Whether the device has the MMA the tensor-core kernels emit for this cache
    /// ([`mma_supported`]).
    pub mma: bool,
}

impl LaunchShape {
    /// The shape of one launch on `cache`'s device.
    pub(crate) fn new<R: Runtime>(
        cache: &PagedKvCache<R>,
        batch: &DeviceBatch<R>,
        act: Dtype,
        num_heads: usize,
        num_tokens: usize,
    ) -> Self {
        let layout = cache.layout();
        let meta = batch.meta();
        let client = cache.client();
        LaunchShape {
            cache: cache.dtype(),
            act,
            k: CacheGeometry::new(layout, KvSide::K),
            v: CacheGeometry::new(layout, KvSide::V),
            num_heads,
            num_tokens,
            batch: meta.batch(),
            max_q_len: meta.max_q_len(),
            max_kv_len: meta.max_kv_len(),
            sm_count: client
                .properties()
                .hardware
                .num_streaming_multiprocessors
                .map_or(DEFAULT_SM_COUNT, |n| n as usize),
            mma: mma_supported(client, cache.dtype()),
        }
    }

    /// Query heads per KV head.
    fn group(&self) -> usize {
        self.num_heads / self.k.num_kv_heads as usize
    }
}

/// The split kernel of one launch, with its comptime configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SplitKernel {
    /// `kernel::decode_split_kernel`.
    CudaCores(DecodeConfig),
    /// `mma::decode_split_mma_kernel`, default or key-major layout (`MmaConfig::key_major`).
    TensorCores(MmaConfig),
    /// `wide::decode_split_wide_kernel` (MLA's 576/512).
    Wide(MmaConfig),
}

/// One decode launch, decided once from the validated inputs ([`plan_decode`]): the split
/// kernel and its configuration, how the rows and the cache are cut, and the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DecodePlan {
    /// The split kernel.
    pub kernel: SplitKernel,
    /// Query rows per cube.
    pub rows: usize,
    /// Row blocks per (sequence, KV head).
    pub row_blocks: usize,
    /// Cache splits.
    pub split: SplitPlan,
    /// The workspace between the split kernel and the combine.
    pub workspace: WorkspaceShape,
}

/// Plans one launch: the kernel `path` asks for (an error where a forced tensor-core kernel
/// does not apply), rows per cube, the split plan (`SplitPlan::new` over the device's SMs and
/// the kernel's resident cubes, or the forced split length), the workspace.
pub(crate) fn plan_decode(
    s: &LaunchShape,
    opts: &AttentionOptions,
    path: KernelPath,
    split: SplitChoice,
) -> Result<DecodePlan> {
    let group = s.group();
    let max_rows = group * s.max_q_len;
    let mma = choose_mma(s, opts, path)?;
    let (rows, row_blocks) = row_blocking_for(mma.as_ref(), max_rows);
    let kernel = match mma {
        Some(c) if wide_dims(c.k.head_dim, c.v.head_dim) => SplitKernel::Wide(c),
        Some(c) => SplitKernel::TensorCores(c),
        // The CUDA-core kernel's configuration is for its own row blocking (a tensor-core row
        // block can exceed what it is laid out for).
        None => SplitKernel::CudaCores(config(s.cache, s.k, s.v, group as u32, rows as u32, opts)),
    };
    let split = match split {
        SplitChoice::Auto => {
            let base = s.k.num_kv_heads as usize * s.batch * row_blocks;
            let resident = mma
                .as_ref()
                .map_or(TARGET_CUBES_PER_SM, MmaConfig::resident_cubes);
            SplitPlan::new(base, s.max_kv_len, s.sm_count, resident)
        }
        SplitChoice::Tokens(n) => SplitPlan::with_split_tokens(n, s.max_kv_len)?,
    };
    Ok(DecodePlan {
        kernel,
        rows,
        row_blocks,
        split,
        workspace: WorkspaceShape {
            num_tokens: s.num_tokens,
            num_heads: s.num_heads,
            num_splits: split.num_splits,
            head_dim_v: s.v.head_dim as usize,
        },
    })
}

/// A small f32 array uploaded to the device, or (when absent) `dummy` passed as a 1-element
/// array the kernel never reads (its feature flag is off), so no upload happens per call.
fn small_f32<R: Runtime>(
    client: &ComputeClient<R>,
    v: Option<&[f32]>,
    dummy: &cubecl::server::Handle,
) -> (cubecl::server::Handle, usize) {
    match v {
        Some(v) if !v.is_empty() => (client.create_from_slice(f32::as_bytes(v)), v.len()),
        _ => (dummy.clone(), 1),
    }
}

/// The MMA operand type for a cache: bf16 for the bf16 cache, f16 otherwise (FP8 converts to
/// f16 exactly).
fn mma_type(cache: Dtype) -> Dtype {
    if cache == Dtype::Bf16 {
        Dtype::Bf16
    } else {
        Dtype::F16
    }
}

/// The tensor-core configuration a launch uses, or `None` for the CUDA-core kernel.
fn choose_mma(
    s: &LaunchShape,
    opts: &AttentionOptions,
    path: KernelPath,
) -> Result<Option<MmaConfig>> {
    let group = s.group();
    let max_rows = group * s.max_q_len;
    let candidate = mma_config(s.cache, s.act, s.k, s.v, group as u32, max_rows, opts);
    match path {
        KernelPath::CudaCores => Ok(None),
        KernelPath::TensorCores | KernelPath::TensorCoresKeyMajor => candidate
            .map(|c| MmaConfig {
                key_major: path == KernelPath::TensorCoresKeyMajor,
                ..c
            })
            .or_else(|| {
                // Wide heads (MLA) have only a key-major kernel.
                (path == KernelPath::TensorCoresKeyMajor)
                    .then(|| wide_config(s.cache, s.act, s.k, s.v, group as u32, max_rows, opts))
                    .flatten()
            })
            .map(Some)
            .ok_or_else(|| {
                Fp8KvError::InvalidOption(format!(
                    "the {} decode kernel does not apply to head dims {}/{} with a {} cache and {} \
                     queries",
                    if path == KernelPath::TensorCores {
                        "tensor-core"
                    } else {
                        "key-major tensor-core"
                    },
                    s.k.head_dim,
                    s.v.head_dim,
                    s.cache,
                    s.act
                ))
            }),
        KernelPath::Auto => Ok(auto_config(
            s.cache,
            s.act,
            s.k,
            s.v,
            group as u32,
            max_rows,
            opts,
            MMA_BY_DEFAULT && s.mma,
        )),
    }
}

/// Launches the split and combine kernels of `plan` for validated input.
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
    let es = cache.dtype().size_bytes();
    let (dk, dv) = (layout.head_dim_k(), layout.head_dim_v());
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
    let ws_o = batch.scratch(&client, 0, ws.o_elems() * 4);
    let ws_md = batch.scratch(&client, 1, ws.md_elems() * 4);
    let (alibi, alibi_len) = small_f32(&client, opts.alibi_slopes.as_deref(), &ws_md);
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
    let grid = CubeCount::Static(
        (kv_heads * plan.row_blocks) as u32,
        meta.batch() as u32,
        plan.split.num_splits as u32,
    );
    // SAFETY: array lengths are the buffers' real sizes (q and out: `len_elems`, the
    // workspace: the sizes allocated just above, the caches: bytes in use / word or vector
    // bytes, alibi/sinks: `num_heads` values or a 1-element dummy the kernels do not read
    // when the option is off), and every index stays below them because `paged_decode_path`
    // (mod.rs) checked, before this launch:
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
    //   wide kernel), q and the workspace in elements are below `u32::MAX` (`too_big`), the
    //   metadata below `u32::MAX` entries (`check_batch_buffer_len`), the window is clamped by
    //   `kernel_window`; the grid's y (batch) and the combine's z (longest query) are at most
    //   65535.
    // The tensor-core kernels read the caches as 32-bit words in vectors of 16 (or 8) bytes:
    // every lane piece they read is a whole multiple of its vector and starts at a multiple of
    // it (rows start at multiples of the head dim; see `mma_config`).
    unsafe {
        match plan.kernel {
            SplitKernel::Wide(mcfg) => decode_split_wide_kernel::launch_unchecked::<R>(
                &client,
                grid,
                CubeDim::new_1d(MMA_WARPS * PLANE_LANES),
                ArrayArg::from_raw_parts(q.handle().clone(), q.len_elems()),
                ArrayArg::from_raw_parts(cache.k_handle().clone(), array_len(cache.k_handle(), 4)),
                ArrayArg::from_raw_parts(cache.k_handle().clone(), array_len(cache.k_handle(), 4)),
                ArrayArg::from_raw_parts(cache.v_handle().clone(), array_len(cache.v_handle(), 4)),
                ArrayArg::from_raw_parts(batch.handle().clone(), meta_len),
                ArrayArg::from_raw_parts(alibi, alibi_len),
                ArrayArg::from_raw_parts(ws_o.clone(), ws.o_elems()),
                ArrayArg::from_raw_parts(ws_md.clone(), ws.md_elems()),
                params,
                mcfg,
                [act, storage_type(mma_type(cache.dtype()))],
            ),
            SplitKernel::TensorCores(mcfg) => decode_split_mma_kernel::launch_unchecked::<R>(
                &client,
                grid,
                CubeDim::new_1d(MMA_WARPS * PLANE_LANES),
                mcfg.v_words as usize,
                ArrayArg::from_raw_parts(q.handle().clone(), q.len_elems()),
                ArrayArg::from_raw_parts(cache.k_handle().clone(), array_len(cache.k_handle(), 4)),
                ArrayArg::from_raw_parts(cache.v_handle().clone(), array_len(cache.v_handle(), 4)),
                ArrayArg::from_raw_parts(batch.handle().clone(), meta_len),
                ArrayArg::from_raw_parts(alibi, alibi_len),
                ArrayArg::from_raw_parts(ws_o.clone(), ws.o_elems()),
                ArrayArg::from_raw_parts(ws_md.clone(), ws.md_elems()),
                params,
                mcfg,
                [act, storage_type(mma_type(cache.dtype()))],
            ),
            SplitKernel::CudaCores(cfg) => decode_split_kernel::launch_unchecked::<R>(
                &client,
                grid,
                CubeDim::new_1d(cfg.threads),
                cfg.k_vec as usize,
                cfg.v_vec as usize,
                ArrayArg::from_raw_parts(q.handle().clone(), q.len_elems()),
                ArrayArg::from_raw_parts(
                    cache.k_handle().clone(),
                    handle_vec_len(cache.k_handle(), es * cfg.k_vec as usize),
                ),
                ArrayArg::from_raw_parts(
                    cache.v_handle().clone(),
                    handle_vec_len(cache.v_handle(), es * cfg.v_vec as usize),
                ),
                ArrayArg::from_raw_parts(batch.handle().clone(), meta_len),
                ArrayArg::from_raw_parts(alibi, alibi_len),
                ArrayArg::from_raw_parts(ws_o.clone(), ws.o_elems()),
                ArrayArg::from_raw_parts(ws_md.clone(), ws.md_elems()),
                params,
                cfg,
                [act, storage_type(cache.dtype())],
            ),
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
            dv as u32,
            COMBINE_THREADS,
            MAX_SPLITS as u32,
            opts.sinks.is_some(),
            act,
        );
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::decode::MAX_ROWS_PER_CUBE;

    #[test]
    fn huge_windows_clamp_below_the_u32_wrap() {
        // Every position is at most i32::MAX - 1, so t + window must not wrap for t < 2^31.
        let max = i32::MAX as u32;
        for (window, want) in [
            (Some(1), 1),
            (Some(4096), 4096),
            (Some(i32::MAX as usize), max),
            (Some(i32::MAX as usize + 1), max),
            (Some(u32::MAX as usize), max),
            (Some(1usize << 32), max),
            (Some(usize::MAX), max),
        ] {
            let got = kernel_window(window);
            assert_eq!(got, want, "{window:?}");
            if got == max {
                // From the last possible position, key 0 is visible and t + window never wraps.
                let last = i32::MAX as u32 - 1;
                assert!(got > last, "{window:?}");
                assert!(last.checked_add(got).is_some(), "{window:?}");
            }
        }
    }

    #[test]
    fn mma_configs_read_whole_aligned_vectors() {
        let geom = |d: usize| CacheGeometry {
            page_size: 16,
            num_kv_heads: 2,
            head_dim: d as u32,
            bhsd: false,
        };
        let opts = AttentionOptions::default();
        for &(dk, dv) in crate::layout::SUPPORTED_HEAD_DIMS.iter() {
            for cache in [Dtype::E4m3, Dtype::E5m2, Dtype::Bf16, Dtype::F16] {
                for act in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
                    let Some(c) = mma_config(cache, act, geom(dk), geom(dv), 4, 4, &opts) else {
                        assert!(dk != dv || !matches!(dk, 64 | 128), "{dk}/{dv} {cache}");
                        continue;
                    };
                    let es = c.bits.elem_bytes();
                    // A lane's K piece (dk/4 elements) is whole 16-byte vectors, its V piece
                    // (dv/8) whole vectors of v_words words.
                    assert_eq!((dk as u32 / 4 * es) % 16, 0);
                    assert_eq!((dv as u32 / 8 * es) % (4 * c.v_words), 0);
                    assert!((1..=3).contains(&c.q_parts) && (2..=3).contains(&c.p_parts));
                }
            }
        }
    }

    #[test]
    fn head_dim_256_takes_tensor_cores_only_within_the_register_budget() {
        let geom = |d: u32| CacheGeometry {
            page_size: 32,
            num_kv_heads: 4,
            head_dim: d,
            bhsd: false,
        };
        let opts = AttentionOptions::default();
        let cfg = |cache, act, group, rows| {
            mma_config(cache, act, geom(256), geom(256), group, rows, &opts)
        };
        for cache in [Dtype::E4m3, Dtype::E5m2] {
            for act in [Dtype::Bf16, Dtype::F16] {
                for rows in 1..=8 {
                    let c = cfg(cache, act, 2, rows).expect("FP8, one-part query, one row tile");
                    assert_eq!((c.row_tiles, c.q_parts), (1, 1));
                }
                assert!(cfg(cache, act, 2, 9).is_none(), "two row tiles at d256");
            }
            assert!(
                cfg(cache, Dtype::F32, 2, 2).is_none(),
                "two-part query at d256"
            );
        }
        for cache in [Dtype::Bf16, Dtype::F16] {
            assert!(cfg(cache, cache, 2, 2).is_none(), "16-bit cache at d256");
        }
        assert!(cfg(Dtype::E4m3, Dtype::Bf16, 2, 2).is_some());
        // The public predicates agree: one launch's shape, and "every shape" (64 and 128 only).
        use super::super::{tensor_cores_apply, tensor_cores_apply_to};
        let e4m3_bf16 =
            |d, group, q_len| tensor_cores_apply_to(Dtype::E4m3, Dtype::Bf16, d, d, group, q_len);
        assert!(e4m3_bf16(256, 2, 4) && !e4m3_bf16(256, 2, 5));
        assert!(!e4m3_bf16(128, 0, 1), "a group of 0");
        assert!(!tensor_cores_apply(Dtype::E4m3, 256, 256));
        assert!(
            tensor_cores_apply(Dtype::E4m3, 128, 128) && tensor_cores_apply(Dtype::Bf16, 64, 64)
        );
    }

    #[test]
    fn key_major_counts_the_cubes_its_registers_allow() {
        let geom = |d: u32| CacheGeometry {
            page_size: 64,
            num_kv_heads: 8,
            head_dim: d,
            bhsd: false,
        };
        let opts = AttentionOptions::default();
        let resident = |cache, act, d, rows, key_major| {
            let c = mma_config(cache, act, geom(d), geom(d), 4, rows, &opts)
                .expect("tensor cores apply");
            MmaConfig { key_major, ..c }.resident_cubes()
        };
        // Llama-3-8B decode: 142 registers (3 cubes) against 128 key-major (4).
        assert_eq!(resident(Dtype::E4m3, Dtype::Bf16, 128, 4, false), 3);
        assert_eq!(resident(Dtype::E4m3, Dtype::Bf16, 128, 4, true), 4);
        assert_eq!(resident(Dtype::E5m2, Dtype::F16, 64, 8, true), 4);
        // Two-part queries and 16-bit caches: 166 key-major (3); two row tiles and d256: 2.
        assert_eq!(resident(Dtype::E4m3, Dtype::F32, 128, 4, true), 3);
        assert_eq!(resident(Dtype::Bf16, Dtype::Bf16, 128, 4, true), 3);
        assert_eq!(resident(Dtype::Bf16, Dtype::Bf16, 128, 4, false), 2);
        assert_eq!(resident(Dtype::E4m3, Dtype::Bf16, 128, 12, true), 2);
        assert_eq!(resident(Dtype::E4m3, Dtype::Bf16, 256, 4, true), 2);
        // The planner turns the fourth cube into shorter splits at batch 1 × 32k (8 KV heads,
        // 132 SMs): 64 of 512 tokens in one wave instead of 47 of 704.
        let plan = |cubes| SplitPlan::new(8, 32768, 132, cubes);
        assert_eq!(plan(3).split_tokens, 704);
        assert_eq!((plan(4).num_splits, plan(4).split_tokens), (64, 512));
    }

    #[test]
    fn wide_kernel_covers_mla_with_one_part_queries() {
        use super::super::key_major_applies_to;
        for cache in [Dtype::E4m3, Dtype::E5m2, Dtype::Bf16, Dtype::F16] {
            for group in [1, 8, 16, 128] {
                assert!(key_major_applies_to(cache, Dtype::Bf16, 576, 512, group, 1));
                assert!(key_major_applies_to(cache, Dtype::Bf16, 576, 512, group, 3));
                assert!(!key_major_applies_to(cache, Dtype::F32, 576, 512, group, 1));
            }
            // Only the key-major path has it; the predicate of the default one is unchanged.
            assert!(!super::super::tensor_cores_apply_to(
                cache,
                Dtype::Bf16,
                576,
                512,
                16,
                1
            ));
        }
        assert!(key_major_applies_to(
            Dtype::E4m3,
            Dtype::F16,
            576,
            512,
            16,
            1
        ));
        assert!(!key_major_applies_to(
            Dtype::Bf16,
            Dtype::F16,
            576,
            512,
            16,
            1
        ));
        assert!(!key_major_applies_to(
            Dtype::E4m3,
            Dtype::Bf16,
            192,
            128,
            8,
            1
        ));
        assert!(!key_major_applies_to(
            Dtype::E4m3,
            Dtype::Bf16,
            576,
            512,
            0,
            1
        ));
        let geom = |d: u32| CacheGeometry {
            page_size: 64,
            num_kv_heads: 1,
            head_dim: d,
            bhsd: false,
        };
        let c = wide_config(
            Dtype::E4m3,
            Dtype::Bf16,
            geom(576),
            geom(512),
            16,
            16,
            &AttentionOptions::default(),
        )
        .expect("MLA");
        // 240 registers (ptxas): two cubes per SM; 16 rows take two row tiles. Group 8: one
        // row tile, 128 registers, four cubes.
        assert_eq!((c.row_tiles, c.resident_cubes(), c.key_major), (2, 2, true));
        let c8 = wide_config(
            Dtype::E4m3,
            Dtype::Bf16,
            geom(576),
            geom(512),
            8,
            8,
            &AttentionOptions::default(),
        )
        .expect("MLA, group 8");
        assert_eq!((c8.row_tiles, c8.resident_cubes()), (1, 4));
    }

    /// One launch's shape on a 132-SM device with the MMA: `heads / kv_heads`, head dims,
    /// page 64, `batch` sequences of `q_len` new and `kv_len` cached tokens.
    #[allow(clippy::too_many_arguments)]
    fn shape(
        cache: Dtype,
        act: Dtype,
        heads: usize,
        kv_heads: usize,
        (dk, dv): (usize, usize),
        batch: usize,
        q_len: usize,
        kv_len: usize,
    ) -> LaunchShape {
        let geom = |d: usize| CacheGeometry {
            page_size: 64,
            num_kv_heads: kv_heads as u32,
            head_dim: d as u32,
            bhsd: false,
        };
        LaunchShape {
            cache,
            act,
            k: geom(dk),
            v: geom(dv),
            num_heads: heads,
            num_tokens: batch * q_len,
            batch,
            max_q_len: q_len,
            max_kv_len: kv_len,
            sm_count: 132,
            mma: true,
        }
    }

    /// Shapes → plans: the kernel, its rows per cube and the split plan, decided in one place
    /// (hand-derived expectations: the measured winner per class, `SplitPlan`'s one-wave
    /// choices worked out in `key_major_counts_the_cubes_its_registers_allow`).
    #[test]
    fn plans_for_a_table_of_shapes() {
        let opts = AttentionOptions::default();
        let auto = |s: &LaunchShape| plan_decode(s, &opts, KernelPath::Auto, SplitChoice::Auto);
        let llama = shape(Dtype::E4m3, Dtype::Bf16, 32, 8, (128, 128), 1, 1, 32768);

        // Llama-3-8B, batch 1 × 32k, e4m3: key-major, one 8-row tile, 4 resident cubes, so
        // 64 splits of 512 tokens in one wave; the workspace holds every split.
        let p = auto(&llama).unwrap();
        let SplitKernel::TensorCores(c) = p.kernel else {
            panic!("{:?}", p.kernel)
        };
        assert!(c.key_major);
        assert_eq!((p.rows, p.row_blocks), (8, 1));
        assert_eq!((p.split.num_splits, p.split.split_tokens), (64, 512));
        assert_eq!(p.workspace.num_splits, 64);
        assert_eq!((p.workspace.num_tokens, p.workspace.num_heads), (1, 32));
        assert_eq!(p.workspace.head_dim_v, 128);

        // Forcing the default layout: 3 resident cubes, 704-token splits.
        let p = plan_decode(&llama, &opts, KernelPath::TensorCores, SplitChoice::Auto).unwrap();
        assert!(matches!(p.kernel, SplitKernel::TensorCores(c) if !c.key_major));
        assert_eq!(p.split.split_tokens, 704);

        // The bf16 cache keeps the default tensor-core kernel.
        let bf16 = LaunchShape {
            cache: Dtype::Bf16,
            ..llama
        };
        assert!(matches!(auto(&bf16).unwrap().kernel, SplitKernel::TensorCores(c) if !c.key_major));

        // A 4-token speculative step: 16 rows per KV head, two row tiles, default layout.
        let spec = shape(Dtype::E4m3, Dtype::Bf16, 32, 8, (128, 128), 32, 4, 4096);
        let p = auto(&spec).unwrap();
        assert!(
            matches!(p.kernel, SplitKernel::TensorCores(c) if !c.key_major && c.row_tiles == 2)
        );
        assert_eq!((p.rows, p.row_blocks), (16, 1));
        assert_eq!(p.workspace.num_tokens, 128);

        // SmolLM2 (9/3, d64): key-major; Llama-3.2-1B (32/8, d64): default.
        let smol = shape(Dtype::E4m3, Dtype::Bf16, 9, 3, (64, 64), 32, 1, 8192);
        assert!(matches!(auto(&smol).unwrap().kernel, SplitKernel::TensorCores(c) if c.key_major));
        let l1b = shape(Dtype::E4m3, Dtype::Bf16, 32, 8, (64, 64), 32, 1, 8192);
        assert!(matches!(auto(&l1b).unwrap().kernel, SplitKernel::TensorCores(c) if !c.key_major));
        let smol_bf16 = LaunchShape {
            cache: Dtype::Bf16,
            ..smol
        };
        assert!(
            matches!(auto(&smol_bf16).unwrap().kernel, SplitKernel::TensorCores(c) if c.key_major)
        );

        // MLA: the wide kernel (16 rows, two row tiles); with f32 queries, CUDA cores.
        let mla = shape(Dtype::E4m3, Dtype::Bf16, 16, 1, (576, 512), 4, 1, 2000);
        let p = auto(&mla).unwrap();
        assert!(matches!(p.kernel, SplitKernel::Wide(c) if c.key_major));
        assert_eq!((p.rows, p.row_blocks), (16, 1));
        assert_eq!(p.workspace.head_dim_v, 512);
        let mla_f32 = LaunchShape {
            act: Dtype::F32,
            ..mla
        };
        let p = auto(&mla_f32).unwrap();
        let SplitKernel::CudaCores(cfg) = p.kernel else {
            panic!("{:?}", p.kernel)
        };
        assert_eq!(cfg.rows as usize, p.rows);
        assert!(p.rows * p.row_blocks >= 16);

        // No MMA on the device: CUDA cores; a forced tensor-core path on a head dim it does not
        // take: an error, not a fallback.
        let no_mma = LaunchShape {
            mma: false,
            ..llama
        };
        assert!(matches!(
            auto(&no_mma).unwrap().kernel,
            SplitKernel::CudaCores(_)
        ));
        let d80 = shape(Dtype::E4m3, Dtype::Bf16, 28, 4, (80, 80), 2, 1, 100);
        let e = plan_decode(&d80, &opts, KernelPath::TensorCores, SplitChoice::Auto).unwrap_err();
        assert!(matches!(e, Fp8KvError::InvalidOption(_)), "{e}");

        // A forced split length: ceil(1000 / 64) = 16 splits of 64 tokens.
        let short = shape(Dtype::E4m3, Dtype::Bf16, 32, 8, (128, 128), 3, 1, 1000);
        let p = plan_decode(&short, &opts, KernelPath::Auto, SplitChoice::Tokens(64)).unwrap();
        assert_eq!((p.split.num_splits, p.split.split_tokens), (16, 64));
        assert_eq!(p.workspace.num_splits, 16);
    }

    #[test]
    fn configs_fit_the_thread_mapping() {
        for &(dk, dv) in crate::layout::SUPPORTED_HEAD_DIMS.iter() {
            for dtype in [Dtype::E4m3, Dtype::E5m2, Dtype::Bf16, Dtype::F16] {
                for rows in 1..=MAX_ROWS_PER_CUBE as u32 {
                    let geom = |d: usize| CacheGeometry {
                        page_size: 16,
                        num_kv_heads: 2,
                        head_dim: d as u32,
                        bhsd: false,
                    };
                    let c = config(
                        dtype,
                        geom(dk),
                        geom(dv),
                        4,
                        rows,
                        &AttentionOptions::default(),
                    );
                    // K: whole passes of tokens per tile, lanes a power of two within a warp.
                    assert!(c.k_lanes.is_power_of_two() && c.k_lanes <= 8);
                    assert_eq!(c.tile_tokens % (c.threads / c.k_lanes), 0);
                    assert_eq!(dk as u32 % c.k_vec, 0);
                    // V: at least one token group, vectors tile the row.
                    assert_eq!(dv as u32 % c.v_vec, 0);
                    assert!(c.threads / (dv as u32 / c.v_vec) >= 1);
                    assert_eq!(c.tile_tokens % PLANE_LANES, 0);
                }
            }
        }
    }
}
