//! fp8kv: an FP8 (E4M3/E5M2) paged KV cache for LLM inference, with CubeCL kernels for
//! fill (quantize new tokens into the cache), flatten (gather and dequantize) and paged decode
//! attention, and naive CPU reference kernels that every GPU test compares with.
//!
//! One layer's decode step on the GPU (the README's walk-through, compiled as a doc test):
//!
//! ```no_run
//! use fp8kv::{
//!     cuda_client, decode_plan, fill, flatten_new, paged_decode, AttentionOptions, BatchMetadata,
//!     DecodeOptions, DeviceBatch, DeviceRows, Dtype, FlattenLayout, KvLayoutKind, KvScales,
//!     PagedKvCache, PagedKvLayout, QuantPolicy,
//! };
//!
//! # fn main() -> fp8kv::Result<()> {
//! let policy: QuantPolicy = "fp8".parse()?;
//! let scales = KvScales::new(0.05, 0.02)?;
//! let layout = PagedKvLayout::new(4096, 64, 8, 128, 128, KvLayoutKind::Bshd)?;
//! let (num_heads, batch_size) = (32, 2);
//!
//! let client = cuda_client()?; // Err(NoDevice) instead of a panic
//! let cache_dtype = policy.cache_dtype(Dtype::Bf16)?;
//! let mut cache = PagedKvCache::new(&client, layout, policy, cache_dtype, scales)?;
//!
//! // Two sequences of 100 and 7 cached tokens, one new token each (decode).
//! let meta = BatchMetadata::decode(vec![100, 7], vec![0, 1, 2, -1], 2)?;
//! let batch = DeviceBatch::new(&client, meta, &layout, batch_size)?; // once per step
//!
//! let kv_row = 8 * 128;
//! let k_new = DeviceRows::from_f32(&client, &vec![0.5; 2 * kv_row], Dtype::Bf16, 2, kv_row, kv_row)?;
//! let v_new = DeviceRows::from_f32(&client, &vec![0.25; 2 * kv_row], Dtype::Bf16, 2, kv_row, kv_row)?;
//! fill(&mut cache, &k_new, &v_new, &batch)?;
//!
//! let q_row = num_heads * 128;
//! let q = DeviceRows::from_f32(&client, &vec![0.1; 2 * q_row], Dtype::Bf16, 2, q_row, q_row)?;
//! let mut out = DeviceRows::empty(&client, Dtype::Bf16, 2, q_row, q_row)?;
//! // The head count is q's row length over the cache's head dim; the split kernel is Auto's
//! // pick unless `DecodeOptions::strategy` forces one, and `decode_plan` says which it is.
//! let opts = DecodeOptions::new(AttentionOptions { window: Some(4096), ..Default::default() });
//! paged_decode(&q, &cache, &batch, &opts, &mut out)?;
//! let plan = decode_plan(&cache, &batch, Dtype::Bf16, num_heads, &opts)?;
//! println!("{} kernel, {} splits of {} tokens", plan.strategy, plan.num_splits, plan.split_tokens);
//!
//! // Prefill attention reads contiguous, dequantized K/V instead.
//! let (k, v) = flatten_new(&client, &cache, &batch, FlattenLayout::Hsd, Dtype::Bf16)?;
//! # let _ = (k, v, out.to_f32()?);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod contract;
pub mod device;
pub mod error;
pub mod extend;
pub mod fp8;
#[cfg(feature = "internals")]
pub mod internals;
pub mod kernels;
pub mod layout;
pub mod policy;
pub mod reference;
pub mod rope;
pub mod scales;
#[cfg(any(test, feature = "internals"))]
pub mod testing;

pub use checkpoint::{load_kv_scales, LoadedScales, ScaleWarning};
pub use contract::{flatten_start_loc, AttentionOptions, CacheSpec, FlattenLayout};
pub use device::{cuda_client, DeviceBatch, DeviceRows, PagedKvCache};
pub use error::{Fp8KvError, KvSide, Result};
pub use fp8::Fp8Format;
// The entry points of the three kernel families, so that one `use fp8kv::{..}` line serves.
pub use kernels::decode::{
    auto_strategy, decode_plan, paged_decode, CombineChoice, DecodeOptions, DecodePlanInfo,
    DecodeShape, DecodeStrategy, SplitChoice,
};
pub use kernels::fill::{fill, fill_rope, fill_with_stats};
pub use kernels::flatten::{flatten, flatten_new};
pub use kernels::stats::{kv_stats, DeviceKvStats, KvStats};
pub use layout::{BatchMetadata, CacheTensorLayout, KvLayoutKind, PagedKvLayout};
pub use policy::{Dtype, QuantPolicy};
pub use scales::KvScales;
