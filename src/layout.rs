//! The paged cache layout (host side) and batch metadata: every shape, stride and
//! `(seq, token) -> (page, slot, offset)` computation of the crate lives here.

use crate::error::{check_limit, checked_product, Fp8KvError, KvSide, Result};
use crate::policy::QuantPolicy;

/// Order of the two middle dimensions of a cache page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvLayoutKind {
    /// `[num_pages, page_size, num_kv_heads, head_dim]` (vLLM's and LMDeploy's default).
    #[default]
    Bshd,
    /// `[num_pages, num_kv_heads, page_size, head_dim]`.
    Bhsd,
}

/// Head-dim pairs `(k, v)` the kernels support.
pub const SUPPORTED_HEAD_DIMS: [(usize, usize); 7] = [
    (64, 64),
    (80, 80),
    (96, 96),
    (128, 128),
    (192, 192),
    (256, 256),
    (576, 512),
];

/// Checks a `(k, v)` head-dim pair against [`SUPPORTED_HEAD_DIMS`].
pub fn check_head_dims(head_dim_k: usize, head_dim_v: usize) -> Result<()> {
    if SUPPORTED_HEAD_DIMS.contains(&(head_dim_k, head_dim_v)) {
        Ok(())
    } else {
        Err(Fp8KvError::UnsupportedHeadDim {
            head_dim_k,
            head_dim_v,
        })
    }
}

/// The most elements one page of one cache tensor may hold (`page_size × num_kv_heads ×
/// head_dim`): the kernels' comptime strides are `u32` and are multiplied by the element size
/// (up to 2 bytes) while the kernels are built, so a page stays below 2^31 elements.
pub const MAX_PAGE_ELEMS: usize = i32::MAX as usize;

/// Strides (in elements) of one cache tensor, K or V: the device twin of this is what kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTensorLayout {
    /// Elements between consecutive pages.
    pub page_stride: usize,
    /// Elements between consecutive slots (tokens) of a page.
    pub slot_stride: usize,
    /// Elements between consecutive KV heads.
    pub head_stride: usize,
    /// Elements of one head vector (innermost, contiguous).
    pub head_dim: usize,
}

impl CacheTensorLayout {
    /// Element offset of `(page, slot, head, 0)`.
    pub fn offset(&self, page: usize, slot: usize, head: usize) -> usize {
        page * self.page_stride + slot * self.slot_stride + head * self.head_stride
    }
}

/// Strides of one cache tensor of `kind` with pages of `page_size` tokens: the one place these
/// formulas live (the kernels' comptime twin, `kernels::CacheGeometry`, calls it too).
pub const fn cache_tensor_layout(
    kind: KvLayoutKind,
    page_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
) -> CacheTensorLayout {
    let page_stride = page_size * num_kv_heads * head_dim;
    match kind {
        KvLayoutKind::Bshd => CacheTensorLayout {
            page_stride,
            slot_stride: num_kv_heads * head_dim,
            head_stride: head_dim,
            head_dim,
        },
        KvLayoutKind::Bhsd => CacheTensorLayout {
            page_stride,
            slot_stride: head_dim,
            head_stride: page_size * head_dim,
            head_dim,
        },
    }
}

/// Shape of one layer's paged K and V caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedKvLayout {
    num_pages: usize,
    page_size: usize,
    num_kv_heads: usize,
    head_dim_k: usize,
    head_dim_v: usize,
    kind: KvLayoutKind,
}

impl PagedKvLayout {
    /// A validated layout: `page_size` a power of two ≥ 16, supported head dims, nonzero counts,
    /// a page of at most [`MAX_PAGE_ELEMS`] elements per side ([`Fp8KvError::TooLarge`]), and
    /// both caches' bytes at 2 bytes per element (the widest cache element) within `usize`, so
    /// that every size method of the layout is exact.
    ///
    /// Errors: [`Fp8KvError::ZeroSize`] (no pages or no KV heads),
    /// [`Fp8KvError::InvalidPageSize`], [`Fp8KvError::UnsupportedHeadDim`],
    /// [`Fp8KvError::TooLarge`].
    pub fn new(
        num_pages: usize,
        page_size: usize,
        num_kv_heads: usize,
        head_dim_k: usize,
        head_dim_v: usize,
        kind: KvLayoutKind,
    ) -> Result<Self> {
        if num_pages == 0 {
            return Err(Fp8KvError::ZeroSize { what: "num_pages" });
        }
        if num_kv_heads == 0 {
            return Err(Fp8KvError::ZeroSize {
                what: "num_kv_heads",
            });
        }
        if page_size < 16 || !page_size.is_power_of_two() {
            return Err(Fp8KvError::InvalidPageSize { page_size });
        }
        check_head_dims(head_dim_k, head_dim_v)?;
        let page_elems = checked_product(
            "cache page elements",
            &[page_size, num_kv_heads, head_dim_k.max(head_dim_v)],
        )?;
        check_limit(
            "cache page elements",
            page_elems,
            MAX_PAGE_ELEMS,
            "the kernels' 32-bit comptime strides",
        )?;
        // K and V together at 2 bytes per element: bounds cache_elems, cache_bytes and
        // bytes_per_token for every policy.
        checked_product(
            "k + v cache bytes",
            &[
                num_pages,
                page_size,
                num_kv_heads,
                head_dim_k + head_dim_v,
                2,
            ],
        )?;
        Ok(PagedKvLayout {
            num_pages,
            page_size,
            num_kv_heads,
            head_dim_k,
            head_dim_v,
            kind,
        })
    }

    /// Pages in the cache.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }
    /// Tokens per page (the kernel block).
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// KV heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    /// K head dim.
    pub fn head_dim_k(&self) -> usize {
        self.head_dim_k
    }
    /// V head dim.
    pub fn head_dim_v(&self) -> usize {
        self.head_dim_v
    }
    /// Bshd or Bhsd.
    pub fn kind(&self) -> KvLayoutKind {
        self.kind
    }

    /// An engine block size (the unit its block manager hands out) must be a multiple of the
    /// kernel page size: each engine block is then `logical / page_size` consecutive kernel pages.
    pub fn check_logical_block_size(&self, logical: usize) -> Result<()> {
        if logical == 0 || !logical.is_multiple_of(self.page_size) {
            return Err(Fp8KvError::InvalidLogicalBlockSize {
                logical,
                page_size: self.page_size,
            });
        }
        Ok(())
    }

    /// Head dim of one side.
    pub fn head_dim(&self, side: KvSide) -> usize {
        match side {
            KvSide::K => self.head_dim_k,
            KvSide::V => self.head_dim_v,
        }
    }

    /// Strides of the K or V cache tensor.
    pub fn tensor(&self, side: KvSide) -> CacheTensorLayout {
        cache_tensor_layout(
            self.kind,
            self.page_size,
            self.num_kv_heads,
            self.head_dim(side),
        )
    }

    /// Logical 4-d shape of the K or V cache tensor in its layout's order.
    pub fn shape(&self, side: KvSide) -> [usize; 4] {
        let d = self.head_dim(side);
        match self.kind {
            KvLayoutKind::Bshd => [self.num_pages, self.page_size, self.num_kv_heads, d],
            KvLayoutKind::Bhsd => [self.num_pages, self.num_kv_heads, self.page_size, d],
        }
    }

    /// Elements of the K or V cache tensor.
    pub fn cache_elems(&self, side: KvSide) -> usize {
        self.num_pages * self.page_size * self.num_kv_heads * self.head_dim(side)
    }

    /// Bytes of K plus V for one token of one layer under `policy`.
    pub fn bytes_per_token(&self, policy: QuantPolicy) -> usize {
        self.num_kv_heads * (self.head_dim_k + self.head_dim_v) * policy.cache_elem_bytes()
    }

    /// Bytes of the K and V caches together under `policy`.
    pub fn cache_bytes(&self, policy: QuantPolicy) -> usize {
        self.num_pages * self.page_size * self.bytes_per_token(policy)
    }
}

/// The batch description engines pass to every kernel (LMDeploy's names).
///
/// - `q_start_loc[b]`: where sequence `b`'s new tokens start in the packed token dimension;
/// - `q_seq_length[b]`: how many new tokens it brings (1 in decode);
/// - `kv_seqlens[b]`: tokens in its cache after this step, the new ones included;
/// - `block_table[b * max_pages_per_seq + i]`: the physical page of its logical page `i`.
///
/// The new tokens of sequence `b` occupy positions `[kv_len - q_len, kv_len)` of its cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMetadata {
    q_start_loc: Vec<i32>,
    q_seq_length: Vec<i32>,
    kv_seqlens: Vec<i32>,
    block_table: Vec<i32>,
    max_pages_per_seq: usize,
}

fn len_err(what: &'static str, expected: usize, actual: usize) -> Fp8KvError {
    Fp8KvError::ShapeMismatch {
        what,
        expected: format!("{expected} elements"),
        actual: format!("{actual} elements"),
    }
}

impl BatchMetadata {
    /// Metadata with consistent array lengths (one entry per sequence, a `[batch,
    /// max_pages_per_seq]` block table). Validate against a layout with [`Self::validate`].
    ///
    /// Errors: [`Fp8KvError::ShapeMismatch`] (a length that disagrees with `kv_seqlens`' or a
    /// block table of another size), [`Fp8KvError::ZeroSize`] (no block-table columns for a
    /// non-empty batch), [`Fp8KvError::TooLarge`] (`batch × max_pages_per_seq` overflows).
    pub fn new(
        q_start_loc: Vec<i32>,
        q_seq_length: Vec<i32>,
        kv_seqlens: Vec<i32>,
        block_table: Vec<i32>,
        max_pages_per_seq: usize,
    ) -> Result<Self> {
        let batch = kv_seqlens.len();
        if q_start_loc.len() != batch {
            return Err(len_err("q_start_loc", batch, q_start_loc.len()));
        }
        if q_seq_length.len() != batch {
            return Err(len_err("q_seq_length", batch, q_seq_length.len()));
        }
        if max_pages_per_seq == 0 && batch > 0 {
            return Err(Fp8KvError::ZeroSize {
                what: "max_pages_per_seq",
            });
        }
        let table_len = checked_product(
            "block_table (batch x max_pages_per_seq)",
            &[batch, max_pages_per_seq],
        )?;
        if block_table.len() != table_len {
            return Err(Fp8KvError::ShapeMismatch {
                what: "block_table",
                expected: format!("[{batch}, {max_pages_per_seq}]"),
                actual: format!("{} elements", block_table.len()),
            });
        }
        Ok(BatchMetadata {
            q_start_loc,
            q_seq_length,
            kv_seqlens,
            block_table,
            max_pages_per_seq,
        })
    }

    /// Decode-step metadata: one new token per sequence, packed in sequence order.
    pub fn decode(
        kv_seqlens: Vec<i32>,
        block_table: Vec<i32>,
        max_pages_per_seq: usize,
    ) -> Result<Self> {
        let batch = kv_seqlens.len();
        let ones = kv_seqlens
            .iter()
            .map(|&l| i32::from(l > 0))
            .collect::<Vec<_>>();
        let mut starts = Vec::with_capacity(batch);
        let mut acc = 0;
        for &n in &ones {
            starts.push(acc);
            acc += n;
        }
        Self::new(starts, ones, kv_seqlens, block_table, max_pages_per_seq)
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.kv_seqlens.len()
    }
    /// Columns of the block table.
    pub fn max_pages_per_seq(&self) -> usize {
        self.max_pages_per_seq
    }
    /// `q_start_loc`.
    pub fn q_start_loc(&self) -> &[i32] {
        &self.q_start_loc
    }
    /// `q_seq_length`.
    pub fn q_seq_length(&self) -> &[i32] {
        &self.q_seq_length
    }
    /// `kv_seqlens`.
    pub fn kv_seqlens(&self) -> &[i32] {
        &self.kv_seqlens
    }
    /// The block table, row-major `[batch, max_pages_per_seq]`.
    pub fn block_table(&self) -> &[i32] {
        &self.block_table
    }
    /// Sum of `q_seq_length`: the new tokens of the batch.
    pub fn total_new_tokens(&self) -> usize {
        self.q_seq_length.iter().map(|&n| n.max(0) as usize).sum()
    }
    /// Largest `kv_seqlens` entry.
    pub fn max_kv_len(&self) -> usize {
        self.kv_seqlens
            .iter()
            .map(|&n| n.max(0) as usize)
            .max()
            .unwrap_or(0)
    }
    /// Largest `q_seq_length` entry.
    pub fn max_q_len(&self) -> usize {
        self.q_seq_length
            .iter()
            .map(|&n| n.max(0) as usize)
            .max()
            .unwrap_or(0)
    }

    /// `(physical page, slot)` of position `pos` of sequence `seq` (valid metadata assumed).
    ///
    /// # Panics
    ///
    /// If `page_size` is 0 or `(seq, pos / page_size)` is outside the block table: call it
    /// only with positions that [`Self::validate_reads`] accepted.
    pub fn locate(&self, seq: usize, pos: usize, page_size: usize) -> (usize, usize) {
        let page = self.block_table[seq * self.max_pages_per_seq + pos / page_size];
        (page as usize, pos % page_size)
    }

    /// Checks what every kernel reads: `0 ≤ kv_seqlens ≤ max_pages_per_seq × page_size` and
    /// every block-table entry a sequence uses within `[0, num_pages)`. Entries past a
    /// sequence's last page are never read and may hold anything (engines pad with -1 or 0).
    ///
    /// Errors: [`Fp8KvError::NegativeLength`], [`Fp8KvError::SeqLenPastCache`],
    /// [`Fp8KvError::BlockTableOutOfRange`] (each naming the sequence).
    pub fn validate_reads(&self, layout: &PagedKvLayout) -> Result<()> {
        let page_size = layout.page_size();
        // Saturating: a capacity past usize is past every i32 length anyway.
        let capacity = self.max_pages_per_seq.saturating_mul(page_size);
        for (b, &kv_len) in self.kv_seqlens.iter().enumerate() {
            let kv_len = kv_len as i64;
            if kv_len < 0 {
                return Err(Fp8KvError::NegativeLength {
                    seq: b,
                    what: "kv_seqlens",
                    value: kv_len,
                });
            }
            if kv_len as usize > capacity {
                return Err(Fp8KvError::SeqLenPastCache {
                    seq: b,
                    kv_len,
                    capacity,
                });
            }
            let used_pages = (kv_len as usize).div_ceil(page_size);
            let row = &self.block_table[b * self.max_pages_per_seq..][..used_pages];
            for (i, &page) in row.iter().enumerate() {
                if page < 0 || page as usize >= layout.num_pages() {
                    return Err(Fp8KvError::BlockTableOutOfRange {
                        seq: b,
                        index: i,
                        page: page as i64,
                        num_pages: layout.num_pages(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks the metadata against a layout and a packed token count (`num_tokens` rows of
    /// new K/V or queries): everything [`Self::validate_reads`] checks, plus
    /// `0 ≤ q_seq_length ≤ kv_seqlens`, each sequence's new tokens inside `[0, num_tokens)` and
    /// disjoint from the others', and no two new tokens written to the same slot. Pages may be
    /// shared for reading (prefix caching); only the slots written in this step must be unique.
    ///
    /// Sequences need not be packed in batch order (every kernel finds a sequence's rows from
    /// its own `q_start_loc`), and a sequence without new tokens may have any `q_start_loc ≥ 0`
    /// (it is never read). All arithmetic is in `i64`, so `q_start_loc + q_seq_length` cannot
    /// overflow.
    ///
    /// Errors, one variant per defect: [`Fp8KvError::NegativeLength`],
    /// [`Fp8KvError::SeqLenPastCache`], [`Fp8KvError::BlockTableOutOfRange`],
    /// [`Fp8KvError::QueryLongerThanKv`], [`Fp8KvError::QueryOutOfRange`],
    /// [`Fp8KvError::QueryOverlap`], [`Fp8KvError::SlotConflict`].
    pub fn validate(&self, layout: &PagedKvLayout, num_tokens: usize) -> Result<()> {
        self.validate_reads(layout)?;
        let mut spans = Vec::with_capacity(self.batch());
        for b in 0..self.batch() {
            let (start, q_len, kv_len) = (
                self.q_start_loc[b] as i64,
                self.q_seq_length[b] as i64,
                self.kv_seqlens[b] as i64,
            );
            for (what, value) in [("q_start_loc", start), ("q_seq_length", q_len)] {
                if value < 0 {
                    return Err(Fp8KvError::NegativeLength {
                        seq: b,
                        what,
                        value,
                    });
                }
            }
            if q_len > kv_len {
                return Err(Fp8KvError::QueryLongerThanKv {
                    seq: b,
                    q_len,
                    kv_len,
                });
            }
            if q_len > 0 && (start + q_len) as usize > num_tokens {
                return Err(Fp8KvError::QueryOutOfRange {
                    seq: b,
                    start,
                    end: start + q_len,
                    num_tokens,
                });
            }
            if q_len > 0 {
                spans.push((start, start + q_len, b));
            }
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(Fp8KvError::QueryOverlap {
                    a: w[0].2,
                    b: w[1].2,
                });
            }
        }
        self.check_written_slots(layout.page_size())
    }

    /// Written slot ranges, one per (sequence, touched page), sorted by page then slot: two
    /// that overlap would race in fill.
    fn check_written_slots(&self, page_size: usize) -> Result<()> {
        // (page, first slot, end slot, seq, first position)
        let mut runs: Vec<(usize, usize, usize, usize, usize)> = Vec::new();
        for b in 0..self.batch() {
            let kv_len = self.kv_seqlens[b] as usize;
            let mut pos = kv_len - self.q_seq_length[b] as usize;
            while pos < kv_len {
                let (page, slot) = self.locate(b, pos, page_size);
                let n = (page_size - slot).min(kv_len - pos);
                runs.push((page, slot, slot + n, b, pos));
                pos += n;
            }
        }
        runs.sort_unstable();
        for w in runs.windows(2) {
            let (a, c) = (w[0], w[1]);
            if a.0 == c.0 && c.1 < a.2 {
                return Err(Fp8KvError::SlotConflict {
                    seq_a: a.3,
                    pos_a: a.4 + (c.1 - a.1),
                    seq_b: c.3,
                    pos_b: c.4,
                    page: c.0,
                    slot: c.1,
                });
            }
        }
        Ok(())
    }
}
