//! `cargo xtask codegen [--ptx]`: every kernel instantiation to CUDA C++ (and PTX) without a GPU.
//!
//! `samples.rs` has, per kernel family, a hook that launches all of its instantiations through
//! the public entry points on a client of any runtime. Here that client belongs to
//! [`offline::OfflineCuda`], whose server compiles instead of running, so the captured source
//! is exactly what the family's real launch path would JIT on an H100. With `--ptx` the source then goes through NVRTC from the PyPI wheels in `.nvrtc/`
//! (`sm_90a`, `--ptxas-options=-v`), which also reports registers and spills per kernel.

mod compare;
pub mod nvrtc;
pub mod offline;
mod samples;

#[cfg(test)]
mod entry_checks;

use std::collections::BTreeSet;
use std::fmt::Display;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use cubecl::client::ComputeClient;
use cubecl::Runtime;

use offline::{CapturedKernel, OfflineCuda};

type Client = ComputeClient<OfflineCuda>;

/// A kernel family: a name for the table and the hook launching all its instantiations.
struct Family {
    name: &'static str,
    launch: fn(&Client) -> Result<(), String>,
}

/// Adapts a family hook with its own error type to the table's `String` errors.
fn hook<E: Display>(r: Result<(), E>) -> Result<(), String> {
    r.map_err(|e| e.to_string())
}

/// Every family `codegen` covers. New kernel families add one line here.
fn families() -> Vec<Family> {
    vec![
        Family {
            name: "fill",
            launch: |c| hook(samples::fill_samples(c)),
        },
        Family {
            name: "flatten",
            launch: |c| hook(samples::flatten_samples(c)),
        },
        Family {
            name: "stats",
            launch: |c| hook(samples::stats_samples(c)),
        },
        Family {
            name: "decode",
            launch: |c| hook(samples::decode_samples(c)),
        },
        Family {
            name: "layer",
            launch: |c| hook(samples::layer_samples(c)),
        },
    ]
}

/// Options of the `codegen` subcommand.
struct Options {
    ptx: bool,
    out_dir: PathBuf,
    nvrtc_dir: PathBuf,
    verbose: bool,
    against: Option<PathBuf>,
}

/// `--depth N` of `codegen` and `emulate`: every later tensor-core decode launch runs its loads
/// N blocks ahead (`fp8kv::internals::override_decode_depth`).
pub(crate) fn override_depth(value: Option<&String>) -> Result<(), String> {
    let d = value.ok_or("--depth needs 1 or 2")?;
    match d.parse::<u32>() {
        Ok(n @ 1..=2) => {
            fp8kv::internals::override_decode_depth(Some(n));
            Ok(())
        }
        _ => Err(format!("--depth: `{d}` is not 1 or 2")),
    }
}

fn parse(args: &[String], root: &Path) -> Result<Options, String> {
    let mut o = Options {
        ptx: false,
        out_dir: root.join("target/codegen"),
        nvrtc_dir: std::env::var_os("FP8KV_NVRTC_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".nvrtc")),
        verbose: false,
        against: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--ptx" => o.ptx = true,
            "--verbose" | "-v" => o.verbose = true,
            "--out" => o.out_dir = it.next().ok_or("--out needs a folder")?.into(),
            "--nvrtc" => o.nvrtc_dir = it.next().ok_or("--nvrtc needs a folder")?.into(),
            "--against" => o.against = Some(it.next().ok_or("--against needs a folder")?.into()),
            "--depth" => override_depth(it.next())?,
            other => return Err(format!("codegen: unknown argument `{other}`")),
        }
    }
    Ok(o)
}

/// One row of the report.
struct Row {
    family: &'static str,
    /// Entry point, plus `__N` for the N-th comptime variant of one entry point.
    name: String,
    kernel: CapturedKernel,
    regs: Option<u32>,
    spill: Option<(u32, u32)>,
    error: Option<String>,
}

/// A kernel that counts cube arrivals with atomics (the decode split kernels' fused merge)
/// must fence its writes before and its reads after: `combine::device_fence` emits CUDA's
/// `__threadfence();` through a comment that closes itself (CubeCL 0.10's IR has no fence), so
/// the generated source must hold it as a statement, twice (`decode_fused_merge_emits_the_fence`).
fn fence_check(source: &str) -> Result<(), String> {
    let fenced = source.matches("/* */ __threadfence(); /*").count();
    match (source.contains("atomicAdd("), source.contains("atomicExch(")) {
        (true, true) if fenced != 2 => Err(format!(
            "decode_fused_merge_emits_the_fence: the merge's arrival needs 2 fences, the source has {fenced}"
        )),
        _ => Ok(()),
    }
}

/// `codec::satfinite_casts`' define, as the kernel source holds it: every float → FP8 cast
/// after it issues the hardware's saturating convert instead of CUDA's software routine.
const SATFINITE_DEFINE: &str = "#define __NV_NOSAT __NV_SATFINITE";

/// A kernel that casts to FP8 (fill) must do so after [`SATFINITE_DEFINE`]: cubecl-cpp 0.10
/// writes the casts with `__NV_NOSAT` (NaN beyond the range, a slow software routine), and the
/// define is what turns them into `cvt.rn.satfinite` (`fill_converts_on_the_hardware`).
fn satfinite_check(source: &str) -> Result<(), String> {
    match source.find("_to_fp8") {
        Some(at) if !source[..at].contains(SATFINITE_DEFINE) => Err(
            "fill_converts_on_the_hardware: an FP8 cast precedes codec::satfinite_casts' define"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// Runs the subcommand; `root` is the workspace root.
pub fn run(args: &[String], root: &Path) -> Result<(), String> {
    let opts = parse(args, root)?;
    let nvrtc = if opts.ptx {
        Some(nvrtc::Nvrtc::load(&opts.nvrtc_dir)?)
    } else {
        None
    };
    let client = OfflineCuda::client(&Default::default());
    let mut rows = Vec::new();
    let mut family_errors = Vec::new();
    for fam in families() {
        // A hook that panics (a launcher's assert, say) fails its family, not the whole run.
        let launched = std::panic::catch_unwind(AssertUnwindSafe(|| (fam.launch)(&client)))
            .unwrap_or_else(|_| Err("the hook panicked (message above)".into()));
        // Launches are queued to the server's thread; sync so all of them are captured.
        let _ = cubecl::future::block_on(client.sync());
        let captured = offline::drain_captured();
        if let Err(e) = launched {
            family_errors.push(format!("{}: {e}", fam.name));
        } else if captured.is_empty() {
            family_errors.push(format!("{}: the hook launched no kernel", fam.name));
        }
        let mut seen = BTreeSet::new();
        for k in captured {
            // The same instantiation launched for several cases is compiled once.
            if seen.insert(k.id.clone()) {
                rows.push(Row {
                    family: fam.name,
                    name: String::new(),
                    kernel: k,
                    regs: None,
                    spill: None,
                    error: None,
                });
            }
        }
    }

    std::fs::create_dir_all(&opts.out_dir).map_err(|e| format!("{:?}: {e}", opts.out_dir))?;
    let mut names = BTreeSet::new();
    for row in &mut rows {
        let stem = unique_stem(&mut names, row.family, &row.kernel.entrypoint);
        row.name = stem[row.family.len() + 2..].to_string();
        let source = match &row.kernel.source {
            Ok(s) => s,
            Err(e) => {
                row.error = Some(format!("cubecl: {e}"));
                continue;
            }
        };
        write(&opts.out_dir.join(format!("{stem}.cu")), source)?;
        if let Err(e) = fence_check(source).and_then(|()| satfinite_check(source)) {
            row.error = Some(e);
            continue;
        }
        if let Some(nvrtc) = &nvrtc {
            match nvrtc.compile(source, &row.kernel.entrypoint) {
                Ok(out) => {
                    write(&opts.out_dir.join(format!("{stem}.ptx")), &out.ptx)?;
                    row.regs = out.registers;
                    row.spill = out.spill;
                    if opts.verbose {
                        println!("--- {stem}\n{}", out.log.trim());
                    }
                }
                Err(log) => row.error = Some(format!("nvrtc:\n{log}")),
            }
        }
    }
    print_table(&rows, opts.ptx);
    println!("sources written to {}", opts.out_dir.display());
    if opts.ptx {
        let regs: String = rows
            .iter()
            .map(|r| {
                let regs = r.regs.map_or("-".into(), |v| v.to_string());
                format!("{}__{}\t{regs}\n", r.family, r.name)
            })
            .collect();
        write(&opts.out_dir.join(compare::REGISTERS_FILE), &regs)?;
    }

    let failed: Vec<_> = rows.iter().filter(|r| r.error.is_some()).collect();
    for r in &failed {
        eprintln!(
            "\nFAIL {} / {}:\n{}",
            r.family,
            r.name,
            r.error.as_deref().unwrap_or_default()
        );
    }
    for e in &family_errors {
        eprintln!("FAIL family {e}");
    }
    if failed.is_empty() && family_errors.is_empty() {
        println!("codegen: {} kernels ok", rows.len());
        match (&opts.against, opts.ptx) {
            (Some(old), true) => compare::compare(old, &opts.out_dir),
            (Some(_), false) => Err("--against compares PTX: add --ptx".into()),
            (None, _) => Ok(()),
        }
    } else {
        Err(format!(
            "codegen: {} kernel(s) and {} famil(y/ies) failed",
            failed.len(),
            family_errors.len()
        ))
    }
}

/// `family__entrypoint`, with `__2`, `__3`.. for comptime variants of one entry point.
fn unique_stem(names: &mut BTreeSet<String>, family: &str, entry: &str) -> String {
    let base = format!("{family}__{entry}");
    let mut stem = base.clone();
    let mut n = 2;
    while !names.insert(stem.clone()) {
        stem = format!("{base}__{n}");
        n += 1;
    }
    stem
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn print_table(rows: &[Row], ptx: bool) {
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(6).max(6);
    println!(
        "{:<8} {:<w$} {:>14} {:>9} {:>5} {:>13} status",
        "family", "kernel", "cube_dim", "mode", "regs", "spill st/ld"
    );
    for r in rows {
        let (x, y, z) = r.kernel.cube_dim;
        let regs = r.regs.map_or("-".into(), |v| v.to_string());
        let spill = r.spill.map_or("-".into(), |(s, l)| format!("{s}/{l} B"));
        let status = match (&r.error, ptx) {
            (Some(_), _) => "FAIL",
            (None, true) => "ok (ptx)",
            (None, false) => "ok (source)",
        };
        println!(
            "{:<8} {:<w$} {:>14} {:>9} {:>5} {:>13} {status}",
            r.family,
            r.name,
            format!("{x}x{y}x{z}"),
            r.kernel.mode,
            regs,
            spill
        );
    }
}

#[cfg(test)]
mod source_checks {
    use super::*;

    #[test]
    fn fp8_casts_must_follow_the_satfinite_define() {
        let cast = "l_0 = __nv_cvt_float2_to_fp8x2(float2 { a, b }, __NV_NOSAT, __NV_E4M3);";
        let defined = format!("/* */\n{SATFINITE_DEFINE}\n/* */\n{cast}");
        assert!(satfinite_check(&defined).is_ok());
        assert!(satfinite_check(cast).is_err());
        let late = format!("{cast}\n/* */\n{SATFINITE_DEFINE}\n/* */");
        assert!(satfinite_check(&late).is_err());
        // Decoding (FP8 → half) needs no define.
        assert!(satfinite_check("h = __nv_cvt_fp8x2_to_halfraw2(c, __NV_E4M3);").is_ok());
    }
}
