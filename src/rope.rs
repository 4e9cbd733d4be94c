//! Rotary position embeddings (RoPE) for the fused RoPE + fill kernel and the model's
//! layer kernels: the angle table every kernel, reference and backend reads, and the heads of
//! a fused QKV row.

use crate::error::{check_limit, Fp8KvError, Result};

/// RoPE angles as a table: row `pos` holds `(cos θ, sin θ)` of pair `i` at `2i, 2i + 1`,
/// `θ = pos · base^(−2i / rope_dims)`, computed in f64 and rounded to f32 once (the kernels,
/// the reference and every backend read the same numbers).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    positions: usize,
    head_dim: usize,
    rope_dims: usize,
    values: Vec<f32>,
}

impl RopeTable {
    /// The table for positions `0..positions` of heads of `head_dim`, the first `rope_dims`
    /// dimensions rotated (even, at most `head_dim`), frequency base `base` (> 0).
    pub fn new(base: f64, head_dim: usize, rope_dims: usize, positions: usize) -> Result<Self> {
        if !(base.is_finite() && base > 0.0) {
            return Err(Fp8KvError::InvalidOption(format!(
                "RoPE base must be finite and > 0, got {base}"
            )));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) || rope_dims > head_dim {
            return Err(Fp8KvError::InvalidOption(format!(
                "RoPE needs an even head dim and rope dims <= head dim, got head dim {head_dim}, rope dims {rope_dims}"
            )));
        }
        if !rope_dims.is_multiple_of(2) {
            return Err(Fp8KvError::InvalidOption(format!(
                "RoPE rotates pairs: rope dims must be even, got {rope_dims}"
            )));
        }
        let len = crate::error::checked_product("RoPE table", &[positions, head_dim])?;
        check_limit(
            "RoPE table",
            len,
            u32::MAX as usize - 1,
            "the kernels' 32-bit indices",
        )?;
        let mut values = crate::error::try_vec("RoPE table", len, 0f32)?;
        for pos in 0..positions {
            for i in 0..rope_dims / 2 {
                let theta = pos as f64 * base.powf(-2.0 * i as f64 / rope_dims as f64);
                values[pos * head_dim + 2 * i] = theta.cos() as f32;
                values[pos * head_dim + 2 * i + 1] = theta.sin() as f32;
            }
        }
        Ok(RopeTable {
            positions,
            head_dim,
            rope_dims,
            values,
        })
    }
    /// A table from its values (`[positions, head_dim]`, as [`Self::values`] returns them),
    /// e.g. read back from a device. Errors as [`Self::new`] for the dims, and
    /// [`Fp8KvError::ShapeMismatch`] when `values` is not `positions · head_dim` long.
    pub fn from_values(
        values: Vec<f32>,
        positions: usize,
        head_dim: usize,
        rope_dims: usize,
    ) -> Result<Self> {
        // The dims' checks of `new`, on an empty table.
        Self::new(1.0, head_dim, rope_dims, 0)?;
        if Some(values.len()) != positions.checked_mul(head_dim) {
            return Err(Fp8KvError::ShapeMismatch {
                what: "RoPE table values",
                expected: format!("{positions} x {head_dim} values"),
                actual: format!("{} values", values.len()),
            });
        }
        Ok(RopeTable {
            positions,
            head_dim,
            rope_dims,
            values,
        })
    }

    /// Positions the table covers.
    pub fn positions(&self) -> usize {
        self.positions
    }
    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Rotated dimensions per head.
    pub fn rope_dims(&self) -> usize {
        self.rope_dims
    }
    /// `[positions, head_dim]` f32 values (the pairs past `rope_dims` are 0).
    pub fn values(&self) -> &[f32] {
        &self.values
    }
    /// `(cos, sin)` of pair `i` at position `pos`.
    pub fn cos_sin(&self, pos: usize, i: usize) -> (f32, f32) {
        let at = pos * self.head_dim + 2 * i;
        (self.values[at], self.values[at + 1])
    }
}

/// Heads of a fused QKV row: `[q_heads + 2 kv_heads, head_dim]`, Q then K then V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvHeads {
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl QkvHeads {
    /// Elements of one QKV row.
    pub fn row_elems(&self) -> usize {
        (self.q_heads + 2 * self.kv_heads) * self.head_dim
    }
}
