//! The combine: merges the partial states the split routines write to the workspace (the
//! device form of [`super::definition::split::SplitState::merge`] and `finish`) and the
//! optional sink into the output. Two forms of one computation: [`merge_if_last()`], which
//! every split kernel ends with in a fused launch (the last cube of a row block merges, so a
//! call is one launch), and the separate [`decode_combine_kernel()`] for plans with more
//! splits than the fused merge holds (or where forced).

use cubecl::prelude::*;

use super::common::{SplitParams, WorkRange, NO_SCORE, PLANE_LANES};
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

/// Loads in flight per thread in the in-kernel merge: 8 four-float vectors (32 registers,
/// free by then: the split loop's are dead).
const MERGE_UNROLL: u32 = 8;

/// Most splits the in-kernel merge takes: its weights sit in shared memory, `rows ×` this
/// floats (4 KiB at 16 rows). Plans with more splits keep the separate combine kernel.
pub(crate) const FUSED_MAX_SPLITS: u32 = 64;

/// Comptime switch of the merge at the end of every split kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct InKernelMerge {
    /// The last split cube of each (sequence, KV head, row block) merges the splits into the
    /// output (no combine launch).
    pub on: bool,
    /// The sink logits join the merge's denominator.
    pub sinks: bool,
}

/// CUDA's `__threadfence()`: this thread's global writes become visible to every cube before
/// any of its later ones. CubeCL 0.10's IR has no device-scope fence, so the call is emitted
/// through a comment that closes itself (`/* */ __threadfence(); /* */`); `cargo xtask
/// codegen` (a CI step) fails any kernel with the merge's atomics whose source lacks the two.
#[cube]
pub(crate) fn device_fence() {
    comment!("*/ __threadfence(); /*\n");
}

/// Ends a split cube in a fused launch: after every thread's partial-state writes, the cube
/// counts its arrival for its (sequence, KV head, row block) (`counters`, one `u32` per grid
/// x·y, zero between launches); the cube that arrives last resets the counter to 0 (so the next
/// launch needs no memset) and merges all `num_splits` partial states of its rows into `out`,
/// exactly as [`decode_combine_kernel()`] does; the others end.
///
/// Every thread fences its own writes before the arrival (release) and after seeing it last
/// (acquire). The last cube reads other cubes' states with ordinary loads: no cube of this
/// launch read those addresses before, so no L1 line of them can be stale.
///
/// - `ws_o`: the workspace's `o` as 4-float vectors (a second, writable view of the buffer the
///   split kernel wrote: a `const __restrict__` view could be read through the non-coherent
///   path); `ws_md`: its `(m, d)`.
/// - Requires `num_splits ≤ FUSED_MAX_SPLITS`, `head_dim_v` a multiple of 4 and every thread
///   of the cube to call it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge_if_last<F: Float>(
    ws_o: &Array<Vector<f32, Const<4>>>,
    ws_md: &Array<f32>,
    counters: &mut Array<Atomic<u32>>,
    sinks: &Array<f32>,
    out: &mut Array<F>,
    work: &WorkRange,
    params: &SplitParams,
    #[comptime] group: u32,
    #[comptime] rows: u32,
    #[comptime] dv: u32,
    #[comptime] threads: u32,
    #[comptime] has_sinks: bool,
) {
    let mut last_s = SharedMemory::<u32>::new(1usize);
    device_fence();
    sync_cube();
    let num_splits = params.num_splits;
    if UNIT_POS == 0 {
        let at = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
        let before = counters[at].fetch_add(1u32);
        let last = before + 1 == num_splits;
        if last {
            counters[at].store(0u32);
        }
        last_s[0] = select(last, 1u32, 0u32);
    }
    sync_cube();
    if last_s[0] == 0 {
        terminate!();
    }
    device_fence();

    // (1) Per row, one warp: the weights w_s = d_s·exp(m_s − M) / den of its splits (two per
    // lane), M the largest m of a non-empty split and the sink, den = Σ w_s + exp(sink − M);
    // all zero for a row that saw no key.
    let warps = comptime![threads / PLANE_LANES];
    let mut w_s = SharedMemory::<f32>::new(comptime![(rows * FUSED_MAX_SPLITS) as usize]);
    let lane = UNIT_POS_PLANE;
    let mut r = UNIT_POS / PLANE_LANES;
    while r < rows {
        let gr = work.row0 + r;
        if gr < work.rows_total {
            let tok = work.q_start + gr / group;
            let head = work.g * group + gr % group;
            let base = (tok * params.num_heads + head) * num_splits;
            let s1 = lane + PLANE_LANES;
            let mut m0 = f32::new(NO_SCORE);
            let mut d0 = 0.0f32;
            let mut m1 = f32::new(NO_SCORE);
            let mut d1 = 0.0f32;
            if lane < num_splits {
                m0 = ws_md[((base + lane) * 2) as usize];
                d0 = ws_md[((base + lane) * 2 + 1) as usize];
            }
            if s1 < num_splits {
                m1 = ws_md[((base + s1) * 2) as usize];
                d1 = ws_md[((base + s1) * 2 + 1) as usize];
            }
            let mut m =
                plane_max(select(d0 > 0.0, m0, NO_SCORE).max(select(d1 > 0.0, m1, NO_SCORE)));
            let mut sink = f32::new(NO_SCORE);
            if comptime![has_sinks] {
                sink = sinks[head as usize];
                m = m.max(sink);
            }
            let w0 = select(d0 > 0.0, d0 * (m0 - m).exp(), 0.0);
            let w1 = select(d1 > 0.0, d1 * (m1 - m).exp(), 0.0);
            let seen = plane_sum(w0 + w1);
            let mut den = seen;
            if comptime![has_sinks] {
                den += (sink - m).exp();
            }
            let inv = select(seen > 0.0, 1.0 / den, 0.0);
            if lane < num_splits {
                w_s[(r * FUSED_MAX_SPLITS + lane) as usize] = w0 * inv;
            }
            if s1 < num_splits {
                w_s[(r * FUSED_MAX_SPLITS + s1) as usize] = w1 * inv;
            }
        }
        r += warps;
    }
    sync_cube();

    // (2) Each thread a 4-float vector of one row's output: the weighted sum over the splits,
    // MERGE_UNROLL loads in flight (a thread often has one vector to do: at batch 1 the merge
    // is a few cubes' tail, bound by the L2's latency).
    let lanes = comptime![dv / 4];
    let mut i = UNIT_POS;
    while i < comptime![rows * dv / 4] {
        let r = i / lanes;
        let l = i % lanes;
        let gr = work.row0 + r;
        if gr < work.rows_total {
            let tok = work.q_start + gr / group;
            let head = work.g * group + gr % group;
            let base = (tok * params.num_heads + head) * num_splits;
            let mut acc = Vector::<f32, Const<4>>::new(0.0);
            let mut s0 = 0u32;
            while s0 < num_splits {
                #[unroll]
                for u in 0..MERGE_UNROLL {
                    let s = s0 + u;
                    if s < num_splits {
                        acc += ws_o[((base + s) * lanes + l) as usize]
                            * Vector::new(w_s[(r * FUSED_MAX_SPLITS + s) as usize]);
                    }
                }
                s0 += MERGE_UNROLL;
            }
            let at = (tok * params.num_heads + head) * dv + 4 * l;
            #[unroll]
            for e in 0..4u32 {
                out[(at + e) as usize] = F::cast_from(acc[e as usize]);
            }
        }
        i += threads;
    }
}
