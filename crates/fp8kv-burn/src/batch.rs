//! [`KvBatch`] (one step's metadata, uploaded once) and [`RopeTableTensor`].

use burn_tensor::backend::Backend;
use burn_tensor::{DType, Tensor, TensorData};

use fp8kv::error::{Fp8KvError, Result};
use fp8kv::layout::BatchMetadata;
use fp8kv::layout::PagedKvLayout;

use crate::PagedKvBackend;

/// One engine step's batch metadata, validated once against the caches' layout and uploaded
/// once to the device; every layer's fill, flatten and decode of the step reuse it.
#[derive(Debug, Clone)]
pub struct KvBatch<B: PagedKvBackend> {
    pub(crate) layout: PagedKvLayout,
    pub(crate) num_tokens: Option<usize>,
    pub(crate) max_kv_len: usize,
    pub(crate) kv_start_loc: Vec<usize>,
    pub(crate) device: B::Device,
    pub(crate) primitive: B::KvBatchPrimitive,
}

impl<B: PagedKvBackend> KvBatch<B> {
    /// A step that brings `num_tokens` packed new tokens (the rows of its K/V/Q tensors):
    /// usable by fill, flatten and decode. Validation errors are [`BatchMetadata::validate`]'s.
    pub fn new(
        meta: BatchMetadata,
        layout: &PagedKvLayout,
        num_tokens: usize,
        device: &B::Device,
    ) -> Result<Self> {
        Self::build(meta, layout, Some(num_tokens), device)
    }

    /// Metadata for reading only (flatten); fill and decode refuse it.
    pub fn for_reads(
        meta: BatchMetadata,
        layout: &PagedKvLayout,
        device: &B::Device,
    ) -> Result<Self> {
        Self::build(meta, layout, None, device)
    }

    fn build(
        meta: BatchMetadata,
        layout: &PagedKvLayout,
        num_tokens: Option<usize>,
        device: &B::Device,
    ) -> Result<Self> {
        let kv_start_loc = fp8kv::flatten_start_loc(&meta);
        let max_kv_len = meta.max_kv_len();
        let primitive = B::kv_batch(meta, layout, num_tokens, device)?;
        Ok(KvBatch {
            layout: *layout,
            num_tokens,
            max_kv_len,
            kv_start_loc,
            device: device.clone(),
            primitive,
        })
    }

    /// The packed new-token count (`None` for [`Self::for_reads`]).
    pub fn num_tokens(&self) -> Option<usize> {
        self.num_tokens
    }
    /// The longest sequence's cached tokens after the step (its last position + 1).
    pub fn max_kv_len(&self) -> usize {
        self.max_kv_len
    }
    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.kv_start_loc.len() - 1
    }
    /// Cached tokens of all sequences (the token count of a flatten output).
    pub fn total_kv_tokens(&self) -> usize {
        self.kv_start_loc[self.batch()]
    }
    /// Where each sequence starts in a flatten output's token dimension (`batch + 1` entries,
    /// the total last): sequence `b` is rows `kv_start_loc[b]..kv_start_loc[b + 1]`.
    pub fn kv_start_loc(&self) -> &[usize] {
        &self.kv_start_loc
    }
    /// The layout the metadata was validated against.
    pub fn layout(&self) -> &PagedKvLayout {
        &self.layout
    }
    /// The backend's copy.
    pub fn primitive(&self) -> &B::KvBatchPrimitive {
        &self.primitive
    }

    /// The packed new-token count, or an error naming `op` for a read-only batch: the check
    /// every writing operation (and an extension's own fused operation) starts with.
    pub fn written_tokens(&self, op: &str) -> Result<usize> {
        self.num_tokens.ok_or_else(|| {
            Fp8KvError::InvalidOption(format!(
                "{op} needs a batch built with KvBatch::new (its new tokens validated), not KvBatch::for_reads"
            ))
        })
    }
}

/// A [`RopeTable`] on a device: `[positions, head_dim]` f32.
#[derive(Debug, Clone)]
pub struct RopeTableTensor<B: Backend> {
    pub(crate) values: Tensor<B, 2>,
    pub(crate) rope_dims: usize,
}

impl<B: Backend> RopeTableTensor<B> {
    /// Uploads `table` to `device` (one upload; every layer and step reads it).
    pub fn new(table: &fp8kv::rope::RopeTable, device: &B::Device) -> Self {
        let values = Tensor::from_data(
            TensorData::new(
                table.values().to_vec(),
                [table.positions(), table.head_dim()],
            ),
            (device, DType::F32),
        );
        RopeTableTensor {
            values,
            rope_dims: table.rope_dims(),
        }
    }
    /// Positions covered.
    pub fn positions(&self) -> usize {
        self.values.dims()[0]
    }
    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.values.dims()[1]
    }
    /// The `[positions, head_dim]` f32 values.
    pub fn values(&self) -> &Tensor<B, 2> {
        &self.values
    }
    /// Rotated dimensions per head.
    pub fn rope_dims(&self) -> usize {
        self.rope_dims
    }
}
