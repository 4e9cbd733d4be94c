//! The two FP8 formats and a software codec for them, written from the format
//! definitions.
//!
//! This codec is the specification the GPU kernels are tested against: CPU
//! references dequantize through [`decode`](Fp8Format::decode) and quantize
//! through [`encode`](Fp8Format::encode), never through CubeCL's or the
//! `float8` crate's casts. The encoder is written as the same integer
//! algorithm a `#[cube]` encoder uses (see `CUBECL_NOTES.md`), so it doubles
//! as the spec of that kernel code.
//!
//! # Formats (OCP 8-bit Floating Point Specification, OFP8 rev. 1.0)
//!
//! | | E4M3 ("E4M3FN") | E5M2 |
//! |---|---|---|
//! | layout | `s eeee mmm` | `s eeeee mm` |
//! | exponent bias | 7 | 15 |
//! | normal value | `(-1)^s · 2^(e-7) · (1 + m/8)` | `(-1)^s · 2^(e-15) · (1 + m/4)` |
//! | subnormal (`e = 0`) | `(-1)^s · 2^-6 · m/8` = `m · 2^-9` | `(-1)^s · 2^-14 · m/4` = `m · 2^-16` |
//! | max finite | 448 (`0x7E`) | 57344 (`0x7B`) |
//! | infinity | none | `0x7C` / `0xFC` |
//! | NaN | `0x7F` / `0xFF` only | `0x7D..=0x7F` / `0xFD..=0xFF` |
//!
//! E4M3FN gives up infinities so that exponent 15 holds normal numbers
//! (256..448); only the all-ones magnitude `0x7F` is NaN.
//!
//! # Encoding choices (what the KV cache stores)
//!
//! * **Rounding:** round-to-nearest, ties-to-even, from the exact f32 value
//!   (one rounding; no detour through f16, which would round twice).
//! * **Saturation:** every finite value whose magnitude is above the largest
//!   finite FP8 value encodes to `±max` (`0x7E`/`0xFE`, `0x7B`/`0xFB`); this
//!   is the `clamp(x / scale, -MAX, MAX)` of the quantization rule. The cache
//!   never stores an infinity (nor, for E4M3, the NaN an unsaturated cast
//!   gives on overflow), so an outlier costs precision, not the whole
//!   attention row.
//! * **Infinities** saturate the same way: `+inf → 0x7E`/`0x7B`,
//!   `-inf → 0xFE`/`0xFB`.
//! * **NaN** stays NaN and **keeps its sign bit**: E4M3 → `sign | 0x7F`
//!   (`0x7F` or `0xFF`, the only NaN codes, and exactly what CUDA's
//!   `__nv_cvt_float_to_fp8` and the `float8` crate produce); E5M2 →
//!   `sign | 0x7E` (`0x7E`/`0xFE`, the high byte of the canonical f16 quiet
//!   NaN `0x7E00`). CUDA's software path gives E5M2 `sign | 0x7E | payload
//!   bit` (`0x7E` or `0x7F`): it agrees with this codec on the canonical f32
//!   NaN `0x7FC0_0000` and otherwise differs only in which NaN code is used.
//!   The sign is kept because it costs nothing: every input's sign bit is
//!   OR-ed into the code, with no special case.
//! * **Zero:** `+0.0 → 0x00`, `-0.0 → 0x80`; values at or below half the
//!   smallest subnormal round to (signed) zero.

/// The two FP8 formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// E4M3 "FN" (OCP E4M3): 4 exponent bits, bias 7, 3 mantissa bits, no
    /// infinities, max finite 448, NaN only at `0x7F`/`0xFF`, smallest
    /// subnormal 2^-9.
    E4m3,
    /// E5M2 (IEEE-754-like): 5 exponent bits, bias 15, 2 mantissa bits, max
    /// finite 57344, ±inf at `0x7C`/`0xFC`, NaN at `0x7D..=0x7F` and
    /// `0xFD..=0xFF`, smallest subnormal 2^-16.
    E5m2,
}

/// The constants one format's codec needs; everything else follows from them.
#[derive(Clone, Copy)]
struct Params {
    /// Mantissa (trailing significand) bits: 3 or 2.
    mant_bits: u32,
    /// Exponent bias: 7 or 15.
    bias: u32,
    /// Magnitude code of the largest finite value: 0x7E or 0x7B.
    max_code: u8,
    /// Magnitude code written for NaN (the sign bit is OR-ed in).
    nan_code: u8,
    /// Whether the magnitude code just above `max_code` is infinity (E5M2)
    /// rather than NaN (E4M3).
    has_inf: bool,
}

const E4M3: Params = Params {
    mant_bits: 3,
    bias: 7,
    max_code: 0x7E,
    nan_code: 0x7F,
    has_inf: false,
};

const E5M2: Params = Params {
    mant_bits: 2,
    bias: 15,
    max_code: 0x7B,
    nan_code: 0x7E,
    has_inf: true,
};

/// f32 layout: 23 mantissa bits, exponent bias 127.
const F32_MANT_BITS: u32 = 23;
const F32_BIAS: u32 = 127;
const F32_ABS_MASK: u32 = 0x7FFF_FFFF;
const F32_MANT_MASK: u32 = 0x007F_FFFF;
const F32_IMPLICIT_BIT: u32 = 0x0080_0000;
const F32_INF_BITS: u32 = 0x7F80_0000;

/// Shift right by `s` (1 ≤ s ≤ 31) rounding to nearest, ties to even.
///
/// Adding `half - 1` rounds every remainder above one half up and every one
/// below down; adding the kept lsb on top turns the exact half into a round
/// up only when the kept part is odd, which is ties-to-even. `m` must leave
/// room for the additions (callers pass `m < 2^31 - 2^(s-1)`).
#[inline]
const fn rne_shr(m: u32, s: u32) -> u32 {
    (m + ((1 << (s - 1)) - 1) + ((m >> s) & 1)) >> s
}

/// f32 → FP8 code, saturating, round-to-nearest-even. Integer only, and
/// free of data-dependent control flow apart from three selects (normal or
/// subnormal, saturation, NaN), so a `#[cube]` function can mirror it line by
/// line.
#[inline]
const fn encode_with(p: Params, x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs = bits & F32_ABS_MASK;
    let exp = abs >> F32_MANT_BITS;
    // Exponent-field offset between f32 and the FP8 format: 120 for E4M3,
    // 112 for E5M2. An f32 with exponent field `bias_diff + 1` equals the
    // FP8 format's smallest normal, 2^(1 - bias).
    let bias_diff = F32_BIAS - p.bias;
    // Bits dropped when going from 23 to 3 (2) mantissa bits.
    let shift = F32_MANT_BITS - p.mant_bits;

    // Normal FP8 range (|x| ≥ 2^(1-bias)): re-bias the exponent inside the
    // f32 bit pattern. `abs - (bias_diff << 23)` is then the FP8 code
    // `eeee mmm` followed by the 20 (21) mantissa bits that get rounded off;
    // a carry out of the mantissa correctly bumps the exponent.
    //
    // Subnormal FP8 range (|x| < 2^(1-bias)): the code is |x| / 2^-9
    // (2^-16) rounded to nearest even, i.e. the f32 significand `1.mmm…`
    // (implicit bit made explicit) shifted right by one more bit for each
    // binade below the smallest normal. At `exp = bias_diff + 1` both forms
    // give the same number, so a subnormal-range value that rounds up to
    // 2^(1-bias) yields code 0x08 (0x04), the smallest normal: the
    // subnormal→normal carry needs no special case. Shifts ≥ 25 give 0 for
    // any 24-bit significand (that is also where f32 zero and f32 subnormals
    // go), so the shift is clamped to keep it inside a u32.
    let normal = exp > bias_diff;
    let (significand, s) = if normal {
        (abs - (bias_diff << F32_MANT_BITS), shift)
    } else {
        let s = shift + 1 + bias_diff - exp;
        (
            (abs & F32_MANT_MASK) | F32_IMPLICIT_BIT,
            if s < 25 { s } else { 25 },
        )
    };
    let rounded = rne_shr(significand, s);

    // Saturation: codes grow monotonically with |x|, and every code above
    // `max_code` (values that round past the largest finite, and +inf,
    // which lands far above it) is clamped to it. Nothing can round into
    // the NaN/inf codes.
    let max = p.max_code as u32;
    let magnitude = (if rounded < max { rounded } else { max }) as u8;

    // NaN (f32 exponent all ones, mantissa non-zero) → the canonical NaN.
    let magnitude = if abs > F32_INF_BITS {
        p.nan_code
    } else {
        magnitude
    };
    sign | magnitude
}

/// FP8 code → f32, exact (every FP8 value is an f32 value).
#[inline]
fn decode_with(p: Params, code: u8) -> f32 {
    let negative = code & 0x80 != 0;
    let magnitude = code & 0x7F;
    let exp = (magnitude >> p.mant_bits) as u32;
    let mant = (magnitude & ((1 << p.mant_bits) - 1)) as u32;

    let value = if magnitude > p.max_code {
        // Above the largest finite value: E5M2's 0x7C is infinity, the rest
        // (and E4M3's 0x7F) are NaN.
        if p.has_inf && magnitude == p.max_code + 1 {
            f32::INFINITY
        } else {
            f32::NAN
        }
    } else if exp == 0 {
        // Subnormal: m · 2^(1 - bias - mant_bits); the product is exact.
        let min_subnormal_exp = 1 - p.bias as i32 - p.mant_bits as i32;
        mant as f32 * f32::from_bits(((F32_BIAS as i32 + min_subnormal_exp) as u32) << 23)
    } else {
        // Normal: 2^(e - bias) · (1 + m / 2^mant_bits), built as an f32
        // pattern with the exponent re-biased to 127.
        f32::from_bits(
            ((exp + F32_BIAS - p.bias) << F32_MANT_BITS) | (mant << (F32_MANT_BITS - p.mant_bits)),
        )
    };
    if negative {
        -value
    } else {
        value
    }
}

impl Fp8Format {
    /// Both formats, for iteration in tests and tables.
    pub const ALL: [Fp8Format; 2] = [Fp8Format::E4m3, Fp8Format::E5m2];

    const fn params(self) -> Params {
        match self {
            Fp8Format::E4m3 => E4M3,
            Fp8Format::E5m2 => E5M2,
        }
    }

    /// Largest finite value: 448.0 (E4M3) or 57344.0 (E5M2). Quantized
    /// values are clamped to `±max_finite()`.
    pub const fn max_finite(self) -> f32 {
        match self {
            Fp8Format::E4m3 => 448.0,
            Fp8Format::E5m2 => 57344.0,
        }
    }

    /// Code of the positive largest finite value: `0x7E` (E4M3) or `0x7B`
    /// (E5M2); `0x80 | max_code()` is the negative one.
    pub const fn max_code(self) -> u8 {
        self.params().max_code
    }

    /// Magnitude code [`encode`](Self::encode) writes for NaN, before the
    /// input's sign bit is OR-ed in: `0x7F` (E4M3, its only NaN) or `0x7E`
    /// (E5M2, the high byte of f16's canonical quiet NaN).
    pub const fn nan_code(self) -> u8 {
        self.params().nan_code
    }

    /// Mantissa (trailing significand) bits: 3 (E4M3) or 2 (E5M2).
    pub const fn mantissa_bits(self) -> u32 {
        self.params().mant_bits
    }

    /// Exponent bias: 7 (E4M3) or 15 (E5M2).
    pub const fn exponent_bias(self) -> u32 {
        self.params().bias
    }

    /// Encodes `x` as an FP8 code: round-to-nearest-even from the f32 value,
    /// saturating to `±max_code()` for every magnitude (±inf included) beyond
    /// the largest finite value; NaN → `sign | nan_code()`; `-0.0 → 0x80`.
    /// See the [module docs](self) for why.
    pub const fn encode(self, x: f32) -> u8 {
        encode_with(self.params(), x)
    }

    /// Decodes an FP8 code to its exact f32 value. NaN codes give NaN (with
    /// the code's sign), E5M2's `0x7C`/`0xFC` give ±inf.
    pub fn decode(self, code: u8) -> f32 {
        decode_with(self.params(), code)
    }
}

/// [`Fp8Format::E4m3`]`.encode(x)`: saturating, round-to-nearest-even.
pub const fn encode_e4m3(x: f32) -> u8 {
    encode_with(E4M3, x)
}

/// [`Fp8Format::E4m3`]`.decode(c)`: exact; `0x7F`/`0xFF` give NaN.
pub fn decode_e4m3(c: u8) -> f32 {
    decode_with(E4M3, c)
}

/// [`Fp8Format::E5m2`]`.encode(x)`: saturating, round-to-nearest-even.
pub const fn encode_e5m2(x: f32) -> u8 {
    encode_with(E5M2, x)
}

/// [`Fp8Format::E5m2`]`.decode(c)`: exact; `0x7C`/`0xFC` give ±inf, the
/// codes above them NaN.
pub fn decode_e5m2(c: u8) -> f32 {
    decode_with(E5M2, c)
}

/// Quantizes one element for the cache: `encode(x / scale)`, i.e.
/// `cast(clamp(x / scale, -MAX, MAX))` with the clamp done by the saturating
/// encoder.
///
/// `x / scale` is one correctly rounded f32 division. A kernel that multiplies
/// by a precomputed `1 / scale` instead can differ from this in the last bit
/// of the quotient, and so by one code at a rounding tie, unless `scale` is a
/// power of two. `scale` must be finite and > 0 (validated by the caller).
pub fn quant(format: Fp8Format, x: f32, scale: f32) -> u8 {
    format.encode(x / scale)
}

/// Dequantizes one cache element: `decode(code) * scale`, one f32
/// multiplication (exact when `scale` is a power of two and the product
/// stays in range).
pub fn dequant(format: Fp8Format, code: u8, scale: f32) -> f32 {
    format.decode(code) * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    /// What a code means, computed independently of the codec: in f64 from
    /// the sign/exponent/mantissa fields of the OCP definition.
    #[derive(Debug, PartialEq)]
    enum Meaning {
        Finite(f64),
        Inf(bool),
        Nan,
    }

    fn meaning(format: Fp8Format, code: u8) -> Meaning {
        let (e_bits, m_bits, bias) = match format {
            Fp8Format::E4m3 => (4u32, 3u32, 7i32),
            Fp8Format::E5m2 => (5, 2, 15),
        };
        let negative = code >> 7 == 1;
        let e = ((code >> m_bits) & ((1 << e_bits) - 1)) as i32;
        let m = (code & ((1 << m_bits) - 1)) as f64;
        let e_max = (1 << e_bits) - 1;
        let sign = if negative { -1.0 } else { 1.0 };
        let frac = m / f64::from(1u32 << m_bits);
        match format {
            Fp8Format::E4m3 if e == e_max && m == 7.0 => return Meaning::Nan,
            Fp8Format::E5m2 if e == e_max && m == 0.0 => return Meaning::Inf(negative),
            Fp8Format::E5m2 if e == e_max => return Meaning::Nan,
            _ => {}
        }
        if e == 0 {
            Meaning::Finite(sign * 2f64.powi(1 - bias) * frac)
        } else {
            Meaning::Finite(sign * 2f64.powi(e - bias) * (1.0 + frac))
        }
    }

    /// Non-negative finite codes in increasing order of value.
    fn positive_finite_codes(format: Fp8Format) -> impl Iterator<Item = u8> {
        0..=format.max_code()
    }

    #[test]
    fn every_code_decodes_to_its_bit_field_value() {
        for format in Fp8Format::ALL {
            for code in 0..=255u8 {
                let got = format.decode(code);
                match meaning(format, code) {
                    Meaning::Finite(v) => {
                        assert_eq!(got as f64, v, "{format:?} {code:#04x}");
                        assert_eq!(
                            got.is_sign_negative(),
                            code & 0x80 != 0,
                            "{format:?} {code:#04x} sign"
                        );
                    }
                    Meaning::Inf(neg) => {
                        assert!(got.is_infinite(), "{format:?} {code:#04x}");
                        assert_eq!(got.is_sign_negative(), neg, "{format:?} {code:#04x}");
                    }
                    Meaning::Nan => assert!(got.is_nan(), "{format:?} {code:#04x}"),
                }
            }
        }
    }

    #[test]
    fn every_finite_code_reencodes_to_itself() {
        for format in Fp8Format::ALL {
            for code in 0..=255u8 {
                if let Meaning::Finite(_) = meaning(format, code) {
                    assert_eq!(
                        format.encode(format.decode(code)),
                        code,
                        "{format:?} {code:#04x}"
                    );
                }
            }
        }
    }

    #[test]
    fn nan_codes_decode_to_nan_and_e5m2_inf_codes_to_inf() {
        assert!(decode_e4m3(0x7F).is_nan());
        assert!(decode_e4m3(0xFF).is_nan());
        assert_eq!(decode_e4m3(0x7E), 448.0);
        assert_eq!(decode_e4m3(0xFE), -448.0);
        for c in [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF] {
            assert!(decode_e5m2(c).is_nan(), "{c:#04x}");
        }
        assert_eq!(decode_e5m2(0x7C), f32::INFINITY);
        assert_eq!(decode_e5m2(0xFC), f32::NEG_INFINITY);
        assert_eq!(decode_e5m2(0x7B), 57344.0);
    }

    #[test]
    fn format_constants_match_the_decoded_codes() {
        for format in Fp8Format::ALL {
            assert_eq!(format.decode(format.max_code()), format.max_finite());
            assert_eq!(
                format.decode(0x80 | format.max_code()),
                -format.max_finite()
            );
            assert!(format.decode(format.nan_code()).is_nan());
            assert_eq!(
                meaning(format, format.max_code()),
                Meaning::Finite(f64::from(format.max_finite()))
            );
        }
        assert_eq!(
            (
                Fp8Format::E4m3.mantissa_bits(),
                Fp8Format::E4m3.exponent_bias()
            ),
            (3, 7)
        );
        assert_eq!(
            (
                Fp8Format::E5m2.mantissa_bits(),
                Fp8Format::E5m2.exponent_bias()
            ),
            (2, 15)
        );
    }

    #[test]
    fn ties_round_to_even_between_adjacent_codes() {
        for format in Fp8Format::ALL {
            let codes: Vec<u8> = positive_finite_codes(format).collect();
            for pair in codes.windows(2) {
                let (lo, hi) = (pair[0], pair[1]);
                let mid64 = (format.decode(lo) as f64 + format.decode(hi) as f64) / 2.0;
                let mid = mid64 as f32;
                assert_eq!(mid as f64, mid64, "midpoint must be exact in f32");
                // The code's lsb is the mantissa's lsb: even = lsb clear.
                let even = if lo & 1 == 0 { lo } else { hi };
                assert_eq!(
                    format.encode(mid),
                    even,
                    "{format:?} tie {lo:#04x}/{hi:#04x}"
                );
                assert_eq!(format.encode(-mid), 0x80 | even, "{format:?} -tie");
            }
        }
    }

    #[test]
    fn values_beside_a_midpoint_round_to_the_nearer_code() {
        for format in Fp8Format::ALL {
            let codes: Vec<u8> = positive_finite_codes(format).collect();
            for pair in codes.windows(2) {
                let (lo, hi) = (pair[0], pair[1]);
                let mid = ((format.decode(lo) as f64 + format.decode(hi) as f64) / 2.0) as f32;
                let below = f32::from_bits(mid.to_bits() - 1);
                let above = f32::from_bits(mid.to_bits() + 1);
                assert_eq!(format.encode(below), lo, "{format:?} below {lo:#04x}");
                assert_eq!(format.encode(above), hi, "{format:?} above {hi:#04x}");
            }
        }
    }

    #[test]
    fn subnormals_round_to_nearest_even_multiple_of_min_subnormal() {
        for (format, min_sub, n_sub) in [
            (Fp8Format::E4m3, 2f32.powi(-9), 8u8),
            (Fp8Format::E5m2, 2f32.powi(-16), 4u8),
        ] {
            // Subnormal codes are k · min_sub for k < n_sub.
            for k in 0..n_sub {
                assert_eq!(format.encode(k as f32 * min_sub), k);
                assert_eq!(format.decode(k), k as f32 * min_sub);
            }
            // k + 0.25, k + 0.75 go to the nearer multiple.
            for k in 0..n_sub {
                assert_eq!(format.encode((k as f32 + 0.25) * min_sub), k);
                assert_eq!(format.encode((k as f32 + 0.75) * min_sub), k + 1);
            }
            // Half the smallest subnormal is a tie with zero: to even (zero).
            assert_eq!(format.encode(0.5 * min_sub), 0x00);
            assert_eq!(format.encode(-0.5 * min_sub), 0x80);
            let just_above_half = f32::from_bits((0.5 * min_sub).to_bits() + 1);
            assert_eq!(format.encode(just_above_half), 0x01);
            // Far below: zero, including f32 subnormals.
            assert_eq!(format.encode(f32::from_bits(1)), 0x00);
            assert_eq!(format.encode(f32::MIN_POSITIVE), 0x00);
            assert_eq!(format.encode(-f32::MIN_POSITIVE), 0x80);
        }
    }

    #[test]
    fn value_just_below_min_normal_rounds_up_into_normal_range() {
        for (format, min_normal, min_normal_code) in [
            (Fp8Format::E4m3, 2f32.powi(-6), 0x08u8),
            (Fp8Format::E5m2, 2f32.powi(-14), 0x04u8),
        ] {
            assert_eq!(format.decode(min_normal_code), min_normal);
            let below = f32::from_bits(min_normal.to_bits() - 1);
            assert_eq!(format.encode(below), min_normal_code, "{format:?}");
            assert_eq!(format.encode(-below), 0x80 | min_normal_code, "{format:?}");
            // Midpoint between the largest subnormal (odd code) and the
            // smallest normal (even code): the tie goes up.
            let largest_sub = format.decode(min_normal_code - 1);
            let mid = (largest_sub + min_normal) / 2.0;
            assert_eq!(format.encode(mid), min_normal_code, "{format:?}");
            assert_eq!(
                format.encode(f32::from_bits(mid.to_bits() - 1)),
                min_normal_code - 1
            );
        }
    }

    #[test]
    fn max_finite_encodes_to_max_code() {
        for format in Fp8Format::ALL {
            let max = format.max_finite();
            assert_eq!(format.encode(max), format.max_code());
            assert_eq!(format.encode(-max), 0x80 | format.max_code());
            // The value below max rounds to max's neighbour or max.
            let prev = format.decode(format.max_code() - 1);
            assert_eq!(format.encode(prev), format.max_code() - 1);
        }
    }

    #[test]
    fn beyond_max_saturates_instead_of_nan_or_inf() {
        for format in Fp8Format::ALL {
            let max = format.max_finite();
            let max_code = format.max_code();
            // Includes the would-be round-up point of the next binade and
            // the tie above max (max + half ulp), which plain RNE would
            // send to NaN (E4M3 0x7F) or inf (E5M2 0x7C).
            let ulp = format.decode(max_code) - format.decode(max_code - 1);
            for x in [
                f32::from_bits(max.to_bits() + 1),
                max + 0.5 * ulp,
                f32::from_bits((max + 0.5 * ulp).to_bits() + 1),
                max + ulp,
                2.0 * max,
                1.0e30,
                f32::MAX,
            ] {
                assert_eq!(format.encode(x), max_code, "{format:?} {x}");
                assert_eq!(format.encode(-x), 0x80 | max_code, "{format:?} -{x}");
            }
        }
    }

    #[test]
    fn infinities_saturate_to_max_code() {
        for format in Fp8Format::ALL {
            assert_eq!(format.encode(f32::INFINITY), format.max_code());
            assert_eq!(format.encode(f32::NEG_INFINITY), 0x80 | format.max_code());
        }
    }

    #[test]
    fn nan_encodes_to_canonical_nan_with_sign_kept() {
        let nans = [
            f32::NAN,
            f32::from_bits(0x7F80_0001), // signalling, smallest payload
            f32::from_bits(0x7FA0_0000), // payload bit 21 set
            f32::from_bits(0x7FFF_FFFF),
        ];
        for format in Fp8Format::ALL {
            for nan in nans {
                let pos = f32::from_bits(nan.to_bits() & 0x7FFF_FFFF);
                let neg = f32::from_bits(nan.to_bits() | 0x8000_0000);
                assert_eq!(format.encode(pos), format.nan_code(), "{format:?}");
                assert_eq!(format.encode(neg), 0x80 | format.nan_code(), "{format:?}");
                assert!(format.decode(format.encode(pos)).is_nan());
                assert!(format.decode(format.encode(neg)).is_nan());
            }
        }
        assert_eq!(encode_e4m3(f32::NAN), 0x7F);
        assert_eq!(encode_e5m2(f32::NAN), 0x7E);
    }

    #[test]
    fn negative_zero_keeps_its_sign() {
        for format in Fp8Format::ALL {
            assert_eq!(format.encode(0.0), 0x00);
            assert_eq!(format.encode(-0.0), 0x80);
            assert!(format.decode(0x80).is_sign_negative());
            assert_eq!(format.decode(0x80), 0.0);
        }
    }

    #[test]
    fn encode_is_monotone_and_sign_symmetric_over_a_sweep() {
        // Every 997th f32 bit pattern from +0 to +inf, plus the sign-flipped
        // twin. Codes of non-negative values are ordered like the values.
        const STEP: usize = 997;
        for format in Fp8Format::ALL {
            let mut prev = 0u8;
            for bits in (0..=F32_INF_BITS).step_by(STEP) {
                let x = f32::from_bits(bits);
                let c = format.encode(x);
                assert!(c >= prev, "{format:?} not monotone at {x:e}");
                assert!(c <= format.max_code());
                assert_eq!(format.encode(-x), 0x80 | c, "{format:?} sign at {x:e}");
                prev = c;
            }
            assert_eq!(prev, format.max_code());
        }
    }

    #[test]
    fn encode_picks_a_nearest_code() {
        // Random magnitudes spread over [2^-20, 2^17): the decoded code is
        // at least as close to x as either neighbouring code.
        let mut rng = Rng::new(0x5EED_F8F8);
        for format in Fp8Format::ALL {
            for _ in 0..200_000 {
                let r = rng.next_u64();
                let exp = 127 - 20 + (r % 37) as u32;
                let x = f32::from_bits((exp << 23) | ((r >> 8) as u32 & F32_MANT_MASK));
                if x > format.max_finite() {
                    assert_eq!(format.encode(x), format.max_code());
                    continue;
                }
                let c = format.encode(x);
                let err = (x as f64 - format.decode(c) as f64).abs();
                if c > 0 {
                    let lower = (x as f64 - format.decode(c - 1) as f64).abs();
                    assert!(err <= lower, "{format:?} {x:e} -> {c:#04x}");
                }
                if c < format.max_code() {
                    let upper = (x as f64 - format.decode(c + 1) as f64).abs();
                    assert!(err <= upper, "{format:?} {x:e} -> {c:#04x}");
                }
            }
        }
    }

    #[test]
    fn quant_and_dequant_apply_the_scale() {
        for format in Fp8Format::ALL {
            assert_eq!(quant(format, 3.0, 2.0), format.encode(1.5));
            assert_eq!(quant(format, -1.0e9, 0.5), 0x80 | format.max_code());
            assert_eq!(dequant(format, format.encode(1.5), 2.0), 3.0);
            assert_eq!(
                dequant(format, format.max_code(), 0.25),
                format.max_finite() * 0.25
            );
        }
    }
}
