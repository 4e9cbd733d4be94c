//! Statistics of a batch's new K and V rows on the device, for calibration and saturation
//! checks: each side's amax (largest finite magnitude) and how many values the fill kernel
//! would clamp at the cache's current scales. One launch for both sides, accumulated into a
//! 4 KiB device buffer ([`DeviceKvStats`]: 32 copies of four words, so that the warps' atomics
//! spread over 32 addresses) across as many calls (layers, steps) as wanted, read back once.
//!
//! Deterministic: a maximum and an integer count do not depend on the order in which the
//! warps' atomics land. Definitions (the crate's tests hold a CPU copy of them):
//! - amax: the largest `|x|` over the rows, NaN skipped (an infinity counts: it makes
//!   [`KvStats::calibrate`] fail, as it should), 0 for no rows;
//! - saturated: the values with `|x| > MAX · scale`, the product rounded to f32 (NaN is never
//!   counted, ±inf always); 0 for the unquantized policy.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::device::{storage_type, DeviceRows};
use crate::error::{Fp8KvError, Result};
use crate::kernels::decode::common::PLANE_LANES;
use crate::kernels::{access_elems, array_len, check_u32_vectors};
use crate::policy::QuantPolicy;
use crate::scales::KvScales;

/// Threads per cube.
const THREADS: u32 = 256;
/// Vectors per thread (each thread folds them before its warp's reduction and atomics).
const PER_THREAD: u32 = 8;

/// One side of [`kv_stats_kernel`]: folds the thread's vectors, then [`add_side_stats`] adds
/// each warp's result to its copy of `stats[slot]` (amax bits) and `stats[slot + 2]` (count).
#[cube]
#[allow(clippy::too_many_arguments)]
fn side_stats<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    stats: &mut Array<Atomic<u32>>,
    slot: u32,
    rows: u32,
    row_stride: u32,
    limit: f32,
    #[comptime] vec_per_row: u32,
    #[comptime] vec: u32,
) {
    let total = rows * vec_per_row;
    let base = CUBE_POS_X * comptime![THREADS * PER_THREAD] + UNIT_POS;
    let mut amax = 0.0f32;
    let mut count = 0u32;
    #[unroll]
    for u in 0..PER_THREAD {
        let item = base + u * THREADS;
        if item < total {
            let row = item / vec_per_row;
            let v = item % vec_per_row;
            let x = Vector::<f32, N>::cast_from(input[(row * row_stride + v) as usize]);
            let m = vector_amax::<N>(x, vec);
            amax = f32::max(amax, m);
            if m > limit {
                count += vector_count_over::<N>(x, limit, vec);
            }
        }
    }
    add_side_stats(stats, slot, amax, count, THREADS);
}

/// The largest `|x|` of a vector's `vec` values, 0 for none above 0. `max` is CUDA's `fmaxf`:
/// a NaN operand yields the other one, so a NaN is never the result.
#[cube]
pub(crate) fn vector_amax<N: Size>(x: Vector<f32, N>, #[comptime] vec: u32) -> f32 {
    let mut m = 0.0f32;
    #[unroll]
    for i in 0..vec {
        m = f32::max(m, f32::abs(x[i as usize]));
    }
    m
}

/// How many of a vector's `vec` values have `|x| > limit` (a NaN fails the comparison: never
/// counted). Callers run it only where [`vector_amax`] passed the limit, which is rare.
#[cube]
pub(crate) fn vector_count_over<N: Size>(
    x: Vector<f32, N>,
    limit: f32,
    #[comptime] vec: u32,
) -> u32 {
    let mut c = 0u32;
    #[unroll]
    for i in 0..vec {
        c += select(f32::abs(x[i as usize]) > limit, 1u32, 0u32);
    }
    c
}

/// Copies of the four statistics words in a [`DeviceKvStats`] buffer: each warp adds to copy
/// `warp index % STATS_COPIES`, so the atomics of a launch spread over this many
/// addresses instead of queueing on one; [`DeviceKvStats::read`] folds the copies.
pub(crate) const STATS_COPIES: u32 = 32;
/// Words between two copies: 32 `u32`s, one 128-byte L2 line each.
pub(crate) const STATS_COPY_STRIDE: u32 = 32;
/// `u32` words of a [`DeviceKvStats`] buffer.
pub(crate) const STATS_WORDS: usize = (STATS_COPIES * STATS_COPY_STRIDE) as usize;

/// Adds one side's statistics (`slot` 0 = K, 1 = V) of every unit of the cube to `stats`:
/// a warp reduction, then each warp's lane 0 adds the warp's to copy
/// `(CUBE_POS_X · warps + warp) % STATS_COPIES` (word `slot` the amax bits, `slot + 2` the
/// count), skipping an atomic with nothing to add. `threads` is the cube's size, planes are 32
/// lanes; every unit of a plane must call it (plane reductions).
///
/// Per warp and spread, not per cube on one word: same-address atomics serialize in L2 (one
/// per warp on one word cost `fill_with_stats` 1.5× the plain fill on an H200), and a cube
/// reduction costs shared memory and a barrier before the cube can retire.
#[cube]
pub(crate) fn add_side_stats(
    stats: &mut Array<Atomic<u32>>,
    slot: u32,
    amax: f32,
    count: u32,
    #[comptime] threads: u32,
) {
    let warps = comptime![threads.div_ceil(PLANE_LANES)];
    let m = plane_max(amax);
    let c = plane_sum(count);
    if UNIT_POS_PLANE == 0 {
        let warp = UNIT_POS / PLANE_LANES;
        let base = slot + ((CUBE_POS_X * warps + warp) % STATS_COPIES) * STATS_COPY_STRIDE;
        // Non-negative floats order as their bit patterns: an integer max is a float max.
        if m > 0.0 {
            stats[base as usize].fetch_max(u32::reinterpret(m));
        }
        if c > 0 {
            stats[(base + 2) as usize].fetch_add(c);
        }
    }
}

/// Grid `(x: chunks of THREADS * PER_THREAD vectors, 1, z: 0 = K / 1 = V)`, cube
/// `(THREADS, 1, 1)`. `stats` is `[k_amax_bits, v_amax_bits, k_saturated, v_saturated]`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn kv_stats_kernel<F: Float, N: Size>(
    k_new: &Array<Vector<F, N>>,
    v_new: &Array<Vector<F, N>>,
    stats: &mut Array<Atomic<u32>>,
    rows: u32,
    k_row_stride: u32,
    v_row_stride: u32,
    k_limit: f32,
    v_limit: f32,
    #[comptime] k_vec_per_row: u32,
    #[comptime] v_vec_per_row: u32,
    #[comptime] vec: u32,
    #[define(F)] _dtype: StorageType,
) {
    if CUBE_POS_Z == 0 {
        side_stats::<F, N>(
            k_new,
            stats,
            0,
            rows,
            k_row_stride,
            k_limit,
            k_vec_per_row,
            vec,
        );
    } else {
        side_stats::<F, N>(
            v_new,
            stats,
            1,
            rows,
            v_row_stride,
            v_limit,
            v_vec_per_row,
            vec,
        );
    }
}

/// What [`DeviceKvStats::read`] returns: per side, the amax and the saturated count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvStats {
    /// Largest `|x|` of the K rows seen (NaN skipped; 0 if none).
    pub k_amax: f32,
    /// Largest `|x|` of the V rows seen.
    pub v_amax: f32,
    /// K values with `|x| > MAX · k_scale` (what fill clamps).
    pub k_saturated: u32,
    /// V values with `|x| > MAX · v_scale`.
    pub v_saturated: u32,
}

impl KvStats {
    /// Scales that map the amax onto the format's largest value ([`KvScales::calibrate`]).
    ///
    /// Errors: [`Fp8KvError::InvalidAmax`] when an amax is infinite (an infinity was seen).
    pub fn calibrate(&self, policy: QuantPolicy) -> Result<KvScales> {
        KvScales::calibrate(self.k_amax, self.v_amax, policy)
    }
}

/// A device accumulator of [`KvStats`]: 32 copies of four `u32`s (4 KiB) that [`kv_stats`] and
/// [`crate::kernels::fill::fill_with_stats`] update with atomics, each warp on one copy;
/// [`DeviceKvStats::read`] folds them. It must be used with buffers
/// of the client it was made on (not checked: CubeCL 0.10 gives clients no identity).
pub struct DeviceKvStats<R: Runtime> {
    pub(crate) client: ComputeClient<R>,
    pub(crate) handle: Handle,
}

impl<R: Runtime> DeviceKvStats<R> {
    /// A zeroed accumulator.
    pub fn new(client: &ComputeClient<R>) -> Self {
        DeviceKvStats {
            client: client.clone(),
            handle: client.create_from_slice(bytemuck::cast_slice(&[0u32; STATS_WORDS])),
        }
    }

    /// Reads the accumulated statistics (one device → host copy of 4 KiB, folded here; it waits
    /// for the launches before it). Counts are `u32`: read and start a new accumulator before
    /// 2^32 values saturate.
    pub fn read(&self) -> Result<KvStats> {
        let bytes = self
            .client
            .read_one(self.handle.clone())
            .map_err(|e| Fp8KvError::Runtime(format!("read failed: {e:?}")))?;
        let w: Vec<u32> = bytes
            .chunks_exact(4)
            .take(STATS_WORDS)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(fold_copies(&w))
    }
}

/// Folds a [`DeviceKvStats`] buffer's copies: the largest amax bits (non-negative floats
/// order as their bits) and the sum of the counts (wrapping, as the device's atomics do).
fn fold_copies(words: &[u32]) -> KvStats {
    let stride = STATS_COPY_STRIDE as usize;
    let (mut amax, mut sat) = ([0u32; 2], [0u32; 2]);
    for copy in words.chunks(stride).take(STATS_COPIES as usize) {
        for side in 0..2 {
            amax[side] = amax[side].max(copy[side]);
            sat[side] = sat[side].wrapping_add(copy[side + 2]);
        }
    }
    KvStats {
        k_amax: f32::from_bits(amax[0]),
        v_amax: f32::from_bits(amax[1]),
        k_saturated: sat[0],
        v_saturated: sat[1],
    }
}

/// The saturation threshold of one side: `MAX · scale` in f32, or +inf (nothing counts) for
/// the unquantized policy.
pub(crate) fn limit(policy: QuantPolicy, scale: f32) -> f32 {
    match policy.fp8_max() {
        Some(max) => max * scale,
        None => f32::INFINITY,
    }
}

/// Adds the amax and saturated counts of every row of `k_new` / `v_new` (all their rows,
/// as packed for a step; any row stride) to `stats`, saturation judged at `scales` under
/// `policy`. One launch for both sides; nothing is read back.
///
/// Errors: K and V of different dtypes ([`Fp8KvError::UnsupportedDtype`]) or row counts
/// ([`Fp8KvError::ShapeMismatch`]), buffers past 32-bit vector indices or a grid past
/// CUDA's limit ([`Fp8KvError::TooLarge`]).
pub fn kv_stats<R: Runtime>(
    stats: &mut DeviceKvStats<R>,
    k_new: &DeviceRows<R>,
    v_new: &DeviceRows<R>,
    scales: &KvScales,
    policy: QuantPolicy,
) -> Result<()> {
    if k_new.dtype() != v_new.dtype() {
        return Err(Fp8KvError::UnsupportedDtype(format!(
            "k_new is {} but v_new is {}",
            k_new.dtype(),
            v_new.dtype()
        )));
    }
    if k_new.rows() != v_new.rows() {
        return Err(Fp8KvError::ShapeMismatch {
            what: "v_new",
            expected: format!("{} rows, as k_new", k_new.rows()),
            actual: format!("{} rows", v_new.rows()),
        });
    }
    let rows = k_new.rows();
    if rows == 0 {
        return Ok(());
    }
    let act = k_new.dtype();
    let vec = access_elems(
        act.size_bytes(),
        &[
            k_new.row_elems(),
            v_new.row_elems(),
            k_new.row_stride(),
            v_new.row_stride(),
        ],
        &[k_new.handle(), v_new.handle()],
    );
    check_u32_vectors("k_new", k_new.len_elems(), vec)?;
    check_u32_vectors("v_new", v_new.len_elems(), vec)?;
    let (kv, vv) = (k_new.row_elems() / vec, v_new.row_elems() / vec);
    let items = rows * kv.max(vv);
    check_u32_vectors("k_new/v_new items", items, 1)?;
    let cubes = items.div_ceil((THREADS * PER_THREAD) as usize);
    crate::error::check_limit(
        "kv_stats grid",
        cubes,
        i32::MAX as usize,
        "CUDA's grid x limit",
    )?;
    let es = act.size_bytes();
    // SAFETY: `rows` is both inputs' row count and each row `r` is read at vectors
    // `r · row_stride / vec + v` with `v < row_elems / vec`, which `DeviceRows`' constructors
    // keep inside the buffer (they cover `(rows − 1) · row_stride + row_elems` elements);
    // `access_elems` made `vec` divide both row widths, strides and buffer offsets; every index
    // fits in 32 bits (`check_u32_vectors` above); `stats` holds the `STATS_WORDS` `u32`s
    // the kernel addresses (`copy · STATS_COPY_STRIDE + slot`, copy < `STATS_COPIES`, slot ≤ 3).
    unsafe {
        kv_stats_kernel::launch_unchecked::<R>(
            &stats.client,
            CubeCount::Static(cubes as u32, 1, 2),
            CubeDim::new_1d(THREADS),
            vec,
            ArrayArg::from_raw_parts(k_new.handle().clone(), array_len(k_new.handle(), es)),
            ArrayArg::from_raw_parts(v_new.handle().clone(), array_len(v_new.handle(), es)),
            ArrayArg::from_raw_parts(stats.handle.clone(), STATS_WORDS),
            rows as u32,
            (k_new.row_stride() / vec) as u32,
            (v_new.row_stride() / vec) as u32,
            limit(policy, scales.k()),
            limit(policy, scales.v()),
            kv as u32,
            vv as u32,
            vec as u32,
            storage_type(act),
        );
    }
    Ok(())
}

/// The CPU definition of [`kv_stats`] over f32 rows (`rows` rows of `row_elems` values,
/// `row_stride` apart, for each side): the ground truth of its GPU test (a test helper: slices
/// shorter than the shapes say panic; the Burn extension's NdArray backend passes whole rows).
#[allow(clippy::too_many_arguments)]
pub fn reference_stats(
    k: &[f32],
    v: &[f32],
    rows: usize,
    k_row: (usize, usize),
    v_row: (usize, usize),
    scales: &KvScales,
    policy: QuantPolicy,
) -> KvStats {
    let side = |data: &[f32], (elems, stride): (usize, usize), scale: f32| {
        let lim = limit(policy, scale);
        let (mut amax, mut count) = (0f32, 0u32);
        for r in 0..rows {
            for &x in &data[r * stride..][..elems] {
                let a = x.abs();
                if a > amax {
                    amax = a;
                }
                if a > lim {
                    count += 1;
                }
            }
        }
        (amax, count)
    };
    let (k_amax, k_saturated) = side(k, k_row, scales.k());
    let (v_amax, v_saturated) = side(v, v_row, scales.v());
    KvStats {
        k_amax,
        v_amax,
        k_saturated,
        v_saturated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device spreads its atomics over the copies; reading must take the largest amax and
    /// the sum of the counts across all of them, and ignore the padding between copies.
    #[test]
    fn read_folds_every_copy() {
        let stride = STATS_COPY_STRIDE as usize;
        let mut w = vec![0u32; STATS_WORDS];
        // Copy 0: K amax 1.5, V amax 0.25, counts 3 and 1.
        w[0] = 1.5f32.to_bits();
        w[1] = 0.25f32.to_bits();
        w[2] = 3;
        w[3] = 1;
        // The last copy holds the largest K amax; a middle one the largest V amax.
        let last = (STATS_COPIES as usize - 1) * stride;
        w[last] = 7.0f32.to_bits();
        w[last + 2] = 10;
        w[5 * stride + 1] = 2.0f32.to_bits();
        // Wraps with copy 0's 1, as the device's atomicAdd does.
        w[5 * stride + 3] = u32::MAX;
        // Padding words are never written by the kernels; a stray value there must not count.
        w[4] = 99;
        let s = fold_copies(&w);
        assert_eq!(s.k_amax, 7.0);
        assert_eq!(s.v_amax, 2.0);
        assert_eq!(s.k_saturated, 13);
        assert_eq!(s.v_saturated, 0);
    }
}
