//! [`KvCache`]: one layer's storage on a Burn backend and its operations, the Burn tensors
//! checked once here for every backend.

use std::fmt::Debug;

use burn_tensor::backend::Backend;
use burn_tensor::ops::FloatTensor;
use burn_tensor::{DType, Int, Tensor, TensorData, TensorPrimitive};

use fp8kv::error::{Fp8KvError, Result};
use fp8kv::kernels::stats::KvStats;
use fp8kv::layout::PagedKvLayout;
use fp8kv::policy::{Dtype, QuantPolicy};
use fp8kv::reference::HostKvCache;
use fp8kv::scales::KvScales;

use fp8kv::rope::QkvHeads;

use crate::{
    activation_dtype, AttentionOptions, CachePrimitive, CacheSpec, FlattenLayout, KvBatch,
    KvCacheConfig, KvCachePrimitive, PagedKvBackend, RopeTableTensor,
};

/// One layer's paged K and V cache on a Burn backend: storage, layout, policy and scales.
///
/// Not `Clone`: the storage has exactly one owner, so fills write in place.
pub struct KvCache<B: PagedKvBackend> {
    spec: CacheSpec,
    device: B::Device,
    // `None` only while `copy_blocks` runs Burn's by-value ops on it (or after a panic there).
    storage: Option<KvCachePrimitive<B>>,
    // Opt-in saturation check on fill, and whether it has warned already (once per cache).
    saturation_check: Option<f64>,
    warned: bool,
}

/// How many of a batch's K and V values an FP8 cache clamps to ±MAX at its current scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Saturation {
    /// K values with `|x / k_scale| > MAX`.
    pub k: u64,
    /// V values with `|x / v_scale| > MAX`.
    pub v: u64,
    /// Values of each side looked at.
    pub per_side: u64,
}

impl Saturation {
    /// The larger side's saturated fraction.
    pub fn fraction(&self) -> f64 {
        self.k.max(self.v) as f64 / self.per_side.max(1) as f64
    }
}

/// `[rows, heads, dim]` float primitives of a K and a V tensor of any rank (a rank other than
/// 3 is viewed as `[dims[0], 1, rest]`), for [`PagedKvBackend::kv_stats`].
fn stats_of<B: PagedKvBackend, const D: usize>(
    k: &Tensor<B, D>,
    v: &Tensor<B, D>,
    scales: KvScales,
    policy: QuantPolicy,
) -> Result<KvStats> {
    let three = |what: &'static str, x: &Tensor<B, D>| -> Result<FloatTensor<B>> {
        activation_dtype(what, x.dtype())?;
        if D == 3 {
            return Ok(x.clone().into_primitive().tensor());
        }
        let dims = x.dims();
        let rows = dims.first().copied().unwrap_or(1);
        let rest = dims.iter().skip(1).product::<usize>();
        Ok(x.clone().reshape([rows, 1, rest]).into_primitive().tensor())
    };
    B::kv_stats(three("k", k)?, three("v", v)?, scales, policy)
}

impl<B: PagedKvBackend> Debug for KvCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("spec", &self.spec)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// Checks one activation tensor `[rows, heads, dim]` against what an operation expects.
fn check_activation(
    what: &'static str,
    dims: &[usize],
    dtype: DType,
    expected: [usize; 3],
    meaning: &'static str,
) -> Result<Dtype> {
    if dims.len() != 3 {
        return Err(Fp8KvError::WrongRank {
            what,
            expected: 3,
            layout: meaning,
            actual: dims.len(),
        });
    }
    if dims != expected {
        return Err(Fp8KvError::ShapeMismatch {
            what,
            expected: format!("{expected:?} {meaning}"),
            actual: format!("{dims:?}"),
        });
    }
    activation_dtype(what, dtype)
}

impl<B: PagedKvBackend> KvCache<B> {
    /// Allocates one layer's cache from `config` (its `num_layers` is ignored) on `device`.
    pub fn new(config: &KvCacheConfig, device: &B::Device) -> Result<Self> {
        let spec = config.spec()?;
        let storage = B::kv_cache_empty(&spec, device)?;
        Ok(KvCache {
            spec,
            device: device.clone(),
            storage: Some(storage),
            saturation_check: None,
            warned: false,
        })
    }

    /// The spec and the storage, for an operation that checked its inputs against this cache
    /// as [`Self::fill`] and [`Self::decode`] do (the model's fused decoder block).
    pub fn parts_mut(&mut self) -> (CacheSpec, &mut KvCachePrimitive<B>) {
        let storage = self
            .storage
            .as_mut()
            .expect("fp8kv: this KvCache lost its storage to a panic inside copy_blocks");
        (self.spec, storage)
    }

    /// Whether the next fill would run the opt-in saturation check (it reads K and V apart).
    pub fn saturation_check_pending(&self) -> bool {
        self.saturation_check.is_some() && !self.warned
    }

    fn storage(&self) -> &KvCachePrimitive<B> {
        self.storage
            .as_ref()
            .expect("fp8kv: this KvCache lost its storage to a panic inside copy_blocks")
    }

    /// The spec (layout, policy, dtype, scales).
    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }
    /// The layout.
    pub fn layout(&self) -> &PagedKvLayout {
        self.spec.layout()
    }
    /// The quantization policy.
    pub fn policy(&self) -> QuantPolicy {
        self.spec.policy()
    }
    /// The cache element type.
    pub fn dtype(&self) -> Dtype {
        self.spec.dtype()
    }
    /// The layer's scales.
    pub fn scales(&self) -> KvScales {
        self.spec.scales()
    }
    /// Replaces the scales (after calibration, or loaded from a checkpoint); codes already
    /// stored are not rescaled.
    pub fn set_scales(&mut self, scales: KvScales) {
        self.spec.set_scales(scales);
    }
    /// The device the storage lives on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }
    /// Bytes of K plus V storage (FP8: 1 byte per element; `none`: 2 on GPU backends).
    pub fn size_bytes(&self) -> usize {
        self.spec.layout().cache_bytes(self.spec.policy())
    }

    /// That `batch` was validated against this cache's layout and lives on its device.
    pub fn check_batch(&self, batch: &KvBatch<B>) -> Result<()> {
        if batch.device != self.device {
            return Err(Fp8KvError::DeviceMismatch {
                what: "batch",
                expected: format!("{:?}", self.device),
                actual: format!("{:?}", batch.device),
            });
        }
        if batch.layout != *self.spec.layout() {
            return Err(Fp8KvError::ShapeMismatch {
                what: "cache layout",
                expected: format!(
                    "the layout the batch was validated against ({:?})",
                    batch.layout
                ),
                actual: format!("{:?}", self.spec.layout()),
            });
        }
        Ok(())
    }

    fn check_device(&self, what: &'static str, device: &B::Device) -> Result<()> {
        if *device != self.device {
            return Err(Fp8KvError::DeviceMismatch {
                what,
                expected: format!("{:?}", self.device),
                actual: format!("{device:?}"),
            });
        }
        Ok(())
    }

    /// Scales that map this batch's K and V amax onto the FP8 format's largest value
    /// ([`KvScales::calibrate`]): the library's statistics kernel ([`PagedKvBackend::kv_stats`],
    /// one launch and one 4 KiB read; deterministic: a max does not depend on the order of
    /// the reduction). Call it on a prefill's K/V, then [`Self::set_scales`]; 1.0 for the
    /// `none` policy.
    pub fn calibrate<const D: usize>(
        &self,
        k: &Tensor<B, D>,
        v: &Tensor<B, D>,
    ) -> Result<KvScales> {
        let policy = self.spec.policy();
        let stats = stats_of(k, v, KvScales::default(), policy)?;
        KvScales::calibrate(stats.k_amax, stats.v_amax, policy)
    }

    /// How many values of `k` / `v` this cache would clamp to ±MAX at its current scales (all
    /// zero for the `none` policy, without a launch): the library's statistics kernel
    /// ([`PagedKvBackend::kv_stats`]), one launch and one 4 KiB read.
    pub fn saturation<const D: usize>(
        &self,
        k: &Tensor<B, D>,
        v: &Tensor<B, D>,
    ) -> Result<Saturation> {
        let per_side = k.dims().iter().product::<usize>() as u64;
        let policy = self.spec.policy();
        if policy.fp8_format().is_none() {
            return Ok(Saturation {
                k: 0,
                v: 0,
                per_side,
            });
        }
        let stats = stats_of(k, v, self.spec.scales(), policy)?;
        Ok(Saturation {
            k: stats.k_saturated.into(),
            v: stats.v_saturated.into(),
            per_side,
        })
    }

    /// Opt-in check on every [`Self::fill`]: counts what saturates ([`Self::saturation`]; a
    /// device sync per fill, so off by default) and, the first time more than `fraction` of a
    /// side's values saturate at the current scales, warns once through the `log` crate
    /// (`log::warn!`, target `fp8kv`: your application's logger shows it) and sets
    /// [`Self::saturation_warned`]. `None` turns it off.
    pub fn set_saturation_check(&mut self, fraction: Option<f64>) {
        self.saturation_check = fraction;
    }

    /// Whether the saturation check has warned.
    pub fn saturation_warned(&self) -> bool {
        self.warned
    }

    /// Quantizes this step's new K and V tokens into the cache, in place: rows
    /// `q_start_loc[b] .. + q_seq_length[b]` of `k_new` / `v_new` (`[num_tokens,
    /// num_kv_heads, head_dim]`, f32/f16/bf16, the same dtype) go to cache positions
    /// `[kv_seqlens[b] - q_seq_length[b], kv_seqlens[b])` through the block table.
    pub fn fill<const D: usize>(
        &mut self,
        k_new: Tensor<B, D>,
        v_new: Tensor<B, D>,
        batch: &KvBatch<B>,
    ) -> Result<()> {
        self.check_batch(batch)?;
        let num_tokens = batch.written_tokens("fill")?;
        let layout = self.spec.layout();
        let heads = layout.num_kv_heads();
        let meaning = "[num_tokens, num_kv_heads, head_dim]";
        let k_dtype = check_activation(
            "k_new",
            &k_new.dims(),
            k_new.dtype(),
            [num_tokens, heads, layout.head_dim_k()],
            meaning,
        )?;
        let v_dtype = check_activation(
            "v_new",
            &v_new.dims(),
            v_new.dtype(),
            [num_tokens, heads, layout.head_dim_v()],
            meaning,
        )?;
        if k_dtype != v_dtype {
            return Err(Fp8KvError::UnsupportedDtype(format!(
                "k_new is {k_dtype} but v_new is {v_dtype}"
            )));
        }
        self.check_device("k_new", &k_new.device())?;
        self.check_device("v_new", &v_new.device())?;
        if let (Some(limit), false) = (self.saturation_check, self.warned) {
            let sat = self.saturation(&k_new, &v_new)?;
            if sat.fraction() > limit {
                self.warned = true;
                log::warn!(
                    target: "fp8kv",
                    "{} at scales k {} / v {} saturates {} of {} K and {} of {} V values (more than {:.3}%): calibrate the scales (KvCache::calibrate) or load them from the checkpoint",
                    self.spec.policy(),
                    self.spec.scales().k(),
                    self.spec.scales().v(),
                    sat.k,
                    sat.per_side,
                    sat.v,
                    sat.per_side,
                    100.0 * limit
                );
            }
        }
        let storage = self
            .storage
            .as_mut()
            .expect("fp8kv: this KvCache lost its storage to a panic inside copy_blocks");
        B::kv_fill(
            storage,
            &self.spec,
            k_new.into_primitive().tensor(),
            v_new.into_primitive().tensor(),
            &batch.primitive,
        )
    }

    /// What RoPE against this cache needs: `heads` whose KV heads and head dim are the cache's
    /// (K and V head dims equal), a table of that width on this device covering the batch's
    /// positions. The checks of [`Self::fill_rope`] (and of the model's decoder block).
    pub fn check_rope(
        &self,
        batch: &KvBatch<B>,
        table: &RopeTableTensor<B>,
        heads: QkvHeads,
    ) -> Result<()> {
        let layout = self.spec.layout();
        let d = heads.head_dim;
        if heads.q_heads == 0
            || heads.kv_heads != layout.num_kv_heads()
            || d != layout.head_dim_k()
            || d != layout.head_dim_v()
            || d != table.head_dim()
        {
            return Err(Fp8KvError::ShapeMismatch {
                what: "RoPE fill heads",
                expected: format!(
                    "query heads and the cache's {} KV heads of {} (K) / {} (V), the table's width",
                    layout.num_kv_heads(),
                    layout.head_dim_k(),
                    layout.head_dim_v()
                ),
                actual: format!("{heads:?}, a table of width {}", table.head_dim()),
            });
        }
        if batch.max_kv_len() > table.positions() {
            return Err(Fp8KvError::InvalidOption(format!(
                "the RoPE table covers {} positions, the batch reaches position {}",
                table.positions(),
                batch.max_kv_len() - 1
            )));
        }
        self.check_device("RoPE table", &table.values.device())
    }

    /// RoPE fused into the fill, for a fused QKV projection `qkv` `[num_tokens, (q_heads + 2
    /// num_kv_heads) · head_dim]` (Q heads, then K, then V; f32/f16/bf16): one launch on GPU
    /// backends rotates Q and K by their positions (`kv_seqlens[b] − q_seq_length[b] + i`, pairs
    /// `(2i, 2i + 1)`, angles from `table`) and quantizes the rotated K and the V into the cache
    /// as [`Self::fill`] does, so K never goes through memory unquantized. Returns the rotated
    /// Q, `[num_tokens, q_heads, head_dim]` in `qkv`'s dtype (rows of no sequence unwritten on
    /// GPUs, NaN on NdArray). The rotation is computed in f64 and rounded to f32 once: bit for
    /// bit [`fp8kv::reference::fill_rope`].
    ///
    /// `heads.kv_heads` and `heads.head_dim` must be the cache's (K and V head dims equal);
    /// the table must cover the batch's positions. Errors as [`Self::fill`], and
    /// [`Fp8KvError::ShapeMismatch`] / [`Fp8KvError::InvalidOption`] for heads or a table that
    /// do not fit. The opt-in saturation check does not run here (it reads K and V apart).
    pub fn fill_rope(
        &mut self,
        qkv: Tensor<B, 2>,
        batch: &KvBatch<B>,
        table: &RopeTableTensor<B>,
        heads: QkvHeads,
    ) -> Result<Tensor<B, 3>> {
        self.check_batch(batch)?;
        let num_tokens = batch.written_tokens("fill_rope")?;
        self.check_rope(batch, table, heads)?;
        let row = heads.row_elems();
        if qkv.dims() != [num_tokens, row] {
            return Err(Fp8KvError::ShapeMismatch {
                what: "qkv",
                expected: format!(
                    "[{num_tokens}, {row}] ([num_tokens, (q_heads + 2 num_kv_heads) · head_dim])"
                ),
                actual: format!("{:?}", qkv.dims()),
            });
        }
        activation_dtype("qkv", qkv.dtype())?;
        self.check_device("qkv", &qkv.device())?;
        let (positions, d) = (table.positions(), heads.head_dim);
        let storage = self
            .storage
            .as_mut()
            .expect("fp8kv: this KvCache lost its storage to a panic inside copy_blocks");
        let q = B::kv_fill_rope(
            storage,
            &self.spec,
            qkv.reshape([num_tokens, 1, row]).into_primitive().tensor(),
            &batch.primitive,
            table
                .values
                .clone()
                .reshape([positions, 1, d])
                .into_primitive()
                .tensor(),
            heads,
            table.rope_dims,
        )?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(q)))
    }

    /// Every sequence of `batch`, dequantized into contiguous K and V tensors of `dtype`
    /// (f32/f16/bf16), sequences concatenated in batch order: `[num_kv_heads, total_tokens,
    /// head_dim]` for [`FlattenLayout::Hsd`], `[total_tokens, num_kv_heads, head_dim]` for
    /// [`FlattenLayout::Shd`] (`total_tokens` = [`KvBatch::total_kv_tokens`]).
    pub fn flatten(
        &self,
        batch: &KvBatch<B>,
        layout: FlattenLayout,
        dtype: DType,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 3>)> {
        self.check_batch(batch)?;
        let dtype = activation_dtype("the flatten output dtype", dtype)?;
        let (k, v) = B::kv_flatten(
            self.storage(),
            &self.spec,
            &batch.primitive,
            batch.total_kv_tokens(),
            layout,
            dtype,
        )?;
        Ok((
            Tensor::from_primitive(TensorPrimitive::Float(k)),
            Tensor::from_primitive(TensorPrimitive::Float(v)),
        ))
    }

    /// Paged decode attention (also several new tokens per sequence, causal among them):
    /// `q` is `[num_tokens, num_heads, head_dim_k]` (f32/f16/bf16), the result `[num_tokens,
    /// num_heads, head_dim_v]` in `q`'s dtype. Every [`AttentionOptions`] feature applies.
    /// Rows of no sequence are left unwritten on GPUs (zero on NdArray).
    pub fn decode<const D: usize>(
        &self,
        q: Tensor<B, D>,
        batch: &KvBatch<B>,
        opts: &AttentionOptions,
    ) -> Result<Tensor<B, D>> {
        self.check_batch(batch)?;
        let num_tokens = batch.written_tokens("decode")?;
        let dims = q.dims();
        let layout = self.spec.layout();
        let num_heads = if D == 3 { dims[1] } else { 0 };
        check_activation(
            "q",
            &dims,
            q.dtype(),
            [num_tokens, num_heads, layout.head_dim_k()],
            "[num_tokens, num_heads, head_dim_k]",
        )?;
        if num_heads == 0 || !num_heads.is_multiple_of(layout.num_kv_heads()) {
            return Err(Fp8KvError::HeadRatio {
                num_heads,
                num_kv_heads: layout.num_kv_heads(),
            });
        }
        opts.validate(num_heads)?;
        self.check_device("q", &q.device())?;
        let out = B::kv_decode(
            q.into_primitive().tensor(),
            self.storage(),
            &self.spec,
            &batch.primitive,
            opts,
        )?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// Copies whole pages `src → dst` in both K and V (prefix sharing, copy-on-write before a
    /// fork writes into a shared partial page, preemption). Every page must be in range, the
    /// destinations distinct, and no page both a source and a destination (so the order of the
    /// copies cannot matter). Writes in place through Burn's `slice_assign`.
    pub fn copy_blocks(&mut self, pairs: &[(usize, usize)]) -> Result<()> {
        let num_pages = self.spec.layout().num_pages();
        let mut dsts = std::collections::HashSet::new();
        for (i, &(src, dst)) in pairs.iter().enumerate() {
            for (what, page) in [("source", src), ("destination", dst)] {
                if page >= num_pages {
                    return Err(Fp8KvError::InvalidOption(format!(
                        "copy_blocks pair {i}: {what} page {page} is outside [0, {num_pages})"
                    )));
                }
            }
            if !dsts.insert(dst) {
                return Err(Fp8KvError::InvalidOption(format!(
                    "copy_blocks: page {dst} is the destination of two pairs"
                )));
            }
        }
        if let Some(&(src, _)) = pairs.iter().find(|(src, _)| dsts.contains(src)) {
            return Err(Fp8KvError::InvalidOption(format!(
                "copy_blocks: page {src} is both a source and a destination"
            )));
        }
        if pairs.is_empty() {
            return Ok(());
        }
        let storage = self
            .storage
            .take()
            .expect("fp8kv: this KvCache lost its storage to a panic inside copy_blocks");
        self.storage = Some(KvCachePrimitive {
            k: copy_pages(storage.k, pairs, &self.device),
            v: copy_pages(storage.v, pairs, &self.device),
        });
        Ok(())
    }

    /// Reads the cache back into host memory, with this cache's spec (scales included; waits
    /// for pending work): for inspection and tests. The unquantized cache comes back in its
    /// dtype's bytes on every backend.
    pub fn to_host(&self) -> Result<HostKvCache> {
        let mut host = HostKvCache::new(self.spec, 0)?;
        let s = self.storage();
        host.k = read_storage::<B>(&s.k, self.spec.dtype())?;
        host.v = read_storage::<B>(&s.v, self.spec.dtype())?;
        Ok(host)
    }

    /// Gives up the cache: its spec and storage.
    pub fn into_parts(mut self) -> (CacheSpec, KvCachePrimitive<B>) {
        let storage = self
            .storage
            .take()
            .expect("fp8kv: this KvCache lost its storage to a panic inside copy_blocks");
        (self.spec, storage)
    }
}

/// Gathers the source pages into a new tensor first (`select`), then `slice_assign`s each onto
/// its destination: the cache has one owner again by then, so backends write it in place
/// (slicing it directly would keep a view alive and make `slice_assign` copy the whole cache).
fn copy_pages<B: Backend>(
    side: CachePrimitive<B>,
    pairs: &[(usize, usize)],
    device: &B::Device,
) -> CachePrimitive<B> {
    fn pages<B: Backend, K: burn_tensor::Numeric<B>>(
        mut t: Tensor<B, 4, K>,
        pairs: &[(usize, usize)],
        device: &B::Device,
    ) -> Tensor<B, 4, K> {
        let srcs: Vec<i64> = pairs.iter().map(|&(src, _)| src as i64).collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::from(srcs.as_slice()), device);
        let gathered = t.clone().select(0, index);
        for (i, &(_, dst)) in pairs.iter().enumerate() {
            t = t.slice_assign(dst..dst + 1, gathered.clone().slice(i..i + 1));
        }
        t
    }
    match side {
        CachePrimitive::Codes(t) => CachePrimitive::Codes(
            pages(Tensor::<B, 4, Int>::from_primitive(t), pairs, device).into_primitive(),
        ),
        CachePrimitive::Values(t) => CachePrimitive::Values(
            pages(
                Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t)),
                pairs,
                device,
            )
            .into_primitive()
            .tensor(),
        ),
    }
}

/// Reads a tensor's data synchronously, with the library's error.
pub(crate) fn tensor_data<B: Backend, const D: usize, K: burn_tensor::BasicOps<B>>(
    t: Tensor<B, D, K>,
) -> Result<TensorData> {
    t.try_into_data()
        .map_err(|e| Fp8KvError::Runtime(format!("reading a tensor back failed: {e:?}")))
}

/// One side's storage as raw cache-element bytes (what [`HostKvCache`] holds).
pub(crate) fn read_storage<B: Backend>(side: &CachePrimitive<B>, dtype: Dtype) -> Result<Vec<u8>> {
    match side {
        CachePrimitive::Codes(t) => {
            let data = tensor_data(Tensor::<B, 4, Int>::from_primitive(t.clone()))?;
            data.into_vec::<u8>()
                .map_err(|e| Fp8KvError::Runtime(format!("cache codes are not U8: {e:?}")))
        }
        CachePrimitive::Values(t) => {
            let data = tensor_data(Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(
                t.clone(),
            )))?;
            let values = data
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| Fp8KvError::Runtime(format!("cache values are not floats: {e:?}")))?;
            let es = dtype.size_bytes();
            let mut bytes = vec![0u8; values.len() * es];
            for (x, dst) in values.iter().zip(bytes.chunks_exact_mut(es)) {
                dtype.store(*x, dst);
            }
            Ok(bytes)
        }
    }
}
