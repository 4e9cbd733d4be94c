//! The tensor-core routine: `mma_kernel::decode_split_mma_kernel` in its default,
//! query-major layout (`S = Q·K^T`: each row tile's query rows as the MMA's M, keys as N).
//! Where it applies ([`mma_config`]) the key-major routine ([`super::key_major`]) applies too:
//! both run the same kernel, which the configuration's `key_major` flag lays out.

use cubecl::prelude::*;

use super::mma_kernel::decode_split_mma_kernel;
use super::{mma_type, SplitArgs, SplitRoutine};
use crate::contract::AttentionOptions;
use crate::device::storage_type;
use crate::kernels::array_len;
use crate::kernels::decode::common::fragments::{
    pipeline_depth, CacheBits, MmaConfig, MMA_TILE_ROWS, MMA_WARPS,
};
use crate::kernels::decode::common::PLANE_LANES;
use crate::kernels::decode::definition::{DecodeProblem, DecodeStrategy};
use crate::kernels::CacheGeometry;
use crate::policy::Dtype;

/// The query-major tensor-core split routine.
pub(crate) struct TensorCores;

impl SplitRoutine for TensorCores {
    type Config = MmaConfig;
    const STRATEGY: DecodeStrategy = DecodeStrategy::TensorCores;

    fn config(p: &DecodeProblem, opts: &AttentionOptions) -> Option<MmaConfig> {
        problem_config(p, opts)
    }

    fn rows_per_cube(cfg: &MmaConfig) -> usize {
        (MMA_TILE_ROWS * cfg.row_tiles) as usize
    }

    fn resident_cubes(cfg: &MmaConfig) -> usize {
        cfg.resident_cubes()
    }

    unsafe fn launch<R: Runtime>(cfg: MmaConfig, a: SplitArgs<'_, R>) {
        // SAFETY: as `SplitRoutine::launch` requires.
        unsafe { launch_mma(cfg, a) }
    }
}

/// [`mma_config`] for a validated problem.
pub(crate) fn problem_config(p: &DecodeProblem, opts: &AttentionOptions) -> Option<MmaConfig> {
    mma_config(
        p.cache,
        p.act,
        p.k,
        p.v,
        p.group() as u32,
        p.max_rows(),
        opts,
    )
}

/// Launches the MMA kernel in the layout `cfg.key_major` says (both tensor-core routines).
///
/// # Safety
/// As [`SplitRoutine::launch`]; the caches are read as 32-bit words in vectors of 4 (K) and
/// `cfg.v_words` (V), whole vectors of their buffers.
pub(crate) unsafe fn launch_mma<R: Runtime>(cfg: MmaConfig, a: SplitArgs<'_, R>) {
    let (k, v) = (a.cache.k_handle(), a.cache.v_handle());
    // SAFETY: see above.
    unsafe {
        decode_split_mma_kernel::launch_unchecked::<R>(
            a.client,
            a.grid,
            CubeDim::new_1d(MMA_WARPS * PLANE_LANES),
            cfg.v_words as usize,
            ArrayArg::from_raw_parts(a.q.handle().clone(), a.q.len_elems()),
            ArrayArg::from_raw_parts(k.clone(), array_len(k, 4)),
            ArrayArg::from_raw_parts(v.clone(), array_len(v, 4)),
            ArrayArg::from_raw_parts(a.meta.0, a.meta.1),
            ArrayArg::from_raw_parts(a.alibi.0, a.alibi.1),
            ArrayArg::from_raw_parts(a.ws_o.0, a.ws_o.1),
            ArrayArg::from_raw_parts(a.ws_md.0, a.ws_md.1),
            ArrayArg::from_raw_parts(a.ws_o4.0, a.ws_o4.1),
            ArrayArg::from_raw_parts(a.counters.0, a.counters.1),
            ArrayArg::from_raw_parts(a.sinks.0, a.sinks.1),
            ArrayArg::from_raw_parts(a.out.0, a.out.1),
            a.params,
            cfg,
            a.merge,
            [a.act, storage_type(mma_type(a.cache.dtype()))],
        );
    }
}

/// The tensor-core configuration where that kernel applies, `None` where it does not: K and V
/// head dims equal and 64 or 128 with any cache dtype, any query dtype, any group (blocks of 8
/// rows where every sequence has at most `max_rows` = group × q_len ≤ 8, else of 16), every
/// option; and head dim 256 with an FP8 cache, a one-part query (bf16 or f16) and one row tile
/// (`max_rows` ≤ 8): its 16 output tiles, 16 query k-steps and 64-byte K / 32-byte V pieces
/// per lane take 255 registers there (ptxas: 20 bytes of spills), so a second row tile, a
/// second query part or 16-bit cache elements would spill far more (those keep the CUDA-core
/// kernel).
pub(crate) fn mma_config(
    cache: Dtype,
    act: Dtype,
    k: CacheGeometry,
    v: CacheGeometry,
    group: u32,
    max_rows: usize,
    opts: &AttentionOptions,
) -> Option<MmaConfig> {
    if k.head_dim != v.head_dim || !matches!(k.head_dim, 64 | 128 | 256) {
        return None;
    }
    let (bits, mma_bf16) = mma_operands(cache)?;
    // Query parts: one where the query dtype converts exactly (f16 → f16, bf16 → bf16, bf16 →
    // f16 once its row is scaled by a power of two into f16's range, see `q_scaled`), else
    // enough parts for 22+ bits (f32: 2 f16 / 3 bf16 of 11 / 8 bits; f16 → bf16: 2).
    // Probabilities are f32: 2 f16 parts (22 bits) or 3 bf16 (24).
    let q_parts = match (act, mma_bf16) {
        (Dtype::F32, false) => 2,
        (Dtype::F32, true) => 3,
        (Dtype::F16, true) => 2,
        _ => 1,
    };
    let piece_bytes = v.head_dim / 8 * bits.elem_bytes();
    let row_tiles = if max_rows <= MMA_TILE_ROWS as usize {
        1
    } else {
        2
    };
    if k.head_dim == 256 && (bits == CacheBits::Half || q_parts != 1 || row_tiles != 1) {
        return None;
    }
    let c = MmaConfig {
        k,
        v,
        group,
        bits,
        v_words: if piece_bytes >= 16 { 4 } else { 2 },
        row_tiles,
        q_parts,
        p_parts: if mma_bf16 { 3 } else { 2 },
        // bf16 and f32 queries reach beyond f16's range (±65504, normal from 2^-14): each row
        // is scaled by a power of two that puts its largest element at 2^14..2^15, so only
        // elements below 2^-28 of the row's largest lose bits (an absolute error ≤ 2^-39 of
        // it, far inside the score bound). bf16 MMAs need no scale.
        q_scaled: !mma_bf16 && act != Dtype::F16,
        softcap: opts.softcap.is_some(),
        alibi: opts.alibi_slopes.is_some(),
        window: opts.window.is_some(),
        key_major: false,
        depth: 1,
    };
    Some(MmaConfig {
        depth: pipeline_depth(&c),
        ..c
    })
}

/// How a cache's elements become MMA operands, and whether the MMA type is bf16 (for the bf16
/// cache; f16 otherwise, which every FP8 value converts to exactly); `None` for an f32 cache.
pub(crate) fn mma_operands(cache: Dtype) -> Option<(CacheBits, bool)> {
    match cache {
        Dtype::E4m3 => Some((CacheBits::E4m3, false)),
        Dtype::E5m2 => Some((CacheBits::E5m2, false)),
        Dtype::F16 => Some((CacheBits::Half, false)),
        Dtype::Bf16 => Some((CacheBits::Half, true)),
        Dtype::F32 => None,
    }
}

/// Whether the runtime reports the `m16n8k16` MMA (f32 accumulators) the tensor-core kernel
/// emits for a cache of `cache` dtype (bf16 operands for the bf16 cache, f16 otherwise): CUDA
/// sm_80 and later.
pub(crate) fn mma_supported<R: Runtime>(client: &ComputeClient<R>, cache: Dtype) -> bool {
    let mma_type = if cache == Dtype::Bf16 {
        Dtype::Bf16
    } else {
        Dtype::F16
    };
    client.properties().features.matmul.mma.iter().any(|c| {
        c.m == 16
            && c.n == 8
            && c.k == 16
            && c.a_type == storage_type(mma_type)
            && c.b_type == storage_type(mma_type)
            && c.cd_type == storage_type(Dtype::F32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::decode::common::fragments::depth_two_fits;
    use crate::kernels::decode::definition::split::SplitPlan;

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
        // The public predicate agrees, for both tensor-core routines.
        let applies = |st: DecodeStrategy, cache, query, d, group, max_q_len| {
            st.applies(&crate::kernels::decode::DecodeShape {
                cache,
                query,
                head_dim_k: d,
                head_dim_v: d,
                group,
                max_q_len,
            })
        };
        for st in [DecodeStrategy::TensorCores, DecodeStrategy::KeyMajor] {
            let e4m3_bf16 =
                |d, group, q_len| applies(st, Dtype::E4m3, Dtype::Bf16, d, group, q_len);
            assert!(e4m3_bf16(256, 2, 4) && !e4m3_bf16(256, 2, 5));
            assert!(!e4m3_bf16(128, 0, 1), "a group of 0");
            assert!(!applies(st, Dtype::E4m3, Dtype::F32, 256, 1, 1));
            assert!(applies(st, Dtype::E4m3, Dtype::F32, 128, 16, 1));
            assert!(applies(st, Dtype::Bf16, Dtype::F32, 64, 16, 1));
            assert!(!applies(st, Dtype::E4m3, Dtype::Bf16, 96, 4, 1));
        }
    }

    #[test]
    fn a_second_block_fits_where_the_registers_allow() {
        let geom = |d: u32| CacheGeometry {
            page_size: 64,
            num_kv_heads: 8,
            head_dim: d,
            bhsd: false,
        };
        let opts = AttentionOptions::default();
        let fits = |cache, act, d, rows, key_major: bool| {
            let c = mma_config(cache, act, geom(d), geom(d), 4, rows, &opts)
                .expect("tensor cores apply");
            // Measured slower than depth 1 at 3 of 4 shapes: never the default.
            assert_eq!(c.depth, 1);
            depth_two_fits(&MmaConfig { key_major, ..c })
        };
        // FP8, one-part query, one row tile: d64 either layout, d128 key-major only.
        assert!(fits(Dtype::E4m3, Dtype::Bf16, 64, 3, false));
        assert!(fits(Dtype::E5m2, Dtype::F16, 64, 8, true));
        assert!(fits(Dtype::E4m3, Dtype::Bf16, 128, 4, true));
        assert!(!fits(Dtype::E4m3, Dtype::Bf16, 128, 4, false));
        // 16-bit caches, f32 queries, two row tiles, d256: one block.
        assert!(!fits(Dtype::Bf16, Dtype::Bf16, 64, 4, true));
        assert!(!fits(Dtype::E4m3, Dtype::F32, 64, 4, true));
        assert!(!fits(Dtype::E4m3, Dtype::Bf16, 128, 12, true));
        assert!(!fits(Dtype::E4m3, Dtype::Bf16, 256, 4, true));
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
        let resident = |cache, act, d, rows, key_major, depth| {
            let c = mma_config(cache, act, geom(d), geom(d), 4, rows, &opts)
                .expect("tensor cores apply");
            MmaConfig {
                key_major,
                depth,
                ..c
            }
            .resident_cubes()
        };
        // Llama-3-8B decode: 142 registers (3 cubes) against 128 key-major (4); a second
        // block in flight: 188 (2) and 168 (3).
        assert_eq!(resident(Dtype::E4m3, Dtype::Bf16, 128, 4, false, 1), 3);
        assert_eq!(resident(Dtype::E4m3, Dtype::Bf16, 128, 4, true, 1), 4);
        assert_eq!(resident(Dtype::E4m3, Dtype::Bf16, 128, 4, false, 2), 2);
        assert_eq!(resident(Dtype::E4m3, Dtype::Bf16, 128, 4, true, 2), 3);
        // Head dim 64: 69–80 registers at depth 1 (6 in either layout), 96 at depth 2 (5).
        assert_eq!(resident(Dtype::E5m2, Dtype::F16, 64, 8, true, 1), 6);
        assert_eq!(resident(Dtype::E4m3, Dtype::Bf16, 64, 3, false, 1), 6);
        assert_eq!(resident(Dtype::E4m3, Dtype::Bf16, 64, 3, true, 2), 5);
        // Its plans (132 SMs): SmolLM2 (3 KV heads) 32 × 8192 in 8 splits of 1024 and
        // 128 × 8192 in 2 of 4096, Llama-3.2-1B (8 KV heads) 32 × 8192 in 3 of 2752 (the
        // `--split-tokens` sweep's best of the plans for 3–7 cubes).
        let d64 = |base, ctx| {
            let p = SplitPlan::new(base, ctx, 132, 6);
            (p.num_splits, p.split_tokens)
        };
        assert_eq!(d64(3 * 32, 8192), (8, 1024));
        assert_eq!(d64(3 * 128, 8192), (2, 4096));
        assert_eq!(d64(8 * 32, 8192), (3, 2752));
        // Two-part queries and 16-bit caches: 166 key-major (3); two row tiles and d256: 2.
        assert_eq!(resident(Dtype::E4m3, Dtype::F32, 128, 4, true, 1), 3);
        assert_eq!(resident(Dtype::Bf16, Dtype::Bf16, 128, 4, true, 1), 3);
        assert_eq!(resident(Dtype::Bf16, Dtype::Bf16, 128, 4, false, 1), 2);
        assert_eq!(resident(Dtype::Bf16, Dtype::Bf16, 64, 4, true, 2), 2);
        assert_eq!(resident(Dtype::E4m3, Dtype::Bf16, 128, 12, true, 1), 2);
        assert_eq!(resident(Dtype::E4m3, Dtype::Bf16, 256, 4, true, 1), 2);
        // The planner turns the fourth cube into shorter splits at batch 1 × 32k (8 KV heads,
        // 132 SMs): 64 of 512 tokens in one wave instead of 47 of 704.
        let plan = |cubes| SplitPlan::new(8, 32768, 132, cubes);
        assert_eq!(plan(3).split_tokens, 704);
        assert_eq!((plan(4).num_splits, plan(4).split_tokens), (64, 512));
    }
}
