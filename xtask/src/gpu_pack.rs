//! `cargo xtask gpu-pack`: release test and bench binaries, stripped, for a GPU machine that
//! has no Rust toolchain (see the crate docs for `gpu-pack/run.sh`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The device machine takes the folder along with the repository; keep it small.
const MAX_PACK_BYTES: u64 = 64 * 1024 * 1024;

/// A built executable and the name it gets in the pack.
struct Artifact {
    name: String,
    path: PathBuf,
}

/// Builds and packs; `root` is the workspace root.
pub fn run(args: &[String], root: &Path) -> Result<(), String> {
    if let Some(a) = args.first() {
        return Err(format!("gpu-pack takes no arguments (got `{a}`)"));
    }
    let tests = build(root, "test", &["test", "--release"], &["lib", "test"])?;
    let benches = build(root, "bench", &["bench"], &["bench"])?;
    if tests.is_empty() {
        return Err("cargo built no test binary".into());
    }

    let pack = root.join("gpu-pack");
    if pack.exists() {
        std::fs::remove_dir_all(&pack).map_err(|e| format!("{}: {e}", pack.display()))?;
    }
    let mut total = 0;
    for (sub, list) in [("tests", &tests), ("benches", &benches)] {
        let dir = pack.join(sub);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for a in list.iter() {
            let dst = dir.join(&a.name);
            strip_copy(&a.path, &dst)?;
            let size = gzip(&dst)?;
            total += size;
            println!("  {sub}/{:<32} {:>6.1} MiB gzipped", a.name, mib(size));
        }
    }
    // This very binary carries the demo: `run.sh demo` runs it on the GPU machine.
    let me = std::env::current_exe().map_err(|e| format!("locating the xtask binary: {e}"))?;
    let demo = pack.join("xtask");
    strip_copy(&me, &demo)?;
    total += gzip(&demo)?;
    let script = pack.join("run.sh");
    std::fs::write(&script, RUN_SH).map_err(|e| format!("{}: {e}", script.display()))?;
    // CubeCL keys its PTX cache by kernel id, not by kernel source: a pack built from changed
    // kernels must not find the previous pack's PTX on a warm machine, so each pack caches
    // under its own build id.
    let id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| format!("clock: {e}"))?
        .as_nanos();
    let id_file = pack.join("build-id");
    std::fs::write(&id_file, format!("{id}\n"))
        .map_err(|e| format!("{}: {e}", id_file.display()))?;
    println!(
        "gpu-pack: {} test and {} bench binaries, {:.1} MiB in {}",
        tests.len(),
        benches.len(),
        mib(total),
        pack.display()
    );
    if total > MAX_PACK_BYTES {
        return Err(format!(
            "gpu-pack is {:.1} MiB, over the {:.0} MiB limit",
            mib(total),
            mib(MAX_PACK_BYTES)
        ));
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs `cargo <cargo_args> --no-run --message-format=json` on the three library crates and returns the
/// executables of the targets whose kind is in `kinds`.
fn build(
    root: &Path,
    what: &str,
    cargo_args: &[&str],
    kinds: &[&str],
) -> Result<Vec<Artifact>, String> {
    println!("gpu-pack: building {what} binaries (release)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(cargo_args)
        .args([
            "--no-run",
            "--message-format=json-render-diagnostics",
            "--package",
            "fp8kv",
            "--package",
            "fp8kv-burn",
            "--package",
            "fp8kv-llama",
        ])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo {} --no-run failed ({})",
            cargo_args.join(" "),
            out.status
        ));
    }
    let mut found: Vec<Artifact> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let target = &msg["target"];
        let Some(kind) = target["kind"][0].as_str().filter(|k| kinds.contains(k)) else {
            continue;
        };
        let name = match kind {
            // The library's unit tests: the target name alone would be just the crate name.
            "lib" => format!("unit-{}", target["name"].as_str().unwrap_or("lib")),
            _ => target["name"].as_str().unwrap_or("unnamed").to_string(),
        };
        if !found.iter().any(|a| a.name == name) {
            found.push(Artifact {
                name,
                path: PathBuf::from(exe),
            });
        }
    }
    Ok(found)
}

/// Compresses `path` into `path.gz` (the binaries link Burn and CubeCL: gzipped they fit the
/// device machine's 64 MiB transfer; `run.sh` unpacks them there) and returns its size.
fn gzip(path: &Path) -> Result<u64, String> {
    let ok = matches!(
        Command::new("gzip").arg("-6").arg("-f").arg(path).status(),
        Ok(s) if s.success()
    );
    if !ok {
        return Err(format!(
            "gzip {} failed (is gzip installed?)",
            path.display()
        ));
    }
    let gz = path.with_file_name(format!(
        "{}.gz",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("binary")
    ));
    std::fs::metadata(&gz)
        .map(|m| m.len())
        .map_err(|e| format!("{}: {e}", gz.display()))
}

/// Copies `src` to `dst` without symbols (`strip`, else `objcopy --strip-all`).
fn strip_copy(src: &Path, dst: &Path) -> Result<(), String> {
    let ok = |cmd: &mut Command| matches!(cmd.status(), Ok(s) if s.success());
    if ok(Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(dst)
        .arg(src))
        || ok(Command::new("objcopy").arg("--strip-all").arg(src).arg(dst))
    {
        Ok(())
    } else {
        Err(format!(
            "could not strip {} (need `strip` or `objcopy`)",
            src.display()
        ))
    }
}

/// The script that runs the pack on the device machine.
const RUN_SH: &str = r#"#!/usr/bin/env bash
# Generated by `cargo xtask gpu-pack`. Runs fp8kv's packed release binaries on a machine
# without cargo, from a copy of the repository root:
#   bash gpu-pack/run.sh tests [ARGS..]   every test binary, --test-threads=${FP8KV_TEST_THREADS:-1}, GPU required
#   bash gpu-pack/run.sh bench [FILTER]   every bench binary with --bench
#   bash gpu-pack/run.sh demo             the demo (`cargo xtask demo`), GPU path included
#   bash gpu-pack/run.sh all              tests (8 threads), demo, benches; logs into $OUT if set
#   bash gpu-pack/run.sh key-major        the suite on the experimental key-major decode kernels
#                                         only, then (if it passes) the decode bench's --ab
#   bash gpu-pack/run.sh model            the SmolLM2 model on the GPU: assembles .models/ from
#                                         .xfer*/part if needed, its tests, the demo with --speed
#   bash gpu-pack/run.sh suite [BIN..]    every test binary (or those named) as its own process,
#                                         all at once (kernel compilation, not the GPU, bounds
#                                         the suite's time; gpu_decode as one process per kernel
#                                         path), logs in $OUT, one summary line
#   bash gpu-pack/run.sh sanitize [BIN[:FILTER]..] compute-sanitizer memcheck, racecheck and
#                                         initcheck over the GPU test binaries (default: a list
#                                         that reaches every kernel and path), every (tool,
#                                         binary) its own process at once, logs in $OUT
# FP8KV_TEST_BINS="a b" limits `tests` to those binaries (to split the suite over calls).
# `suite` and `sanitize` share CubeCL's PTX cache in /tmp/fp8kv-ptx-cache/<the pack's
# build-id> (a cubecl.toml written into the repository copy; FP8KV_PTX_CACHE=0 leaves it
# out), so their processes compile each kernel with NVRTC once per machine. The other modes
# remove that file: the demo and the benches time their first compile as a user's would be.
set -uo pipefail
shopt -s nullglob
pack="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Binaries expect to run from the repository root, as under `cargo test`.
cd "$pack/.."
# Ours only (a user's own cubecl.toml is left alone); ignored files outlive a device call.
if [ ! -e cubecl.toml ] || grep -q fp8kv-ptx-cache cubecl.toml; then
  rm -f cubecl.toml
  case "${1:-tests}" in
  suite | sanitize)
    if [ "${FP8KV_PTX_CACHE:-1}" != 0 ]; then
      printf '[compilation]\ncache = { file = "/tmp/fp8kv-ptx-cache/%s" }\n' \
        "$(cat "$pack/build-id" 2>/dev/null || echo unknown)" >cubecl.toml
    fi
    ;;
  esac
fi
# The pack travels gzipped (the 64 MiB transfer limit): unpack what is still packed.
for gz in "$pack"/xtask.gz "$pack"/tests/*.gz "$pack"/benches/*.gz; do
  [ -e "$gz" ] || continue # unpacked already (xtask.gz is named, not globbed)
  gunzip -f "$gz" && chmod +x "${gz%.gz}"
done
mode="${1:-tests}"
shift || true

case "$mode" in
tests)
  # GPU tests fail instead of skipping when no CUDA device is found.
  export FP8KV_REQUIRE_GPU=1
  passed=0 failed=0
  log="$(mktemp)"
  trap 'rm -f "$log"' EXIT
  bins=("$pack"/tests/*)
  if [ -n "${FP8KV_TEST_BINS:-}" ]; then
    bins=()
    for b in $FP8KV_TEST_BINS; do bins+=("$pack/tests/$b"); done
  fi
  [ "${#bins[@]}" -gt 0 ] || { echo "no test binaries in the pack"; exit 1; }
  for bin in "${bins[@]}"; do
    echo "=== $(basename "$bin")"
    "$bin" --test-threads="${FP8KV_TEST_THREADS:-1}" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    # libtest: "test result: ok. 12 passed; 0 failed; 1 ignored; ..."
    read -r p f < <(awk '/^test result:/ {
        for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i }
      } END { print p + 0, f + 0 }' "$log")
    passed=$((passed + p)) failed=$((failed + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
      # Crashed (signal, abort) before libtest could count a failure: count the binary.
      echo "!!! $(basename "$bin") exited with status $rc"
      failed=$((failed + 1))
    fi
  done
  echo "GPU suite: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  ;;
bench)
  status=0
  bins=("$pack"/benches/*)
  [ "${#bins[@]}" -gt 0 ] || { echo "no bench binaries in the pack"; exit 1; }
  for bin in "${bins[@]}"; do
    echo "=== $(basename "$bin")"
    "$bin" --bench "$@" || { echo "!!! $(basename "$bin") failed"; status=1; }
  done
  exit "$status"
  ;;
demo)
  "$pack/xtask" demo "$@"
  ;;
all)
  # One device call for everything a session must quote: the suite line, the demo, the benches.
  logs="${OUT:-$pack/logs}"
  mkdir -p "$logs"
  FP8KV_TEST_THREADS="${FP8KV_TEST_THREADS:-8}" bash "$pack/run.sh" tests 2>&1 | tee "$logs/tests.log"
  t=${PIPESTATUS[0]}
  bash "$pack/run.sh" demo 2>&1 | tee "$logs/demo.log"
  d=${PIPESTATUS[0]}
  bash "$pack/run.sh" bench "$@" 2>&1 | tee "$logs/bench.log"
  b=${PIPESTATUS[0]}
  grep -h "^GPU suite:" "$logs/tests.log"
  echo "tests exit $t, demo exit $d, bench exit $b"
  [ "$t" -eq 0 ] && [ "$d" -eq 0 ] && [ "$b" -eq 0 ]
  ;;
key-major)
  # One device call that checks the key-major kernels (DecodeStrategy::KeyMajor and the
  # MLA wide kernel) against the CPU reference and, only if they pass, measures them
  # against the default kernels.
  logs="${OUT:-$pack/logs}"
  mkdir -p "$logs"
  FP8KV_DECODE_TEST_PATHS=key-major,wide FP8KV_TEST_THREADS="${FP8KV_TEST_THREADS:-16}" \
    bash "$pack/run.sh" tests 2>&1 | tee "$logs/key-major-tests.log"
  t=${PIPESTATUS[0]}
  grep -h "^GPU suite:" "$logs/key-major-tests.log"
  [ "$t" -eq 0 ] || { echo "key-major tests failed: no bench"; exit 1; }
  "$pack/benches/decode" --bench --ab 2>&1 | tee "$logs/key-major-ab.log"
  ;;
model)
  # The GGUF travels in pieces (one transfer carries 64 MiB): put it together once.
  mkdir -p .models
  gguf=.models/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ ! -s "$gguf" ] && [ -e .xfer1/part ]; then cat .xfer*/part > "$gguf"; fi
  export FP8KV_MODEL_DIR="$PWD/.models" FP8KV_REQUIRE_MODEL=1
  FP8KV_TEST_BINS="model_loader model_smollm2" FP8KV_TEST_THREADS="${FP8KV_TEST_THREADS:-4}" \
    bash "$pack/run.sh" tests
  t=$?
  "$pack/xtask" demo --speed "$@"
  d=$?
  echo "model tests exit $t, demo exit $d"
  [ "$t" -eq 0 ] && [ "$d" -eq 0 ]
  ;;
suite)
  # One process per binary, all at once: each compiles its own kernels (about 1.4 s per
  # decode configuration on the H200 machine), which runs in parallel across processes.
  export FP8KV_REQUIRE_GPU=1
  logs="${OUT:-$pack/logs}"
  mkdir -p "$logs"
  bins=("$@")
  if [ "${#bins[@]}" -eq 0 ]; then
    for b in "$pack"/tests/*; do bins+=("$(basename "$b")"); done
  fi
  # gpu_decode checks its cases once per split kernel and alone took 491 s: one process per
  # kernel path (label|binary|FP8KV_DECODE_TEST_PATHS|filters); the CUDA-core process also
  # runs the tests that take no path, the others only the four that run every path.
  per_path="gpu_decode_matches_reference_on_every_case gpu_decode_many_splits_merge_exactly"
  per_path="$per_path gpu_decode_queries_beyond_f16_range gpu_decode_options_with_fp8"
  jobs=()
  for b in "${bins[@]}"; do
    if [ "$b" = gpu_decode ] && [ -z "${FP8KV_DECODE_TEST_PATHS:-}" ]; then
      jobs+=("gpu_decode.cuda|gpu_decode|cuda|" "gpu_decode.tensor|gpu_decode|tensor|$per_path"
        "gpu_decode.key-major|gpu_decode|key-major,wide|$per_path")
    else
      jobs+=("$b|$b|${FP8KV_DECODE_TEST_PATHS:-}|")
    fi
  done
  for j in "${jobs[@]}"; do
    IFS='|' read -r label b paths filt <<<"$j"
    (
      t0=$(date +%s)
      # $filt is a list of libtest name filters: split on purpose.
      # shellcheck disable=SC2086
      FP8KV_DECODE_TEST_PATHS="$paths" timeout "${FP8KV_SUITE_LIMIT:-560}" "$pack/tests/$b" $filt \
        --test-threads="${FP8KV_TEST_THREADS:-4}" >"$logs/$label.log" 2>&1
      echo "exit $? after $(($(date +%s) - t0)) s" >>"$logs/$label.log"
    ) &
  done
  wait
  passed=0 failed=0
  for j in "${jobs[@]}"; do
    b="${j%%|*}"
    read -r p f < <(awk '/^test result:/ {
        for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i }
      } END { print p + 0, f + 0 }' "$logs/$b.log")
    last="$(tail -1 "$logs/$b.log")"
    echo "$b: $p passed, $f failed ($last)"
    passed=$((passed + p)) failed=$((failed + f))
    # Killed by the limit or crashed before libtest counted a failure: count the binary.
    if [ "$last" != "${last#exit 0 }" ]; then :; elif [ "$f" -eq 0 ]; then failed=$((failed + 1)); fi
  done
  echo "GPU suite: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  ;;
sanitize)
  # Every kernel and path under NVIDIA's compute-sanitizer: memcheck (out-of-bounds and
  # misaligned accesses), racecheck (shared-memory hazards), initcheck (reads of uninitialised
  # device memory). Every (tool, binary) pair is its own process, all at once.
  san=/usr/local/cuda/bin/compute-sanitizer
  [ -x "$san" ] || san="$(command -v compute-sanitizer)" || { echo "no compute-sanitizer"; exit 1; }
  export FP8KV_REQUIRE_GPU=1
  logs="${OUT:-$pack/logs}"
  mkdir -p "$logs"
  # BIN or BIN:FILTER (a libtest name filter): the default reaches every kernel and path (the
  # decode test with forced many splits runs every split kernel, key-major and wide included,
  # and the combine; the Burn decode test the extension's path, pitched d80/d96 rows included;
  # gpu_layer the model's block kernels) in bounded time.
  specs=("$@")
  [ "${#specs[@]}" -gt 0 ] || specs=(gpu_codec gpu_fill_flatten gpu_stats gpu_layer
    gpu_decode:gpu_decode_many_splits_merge_exactly gpu_burn:gpu_burn_decode_equals_direct_path)
  for tool in ${FP8KV_SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
    for spec in "${specs[@]}"; do
      b="${spec%%:*}" filt="${spec#*:}"
      [ "$filt" != "$spec" ] || filt=""
      (
        timeout "${FP8KV_SUITE_LIMIT:-560}" "$san" --tool "$tool" --error-exitcode 9 \
          "$pack/tests/$b" $filt --test-threads="${FP8KV_TEST_THREADS:-4}" >"$logs/san-$tool-$b.log" 2>&1
        echo "exit $?" >>"$logs/san-$tool-$b.log"
      ) &
    done
  done
  wait
  status=0
  for f in "$logs"/san-*.log; do
    echo "=== $(basename "$f" .log)"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^test result|^exit " "$f" | tail -4
    tail -1 "$f" | grep -q "^exit 0$" || status=1
  done
  exit "$status"
  ;;
*)
  echo "usage: bash gpu-pack/run.sh tests [ARGS..] | suite [BIN..] | bench [FILTER] | demo | all [FILTER] | key-major | model | sanitize [BIN..]" >&2
  exit 2
  ;;
esac
"#;
