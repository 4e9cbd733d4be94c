//! `cargo xtask emulate [--nvrtc DIR] [--out DIR] [--depth 1|2]`: runs the decode split kernels' generated
//! CUDA C++ (CUDA-core, tensor-core and key-major) on the CPU, without a GPU, and checks what
//! they compute; and the statistics kernel (`emu/stats_driver.cpp`), whose warp reduction
//! and spread atomics `fill_with_stats` shares.
//!
//! For each case below the launch goes through the real entry (`paged_decode` with a forced `DecodeStrategy`) on the
//! offline runtime of `codegen`, which captures the split kernel's source exactly as the CUDA
//! runtime would JIT it. That source is compiled with the host C++ compiler against
//! `xtask/emu/emu.h` (threads for CUDA threads, barriers for `__syncthreads` and the warp
//! collectives, `mma.sync` from the PTX fragment layouts) and `xtask/emu/driver.cpp`, which
//! feeds it random paged input and compares every partial state with a double-precision
//! reference. A build with the tensor-core B fragment's pairs swapped must fail: the check can
//! fail.
//!
//! Needs `g++` (C++20) and the CUDA headers from PyPI in `.nvrtc/` (or `--nvrtc DIR` /
//! `FP8KV_NVRTC_DIR`): the `nvidia-cuda-runtime-cu12`, `nvidia-cuda-nvcc-cu12` (for
//! `crt/host_defines.h`) and `nvidia-cuda-cccl-cu12` (for `nv/target`) wheels.

use std::path::{Path, PathBuf};
use std::process::Command;

use cubecl::Runtime;

use crate::codegen::offline::{self, OfflineCuda};
use fp8kv::device::{DeviceBatch, DeviceRows, PagedKvCache};
use fp8kv::{
    decode_plan, paged_decode, AttentionOptions, CombineChoice, DecodeOptions, DecodeStrategy,
};
use fp8kv::{BatchMetadata, Dtype, KvLayoutKind, KvScales, PagedKvLayout, QuantPolicy};

/// One kernel instantiation to emulate.
struct Case {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    dk: usize,
    dv: usize,
    page: usize,
    cache: Dtype,
    /// New tokens per sequence at launch: with the group it picks one or two row tiles.
    q_len: usize,
    /// Softcap, ALiBi and a window on.
    opts: bool,
    path: DecodeStrategy,
}

fn cases() -> Vec<Case> {
    let base = Case {
        name: "",
        heads: 32,
        kv_heads: 8,
        dk: 128,
        dv: 128,
        page: 64,
        cache: Dtype::E4m3,
        q_len: 1,
        opts: false,
        path: DecodeStrategy::TensorCores,
    };
    // The CUDA-core kernel, the tensor-core one and its key-major variant.
    let both = |name: &'static str, c: Case| {
        [
            DecodeStrategy::CudaCores,
            DecodeStrategy::TensorCores,
            DecodeStrategy::KeyMajor,
        ]
        .map(|path| Case { name, path, ..c })
    };
    let mut out = Vec::new();
    out.extend(both("llama_e4m3", Case { ..base }));
    out.extend(both(
        "llama_e5m2",
        Case {
            cache: Dtype::E5m2,
            ..base
        },
    ));
    out.extend(both(
        "llama_bf16",
        Case {
            cache: Dtype::Bf16,
            ..base
        },
    ));
    out.extend(both("llama_two_row_tiles", Case { q_len: 3, ..base }));
    // Head dim 64: SmolLM2-135M's 9 / 3 heads (group 3), Llama-3.2-1B's group 4.
    out.extend(both(
        "smollm2_d64",
        Case {
            heads: 9,
            kv_heads: 3,
            dk: 64,
            dv: 64,
            ..base
        },
    ));
    out.extend(both(
        "llama1b_d64",
        Case {
            dk: 64,
            dv: 64,
            ..base
        },
    ));
    out.extend(both(
        "gqa8_page16_options",
        Case {
            kv_heads: 4,
            page: 16,
            opts: true,
            ..base
        },
    ));
    out.extend(both(
        "gemma_d256",
        Case {
            heads: 16,
            dk: 256,
            dv: 256,
            ..base
        },
    ));
    let mla = Case {
        heads: 16,
        kv_heads: 1,
        dk: 576,
        dv: 512,
        path: DecodeStrategy::Wide,
        ..base
    };
    out.push(Case {
        name: "mla_e4m3",
        ..mla
    });
    out.push(Case {
        name: "mla_e4m3",
        path: DecodeStrategy::CudaCores,
        ..mla
    });
    out.push(Case {
        name: "mla_bf16",
        cache: Dtype::Bf16,
        ..mla
    });
    out.push(Case {
        name: "mla_group8_options",
        heads: 8,
        page: 32,
        opts: true,
        ..mla
    });
    out
}

/// Launches `c` on the offline runtime and returns its split kernel's entry, source, threads
/// per cube and whether it merges the splits itself.
fn capture(c: &Case) -> Result<(String, String, u32, bool), String> {
    let e = |x: fp8kv::Fp8KvError| x.to_string();
    let client = OfflineCuda::client(&Default::default());
    let policy = match c.cache {
        Dtype::E4m3 => QuantPolicy::Fp8E4m3,
        Dtype::E5m2 => QuantPolicy::Fp8E5m2,
        _ => QuantPolicy::None,
    };
    let layout =
        PagedKvLayout::new(4, c.page, c.kv_heads, c.dk, c.dv, KvLayoutKind::Bshd).map_err(e)?;
    let cache =
        PagedKvCache::new(&client, layout, policy, c.cache, KvScales::default()).map_err(e)?;
    let q_len = c.q_len as i32;
    let meta = BatchMetadata::new(vec![0], vec![q_len], vec![2 * c.page as i32], vec![0, 1], 2)
        .map_err(e)?;
    let batch = DeviceBatch::new(&client, meta, &layout, c.q_len).map_err(e)?;
    let q = DeviceRows::empty(
        &client,
        Dtype::Bf16,
        c.q_len,
        c.heads * c.dk,
        c.heads * c.dk,
    )
    .map_err(e)?;
    let mut out = DeviceRows::empty(
        &client,
        Dtype::Bf16,
        c.q_len,
        c.heads * c.dv,
        c.heads * c.dv,
    )
    .map_err(e)?;
    let opts = if c.opts {
        AttentionOptions {
            window: Some(64),
            softcap: Some(30.0),
            alibi_slopes: Some(vec![0.1; c.heads]),
            ..Default::default()
        }
    } else {
        AttentionOptions::default()
    };
    offline::drain_captured();
    // The merge in the split kernel (the launch's one split fits it): the driver checks the
    // merged output and the counters too.
    let opts = DecodeOptions::new(opts)
        .with_strategy(c.path)
        .with_combine(CombineChoice::InKernel);
    let fused = decode_plan(&cache, &batch, Dtype::Bf16, c.heads, &opts)
        .map_err(e)?
        .combine_in_kernel;
    paged_decode(&q, &cache, &batch, &opts, &mut out).map_err(e)?;
    let (entry, cuda, threads) = captured(&client, "decode_split_")?;
    Ok((entry, cuda, threads, fused))
}

/// The captured source made host C++: no CUDA runtime or WMMA header, the shared-memory
/// declaration left to emu.h, and the `mma.sync` asm replaced by emu.h's `emu_mma` (which a
/// tensor-core kernel must have).
fn host_source(cuda: &str, tensor_cores: bool) -> Result<String, String> {
    // The shared-memory declaration (any alignment) goes: emu.h defines the array.
    let mut s: String = cuda
        .lines()
        .filter(|l| !l.starts_with("extern __shared__"))
        .map(|l| format!("{l}\n"))
        .collect();
    s = s
        .replace("#include <cuda_runtime.h>\n", "")
        .replace("#include <mma.h>\n", "")
        .replace("inline __device__ void", "inline void");
    let args = "reg_a_0, reg_a_1, reg_a_2, reg_a_3, reg_b_0, reg_b_1, reg_c_0, reg_c_1, reg_c_2, \
                reg_c_3, reg_d_0, reg_d_1, reg_d_2, reg_d_3";
    let mut replaced = 0;
    for (ty, half) in [("f16", "__half"), ("bf16", "__nv_bfloat16")] {
        let head = format!("asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32\"");
        while let Some(at) = s.find(&head) {
            let end = s[at..].find(");").ok_or("unterminated mma asm")? + at + 2;
            s.replace_range(at..end, &format!("emu_mma<{half}>({args});"));
            replaced += 1;
        }
    }
    if tensor_cores && replaced == 0 {
        return Err("no mma.sync asm found in the kernel source".into());
    }
    Ok(s)
}

fn path_name(path: DecodeStrategy) -> &'static str {
    path.name()
}

/// Options of the subcommand.
struct Options {
    nvrtc_dir: PathBuf,
    out_dir: PathBuf,
}

/// Runs the subcommand; `root` is the workspace root.
pub fn run(args: &[String], root: &Path) -> Result<(), String> {
    let mut o = Options {
        nvrtc_dir: std::env::var_os("FP8KV_NVRTC_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".nvrtc")),
        out_dir: root.join("target/emulate"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nvrtc" => o.nvrtc_dir = it.next().ok_or("--nvrtc needs a folder")?.into(),
            "--out" => o.out_dir = it.next().ok_or("--out needs a folder")?.into(),
            "--depth" => crate::codegen::override_depth(it.next())?,
            other => return Err(format!("emulate: unknown argument `{other}`")),
        }
    }
    let nv = o.nvrtc_dir.join("nvidia");
    let includes = [
        nv.join("cuda_runtime/include"),
        nv.join("cuda_nvcc/include"),
        nv.join("cuda_cccl/include"),
    ];
    for (dir, file) in includes
        .iter()
        .zip(["cuda_fp8.h", "crt/host_defines.h", "nv/target"])
    {
        if !dir.join(file).exists() {
            return Err(format!(
                "{} not found: install the CUDA headers with `pip install --target {} \
                 nvidia-cuda-runtime-cu12==12.9.79 nvidia-cuda-nvcc-cu12==12.9.86 \
                 nvidia-cuda-cccl-cu12==12.9.27`",
                dir.join(file).display(),
                o.nvrtc_dir.display()
            ));
        }
    }
    std::fs::create_dir_all(&o.out_dir).map_err(|e| format!("{}: {e}", o.out_dir.display()))?;
    let emu = root.join("xtask/emu");
    let mut failures = Vec::new();
    let mut self_check_done = false;
    for c in cases() {
        let label = format!("{} ({})", c.name, path_name(c.path));
        // The self-check swaps an MMA fragment layout: the first tensor-core case carries it.
        let self_check = !self_check_done && c.path != DecodeStrategy::CudaCores;
        self_check_done |= self_check;
        let result = emulate_case(&c, &label, &emu, &includes, &o.out_dir, self_check);
        if let Err(e) = result {
            println!("FAIL {label}: {e}");
            failures.push(label);
        }
    }
    if let Err(e) = emulate_stats(&emu, &includes, &o.out_dir) {
        println!("FAIL kv_stats: {e}");
        failures.push("kv_stats".into());
    }
    if failures.is_empty() {
        println!("emulate: every case matches the reference");
        Ok(())
    } else {
        Err(format!(
            "emulate: {} case(s) failed: {}",
            failures.len(),
            failures.join(", ")
        ))
    }
}

/// Builds `emu/{driver}` with the host's g++ against emu.h and the CUDA headers, with `args`
/// (the driver's `-D` configuration and any extra flag), into `bin`.
fn gxx(
    emu: &Path,
    includes: &[PathBuf],
    args: &[&str],
    driver: &str,
    bin: &Path,
) -> Result<(), String> {
    let mut cmd = Command::new("g++");
    cmd.args(["-std=c++20", "-O1", "-w", "-pthread"]);
    for dir in includes {
        cmd.arg("-I").arg(dir);
    }
    cmd.arg("-I").arg(emu).args(args);
    cmd.arg(emu.join(driver)).arg("-o").arg(bin);
    let out = cmd.output().map_err(|e| format!("running g++: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "g++ failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Syncs `client` and takes the captured kernel whose entry starts with `prefix`: its entry,
/// CUDA source and threads per cube.
fn captured(
    client: &cubecl::client::ComputeClient<OfflineCuda>,
    prefix: &str,
) -> Result<(String, String, u32), String> {
    let _ = cubecl::future::block_on(client.sync());
    let k = offline::drain_captured()
        .into_iter()
        .find(|k| k.entrypoint.starts_with(prefix))
        .ok_or_else(|| format!("no {prefix} kernel was launched"))?;
    let threads = k.cube_dim.0 * k.cube_dim.1 * k.cube_dim.2;
    Ok((k.entrypoint, k.source?, threads))
}

/// The statistics kernel (bf16 rows, K 1024 and V 512 wide): captured from `kv_stats`, run
/// by `emu/stats_driver.cpp` on random rows with a NaN per side and pitched rows, its copies
/// of the four accumulated words folded and checked exactly against a CPU fold. It covers the
/// warp reduction and the spread atomics that `fill_with_stats` shares.
fn emulate_stats(emu: &Path, includes: &[PathBuf], out_dir: &Path) -> Result<(), String> {
    let e = |x: fp8kv::Fp8KvError| x.to_string();
    let client = OfflineCuda::client(&Default::default());
    let (kw, vw) = (1024, 512);
    let k = DeviceRows::empty(&client, Dtype::Bf16, 4, kw, kw).map_err(e)?;
    let v = DeviceRows::empty(&client, Dtype::Bf16, 4, vw, vw).map_err(e)?;
    let mut stats = fp8kv::DeviceKvStats::new(&client);
    let _ = cubecl::future::block_on(client.sync());
    offline::drain_captured();
    fp8kv::kv_stats(
        &mut stats,
        &k,
        &v,
        &KvScales::default(),
        QuantPolicy::Fp8E4m3,
    )
    .map_err(e)?;
    let (entry, cuda, threads) = captured(&client, "kv_stats_kernel")?;
    // Vectors per cube, as the kernel's first index computation has it.
    let per_cube: u32 = cuda
        .split("blockIdx.x * uint32(")
        .nth(1)
        .and_then(|t| t.split(')').next())
        .and_then(|n| n.parse().ok())
        .ok_or("no `blockIdx.x * uint32(N)` in the stats kernel")?;
    let inc = out_dir.join("kv_stats.inc");
    std::fs::write(&inc, host_source(&cuda, false)?)
        .map_err(|e| format!("{}: {e}", inc.display()))?;
    let bin = out_dir.join("kv_stats");
    let defines = [
        format!("-DKSRC=\"{}\"", inc.display()),
        format!("-DKNAME={entry}"),
        format!("-DKVPR={}", kw / 8),
        format!("-DVVPR={}", vw / 8),
        format!("-DTHREADS={threads}"),
        format!("-DPER_CUBE={per_cube}"),
        format!("-DSTATS_COPIES={}", fp8kv::internals::STATS_LAYOUT.0),
        format!("-DSTATS_STRIDE={}", fp8kv::internals::STATS_LAYOUT.1),
    ];
    let args: Vec<&str> = defines.iter().map(String::as_str).collect();
    gxx(emu, includes, &args, "stats_driver.cpp", &bin)?;
    for seed in ["1", "2"] {
        let out = Command::new(&bin)
            .arg(seed)
            .output()
            .map_err(|e| format!("running {}: {e}", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!(
            "kv_stats, seed {seed}: {}",
            text.lines().last().unwrap_or("")
        );
        if !out.status.success() {
            return Err(format!("mismatches (seed {seed}):\n{text}"));
        }
    }
    Ok(())
}

/// Captures, builds and runs one case; with `self_check`, also a build with the B fragment's
/// pairs swapped, which must fail.
fn emulate_case(
    c: &Case,
    label: &str,
    emu: &Path,
    includes: &[PathBuf],
    out_dir: &Path,
    self_check: bool,
) -> Result<(), String> {
    let (entry, cuda, threads, fused) = capture(c)?;
    let stem = format!("{}_{}", c.name, path_name(c.path));
    let inc = out_dir.join(format!("{stem}.inc"));
    let tensor_cores = c.path != DecodeStrategy::CudaCores;
    std::fs::write(&inc, host_source(&cuda, tensor_cores)?)
        .map_err(|e| format!("{}: {e}", inc.display()))?;
    // Rows per cube as the launcher picks them for this launch's group × new tokens.
    let max_rows = c.heads / c.kv_heads * c.q_len;
    let rows = if !tensor_cores {
        max_rows.clamp(1, fp8kv::internals::MAX_ROWS_PER_CUBE)
    } else if max_rows <= 8 {
        8
    } else {
        16
    };
    let cache_code = match c.cache {
        Dtype::E4m3 => 0,
        Dtype::E5m2 => 1,
        _ => 2,
    };
    let defines = [
        format!("-DKSRC=\"{}\"", inc.display()),
        format!("-DKNAME={entry}"),
        format!("-DWIDE={}", u8::from(tensor_cores && c.dk > 256)),
        format!("-DHEADS={}", c.heads),
        format!("-DKVH={}", c.kv_heads),
        format!("-DDK={}", c.dk),
        format!("-DDV={}", c.dv),
        format!("-DPAGE={}", c.page),
        format!("-DROWS={rows}"),
        "-DSPLIT=192".to_string(),
        format!("-DTHREADS={threads}"),
        format!("-DCACHE={cache_code}"),
        format!("-DOPTS={}", u8::from(c.opts)),
        format!("-DFUSED={}", u8::from(fused)),
    ];
    let build = |bin: &Path, extra: &[&str]| {
        let args: Vec<&str> = defines
            .iter()
            .map(String::as_str)
            .chain(extra.iter().copied())
            .collect();
        gxx(emu, includes, &args, "driver.cpp", bin)
    };
    let bin = out_dir.join(&stem);
    build(&bin, &[])?;
    // Two seeds for the experimental key-major kernels, one for the GPU-verified ones.
    let seeds: &[&str] = if matches!(c.path, DecodeStrategy::KeyMajor | DecodeStrategy::Wide) {
        &["1", "2"]
    } else {
        &["1"]
    };
    for seed in seeds {
        let out = Command::new(&bin)
            .arg(seed)
            .output()
            .map_err(|e| format!("running {}: {e}", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = text.lines().last().unwrap_or("");
        println!("{label}, seed {seed}: {summary}");
        if !out.status.success() {
            return Err(format!("mismatches (seed {seed}):\n{text}"));
        }
    }
    if self_check {
        let broken = out_dir.join(format!("{stem}_broken"));
        build(&broken, &["-DEMU_BREAK"])?;
        let status = Command::new(&broken)
            .arg("1")
            .output()
            .map_err(|e| format!("running {}: {e}", broken.display()))?
            .status;
        if status.success() {
            return Err("the self-check passed with a wrong fragment layout".into());
        }
        println!("{label}: a wrong B fragment layout fails the check, as it must");
    }
    Ok(())
}
