//! The combine: merges the partial states the split routines write to the workspace (the
//! device form of [`super::definition::split::SplitState::merge`] and `finish`) and the
//! optional sink into the output. One kernel for every routine.

use cubecl::prelude::*;

use super::common::{NO_SCORE, PLANE_LANES};
use crate::kernels::meta as batch_meta;

/// Splits one combine thread reads per trip of its loop (independent loads in flight).
const COMBINE_UNROLL: u32 = 4;

/// Combine kernel: merges the `num_splits` partial states of each (token, head) and the
/// optional sink logit into the output, `o = Σ_s w_s·o_s / (Σ_s w_s + exp(sink − M))` with
/// `w_s = d_s·exp(m_s − M)`, `M` the largest of the `m_s` and the sink. A query that saw no
/// key (every `d_s = 0`) gets 0, as the reference does, sink or not.
///
/// Grid `(num_heads, batch, max_q_len)`, cube `(threads, 1, 1)`; cube `(h, b, i)` writes new
/// token `i` of sequence `b`, head `h` (nothing when `i ≥ q_len`; rows of no sequence are never
/// written). The splits are spread over the cube twice: first one per thread for `M`, the
/// weights and their sum (plane reductions, then one value per warp through shared memory);
/// then `threads / (head_dim_v / 4)` groups of lanes, each lane one 4-float vector of `o`,
/// take every `groups`-th split, and the groups' sums meet in shared memory. So a batch-1
/// launch with many splits costs a few dependent loads, not one per split.
///
/// - `ws_o`: `[num_tokens, num_heads, num_splits, head_dim_v]` f32 as 4-float vectors
///   (`head_dim_v` is a multiple of 4); `ws_md`: `[num_tokens, num_heads, num_splits, 2]` f32.
/// - `sinks`: `[num_heads]` (a 1-element dummy unless `has_sinks`).
/// - `out`: `[num_tokens, num_heads, head_dim_v]` of `F`, contiguous.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn decode_combine_kernel<F: Float>(
    ws_o: &Array<Vector<f32, Const<4>>>,
    ws_md: &Array<f32>,
    meta: &Array<i32>,
    sinks: &Array<f32>,
    out: &mut Array<F>,
    batch: u32,
    num_heads: u32,
    num_splits: u32,
    #[comptime] head_dim_v: u32,
    #[comptime] threads: u32,
    #[comptime] max_splits: u32,
    #[comptime] has_sinks: bool,
    #[define(F)] _dtype: StorageType,
) {
    let warps = comptime![threads / PLANE_LANES];
    let lanes = comptime![head_dim_v / 4];
    let groups = comptime![threads / lanes];
    let h = CUBE_POS_X;
    let b = CUBE_POS_Y;
    let i = CUBE_POS_Z;
    let tid = UNIT_POS;
    let warp = tid / PLANE_LANES;
    let q_len = batch_meta::q_len(meta, batch, b);
    if i >= q_len {
        terminate!();
    }
    let tok = batch_meta::q_start(meta, batch, b) + i;
    let base = (tok * num_heads + h) * num_splits;
    let mut w_s = SharedMemory::<f32>::new(comptime![max_splits as usize]);
    // Per-warp partials: [0, warps) maxima, [warps, 2·warps) counts of non-empty splits, then
    // [2·warps, 3·warps) weight sums.
    let mut red = SharedMemory::<f32>::new(comptime![(3 * warps) as usize]);
    let mut part = SharedMemory::<f32>::new(comptime![(groups * head_dim_v) as usize]);

    // Each lane group's first vectors of `o` are loaded now, so their latency overlaps the
    // (m, d) reads and reductions below instead of following them.
    let grp = tid / lanes;
    let l = tid % lanes;
    let mut first = Array::<Vector<f32, Const<4>>>::new(COMBINE_UNROLL as usize);
    #[unroll]
    for u in 0..COMBINE_UNROLL {
        let s = grp + u * groups;
        first[u as usize] = Vector::new(0.0);
        if grp < groups && s < num_splits {
            first[u as usize] = ws_o[((base + s) * lanes + l) as usize];
        }
    }

    // (1) M over the non-empty splits, and whether any exists (m and d read together).
    let mut m_loc = f32::new(NO_SCORE);
    let mut n_loc = 0.0f32;
    let mut s = tid;
    while s < num_splits {
        let ms = ws_md[((base + s) * 2) as usize];
        let ds = ws_md[((base + s) * 2 + 1) as usize];
        if ds > 0.0 {
            m_loc = m_loc.max(ms);
            n_loc += 1.0;
        }
        s += threads;
    }
    let m_w = plane_max(m_loc);
    let n_w = plane_sum(n_loc);
    if UNIT_POS_PLANE == 0 {
        red[warp as usize] = m_w;
        red[(warps + warp) as usize] = n_w;
    }
    sync_cube();
    let mut m = f32::new(NO_SCORE);
    let mut seen_count = 0.0f32;
    #[unroll]
    for w in 0..warps {
        m = m.max(red[w as usize]);
        seen_count += red[(warps + w) as usize];
    }
    let mut sink = f32::new(NO_SCORE);
    if comptime![has_sinks] {
        sink = sinks[h as usize];
        m = m.max(sink);
    }

    // (2) Weights (an empty split, d = 0 and m = NO_SCORE, gets 0 without evaluating its exp)
    // and their sum.
    let mut den_loc = 0.0f32;
    let mut s = tid;
    while s < num_splits {
        let ms = ws_md[((base + s) * 2) as usize];
        let ds = ws_md[((base + s) * 2 + 1) as usize];
        let w = select(ds > 0.0, ds * (ms - m).exp(), 0.0);
        w_s[s as usize] = w;
        den_loc += w;
        s += threads;
    }
    let den_w = plane_sum(den_loc);
    if UNIT_POS_PLANE == 0 {
        red[(2 * warps + warp) as usize] = den_w;
    }
    sync_cube();
    let mut den = 0.0f32;
    #[unroll]
    for w in 0..warps {
        den += red[(2 * warps + w) as usize];
    }
    if comptime![has_sinks] {
        den += (sink - m).exp();
    }
    let inv = select(seen_count > 0.0, 1.0 / den, 0.0);

    // (3) Each group of lanes sums its splits' weighted vectors (the first ones are loaded).
    if grp < groups {
        let mut acc = Vector::<f32, Const<4>>::new(0.0);
        #[unroll]
        for u in 0..COMBINE_UNROLL {
            let s = grp + u * groups;
            if s < num_splits {
                acc += first[u as usize] * Vector::new(w_s[s as usize]);
            }
        }
        let mut s0 = grp + comptime![COMBINE_UNROLL * groups];
        while s0 < num_splits {
            #[unroll]
            for u in 0..COMBINE_UNROLL {
                let s = s0 + u * groups;
                if s < num_splits {
                    acc += ws_o[((base + s) * lanes + l) as usize] * Vector::new(w_s[s as usize]);
                }
            }
            s0 += comptime![COMBINE_UNROLL * groups];
        }
        #[unroll]
        for e in 0..4u32 {
            part[(grp * head_dim_v + 4 * l + e) as usize] = acc[e as usize];
        }
    }
    sync_cube();

    // (4) The groups' sums, scaled, to the output.
    let mut d = tid;
    while d < head_dim_v {
        let mut o = 0.0f32;
        #[unroll]
        for g in 0..groups {
            o += part[(g * head_dim_v + d) as usize];
        }
        out[((tok * num_heads + h) * head_dim_v + d) as usize] = F::cast_from(o * inv);
        d += threads;
    }
}
