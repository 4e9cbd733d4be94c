//! A strided `[rows, heads, dim]` tensor gathered into contiguous rows, reading only the
//! elements the shape addresses. The Burn adapter uses it for activations whose heads are not
//! packed (Burn pads each innermost row to a pitch): CubeCL's own `into_contiguous` reads the
//! unwritten padding at the buffer's end (its checked read clamps an index past the end to the
//! last element and discards the value), which compute-sanitizer's initcheck reports.

use cubecl::prelude::*;

use crate::device::{storage_type, DeviceRows};
use crate::error::{check_limit, Fp8KvError, Result};
use crate::kernels::array_len;
use crate::policy::Dtype;

const THREADS: u32 = 256;

/// `dst[(t · heads + h) · dim + i] = src[t · s0 + h · s1 + i · s2]` for every element.
///
/// Grid `(ceil(total / 256), 1, 1)`, cube `(256, 1, 1)`, one element per thread.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gather_kernel<F: Float>(
    src: &Array<F>,
    dst: &mut Array<F>,
    total: u32,
    heads: u32,
    dim: u32,
    s0: u32,
    s1: u32,
    s2: u32,
    #[define(F)] _dtype: StorageType,
) {
    let idx = CUBE_POS_X * THREADS + UNIT_POS_X;
    if idx < total {
        let i = idx % dim;
        let h = (idx / dim) % heads;
        let t = idx / (dim * heads);
        dst[idx as usize] = src[(t * s0 + h * s1 + i * s2) as usize];
    }
}

/// The `[shape[0], shape[1], shape[2]]` tensor of `dtype` at element `strides` in `src` as new
/// contiguous rows of `shape[1] · shape[2]` elements.
///
/// Errors: [`Fp8KvError::ShapeMismatch`] when the strides address past the buffer,
/// [`Fp8KvError::TooLarge`] past 32-bit indices, [`Fp8KvError::UnsupportedDtype`].
pub fn gather_rows<R: Runtime>(
    client: &ComputeClient<R>,
    src: cubecl::server::Handle,
    dtype: Dtype,
    shape: [usize; 3],
    strides: [usize; 3],
) -> Result<DeviceRows<R>> {
    let [n, heads, dim] = shape;
    let total = n * heads * dim;
    let out = DeviceRows::empty(client, dtype, n, heads * dim, heads * dim)?;
    if total == 0 {
        return Ok(out);
    }
    let es = dtype.size_bytes();
    let last = (n - 1) * strides[0] + (heads - 1) * strides[1] + (dim - 1) * strides[2];
    let have = array_len(&src, es);
    if last >= have {
        return Err(Fp8KvError::ShapeMismatch {
            what: "strided activation",
            expected: format!("a buffer of more than {last} elements for {shape:?} at {strides:?}"),
            actual: format!("{have} elements"),
        });
    }
    let why = "the kernels' 32-bit indices";
    check_limit("strided activation", have, u32::MAX as usize - 1, why)?;
    check_limit("gathered rows", total, u32::MAX as usize - 1, why)?;
    // SAFETY: every index the kernel reads is at most `last`, below the buffer's length
    // (checked above), and it writes `idx < total`, the rows allocated just above; all below
    // `u32::MAX`.
    unsafe {
        gather_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(total.div_ceil(THREADS as usize) as u32, 1, 1),
            CubeDim::new_1d(THREADS),
            ArrayArg::from_raw_parts(src, have),
            ArrayArg::from_raw_parts(out.handle().clone(), total),
            total as u32,
            heads as u32,
            dim as u32,
            strides[0] as u32,
            strides[1] as u32,
            strides[2] as u32,
            storage_type(dtype),
        );
    }
    Ok(out)
}
