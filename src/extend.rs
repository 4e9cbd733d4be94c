//! Building blocks for crates that launch their own CubeCL kernels on fp8kv's device types
//! (`fp8kv-burn` and `fp8kv-llama` are two): the step's metadata buffer as a kernel reads it,
//! the length and access width CubeCL's raw arrays need, a strided-rows gather and the size
//! check every launcher repeats. Users of the entry points do not need this module.

pub use crate::error::check_limit;
pub use crate::kernels::gather::gather_rows;
pub use crate::kernels::meta as batch_meta;
pub use crate::kernels::{access_elems, array_len};
