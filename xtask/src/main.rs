//! fp8kv project tooling, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! Commands:
//!
//! - `cargo xtask gpu-pack` builds the release test and bench binaries of `fp8kv`, strips them
//!   and copies them into the git-ignored `gpu-pack/` folder (at most 64 MiB) with a `run.sh`.
//!   On a GPU machine that has no Rust toolchain, from a copy of the repository root:
//!   - `bash gpu-pack/run.sh tests [ARGS..]` runs every test binary with
//!     `--test-threads=$FP8KV_TEST_THREADS` (default 1; plus ARGS, e.g. a name filter) and `FP8KV_REQUIRE_GPU=1`, so GPU tests fail instead of
//!     skipping when no device is found. It prints each binary's name and ends with
//!     `GPU suite: N passed, M failed`; the exit status is non-zero on any failure.
//!   - `bash gpu-pack/run.sh bench [FILTER]` runs every bench binary with `--bench [FILTER]`.
//!   - `bash gpu-pack/run.sh demo` runs the demo (a stripped copy of this binary), GPU path
//!     included.
//!   - `bash gpu-pack/run.sh all [FILTER]` runs the tests (8 threads), the demo and the benches
//!     in one go, keeping their logs in `$OUT` (or `gpu-pack/logs`).
//! - `cargo xtask codegen [--ptx] [--verbose] [--out DIR] [--nvrtc DIR] [--against DIR]`
//!   compiles every kernel
//!   instantiation to CUDA C++ (into `target/codegen/`) without a GPU, through an offline cubecl
//!   runtime that mimics an H100. With `--ptx` it also compiles each source to PTX for `sm_90a`
//!   with NVRTC from PyPI (installed in `.nvrtc/` by
//!   `pip install --target .nvrtc nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79`,
//!   or `--nvrtc DIR` / `FP8KV_NVRTC_DIR`) and prints registers and spills per kernel. Exits
//!   non-zero if any kernel fails to generate or compile. `--against DIR` (with `--ptx`) then
//!   compares each kernel's PTX instruction multiset and registers with an earlier run's
//!   output folder and fails on any difference (for refactors that must not change kernels).
//! - `cargo xtask emulate [--nvrtc DIR] [--out DIR]` runs the decode split kernels' generated
//!   CUDA C++ on the CPU (host C++ with threads standing in for CUDA threads and warp
//!   collectives) and checks every partial state against a double-precision reference; needs
//!   g++ and the CUDA headers from PyPI in `.nvrtc/` (see `emulate`).
//! - `cargo xtask demo [ARGS..]` runs SmolLM2-135M-Instruct through the FP8 paged cache (see
//!   `model_demo.rs` for the flags); `cargo xtask demo synthetic` runs the synthetic workload
//!   (LLM-like K/V through the CPU reference kernels and, with CUDA, the GPU kernels).
//! - `cargo xtask ci` runs `.ci/run` (fmt, clippy, tests, codegen --ptx).

mod codegen;
mod demo;
mod emulate;
mod gpu_pack;
mod model_demo;
mod model_speed;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent folder")
        .to_path_buf()
}

const USAGE: &str = "usage: cargo xtask <gpu-pack | codegen [--ptx] | emulate | demo | ci>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    let result = match args.first().map(String::as_str) {
        Some("gpu-pack") => gpu_pack::run(&args[1..], &root),
        Some("codegen") => codegen::run(&args[1..], &root),
        Some("emulate") => emulate::run(&args[1..], &root),
        Some("demo") if args.get(1).map(String::as_str) == Some("synthetic") => {
            demo::run(&args[2..])
        }
        Some("demo") => model_demo::run(&args[1..]),
        Some("ci") => run_ci(&root),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_ci(root: &Path) -> Result<(), String> {
    let status = std::process::Command::new("bash")
        .arg(root.join(".ci/run"))
        .current_dir(root)
        .status()
        .map_err(|e| format!("running .ci/run: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!(".ci/run failed ({status})"))
}

/// CI's codegen and emulation steps as ignored tests of this binary. `.ci/run` runs them with
/// `cargo test --workspace --release --bins -- --ignored`, which reuses the test step's build:
/// `cargo xtask` builds with `-p xtask`, where the features fp8kv's dev-dependencies enable on
/// shared crates are off, so it recompiled about 30 crates (about 270 s of CI).
#[cfg(test)]
mod ci_steps {
    fn check(step: &str, result: Result<(), String>) {
        if let Err(e) = result {
            panic!("{step}: {e}");
        }
    }

    #[test]
    #[ignore = "a CI step: `.ci/run` runs it (`cargo xtask codegen --ptx`)"]
    fn ci_step_codegen_ptx() {
        let args = ["--ptx".to_string()];
        check(
            "codegen --ptx",
            super::codegen::run(&args, &super::workspace_root()),
        );
    }

    #[test]
    #[ignore = "a CI step: `.ci/run` runs it (`cargo xtask emulate`)"]
    fn ci_step_emulate() {
        check(
            "emulate",
            super::emulate::run(&[], &super::workspace_root()),
        );
    }
}
