//! The software FP8 codec (`fp8kv::fp8`) against an independent
//! implementation: `cubecl::e4m3` / `cubecl::e5m2`, which wrap the `float8`
//! crate, a port of CUDA's `cuda_fp8.hpp` software conversion with
//! `__NV_SATFINITE`.
//!
//! What `float8` 0.7 does (read from its source, checked here): f32 → f64 →
//! FP8, round-to-nearest-even, saturating beyond max and for ±inf (despite
//! the "±∞ will result" in its doc comments), NaN → `sign | 0x7F` for E4M3 and
//! `sign | 0x7E | payload bit 21` for E5M2. So codes must agree bit for bit on
//! every non-NaN f32; on NaN both must give a NaN code of the same sign (and
//! for E4M3 the same code, 0x7F/0xFF being its only NaN codes). Decoding goes
//! through f16 in `float8`, which is exact for both formats; its NaN loses
//! the sign, so only NaN-ness is compared there.

use cubecl::{e4m3, e5m2};
use fp8kv::fp8::*;
use fp8kv::testing::Rng;

/// The reference encoder/decoder for one format, through `float8`.
fn reference_encode(format: Fp8Format, x: f32) -> u8 {
    match format {
        Fp8Format::E4m3 => e4m3::from_f32(x).to_bits(),
        Fp8Format::E5m2 => e5m2::from_f32(x).to_bits(),
    }
}

fn reference_decode(format: Fp8Format, code: u8) -> f32 {
    match format {
        Fp8Format::E4m3 => e4m3::from_bits(code).to_f32(),
        Fp8Format::E5m2 => e5m2::from_bits(code).to_f32(),
    }
}

/// Compares one input; returns a description of the mismatch, if any.
fn check(format: Fp8Format, x: f32) -> Result<(), String> {
    let ours = format.encode(x);
    let theirs = reference_encode(format, x);
    let agree = if x.is_nan() {
        let same_sign = ours & 0x80 == theirs & 0x80;
        let both_nan = format.decode(ours).is_nan() && format.decode(theirs).is_nan();
        same_sign && both_nan && (format == Fp8Format::E5m2 || ours == theirs)
    } else {
        ours == theirs
    };
    if agree {
        Ok(())
    } else {
        Err(format!(
            "{format:?}: x = {x:e} ({:#010x}): ours {ours:#04x}, float8 {theirs:#04x}",
            x.to_bits()
        ))
    }
}

/// Runs `check` on every input, reporting the count and the first few
/// mismatches.
fn check_all(format: Fp8Format, inputs: impl Iterator<Item = f32>) {
    let mut count = 0usize;
    let mut mismatches = Vec::new();
    for x in inputs {
        count += 1;
        if let Err(e) = check(format, x) {
            mismatches.push(e);
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {count} inputs disagree; first: {:#?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(8)]
    );
}

#[test]
fn all_256_codes_decode_like_float8() {
    for format in Fp8Format::ALL {
        for code in 0..=255u8 {
            let ours = format.decode(code);
            let theirs = reference_decode(format, code);
            if theirs.is_nan() {
                assert!(ours.is_nan(), "{format:?} {code:#04x}: ours {ours}");
            } else {
                assert_eq!(
                    ours.to_bits(),
                    theirs.to_bits(),
                    "{format:?} {code:#04x}: ours {ours}, float8 {theirs}"
                );
            }
        }
    }
}

#[test]
fn all_256_decoded_codes_reencode_like_float8() {
    for format in Fp8Format::ALL {
        check_all(format, (0..=255u8).map(|c| format.decode(c)));
    }
}

#[test]
fn midpoints_and_their_neighbours_encode_like_float8() {
    // Ties between adjacent codes (including the one between max and the
    // next, non-existent, binade point) and the f32 values either side.
    for format in Fp8Format::ALL {
        let max_code = format.max_code();
        let ulp_at_max = format.decode(max_code) - format.decode(max_code - 1);
        let mut points: Vec<f64> = (0..max_code)
            .map(|c| (format.decode(c) as f64 + format.decode(c + 1) as f64) / 2.0)
            .collect();
        points.push(format.max_finite() as f64 + 0.5 * ulp_at_max as f64);
        points.push(format.max_finite() as f64 + ulp_at_max as f64);
        let inputs = points.into_iter().flat_map(|m| {
            let m = m as f32;
            let b = m.to_bits();
            [m, f32::from_bits(b - 1), f32::from_bits(b + 1)]
                .into_iter()
                .flat_map(|x| [x, -x])
        });
        check_all(format, inputs);
    }
}

#[test]
fn special_values_encode_like_float8() {
    let specials = [
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001),
        f32::from_bits(0xFFA0_0000),
        448.0,
        464.0,
        57344.0,
        61440.0,
        65536.0,
    ];
    for format in Fp8Format::ALL {
        check_all(format, specials.into_iter());
    }
}

#[test]
fn random_bit_patterns_encode_like_float8() {
    // Uniform over all 2^32 patterns: mostly far outside the FP8 range
    // (saturation and underflow to zero), plus NaNs and infinities.
    for (format, seed) in [(Fp8Format::E4m3, 1u64), (Fp8Format::E5m2, 2)] {
        let mut rng = Rng::new(seed);
        check_all(
            format,
            (0..2_000_000).map(|_| f32::from_bits(rng.next_u64() as u32)),
        );
    }
}

#[test]
fn random_values_in_the_fp8_range_encode_like_float8() {
    // Exponent drawn from the binades that matter (two below the smallest
    // subnormal up to two above max), random sign and mantissa.
    for (format, seed, lo, hi) in [
        (Fp8Format::E4m3, 3u64, -11i32, 10i32),
        (Fp8Format::E5m2, 4, -18, 17),
    ] {
        let span = (hi - lo + 1) as u64;
        let mut rng = Rng::new(seed);
        check_all(
            format,
            (0..2_000_000).map(|_| {
                let r = rng.next_u64();
                let exp = (127 + lo + (r % span) as i32) as u32;
                let sign = ((r >> 63) as u32) << 31;
                f32::from_bits(sign | (exp << 23) | ((r >> 16) as u32 & 0x007F_FFFF))
            }),
        );
    }
}

#[test]
fn beyond_max_saturates_instead_of_nan() {
    // Also confirms the reference saturates, so the random comparisons
    // above cover the saturating region too.
    for format in Fp8Format::ALL {
        for x in [format.max_finite() * 1.5, 1.0e20, f32::INFINITY] {
            assert_eq!(format.encode(x), format.max_code());
            assert_eq!(format.encode(-x), 0x80 | format.max_code());
            assert_eq!(reference_encode(format, x), format.max_code());
        }
    }
}
