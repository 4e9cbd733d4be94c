//! Kernel internals for this workspace's own tests, benches and xtask (the `internals`
//! feature; not part of the supported API): the FP8 codec's `#[cube]` functions, the split
//! planner and its constants, the partial-state merge the combine implements, and the
//! streaming launch-shape override the fill/flatten bench tunes with, the statistics buffer's
//! layout, and the tensor-core
//! decode kernels' pipeline-depth override (`--ab-depth`). The one gated module:
//! everything else stays `pub(crate)` whatever the features.

pub use crate::kernels::codec::{
    encode_magnitude, fp8_encode, fp8_quantize, fp8_quantize_vector, ScaleDiv, FAST_DIV_SCALE_RANGE,
};
pub use crate::kernels::decode::definition::split::{
    SplitPlan, SplitState, WorkspaceShape, MAX_SPLITS, MIN_SPLIT_TOKENS, SPLIT_OVERHEAD_TOKENS,
    TILE_TOKENS,
};
pub use crate::kernels::decode::routines::cuda_cores::MAX_ROWS_PER_CUBE;

/// A [`crate::DeviceKvStats`] buffer's layout, `(copies, words between copies)`: each copy is
/// `[k_amax_bits, v_amax_bits, k_saturated, v_saturated]` (for `cargo xtask emulate`'s
/// statistics driver, which allocates and folds the buffer itself).
pub const STATS_LAYOUT: (u32, u32) = (
    crate::kernels::stats::STATS_COPIES,
    crate::kernels::stats::STATS_COPY_STRIDE,
);

/// Tuning runs only (benches, under the `internals` feature): makes every later fill
/// (`family` `"FILL"`) or flatten (`"FLATTEN"`) launch big enough for the streaming path use
/// `(threads per cube, vectors per thread, rounds)` instead of the defaults (clamped to 1024,
/// 16 and 16; `None` restores them). An explicit call, never an environment variable read
/// inside the library.
pub fn override_copy_shape(family: &'static str, shape: Option<(u32, u32, u32)>) {
    let mut map = crate::kernels::COPY_OVERRIDES
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    map.retain(|(f, _)| *f != family);
    if let Some((t, u, r)) = shape {
        map.push((family, (t.clamp(1, 1024), u.clamp(1, 16), r.clamp(1, 16))));
    }
}

/// Tuning runs only (benches and `cargo xtask codegen --depth`, under the `internals`
/// feature): makes every later tensor-core decode launch (default and key-major layouts) run
/// its loads `depth` 16-token blocks ahead (clamped to 1..=2) instead of the default for its
/// head dim; `None` restores the default. The wide MLA kernel keeps 1.
pub fn override_decode_depth(depth: Option<u32>) {
    crate::kernels::decode::common::fragments::DEPTH_OVERRIDE
        .store(depth.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
}
