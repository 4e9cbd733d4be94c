//! The wide routine: `wide_kernel::decode_split_wide_kernel` for MLA's K 576 / V 512, whose K
//! dims are spread over the cube's four warps (key-major layout throughout).

use cubecl::prelude::*;

use super::tensor_cores::mma_operands;
use super::wide_kernel::decode_split_wide_kernel;
use super::{mma_type, SplitArgs, SplitRoutine};
use crate::contract::AttentionOptions;
use crate::device::storage_type;
use crate::kernels::array_len;
use crate::kernels::decode::common::fragments::{wide_dims, MmaConfig, MMA_TILE_ROWS, MMA_WARPS};
use crate::kernels::decode::common::PLANE_LANES;
use crate::kernels::decode::definition::{DecodeProblem, DecodeStrategy};
use crate::kernels::CacheGeometry;
use crate::policy::Dtype;

/// The wide-head (MLA) split routine.
pub(crate) struct Wide;

impl SplitRoutine for Wide {
    type Config = MmaConfig;
    const STRATEGY: DecodeStrategy = DecodeStrategy::Wide;

    fn config(p: &DecodeProblem, opts: &AttentionOptions) -> Option<MmaConfig> {
        wide_config(
            p.cache,
            p.act,
            p.k,
            p.v,
            p.group() as u32,
            p.max_rows(),
            opts,
        )
    }

    fn rows_per_cube(cfg: &MmaConfig) -> usize {
        (MMA_TILE_ROWS * cfg.row_tiles) as usize
    }

    fn resident_cubes(cfg: &MmaConfig) -> usize {
        cfg.resident_cubes()
    }

    unsafe fn launch<R: Runtime>(cfg: MmaConfig, a: SplitArgs<'_, R>) {
        let (k, v) = (a.cache.k_handle(), a.cache.v_handle());
        // SAFETY: as `SplitRoutine::launch` requires; K is read both as 16-byte vectors and as
        // words (`paged_decode` checked the word count against `u32`), V as 16-byte vectors.
        unsafe {
            decode_split_wide_kernel::launch_unchecked::<R>(
                a.client,
                a.grid,
                CubeDim::new_1d(MMA_WARPS * PLANE_LANES),
                ArrayArg::from_raw_parts(a.q.handle().clone(), a.q.len_elems()),
                ArrayArg::from_raw_parts(k.clone(), array_len(k, 4)),
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
}

/// The wide-head tensor-core configuration (`super::wide_kernel`) where that kernel applies, `None`
/// elsewhere: K/V head dims that [`wide_dims`] accepts (MLA's 576/512), an FP8, f16 or bf16
/// cache, and a query that converts to the MMA type in one part (f16/bf16; bf16 rows with the
/// f16 MMA are scaled by a power of two as in the other kernel).
pub(crate) fn wide_config(
    cache: Dtype,
    act: Dtype,
    k: CacheGeometry,
    v: CacheGeometry,
    group: u32,
    max_rows: usize,
    opts: &AttentionOptions,
) -> Option<MmaConfig> {
    if !wide_dims(k.head_dim, v.head_dim) {
        return None;
    }
    let (bits, mma_bf16) = mma_operands(cache)?;
    let one_part = match act {
        Dtype::Bf16 => true,
        Dtype::F16 => !mma_bf16,
        _ => false,
    };
    if !one_part {
        return None;
    }
    Some(MmaConfig {
        k,
        v,
        group,
        bits,
        v_words: 4,
        row_tiles: if max_rows <= MMA_TILE_ROWS as usize {
            1
        } else {
            2
        },
        q_parts: 1,
        p_parts: if mma_bf16 { 3 } else { 2 },
        q_scaled: !mma_bf16 && act != Dtype::F16,
        softcap: opts.softcap.is_some(),
        alibi: opts.alibi_slopes.is_some(),
        window: opts.window.is_some(),
        key_major: true,
        // The wide kernel's loop keeps one block in flight.
        depth: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_kernel_covers_mla_with_one_part_queries() {
        let applies = |st: DecodeStrategy, cache, query, dk, dv, group, max_q_len| {
            st.applies(&crate::kernels::decode::DecodeShape {
                cache,
                query,
                head_dim_k: dk,
                head_dim_v: dv,
                group,
                max_q_len,
            })
        };
        let wide = |cache, query, dk, dv, group| {
            applies(DecodeStrategy::Wide, cache, query, dk, dv, group, 1)
        };
        for cache in [Dtype::E4m3, Dtype::E5m2, Dtype::Bf16, Dtype::F16] {
            for group in [1, 8, 16, 128] {
                assert!(wide(cache, Dtype::Bf16, 576, 512, group));
                assert!(applies(
                    DecodeStrategy::Wide,
                    cache,
                    Dtype::Bf16,
                    576,
                    512,
                    group,
                    3
                ));
                assert!(!wide(cache, Dtype::F32, 576, 512, group));
            }
            // Only the wide routine takes MLA's dims.
            for st in [DecodeStrategy::TensorCores, DecodeStrategy::KeyMajor] {
                assert!(!applies(st, cache, Dtype::Bf16, 576, 512, 16, 1), "{st}");
            }
            assert!(!wide(cache, Dtype::Bf16, 128, 128, 4), "wide heads only");
        }
        assert!(wide(Dtype::E4m3, Dtype::F16, 576, 512, 16));
        assert!(!wide(Dtype::Bf16, Dtype::F16, 576, 512, 16));
        assert!(!wide(Dtype::E4m3, Dtype::Bf16, 192, 128, 8));
        assert!(!wide(Dtype::E4m3, Dtype::Bf16, 576, 512, 0));
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
}
