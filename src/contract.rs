//! The contracts every implementation shares, in one place: what a cache is ([`CacheSpec`]),
//! the attention options, the order of a flatten output and where each sequence starts in it.
//! The device entry points, the CPU reference and the Burn extension all take these types;
//! none of them defines its own.

use crate::error::{Fp8KvError, Result};
use crate::layout::{BatchMetadata, PagedKvLayout};
use crate::policy::{Dtype, QuantPolicy};
use crate::scales::KvScales;

/// What one layer's cache is, whoever holds it: its layout, its element type (from which the
/// policy follows: E4M3 / E5M2 codes, or f16 / bf16 values for `none`) and its scales.
/// Validated once when built, so every holder ([`crate::device::PagedKvCache`], the
/// reference's [`crate::reference::HostKvCache`], the Burn extension's `KvCache`) can rely on
/// the pairing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheSpec {
    layout: PagedKvLayout,
    dtype: Dtype,
    scales: KvScales,
}

impl CacheSpec {
    /// A cache of `dtype` elements: `E4m3`, `E5m2`, `F16` or `Bf16`
    /// ([`Fp8KvError::UnsupportedDtype`] otherwise).
    pub fn new(layout: PagedKvLayout, dtype: Dtype, scales: KvScales) -> Result<Self> {
        QuantPolicy::of_cache_dtype(dtype)?;
        Ok(CacheSpec {
            layout,
            dtype,
            scales,
        })
    }

    /// The same from a policy and the cache dtype users already hold: the two must pair
    /// ([`QuantPolicy::check_cache_dtype`]).
    pub fn from_parts(
        layout: PagedKvLayout,
        policy: QuantPolicy,
        dtype: Dtype,
        scales: KvScales,
    ) -> Result<Self> {
        policy.check_cache_dtype(dtype)?;
        Self::new(layout, dtype, scales)
    }

    /// The layout.
    pub fn layout(&self) -> &PagedKvLayout {
        &self.layout
    }
    /// The cache element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// The quantization policy the element type stores.
    pub fn policy(&self) -> QuantPolicy {
        match self.dtype {
            Dtype::E4m3 => QuantPolicy::Fp8E4m3,
            Dtype::E5m2 => QuantPolicy::Fp8E5m2,
            _ => QuantPolicy::None,
        }
    }
    /// The scales (ignored by `none`).
    pub fn scales(&self) -> KvScales {
        self.scales
    }
    /// Replaces the scales (codes already stored are not rescaled).
    pub fn set_scales(&mut self, scales: KvScales) {
        self.scales = scales;
    }
    /// Bytes of the K and V caches together.
    pub fn size_bytes(&self) -> usize {
        self.layout.cache_bytes(self.policy())
    }
}

/// Options of paged attention. `Default` is plain causal softmax attention with scale `1/√d`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AttentionOptions {
    /// Softmax scale applied to `q · k`; `None` means `1 / sqrt(head_dim_k)`.
    pub sm_scale: Option<f32>,
    /// Sliding window: a query at position `p` sees keys `j` with `p - window < j ≤ p`
    /// (the window counts the query's own position). `None`: no window. A window at least as
    /// long as the sequence limits nothing (the GPU kernels clamp values past `i32::MAX`, which
    /// every position is below).
    pub window: Option<usize>,
    /// Logit softcap `c`: scores become `c · tanh(s / c)` (Gemma-2 style). Must be > 0.
    pub softcap: Option<f32>,
    /// Attention sinks: one logit per query head that joins the softmax denominator only
    /// (gpt-oss style).
    pub sinks: Option<Vec<f32>>,
    /// ALiBi slopes, one per query head: scores get `slope · (j - p)` added (after softcap).
    pub alibi_slopes: Option<Vec<f32>>,
}

impl AttentionOptions {
    /// Checks the options against the query head count: [`Fp8KvError::InvalidOption`] for a
    /// non-finite or non-positive `sm_scale` or `softcap`, a window of 0 or non-finite sinks or
    /// slopes; [`Fp8KvError::ShapeMismatch`] for sinks or slopes not one per query head.
    pub fn validate(&self, num_heads: usize) -> Result<()> {
        if let Some(s) = self.sm_scale {
            if !s.is_finite() || s <= 0.0 {
                return Err(Fp8KvError::InvalidOption(format!(
                    "sm_scale must be finite and > 0, got {s}"
                )));
            }
        }
        if self.window == Some(0) {
            return Err(Fp8KvError::InvalidOption(
                "window must be >= 1 (it counts the query's own position)".into(),
            ));
        }
        if let Some(c) = self.softcap {
            if !c.is_finite() || c <= 0.0 {
                return Err(Fp8KvError::InvalidOption(format!(
                    "softcap must be finite and > 0, got {c}"
                )));
            }
        }
        for (what, v) in [("sinks", &self.sinks), ("alibi_slopes", &self.alibi_slopes)] {
            if let Some(v) = v {
                if v.len() != num_heads {
                    return Err(Fp8KvError::ShapeMismatch {
                        what,
                        expected: format!("{num_heads} (one per query head)"),
                        actual: format!("{}", v.len()),
                    });
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(Fp8KvError::InvalidOption(format!("{what} must be finite")));
                }
            }
        }
        Ok(())
    }
}

/// Order of a flattened output tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FlattenLayout {
    /// `[num_kv_heads, total_tokens, head_dim]` (LMDeploy's flatten output).
    #[default]
    Hsd,
    /// `[total_tokens, num_kv_heads, head_dim]` (varlen flash-attention input).
    Shd,
}

/// Where each sequence starts in the flattened token dimension: the exclusive prefix sum of
/// `kv_seqlens`, plus the total as last element (`batch + 1` entries).
pub fn flatten_start_loc(meta: &BatchMetadata) -> Vec<usize> {
    let mut out = Vec::with_capacity(meta.batch() + 1);
    let mut acc = 0usize;
    out.push(0);
    for &l in meta.kv_seqlens() {
        acc += l.max(0) as usize;
        out.push(acc);
    }
    out
}
