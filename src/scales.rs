//! Per-tensor K and V scales.

use crate::error::{Fp8KvError, KvSide, Result};
use crate::policy::QuantPolicy;

/// One scalar scale for the K cache and one for the V cache of a layer.
///
/// Quantize: `q = cast(clamp(x / scale, -MAX, MAX))`; dequantize: `x ≈ f32(q) * scale`.
/// Both must be finite and > 0; the default is 1.0 (what vLLM and LMDeploy use when no
/// calibration is loaded).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvScales {
    k: f32,
    v: f32,
}

impl Default for KvScales {
    fn default() -> Self {
        KvScales { k: 1.0, v: 1.0 }
    }
}

/// The smallest amax calibration will use, so an all-zero tensor still gives a usable scale.
pub const MIN_CALIBRATION_AMAX: f32 = 1e-12;

fn check_scale(side: KvSide, value: f32) -> Result<f32> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(Fp8KvError::InvalidScale { side, value })
    }
}

impl KvScales {
    /// Validated scales.
    pub fn new(k: f32, v: f32) -> Result<Self> {
        Ok(KvScales {
            k: check_scale(KvSide::K, k)?,
            v: check_scale(KvSide::V, v)?,
        })
    }

    /// The K scale.
    pub fn k(&self) -> f32 {
        self.k
    }

    /// The V scale.
    pub fn v(&self) -> f32 {
        self.v
    }

    /// Scales that map each tensor's absolute maximum onto the format's largest finite value
    /// (`amax / MAX`), so nothing saturates. An amax below [`MIN_CALIBRATION_AMAX`] (an all-zero
    /// tensor) is raised to it. For the unquantized policy the scales are 1.0.
    pub fn calibrate(k_amax: f32, v_amax: f32, policy: QuantPolicy) -> Result<Self> {
        for (side, a) in [(KvSide::K, k_amax), (KvSide::V, v_amax)] {
            if !a.is_finite() || a < 0.0 {
                return Err(Fp8KvError::InvalidAmax { side, value: a });
            }
        }
        match policy.fp8_max() {
            None => Ok(KvScales::default()),
            Some(max) => KvScales::new(
                k_amax.max(MIN_CALIBRATION_AMAX) / max,
                v_amax.max(MIN_CALIBRATION_AMAX) / max,
            ),
        }
    }
}
