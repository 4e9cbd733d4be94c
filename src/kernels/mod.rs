//! CubeCL kernels. Each family is split by role (DESIGN.md §2): `mod.rs` is the validated
//! public entry returning `Result`, `launch.rs` (crate-private) assumes valid input and picks
//! cube counts and comptime settings, `kernel.rs` holds only `#[cube]` code.
//!
//! `#[cube]` generates an undocumented `expand` module next to each public function, so the
//! modules holding public `#[cube]` functions allow `missing_docs`; their items are documented.

#[allow(missing_docs)]
pub(crate) mod codec;
pub mod decode;
pub mod fill;
pub mod flatten;
pub(crate) mod gather;
#[allow(missing_docs)]
pub mod meta;
pub mod stats;

use crate::error::KvSide;
use crate::layout::{KvLayoutKind, PagedKvLayout};

/// Comptime device twin of one cache tensor (K or V) of a [`PagedKvLayout`]: the kernels take
/// this instead of loose stride arguments, and every stride below is a compile-time constant
/// of the generated kernel. `num_pages` is not part of it (runtime: only buffer lengths).
///
/// Comptime (part of the JIT key): page size, KV heads, head dim, Bshd/Bhsd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CacheGeometry {
    /// Tokens per page.
    pub page_size: u32,
    /// KV heads.
    pub num_kv_heads: u32,
    /// Elements per head vector.
    pub head_dim: u32,
    /// `[num_pages, num_kv_heads, page_size, head_dim]` instead of Bshd.
    pub bhsd: bool,
}

impl CacheGeometry {
    /// The geometry of one side of `layout`.
    pub fn new(layout: &PagedKvLayout, side: KvSide) -> Self {
        CacheGeometry {
            page_size: layout.page_size() as u32,
            num_kv_heads: layout.num_kv_heads() as u32,
            head_dim: layout.head_dim(side) as u32,
            bhsd: layout.kind() == KvLayoutKind::Bhsd,
        }
    }
    /// The host layout's strides for this geometry ([`crate::layout::cache_tensor_layout`]).
    const fn strides(&self) -> crate::layout::CacheTensorLayout {
        let kind = if self.bhsd {
            KvLayoutKind::Bhsd
        } else {
            KvLayoutKind::Bshd
        };
        crate::layout::cache_tensor_layout(
            kind,
            self.page_size as usize,
            self.num_kv_heads as usize,
            self.head_dim as usize,
        )
    }
    /// Elements between pages.
    pub const fn page_stride(&self) -> u32 {
        self.strides().page_stride as u32
    }
    /// Elements between slots (tokens) of a page.
    pub const fn slot_stride(&self) -> u32 {
        self.strides().slot_stride as u32
    }
    /// Elements between heads.
    pub const fn head_stride(&self) -> u32 {
        self.strides().head_stride as u32
    }
}

/// Elements per vector access for a tensor of `elem_bytes`-byte elements whose rows are
/// `row_stride` elements apart and whose head vectors are `head_dim` long: the widest of
/// 16/8/4/2/1-byte accesses that divides both (and the buffer offset, checked by callers).
pub(crate) fn vector_elems(elem_bytes: usize, dims: &[usize]) -> usize {
    let mut n = 16 / elem_bytes;
    while n > 1 && dims.iter().any(|&d| !d.is_multiple_of(n)) {
        n /= 2;
    }
    n
}

/// [`vector_elems`] narrowed further until every buffer's byte offset (a slice of a fused QKV
/// output, say) is aligned to one access too: the access width of a kernel's activations.
pub fn access_elems(
    elem_bytes: usize,
    dims: &[usize],
    handles: &[&cubecl::server::Handle],
) -> usize {
    let mut n = vector_elems(elem_bytes, dims);
    for h in handles {
        let offset = h.offset_start.unwrap_or(0) as usize;
        while n > 1 && !offset.is_multiple_of(n * elem_bytes) {
            n /= 2;
        }
    }
    n
}

/// Whole vectors of `vec_bytes` in a buffer (offsets accounted for).
///
/// Note: `ArrayArg::from_raw_parts` wants the length in *scalar* elements (CubeCL divides it
/// by the vector size for `len()`); pass [`array_len`] there. Kernels launched unchecked that
/// never call `len()` are unaffected either way.
pub(crate) fn handle_vec_len(handle: &cubecl::server::Handle, vec_bytes: usize) -> usize {
    handle.size_in_used() as usize / vec_bytes
}

/// The length `ArrayArg::from_raw_parts` expects for a buffer of `elem_bytes`-byte scalars
/// (offsets accounted for), whatever the kernel's vector size: CubeCL divides it by the vector
/// size to get the array's `len()`.
pub fn array_len(handle: &cubecl::server::Handle, elem_bytes: usize) -> usize {
    handle.size_in_used() as usize / elem_bytes
}

/// Per-family overrides of the streaming launch shape, set by [`override_copy_shape`].
pub(crate) static COPY_OVERRIDES: std::sync::Mutex<Vec<(&'static str, CopyShape)>> =
    std::sync::Mutex::new(Vec::new());

/// `(threads per cube, vectors per thread, rounds)` of a streaming launch.
pub(crate) type CopyShape = (u32, u32, u32);

/// `(threads per cube, vectors per thread, rounds)` of a kernel family's bandwidth path: the
/// defaults, unless a tuning run overrode them.
pub(crate) fn tuning(family: &'static str, default: (u32, u32, u32)) -> (u32, u32, u32) {
    let map = COPY_OVERRIDES.lock().unwrap_or_else(|e| e.into_inner());
    map.iter()
        .find(|(f, _)| *f == family)
        .map_or(default, |&(_, shape)| shape)
}

/// The kernels index buffers in 32-bit vector units; a buffer of more vectors than that is
/// refused with [`crate::Fp8KvError::TooLarge`] (a cache for all layers of a big model should
/// be split per layer).
pub(crate) fn check_u32_vectors(
    what: &'static str,
    elems: usize,
    vec: usize,
) -> crate::error::Result<()> {
    crate::error::check_limit(
        what,
        elems / vec,
        u32::MAX as usize,
        "the kernels' 32-bit vector indices",
    )
}

/// CUDA's limit on a grid's y and z dimensions. Every launch puts the batch on grid y, and
/// decode's combine the longest query on grid z.
pub(crate) const MAX_GRID_YZ: usize = 65535;

/// [`crate::Fp8KvError::TooLarge`] for a batch past [`MAX_GRID_YZ`] sequences.
pub(crate) fn check_grid_batch(batch: usize) -> crate::error::Result<()> {
    crate::error::check_limit(
        "batch (sequences)",
        batch,
        MAX_GRID_YZ,
        "CUDA's grid y limit: one row of cubes per sequence",
    )
}

/// Vectors below which a fill or flatten launch gives each thread one vector: decode-sized
/// steps want many small cubes, big steps several loads in flight per thread.
pub(crate) const COPY_UNROLL_THRESHOLD_VECS: usize = 4096;

/// `(threads, unroll, rounds)` of a fill or flatten launch over `items` vectors: `big` (or its
/// override, see [`tuning`]) from [`COPY_UNROLL_THRESHOLD_VECS`] on, else
/// one vector per thread in a cube of a power of two between 32 and `big`'s threads.
pub(crate) fn copy_cube_shape(
    family: &'static str,
    items: usize,
    big: (u32, u32, u32),
) -> (u32, u32, u32) {
    if items >= COPY_UNROLL_THRESHOLD_VECS {
        tuning(family, big)
    } else {
        let threads = items.next_power_of_two().clamp(32, big.0 as usize);
        (threads as u32, 1, 1)
    }
}

/// [`check_u32_vectors`] for a fill or flatten launch: both caches of `layout` and the two row
/// buffers (`rows`: name and length in elements) as vectors of `vec` elements.
pub(crate) fn check_copy_vectors(
    layout: &crate::layout::PagedKvLayout,
    vec: usize,
    rows: [(&'static str, usize); 2],
) -> crate::error::Result<()> {
    check_u32_vectors("k cache", layout.cache_elems(KvSide::K), vec)?;
    check_u32_vectors("v cache", layout.cache_elems(KvSide::V), vec)?;
    for (what, elems) in rows {
        check_u32_vectors(what, elems, vec)?;
    }
    Ok(())
}
