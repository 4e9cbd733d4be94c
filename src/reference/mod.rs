//! CPU reference kernels: naive, f64 accumulation, walking the block table token by token,
//! FP8 through the software codec in [`crate::fp8`]. The ground truth of every GPU test.
//!
//! Host buffers: the cache is raw bytes in its [`Dtype`] (little-endian), activations are f32
//! values (already rounded to their activation dtype by the caller).

mod decode;
mod fill;
mod flatten;

pub use decode::{paged_decode, AttentionOptions};
pub use fill::fill;
pub use flatten::{flatten, flatten_start_loc, FlattenLayout};

use crate::error::{Fp8KvError, KvSide, Result};
use crate::layout::PagedKvLayout;
use crate::policy::{Dtype, QuantPolicy};

/// A paged K/V cache held in host memory, as raw element bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct HostKvCache {
    layout: PagedKvLayout,
    policy: QuantPolicy,
    dtype: Dtype,
    /// K cache bytes, `layout.shape(K)` elements of `dtype`.
    pub k: Vec<u8>,
    /// V cache bytes, `layout.shape(V)` elements of `dtype`.
    pub v: Vec<u8>,
}

impl HostKvCache {
    /// A cache whose every byte is `fill_byte` (use a poison byte to catch stray writes).
    pub fn new(
        layout: PagedKvLayout,
        policy: QuantPolicy,
        dtype: Dtype,
        fill_byte: u8,
    ) -> Result<Self> {
        policy.check_cache_dtype(dtype)?;
        let es = dtype.size_bytes();
        Ok(HostKvCache {
            layout,
            policy,
            dtype,
            k: vec![fill_byte; layout.cache_elems(KvSide::K) * es],
            v: vec![fill_byte; layout.cache_elems(KvSide::V) * es],
        })
    }

    /// The layout.
    pub fn layout(&self) -> &PagedKvLayout {
        &self.layout
    }
    /// The quant policy.
    pub fn policy(&self) -> QuantPolicy {
        self.policy
    }
    /// The cache element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Bytes of one side.
    pub fn bytes(&self, side: KvSide) -> &[u8] {
        match side {
            KvSide::K => &self.k,
            KvSide::V => &self.v,
        }
    }

    /// Dequantized value of element `(page, slot, head, d)` of one side: `f32(q) * scale` for
    /// FP8, the stored value for the unquantized cache (whose scales are not applied).
    pub fn dequant(
        &self,
        side: KvSide,
        scale: f32,
        page: usize,
        slot: usize,
        head: usize,
        d: usize,
    ) -> f32 {
        let t = self.layout.tensor(side);
        let es = self.dtype.size_bytes();
        let off = (t.offset(page, slot, head) + d) * es;
        let raw = self.dtype.load(&self.bytes(side)[off..off + es]);
        match self.policy {
            QuantPolicy::None => raw,
            _ => raw * scale,
        }
    }
}

/// Rows of new tokens in host memory: token `t`'s `[num_kv_heads, head_dim]` values start at
/// `data[t * row_stride]` (a row stride above `num_kv_heads * head_dim` is what a fused QKV
/// projection produces).
#[derive(Debug, Clone, Copy)]
pub struct HostRows<'a> {
    /// The values.
    pub data: &'a [f32],
    /// Elements between consecutive tokens.
    pub row_stride: usize,
}

impl HostRows<'_> {
    /// Checks that `num_tokens` rows of `row_elems` fit.
    pub fn check(&self, what: &'static str, num_tokens: usize, row_elems: usize) -> Result<()> {
        if self.row_stride < row_elems {
            return Err(Fp8KvError::RowStride {
                what,
                stride: self.row_stride,
                row_elems,
            });
        }
        let need = if num_tokens == 0 {
            0
        } else {
            (num_tokens - 1) * self.row_stride + row_elems
        };
        if self.data.len() < need {
            return Err(Fp8KvError::ShapeMismatch {
                what,
                expected: format!(
                    "at least {need} elements ({num_tokens} rows, stride {})",
                    self.row_stride
                ),
                actual: format!("{} elements", self.data.len()),
            });
        }
        Ok(())
    }
}

/// Quantizes one value for the cache: `clamp(x / scale, -MAX, MAX)` through the software codec
/// for FP8; a plain rounding store for the unquantized cache (scale not applied).
pub fn quantize_value(dtype: Dtype, x: f32, scale: f32) -> u32 {
    match dtype.fp8_format() {
        Some(f) => {
            let max = f.max_finite();
            f.encode((x / scale).clamp(-max, max)) as u32
        }
        None => dtype.encode_bits(x),
    }
}
