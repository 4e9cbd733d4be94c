//! The decode problem: what a caller asks for ([`DecodeOptions`]: the attention options, an
//! optional forced routine, the split choice), the device-free shape that decides which
//! routine applies ([`DecodeShape`]), and the validated problem of one launch
//! ([`DecodeProblem`]). `split` has the split plan, the workspace and the partial-state merge.

pub(crate) mod split;

use cubecl::Runtime;

use crate::contract::AttentionOptions;
use crate::device::{DeviceBatch, PagedKvCache};
use crate::error::{Fp8KvError, KvSide, Result};
use crate::kernels::CacheGeometry;
use crate::policy::Dtype;

/// The split kernels of paged decode, by name. [`DecodeOptions::strategy`] forces one;
/// without it the launcher takes the one measured fastest for the shape class (the table is
/// in ARCHITECTURE.md; [`super::auto_strategy`] answers it for a shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeStrategy {
    /// The CUDA-core kernel: every head dim, query dtype and option.
    CudaCores,
    /// The tensor-core kernel, query-major (`S = Q·K^T`): K and V head dims equal and 64 or
    /// 128 with any cache and query dtype, or 256 with an FP8 cache, a bf16/f16 query and at
    /// most 8 query rows per KV head.
    TensorCores,
    /// The same tensor-core kernel with the QK transposed as well (`S^T = K·Q^T`: keys fill the
    /// MMA's M, each tile of 8 query rows its N): wherever [`DecodeStrategy::TensorCores`]
    /// applies.
    KeyMajor,
    /// The wide-head tensor-core kernel for MLA's K 576 / V 512 (the K dims spread over four
    /// warps): an FP8, f16 or bf16 cache and a query the MMA type holds in one part (bf16, or
    /// f16 with an FP8 or f16 cache).
    Wide,
}

impl DecodeStrategy {
    /// A short name for tables and messages (`cuda-cores`, `tensor-cores`, `key-major`,
    /// `wide`).
    pub fn name(self) -> &'static str {
        match self {
            DecodeStrategy::CudaCores => "cuda-cores",
            DecodeStrategy::TensorCores => "tensor-cores",
            DecodeStrategy::KeyMajor => "key-major",
            DecodeStrategy::Wide => "wide",
        }
    }

    /// Whether this kernel can run a launch of `shape` (with default attention options: the
    /// options never decide applicability). False for a group of 0, which no launch accepts.
    pub fn applies(self, shape: &DecodeShape) -> bool {
        shape.group > 0
            && super::routines::config_for(self, &shape.probe(true), &Default::default()).is_some()
    }
}

impl std::fmt::Display for DecodeStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the cache of every sequence is cut into splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitChoice {
    /// Plan from the problem and the device's SM count (`SplitPlan::new`).
    #[default]
    Auto,
    /// Force slices of this many cache tokens (rounded up to whole tiles; tests use it to
    /// force many splits on short sequences).
    Tokens(usize),
}

/// Where the splits' partial states are merged into the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CombineChoice {
    /// The launcher's choice: in the split kernel where the tensor-core kernels (default or
    /// key-major layout) run a plan of at most 16 splits (measured faster there), the combine
    /// kernel beyond (measured faster at 64 splits of a single sequence) and for the wide
    /// (MLA) and CUDA-core kernels (the wide kernel's merge measured 1.5× slower; the CUDA-core
    /// kernel's not measured).
    #[default]
    Auto,
    /// In the split kernel: the last cube of each (sequence, KV head, row block) to finish
    /// merges (one launch). [`Fp8KvError::InvalidOption`] for a plan of more than 64 splits.
    InKernel,
    /// A second launch, the combine kernel, merges.
    Separate,
}

/// Everything [`super::paged_decode`] takes besides the tensors.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DecodeOptions {
    /// The attention options (softmax scale, softcap, window, sinks, ALiBi).
    pub attention: AttentionOptions,
    /// A forced split kernel; `None` (the default) takes the one measured fastest for the
    /// shape class. A forced kernel that does not apply is [`Fp8KvError::InvalidOption`], not
    /// a fallback.
    pub strategy: Option<DecodeStrategy>,
    /// How the cache is cut into splits.
    pub split: SplitChoice,
    /// Where the splits are merged.
    pub combine: CombineChoice,
}

impl DecodeOptions {
    /// These attention options, the kernel and the splits chosen automatically.
    pub fn new(attention: AttentionOptions) -> Self {
        DecodeOptions {
            attention,
            ..Default::default()
        }
    }
    /// The same with a forced split kernel.
    pub fn with_strategy(mut self, strategy: DecodeStrategy) -> Self {
        self.strategy = Some(strategy);
        self
    }
    /// The same with a split choice.
    pub fn with_split(mut self, split: SplitChoice) -> Self {
        self.split = split;
        self
    }
    /// The same with a combine choice.
    pub fn with_combine(mut self, combine: CombineChoice) -> Self {
        self.combine = combine;
        self
    }
}

impl From<AttentionOptions> for DecodeOptions {
    fn from(attention: AttentionOptions) -> Self {
        DecodeOptions::new(attention)
    }
}

/// What decides which split kernels can run a launch, without a device: the cache and query
/// dtypes, the head dims, query heads per KV head and the most new tokens of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeShape {
    /// Cache element dtype.
    pub cache: Dtype,
    /// Query (and output) dtype.
    pub query: Dtype,
    /// K head dim.
    pub head_dim_k: usize,
    /// V head dim.
    pub head_dim_v: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// Most new tokens of one sequence.
    pub max_q_len: usize,
}

impl DecodeShape {
    /// A problem of this shape for the applicability predicates, which do not depend on the
    /// page size, the KV head count, the layout or the lengths.
    pub(crate) fn probe(&self, mma: bool) -> DecodeProblem {
        let geom = |d: usize| CacheGeometry {
            page_size: 16,
            num_kv_heads: 1,
            head_dim: d as u32,
            bhsd: false,
        };
        DecodeProblem {
            cache: self.cache,
            act: self.query,
            k: geom(self.head_dim_k),
            v: geom(self.head_dim_v),
            num_heads: self.group,
            num_tokens: self.max_q_len,
            batch: 1,
            max_q_len: self.max_q_len,
            max_kv_len: 1,
            sm_count: DEFAULT_SM_COUNT,
            mma,
        }
    }
}

/// SM count assumed when the runtime does not report one (an H100 SXM's).
pub(crate) const DEFAULT_SM_COUNT: usize = 132;

/// One launch's validated problem: the inputs' shape and two facts of the device. Everything
/// the plan decides comes from this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DecodeProblem {
    /// Cache element dtype.
    pub cache: Dtype,
    /// Query (and output) dtype.
    pub act: Dtype,
    /// K cache geometry.
    pub k: CacheGeometry,
    /// V cache geometry.
    pub v: CacheGeometry,
    /// Query heads.
    pub num_heads: usize,
    /// Packed new tokens (query rows).
    pub num_tokens: usize,
    /// Sequences.
    pub batch: usize,
    /// Most new tokens of one sequence.
    pub max_q_len: usize,
    /// Longest cached sequence.
    pub max_kv_len: usize,
    /// SMs the split planner fills.
    pub sm_count: usize,
    /// Whether the device has the MMA the tensor-core kernels emit for this cache.
    pub mma: bool,
}

impl DecodeProblem {
    /// Validates everything about a launch except the query and output buffers: the batch
    /// against the cache's layout, the head ratio, the options, a batch built for decode, the
    /// query dtype, CUDA's grid limits and the caches' 32-bit indexing.
    ///
    /// Errors: [`Fp8KvError::HeadRatio`], [`Fp8KvError::UnsupportedDtype`],
    /// [`Fp8KvError::InvalidOption`], [`Fp8KvError::TooLarge`] and the batch's layout error.
    pub(crate) fn new<R: Runtime>(
        cache: &PagedKvCache<R>,
        batch: &DeviceBatch<R>,
        act: Dtype,
        num_heads: usize,
        opts: &AttentionOptions,
    ) -> Result<Self> {
        let layout = *cache.layout();
        batch.check_layout(&layout)?;
        let kv_heads = layout.num_kv_heads();
        if num_heads == 0 || !num_heads.is_multiple_of(kv_heads) {
            return Err(Fp8KvError::HeadRatio {
                num_heads,
                num_kv_heads: kv_heads,
            });
        }
        opts.validate(num_heads)?;
        let num_tokens = batch.num_tokens().ok_or_else(|| {
            Fp8KvError::InvalidOption(
                "decode needs a DeviceBatch built with DeviceBatch::new (its query fields validated), not for_reads".into(),
            )
        })?;
        if !act.is_activation() {
            return Err(Fp8KvError::UnsupportedDtype(format!(
                "decode queries must be f32, f16 or bf16, got {act}"
            )));
        }
        let meta = batch.meta();
        // CUDA limits grid y and z to 65535: batch is grid y of both kernels, the longest query
        // grid z of the combine.
        crate::kernels::check_grid_batch(meta.batch())?;
        crate::error::check_limit(
            "new tokens of one sequence",
            meta.max_q_len(),
            crate::kernels::MAX_GRID_YZ,
            "CUDA's grid z limit: the combine kernel's grid z is the longest query",
        )?;
        let es = cache.dtype().size_bytes();
        for side in [KvSide::K, KvSide::V] {
            check_index(
                if side == KvSide::K {
                    "K cache (in 16-byte vectors)"
                } else {
                    "V cache (in 16-byte vectors)"
                },
                layout.cache_elems(side) * es / 16,
            )?;
        }
        let client = cache.client();
        Ok(DecodeProblem {
            cache: cache.dtype(),
            act,
            k: CacheGeometry::new(&layout, KvSide::K),
            v: CacheGeometry::new(&layout, KvSide::V),
            num_heads,
            num_tokens,
            batch: meta.batch(),
            max_q_len: meta.max_q_len(),
            max_kv_len: meta.max_kv_len(),
            sm_count: client
                .properties()
                .hardware
                .num_streaming_multiprocessors
                .map_or(DEFAULT_SM_COUNT, |n| n as usize),
            mma: super::routines::mma_supported(client, cache.dtype()),
        })
    }

    /// Query heads per KV head.
    pub(crate) fn group(&self) -> usize {
        self.num_heads / self.k.num_kv_heads as usize
    }

    /// Query rows of one KV head in the longest sequence (group × new tokens).
    pub(crate) fn max_rows(&self) -> usize {
        self.group() * self.max_q_len
    }
}

/// The kernels index with `u32`: the caches in vectors or words, the query, workspace and
/// output in elements. [`Fp8KvError::TooLarge`] past that.
pub(crate) fn check_index(what: &'static str, elems: usize) -> Result<()> {
    crate::error::check_limit(
        what,
        elems,
        u32::MAX as usize - 1,
        "the kernels' 32-bit indices",
    )
}
