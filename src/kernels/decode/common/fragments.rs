//! What the two tensor-core split routines (`mma.rs`, `wide.rs`) share, written once: their
//! comptime configuration, the cache-piece loads and FP8 → f16 pair conversions, the query
//! fragments, the key-major QK step, the softmax exchange between lanes and the transposed PV.
//! The fragment layouts are `mma.rs`'s module doc.

use cubecl::prelude::cmma::MmaDefinition;
use cubecl::prelude::*;
use cubecl::{e4m3, e5m2};

use super::{SplitParams, WorkRange, NO_SCORE};
use crate::kernels::CacheGeometry;

/// Query rows per row tile: the N of the transposed PV (the QK's M holds two row tiles).
pub const MMA_TILE_ROWS: u32 = 8;
/// Warps per cube; each walks its own 16-token blocks with its own softmax state.
pub const MMA_WARPS: u32 = 4;
/// Cache tokens one warp handles per trip (one PV k-block, two QK n-tiles).
pub const MMA_BLOCK_TOKENS: u32 = 16;

/// Padding (f32) of a row of the warps' merge buffer: rows `dv + 4` apart are ≡ 4 (mod 16),
/// so the lanes of a store (rows 2tq + e, columns over gq, see [`merge_col()`]) fall on 32
/// different banks.
pub(crate) const O_PAD: u32 = 4;

/// How the cache's bits become MMA operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheBits {
    /// E4M3 codes, converted to f16 exactly.
    E4m3,
    /// E5M2 codes, converted to f16 exactly.
    E5m2,
    /// 16-bit elements of the MMA type itself (f16 cache with f16 MMA, bf16 with bf16).
    Half,
}

impl CacheBits {
    /// Bytes per cache element.
    pub const fn elem_bytes(self) -> u32 {
        match self {
            CacheBits::Half => 2,
            _ => 1,
        }
    }
}

/// Comptime configuration of [`decode_split_mma_kernel()`] (the JIT key besides the dtypes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmaConfig {
    /// K cache geometry.
    pub k: CacheGeometry,
    /// V cache geometry.
    pub v: CacheGeometry,
    /// Query heads per KV head.
    pub group: u32,
    /// Cache element encoding.
    pub bits: CacheBits,
    /// 32-bit words per V vector load (4, or 2 when a lane's V piece is 8 bytes).
    pub v_words: u32,
    /// Row tiles of 8 query rows per cube: 1 where every sequence has at most 8 rows
    /// (`group × q_len`), else 2 (the QK's M covers 16 rows either way; PV and the output
    /// accumulators scale with it).
    pub row_tiles: u32,
    /// MMA-type parts each query value is split into (1 when the query dtype converts exactly).
    pub q_parts: u32,
    /// MMA-type parts each probability is split into.
    pub p_parts: u32,
    /// Scale each query row by a power of two into f16's range (bf16 and f32 queries with f16
    /// MMAs, whose values can lie beyond ±65504 or below f16's normal range).
    pub q_scaled: bool,
    /// Logit softcap on.
    pub softcap: bool,
    /// ALiBi on.
    pub alibi: bool,
    /// Sliding window on.
    pub window: bool,
    /// QK transposed too, `S^T = K·Q^T` (see the module doc): keys fill the MMA's 16-row M
    /// and each row tile's 8 query rows its N, so QK costs `rt · dk/16` MMAs per block instead
    /// of `2 · dk/16`, and the query's B fragments need no zero registers
    /// (`DecodeStrategy::KeyMajor`, and always in the wide kernel).
    pub key_major: bool,
    /// 16-token blocks a warp's K and V loads run ahead of its compute (1 or 2; see
    /// [`pipeline_depth`]): each block in flight holds its own registers, so depth 2 doubles a
    /// warp's bytes in flight for a lane's piece of registers more. The wide kernel runs 1.
    pub depth: u32,
}

/// The tuning override of [`pipeline_depth`] (0: none), set by
/// `internals::override_decode_depth` (benches only).
pub(crate) static DEPTH_OVERRIDE: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(0);

/// Whether a second block in flight leaves enough cubes resident for `c` (its `depth` field
/// aside): an FP8 cache, a one-part query, one row tile, and head dim 64 (96 registers, 5
/// cubes), or 128 in the key-major layout (168, 3); see [`MmaConfig::resident_cubes`].
pub(crate) fn depth_two_fits(c: &MmaConfig) -> bool {
    c.bits != CacheBits::Half
        && c.q_parts == 1
        && c.row_tiles == 1
        && !wide_dims(c.k.head_dim, c.v.head_dim)
        && (c.k.head_dim == 64 || (c.k.head_dim == 128 && c.key_major))
}

/// Whether [`pipeline_depth`] picks 2 where [`depth_two_fits`]: no. Depth 2 is correct
/// (`cargo xtask emulate --depth 2`), but on an H100 (`decode --bench --ab-depth`) it was
/// 8–9% slower at Llama-3-8B 32 × 4096 and Llama-3.2-1B 32 × 8192, 2% at SmolLM2 128 × 8192,
/// and 9% faster only at SmolLM2 32 × 8192 (with one split more): the cube per SM it costs is
/// worth more than the second block.
pub(crate) const DEPTH_TWO_BY_DEFAULT: bool = false;

/// [`MmaConfig::depth`] for a configuration (its `depth` field aside), unless a tuning run
/// overrode it: 2 where [`DEPTH_TWO_BY_DEFAULT`] and [`depth_two_fits`], else 1.
pub(crate) fn pipeline_depth(c: &MmaConfig) -> u32 {
    match DEPTH_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) {
        0 if DEPTH_TWO_BY_DEFAULT && depth_two_fits(c) => 2,
        0 => 1,
        d => d.clamp(1, 2),
    }
}

impl MmaConfig {
    /// Cubes of this configuration resident on one SM, which the split planner counts on
    /// (`cargo xtask codegen --ptx [--depth N]` reports the registers; a Hopper SM has 64 K of
    /// them and allocates 8 per thread at a time). With one row tile, an FP8 cache and a
    /// one-part query:
    /// - head dim 128, depth 1: the default layout 142 registers (3 cubes of 128 threads),
    ///   key-major 128 (4); depth 2: 188 (2) and 168 (3);
    /// - head dim 64, depth 1: 69–80 registers (SmolLM2 and Llama-3.2-1B samples; ncu: 7
    ///   cubes by registers at 69 and 72), counted as 6 in either layout; depth 2: 96 (5).
    ///   H100, 2026-12-07, `--shape --split-tokens` at the plans of 4–7 cubes: SmolLM2 32 ×
    ///   8192 49.1–49.7 µs at 6's 8 splits against 56.4–56.5 at 4's 5 (7's 9 splits:
    ///   48.8–50.8), 128 × 8192 161.9–164.0 at 6's 2 splits against 167.9–174.8 at 4's 4
    ///   (7's 7: 169.7–172.0), Llama-3.2-1B 32 × 8192 the same 3 splits at 3 and 6 (7's 7:
    ///   114.6 against 109.7).
    ///
    /// Depth 1 otherwise: `key_major` with a two-part (f32) query, or a 16-bit cache with a
    /// one-part query: 166, 3 cubes; the rest up to 255 (two row tiles 213–231, head dim 256
    /// 255, the wide MLA kernel 231–252; with an FP8 cache and one row tile it takes 128, 4
    /// cubes): 2. Depth 2 outside the classes above (a tuning override only) counts 2.
    pub fn resident_cubes(&self) -> usize {
        let fp8 = self.bits != CacheBits::Half;
        if self.row_tiles != 1 {
            return 2;
        }
        if wide_dims(self.k.head_dim, self.v.head_dim) {
            return if fp8 { 4 } else { 2 };
        }
        if self.k.head_dim > 128 {
            return 2;
        }
        let d64 = self.k.head_dim <= 64;
        match (self.depth, self.key_major, fp8, self.q_parts, d64) {
            (2, _, true, 1, true) => 5,
            (2, true, true, 1, false) => 3,
            (2, ..) => 2,
            (_, _, true, 1, true) => 6,
            (_, true, true, 1, _) => 4,
            (_, true, true, 2, _) | (_, true, false, 1, _) | (_, false, true, 1, _) => 3,
            _ => 2,
        }
    }
}

/// Elements `2p, 2p + 1` of a lane's piece of a cache row as MMA-type bits (element `2p` in the
/// low 16 bits); `words` holds the piece as 32-bit words, `nw` (= `NW`) per vector. A 16-bit
/// cache word is such a pair already; an FP8 pair is half a word, converted by [`fp8_pair()`].
#[cube]
pub(crate) fn piece_pair<M: Float, NW: Size>(
    words: &Array<Vector<u32, NW>>,
    #[comptime] base: u32,
    #[comptime] p: u32,
    #[comptime] bits: CacheBits,
    #[comptime] nw: u32,
) -> u32 {
    let word = comptime![if bits == CacheBits::Half { p } else { p / 2 }];
    let w = words[comptime![(base + word / nw) as usize]][comptime![(word % nw) as usize]];
    let mut out = w;
    if comptime![bits != CacheBits::Half] {
        out = fp8_pair::<M>(w, comptime![p % 2], bits);
    }
    out
}

/// The FP8 codes in half `h` of `w` (bytes `2h`, `2h + 1`) as two MMA-type values (byte `2h` in
/// the low 16 bits), converted exactly by the hardware (`cvt.rn.f16x2.e4m3x2` / `e5m2x2` on
/// sm_89 and later: every E4M3 and E5M2 value, subnormals included, is an f16).
#[cube]
pub(crate) fn fp8_pair<M: Float>(w: u32, #[comptime] h: u32, #[comptime] bits: CacheBits) -> u32 {
    // The half as a struct member (not a shift): ptxas then feeds the conversion the
    // register's high half directly (`F2FP … R.H1`), one SHF fewer per pair.
    let w16 = Vector::<u16, Const<2>>::reinterpret(w)[h as usize];
    if comptime![bits == CacheBits::E4m3] {
        u32::reinterpret(Vector::<M, Const<2>>::cast_from(
            Vector::<e4m3, Const<2>>::reinterpret(w16),
        ))
    } else {
        u32::reinterpret(Vector::<M, Const<2>>::cast_from(
            Vector::<e5m2, Const<2>>::reinterpret(w16),
        ))
    }
}

/// The word whose 16-bit halves are half `h` of `a` (low) and half `h` of `b` (high), built as
/// a struct so that ptxas emits one `PRMT` (a mask-shift-or form costs two instructions).
#[cube]
pub(crate) fn interleave_halves(a: u32, b: u32, #[comptime] h: u32) -> u32 {
    let ha = Vector::<u16, Const<2>>::reinterpret(a);
    let hb = Vector::<u16, Const<2>>::reinterpret(b);
    let mut out = Vector::<u16, Const<2>>::new(0u16);
    out[0] = ha[h as usize];
    out[1] = hb[h as usize];
    u32::reinterpret(out)
}

/// The power of two `2^(14 − ⌊log2 mx⌋)` that puts `mx` (≥ 0) in `[2^14, 2^15)`, and its
/// inverse, both normal f32 values: the biased exponent is clamped to `[1, 253]`, so a zero or
/// tiny `mx` (below 2^-112) gets 2^126 and an infinite or NaN one stays non-finite.
#[cube]
pub(crate) fn pow2_row_scale(mx: f32) -> (f32, f32) {
    let biased = (u32::reinterpret(mx) >> 23u32) & 0xFFu32;
    // 127 + 14 − (biased − 127), clamped; biased ≤ 255, so no underflow.
    let mut e = 268u32 - biased;
    e = select(e < 1u32, 1u32, e);
    e = select(e > 253u32, 253u32, e);
    (
        f32::reinterpret(e << 23u32),
        f32::reinterpret((254u32 - e) << 23u32),
    )
}

/// Splits `x` into `parts` values of the MMA type whose sum approximates `x` to
/// `parts × (mantissa bits)`, written to `out[at + i·stride]`, element `lane` of each vector.
#[cube]
pub(crate) fn split_parts<M: Float>(
    x: f32,
    out: &mut Array<Vector<M, Const<2>>>,
    at: u32,
    #[comptime] stride: u32,
    #[comptime] lane: u32,
    #[comptime] parts: u32,
) {
    let mut rem = x;
    #[unroll]
    for p in 0..parts {
        let h = M::cast_from(rem);
        rem -= f32::cast_from(h);
        let idx = (at + p * stride) as usize;
        let mut v = out[idx];
        v[lane as usize] = h;
        out[idx] = v;
    }
}

/// Issues the loads of a lane's pieces of the 16-token block at `t0` (KV head `g`) from page
/// `page` into `regs[at..]`; tokens at or past `hi` get zeros (their P is 0, and 0 · garbage could
/// be NaN). K (`v_side` off): tokens `t0 + gq` and `t0 + 8 + gq`, head dims from `tq·dk/4`, as
/// 16-byte vectors. V: tokens `t0 + 2tq + {0, 1, 8, 9}`, V dims from `gq·dv/8`, as vectors of
/// `cfg.v_words` words. The block lies in one page: `t0` is a multiple of 16 and pages are
/// powers of two ≥ 16.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_block<N: Size>(
    cache: &Array<Vector<u32, N>>,
    regs: &mut Array<Vector<u32, N>>,
    #[comptime] at: u32,
    t0: u32,
    hi: u32,
    page: u32,
    g: u32,
    gq: u32,
    tq: u32,
    #[comptime] v_side: bool,
    #[comptime] cfg: MmaConfig,
) {
    let geom = comptime![if v_side { cfg.v } else { cfg.k }];
    let es = comptime![cfg.bits.elem_bytes()];
    // Bytes per vector, elements per lane's piece, tokens per lane.
    let vec_bytes = comptime![if v_side { 4 * cfg.v_words } else { 16 }];
    let piece = comptime![geom.head_dim / if v_side { 8 } else { 4 }];
    let tokens = comptime![if v_side { 4u32 } else { 2u32 }];
    let vecs = comptime![piece * es / vec_bytes];
    let page_size = comptime![geom.page_size];
    let page_stride = comptime![geom.page_stride() * es / vec_bytes];
    let slot_stride = comptime![geom.slot_stride() * es / vec_bytes];
    let head_stride = comptime![geom.head_stride() * es / vec_bytes];
    // V with `key_major`: tokens tq, tq + 8, tq + 4, tq + 12 (the k-slots the exchanged P^T
    // fragment stands for).
    let km = comptime![v_side && cfg.key_major];
    let (lane_tok, lane_vec) = if comptime![v_side] {
        (if comptime![km] { tq } else { 2 * tq }, gq * vecs)
    } else {
        (gq, tq * vecs)
    };
    #[unroll]
    for i in 0..tokens {
        let tok_off = comptime![if km {
            8 * (i % 2) + 4 * (i / 2)
        } else if v_side {
            (i % 2) + 8 * (i / 2)
        } else {
            8 * i
        }];
        let t = t0 + lane_tok + tok_off;
        let base = page * page_stride + (t % page_size) * slot_stride + g * head_stride + lane_vec;
        load_piece(cache, regs, t, hi, base, comptime![at + i * vecs], vecs);
    }
}

/// Loads `count` vectors of one token's piece at `base` into `regs[at..]`, or zeros when the
/// token `t` is at or past `hi` (its address is then never read).
#[cube]
pub(crate) fn load_piece<N: Size>(
    cache: &Array<Vector<u32, N>>,
    regs: &mut Array<Vector<u32, N>>,
    t: u32,
    hi: u32,
    base: u32,
    #[comptime] at: u32,
    #[comptime] count: u32,
) {
    #[unroll]
    for c in 0..count {
        regs[(at + c) as usize] = Vector::new(0u32);
    }
    if t < hi {
        #[unroll]
        for c in 0..count {
            regs[(at + c) as usize] = cache[(base + c) as usize];
        }
    }
}

/// The page holding the 16-token block at `t0`, or 0 (never read) when the block starts at or
/// past `hi`.
#[cube]
pub(crate) fn block_page(
    meta: &Array<i32>,
    bt_base: u32,
    t0: u32,
    hi: u32,
    #[comptime] page_size: u32,
) -> u32 {
    let mut page = 0u32;
    if t0 < hi {
        page = u32::cast_from(meta[(bt_base + t0 / page_size) as usize]);
    }
    page
}

/// The largest running max of row `r` among the warps that saw a key for it (`NO_SCORE` when
/// none did), from the per-warp states in shared memory (`rows` per warp).
#[cube]
pub(crate) fn warps_max(
    m_s: &SharedMemory<f32>,
    d_s: &SharedMemory<f32>,
    r: u32,
    #[comptime] rows: u32,
) -> f32 {
    let mut mm = f32::new(NO_SCORE);
    #[unroll]
    for w in 0..MMA_WARPS {
        let at = (w * rows + r) as usize;
        if d_s[at] > 0.0 {
            mm = mm.max(m_s[at]);
        }
    }
    mm
}

/// Offset in a row of the warps' merge buffer of V dim `gq · piece + k` (`piece` = dv/8, the
/// lane's V dims): `[k][gq]`, with gq rotated by `2·(k / 4)` so that both the stores (lanes
/// over gq and rows) and the row-wise loads (lanes over consecutive dims) fall on distinct
/// banks (see [`O_PAD`]).
#[cube]
pub(crate) fn merge_col(gq: u32, k: u32) -> u32 {
    8 * k + ((gq + 2 * (k / 4)) % 8)
}

/// The query rows whose scores a lane holds, by slot: row `gq + 8i` in slot `i` (default
/// layout), or with `key_major` row `8x + 2tq + e` in slot `2x + e`; their validity, position
/// and ALiBi slope.
#[cube]
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
pub(crate) fn score_slots(
    row_ok: &mut Array<bool>,
    row_pos: &mut Array<u32>,
    row_slope: &mut Array<f32>,
    alibi: &Array<f32>,
    work: &WorkRange,
    gq: u32,
    tq: u32,
    #[comptime] cfg: MmaConfig,
) {
    let rt = comptime![cfg.row_tiles];
    let group = comptime![cfg.group];
    let slots = comptime![if cfg.key_major { 2 * rt } else { rt }];
    #[unroll]
    for i in 0..slots {
        let gr = if comptime![cfg.key_major] {
            work.row0 + comptime![8 * (i / 2) + i % 2] + 2 * tq
        } else {
            work.row0 + gq + comptime![8 * i]
        };
        row_ok[i as usize] = gr < work.rows_total;
        row_pos[i as usize] = work.hist + gr / group;
        row_slope[i as usize] = 0.0;
        if comptime![cfg.alibi] {
            if gr < work.rows_total {
                row_slope[i as usize] = alibi[(work.g * group + gr % group) as usize];
            }
        }
    }
}

/// A lane's query values for its QK fragments, `qv[8s + 2x + e]` for k-step `s` and register
/// `x` (row `gq + 8·(x % 2)`, zero beyond the cube's row tiles), element `e`, and each row
/// tile's largest magnitude in `q_max`. The step's four dims of lane `tq` start at `slice +
/// tq·piece + 4s` for the first `body_steps` steps and at `slice + 4·piece + 16·(s −
/// body_steps) + 4·tq` after them; register `x` holds dims `+2·(x / 2) + {0, 1}`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn query_values<F: Float>(
    q: &Array<F>,
    qv: &mut Array<f32>,
    q_max: &mut Array<f32>,
    work: &WorkRange,
    params: &SplitParams,
    slice: u32,
    gq: u32,
    tq: u32,
    #[comptime] cfg: MmaConfig,
    #[comptime] k_steps: u32,
    #[comptime] piece: u32,
    #[comptime] body_steps: u32,
) {
    let rt = comptime![cfg.row_tiles];
    let group = comptime![cfg.group];
    let dk = comptime![cfg.k.head_dim];
    q_max[0] = 0.0;
    q_max[1] = 0.0;
    #[unroll]
    for s in 0..k_steps {
        let step_dim = if comptime![s < body_steps] {
            tq * piece + comptime![4 * s]
        } else {
            comptime![4 * piece + 16 * (s - body_steps)] + 4 * tq
        };
        #[unroll]
        for x in 0..4u32 {
            #[unroll]
            for e in 0..2u32 {
                let mut val = 0.0f32;
                if comptime![x % 2 < rt] {
                    let gr = work.row0 + gq + 8 * (x % 2);
                    let d = slice + step_dim + comptime![(x / 2) * 2 + e];
                    if gr < work.rows_total {
                        let tok = work.q_start + gr / group;
                        let head = work.g * group + gr % group;
                        val =
                            f32::cast_from(q[(tok * params.q_row_stride + head * dk + d) as usize]);
                    }
                    q_max[comptime![(x % 2) as usize]] =
                        q_max[comptime![(x % 2) as usize]].max(val.abs());
                }
                qv[comptime![(s * 8 + x * 2 + e) as usize]] = val;
            }
        }
    }
}

/// The query values scaled per row tile, split into `q_parts` MMA-type parts:
/// `qa[(part · k_steps + s) · 4 + x]` (the default layout's A fragments; the key-major
/// layout's B fragments of row tile `y` are registers `y` and `2 + y`).
#[cube]
pub(crate) fn query_fragments<M: Float>(
    qv: &Array<f32>,
    q_scale: &Array<f32>,
    qa: &mut Array<Vector<M, Const<2>>>,
    #[comptime] k_steps: u32,
    #[comptime] q_parts: u32,
) {
    #[unroll]
    for s in 0..k_steps {
        #[unroll]
        for x in 0..4u32 {
            #[unroll]
            for e in 0..2u32 {
                let val = qv[comptime![(s * 8 + x * 2 + e) as usize]]
                    * q_scale[comptime![(x % 2) as usize]];
                split_parts::<M>(
                    val,
                    qa,
                    comptime![s * 4 + x],
                    comptime![k_steps * 4],
                    e,
                    q_parts,
                );
            }
        }
    }
}

/// Key-major score slots' scales: slot `2x + e` (row `8x + 2tq + e`) takes the scale of row
/// tile `x` from quad `2tq + e`, where `row_score_scale[x]` holds it for the quad's own row.
/// Slots are filled from the top so that none is read after it is overwritten.
#[cube]
pub(crate) fn key_major_slot_scales(
    row_score_scale: &mut Array<f32>,
    tq: u32,
    params: &SplitParams,
    #[comptime] cfg: MmaConfig,
) {
    let slots = comptime![2 * cfg.row_tiles];
    #[unroll]
    for i in 0..slots {
        let slot = comptime![slots - 1 - i];
        let x = comptime![slot / 2];
        if comptime![cfg.q_scaled] {
            let from = row_score_scale[x as usize];
            row_score_scale[slot as usize] =
                plane_shuffle(from, 4 * (2 * tq + comptime![slot % 2]));
        } else {
            row_score_scale[slot as usize] = params.score_scale;
        }
    }
}

/// One raw score after its row scale: softcap, ALiBi (`slope · (t − pos)`), and `NO_SCORE`
/// where key `t` is hidden from the row at `pos` (row padding, past `hi`, causal, window).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn masked_score(
    raw: f32,
    t: u32,
    pos: u32,
    slope: f32,
    ok: bool,
    hi: u32,
    params: &SplitParams,
    #[comptime] cfg: MmaConfig,
) -> f32 {
    let mut s = raw;
    if comptime![cfg.softcap] {
        s = params.softcap * (s / params.softcap).tanh();
    }
    if comptime![cfg.alibi] {
        s += slope * (f32::cast_from(t) - f32::cast_from(pos));
    }
    let mut visible = ok && t < hi && t <= pos;
    if comptime![cfg.window] {
        visible = visible && t + params.window > pos;
    }
    select(visible, s, NO_SCORE)
}

/// Key-major QK of k-step `s` for every row tile: `st[2x..2x + 2] += K·Q^T` with `a` the
/// step's K fragment and Q^T's B fragments from `qa` (registers `x` and `2 + x` of each part).
#[cube]
pub(crate) fn km_qk_step<M: Float>(
    a: &Array<Vector<M, Const<2>>>,
    qa: &Array<Vector<M, Const<2>>>,
    st: &mut Array<Vector<f32, Const<2>>>,
    #[comptime] s: u32,
    #[comptime] k_steps: u32,
    #[comptime] rt: u32,
    #[comptime] q_parts: u32,
) {
    let mma = MmaDefinition::<M, M, f32>::new(16usize, 8usize, 16usize);
    let mut b = Array::<Vector<M, Const<2>>>::new(2usize);
    let mut c = Array::<Vector<f32, Const<2>>>::new(2usize);
    #[unroll]
    for x in 0..rt {
        c[0] = st[comptime![(2 * x) as usize]];
        c[1] = st[comptime![(2 * x + 1) as usize]];
        #[unroll]
        for p in 0..q_parts {
            b[0] = qa[comptime![((p * k_steps + s) * 4 + x) as usize]];
            b[1] = qa[comptime![((p * k_steps + s) * 4 + 2 + x) as usize]];
            let d = mma.execute(a, &b, &c);
            c[0] = d[0];
            c[1] = d[1];
        }
        st[comptime![(2 * x) as usize]] = c[0];
        st[comptime![(2 * x + 1) as usize]] = c[1];
    }
}

/// The lanes of the key-major probability exchange ([`km_softmax_exchange()`]): whether the
/// lane's `gq` is below 4 and even, and the lanes its two shuffles read.
#[derive(CubeType, Clone)]
pub(crate) struct ExchangeLanes {
    low: bool,
    even: bool,
    first: u32,
    second: u32,
}

/// [`ExchangeLanes`] of lane `(gq, tq)`.
#[cube]
pub(crate) fn exchange_lanes(gq: u32, tq: u32) -> ExchangeLanes {
    ExchangeLanes {
        low: gq < 4,
        even: (gq & 1u32) == 0u32,
        first: 4 * (tq + 4 * (gq % 2)) + gq / 2,
        second: 4 * (tq + 4 * (1 - gq % 2)) + gq / 2,
    }
}

/// Key-major scores of one 16-token block from the S^T tiles `st` (`[row tile][2]`): scale,
/// softcap, ALiBi and the mask per score slot (see the kernel's row slots), into `sc`
/// (`sc[4x + 2e + c]` = token `t_lane + 8c`, row `8x + 2tq + e`; `t_lane` = block start + gq).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn km_scores(
    st: &Array<Vector<f32, Const<2>>>,
    sc: &mut Array<f32>,
    row_score_scale: &Array<f32>,
    row_ok: &Array<bool>,
    row_pos: &Array<u32>,
    row_slope: &Array<f32>,
    t_lane: u32,
    hi: u32,
    params: &SplitParams,
    #[comptime] cfg: MmaConfig,
) {
    let rt = comptime![cfg.row_tiles];
    // Register c of tile x: token gq + 8c, rows 8x + 2tq + e (slot 2x + e), kept in
    // sc[4x + 2e + c].
    #[unroll]
    for x in 0..rt {
        #[unroll]
        for c in 0..2u32 {
            #[unroll]
            for e in 0..2u32 {
                let slot = comptime![(2 * x + e) as usize];
                sc[comptime![(4 * x + 2 * e + c) as usize]] = masked_score(
                    st[comptime![(2 * x + c) as usize]][e as usize] * row_score_scale[slot],
                    t_lane + comptime![8 * c],
                    row_pos[slot],
                    row_slope[slot],
                    row_ok[slot],
                    hi,
                    params,
                    cfg,
                );
            }
        }
    }
}

/// Multiplies row tile `x`'s output C tiles (`acc`: `[m-tile][row tile][2]`, element `e` of
/// each register for row `8x + 2tq + e`) by `av` (the two rows' factors).
#[cube]
pub(crate) fn scale_row_tile(
    acc: &mut Array<Vector<f32, Const<2>>>,
    av: Vector<f32, Const<2>>,
    #[comptime] x: u32,
    #[comptime] rt: u32,
    #[comptime] m_tiles: u32,
) {
    #[unroll]
    for i in 0..m_tiles * 2 {
        let at = comptime![((i / 2) * rt + x) * 2 + i % 2];
        acc[at as usize] = acc[at as usize] * av;
    }
}

/// Key-major online softmax of one block's scores `sc` (rows by slot, the 8 lanes of column
/// `tq` holding a row's 16 tokens), the output rescale, and the probabilities as PV's B
/// fragments `pb` (`[row tile][part][2]`) through the two-shuffle exchange.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn km_softmax_exchange<M: Float>(
    sc: &mut Array<f32>,
    m_run: &mut Array<f32>,
    d_run: &mut Array<f32>,
    row_alpha: &mut Array<f32>,
    acc: &mut Array<Vector<f32, Const<2>>>,
    pw: &mut Array<Vector<M, Const<2>>>,
    pb: &mut Array<Vector<M, Const<2>>>,
    lanes: &ExchangeLanes,
    #[comptime] rt: u32,
    #[comptime] m_tiles: u32,
    #[comptime] p_parts: u32,
) {
    let mut grew = false;
    // (2) Online softmax per row; the 8 lanes of a tq column hold one row's 16 scores.
    #[unroll]
    for x in 0..rt {
        #[unroll]
        for e in 0..2u32 {
            let slot = comptime![(2 * x + e) as usize];
            let i0 = comptime![(4 * x + 2 * e) as usize];
            let mut mx = sc[i0].max(sc[i0 + 1]);
            mx = mx.max(plane_shuffle_xor(mx, 4u32));
            mx = mx.max(plane_shuffle_xor(mx, 8u32));
            mx = mx.max(plane_shuffle_xor(mx, 16u32));
            let m_old = m_run[slot];
            let m_new = m_old.max(mx);
            let m_ref = select(m_new == NO_SCORE, 0.0, m_new);
            let alpha = (m_old - m_ref).exp();
            let p0 = (sc[i0] - m_ref).exp();
            let p1 = (sc[i0 + 1] - m_ref).exp();
            sc[i0] = p0;
            sc[i0 + 1] = p1;
            m_run[slot] = m_new;
            d_run[slot] = d_run[slot] * alpha + (p0 + p1);
            row_alpha[slot] = alpha;
            grew = grew || m_new > m_old;
        }
    }
    // The lane's output rows 8x + 2tq + e are its own score rows: no shuffle.
    if plane_any(grew) {
        #[unroll]
        for x in 0..rt {
            let mut av = Vector::<f32, Const<2>>::new(0.0);
            av[0] = row_alpha[comptime![(2 * x) as usize]];
            av[1] = row_alpha[comptime![(2 * x + 1) as usize]];
            scale_row_tile(acc, av, x, rt, m_tiles);
        }
    }

    // (3) P^T as PV's B fragment (k-slots 2tq, 2tq + 1, 2tq + 8, 2tq + 9 stand for tokens
    // tq, tq + 8, tq + 4, tq + 12; column gq for row 8x + gq). Each lane packs, per
    // part, w_e = (token gq, token gq + 8) of its row 8x + 2tq + e; lane (gq, tq) needs
    // w_(gq % 2) of lane (tq, gq / 2) as b0 and of lane (tq + 4, gq / 2) as b1. Two
    // shuffles move both: lanes gq < 4 offer w_0 then w_1, lanes gq ≥ 4 w_1 then w_0,
    // and an even gq reads b0 first, an odd one b1.
    #[unroll]
    for x in 0..rt {
        #[unroll]
        for e in 0..2u32 {
            #[unroll]
            for c in 0..2u32 {
                let p = sc[comptime![(4 * x + 2 * e + c) as usize]];
                split_parts::<M>(p, pw, comptime![e * p_parts], 1u32, c, p_parts);
            }
        }
        #[unroll]
        for i in 0..p_parts {
            let w0 = u32::reinterpret(pw[i as usize]);
            let w1 = u32::reinterpret(pw[comptime![(p_parts + i) as usize]]);
            let r1 = plane_shuffle(select(lanes.low, w0, w1), lanes.first);
            let r2 = plane_shuffle(select(lanes.low, w1, w0), lanes.second);
            let at = comptime![((x * p_parts + i) * 2) as usize];
            pb[at] = Vector::<M, Const<2>>::reinterpret(select(lanes.even, r1, r2));
            pb[at + 1] = Vector::<M, Const<2>>::reinterpret(select(lanes.even, r2, r1));
        }
    }
}

/// `O^T += V^T·P^T` for one 16-token block: m-tile mt's A fragment is dims 2mt (rows gq) and
/// 2mt + 1 (rows gq + 8) of the lane's four V pieces in `vr[vo..]` (`v_vecs` vectors of `nv` words
/// each), pieces (0, 1) in a0/a1 and (2, 3) in a2/a3 (the tokens of k-slots 2tq, 2tq + 1,
/// 2tq + 8, 2tq + 9): the low and high halves of the pieces' converted pairs mt,
/// interleaved. `acc` is `[m-tile][row tile][2]`, `pb` `[row tile][part][2]`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pv_mma<M: Float, NV: Size>(
    acc: &mut Array<Vector<f32, Const<2>>>,
    vr: &Array<Vector<u32, NV>>,
    #[comptime] vo: u32,
    pb: &Array<Vector<M, Const<2>>>,
    #[comptime] v_vecs: u32,
    #[comptime] rt: u32,
    #[comptime] p_parts: u32,
    #[comptime] m_tiles: u32,
    #[comptime] bits: CacheBits,
    #[comptime] nv: u32,
) {
    let mma = MmaDefinition::<M, M, f32>::new(16usize, 8usize, 16usize);
    let mut a_tmp = Array::<Vector<M, Const<2>>>::new(4usize);
    let mut b_tmp = Array::<Vector<M, Const<2>>>::new(2usize);
    let mut c_tmp = Array::<Vector<f32, Const<2>>>::new(2usize);
    #[unroll]
    for mt in 0..m_tiles {
        #[unroll]
        for half in 0..2u32 {
            let a = piece_pair::<M, NV>(vr, comptime![vo + 2 * half * v_vecs], mt, bits, nv);
            let b = piece_pair::<M, NV>(vr, comptime![vo + (2 * half + 1) * v_vecs], mt, bits, nv);
            a_tmp[comptime![(2 * half) as usize]] =
                Vector::<M, Const<2>>::reinterpret(interleave_halves(a, b, 0u32));
            a_tmp[comptime![(2 * half + 1) as usize]] =
                Vector::<M, Const<2>>::reinterpret(interleave_halves(a, b, 1u32));
        }
        #[unroll]
        for x in 0..rt {
            let at = comptime![(mt * rt + x) * 2];
            c_tmp[0] = acc[at as usize];
            c_tmp[1] = acc[(at + 1) as usize];
            #[unroll]
            for p in 0..p_parts {
                b_tmp[0] = pb[comptime![((x * p_parts + p) * 2) as usize]];
                b_tmp[1] = pb[comptime![((x * p_parts + p) * 2 + 1) as usize]];
                let d = mma.execute(&a_tmp, &b_tmp, &c_tmp);
                c_tmp[0] = d[0];
                c_tmp[1] = d[1];
            }
            acc[at as usize] = c_tmp[0];
            acc[(at + 1) as usize] = c_tmp[1];
        }
    }
}

/// Head dims of one warp's QK slice whose lane pieces are 32 contiguous elements (as in the
/// head-dim-128 kernel); the rest of the slice goes 16 dims per k-step, 4 per lane.
pub const WIDE_BODY_DIMS: u32 = 128;

/// Whether the wide kernel serves these head dims: both split evenly over the warps into
/// slices of whole k-steps, the K slice at least [`WIDE_BODY_DIMS`], the V slice exactly 128
/// (the V pieces of the head-dim-128 kernel).
pub const fn wide_dims(head_dim_k: u32, head_dim_v: u32) -> bool {
    let (kw, vw) = (head_dim_k / MMA_WARPS, head_dim_v / MMA_WARPS);
    head_dim_k.is_multiple_of(MMA_WARPS * 16)
        && kw >= WIDE_BODY_DIMS
        && head_dim_v == MMA_WARPS * 128
        && vw == 128
}
