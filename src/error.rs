//! The one error type of the crate: every public function returns `Result<_, Fp8KvError>`.

use thiserror::Error;

/// Which of the two cache tensors an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSide {
    /// The key cache (or key input).
    K,
    /// The value cache (or value input).
    V,
}

impl std::fmt::Display for KvSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvSide::K => "k",
            KvSide::V => "v",
        })
    }
}

/// Everything that can go wrong in fp8kv, one variant per kind of bad input.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Fp8KvError {
    /// A quantization policy string that is not one of the accepted spellings.
    #[error("unknown KV cache quant policy `{input}`; valid values: {valid}")]
    UnknownPolicy {
        /// What the user typed.
        input: String,
        /// The accepted spellings.
        valid: &'static str,
    },
    /// A scale that is not finite or not strictly positive.
    #[error("{side}_scale must be finite and > 0, got {value}")]
    InvalidScale {
        /// Which scale.
        side: KvSide,
        /// The rejected value.
        value: f32,
    },
    /// An amax passed to calibration that is negative or not finite.
    #[error("{side} amax must be finite and >= 0, got {value}")]
    InvalidAmax {
        /// Which tensor's amax.
        side: KvSide,
        /// The rejected value.
        value: f32,
    },
    /// A page size the kernels do not support.
    #[error("page_size must be a power of two >= 16, got {page_size}")]
    InvalidPageSize {
        /// The rejected page size.
        page_size: usize,
    },
    /// An engine block size that is not a multiple of the kernel page size.
    #[error("logical block size {logical} is not a positive multiple of the kernel page size {page_size}")]
    InvalidLogicalBlockSize {
        /// The engine's block size.
        logical: usize,
        /// The kernel page size.
        page_size: usize,
    },
    /// A head-dim pair the kernels do not support.
    #[error("unsupported head dims (k {head_dim_k}, v {head_dim_v}); supported: 64, 80, 96, 128, 192, 256 (k = v), and k 576 / v 512")]
    UnsupportedHeadDim {
        /// K head dim.
        head_dim_k: usize,
        /// V head dim.
        head_dim_v: usize,
    },
    /// A count that must be positive was zero.
    #[error("{what} must be > 0")]
    ZeroSize {
        /// The offending quantity.
        what: &'static str,
    },
    /// Query heads that do not divide evenly into KV heads.
    #[error("num_heads {num_heads} is not a positive multiple of num_kv_heads {num_kv_heads}")]
    HeadRatio {
        /// Query heads.
        num_heads: usize,
        /// KV heads.
        num_kv_heads: usize,
    },
    /// A tensor or array with the wrong length or shape.
    #[error("shape mismatch for {what}: expected {expected}, got {actual}")]
    ShapeMismatch {
        /// Which tensor.
        what: &'static str,
        /// The expected shape or length, in words.
        expected: String,
        /// What was passed.
        actual: String,
    },
    /// A block-table entry outside `[0, num_pages)`.
    #[error("block_table[{seq}][{index}] = {page} is outside [0, {num_pages})")]
    BlockTableOutOfRange {
        /// Sequence.
        seq: usize,
        /// Logical page index.
        index: usize,
        /// The entry.
        page: i64,
        /// Pages in the cache.
        num_pages: usize,
    },
    /// A sequence longer than its row of the block table can hold.
    #[error("sequence {seq}: kv_seqlen {kv_len} exceeds its capacity of {capacity} tokens (pages per sequence x page_size)")]
    SeqLenPastCache {
        /// Sequence.
        seq: usize,
        /// Its KV length.
        kv_len: i64,
        /// Tokens its block-table row can address.
        capacity: usize,
    },
    /// A negative length or start.
    #[error("sequence {seq}: {what} is negative ({value})")]
    NegativeLength {
        /// Sequence.
        seq: usize,
        /// Which field.
        what: &'static str,
        /// The value.
        value: i64,
    },
    /// More new tokens than tokens in the cache after the step.
    #[error("sequence {seq}: q_seq_length {q_len} exceeds kv_seqlen {kv_len}")]
    QueryLongerThanKv {
        /// Sequence.
        seq: usize,
        /// New tokens.
        q_len: i64,
        /// Cache tokens after the step.
        kv_len: i64,
    },
    /// A sequence's new tokens do not lie inside the packed token dimension.
    #[error("sequence {seq}: tokens [{start}, {end}) are outside the {num_tokens} packed tokens")]
    QueryOutOfRange {
        /// Sequence.
        seq: usize,
        /// q_start_loc.
        start: i64,
        /// q_start_loc + q_seq_length.
        end: i64,
        /// Packed token count.
        num_tokens: usize,
    },
    /// Two sequences claim the same packed tokens.
    #[error("sequences {a} and {b} overlap in the packed token dimension")]
    QueryOverlap {
        /// First sequence.
        a: usize,
        /// Second sequence.
        b: usize,
    },
    /// Two new tokens would be written to the same cache slot.
    #[error("sequence {seq_a} token {pos_a} and sequence {seq_b} token {pos_b} both write page {page} slot {slot}")]
    SlotConflict {
        /// First writer.
        seq_a: usize,
        /// Its position.
        pos_a: usize,
        /// Second writer.
        seq_b: usize,
        /// Its position.
        pos_b: usize,
        /// Physical page.
        page: usize,
        /// Slot within the page.
        slot: usize,
    },
    /// A row stride smaller than one row.
    #[error("{what} row stride {stride} is smaller than a row of {row_elems} elements")]
    RowStride {
        /// Which input.
        what: &'static str,
        /// The stride.
        stride: usize,
        /// Elements per row.
        row_elems: usize,
    },
    /// A dtype that does not fit the operation (an FP8 activation, a cache dtype that disagrees with the policy).
    #[error("unsupported dtype: {0}")]
    UnsupportedDtype(String),
    /// An option value that makes no sense (softcap <= 0, window 0, ...).
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// No usable CUDA device.
    #[error("no CUDA device available: {0}")]
    NoDevice(String),
    /// The device cannot convert to/from FP8.
    #[error("the device does not support FP8 conversion ({0}); use the `none` policy")]
    Fp8Unsupported(String),
    /// A tensor of the wrong rank (Burn extension).
    #[error("{what} must be a rank-{expected} tensor {layout}, got rank {actual}")]
    WrongRank {
        /// Which tensor.
        what: &'static str,
        /// The rank expected.
        expected: usize,
        /// The dimensions the rank stands for, in words.
        layout: &'static str,
        /// The rank passed.
        actual: usize,
    },
    /// A tensor or batch on another device than the cache (Burn extension).
    #[error("{what} is on device {actual}, but the cache is on {expected}")]
    DeviceMismatch {
        /// Which tensor or batch.
        what: &'static str,
        /// The cache's device.
        expected: String,
        /// The device it is on.
        actual: String,
    },
    /// A size past what the host can represent (a `usize` product that overflows) or what the
    /// kernels can address (32-bit indices, CUDA's grid limits). The size is a `u128` so that a
    /// product past `usize::MAX` can still be reported.
    #[error("{what} is too large: {actual} exceeds the limit of {limit} ({why})")]
    TooLarge {
        /// Which quantity.
        what: &'static str,
        /// Its value (saturated at `u128::MAX` if even that overflows).
        actual: u128,
        /// The largest accepted value.
        limit: u128,
        /// Where the limit comes from.
        why: &'static str,
    },
    /// A per-layer K or V scale read from a checkpoint that is not finite or not > 0.
    #[error("layer {layer}: checkpoint scale `{tensor}` must be finite and > 0, got {value}")]
    CheckpointScale {
        /// The layer.
        layer: usize,
        /// The tensor it was read from.
        tensor: String,
        /// The rejected value (converted to f32).
        value: f32,
    },
    /// A checkpoint file that cannot be opened or read, or is not a valid safetensors file.
    #[error("checkpoint {file}: {reason}")]
    CheckpointFile {
        /// The file (its path, or `bytes[i]` for in-memory shards).
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A scale tensor in a checkpoint of the wrong dtype or shape (or found in two shards).
    #[error("checkpoint {file}: tensor `{tensor}`: {reason}")]
    CheckpointTensor {
        /// The file (its path, or `bytes[i]` for in-memory shards).
        file: String,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A failure reported by the runtime.
    #[error("runtime error: {0}")]
    Runtime(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Fp8KvError>;

/// The product of `factors`, or [`Fp8KvError::TooLarge`] naming `what` when it overflows
/// `usize` (the host-side guard every size computation from user input goes through).
pub(crate) fn checked_product(what: &'static str, factors: &[usize]) -> Result<usize> {
    let exact = factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f));
    exact.ok_or_else(|| Fp8KvError::TooLarge {
        what,
        actual: factors
            .iter()
            .fold(1u128, |acc, &f| acc.saturating_mul(f as u128)),
        limit: usize::MAX as u128,
        why: "the host's usize",
    })
}

/// Elements `rows` rows of `row_elems` elements `row_stride` apart span (the last row
/// unpadded): `(rows - 1) * row_stride + row_elems`, 0 for no rows, or
/// [`Fp8KvError::TooLarge`] naming `what` when that overflows `usize`.
pub(crate) fn checked_rows_span(
    what: &'static str,
    rows: usize,
    row_elems: usize,
    row_stride: usize,
) -> Result<usize> {
    if rows == 0 {
        return Ok(0);
    }
    (rows - 1)
        .checked_mul(row_stride)
        .and_then(|n| n.checked_add(row_elems))
        .ok_or(Fp8KvError::TooLarge {
            what,
            actual: ((rows - 1) as u128)
                .saturating_mul(row_stride as u128)
                .saturating_add(row_elems as u128),
            limit: usize::MAX as u128,
            why: "the host's usize",
        })
}

/// A vector of `n` copies of `value`, or [`Fp8KvError::TooLarge`] naming `what` when the
/// allocator refuses it (instead of the abort or panic of `vec![value; n]`).
pub(crate) fn try_vec<T: Clone>(what: &'static str, n: usize, value: T) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Fp8KvError::TooLarge {
        what,
        actual: (n as u128).saturating_mul(std::mem::size_of::<T>() as u128),
        limit: isize::MAX as u128,
        why: "bytes the host allocator could provide",
    })?;
    v.resize(n, value);
    Ok(v)
}

/// [`Fp8KvError::TooLarge`] unless `actual <= limit`.
pub fn check_limit(
    what: &'static str,
    actual: usize,
    limit: usize,
    why: &'static str,
) -> Result<()> {
    if actual <= limit {
        Ok(())
    } else {
        Err(Fp8KvError::TooLarge {
            what,
            actual: actual as u128,
            limit: limit as u128,
            why,
        })
    }
}
