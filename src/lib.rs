//! fp8kv: an FP8 (E4M3/E5M2) paged KV cache for LLM inference, with CubeCL kernels for
//! fill (quantize new tokens into the cache), flatten (gather and dequantize) and paged decode
//! attention, and naive CPU reference kernels that every GPU test compares with.

#![warn(missing_docs)]

pub mod device;
pub mod error;
pub mod fp8;
pub mod kernels;
pub mod layout;
pub mod policy;
pub mod reference;
pub mod scales;
pub mod testing;

pub use error::{Fp8KvError, KvSide, Result};
pub use fp8::Fp8Format;
pub use layout::{BatchMetadata, CacheTensorLayout, KvLayoutKind, PagedKvLayout};
pub use policy::{Dtype, QuantPolicy};
pub use scales::KvScales;
