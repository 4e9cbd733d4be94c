//! The key-major routine: the tensor-core kernel of [`super::tensor_cores`] with the QK
//! transposed as well (`S^T = K·Q^T`: keys fill the MMA's 16-row M and each row tile's 8 query
//! rows its N; see `MmaConfig::key_major` and the kernel's module doc). It applies wherever
//! the query-major routine does; Auto takes it for one row tile on FP8 caches at head dims
//! 128/256 and on small groups at 64 (the table in `super::auto_strategy_for`).

use cubecl::prelude::*;

use super::tensor_cores::{launch_mma, problem_config};
use super::{SplitArgs, SplitRoutine};
use crate::contract::AttentionOptions;
use crate::kernels::decode::common::fragments::{pipeline_depth, MmaConfig, MMA_TILE_ROWS};
use crate::kernels::decode::definition::{DecodeProblem, DecodeStrategy};

/// The key-major tensor-core split routine.
pub(crate) struct KeyMajor;

impl SplitRoutine for KeyMajor {
    type Config = MmaConfig;
    const STRATEGY: DecodeStrategy = DecodeStrategy::KeyMajor;

    fn config(p: &DecodeProblem, opts: &AttentionOptions) -> Option<MmaConfig> {
        problem_config(p, opts).map(|c| {
            let c = MmaConfig {
                key_major: true,
                ..c
            };
            MmaConfig {
                depth: pipeline_depth(&c),
                ..c
            }
        })
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
