//! Shared by the GPU tests: get a CUDA client or skip loudly.

use std::io::Write;

use cubecl::client::ComputeClient;
use fp8kv::device::{cuda_client, Cuda};

/// A CUDA client, or `None` after printing `SKIPPED <test>: <reason>` when there is no usable
/// device. With `FP8KV_REQUIRE_GPU=1` a missing device fails the test instead.
pub fn client_or_skip(test: &str) -> Option<ComputeClient<Cuda>> {
    match cuda_client() {
        Ok(c) => Some(c),
        Err(e) => {
            if std::env::var("FP8KV_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: FP8KV_REQUIRE_GPU=1 but {e}");
            }
            // Straight to the stream: libtest captures print!/eprint! of passing tests.
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {e}");
            None
        }
    }
}
