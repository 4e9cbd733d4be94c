//! KV cache quantization policy and element types.

use std::fmt;
use std::str::FromStr;

use crate::error::{Fp8KvError, Result};
use crate::fp8::Fp8Format;

/// Element types that cross the API: activations (`F32`, `F16`, `Bf16`) and cache elements
/// (`F16`, `Bf16` for the unquantized policy, `E4m3`, `E5m2` for FP8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
    /// OCP FP8 E4M3 ("fn": no infinities, max 448).
    E4m3,
    /// OCP FP8 E5M2 (IEEE-like, max 57344).
    E5m2,
}

impl Dtype {
    /// Bytes of one element.
    pub const fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::E4m3 | Dtype::E5m2 => 1,
        }
    }

    /// The FP8 format, for the two FP8 element types.
    pub const fn fp8_format(self) -> Option<Fp8Format> {
        match self {
            Dtype::E4m3 => Some(Fp8Format::E4m3),
            Dtype::E5m2 => Some(Fp8Format::E5m2),
            _ => None,
        }
    }

    /// Whether this type may be used for activations (queries, new K/V, outputs).
    pub const fn is_activation(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::Bf16)
    }

    /// Rounds an f32 to this type and back (saturating for FP8): what a store of `x` keeps.
    pub fn round_trip(self, x: f32) -> f32 {
        self.decode_bits(self.encode_bits(x))
    }

    /// Encodes `x` as this type's bits (little end in the low bits). FP8 saturates; see [`crate::fp8`].
    pub fn encode_bits(self, x: f32) -> u32 {
        match self {
            Dtype::F32 => x.to_bits(),
            Dtype::F16 => half::f16::from_f32(x).to_bits() as u32,
            Dtype::Bf16 => half::bf16::from_f32(x).to_bits() as u32,
            Dtype::E4m3 => Fp8Format::E4m3.encode(x) as u32,
            Dtype::E5m2 => Fp8Format::E5m2.encode(x) as u32,
        }
    }

    /// Decodes this type's bits to f32 (exact).
    pub fn decode_bits(self, bits: u32) -> f32 {
        match self {
            Dtype::F32 => f32::from_bits(bits),
            Dtype::F16 => half::f16::from_bits(bits as u16).to_f32(),
            Dtype::Bf16 => half::bf16::from_bits(bits as u16).to_f32(),
            Dtype::E4m3 => Fp8Format::E4m3.decode(bits as u8),
            Dtype::E5m2 => Fp8Format::E5m2.decode(bits as u8),
        }
    }

    /// Writes `x` into `dst` (exactly `size_bytes` long) in this type, little-endian.
    pub fn store(self, x: f32, dst: &mut [u8]) {
        let bits = self.encode_bits(x).to_le_bytes();
        dst.copy_from_slice(&bits[..self.size_bytes()]);
    }

    /// Reads one element of this type from `src` (exactly `size_bytes` long).
    pub fn load(self, src: &[u8]) -> f32 {
        let mut b = [0u8; 4];
        b[..self.size_bytes()].copy_from_slice(src);
        self.decode_bits(u32::from_le_bytes(b))
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::E4m3 => "e4m3",
            Dtype::E5m2 => "e5m2",
        })
    }
}

/// How the KV cache stores K and V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QuantPolicy {
    /// Unquantized: the cache holds the activation dtype (f16 or bf16).
    #[default]
    None,
    /// FP8 E4M3 with one scalar scale per tensor (vLLM `fp8`/`fp8_e4m3`, LMDeploy `16`).
    Fp8E4m3,
    /// FP8 E5M2 with one scalar scale per tensor (vLLM `fp8_e5m2`, LMDeploy `17`).
    Fp8E5m2,
}

/// The spellings [`QuantPolicy::from_str`] accepts, for error messages and docs.
pub const VALID_POLICIES: &str =
    "none | auto | 0 (unquantized); fp8 | fp8_e4m3 | 16 (E4M3); fp8_e5m2 | 17 (E5M2); `-` may replace `_`, case-insensitive";

impl QuantPolicy {
    /// Every policy, for tests and tables.
    pub const ALL: [QuantPolicy; 3] = [
        QuantPolicy::None,
        QuantPolicy::Fp8E4m3,
        QuantPolicy::Fp8E5m2,
    ];

    /// The FP8 format, or `None` for the unquantized policy.
    pub const fn fp8_format(self) -> Option<Fp8Format> {
        match self {
            QuantPolicy::None => None,
            QuantPolicy::Fp8E4m3 => Some(Fp8Format::E4m3),
            QuantPolicy::Fp8E5m2 => Some(Fp8Format::E5m2),
        }
    }

    /// Bytes of one cache element: 1 for FP8, 2 for the unquantized (f16/bf16) cache.
    pub const fn cache_elem_bytes(self) -> usize {
        match self {
            QuantPolicy::None => 2,
            _ => 1,
        }
    }

    /// Largest finite value of the FP8 format, or `None` for the unquantized policy.
    pub const fn fp8_max(self) -> Option<f32> {
        match self.fp8_format() {
            Some(f) => Some(f.max_finite()),
            None => None,
        }
    }

    /// The cache element for activations of `act` (f16/bf16/f32 in).
    ///
    /// The unquantized cache stores f16 or bf16; an f32 activation with the `none` policy is
    /// rejected since an f32 cache is not supported.
    pub fn cache_dtype(self, act: Dtype) -> Result<Dtype> {
        if !act.is_activation() {
            return Err(Fp8KvError::UnsupportedDtype(format!(
                "{act} is not an activation dtype (f32, f16, bf16)"
            )));
        }
        Ok(match self {
            QuantPolicy::Fp8E4m3 => Dtype::E4m3,
            QuantPolicy::Fp8E5m2 => Dtype::E5m2,
            QuantPolicy::None if act == Dtype::F32 => {
                return Err(Fp8KvError::UnsupportedDtype(
                    "the unquantized cache holds f16 or bf16; f32 activations need an fp8 policy or a cast".into(),
                ))
            }
            QuantPolicy::None => act,
        })
    }

    /// The policy a cache of `cache` elements stores: FP8 codes for `E4m3` / `E5m2`, values
    /// for `F16` / `Bf16` (`none`); [`Fp8KvError::UnsupportedDtype`] for any other type.
    pub fn of_cache_dtype(cache: Dtype) -> Result<QuantPolicy> {
        match cache {
            Dtype::E4m3 => Ok(QuantPolicy::Fp8E4m3),
            Dtype::E5m2 => Ok(QuantPolicy::Fp8E5m2),
            Dtype::F16 | Dtype::Bf16 => Ok(QuantPolicy::None),
            other => Err(Fp8KvError::UnsupportedDtype(format!(
                "{other} is not a cache element (e4m3, e5m2, f16 or bf16)"
            ))),
        }
    }

    /// Checks that `cache` is a valid cache element for this policy.
    pub fn check_cache_dtype(self, cache: Dtype) -> Result<()> {
        let ok = match self {
            QuantPolicy::None => matches!(cache, Dtype::F16 | Dtype::Bf16),
            QuantPolicy::Fp8E4m3 => cache == Dtype::E4m3,
            QuantPolicy::Fp8E5m2 => cache == Dtype::E5m2,
        };
        if ok {
            Ok(())
        } else {
            Err(Fp8KvError::UnsupportedDtype(format!(
                "cache dtype {cache} does not match policy {self}"
            )))
        }
    }
}

impl fmt::Display for QuantPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuantPolicy::None => "none",
            QuantPolicy::Fp8E4m3 => "fp8_e4m3",
            QuantPolicy::Fp8E5m2 => "fp8_e5m2",
        })
    }
}

impl FromStr for QuantPolicy {
    type Err = Fp8KvError;

    /// Accepts the spellings users type in vLLM (`auto`, `fp8`, `fp8_e4m3`, `fp8_e5m2`) and
    /// LMDeploy (`0`, `16`, `17`), case-insensitively, `-` or `_`, surrounding space ignored.
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        match norm.as_str() {
            "none" | "auto" | "0" => Ok(QuantPolicy::None),
            "fp8" | "fp8_e4m3" | "16" => Ok(QuantPolicy::Fp8E4m3),
            "fp8_e5m2" | "17" => Ok(QuantPolicy::Fp8E5m2),
            _ => Err(Fp8KvError::UnknownPolicy {
                input: s.to_string(),
                valid: VALID_POLICIES,
            }),
        }
    }
}
