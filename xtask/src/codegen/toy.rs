//! A toy FP8 quantize kernel that proves the offline codegen path before (and independently
//! of) the library's kernel families: generic over the activation float `F` and the cache
//! element `Q`, both bound at launch from `StorageType`s through `#[define(F, Q)]`.

use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;

/// E4M3's largest finite value; the clamp keeps CubeCL's NOSAT cast from producing NaN.
const E4M3_MAX: f32 = 448.0;

/// Quantizes `input / scale` into `output`. Grid: 1-D over elements, one element per unit.
#[cube(launch_unchecked)]
fn toy_quantize_kernel<F: Float, Q: Float>(
    input: &Array<F>,
    output: &mut Array<Q>,
    scale: f32,
    #[define(F, Q)] _dtypes: [StorageType; 2],
) {
    let i = ABSOLUTE_POS;
    if i < input.len() {
        let x = f32::cast_from(input[i]) / scale;
        output[i] = Q::cast_from(clamp(x, -E4M3_MAX, E4M3_MAX));
    }
}

/// Launches the toy kernel once per (activation, cache) dtype pair on `client`.
pub fn launch_all<R: Runtime>(client: &ComputeClient<R>) -> Result<(), String> {
    let len = 1024usize;
    for f in [FloatKind::F16, FloatKind::BF16, FloatKind::F32] {
        for q in [FloatKind::E4M3, FloatKind::E5M2] {
            let f_ty: StorageType = ElemType::Float(f).into();
            let q_ty: StorageType = ElemType::Float(q).into();
            let input = client.empty(len * f_ty.size());
            let output = client.empty(len * q_ty.size());
            // SAFETY: the kernel guards its one access per unit with `i < input.len()`, and
            // `output` has as many elements as `input`.
            unsafe {
                toy_quantize_kernel::launch_unchecked::<R>(
                    client,
                    CubeCount::Static((len / 256) as u32, 1, 1),
                    CubeDim::new_1d(256),
                    ArrayArg::from_raw_parts(input, len),
                    ArrayArg::from_raw_parts(output, len),
                    1.0,
                    [f_ty, q_ty],
                );
            }
        }
    }
    Ok(())
}
