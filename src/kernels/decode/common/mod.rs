//! What every split routine of paged decode shares: the no-score sentinel, the FP8 bit-level
//! decode, the split's runtime scalars and the work range of one split cube (the rows and keys
//! it owns), written once.

#[allow(missing_docs)]
pub(crate) mod fragments;

use cubecl::prelude::*;

use crate::kernels::meta as batch_meta;

/// Stands for −inf in the kernels: the largest-magnitude negative finite f32. CubeCL 0.10's
/// CUDA backend prints infinite constants as `inf`, which NVRTC rejects. No real score reaches
/// it; `exp(NO_SCORE − m)` is 0 for every m > −2^127 (a row that has seen nothing uses m = 0),
/// and emptiness is decided by `d = 0`, never by comparing `m`.
pub const NO_SCORE: f32 = f32::MIN;

/// Lanes of a plane (warp). The kernels assume 32 (every CUDA GPU); the launcher checks it.
pub const PLANE_LANES: u32 = 32;

/// Half the exponent offset of an FP8 code decoded by [`decode_vector()`] as a power of two:
/// E4M3's bias 7 in f32's exponent field leaves `x·2^-120`, E5M2's bias 15 `x·2^-112`; the
/// kernel multiplies by `2^60` (`2^56`) twice, once on each side of a product, so that neither
/// the query/probability nor the decoded value leaves the f32 range. 1 when not FP8.
pub fn fp8_unit(fp8_shift: Option<u32>) -> f32 {
    match fp8_shift {
        Some(20) => 2f32.powi(60),
        Some(_) => 2f32.powi(56),
        None => 1.0,
    }
}

/// Converts a vector of cache elements to f32. With `fp8_shift` (20 for E4M3, 21 for E5M2)
/// by moving the code's bits into an f32 (sign to bit 31, exponent and mantissa to the top of
/// f32's): three integer operations per element instead of CUDA's FP8→half→float conversions
/// (16 per clock per SM on an H100, the kernel's bottleneck). The result is the exact value
/// times `2^-120` (`2^-112`), subnormal codes included (f32 denormals; NVRTC does not flush).
/// The codes that are not finite numbers (E4M3 NaN, E5M2 ±inf/NaN) decode to finite values:
/// the cache never holds them (fill saturates). Without `fp8_shift`: CubeCL's cast.
#[cube]
pub fn decode_vector<Q: Float, N: Size>(
    v: Vector<Q, N>,
    #[comptime] fp8_shift: Option<u32>,
) -> Vector<f32, N> {
    if comptime![fp8_shift.is_some()] {
        let shift = comptime![fp8_shift.unwrap()];
        let mut out = Vector::<f32, N>::empty();
        #[unroll]
        for e in 0..N::value() {
            let b = u32::cast_from(u8::reinterpret(v[e]));
            out[e] = f32::reinterpret(
                ((b << 24) & 0x8000_0000u32) | ((b << shift) & comptime![0x7Fu32 << shift]),
            );
        }
        out
    } else {
        Vector::<f32, N>::cast_from(v)
    }
}

/// Runtime scalars of [`decode_split_kernel()`] (sequence lengths live in `meta`).
#[derive(CubeType, CubeLaunch, Clone)]
pub struct SplitParams {
    /// Sequences in the batch (the `meta` section length).
    pub batch: u32,
    /// Columns of the block table.
    pub max_pages: u32,
    /// Query heads.
    pub num_heads: u32,
    /// Elements between consecutive query tokens (`num_heads * head_dim_k` or more).
    pub q_row_stride: u32,
    /// Blocks of `cfg.rows` query rows per (sequence, KV head): grid x is `num_kv_heads * row_blocks`.
    pub row_blocks: u32,
    /// Splits (grid z).
    pub num_splits: u32,
    /// Cache tokens per split (a multiple of the tile).
    pub split_tokens: u32,
    /// `k_scale · sm_scale` (FP8) or `sm_scale` (unquantized): folded into the query once.
    pub score_scale: f32,
    /// `v_scale` (FP8) or 1: multiplies the probabilities before PV.
    pub v_scale: f32,
    /// Logit softcap `c` (read only when `cfg.softcap`).
    pub softcap: f32,
    /// Sliding window in tokens (read only when `cfg.window`).
    pub window: u32,
}

/// The rows and keys one split cube owns, as both split kernels compute them.
#[derive(CubeType, Clone)]
pub struct WorkRange {
    /// KV head.
    pub g: u32,
    /// Split (grid z).
    pub split: u32,
    /// The sequence's first new token among the packed tokens.
    pub q_start: u32,
    /// Query rows of the sequence and KV head (`q_len · group`).
    pub rows_total: u32,
    /// The cube's first row.
    pub row0: u32,
    /// Cached tokens before the new ones: row `r` sits at position `hist + r / group`.
    pub hist: u32,
    /// Index of the sequence's first block-table entry.
    pub bt_base: u32,
    /// First key visited.
    pub lo: u32,
    /// One past the last key visited.
    pub hi: u32,
}

/// The work of split cube `(g · row_blocks + rb, b, split)` with blocks of `rows` query rows;
/// ends the cube (`terminate!`) when its row block lies past the sequence's rows. Keys past the
/// last row's position are masked for every row, so `hi` stops there; with a sliding window
/// `lo` skips the keys no row sees (the first row sees keys `j > first_pos − window`, later
/// rows fewer old ones), rounded down to a multiple of `lo_align`.
#[cube]
// A comptime flag and a runtime condition cannot share one `if` in `#[cube]` code.
#[allow(clippy::collapsible_if)]
pub fn work_range(
    meta: &Array<i32>,
    params: &SplitParams,
    #[comptime] group: u32,
    #[comptime] rows: u32,
    #[comptime] window: bool,
    #[comptime] lo_align: u32,
) -> WorkRange {
    let g = CUBE_POS_X / params.row_blocks;
    let rb = CUBE_POS_X % params.row_blocks;
    let b = CUBE_POS_Y;
    let split = CUBE_POS_Z;
    let batch = params.batch;
    let q_start = batch_meta::q_start(meta, batch, b);
    let q_len = batch_meta::q_len(meta, batch, b);
    let kv_len = batch_meta::kv_len(meta, batch, b);
    let bt_base = batch_meta::block_table_row(batch, params.max_pages, b);
    let rows_total = q_len * group;
    let row0 = rb * rows;
    if row0 >= rows_total {
        terminate!();
    }
    // Query i of the sequence sits at position hist + i (DESIGN.md §1); rows are token-major.
    let hist = kv_len - q_len;
    let last_row = (row0 + rows).min(rows_total) - 1;
    let first_pos = hist + row0 / group;
    let last_pos = hist + last_row / group;
    let split_lo = split * params.split_tokens;
    let hi = (split_lo + params.split_tokens)
        .min(kv_len)
        .min(last_pos + 1);
    let mut lo = split_lo;
    if comptime![window] {
        if first_pos + 1 > params.window {
            if comptime![lo_align > 1] {
                lo = lo.max((first_pos + 1 - params.window) / lo_align * lo_align);
            } else {
                lo = lo.max(first_pos + 1 - params.window);
            }
        }
    }
    WorkRange {
        g,
        split,
        q_start,
        rows_total,
        row0,
        hist,
        bt_base,
        lo,
        hi,
    }
}
