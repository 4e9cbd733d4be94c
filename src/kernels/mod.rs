//! CubeCL kernels. Each family is split by role (DESIGN.md §2): `mod.rs` is the validated
//! public entry returning `Result`, `launch.rs` (crate-private) assumes valid input and picks
//! cube counts and comptime settings, `kernel.rs` holds only `#[cube]` code.
//!
//! `#[cube]` generates an undocumented `expand` module next to each public function, so the
//! modules holding public `#[cube]` functions allow `missing_docs`; their items are documented.

#[allow(missing_docs)]
#[cfg(feature = "internals")]
pub mod codec;
#[cfg(not(feature = "internals"))]
pub(crate) mod codec;
pub mod decode;
pub mod fill;
pub mod flatten;
pub(crate) mod gather;
pub(crate) mod meta;
pub mod stats;

use crate::error::KvSide;
use crate::layout::{KvLayoutKind, PagedKvLayout};
#[cfg(feature = "internals")]
use crate::policy::{Dtype, QuantPolicy};

/// Comptime device twin of one cache tensor (K or V) of a [`PagedKvLayout`]: the kernels take
/// this instead of loose stride arguments, and every stride below is a compile-time constant
/// of the generated kernel. `num_pages` is not part of it (runtime: only buffer lengths).
///
/// Comptime (part of the JIT key): page size, KV heads, head dim, Bshd/Bhsd.
#[cfg_attr(feature = "internals", visibility::make(pub))]
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
pub(crate) fn access_elems(
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
pub(crate) fn array_len(handle: &cubecl::server::Handle, elem_bytes: usize) -> usize {
    handle.size_in_used() as usize / elem_bytes
}

/// `(threads per cube, vectors per thread, rounds)` of a kernel family's bandwidth path: the
/// defaults, unless the environment variables `FP8KV_<FAMILY>_THREADS` / `_UNROLL` / `_ROUNDS`
/// (read once per process) override them. The override exists for tuning runs on a device, so
/// that one benchmark binary can try several shapes.
pub(crate) fn tuning(family: &'static str, default: (u32, u32, u32)) -> (u32, u32, u32) {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Shapes = HashMap<&'static str, (u32, u32, u32)>;
    static CACHE: OnceLock<Mutex<Shapes>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    *map.entry(family).or_insert_with(|| {
        let read = |what: &str, d: u32| {
            std::env::var(format!("FP8KV_{family}_{what}"))
                .ok()
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|&v| v > 0)
                .unwrap_or(d)
        };
        (
            read("THREADS", default.0).min(1024),
            read("UNROLL", default.1).min(16),
            read("ROUNDS", default.2).min(16),
        )
    })
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
/// `FP8KV_<FAMILY>_*` overrides, see [`tuning`]) from [`COPY_UNROLL_THRESHOLD_VECS`] on, else
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

/// Every cache kind the kernels serve: both FP8 formats and the unquantized cache in both half
/// types (the codegen sample hooks walk it).
#[cfg(feature = "internals")]
pub(crate) const CACHE_KINDS: [(QuantPolicy, Dtype); 4] = [
    (QuantPolicy::Fp8E4m3, Dtype::E4m3),
    (QuantPolicy::Fp8E5m2, Dtype::E5m2),
    (QuantPolicy::None, Dtype::F16),
    (QuantPolicy::None, Dtype::Bf16),
];

/// The activation dtypes the kernels take.
#[cfg(feature = "internals")]
pub(crate) const ACT_DTYPES: [Dtype; 3] = [Dtype::F16, Dtype::Bf16, Dtype::F32];

/// One tiny launch the codegen hooks make: a cache kind, an activation dtype and a layout.
#[cfg(feature = "internals")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct CodegenSample {
    /// Cache layout (4 pages of 16 tokens, 2 KV heads).
    pub layout: PagedKvLayout,
    /// Quant policy.
    pub policy: QuantPolicy,
    /// Cache element.
    pub cache: Dtype,
    /// Activation dtype (fill input, flatten output).
    pub act: Dtype,
}

/// The instantiations worth compiling offline for a streaming kernel: every head-dim pair
/// (e4m3, bf16), every (cache, activation) pair at head dim 128, and the Bhsd layout.
#[cfg(feature = "internals")]
pub(crate) fn codegen_samples() -> crate::Result<Vec<CodegenSample>> {
    use crate::layout::SUPPORTED_HEAD_DIMS;
    let e4m3 = (QuantPolicy::Fp8E4m3, Dtype::E4m3);
    let mut combos = Vec::new();
    for (dk, dv) in SUPPORTED_HEAD_DIMS {
        combos.push((dk, dv, e4m3, Dtype::Bf16, KvLayoutKind::Bshd));
    }
    for kind in CACHE_KINDS {
        for act in ACT_DTYPES {
            combos.push((128, 128, kind, act, KvLayoutKind::Bshd));
        }
    }
    combos.push((128, 128, e4m3, Dtype::Bf16, KvLayoutKind::Bhsd));
    combos
        .into_iter()
        .map(|(dk, dv, (policy, cache), act, kind)| {
            Ok(CodegenSample {
                layout: PagedKvLayout::new(4, 16, 2, dk, dv, kind)?,
                policy,
                cache,
                act,
            })
        })
        .collect()
}

/// The Llama-like sample (head dim 128, e4m3 cache, bf16 activations, Bshd) that the hooks
/// also launch with their extra settings.
#[cfg(feature = "internals")]
pub(crate) fn codegen_llama(samples: &[CodegenSample]) -> CodegenSample {
    samples
        .iter()
        .copied()
        .find(|s| s.layout.head_dim_k() == 128)
        .expect("the head-dim list includes 128")
}

/// Batch metadata valid for every [`CodegenSample`] layout: 4 packed new tokens.
#[cfg(feature = "internals")]
pub(crate) fn codegen_batch() -> crate::Result<crate::layout::BatchMetadata> {
    crate::layout::BatchMetadata::new(vec![0, 3], vec![3, 1], vec![20, 1], vec![0, 1, 2, -1], 2)
}
