//! Tensor-core split kernel of paged decode ([`decode_split_mma_kernel()`]): the same partial
//! states as [`super::cuda_cores_kernel::decode_split_kernel()`] (same workspace, same combine kernel),
//! with QK and PV on `mma.sync.m16n8k16` (f16 or bf16 operands, f32 accumulators) in the
//! FlashAttention-2 register layout, so each cache byte costs a few integer operations instead
//! of `group` FMAs on CUDA cores.
//!
//! Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16", the same mapping CubeCL's
//! `MmaDefinition::position_of_nth` emits for CUDA), lane = `4·gq + tq`:
//! - A (16 × 16), 4 registers of 2 elements: `a0 = (row gq, cols 2tq, 2tq+1)`, `a1 = (row gq+8,
//!   same cols)`, `a2 = (row gq, cols 2tq+8, 2tq+9)`, `a3 = (row gq+8, cols 2tq+8, 2tq+9)`.
//! - B (16 × 8), 2 registers: `b0 = (rows 2tq, 2tq+1; col gq)`, `b1 = (rows 2tq+8, 2tq+9; col gq)`.
//! - C (16 × 8), 2 registers of 2 f32: `c0 = (row gq, cols 2tq, 2tq+1)`, `c1 = (row gq+8, ...)`.
//!
//! Both products sum over their k dimension, so which head dim (QK) or which token (PV) a
//! k-slot stands for is free as long as A and B agree, and which V dim an output column stands
//! for is free as long as the write-back agrees. The kernel picks them so that every lane reads
//! contiguous 16-byte pieces of the cache straight into registers:
//! - QK, k-step `s`, lane `(gq, tq)`: B column `gq` is token `gq` of the 8-token n-tile, and the
//!   lane's four k-slots are head dims `tq·dk/4 + 4s + {0..3}`: each lane reads `dk/4`
//!   contiguous elements of one token row (a quad reads the whole row); `b0` holds the pair
//!   of dims `+0, +1` and `b1` the pair `+2, +3`, and Q's A fragment uses the same order.
//! - PV runs transposed, `O^T = V^T · P^T` (V dims as M, query rows as N), so a row tile of 8
//!   rows (half of it or all of it at GQA 4 or 8 decode, against a quarter or half of a
//!   16-row M) costs `dv/16` MMAs per part instead of `dv/8`, and half the accumulators.
//!   K-slot `k` is token `k` of the 16-token block, so P^T's B fragment of row tile `x` is
//!   exactly the two score C tiles' register `x` (`b0` = tokens `2tq, 2tq+1` of row `gq + 8x`,
//!   `b1` = tokens `2tq+8, 2tq+9`): no shuffle.
//!   Row `n` of V m-tile `mt` is V dim `gq·dv/8 + 2mt + (n ≥ 8)` for `n mod 8 = gq`, so lane
//!   `(gq, tq)` reads the `dv/8` contiguous elements at `gq·dv/8` of its four tokens `2tq,
//!   2tq+1, 2tq+8, 2tq+9` (one 16-byte load each for dv = 128 FP8); each converted pair of a
//!   token (dims `2mt, 2mt+1`) feeds both halves of m-tile `mt`'s A fragment.
//! - With [`MmaConfig::key_major`] QK runs transposed too, `S^T = K·Q^T`: the block's 16 tokens
//!   fill the M (lane `(gq, tq)`: tokens `gq`, `gq + 8`, the same K pieces as above, as `a0/a2`
//!   and `a1/a3`) and each row tile's 8 query rows the N (Q's B fragment is the A fragment's
//!   row-`gq` registers of the default layout, so no zero registers: 128 registers instead of
//!   142 for FP8 at d128, and `rt · dk/16` QK MMAs per block instead of `2 · dk/16`). Lane
//!   `(gq, tq)` then holds rows `2tq, 2tq + 1`: a row's max reduces over the 8 lanes of column
//!   `tq`, and these are the rows of the lane's O^T columns, so the output rescale needs no
//!   shuffle. The probabilities reach PV's B fragment by two shuffles per part and row tile,
//!   with PV's k-slots `2tq, 2tq + 1, 2tq + 8, 2tq + 9` standing for tokens `tq, tq + 8,
//!   tq + 4, tq + 12` (the V loads follow). `key_major_model` below checks this algebra on the
//!   CPU with the PTX fragment layouts.
//!
//! FP8 → f16 is exact: every E4M3 and E5M2 value is an f16, and the conversion is the
//! hardware's two-at-a-time `cvt.rn.f16x2.e4m3x2` / `e5m2x2` (sm_89 and later; CUDA's header
//! falls back to integer code on older GPUs), one per pair of cache bytes. The f16/bf16 cache
//! is fed as is.
//! Queries and probabilities that the MMA type cannot hold exactly are split into a sum of
//! `q_parts` / `p_parts` MMA-type values (`x = Σ part_i` to 22+ bits), each its own MMA, so the
//! result stays within the f32-accumulation error bound the tests derive. With f16 MMAs, bf16
//! and f32 query rows are first scaled by a power of two that puts their largest element in
//! `[2^14, 2^15)` (`MmaConfig::q_scaled`), and the scores take the inverse back exactly, so
//! no query magnitude overflows f16 or sinks into its subnormals.

use cubecl::prelude::cmma::MmaDefinition;
use cubecl::prelude::*;

use crate::kernels::decode::combine::{merge_if_last, InKernelMerge};

use crate::kernels::decode::common::fragments::{
    block_page, exchange_lanes, key_major_slot_scales, km_qk_step, km_scores, km_softmax_exchange,
    load_block, masked_score, merge_col, piece_pair, pow2_row_scale, pv_mma, query_fragments,
    query_values, scale_row_tile, score_slots, split_parts, warps_max, MmaConfig, MMA_BLOCK_TOKENS,
    MMA_TILE_ROWS, MMA_WARPS, O_PAD,
};
use crate::kernels::decode::common::{work_range, SplitParams, NO_SCORE, PLANE_LANES};

/// Tensor-core split kernel: the partial attention state of 8 or 16 query rows
/// (`8 · cfg.row_tiles`) of one KV group over one split of one sequence's cache, in the
/// workspace format of [`super::cuda_cores_kernel::decode_split_kernel()`].
///
/// Grid `(num_kv_heads * row_blocks, batch, num_splits)` with blocks of `8 · cfg.row_tiles`
/// rows, cube `(MMA_WARPS · 32, 1, 1)`. Rows as in the CUDA-core kernel (row `i * group + hh`
/// = new token `i`, query head `g * group + hh`; rows past `q_len * group` are zero padding,
/// masked).
///
/// - `q`: `[num_tokens, num_heads, head_dim_k]` of `F`, tokens `q_row_stride` elements apart.
/// - `k_cache`: the K cache's bytes as 16-byte vectors of u32; `v_cache`: the V cache's bytes
///   as vectors of `NV` u32 (`cfg.v_words`).
/// - `meta`, `alibi`, `ws_o`, `ws_md`, `params`: as [`super::cuda_cores_kernel::decode_split_kernel()`].
///
/// Warp `w` takes the 16-token blocks `lo + 16·(w + 4·i)` of the cube's token range: K and V
/// loads go straight to registers, QK (two n8 tiles, query rows as M), masking and online
/// softmax on the C fragments (row max and sum across the 4 lanes of a quad), then PV
/// transposed (V dims as M, each row tile's probabilities as N, straight from the score
/// fragments) into `dv/16` f32 C tiles per row tile. With `cfg.key_major` the QK is `S^T =
/// K·Q^T` (tokens as M, each row tile's query rows as N), the row max and sum run over the 8
/// lanes of a column, and the probabilities reach PV's B fragment by two shuffles (see the
/// module doc). At the end the four warps' states merge through shared memory.
#[cube(launch_unchecked)]
// A comptime flag and a runtime condition cannot share one `if` in `#[cube]` code.
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
pub fn decode_split_mma_kernel<F: Float, M: Float, NV: Size>(
    q: &Array<F>,
    k_cache: &Array<Vector<u32, Const<4>>>,
    v_cache: &Array<Vector<u32, NV>>,
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
    let es = comptime![cfg.bits.elem_bytes()];
    let page_size = comptime![cfg.k.page_size];
    let k_steps = comptime![dk / 16];
    // PV's M tiles: 16 V dims each, two per lane and tile (dims 2mt, 2mt + 1 of its piece).
    let m_tiles = comptime![dv / 16];
    let rt = comptime![cfg.row_tiles];
    let rows = comptime![MMA_TILE_ROWS * cfg.row_tiles];
    let q_parts = comptime![cfg.q_parts];
    let p_parts = comptime![cfg.p_parts];
    let nv = comptime![cfg.v_words];
    // A lane's piece of a K row (dk/4 elements) in 16-byte vectors, of a V row (dv/8) in NV words.
    let k_vecs = comptime![dk / 4 * es / 16];
    let v_vecs = comptime![dv / 8 * es / (4 * nv)];
    let o_row = comptime![dv + O_PAD];

    // ---- which rows and tokens this cube owns (as the CUDA-core kernel) ----------------------
    let lane = UNIT_POS % PLANE_LANES;
    let warp = UNIT_POS / PLANE_LANES;
    let gq = lane / 4;
    let tq = lane % 4;
    // Windowed splits start on whole 16-token blocks (so each lies in one page); the keys
    // below the window that this adds are masked per row.
    let work = work_range(meta, &params, group, rows, cfg.window, MMA_BLOCK_TOKENS);
    let (g, split, q_start) = (work.g, work.split, work.q_start);
    let (rows_total, row0, bt_base) = (work.rows_total, work.row0, work.bt_base);
    let (lo, hi) = (work.lo, work.hi);

    // The rows whose scores this lane holds, by slot (see `score_slots`).
    let score_rows = comptime![if cfg.key_major { 2 * rt } else { rt }];
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

    // ---- Q as A fragments (key-major: registers x and 2 + x are row tile x's B fragment) ---
    // Register x of step s holds row gq + 8·(x % 2) (zero when the cube has one row tile) and
    // the head dims that K's B slots of the same registers hold (see the module doc): head dims
    // (+0, +1) / (+2, +3) of the step's four.
    let mut qv = Array::<f32>::new(comptime![(k_steps * 8) as usize]);
    let mut q_max = Array::<f32>::new(2usize);
    query_values::<F>(
        q,
        &mut qv,
        &mut q_max,
        &work,
        &params,
        0u32,
        gq,
        tq,
        cfg,
        k_steps,
        comptime![dk / 4],
        k_steps,
    );
    // Each row's power-of-two query scale: 1, or (`q_scaled`) 2^(14 − ⌊log2 max |q|⌋), which
    // puts the row's largest element in [2^14, 2^15), inside f16's range whatever the query's
    // magnitude; the scores take the inverse back exactly (both are powers of two).
    let mut q_scale = Array::<f32>::new(2usize);
    let mut row_score_scale = Array::<f32>::new(4usize);
    #[unroll]
    for x in 0..2u32 {
        q_scale[x as usize] = 1.0;
        row_score_scale[x as usize] = params.score_scale;
        if comptime![cfg.q_scaled && x < rt] {
            // The four lanes of a quad hold the row's head dims.
            let mut mx = q_max[x as usize];
            mx = mx.max(plane_shuffle_xor(mx, 1u32));
            mx = mx.max(plane_shuffle_xor(mx, 2u32));
            let (scale, inverse) = pow2_row_scale(mx);
            q_scale[x as usize] = scale;
            row_score_scale[x as usize] = params.score_scale * inverse;
        }
    }
    if comptime![cfg.key_major] {
        key_major_slot_scales(&mut row_score_scale, tq, &params, cfg);
    }
    let mut qa = Array::<Vector<M, Const<2>>>::new(comptime![(q_parts * k_steps * 4) as usize]);
    query_fragments::<M>(&qv, &q_scale, &mut qa, k_steps, q_parts);

    // ---- per-warp state ------------------------------------------------------------------------
    let mma = MmaDefinition::<M, M, f32>::new(16usize, 8usize, 16usize);
    // Output C tiles of O^T, [m-tile][row tile][2 registers]: register h of (mt, x) holds V dim
    // gq·dv/8 + 2mt + h of rows 8x + 2tq, 8x + 2tq + 1.
    let mut acc = Array::<Vector<f32, Const<2>>>::new(comptime![(m_tiles * rt * 2) as usize]);
    #[unroll]
    for i in 0..m_tiles * rt * 2 {
        acc[i as usize] = Vector::new(0.0);
    }
    // Running max of the lane's score rows (uniform over the lanes sharing a row) and this
    // lane's part of their sums, by score slot.
    let mut m_run = Array::<f32>::new(4usize);
    let mut d_run = Array::<f32>::new(4usize);
    #[unroll]
    for i in 0..score_rows {
        m_run[i as usize] = NO_SCORE;
        d_run[i as usize] = 0.0;
    }
    // `depth` blocks of K and V registers: block slot sb at kr[sb·2·k_vecs..], vr[sb·4·v_vecs..].
    let depth = comptime![cfg.depth];
    let mut kr = Array::<Vector<u32, Const<4>>>::new(comptime![(2 * k_vecs * depth) as usize]);
    let mut vr = Array::<Vector<u32, NV>>::new(comptime![(4 * v_vecs * depth) as usize]);
    let mut sc = Array::<f32>::new(8usize);
    let mut row_alpha = Array::<f32>::new(4usize);
    // `key_major`: the S^T C tiles of the row tiles, [row tile][2 registers].
    let mut st = Array::<Vector<f32, Const<2>>>::new(4usize);
    let mut a_tmp = Array::<Vector<M, Const<2>>>::new(4usize);
    let mut b_tmp = Array::<Vector<M, Const<2>>>::new(2usize);
    let mut c_tmp = Array::<Vector<f32, Const<2>>>::new(2usize);
    // P as PV's B fragments, [row tile][part][2 registers].
    let mut pb = Array::<Vector<M, Const<2>>>::new(comptime![(rt * p_parts * 2) as usize]);
    // `key_major`: a row tile's packed probabilities before the exchange, [e][part], and the
    // exchange's lanes (see step 3).
    let mut pw = Array::<Vector<M, Const<2>>>::new(comptime![(2 * p_parts) as usize]);
    let lanes = exchange_lanes(gq, tq);

    // Loads roll `depth` blocks ahead: block i + depth's K is issued as soon as block i's QK
    // has consumed its slot's K registers, its V once PV has consumed V, so a warp keeps
    // `depth` blocks' bytes in flight while it computes (registers, not warps, limit
    // residency). Page indices run one step further ahead, so no load waits for a block-table
    // read. The slots are unrolled (`sb`), so every register index is a constant.
    let stride = comptime![MMA_BLOCK_TOKENS * MMA_WARPS];
    let step = comptime![MMA_BLOCK_TOKENS * MMA_WARPS * cfg.depth];
    let mut t0 = lo + warp * MMA_BLOCK_TOKENS;
    let mut next_page = Array::<u32>::new(comptime![cfg.depth as usize]);
    #[unroll]
    for sb in 0..depth {
        let tb = t0 + sb * stride;
        let page = block_page(meta, bt_base, tb, hi, page_size);
        let (ko, vo) = comptime![(sb * 2 * k_vecs, sb * 4 * v_vecs)];
        load_block::<Const<4>>(k_cache, &mut kr, ko, tb, hi, page, g, gq, tq, false, cfg);
        load_block::<NV>(v_cache, &mut vr, vo, tb, hi, page, g, gq, tq, true, cfg);
        next_page[sb as usize] = block_page(meta, bt_base, tb + step, hi, page_size);
    }
    while t0 < hi {
        #[unroll]
        for sb in 0..depth {
            let tb = t0 + sb * stride;
            // A later slot's block can start past the range (its loads gave zeros): skip it.
            if tb < hi {
                let tn = tb + step;
                let (ko, vo) = comptime![(sb * 2 * k_vecs, sb * 4 * v_vecs)];
                if comptime![cfg.key_major] {
                    // (1) S^T = K·Q^T per row tile x: the block's tokens gq, gq + 8 as M, rows
                    // 8x + 0..7 as N. Each k-step's K fragment is converted once for every row tile.
                    #[unroll]
                    for i in 0..2 * rt {
                        st[i as usize] = Vector::new(0.0);
                    }
                    #[unroll]
                    for s in 0..k_steps {
                        // a0/a2: token gq, a1/a3: token gq + 8; a0/a1: head dims (+0, +1) of the
                        // step's four, a2/a3: (+2, +3), the dims the query's b0/b1 hold.
                        #[unroll]
                        for r in 0..4u32 {
                            a_tmp[r as usize] =
                                Vector::<M, Const<2>>::reinterpret(piece_pair::<M, Const<4>>(
                                    &kr,
                                    comptime![ko + (r % 2) * k_vecs],
                                    comptime![2 * s + r / 2],
                                    cfg.bits,
                                    4u32,
                                ));
                        }
                        km_qk_step::<M>(&a_tmp, &qa, &mut st, s, k_steps, rt, q_parts);
                    }
                    km_scores(
                        &st,
                        &mut sc,
                        &row_score_scale,
                        &row_ok,
                        &row_pos,
                        &row_slope,
                        tb + gq,
                        hi,
                        &params,
                        cfg,
                    );
                } else {
                    // (1) S = Q·K^T, two n8 tiles; scores to f32 with the scale, mask, softcap, ALiBi.
                    #[unroll]
                    for j in 0..2u32 {
                        c_tmp[0] = Vector::new(0.0);
                        c_tmp[1] = Vector::new(0.0);
                        #[unroll]
                        for s in 0..k_steps {
                            // Head dims 4s .. 4s+3 of the lane's piece: pairs 2s and 2s + 1.
                            b_tmp[0] =
                                Vector::<M, Const<2>>::reinterpret(piece_pair::<M, Const<4>>(
                                    &kr,
                                    comptime![ko + j * k_vecs],
                                    comptime![2 * s],
                                    cfg.bits,
                                    4u32,
                                ));
                            b_tmp[1] =
                                Vector::<M, Const<2>>::reinterpret(piece_pair::<M, Const<4>>(
                                    &kr,
                                    comptime![ko + j * k_vecs],
                                    comptime![2 * s + 1],
                                    cfg.bits,
                                    4u32,
                                ));
                            #[unroll]
                            for p in 0..q_parts {
                                #[unroll]
                                for x in 0..4u32 {
                                    a_tmp[x as usize] =
                                        qa[comptime![((p * k_steps + s) * 4 + x) as usize]];
                                }
                                let d = mma.execute(&a_tmp, &b_tmp, &c_tmp);
                                c_tmp[0] = d[0];
                                c_tmp[1] = d[1];
                            }
                        }
                        #[unroll]
                        for x in 0..rt {
                            #[unroll]
                            for e in 0..2u32 {
                                let t = tb + 8 * j + 2 * tq + e;
                                sc[(x * 4 + j * 2 + e) as usize] = masked_score(
                                    c_tmp[x as usize][e as usize] * row_score_scale[x as usize],
                                    t,
                                    row_pos[x as usize],
                                    row_slope[x as usize],
                                    row_ok[x as usize],
                                    hi,
                                    &params,
                                    cfg,
                                );
                            }
                        }
                    }
                }
                let np = next_page[sb as usize];
                load_block::<Const<4>>(k_cache, &mut kr, ko, tn, hi, np, g, gq, tq, false, cfg);

                if comptime![cfg.key_major] {
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
                } else {
                    let mut grew = false;
                    // (2) Online softmax per row; the 4 lanes of a quad hold one row's 16 scores.
                    #[unroll]
                    for x in 0..rt {
                        let mut mx = sc[(x * 4) as usize];
                        #[unroll]
                        for i in 1..4u32 {
                            mx = mx.max(sc[(x * 4 + i) as usize]);
                        }
                        mx = mx.max(plane_shuffle_xor(mx, 1u32));
                        mx = mx.max(plane_shuffle_xor(mx, 2u32));
                        let m_old = m_run[x as usize];
                        let m_new = m_old.max(mx);
                        // Nothing visible yet: m = 0 keeps every p = exp(NO_SCORE) = 0 and alpha = 0.
                        let m_ref = select(m_new == NO_SCORE, 0.0, m_new);
                        let alpha = (m_old - m_ref).exp();
                        let mut sum = 0.0f32;
                        #[unroll]
                        for i in 0..4u32 {
                            let p = (sc[(x * 4 + i) as usize] - m_ref).exp();
                            sum += p;
                            sc[(x * 4 + i) as usize] = p;
                        }
                        m_run[x as usize] = m_new;
                        d_run[x as usize] = d_run[x as usize] * alpha + sum;
                        row_alpha[x as usize] = alpha;
                        grew = grew || m_new > m_old;
                    }
                    // Rescale the outputs only when some row's max grew (alpha is exactly 1 for the others,
                    // and the running max rarely grows once a few blocks are in): the test is warp-uniform.
                    // The lane's output rows 8x + 2tq + e have their alpha in quad 2tq + e.
                    if plane_any(grew) {
                        #[unroll]
                        for x in 0..rt {
                            let mut av = Vector::<f32, Const<2>>::new(0.0);
                            av[0] = plane_shuffle(row_alpha[x as usize], 8 * tq);
                            av[1] = plane_shuffle(row_alpha[x as usize], 8 * tq + 4);
                            scale_row_tile(&mut acc, av, x, rt, m_tiles);
                        }
                    }

                    // (3) P^T as PV's B fragment of row tile x: b0 = tokens 2tq, 2tq + 1 of row gq + 8x
                    // (score tile 0's C register x), b1 = tokens 2tq + 8, 2tq + 9 (tile 1's), split into
                    // parts.
                    #[unroll]
                    for x in 0..rt {
                        #[unroll]
                        for j in 0..2u32 {
                            #[unroll]
                            for e in 0..2u32 {
                                let p = sc[comptime![(x * 4 + j * 2 + e) as usize]];
                                split_parts::<M>(
                                    p,
                                    &mut pb,
                                    comptime![x * p_parts * 2 + j],
                                    2u32,
                                    e,
                                    p_parts,
                                );
                            }
                        }
                    }
                }
                // (4) O^T += V^T·P^T.
                pv_mma::<M, NV>(
                    &mut acc, &vr, vo, &pb, v_vecs, rt, p_parts, m_tiles, cfg.bits, nv,
                );
                load_block::<NV>(v_cache, &mut vr, vo, tn, hi, np, g, gq, tq, true, cfg);
                next_page[sb as usize] = block_page(meta, bt_base, tn + step, hi, page_size);
            }
        }
        t0 += step;
    }

    // ---- merge the four warps' states and write the partial state ----------------------------
    // Each warp stores its raw output tiles in its own region of shared memory, laid out as
    // [row][merge_col(dim)] (rows `dv + O_PAD` apart), so a warp's 32 stores fall on 32
    // different banks; one thread per (warp, row) then turns the warps' (m, d) into one weight
    // each, and every output element is the weighted sum of its four warp values.
    let mut m_s = SharedMemory::<f32>::new(comptime![(MMA_WARPS * rows) as usize]);
    let mut d_s = SharedMemory::<f32>::new(comptime![(MMA_WARPS * rows) as usize]);
    let mut w_s = SharedMemory::<f32>::new(comptime![(MMA_WARPS * rows) as usize]);
    let mut o_s = SharedMemory::<f32>::new(comptime![(MMA_WARPS * rows * o_row) as usize]);
    if comptime![cfg.key_major] {
        // Slot 2x + e: row 8x + 2tq + e, its sum spread over the 8 lanes of column tq.
        #[unroll]
        for i in 0..score_rows {
            let mut d = d_run[i as usize];
            d += plane_shuffle_xor(d, 4u32);
            d += plane_shuffle_xor(d, 8u32);
            d += plane_shuffle_xor(d, 16u32);
            if gq == 0 {
                let at = (warp * rows + 2 * tq + comptime![8 * (i / 2) + i % 2]) as usize;
                m_s[at] = m_run[i as usize];
                d_s[at] = d;
            }
        }
    } else {
        #[unroll]
        for x in 0..rt {
            let mut d = d_run[x as usize];
            d += plane_shuffle_xor(d, 1u32);
            d += plane_shuffle_xor(d, 2u32);
            if tq == 0 {
                let at = (warp * rows + gq + 8 * x) as usize;
                m_s[at] = m_run[x as usize];
                d_s[at] = d;
            }
        }
    }
    let region = warp * comptime![rows * o_row];
    #[unroll]
    for mt in 0..m_tiles {
        #[unroll]
        for x in 0..rt {
            #[unroll]
            for h in 0..2u32 {
                let v = acc[comptime![((mt * rt + x) * 2 + h) as usize]];
                let col = merge_col(gq, comptime![2 * mt + h]);
                #[unroll]
                for e in 0..2u32 {
                    let at = region + (8 * x + 2 * tq + e) * o_row + col;
                    o_s[at as usize] = v[e as usize];
                }
            }
        }
    }
    sync_cube();

    let num_splits = params.num_splits;
    if UNIT_POS < comptime![MMA_WARPS * rows] {
        // Warp w's weight for row r: exp(m_w − M) · v_scale / den, with M the row's merged max
        // and den = Σ_w d_w · exp(m_w − M); 0 for a warp that saw no key of the row.
        let w = UNIT_POS / rows;
        let r = UNIT_POS % rows;
        let mm = warps_max(&m_s, &d_s, r, rows);
        let m_ref = select(mm == NO_SCORE, 0.0, mm);
        let mut den = 0.0f32;
        #[unroll]
        for ww in 0..MMA_WARPS {
            let at = (ww * rows + r) as usize;
            den += select(d_s[at] > 0.0, d_s[at] * (m_s[at] - m_ref).exp(), 0.0);
        }
        let at = UNIT_POS as usize;
        let own = select(d_s[at] > 0.0, (m_s[at] - m_ref).exp(), 0.0);
        w_s[at] = select(den > 0.0, own * params.v_scale / den, 0.0);
        let gr = row0 + r;
        if w == 0 && gr < rows_total {
            let tok = q_start + gr / group;
            let head = g * group + gr % group;
            let md = ((tok * params.num_heads + head) * num_splits + split) * 2;
            ws_md[md as usize] = mm;
            ws_md[(md + 1) as usize] = den;
        }
    }
    sync_cube();

    let piece = comptime![dv / 8];
    let mut o = UNIT_POS;
    while o < comptime![rows * dv] {
        let r = o / dv;
        let d = o % dv;
        let gr = row0 + r;
        if gr < rows_total {
            let tok = q_start + gr / group;
            let head = g * group + gr % group;
            let at = r * o_row + merge_col(d / piece, d % piece);
            let mut val = 0.0f32;
            #[unroll]
            for w in 0..MMA_WARPS {
                val +=
                    o_s[(w * comptime![rows * o_row] + at) as usize] * w_s[(w * rows + r) as usize];
            }
            ws_o[(((tok * params.num_heads + head) * num_splits + split) * dv + d) as usize] = val;
        }
        o += comptime![MMA_WARPS * PLANE_LANES];
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

/// A CPU model of one warp's key-major block step with the PTX `m16n8k16` fragment layouts
/// (the ones the module doc quotes), built from the same lane formulas as the kernel: the K
/// and query fragments, the score tile's rows, the two-shuffle exchange of the probabilities
/// and the V tokens of the PV's k-slots. It checks the index algebra, not the generated code
/// (the GPU suite runs that).
#[cfg(test)]
// Lane, register and element indices are the fragment layouts' own coordinates.
#[allow(clippy::needless_range_loop)]
mod key_major_model {
    use crate::testing::Rng;

    const DK: usize = 32;
    const DV: usize = 32;

    /// `D = A·B + C` of one `m16n8k16` from per-lane fragments, `frag[lane][register][element]`.
    fn mma(a: &[[[f64; 2]; 4]; 32], b: &[[[f64; 2]; 2]; 32], c: &mut [[[f64; 2]; 2]; 32]) {
        let mut am = [[0.0; 16]; 16];
        let mut bm = [[0.0; 8]; 16];
        for lane in 0..32 {
            let (gq, tq) = (lane / 4, lane % 4);
            for r in 0..4 {
                for e in 0..2 {
                    am[gq + 8 * (r % 2)][2 * tq + e + 8 * (r / 2)] = a[lane][r][e];
                }
            }
            for r in 0..2 {
                for e in 0..2 {
                    bm[2 * tq + e + 8 * r][gq] = b[lane][r][e];
                }
            }
        }
        for lane in 0..32 {
            let (gq, tq) = (lane / 4, lane % 4);
            for r in 0..2 {
                for e in 0..2 {
                    let (m, n) = (gq + 8 * r, 2 * tq + e);
                    c[lane][r][e] += (0..16).map(|k| am[m][k] * bm[k][n]).sum::<f64>();
                }
            }
        }
    }

    /// Key-major QK fragments of one k-step: K's A (tokens `gq`, `gq + 8`) and Q^T's B (row
    /// `gq`), with `dim(tq, pair, e)` the head dim of lane column `tq`'s k-slot.
    #[allow(clippy::type_complexity)]
    fn qk_fragments<R: AsRef<[f64]>>(
        k: &[R],
        q: &[R],
        dim: impl Fn(usize, usize, usize) -> usize,
    ) -> ([[[f64; 2]; 4]; 32], [[[f64; 2]; 2]; 32]) {
        let mut a = [[[0.0; 2]; 4]; 32];
        let mut b = [[[0.0; 2]; 2]; 32];
        for lane in 0..32 {
            let (gq, tq) = (lane / 4, lane % 4);
            for r in 0..4 {
                for e in 0..2 {
                    a[lane][r][e] = k[gq + 8 * (r % 2)].as_ref()[dim(tq, r / 2, e)];
                }
            }
            for r in 0..2 {
                for e in 0..2 {
                    b[lane][r][e] = q[gq].as_ref()[dim(tq, r, e)];
                }
            }
        }
        (a, b)
    }

    /// The k-slot → token map of the PV (see step 3 of the kernel).
    fn pv_token(slot: usize) -> usize {
        let tq = (slot % 8) / 2;
        [tq, tq + 8, tq + 4, tq + 12][(slot / 8) * 2 + slot % 2]
    }

    #[test]
    fn one_block_matches_direct_attention() {
        let mut rng = Rng::new(41);
        let mut rand = || rng.uniform() * 2.0 - 1.0;
        let k: Vec<[f64; DK]> = (0..16).map(|_| std::array::from_fn(|_| rand())).collect();
        let v: Vec<[f64; DV]> = (0..16).map(|_| std::array::from_fn(|_| rand())).collect();
        let q: Vec<[f64; DK]> = (0..8).map(|_| std::array::from_fn(|_| rand())).collect();

        // S^T = K·Q^T over dk/16 k-steps: lane (gq, tq) holds dims tq·dk/4 + 4s + {0..3}.
        let mut st = [[[0.0; 2]; 2]; 32];
        for s in 0..DK / 16 {
            let dim = |tq: usize, pair: usize, e: usize| tq * DK / 4 + 4 * s + 2 * pair + e;
            let (a, b) = qk_fragments(&k, &q, dim);
            mma(&a, &b, &mut st);
        }
        // Softmax of each row over the 16 tokens: register c of lane (gq, tq) is token
        // gq + 8c of rows 2tq + e; a row's values live in the 8 lanes of its column tq.
        let mut p = [[[0.0; 2]; 2]; 32];
        let mut row_sum = [0.0; 8];
        for row in 0..8 {
            let (tq, e) = (row / 2, row % 2);
            let lanes = (0..8).map(|gq| 4 * gq + tq);
            let mx = lanes
                .clone()
                .flat_map(|l| [st[l][0][e], st[l][1][e]])
                .fold(f64::NEG_INFINITY, f64::max);
            for l in lanes {
                for c in 0..2 {
                    p[l][c][e] = (st[l][c][e] - mx).exp();
                    row_sum[row] += p[l][c][e];
                }
            }
        }
        // The exchange, as the kernel writes it: w_e = (token gq, token gq + 8) of row 2tq + e.
        let mut pb = [[[0.0; 2]; 2]; 32];
        for lane in 0..32 {
            let (gq, tq) = (lane / 4, lane % 4);
            let offer = |src: usize, first: bool| {
                let low = src / 4 < 4;
                let e = usize::from(low != first);
                [p[src][0][e], p[src][1][e]]
            };
            let src_first = 4 * (tq + 4 * (gq % 2)) + gq / 2;
            let src_second = 4 * (tq + 4 * (1 - gq % 2)) + gq / 2;
            let (r1, r2) = (offer(src_first, true), offer(src_second, false));
            let even = gq % 2 == 0;
            pb[lane][0] = if even { r1 } else { r2 };
            pb[lane][1] = if even { r2 } else { r1 };
            // It is the B fragment of P^T with k-slot k standing for token pv_token(k).
            for r in 0..2 {
                for e in 0..2 {
                    let token = pv_token(2 * tq + e + 8 * r);
                    let (src, c) = (4 * (token % 8) + gq / 2, token / 8);
                    assert_eq!(pb[lane][r][e], p[src][c][gq % 2], "lane {lane} b{r}[{e}]");
                }
            }
        }
        // O^T = V^T·P^T per m-tile: lane (gq, tq) holds V dims gq·dv/8 + 2mt + {0, 1} of the
        // tokens tq, tq + 8, tq + 4, tq + 12 (its pieces 0..3).
        for mt in 0..DV / 16 {
            let mut a = [[[0.0; 2]; 4]; 32];
            let mut o = [[[0.0; 2]; 2]; 32];
            for lane in 0..32 {
                let (gq, tq) = (lane / 4, lane % 4);
                let pieces = [tq, tq + 8, tq + 4, tq + 12];
                for r in 0..4 {
                    for e in 0..2 {
                        a[lane][r][e] = v[pieces[2 * (r / 2) + e]][gq * DV / 8 + 2 * mt + r % 2];
                    }
                }
            }
            mma(&a, &pb, &mut o);
            for lane in 0..32 {
                let (gq, tq) = (lane / 4, lane % 4);
                for r in 0..2 {
                    for e in 0..2 {
                        let (dim, row) = (gq * DV / 8 + 2 * mt + r, 2 * tq + e);
                        let scores: Vec<f64> = (0..16)
                            .map(|t| (0..DK).map(|d| q[row][d] * k[t][d]).sum())
                            .collect();
                        let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                        let den: f64 = w.iter().sum();
                        let want = (0..16).map(|t| w[t] * v[t][dim]).sum::<f64>() / den;
                        let got = o[lane][r][e] / row_sum[row];
                        assert!(
                            (got - want).abs() < 1e-12,
                            "dim {dim} row {row}: {got} {want}"
                        );
                    }
                }
            }
        }
    }

    /// The wide kernel's split of MLA's 576 K dims over 4 warps (8 body k-steps of 32
    /// contiguous dims per lane, then one tail k-step of 4 dims per lane), each warp's partial
    /// S^T added in warp order, against the direct scores; and its V slices (warp w, lane gq:
    /// dims `128w + 16gq + 2mt + h`) cover the 512 V dims once.
    #[test]
    fn wide_dim_split_sums_to_the_scores() {
        use crate::kernels::decode::common::fragments::WIDE_BODY_DIMS;
        const WK: usize = 576;
        let (warps, dkw, body) = (4, WK / 4, WIDE_BODY_DIMS as usize);
        let mut rng = Rng::new(43);
        let mut rand = || rng.uniform() * 2.0 - 1.0;
        let k: Vec<Vec<f64>> = (0..16).map(|_| (0..WK).map(|_| rand()).collect()).collect();
        let q: Vec<Vec<f64>> = (0..8).map(|_| (0..WK).map(|_| rand()).collect()).collect();
        let mut total = [[[0.0; 2]; 2]; 32];
        for w in 0..warps {
            let mut part = [[[0.0; 2]; 2]; 32];
            for s in 0..dkw / 16 {
                let dim = |tq: usize, pair: usize, e: usize| {
                    let step = if s < body / 16 {
                        tq * 32 + 4 * s
                    } else {
                        body + 16 * (s - body / 16) + 4 * tq
                    };
                    w * dkw + step + 2 * pair + e
                };
                let (a, b) = qk_fragments(&k, &q, dim);
                mma(&a, &b, &mut part);
            }
            for lane in 0..32 {
                for c in 0..2 {
                    for e in 0..2 {
                        total[lane][c][e] += part[lane][c][e];
                    }
                }
            }
        }
        for lane in 0..32 {
            let (gq, tq) = (lane / 4, lane % 4);
            for c in 0..2 {
                for e in 0..2 {
                    let (t, row) = (gq + 8 * c, 2 * tq + e);
                    let want: f64 = (0..WK).map(|d| q[row][d] * k[t][d]).sum();
                    let got = total[lane][c][e];
                    assert!(
                        (got - want).abs() < 1e-12,
                        "token {t} row {row}: {got} {want}"
                    );
                }
            }
        }
        let mut seen = vec![0; 512];
        for w in 0..warps {
            for gq in 0..8 {
                for mt in 0..8 {
                    for h in 0..2 {
                        seen[128 * w + 16 * gq + 2 * mt + h] += 1;
                    }
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }
}
