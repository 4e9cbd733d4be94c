//! The CUDA-core split kernel of paged decode (flash-decoding): [`decode_split_kernel()`]
//! computes one partial softmax state per (query row, split) over a slice of the sequence's
//! cache; `super::super::combine` merges the splits (and the sink).
//!
//! Partial state of one (token, head, split), the device form of
//! `definition::split::SplitState`: `o` = Σ_j p_j·v_scale·V_j / d (already normalised), `m` = the
//! largest score seen ([`NO_SCORE`], standing for −inf, when the split saw no key),
//! `d` = Σ_j exp(s_j − m).

use cubecl::prelude::*;

use crate::kernels::decode::combine::{merge_if_last, InKernelMerge};

use super::cuda_cores::DecodeConfig;
use crate::kernels::decode::common::{
    decode_vector, fp8_unit, work_range, SplitParams, NO_SCORE, PLANE_LANES,
};

/// Index, in cache vectors, of the start of token `t`'s row of one KV head (`head_off`
/// vectors into the token's slot), through the sequence's block-table row at `bt_base`.
#[cube]
fn token_row(
    meta: &Array<i32>,
    bt_base: u32,
    t: u32,
    head_off: u32,
    #[comptime] page_size: u32,
    #[comptime] page_stride: u32,
    #[comptime] slot_stride: u32,
) -> u32 {
    let page = u32::cast_from(meta[(bt_base + t / page_size) as usize]);
    page * page_stride + (t % page_size) * slot_stride + head_off
}

/// Split kernel: partial attention of a block of query rows of one KV group over one split of
/// one sequence's cache.
///
/// Grid `(num_kv_heads * row_blocks, batch, num_splits)`, cube `(cfg.threads, 1, 1)`. Cube
/// `(g * row_blocks + rb, b, s)` handles query rows `rb * rows .. (rb + 1) * rows` of sequence
/// `b`'s `q_len * group` rows of KV head `g` (row `i * group + hh` = new token `i`, query head
/// `g * group + hh`), and cache tokens `[s * split_tokens, (s + 1) * split_tokens)`: every K/V
/// vector it loads serves all its rows.
///
/// - `q`: `[num_tokens, num_heads, head_dim_k]` of `F`, tokens `q_row_stride` elements apart.
/// - `k_cache`, `v_cache`: `layout.shape(side)` elements of `Q`, as vectors of `NK` (16-byte
///   loads) / `NV` (16 bytes, or narrower so a thread's `rows × NV` accumulators stay ≤ 32).
/// - `meta`: the [`crate::device::DeviceBatch`] buffer.
/// - `alibi`: `[num_heads]` slopes (a 1-element dummy unless `cfg.alibi`).
/// - `ws_o`: `[num_tokens, num_heads, num_splits, head_dim_v]` f32; `ws_md`:
///   `[num_tokens, num_heads, num_splits, 2]` f32 (`m`, `d`).
///
/// Per tile of `cfg.tile_tokens` cache tokens: (1) each thread issues its V loads for the tile;
/// (2) `k_lanes` neighbouring lanes split one token's K row (16-byte vectors, converted to f32
/// as they meet the dot product), reduce their partial dots with shuffles and write one score
/// per row to shared memory; (3) one warp per row updates that row's running max and sum
/// (online softmax) and turns scores into `p · v_scale`; (4) each thread rescales and updates
/// its slice of the output accumulators with its V vectors.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn decode_split_kernel<F: Float, Q: Float, NK: Size, NV: Size>(
    q: &Array<F>,
    k_cache: &Array<Vector<Q, NK>>,
    v_cache: &Array<Vector<Q, NV>>,
    meta: &Array<i32>,
    alibi: &Array<f32>,
    ws_o: &mut Array<f32>,
    ws_md: &mut Array<f32>,
    ws_o4: &mut Array<Vector<f32, Const<4>>>,
    counters: &mut Array<Atomic<u32>>,
    sinks: &Array<f32>,
    out: &mut Array<F>,
    params: SplitParams,
    #[comptime] cfg: DecodeConfig,
    #[comptime] merge: InKernelMerge,
    #[define(F, Q)] _dtypes: [StorageType; 2],
) {
    // ---- comptime shape of the work ----------------------------------------------------
    let rows = comptime![cfg.rows];
    let group = comptime![cfg.group];
    let tile = comptime![cfg.tile_tokens];
    let threads = comptime![cfg.threads];
    let dk = comptime![cfg.k.head_dim];
    let dv = comptime![cfg.v.head_dim];
    let nk = comptime![cfg.k_vec];
    let nv = comptime![cfg.v_vec];
    let page_size = comptime![cfg.k.page_size];
    // K phase: `k_lanes` lanes per token, each taking vectors lane, lane + k_lanes, ...
    let k_lanes = comptime![cfg.k_lanes];
    let k_vecs = comptime![dk / nk];
    let k_vecs_per_lane = comptime![k_vecs.div_ceil(k_lanes)];
    let k_tokens_per_pass = comptime![threads / k_lanes];
    let k_passes = comptime![tile / k_tokens_per_pass];
    let k_shuffles = comptime![k_lanes.trailing_zeros()];
    // V phase: thread = (vector cv of the V row, token group tg).
    let v_vecs = comptime![dv / nv];
    let v_groups = comptime![threads / v_vecs];
    let v_passes = comptime![tile.div_ceil(v_groups)];
    // Cache strides in vectors (comptime; K and V may differ in head dim).
    let k_page = comptime![cfg.k.page_stride() / nk];
    let k_slot = comptime![cfg.k.slot_stride() / nk];
    let k_head = comptime![cfg.k.head_stride() / nk];
    let v_page = comptime![cfg.v.page_stride() / nv];
    let v_slot = comptime![cfg.v.slot_stride() / nv];
    let v_head = comptime![cfg.v.head_stride() / nv];
    let warps = comptime![threads / PLANE_LANES];
    let rows_per_warp = comptime![rows.div_ceil(warps)];
    let lane_tokens = comptime![tile / PLANE_LANES];
    // Decoded FP8 values come out as x·2^-2u (see `decode_vector`): q and p carry 2^u and
    // the scores and outputs get the other 2^u back, all exact power-of-two scalings.
    let unit = comptime![fp8_unit(cfg.fp8_shift)];

    // ---- which rows and tokens this cube owns -------------------------------------------
    let tid = UNIT_POS;
    let work = work_range(meta, &params, group, rows, cfg.window, 1u32);
    let (g, split, q_start) = (work.g, work.split, work.q_start);
    let (rows_total, row0, hist, bt_base) = (work.rows_total, work.row0, work.hist, work.bt_base);
    let (lo, hi) = (work.lo, work.hi);

    // ---- shared memory ----------------------------------------------------------------
    // Queries pre-multiplied by the score scale, f32, [rows][dk] as 4-wide vectors.
    let mut q_s = SharedMemory::<Vector<f32, Const<4>>>::new(comptime![(rows * dk / 4) as usize]);
    // Scores, then p · v_scale, [rows][tile].
    let mut s_s = SharedMemory::<f32>::new(comptime![(rows * tile) as usize]);
    // Running max, running sum, and this tile's rescale factor of each row.
    let mut m_s = SharedMemory::<f32>::new(comptime![rows as usize]);
    let mut d_s = SharedMemory::<f32>::new(comptime![rows as usize]);
    let mut alpha_s = SharedMemory::<f32>::new(comptime![rows as usize]);

    let q_vecs = comptime![rows * dk / 4];
    let mut i = tid;
    while i < q_vecs {
        let r = i / comptime![dk / 4];
        let d0 = (i % comptime![dk / 4]) * 4;
        let gr = row0 + r;
        let mut v = Vector::<f32, Const<4>>::new(0.0);
        if gr < rows_total {
            let tok = q_start + gr / group;
            let head = g * group + gr % group;
            let base = tok * params.q_row_stride + head * dk + d0;
            #[unroll]
            for e in 0..4u32 {
                v[e as usize] = f32::cast_from(q[(base + e) as usize]) * params.score_scale * unit;
            }
        }
        q_s[i as usize] = v;
        i += threads;
    }
    if tid < rows {
        m_s[tid as usize] = NO_SCORE;
        d_s[tid as usize] = 0.0;
    }

    // Per-thread state: V accumulators of its (rows × nv) slice, V vectors in flight.
    let k_lane = tid % k_lanes;
    let k_tok = tid / k_lanes;
    let cv = tid % v_vecs;
    let tg = tid / v_vecs;
    let v_active = tg < v_groups;
    let mut acc = Array::<f32>::new(comptime![(rows * nv) as usize]);
    #[unroll]
    for x in 0..rows * nv {
        acc[x as usize] = 0.0;
    }
    let mut v_regs = Array::<Vector<Q, NV>>::new(comptime![if cfg.v_prefetch {
        v_passes as usize
    } else {
        1
    }]);
    let mut dots = Array::<f32>::new(comptime![rows as usize]);
    let mut k_regs = Array::<Vector<Q, NK>>::new(comptime![if cfg.k_prefetch {
        (k_passes * k_vecs_per_lane) as usize
    } else {
        1
    }]);
    sync_cube();

    // The query values this lane's K vectors meet, in registers when they fit: shared-memory
    // reads of q would otherwise cost one 16-byte load per row per 4 cache elements.
    let mut q_regs = Array::<f32>::new(comptime![if cfg.q_in_regs {
        (rows * k_vecs_per_lane * nk) as usize
    } else {
        1
    }]);
    if comptime![cfg.q_in_regs] {
        #[unroll]
        for kv in 0..k_vecs_per_lane {
            let c = k_lane + kv * k_lanes;
            if comptime![(kv + 1) * k_lanes <= k_vecs] || c < k_vecs {
                #[unroll]
                for r in 0..rows {
                    #[unroll]
                    for e4 in 0..nk / 4 {
                        let qv = q_s[((r * dk + c * nk) / 4 + e4) as usize];
                        #[unroll]
                        for x in 0..4u32 {
                            q_regs[((r * k_vecs_per_lane + kv) * nk + e4 * 4 + x) as usize] =
                                qv[x as usize];
                        }
                    }
                }
            }
        }
    }

    let mut t0 = lo;
    while t0 < hi {
        // (1) V loads of this tile first, so they are in flight during the K phase (unless
        // that would hold too many registers: then they are issued in the PV phase).
        if comptime![cfg.v_prefetch] {
            #[unroll]
            for vp in 0..v_passes {
                let tl = tg + vp * v_groups;
                let t = t0 + tl;
                if v_active && tl < tile && t < hi {
                    let row = token_row(meta, bt_base, t, g * v_head, page_size, v_page, v_slot);
                    v_regs[vp as usize] = v_cache[(row + cv) as usize];
                }
            }
        }

        // (2a) This tile's K loads, all issued before the first is used (when the registers
        // allow), so each thread keeps several 16-byte loads in flight.
        if comptime![cfg.k_prefetch] {
            #[unroll]
            for kp in 0..k_passes {
                let t = t0 + kp * k_tokens_per_pass + k_tok;
                if t < hi {
                    let base = token_row(meta, bt_base, t, g * k_head, page_size, k_page, k_slot);
                    #[unroll]
                    for kv in 0..k_vecs_per_lane {
                        let c = k_lane + kv * k_lanes;
                        if comptime![(kv + 1) * k_lanes <= k_vecs] || c < k_vecs {
                            k_regs[(kp * k_vecs_per_lane + kv) as usize] =
                                k_cache[(base + c) as usize];
                        }
                    }
                }
            }
        }

        // (2b) Scores: k_lanes lanes per token; all lanes reach the shuffles.
        #[unroll]
        for kp in 0..k_passes {
            let tl = kp * k_tokens_per_pass + k_tok;
            let t = t0 + tl;
            #[unroll]
            for r in 0..rows {
                dots[r as usize] = 0.0;
            }
            if t < hi {
                let base = token_row(meta, bt_base, t, g * k_head, page_size, k_page, k_slot);
                #[unroll]
                for kv in 0..k_vecs_per_lane {
                    let c = k_lane + kv * k_lanes;
                    // Only the last vector of a lane can run past the row (dims like 80).
                    if comptime![(kv + 1) * k_lanes <= k_vecs] || c < k_vecs {
                        let kq = if comptime![cfg.k_prefetch] {
                            k_regs[(kp * k_vecs_per_lane + kv) as usize]
                        } else {
                            k_cache[(base + c) as usize]
                        };
                        let kf = decode_vector::<Q, NK>(kq, cfg.fp8_shift);
                        #[unroll]
                        for r in 0..rows {
                            let mut dot = dots[r as usize];
                            if comptime![cfg.q_in_regs] {
                                let qr = (r * k_vecs_per_lane + kv) * nk;
                                #[unroll]
                                for e in 0..nk {
                                    dot += q_regs[(qr + e) as usize] * kf[e as usize];
                                }
                            } else {
                                let qb = (r * dk + c * nk) / 4;
                                #[unroll]
                                for e4 in 0..nk / 4 {
                                    let qv = q_s[(qb + e4) as usize];
                                    dot += qv[0] * kf[(e4 * 4) as usize]
                                        + qv[1] * kf[(e4 * 4 + 1) as usize]
                                        + qv[2] * kf[(e4 * 4 + 2) as usize]
                                        + qv[3] * kf[(e4 * 4 + 3) as usize];
                                }
                            }
                            dots[r as usize] = dot;
                        }
                    }
                }
            }
            #[unroll]
            for r in 0..rows {
                let mut dot = dots[r as usize];
                #[unroll]
                for sh in 0..k_shuffles {
                    dot += plane_shuffle_xor(dot, comptime![1u32 << sh]);
                }
                dots[r as usize] = dot;
            }
            if k_lane == 0 {
                #[unroll]
                for r in 0..rows {
                    let gr = row0 + r;
                    let pos = hist + gr / group;
                    let mut s = dots[r as usize] * unit;
                    if comptime![cfg.softcap] {
                        s = params.softcap * (s / params.softcap).tanh();
                    }
                    if comptime![cfg.alibi] {
                        let head = g * group + gr % group;
                        s += alibi[head as usize] * (f32::cast_from(t) - f32::cast_from(pos));
                    }
                    let mut visible = gr < rows_total && t < hi && t <= pos;
                    if comptime![cfg.window] {
                        visible = visible && t + params.window > pos;
                    }
                    s_s[(r * tile + tl) as usize] = select(visible, s, NO_SCORE);
                }
            }
        }
        sync_cube();

        // (3) Online softmax, one warp per row.
        let warp = tid / PLANE_LANES;
        let lane = tid % PLANE_LANES;
        #[unroll]
        for rw in 0..rows_per_warp {
            let r = warp + rw * warps;
            if r < rows {
                let mut mx = f32::new(NO_SCORE);
                #[unroll]
                for k in 0..lane_tokens {
                    mx = mx.max(s_s[(r * tile + lane + k * PLANE_LANES) as usize]);
                }
                mx = plane_max(mx);
                let m_old = m_s[r as usize];
                let m_new = m_old.max(mx);
                // Nothing visible yet: m = 0 keeps every p = exp(NO_SCORE) = 0 and alpha = 0.
                let m_ref = select(m_new == NO_SCORE, 0.0, m_new);
                let alpha = (m_old - m_ref).exp();
                let mut sum = 0.0f32;
                #[unroll]
                for k in 0..lane_tokens {
                    let idx = (r * tile + lane + k * PLANE_LANES) as usize;
                    let p = (s_s[idx] - m_ref).exp();
                    sum += p;
                    s_s[idx] = p * params.v_scale * unit;
                }
                sum = plane_sum(sum);
                if lane == 0 {
                    m_s[r as usize] = m_new;
                    d_s[r as usize] = d_s[r as usize] * alpha + sum;
                    alpha_s[r as usize] = alpha;
                }
            }
        }
        sync_cube();

        // (4) o = o · alpha + Σ_t (p_t · v_scale) · f32(V_t) on this thread's slice.
        if v_active {
            #[unroll]
            for r in 0..rows {
                let alpha = alpha_s[r as usize];
                #[unroll]
                for e in 0..nv {
                    acc[(r * nv + e) as usize] *= alpha;
                }
            }
            #[unroll]
            for vp in 0..v_passes {
                let tl = tg + vp * v_groups;
                let t = t0 + tl;
                if tl < tile && t < hi {
                    let vq = if comptime![cfg.v_prefetch] {
                        v_regs[vp as usize]
                    } else {
                        let row =
                            token_row(meta, bt_base, t, g * v_head, page_size, v_page, v_slot);
                        v_cache[(row + cv) as usize]
                    };
                    let vf = decode_vector::<Q, NV>(vq, cfg.fp8_shift);
                    #[unroll]
                    for r in 0..rows {
                        let p = s_s[(r * tile + tl) as usize];
                        #[unroll]
                        for e in 0..nv {
                            acc[(r * nv + e) as usize] += p * vf[e as usize];
                        }
                    }
                }
            }
        }
        // The next tile overwrites the scores.
        sync_cube();
        t0 += tile;
    }

    // ---- reduce the token groups' accumulators and write the partial state ------------
    let mut red_s = SharedMemory::<f32>::new(comptime![(rows * dv) as usize]);
    let mut z = tid;
    while z < rows * dv {
        red_s[z as usize] = 0.0;
        z += threads;
    }
    // With v_vecs dividing the warp, groups of one warp first meet through shuffles, then
    // one round per warp; otherwise one round per token group.
    let shuffle_groups = comptime![PLANE_LANES.is_multiple_of(v_vecs)];
    if comptime![shuffle_groups] {
        let steps = comptime![(PLANE_LANES / v_vecs).trailing_zeros()];
        #[unroll]
        for x in 0..rows * nv {
            let mut a = acc[x as usize];
            #[unroll]
            for sh in 0..steps {
                a += plane_shuffle_xor(a, comptime![v_vecs << sh]);
            }
            acc[x as usize] = a;
        }
    }
    let rounds = comptime![if shuffle_groups { warps } else { v_groups }];
    let my_round = if comptime![shuffle_groups] {
        tid / PLANE_LANES
    } else {
        tg
    };
    let leader = if comptime![shuffle_groups] {
        tid % PLANE_LANES < v_vecs
    } else {
        v_active
    };
    sync_cube();
    for round in 0..rounds {
        if leader && my_round == round {
            #[unroll]
            for r in 0..rows {
                #[unroll]
                for e in 0..nv {
                    let idx = (r * dv + cv * nv + e) as usize;
                    red_s[idx] += acc[(r * nv + e) as usize];
                }
            }
        }
        sync_cube();
    }

    let num_splits = params.num_splits;
    let mut o = tid;
    while o < rows * dv {
        let r = o / dv;
        let d = o % dv;
        let gr = row0 + r;
        if gr < rows_total {
            let tok = q_start + gr / group;
            let head = g * group + gr % group;
            let den = d_s[r as usize];
            let val = select(den > 0.0, red_s[o as usize] * unit / den, 0.0);
            ws_o[(((tok * params.num_heads + head) * num_splits + split) * dv + d) as usize] = val;
        }
        o += threads;
    }
    if tid < rows {
        let gr = row0 + tid;
        if gr < rows_total {
            let tok = q_start + gr / group;
            let head = g * group + gr % group;
            let at = ((tok * params.num_heads + head) * num_splits + split) * 2;
            ws_md[at as usize] = m_s[tid as usize];
            ws_md[(at + 1) as usize] = d_s[tid as usize];
        }
    }
    if comptime![merge.on] {
        merge_if_last::<F>(
            ws_o4,
            ws_md,
            counters,
            sinks,
            out,
            &work,
            &params,
            group,
            rows,
            dv,
            threads,
            merge.sinks,
        );
    }
}
