//! Fill: quantize this step's new K and V tokens into the paged cache (one launch for both).
//!
//! FP8 caches store `encode(clamp(x / scale, ±MAX))` with round-to-nearest-even, bit for bit
//! what [`crate::reference::fill`] writes; the unquantized cache stores `x` rounded to f16/bf16.
//! Only the slots of the new tokens are written.
//!
//! # Non-finite activations
//!
//! Fill never fails on a value: it validates shapes and metadata, not activations. What a
//! non-finite input becomes (the CPU reference, the software codec [`crate::fp8`], the integer
//! encoder and the kernel's hardware convert in `crate::kernels::codec` agree bit for bit on
//! every input but NaN, where the GPU promises a NaN code, not its bits):
//!
//! | input | E4M3 code | E5M2 code | f16/bf16 cache |
//! |---|---|---|---|
//! | NaN (sign `s`) | a NaN code (`0x7F` / `0xFF`, its only two); the CPU writes `s·0x80 \| 0x7F` | a NaN code (`0x7D`–`0x7F` / `0xFD`–`0xFF`, the convert's own); the CPU writes `s·0x80 \| 0x7E` | NaN (payload not kept: CUDA's f32 → bf16 gives `0x7FFF`) |
//! | +inf / −inf | `0x7E` / `0xFE` (±448, saturated) | `0x7B` / `0xFB` (±57344, saturated) | ±inf |
//! | finite beyond ±MAX·scale | ±MAX, as ±inf | ±MAX, as ±inf | rounded (f16: ±inf past 65504) |
//!
//! So an FP8 cache never holds an infinity, and a NaN only where the input was NaN. The GPU
//! leaves NaN's code to the hardware convert because fixing every code up after it (a NaN
//! select and the sign, byte by byte) cost 7 of the fill's 19 instructions an element.
//!
//! What decode then computes over a sequence holding such a slot `j`
//! ([`crate::reference::paged_decode`] documents it; flatten returns `NaN · scale = NaN` and
//! `±MAX · scale`):
//!
//! - **NaN code in K** (any dim of one KV head): score `s_j` is NaN for every query head of that
//!   KV group whose window contains `j`; the softmax denominator is then NaN, so **every dim**
//!   of those heads' outputs is NaN.
//! - **NaN code in V** (dim `d`): **dim `d`** of those heads' outputs is NaN (even where `p_j`
//!   underflows to 0: `0 · NaN = NaN`); the other dims are unaffected.
//! - **±MAX codes** (from ±inf or saturation): finite values, finite scores, finite outputs.
//!
//! Queries whose window excludes `j`, other KV heads and other sequences are unaffected.
//! These are the CPU reference's semantics; the GPU decode kernels compute the same formula
//! but their NaN propagation is not covered by a GPU test yet.

pub(crate) mod kernel;
mod launch;
mod rope;

use cubecl::Runtime;

use crate::device::{DeviceBatch, DeviceRows, PagedKvCache};
use crate::error::{Fp8KvError, KvSide, Result};
use crate::fp8::Fp8Format;
use crate::kernels::codec::ScaleDiv;
use crate::kernels::stats::DeviceKvStats;
use crate::kernels::CacheGeometry;

/// Comptime configuration of the `fill_kernel` (the JIT key besides the dtypes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FillConfig {
    /// K cache geometry.
    pub k: CacheGeometry,
    /// V cache geometry.
    pub v: CacheGeometry,
    /// FP8 format of the cache, `None` for the unquantized cache.
    pub fp8: Option<Fp8Format>,
    /// How K values are divided by the K scale (exact in every mode).
    pub k_div: ScaleDiv,
    /// How V values are divided by the V scale.
    pub v_div: ScaleDiv,
    /// Elements per vector access (16 bytes of activations where strides allow).
    pub vec: u32,
    /// Vectors per thread and round (loads issued together).
    pub unroll: u32,
    /// Rounds per thread; round r + 1 is loaded before round r is stored.
    pub rounds: u32,
    /// Threads per cube.
    pub threads: u32,
}

fn check_rows<R: Runtime>(
    what: &'static str,
    rows: &DeviceRows<R>,
    num_tokens: usize,
    row_elems: usize,
) -> Result<()> {
    if rows.row_elems() != row_elems {
        return Err(Fp8KvError::ShapeMismatch {
            what,
            expected: format!("rows of {row_elems} elements (num_kv_heads x head_dim)"),
            actual: format!("rows of {} elements", rows.row_elems()),
        });
    }
    if rows.rows() < num_tokens {
        return Err(Fp8KvError::ShapeMismatch {
            what,
            expected: format!("at least {num_tokens} rows (the packed new tokens)"),
            actual: format!("{} rows", rows.rows()),
        });
    }
    Ok(())
}

/// Writes each sequence's new tokens into `cache`: rows `q_start_loc[b] .. + q_seq_length[b]`
/// of `k_new` / `v_new` (each row `[num_kv_heads, head_dim]`, activation dtype f32/f16/bf16,
/// any row stride) go to cache positions `[kv_seqlens[b] - q_seq_length[b], kv_seqlens[b])`
/// through the block table.
///
/// Non-finite inputs (the same as [`crate::reference::fill`], bit for bit, but for NaN's
/// code): a NaN activation is stored as a NaN code of the format (the hardware convert's, not
/// necessarily the reference's `sign | nan_code`); ±inf saturates to ±MAX like any finite
/// value beyond it (E4M3 `0x7E`/`0xFE`, E5M2 `0x7B`/`0xFB`). See the [module docs](self) for
/// what decode then does.
///
/// Errors: a batch uploaded with [`DeviceBatch::for_reads`] ([`Fp8KvError::InvalidOption`])
/// or for another layout ([`Fp8KvError::ShapeMismatch`]), rows of the wrong width or fewer
/// rows than the batch's packed tokens ([`Fp8KvError::ShapeMismatch`]), K and V of different
/// dtypes ([`Fp8KvError::UnsupportedDtype`]), more than 65535 sequences or buffers past the
/// kernel's 32-bit vector indices ([`Fp8KvError::TooLarge`]).
pub fn fill<R: Runtime>(
    cache: &mut PagedKvCache<R>,
    k_new: &DeviceRows<R>,
    v_new: &DeviceRows<R>,
    batch: &DeviceBatch<R>,
) -> Result<()> {
    validate(cache, k_new, v_new, batch)?;
    launch::launch_fill(cache, k_new, v_new, batch, None)
}

/// [`fill`], and the statistics of the values it writes added to `stats` in the same launch:
/// each side's amax and how many values it clamped, judged at the cache's current scales
/// (`|x| > MAX · scale` in f32; NaN never counted, ±inf always; 0 for the unquantized
/// policy) — the definitions of [`kv_stats`](crate::kernels::stats::kv_stats), over the rows
/// this batch writes. Opt-in because it costs a warp reduction and two atomics per warp;
/// one [`DeviceKvStats::read`] after any number of calls (layers, steps) feeds
/// [`KvStats::calibrate`](crate::kernels::stats::KvStats::calibrate) or a saturation warning,
/// with no host round trip per call. `stats` must belong to the cache's device.
///
/// Errors: those of [`fill`].
pub fn fill_with_stats<R: Runtime>(
    cache: &mut PagedKvCache<R>,
    k_new: &DeviceRows<R>,
    v_new: &DeviceRows<R>,
    batch: &DeviceBatch<R>,
    stats: &mut DeviceKvStats<R>,
) -> Result<()> {
    validate(cache, k_new, v_new, batch)?;
    launch::launch_fill(cache, k_new, v_new, batch, Some(stats))
}

/// RoPE fused into the write, for a fused QKV projection: one launch rotates Q and K (pairs
/// `(2i, 2i + 1)` of each head's first `rope_dims` dimensions, GGUF's Llama pairing, angles
/// from `table`), writes the rotated Q to `q_out` and quantizes the rotated K and the V into
/// `cache` as [`fill`] does, so K never goes through memory in the activation dtype (what
/// vLLM's and FlashInfer's fused RoPE + append do). Sequence `b`'s new token `i` (row
/// `q_start_loc[b] + i`) is at position `kv_seqlens[b] − q_seq_length[b] + i`.
///
/// The rotation is computed in f64 and rounded to f32 once (the f32 × f32 products are exact),
/// then Q is rounded to the activation dtype and K and V go through the fill's codec: bit for
/// bit what [`crate::reference::fill_rope`] computes.
///
/// - `qkv`: `[num_tokens, (q_heads + 2 kv_heads) · head_dim]` (Q heads, then K, then V; any
///   row stride; f32/f16/bf16);
/// - `table`: f32 `[positions, head_dim]` rows of [`crate::rope::RopeTable::values`],
///   contiguous, covering every position the batch writes;
/// - `q_out`: `[num_tokens, q_heads · head_dim]`, contiguous, `qkv`'s dtype.
///
/// Errors: those of [`fill`]; heads that do not match the cache's layout (its K and V head
/// dims must be equal), a `rope_dims` that is odd or past the head dim, a table of the wrong
/// width or too few positions, or a `q_out` of the wrong shape or dtype
/// ([`Fp8KvError::ShapeMismatch`], [`Fp8KvError::InvalidOption`]), and a cache or rows past
/// the kernel's 32-bit element indices (4 Gi elements a side: [`Fp8KvError::TooLarge`]).
pub fn fill_rope<R: Runtime>(
    cache: &mut PagedKvCache<R>,
    qkv: &DeviceRows<R>,
    batch: &DeviceBatch<R>,
    table: &DeviceRows<R>,
    heads: crate::rope::QkvHeads,
    rope_dims: usize,
    q_out: &mut DeviceRows<R>,
) -> Result<()> {
    let (num_tokens, layout) = check_write(cache, batch)?;
    let d = heads.head_dim;
    if heads.q_heads == 0
        || heads.kv_heads != layout.num_kv_heads()
        || d != layout.head_dim_k()
        || d != layout.head_dim_v()
    {
        return Err(Fp8KvError::ShapeMismatch {
            what: "RoPE fill heads",
            expected: format!(
                "query heads and the cache's {} KV heads of {} (K) / {} (V), equal",
                layout.num_kv_heads(),
                layout.head_dim_k(),
                layout.head_dim_v()
            ),
            actual: format!("{heads:?}"),
        });
    }
    if !rope_dims.is_multiple_of(2) || rope_dims > d {
        return Err(Fp8KvError::InvalidOption(format!(
            "RoPE rotates pairs of the first rope_dims dims: need an even rope_dims <= {d}, got {rope_dims}"
        )));
    }
    if !qkv.dtype().is_activation() {
        return Err(Fp8KvError::UnsupportedDtype(format!(
            "qkv must be f32, f16 or bf16, got {}",
            qkv.dtype()
        )));
    }
    check_rows("qkv", qkv, num_tokens, heads.row_elems())?;
    let want = |what: &'static str, rows: &DeviceRows<R>, dtype, n: usize, w: usize| {
        if rows.dtype() != dtype
            || rows.rows() < n
            || rows.row_elems() != w
            || rows.row_stride() != w
        {
            return Err(Fp8KvError::ShapeMismatch {
                what,
                expected: format!("at least {n} contiguous rows of {w} {dtype}"),
                actual: format!(
                    "{} rows of {} {} at stride {}",
                    rows.rows(),
                    rows.row_elems(),
                    rows.dtype(),
                    rows.row_stride()
                ),
            });
        }
        Ok(())
    };
    want("q_out", q_out, qkv.dtype(), num_tokens, heads.q_heads * d)?;
    let positions = batch.meta().max_kv_len();
    want("RoPE table", table, crate::policy::Dtype::F32, positions, d)?;
    // The kernel indexes elements (of the caches too) in 32 bits.
    crate::kernels::check_copy_vectors(
        &layout,
        1,
        [("qkv", qkv.len_elems()), ("q_out", q_out.len_elems())],
    )?;
    crate::error::check_limit(
        "RoPE table",
        table.len_elems(),
        u32::MAX as usize,
        "the kernel's 32-bit indices",
    )?;
    rope::launch_fill_rope(cache, qkv, batch, table, heads.q_heads, rope_dims, q_out);
    Ok(())
}

/// What every write checks: a batch uploaded for writing against this cache's layout, a policy
/// that fits the cache dtype, a batch the grid holds. Returns the packed new tokens and the
/// layout.
fn check_write<R: Runtime>(
    cache: &PagedKvCache<R>,
    batch: &DeviceBatch<R>,
) -> Result<(usize, crate::layout::PagedKvLayout)> {
    let num_tokens = batch.num_tokens().ok_or_else(|| {
        Fp8KvError::InvalidOption(
            "fill needs a batch validated for writing (DeviceBatch::new), not DeviceBatch::for_reads".into(),
        )
    })?;
    let layout = *cache.layout();
    batch.check_layout(&layout)?;
    crate::kernels::check_grid_batch(batch.batch())?;
    Ok((num_tokens, layout))
}

/// The checks of [`fill`].
fn validate<R: Runtime>(
    cache: &PagedKvCache<R>,
    k_new: &DeviceRows<R>,
    v_new: &DeviceRows<R>,
    batch: &DeviceBatch<R>,
) -> Result<()> {
    let (num_tokens, layout) = check_write(cache, batch)?;
    if k_new.dtype() != v_new.dtype() {
        return Err(Fp8KvError::UnsupportedDtype(format!(
            "k_new is {} but v_new is {}",
            k_new.dtype(),
            v_new.dtype()
        )));
    }
    let heads = layout.num_kv_heads();
    check_rows(
        "k_new",
        k_new,
        num_tokens,
        heads * layout.head_dim(KvSide::K),
    )?;
    check_rows(
        "v_new",
        v_new,
        num_tokens,
        heads * layout.head_dim(KvSide::V),
    )
}
