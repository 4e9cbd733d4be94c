//! CPU reference kernels: naive, f64 accumulation, walking the block table token by token,
//! FP8 through the software codec in [`crate::fp8`]. The ground truth of every GPU test.
//!
//! Host buffers: the cache is raw bytes in its [`Dtype`] (little-endian) together with its
//! [`CacheSpec`], whose scales every kernel here reads (none takes them separately);
//! activations are f32 values (already rounded to their activation dtype by the caller).

mod decode;
mod fill;
mod flatten;

pub use decode::paged_decode;
pub use fill::{fill, fill_rope};
pub use flatten::flatten;

use crate::contract::CacheSpec;
use crate::error::{checked_rows_span, try_vec, Fp8KvError, KvSide, Result};
use crate::layout::PagedKvLayout;
use crate::policy::{Dtype, QuantPolicy};
use crate::scales::KvScales;

/// A paged K/V cache held in host memory, as raw element bytes, with the [`CacheSpec`] that
/// describes it (layout, element type, scales): the reference kernels read the scales from it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostKvCache {
    // Layout, dtype (the policy follows from it) and scales; validated when it was built.
    spec: CacheSpec,
    /// K cache bytes, `layout.shape(K)` elements of the cache dtype.
    pub k: Vec<u8>,
    /// V cache bytes, `layout.shape(V)` elements of the cache dtype.
    pub v: Vec<u8>,
}

impl HostKvCache {
    /// A cache described by `spec` whose every byte is `fill_byte` (use a poison byte to catch
    /// stray writes).
    ///
    /// Errors: [`Fp8KvError::TooLarge`] (the host cannot allocate it).
    pub fn new(spec: CacheSpec, fill_byte: u8) -> Result<Self> {
        let (layout, dtype) = (spec.layout(), spec.dtype());
        Ok(HostKvCache {
            k: try_vec(
                "host k cache bytes",
                Self::side_bytes(layout, dtype, KvSide::K),
                fill_byte,
            )?,
            v: try_vec(
                "host v cache bytes",
                Self::side_bytes(layout, dtype, KvSide::V),
                fill_byte,
            )?,
            spec,
        })
    }

    /// Bytes one side of a cache of `layout` and `dtype` holds (exact: [`PagedKvLayout::new`]
    /// bounds the cache bytes at 2 bytes per element).
    fn side_bytes(layout: &PagedKvLayout, dtype: Dtype, side: KvSide) -> usize {
        layout.cache_elems(side) * dtype.size_bytes()
    }

    /// Checks that [`Self::k`] and [`Self::v`] (public fields, so a caller may have replaced
    /// them) still hold exactly `layout.shape(side)` elements of the cache dtype: every
    /// reference kernel and [`crate::device::PagedKvCache::from_host`] call this first, so a
    /// short buffer is an error instead of an out-of-bounds index.
    pub fn check_shape(&self) -> Result<()> {
        let (layout, dtype) = (self.layout(), self.dtype());
        for (what, side, bytes) in [
            ("host k cache bytes", KvSide::K, &self.k),
            ("host v cache bytes", KvSide::V, &self.v),
        ] {
            let need = Self::side_bytes(layout, dtype, side);
            if bytes.len() != need {
                return Err(Fp8KvError::ShapeMismatch {
                    what,
                    expected: format!("{need} bytes ({:?} of {dtype})", layout.shape(side)),
                    actual: format!("{} bytes", bytes.len()),
                });
            }
        }
        Ok(())
    }

    /// What the cache is: layout, element type, scales.
    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }
    /// The layout.
    pub fn layout(&self) -> &PagedKvLayout {
        self.spec.layout()
    }
    /// The quant policy.
    pub fn policy(&self) -> QuantPolicy {
        self.spec.policy()
    }
    /// The cache element type.
    pub fn dtype(&self) -> Dtype {
        self.spec.dtype()
    }
    /// The scales the reference kernels quantize and dequantize with (ignored by `none`).
    pub fn scales(&self) -> KvScales {
        self.spec.scales()
    }

    /// Bytes of one side.
    pub fn bytes(&self, side: KvSide) -> &[u8] {
        match side {
            KvSide::K => &self.k,
            KvSide::V => &self.v,
        }
    }

    /// Stored value of element `(page, slot, head, d)` of one side, unscaled: `f32(q)` for FP8,
    /// the stored value for the unquantized cache.
    ///
    /// # Panics
    ///
    /// If the element is outside the layout or the buffers fail [`Self::check_shape`].
    pub fn raw(&self, side: KvSide, page: usize, slot: usize, head: usize, d: usize) -> f32 {
        let dtype = self.dtype();
        let t = self.layout().tensor(side);
        let es = dtype.size_bytes();
        let off = (t.offset(page, slot, head) + d) * es;
        dtype.load(&self.bytes(side)[off..off + es])
    }

    /// Dequantized value of element `(page, slot, head, d)` of one side: `f32(q) * scale` with
    /// the side's scale from [`Self::scales`] for FP8, the stored value for the unquantized
    /// cache (whose scales are not applied).
    ///
    /// # Panics
    ///
    /// If the element is outside the layout or the buffers fail [`Self::check_shape`].
    pub fn dequant(&self, side: KvSide, page: usize, slot: usize, head: usize, d: usize) -> f32 {
        let raw = self.raw(side, page, slot, head, d);
        if self.dtype().fp8_format().is_none() {
            return raw;
        }
        let scales = self.scales();
        raw * match side {
            KvSide::K => scales.k(),
            KvSide::V => scales.v(),
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
    /// Checks that `num_tokens` rows of `row_elems` fit: [`Fp8KvError::RowStride`] for a
    /// stride below the row, [`Fp8KvError::ShapeMismatch`] for too little data,
    /// [`Fp8KvError::TooLarge`] when the span of the rows overflows `usize`.
    pub fn check(&self, what: &'static str, num_tokens: usize, row_elems: usize) -> Result<()> {
        if self.row_stride < row_elems {
            return Err(Fp8KvError::RowStride {
                what,
                stride: self.row_stride,
                row_elems,
            });
        }
        let need = checked_rows_span("host rows span", num_tokens, row_elems, self.row_stride)?;
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
