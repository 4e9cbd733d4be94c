//! FP8 encoding inside `#[cube]` code, shared by fill and any kernel that writes FP8.
//!
//! - [`fp8_quantize_vector`], what fill runs: the exact division by the scale, then CubeCL's
//!   cast made saturating by [`satfinite_casts`], so that it is the hardware's
//!   `cvt.rn.satfinite` convert (two values an instruction), the sign carried on the quotient.
//! - [`fp8_encode`] / [`fp8_quantize`]: an integer round-to-nearest-even, saturating encoder,
//!   the device twin of [`crate::fp8`]'s software codec and the spec the hardware path is
//!   tested against (`tests/gpu_codec.rs`). Branch-free: two candidate codes and three selects.
//!
//! Why not CubeCL's cast as it stands: cubecl-cpp 0.10 emits `__nv_cvt_float_to_fp8(x,
//! __NV_NOSAT, ..)`, which gives NaN (E4M3) or inf (E5M2) beyond the largest finite value and
//! takes a slow software path inside `cuda_fp8.hpp` (CUBECL_NOTES.md measured 0.95 TB/s
//! against 1.6+ TB/s for the integer encoder).
//!
//! Decoding needs no twin: `f32::cast_from(Q::reinterpret(code))` is exact on sm_89+.

use cubecl::prelude::*;

use crate::fp8::Fp8Format;

/// `2^23` as f32: adding it to a value in `[0, 2^23)` rounds that value to an integer (the
/// ulp at `2^23` is 1) with the FPU's round-to-nearest-even; the integer is then the low bits.
const TWO_POW_23: f32 = 8_388_608.0;
/// Bit pattern of [`TWO_POW_23`].
const TWO_POW_23_BITS: u32 = 0x4B00_0000;

/// Encodes an f32 as an FP8 code of `format` (returned in the low 8 bits of a `u32`), bit for
/// bit what [`Fp8Format::encode`] returns: round to nearest even from the exact f32 value,
/// every magnitude beyond the largest finite value (±inf included) saturates to `±max`, NaN
/// becomes `sign | nan_code`, the sign is kept (`-0.0 → 0x80`).
#[cube]
pub fn fp8_encode(x: f32, #[comptime] format: Fp8Format) -> u32 {
    let bits = u32::reinterpret(x);
    let abs = bits & 0x7FFF_FFFF;
    let code = encode_magnitude(abs, format);
    let code = select(abs > 0x7F80_0000, comptime![format.nan_code() as u32], code);
    ((bits >> 24) & 0x80) | code
}

/// The magnitude code (0..=max_code) of a non-negative, non-NaN f32 given by its bits.
///
/// - Normal FP8 range: re-bias the exponent inside the f32 pattern (`abs - (bias_diff << 23)`),
///   then drop `23 - mant_bits` bits with RNE: `(m + half - 1 + lsb) >> shift` — the same
///   integer formula as `fp8.rs`. A mantissa carry bumps the exponent, as it should.
/// - Subnormal FP8 range (`|x| < 2^(1 - bias)`): the code is `|x| / min_subnormal` rounded to
///   nearest even: `bits(|x| * 2^(bias - 1 + mant_bits) + 2^23) - bits(2^23)`. The product is
///   exact (a power-of-two scaling of a small value), so a fused multiply-add gives the same
///   result; a value that rounds up to the smallest normal yields its code (8 or 4).
/// - Saturation is a `min` with the max code: codes grow with the value and +inf lands far
///   above it.
#[cube]
pub fn encode_magnitude(abs: u32, #[comptime] format: Fp8Format) -> u32 {
    let mant_bits = format.mantissa_bits();
    let bias = format.exponent_bias();
    let bias_diff = 127 - bias;
    let shift = 23 - mant_bits;
    let half_minus_one = (1u32 << (shift - 1)) - 1;
    let rebias = bias_diff << 23;
    // Smallest f32 pattern of the normal FP8 range: exponent field bias_diff + 1.
    let min_normal_bits = (bias_diff + 1) << 23;
    // 1 / min_subnormal = 2^(bias - 1 + mant_bits): 512 (E4M3) or 65536 (E5M2), a literal.
    let sub_scale = comptime![(1u64 << (bias - 1 + mant_bits)) as f32];
    let max_code = format.max_code() as u32;

    // Wraps around for abs below the normal range; that candidate is then not selected.
    let m = abs - rebias;
    let normal = (m + half_minus_one + ((m >> shift) & 1)) >> shift;
    let normal = min(normal, max_code);

    let subnormal =
        u32::reinterpret(f32::reinterpret(abs) * sub_scale + TWO_POW_23) - TWO_POW_23_BITS;
    select(abs >= min_normal_bits, normal, subnormal)
}

/// How [`fp8_quantize()`] divides by the scale; every mode gives the correctly rounded
/// `|x| / scale`, bit for bit the CPU's division. Chosen per scale on the host
/// ([`ScaleDiv::for_scale`]) and compiled in (comptime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleDiv {
    /// CUDA's `/` on f32 (`div.rn.f32`, a subroutine of a dozen instructions); any scale.
    Ieee,
    /// Markstein's sequence with the host-computed `inv = RN(1 / scale)`: `q0 = |x| · inv`,
    /// `r = fma(-q0, scale, |x|)` (exact), `q = fma(r, inv, q0)` = `RN(|x| / scale)`
    /// (P. Markstein, "Computation of elementary functions on the IBM RISC System/6000
    /// processor", IBM J. R&D 1990) as long as the residual does not underflow, which holds
    /// for scales in [`FAST_DIV_SCALE_RANGE`]. `q0` is capped at 2^64 (everything that large
    /// saturates anyway) so an overflow cannot become `inf - inf = NaN`.
    Markstein,
    /// The scale is a power of two whose inverse is a normal f32: `|x| · inv` is the same real
    /// number as `|x| / scale`, so one multiply rounds identically (1.0, the default scale,
    /// is this case).
    PowerOfTwo,
}

impl ScaleDiv {
    /// The cheapest exact mode for `scale` (finite, > 0).
    pub fn for_scale(scale: f32) -> Self {
        let bits = scale.to_bits();
        let exp = (bits >> 23) & 0xFF;
        // 2^k with k in [-126, 126]: normal, and so is 2^-k.
        if bits & 0x7F_FFFF == 0 && (1..=253).contains(&exp) {
            ScaleDiv::PowerOfTwo
        } else if scale >= FAST_DIV_SCALE_RANGE.0 && scale <= FAST_DIV_SCALE_RANGE.1 {
            ScaleDiv::Markstein
        } else {
            ScaleDiv::Ieee
        }
    }
}

/// Quantizes one value for an FP8 cache: `encode(clamp(x / scale, ±MAX))`, matching
/// [`crate::reference::quantize_value`] (one correctly rounded f32 division, then the
/// saturating encoder) bit for bit. `inv_scale` must be `RN(1 / scale)` (used by the
/// [`ScaleDiv::Markstein`] and [`ScaleDiv::PowerOfTwo`] modes). The sign is taken from `x`
/// (`scale > 0`), so `-NaN` keeps its sign as on the CPU (the GPU's division would return the
/// canonical positive NaN).
#[cube]
pub fn fp8_quantize(
    x: f32,
    scale: f32,
    inv_scale: f32,
    #[comptime] format: Fp8Format,
    #[comptime] div: ScaleDiv,
) -> u32 {
    let bits = u32::reinterpret(x);
    let abs = bits & 0x7FFF_FFFF;
    let q = divide(f32::reinterpret(abs), scale, inv_scale, div);
    let code = encode_magnitude(u32::reinterpret(q), format);
    let code = select(abs > 0x7F80_0000, comptime![format.nan_code() as u32], code);
    ((bits >> 24) & 0x80) | code
}

/// `RN(ax / scale)` for `ax ≥ 0` in the [`ScaleDiv`] mode chosen for `scale` (`inv_scale =
/// RN(1 / scale)`).
#[cube]
fn divide(ax: f32, scale: f32, inv_scale: f32, #[comptime] div: ScaleDiv) -> f32 {
    match div {
        ScaleDiv::Ieee => ax / scale,
        ScaleDiv::Markstein => {
            let q0 = min(ax * inv_scale, TWO_POW_64);
            let r = fma(-q0, scale, ax);
            fma(r, inv_scale, q0)
        }
        ScaleDiv::PowerOfTwo => ax * inv_scale,
    }
}

/// [`fp8_quantize()`] of every element of `x`, on the hardware converter: the exact
/// `|x| / scale` of each element with `x`'s sign put back on the quotient, then CubeCL's
/// vector cast to `Q` (an FP8 type), made saturating by [`satfinite_casts()`] so that it
/// compiles to `cvt.rn.satfinite.e4m3x2.f32` / `.e5m2x2` (one instruction per two elements on
/// sm_89+). The convert rounds to nearest even, saturates beyond the largest finite value
/// (±inf included) and keeps the sign, so every non-NaN code is the encoder's bit for bit
/// and no code is touched after the convert (the earlier fix-up, a NaN select and the sign
/// OR'ed byte by byte, was 7.25 of 18.6 SASS instructions an element; now 12.3 in all).
///
/// NaN gives a NaN code of `Q`, the convert's own, not necessarily [`Fp8Format::nan_code()`]
/// with `x`'s sign as the encoder writes it: `gpu_codec` checks every non-NaN code exactly
/// and that every NaN decodes to NaN.
#[cube]
pub fn fp8_quantize_vector<Q: Float, N: Size>(
    x: Vector<f32, N>,
    scale: f32,
    inv_scale: f32,
    #[comptime] div: ScaleDiv,
    #[comptime] vec: u32,
) -> Vector<u8, N> {
    satfinite_casts();
    let mut signed = Vector::<f32, N>::empty();
    #[unroll]
    for i in 0..vec {
        let bits = u32::reinterpret(x[i as usize]);
        let q = divide(f32::reinterpret(bits & 0x7FFF_FFFF), scale, inv_scale, div);
        signed[i as usize] = f32::reinterpret(u32::reinterpret(q) | (bits & 0x8000_0000u32));
    }
    Vector::<u8, N>::reinterpret(Vector::<Q, N>::cast_from(signed))
}

/// Makes every float → FP8 cast after this point of the kernel's CUDA source saturating.
/// cubecl-cpp 0.10 writes those casts as `__nv_cvt_*_to_fp8*(v, __NV_NOSAT, ..)`, which
/// `cuda_fp8.hpp` runs as a software routine (NaN beyond the range); with `__NV_SATFINITE`
/// it issues the hardware convert. The CUDA source is the only place to say so: a comment
/// that closes itself, defines the one name for the rest of this kernel (each kernel is its
/// own NVRTC program), and reopens. CubeCL 0.11 emits `__NV_SATFINITE` itself.
#[cube]
pub fn satfinite_casts() {
    comment!("*/\n#define __NV_NOSAT __NV_SATFINITE\n/*");
}

/// `2^64`: quotients above it saturate in every FP8 format.
const TWO_POW_64: f32 = 18_446_744_073_709_551_616.0;

/// Scales for which [`ScaleDiv::Markstein`] is exact: with `scale` and `1 / scale` within
/// `2^±64`, every quotient that can change an FP8 code (`≥ 2^-18`) has a residual far above
/// the f32 underflow threshold.
pub const FAST_DIV_SCALE_RANGE: (f32, f32) = (
    f32::from_bits((127 - 64) << 23),
    f32::from_bits((127 + 64) << 23),
);
