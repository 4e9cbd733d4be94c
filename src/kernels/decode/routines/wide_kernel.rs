//! Tensor-core split kernel for wide heads ([`decode_split_wide_kernel()`]): MLA's K 576 /
//! V 512, whose query and output fragments do not fit one warp's registers. The four warps of
//! a cube walk the same 16-token blocks and split the head dims instead of the tokens:
//!
//! - QK: warp `w` computes the key-major partial `S^T` (see `super::mma_kernel`) over K dims
//!   `[w·dk/4, (w+1)·dk/4)` (144 for MLA: 8 k-steps whose dims lie in 32 contiguous bytes of
//!   each lane's token row, as in the head-dim-128 kernel, then one k-step of 4 dims per lane).
//!   The partials meet in shared memory (double-buffered, one cube barrier per block) and
//!   every warp adds the four in the same order, so all warps hold the same scores.
//! - Softmax: every warp runs the same online softmax on the same scores (no second
//!   exchange), so the running max and sum agree bit for bit across warps.
//! - PV: warp `w` accumulates V dims `[w·dv/4, (w+1)·dv/4)` (128 for MLA: the head-dim-128
//!   kernel's V pieces), so the output needs no merge: each warp writes its slice of the
//!   partial state.
//!
//! Same workspace and combine kernel as the other split kernels.

use cubecl::prelude::*;

use crate::kernels::decode::combine::{merge_if_last, InKernelMerge};

use crate::kernels::decode::common::fragments::{
    block_page, exchange_lanes, fp8_pair, key_major_slot_scales, km_qk_step, km_scores,
    km_softmax_exchange, load_piece, piece_pair, pow2_row_scale, pv_mma, query_fragments,
    query_values, score_slots, CacheBits, MmaConfig, MMA_BLOCK_TOKENS, MMA_TILE_ROWS, MMA_WARPS,
    WIDE_BODY_DIMS,
};
use crate::kernels::decode::common::{work_range, SplitParams, NO_SCORE, PLANE_LANES};
use crate::kernels::CacheGeometry;

/// Where token `t`'s row of KV head `g` starts in page `page` of a cache of `es`-byte
/// elements, in units of `unit` bytes (every stride is a whole number of them: see
/// [`wide_dims`]).
#[cube]
fn head_row(
    page: u32,
    t: u32,
    g: u32,
    #[comptime] geom: CacheGeometry,
    #[comptime] es: u32,
    #[comptime] unit: u32,
) -> u32 {
    page * comptime![geom.page_stride() * es / unit]
        + (t % comptime![geom.page_size]) * comptime![geom.slot_stride() * es / unit]
        + g * comptime![geom.head_stride() * es / unit]
}

/// Issues the loads of a lane's part of the K slice for the 16-token block at `t0` (tokens
/// `t0 + gq` and `t0 + 8 + gq`): the body (32 contiguous elements from `tq·32`) as 16-byte
/// vectors into `kb`, the tail (4 elements per k-step from `WIDE_BODY_DIMS + 4·tq`) as words
/// into `kt`; zeros for tokens at or past `hi`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_k_slice(
    k_cache: &Array<Vector<u32, Const<4>>>,
    k_words: &Array<u32>,
    kb: &mut Array<Vector<u32, Const<4>>>,
    kt: &mut Array<u32>,
    t0: u32,
    hi: u32,
    page: u32,
    g: u32,
    warp: u32,
    gq: u32,
    tq: u32,
    #[comptime] cfg: MmaConfig,
) {
    let es = comptime![cfg.bits.elem_bytes()];
    let geom = comptime![cfg.k];
    let dkw = comptime![geom.head_dim / MMA_WARPS];
    let body_vecs = comptime![WIDE_BODY_DIMS / 4 * es / 16];
    let tail_steps = comptime![(dkw - WIDE_BODY_DIMS) / 16];
    // Words per lane and tail step (4 elements).
    let tail_words = comptime![es];
    #[unroll]
    for j in 0..2u32 {
        let t = t0 + gq + comptime![8 * j];
        // Word offset of the warp's slice in this token's row (every stride and the slice
        // start are whole 16-byte vectors, see `wide_dims`; the entry checks that word
        // indices fit in u32).
        let row = head_row(page, t, g, geom, es, 4u32) + warp * comptime![dkw * es / 4];
        let body = row / 4 + tq * body_vecs;
        load_piece(
            k_cache,
            kb,
            t,
            hi,
            body,
            comptime![j * body_vecs],
            body_vecs,
        );
        #[unroll]
        for ts in 0..tail_steps {
            let word = row + comptime![(WIDE_BODY_DIMS + 16 * ts) * es / 4] + tq * tail_words;
            #[unroll]
            for c in 0..tail_words {
                let at = comptime![((j * tail_steps + ts) * tail_words + c) as usize];
                kt[at] = 0u32;
                if t < hi {
                    kt[at] = k_words[(word + c) as usize];
                }
            }
        }
    }
}

/// Issues the loads of a lane's V pieces for the block at `t0`: tokens `t0 + tq + {0, 8, 4,
/// 12}` (the key-major PV's k-slots), V dims `w·128 + gq·16 .. + 16` as 16-byte vectors;
/// zeros for tokens at or past `hi`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_v_slice(
    v_cache: &Array<Vector<u32, Const<4>>>,
    vr: &mut Array<Vector<u32, Const<4>>>,
    t0: u32,
    hi: u32,
    page: u32,
    g: u32,
    warp: u32,
    gq: u32,
    tq: u32,
    #[comptime] cfg: MmaConfig,
) {
    let es = comptime![cfg.bits.elem_bytes()];
    let geom = comptime![cfg.v];
    let dvw = comptime![geom.head_dim / MMA_WARPS];
    let vecs = comptime![dvw / 8 * es / 16];
    #[unroll]
    for i in 0..4u32 {
        let t = t0 + tq + comptime![8 * (i % 2) + 4 * (i / 2)];
        let at =
            head_row(page, t, g, geom, es, 16u32) + warp * comptime![dvw * es / 16] + gq * vecs;
        load_piece(v_cache, vr, t, hi, at, comptime![i * vecs], vecs);
    }
}

/// Wide-head tensor-core split kernel: the partial attention state of 8 or 16 query rows
/// (`8 · cfg.row_tiles`) of one KV group over one split of one sequence's cache, in the
/// workspace format of [`super::cuda_cores_kernel::decode_split_kernel()`] (see the module doc).
///
/// Grid and rows as [`super::mma_kernel::decode_split_mma_kernel()`], cube `(MMA_WARPS · 32, 1, 1)`.
/// `k_cache` and `k_words` are the same K cache as 16-byte vectors and as words; `v_cache` the
/// V cache as 16-byte vectors. Requires [`wide_dims`], one query part and `cfg.v_words == 4`.
#[cube(launch_unchecked)]
// A comptime flag and a runtime condition cannot share one `if` in `#[cube]` code.
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
pub fn decode_split_wide_kernel<F: Float, M: Float>(
    q: &Array<F>,
    k_cache: &Array<Vector<u32, Const<4>>>,
    k_words: &Array<u32>,
    v_cache: &Array<Vector<u32, Const<4>>>,
    meta: &Array<i32>,
    alibi: &Array<f32>,
    ws_o: &mut Array<f32>,
    ws_md: &mut Array<f32>,
    ws_o4: &mut Array<Vector<f32, Const<4>>>,
    counters: &mut Array<Atomic<u32>>,
    sinks: &Array<f32>,
    out: &mut Array<F>,
    params: SplitParams,
    #[comptime] cfg: MmaConfig,
    #[comptime] merge: InKernelMerge,
    #[define(F, M)] _dtypes: [StorageType; 2],
) {
    // ---- comptime shape --------------------------------------------------------------------
    let group = comptime![cfg.group];
    let dk = comptime![cfg.k.head_dim];
    let dv = comptime![cfg.v.head_dim];
    let dkw = comptime![dk / MMA_WARPS];
    let dvw = comptime![dv / MMA_WARPS];
    let es = comptime![cfg.bits.elem_bytes()];
    let page_size = comptime![cfg.k.page_size];
    let body_steps = comptime![WIDE_BODY_DIMS / 16];
    let k_steps = comptime![dkw / 16];
    let tail_steps = comptime![k_steps - body_steps];
    let tail_words = comptime![es];
    let body_vecs = comptime![WIDE_BODY_DIMS / 4 * es / 16];
    let v_vecs = comptime![dvw / 8 * es / 16];
    let m_tiles = comptime![dvw / 16];
    let rt = comptime![cfg.row_tiles];
    let rows = comptime![MMA_TILE_ROWS * cfg.row_tiles];
    let p_parts = comptime![cfg.p_parts];
    let score_rows = comptime![2 * rt];
    // Scores per lane and block: [row tile][register c][element e].
    let per_lane = comptime![4 * rt];

    let lane = UNIT_POS % PLANE_LANES;
    let warp = UNIT_POS / PLANE_LANES;
    let gq = lane / 4;
    let tq = lane % 4;
    let work = work_range(meta, &params, group, rows, cfg.window, MMA_BLOCK_TOKENS);
    let (g, split, q_start) = (work.g, work.split, work.q_start);
    let (rows_total, row0, bt_base) = (work.rows_total, work.row0, work.bt_base);
    let (lo, hi) = (work.lo, work.hi);

    // Score slot 2x + e: row 8x + 2tq + e (the key-major layout of the mma kernel).
    let mut row_ok = Array::<bool>::new(4usize);
    let mut row_pos = Array::<u32>::new(4usize);
    let mut row_slope = Array::<f32>::new(4usize);
    score_slots(
        &mut row_ok,
        &mut row_pos,
        &mut row_slope,
        alibi,
        &work,
        gq,
        tq,
        cfg,
    );

    // ---- the query's B fragments for this warp's K dims: [k-step][4 registers] -------------
    // Register x of step s: row gq + 8·(x % 2), dims (+0, +1) (x < 2) or (+2, +3) of the
    // lane's four dims of the step: `tq·32 + 4s` in the body, `WIDE_BODY_DIMS + 16·(s − 8) +
    // 4·tq` in the tail.
    let mut qv = Array::<f32>::new(comptime![(k_steps * 8) as usize]);
    let mut q_max = Array::<f32>::new(2usize);
    query_values::<F>(
        q,
        &mut qv,
        &mut q_max,
        &work,
        &params,
        warp * dkw,
        gq,
        tq,
        cfg,
        k_steps,
        comptime![WIDE_BODY_DIMS / 4],
        body_steps,
    );
    // Every warp scales a row by the same power of two (its partial scores are added to the
    // others'), so the row's max |q| is taken over all four warps' dims.
    let mut q_scale = Array::<f32>::new(2usize);
    let mut row_score_scale = Array::<f32>::new(4usize);
    let mut qmx_s = SharedMemory::<f32>::new(comptime![(MMA_WARPS * 16) as usize]);
    if comptime![cfg.q_scaled] {
        #[unroll]
        for x in 0..rt {
            let mut mx = q_max[x as usize];
            mx = mx.max(plane_shuffle_xor(mx, 1u32));
            mx = mx.max(plane_shuffle_xor(mx, 2u32));
            if tq == 0 {
                qmx_s[(warp * 16 + 8 * x + gq) as usize] = mx;
            }
        }
        sync_cube();
    }
    #[unroll]
    for x in 0..2u32 {
        q_scale[x as usize] = 1.0;
        row_score_scale[x as usize] = params.score_scale;
        if comptime![cfg.q_scaled && x < rt] {
            let mut mx = f32::new(0.0);
            #[unroll]
            for w in 0..MMA_WARPS {
                mx = mx.max(qmx_s[(w * 16 + 8 * x + gq) as usize]);
            }
            let (scale, inverse) = pow2_row_scale(mx);
            q_scale[x as usize] = scale;
            row_score_scale[x as usize] = params.score_scale * inverse;
        }
    }
    key_major_slot_scales(&mut row_score_scale, tq, &params, cfg);
    let mut qa = Array::<Vector<M, Const<2>>>::new(comptime![(k_steps * 4) as usize]);
    query_fragments::<M>(&qv, &q_scale, &mut qa, k_steps, 1u32);

    // ---- per-warp state ------------------------------------------------------------------------
    // O^T C tiles of this warp's V dims, [m-tile][row tile][2 registers].
    let mut acc = Array::<Vector<f32, Const<2>>>::new(comptime![(m_tiles * rt * 2) as usize]);
    #[unroll]
    for i in 0..m_tiles * rt * 2 {
        acc[i as usize] = Vector::new(0.0);
    }
    let mut m_run = Array::<f32>::new(4usize);
    let mut d_run = Array::<f32>::new(4usize);
    #[unroll]
    for i in 0..score_rows {
        m_run[i as usize] = NO_SCORE;
        d_run[i as usize] = 0.0;
    }
    let mut kb = Array::<Vector<u32, Const<4>>>::new(comptime![(2 * body_vecs) as usize]);
    let mut kt = Array::<u32>::new(comptime![(2 * tail_steps * tail_words).max(1) as usize]);
    let mut vr = Array::<Vector<u32, Const<4>>>::new(comptime![(4 * v_vecs) as usize]);
    let mut st = Array::<Vector<f32, Const<2>>>::new(4usize);
    let mut sc = Array::<f32>::new(8usize);
    let mut row_alpha = Array::<f32>::new(4usize);
    let mut a_tmp = Array::<Vector<M, Const<2>>>::new(4usize);
    let mut pb = Array::<Vector<M, Const<2>>>::new(comptime![(rt * p_parts * 2) as usize]);
    let mut pw = Array::<Vector<M, Const<2>>>::new(comptime![(2 * p_parts) as usize]);
    let lanes = exchange_lanes(gq, tq);
    // The warps' partial scores, [buffer][warp][lane][per_lane].
    let mut sp = SharedMemory::<f32>::new(comptime![(2 * MMA_WARPS * PLANE_LANES * 8) as usize]);

    // Loads roll one block ahead, as in the mma kernel; every warp walks every block.
    let mut t0 = lo;
    let page0 = block_page(meta, bt_base, t0, hi, page_size);
    load_k_slice(
        k_cache, k_words, &mut kb, &mut kt, t0, hi, page0, g, warp, gq, tq, cfg,
    );
    load_v_slice(v_cache, &mut vr, t0, hi, page0, g, warp, gq, tq, cfg);
    let mut next_page = block_page(meta, bt_base, t0 + MMA_BLOCK_TOKENS, hi, page_size);
    let mut buf = 0u32;
    while t0 < hi {
        let tn = t0 + MMA_BLOCK_TOKENS;
        // (1) This warp's partial S^T over its K dims.
        #[unroll]
        for i in 0..2 * rt {
            st[i as usize] = Vector::new(0.0);
        }
        #[unroll]
        for s in 0..k_steps {
            // a0/a2: token gq, a1/a3: token gq + 8; a0/a1: dims (+0, +1), a2/a3: (+2, +3).
            #[unroll]
            for r in 0..4u32 {
                let j = comptime![r % 2];
                let pair = if comptime![s < body_steps] {
                    piece_pair::<M, Const<4>>(
                        &kb,
                        comptime![j * body_vecs],
                        comptime![2 * s + r / 2],
                        cfg.bits,
                        4u32,
                    )
                } else {
                    let ts = comptime![s - body_steps];
                    let at = comptime![(j * tail_steps + ts) * tail_words];
                    if comptime![cfg.bits == CacheBits::Half] {
                        kt[comptime![(at + r / 2) as usize]]
                    } else {
                        fp8_pair::<M>(kt[at as usize], comptime![r / 2], cfg.bits)
                    }
                };
                a_tmp[r as usize] = Vector::<M, Const<2>>::reinterpret(pair);
            }
            km_qk_step::<M>(&a_tmp, &qa, &mut st, s, k_steps, rt, 1u32);
        }
        load_k_slice(
            k_cache, k_words, &mut kb, &mut kt, tn, hi, next_page, g, warp, gq, tq, cfg,
        );

        // (2) The four partials, added in warp order by every warp. Two buffers: a warp that
        // runs ahead writes the other one, and cannot run two blocks ahead past the barrier.
        let mine = ((buf * MMA_WARPS + warp) * PLANE_LANES + lane) * per_lane;
        #[unroll]
        for i in 0..per_lane {
            sp[(mine + i) as usize] = st[comptime![(i / 2) as usize]][comptime![(i % 2) as usize]];
        }
        sync_cube();
        #[unroll]
        for i in 0..per_lane {
            let mut total = 0.0f32;
            #[unroll]
            for w in 0..MMA_WARPS {
                total += sp[(((buf * MMA_WARPS + w) * PLANE_LANES + lane) * per_lane + i) as usize];
            }
            let mut v = st[comptime![(i / 2) as usize]];
            v[comptime![(i % 2) as usize]] = total;
            st[comptime![(i / 2) as usize]] = v;
        }
        buf = 1 - buf;

        // (3) Scores, softmax, the probabilities' exchange and PV on this warp's V dims.
        km_scores(
            &st,
            &mut sc,
            &row_score_scale,
            &row_ok,
            &row_pos,
            &row_slope,
            t0 + gq,
            hi,
            &params,
            cfg,
        );
        km_softmax_exchange::<M>(
            &mut sc,
            &mut m_run,
            &mut d_run,
            &mut row_alpha,
            &mut acc,
            &mut pw,
            &mut pb,
            &lanes,
            rt,
            m_tiles,
            p_parts,
        );
        pv_mma::<M, Const<4>>(
            &mut acc, &vr, 0u32, &pb, v_vecs, rt, p_parts, m_tiles, cfg.bits, 4u32,
        );
        load_v_slice(v_cache, &mut vr, tn, hi, next_page, g, warp, gq, tq, cfg);
        next_page = block_page(meta, bt_base, tn + MMA_BLOCK_TOKENS, hi, page_size);
        t0 = tn;
    }

    // ---- the partial state: every warp holds the rows' (m, d); each writes its V dims -------
    let num_splits = params.num_splits;
    #[unroll]
    for i in 0..score_rows {
        let mut d = d_run[i as usize];
        d += plane_shuffle_xor(d, 4u32);
        d += plane_shuffle_xor(d, 8u32);
        d += plane_shuffle_xor(d, 16u32);
        let x = comptime![i / 2];
        let e = comptime![i % 2];
        let gr = row0 + comptime![8 * (i / 2) + i % 2] + 2 * tq;
        if gr < rows_total {
            let tok = q_start + gr / group;
            let head = g * group + gr % group;
            let state = (tok * params.num_heads + head) * num_splits + split;
            let seen = d > 0.0;
            if warp == 0 && gq == 0 {
                ws_md[(state * 2) as usize] = select(seen, m_run[i as usize], NO_SCORE);
                ws_md[(state * 2 + 1) as usize] = d;
            }
            let weight = select(seen, params.v_scale / d, 0.0);
            #[unroll]
            for mt in 0..m_tiles {
                #[unroll]
                for h in 0..2u32 {
                    let dim = warp * dvw + gq * comptime![dvw / 8] + comptime![2 * mt + h];
                    let v = acc[comptime![((mt * rt + x) * 2 + h) as usize]];
                    ws_o[(state * dv + dim) as usize] = v[e as usize] * weight;
                }
            }
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
            comptime![MMA_WARPS * PLANE_LANES],
            merge.sinks,
        );
    }
}
