//! The GPU FP8 codec against the software codec (`fp8kv::fp8`): every one of the 256 codes
//! decoded by the device's FP8 → f32 conversion, and over a million f32 values (ties,
//! subnormals, ±max, beyond max, ±inf, NaN mixed in) encoded by the `#[cube]` integer
//! encoder that fill uses, must agree bit for bit. Also reports how CubeCL's own cast (after a
//! clamp to ±MAX) compares, since DESIGN.md §3.7 asks for it.

use cubecl::prelude::*;
use cubecl::server::Handle;
use fp8kv::fp8::Fp8Format;
use fp8kv::internals::{
    fp8_encode, fp8_quantize, fp8_quantize_vector, ScaleDiv, FAST_DIV_SCALE_RANGE,
};
use fp8kv::testing::Rng;

/// Encodes each input with the integer encoder. Grid 1-d over `input.len()`.
#[cube(launch_unchecked)]
fn encode_kernel(input: &Array<f32>, out: &mut Array<u32>, #[comptime] format: Fp8Format) {
    let i = ABSOLUTE_POS;
    if i < input.len() {
        out[i] = fp8_encode(input[i], format);
    }
}

/// Quantizes `input[i]` with `scales[i]` exactly as fill does. Grid 1-d over `input.len()`.
#[cube(launch_unchecked)]
fn quantize_kernel(
    input: &Array<f32>,
    scales: &Array<f32>,
    inv_scales: &Array<f32>,
    out: &mut Array<u32>,
    #[comptime] format: Fp8Format,
    #[comptime] div: ScaleDiv,
) {
    let i = ABSOLUTE_POS;
    if i < input.len() {
        out[i] = fp8_quantize(input[i], scales[i], inv_scales[i], format, div);
    }
}

/// Quantizes vectors of `input` with one scale as fill does (the hardware's saturating
/// convert after the exact division). `Q` is the FP8 type.
#[cube(launch_unchecked)]
fn quantize_vector_kernel<Q: Float, N: Size>(
    input: &Array<Vector<f32, N>>,
    out: &mut Array<Vector<u8, N>>,
    scale: f32,
    inv_scale: f32,
    #[comptime] div: ScaleDiv,
    #[comptime] vec: u32,
    #[define(Q)] _q: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i < input.len() {
        out[i] = fp8_quantize_vector::<Q, N>(input[i], scale, inv_scale, div, vec);
    }
}

/// Encodes each input with CubeCL's cast after a clamp to ±MAX. `Q` is the FP8 type.
#[cube(launch_unchecked)]
fn cast_kernel<Q: Float>(
    input: &Array<f32>,
    out: &mut Array<u32>,
    max: f32,
    #[define(Q)] _q: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i < input.len() {
        let x = clamp(input[i], -max, max);
        out[i] = u32::cast_from(u8::reinterpret(Q::cast_from(x)));
    }
}

/// Decodes each code (one per u32) through the device's FP8 → f32 conversion.
#[cube(launch_unchecked)]
fn decode_kernel<Q: Float>(codes: &Array<u32>, out: &mut Array<f32>, #[define(Q)] _q: StorageType) {
    let i = ABSOLUTE_POS;
    if i < codes.len() {
        out[i] = f32::cast_from(Q::reinterpret(u8::cast_from(codes[i])));
    }
}

fn storage(format: Fp8Format) -> StorageType {
    fp8kv::device::storage_type(match format {
        Fp8Format::E4m3 => fp8kv::Dtype::E4m3,
        Fp8Format::E5m2 => fp8kv::Dtype::E5m2,
    })
}

fn cube_count(n: usize) -> CubeCount {
    CubeCount::Static((n as u32).div_ceil(256), 1, 1)
}

/// Inputs: every interesting value of the format (codes, midpoints and their neighbours,
/// beyond max, inf, NaN, f32 subnormals), then random bit patterns and random magnitudes
/// around the FP8 range, to at least `n` values.
fn inputs(format: Fp8Format, n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n + 4096);
    let max_code = format.max_code();
    for code in 0..=max_code {
        let x = format.decode(code);
        v.extend([
            x,
            -x,
            f32::from_bits(x.to_bits() + 1),
            f32::from_bits(x.to_bits().saturating_sub(1)),
        ]);
        if code < max_code {
            let mid = ((x as f64 + format.decode(code + 1) as f64) / 2.0) as f32;
            for m in [
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits() - 1),
            ] {
                v.extend([m, -m]);
            }
        }
    }
    let max = format.max_finite();
    v.extend([
        max * 1.0001,
        max * 2.0,
        1e30,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001),
        f32::from_bits(0xFFC0_1234),
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        0.0,
        -0.0,
    ]);
    let mut rng = Rng::new(0xF8_C0DEC ^ max_code as u64);
    while v.len() < n {
        let r = rng.next_u64();
        let x = match r % 4 {
            // any bit pattern (NaNs, infinities, f32 subnormals included)
            0 => f32::from_bits((r >> 32) as u32),
            // magnitudes from 2^-30 to 2^20: the FP8 range and a margin
            _ => {
                let exp = 97 + ((r >> 8) % 50) as u32;
                let bits =
                    (exp << 23) | ((r >> 32) as u32 & 0x7F_FFFF) | (((r >> 7) & 1) as u32) << 31;
                f32::from_bits(bits)
            }
        };
        v.push(x);
    }
    v
}

/// A code mismatch: (index, x, gpu code, cpu code).
type CodeMismatch = (usize, f32, u32, u8);

/// Runs `launch(client, input, out, n)` on [`inputs`] for `format` (f32 in, one u32 code out
/// per value) and compares every code with the software codec's; NaN inputs are skipped when
/// `skip_nan`. Returns the value count, the mismatch count and the first mismatch.
fn codes_against_codec(
    client: &ComputeClient<Cuda>,
    format: Fp8Format,
    skip_nan: bool,
    launch: impl FnOnce(&ComputeClient<Cuda>, &Handle, &Handle, usize),
) -> (usize, usize, Option<CodeMismatch>) {
    let xs = inputs(format, 1 << 20);
    let n = xs.len();
    let input = client.create_from_slice(bytemuck::cast_slice(&xs));
    let out = client.empty(n * 4);
    launch(client, &input, &out, n);
    let got: Vec<u32> = bytemuck::cast_slice(&client.read_one(out).unwrap()).to_vec();
    let mut mismatches = 0usize;
    let mut first = None;
    for (i, (&x, &g)) in xs.iter().zip(&got).enumerate() {
        if skip_nan && x.is_nan() {
            continue;
        }
        let want = format.encode(x);
        if g != want as u32 {
            mismatches += 1;
            first.get_or_insert((i, x, g, want));
        }
    }
    (n, mismatches, first)
}

#[test]
fn gpu_encoder_matches_software_codec_on_a_million_values() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_encoder_matches_software_codec_on_a_million_values")
    else {
        return;
    };
    for format in Fp8Format::ALL {
        let (n, mismatches, first) =
            codes_against_codec(&client, format, false, |client, input, out, n| unsafe {
                encode_kernel::launch_unchecked::<Cuda>(
                    client,
                    cube_count(n),
                    CubeDim::new_1d(256),
                    ArrayArg::from_raw_parts(input.clone(), n),
                    ArrayArg::from_raw_parts(out.clone(), n),
                    format,
                );
            });
        println!("{format:?}: {n} values encoded on the GPU, {mismatches} mismatches");
        assert_eq!(
            mismatches, 0,
            "{format:?}: {mismatches}/{n} mismatches; first (index, x, gpu, cpu): {first:?}"
        );
    }
}

#[test]
fn gpu_decode_of_all_256_codes_matches_software_codec() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_decode_of_all_256_codes_matches_software_codec")
    else {
        return;
    };
    for format in Fp8Format::ALL {
        let codes: Vec<u32> = (0..256).collect();
        let input = client.create_from_slice(bytemuck::cast_slice(&codes));
        let out = client.empty(256 * 4);
        unsafe {
            decode_kernel::launch_unchecked::<Cuda>(
                &client,
                cube_count(256),
                CubeDim::new_1d(256),
                ArrayArg::from_raw_parts(input.clone(), 256),
                ArrayArg::from_raw_parts(out.clone(), 256),
                storage(format),
            );
        }
        let got: Vec<f32> = bytemuck::cast_slice(&client.read_one(out).unwrap()).to_vec();
        let bad: Vec<(u32, f32, f32)> = codes
            .iter()
            .zip(&got)
            .map(|(&c, &g)| (c, g, format.decode(c as u8)))
            // NaN codes: NaN-ness must agree (the payload the hardware writes is its own).
            .filter(|&(_, g, w)| {
                if w.is_nan() {
                    !g.is_nan()
                } else {
                    g.to_bits() != w.to_bits()
                }
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{format:?}: {} of 256 codes decode differently; first (code, gpu, cpu): {:?}",
            bad.len(),
            bad.first()
        );
    }
}

#[test]
fn clamped_cubecl_cast_matches_software_codec_on_non_nan() {
    let Some(client) =
        fp8kv::testing::client_or_skip("clamped_cubecl_cast_matches_software_codec_on_non_nan")
    else {
        return;
    };
    for format in Fp8Format::ALL {
        // NaN never reaches the cast as NaN: the device's clamp (fmin/fmax) maps it to a
        // bound. Only non-NaN inputs say something about the cast itself.
        let (n, mismatches, first) =
            codes_against_codec(&client, format, true, |client, input, out, n| unsafe {
                cast_kernel::launch_unchecked::<Cuda>(
                    client,
                    cube_count(n),
                    CubeDim::new_1d(256),
                    ArrayArg::from_raw_parts(input.clone(), n),
                    ArrayArg::from_raw_parts(out.clone(), n),
                    format.max_finite(),
                    storage(format),
                );
            });
        println!("{format:?}: clamped CubeCL cast, {n} values (NaN inputs skipped), {mismatches} mismatches");
        assert_eq!(
            mismatches, 0,
            "{format:?}: {mismatches}/{n}; first (index, x, gpu, cpu): {first:?}"
        );
    }
}

use fp8kv::device::Cuda;

/// A mismatch: (index, x, scale, gpu code, cpu code).
type Mismatch = (usize, f32, f32, u32, u32);

/// Scales: log-uniform over `[lo, hi]`, typical calibrated ones, and powers of two (which
/// make exact ties after the division).
fn scales_for(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let (llo, lhi) = ((lo as f64).log2(), (hi as f64).log2());
    (0..n)
        .map(|i| match i % 4 {
            0 | 1 => 2f64.powf(llo + (lhi - llo) * rng.uniform()) as f32,
            2 => (1e-4 + 10.0 * rng.uniform()) as f32,
            _ => 2f32.powi(rng.below(41) as i32 - 20),
        })
        .collect()
}

fn quantize_on_gpu(
    client: &ComputeClient<Cuda>,
    format: Fp8Format,
    div: ScaleDiv,
    xs: &[f32],
    scales: &[f32],
) -> (usize, Option<Mismatch>) {
    let n = xs.len();
    let invs: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
    let input = client.create_from_slice(bytemuck::cast_slice(xs));
    let sc = client.create_from_slice(bytemuck::cast_slice(scales));
    let inv = client.create_from_slice(bytemuck::cast_slice(&invs));
    let out = client.empty(n * 4);
    unsafe {
        quantize_kernel::launch_unchecked::<Cuda>(
            client,
            cube_count(n),
            CubeDim::new_1d(256),
            ArrayArg::from_raw_parts(input, n),
            ArrayArg::from_raw_parts(sc, n),
            ArrayArg::from_raw_parts(inv, n),
            ArrayArg::from_raw_parts(out.clone(), n),
            format,
            div,
        );
    }
    let got: Vec<u32> = bytemuck::cast_slice(&client.read_one(out).unwrap()).to_vec();
    let dtype = match format {
        Fp8Format::E4m3 => fp8kv::Dtype::E4m3,
        Fp8Format::E5m2 => fp8kv::Dtype::E5m2,
    };
    let mut mismatches = 0;
    let mut first = None;
    for i in 0..n {
        let want = fp8kv::reference::quantize_value(dtype, xs[i], scales[i]);
        if got[i] != want {
            mismatches += 1;
            first.get_or_insert((i, xs[i], scales[i], got[i], want));
        }
    }
    (mismatches, first)
}

#[test]
fn gpu_quantize_matches_reference_division_for_random_scales() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_quantize_matches_reference_division_for_random_scales")
    else {
        return;
    };
    for format in Fp8Format::ALL {
        let mut rng = Rng::new(0x5CA1E ^ format.max_code() as u64);
        let mut xs = inputs(format, 1 << 21);
        rng.shuffle(&mut xs);
        // Markstein over its whole validity range, powers of two over theirs, and the IEEE
        // division over every valid scale (f32 subnormal scales and f32::MAX included).
        let (lo, hi) = FAST_DIV_SCALE_RANGE;
        let pow2: Vec<f32> = (0..xs.len())
            .map(|_| 2f32.powi(rng.below(253) as i32 - 126))
            .collect();
        for div in [ScaleDiv::Markstein, ScaleDiv::PowerOfTwo, ScaleDiv::Ieee] {
            let scales = match div {
                ScaleDiv::Markstein => scales_for(&mut rng, xs.len(), lo, hi),
                ScaleDiv::PowerOfTwo => pow2.clone(),
                ScaleDiv::Ieee => scales_for(&mut rng, xs.len(), f32::from_bits(1), f32::MAX),
            };
            if div != ScaleDiv::Ieee {
                assert!(scales
                    .iter()
                    .all(|&s| ScaleDiv::for_scale(s) == div || div == ScaleDiv::Markstein));
            }
            let (mismatches, first) = quantize_on_gpu(&client, format, div, &xs, &scales);
            println!("{format:?} {div:?}: {} (x, scale) pairs quantized on the GPU, {mismatches} mismatches", xs.len());
            assert_eq!(mismatches, 0, "{format:?} {div:?}: {mismatches} mismatches; first (index, x, scale, gpu, cpu): {first:?}");
        }
    }
}

#[test]
fn gpu_hardware_convert_matches_reference_quantization() {
    let Some(client) =
        fp8kv::testing::client_or_skip("gpu_hardware_convert_matches_reference_quantization")
    else {
        return;
    };
    const VEC: usize = 4;
    for format in Fp8Format::ALL {
        let mut xs = inputs(format, 1 << 20);
        xs.truncate(xs.len() / VEC * VEC);
        let n = xs.len();
        let dtype = match format {
            Fp8Format::E4m3 => fp8kv::Dtype::E4m3,
            Fp8Format::E5m2 => fp8kv::Dtype::E5m2,
        };
        // One scale per launch, as fill has: each division mode, ties after the division
        // (powers of two), calibrated-looking scales, and the default 1.0.
        for scale in [1.0f32, 0.0625, 4.0, 0.0173, 3.7, 1e-30, 3e25] {
            let div = ScaleDiv::for_scale(scale);
            let input = client.create_from_slice(bytemuck::cast_slice(&xs));
            let out = client.empty(n);
            unsafe {
                quantize_vector_kernel::launch_unchecked::<Cuda>(
                    &client,
                    cube_count(n / VEC),
                    CubeDim::new_1d(256),
                    VEC,
                    // Arrays of launch-sized vectors take their length in elements.
                    ArrayArg::from_raw_parts(input, n),
                    ArrayArg::from_raw_parts(out.clone(), n),
                    scale,
                    1.0 / scale,
                    div,
                    VEC as u32,
                    storage(format),
                );
            }
            let got = client.read_one(out).unwrap();
            let mut mismatches = 0;
            let mut first = None;
            // NaN inputs must give a NaN code; which one is the convert's (the fill docs
            // promise a NaN, not its bits). Every other input, the reference's code exactly.
            let mut nan_codes = std::collections::BTreeMap::<(bool, u8), usize>::new();
            for (i, (&x, &g)) in xs.iter().zip(got.iter()).enumerate() {
                let want = fp8kv::reference::quantize_value(dtype, x, scale);
                let ok = if x.is_nan() {
                    *nan_codes.entry((x.is_sign_negative(), g)).or_default() += 1;
                    format.decode(g).is_nan()
                } else {
                    g as u32 == want
                };
                if !ok {
                    mismatches += 1;
                    first.get_or_insert((i, x, g, want));
                }
            }
            let nan_codes: Vec<String> = nan_codes
                .iter()
                .map(|((neg, code), count)| {
                    format!("{}NaN→{code:#04x} ×{count}", if *neg { "-" } else { "+" })
                })
                .collect();
            println!("{format:?} scale {scale} ({div:?}): {n} values through the hardware convert, {mismatches} mismatches; NaN codes: {}", nan_codes.join(", "));
            assert_eq!(
                mismatches, 0,
                "{format:?} scale {scale}: {mismatches}/{n}; first (index, x, gpu, cpu): {first:?}"
            );
        }
    }
}
