//! NVRTC from the PyPI wheels (`nvidia-cuda-nvrtc-cu12`, `nvidia-cuda-runtime-cu12`) through
//! `cudarc::nvrtc`, on a machine with no CUDA installation.

use std::ffi::{CStr, CString};
use std::path::Path;

/// Architecture flag `CudaRuntime` uses on an H100 (`sm_{arch}a` for arch >= 90).
const ARCH_FLAG: &str = "--gpu-architecture=sm_90a";

/// A loaded NVRTC and the include folder holding `cuda_fp8.h` and friends.
pub struct Nvrtc {
    include_flag: String,
    /// `--include-path` of the `crt/mma.h` stub, when the wheel lacks that header.
    stub_flag: Option<String>,
}

/// PTX and the ptxas report of one compiled kernel.
pub struct Compiled {
    /// The PTX text.
    pub ptx: String,
    /// NVRTC's program log (ptxas `-v` lines included).
    pub log: String,
    /// Registers per thread, from `ptxas info: Used N registers`.
    pub registers: Option<u32>,
    /// Spill stores and loads in bytes.
    pub spill: Option<(u32, u32)>,
}

impl Nvrtc {
    /// Loads `libnvrtc.so.12` from a `pip install --target DIR` folder.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let lib = dir.join("nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
        let include = dir.join("nvidia/cuda_runtime/include");
        if !lib.exists() || !include.join("cuda_fp8.h").exists() {
            return Err(format!(
                "NVRTC not found under {}; install it with\n  pip install --target {} \
                 nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79",
                dir.display(),
                dir.display()
            ));
        }
        // cudarc dlopens NVRTC by name ("libnvrtc.so.12"), and the loader's search path is
        // fixed at process start. Loading the wheel's copy by absolute path first makes that
        // later dlopen resolve to it (glibc matches already-loaded sonames), with no
        // LD_LIBRARY_PATH. The library stays loaded for the life of the process.
        // SAFETY: loading NVRTC runs only its (side-effect free) initialisers.
        let handle = unsafe { libloading::Library::new(&lib) }
            .map_err(|e| format!("loading {}: {e}", lib.display()))?;
        std::mem::forget(handle);
        // CubeCL's CUDA source for manual MMA includes <mma.h>, which includes "crt/mma.h";
        // the PyPI runtime wheel ships the former without the latter. The generated code uses
        // only its own inline-PTX `mma.sync` helpers, never the wmma API, so an empty stub
        // (in a folder of its own inside DIR, searched after the real headers) is enough here.
        let mut stub_flag = None;
        if !include.join("crt/mma.h").exists() {
            let stub = dir.join("fp8kv-stub-include");
            std::fs::create_dir_all(stub.join("crt")).map_err(|e| format!("{stub:?}: {e}"))?;
            std::fs::write(
                stub.join("crt/mma.h"),
                "// fp8kv xtask: stub for offline PTX checks (no wmma API used)\n",
            )
            .map_err(|e| format!("{stub:?}: {e}"))?;
            stub_flag = Some(format!("--include-path={}", stub.display()));
        }
        Ok(Self {
            include_flag: format!("--include-path={}", include.display()),
            stub_flag,
        })
    }

    /// Compiles one CUDA C++ source to PTX for `sm_90a`; `Err` holds NVRTC's log.
    pub fn compile(&self, source: &str, name: &str) -> Result<Compiled, String> {
        use cudarc::nvrtc::result;
        let src = CString::new(source).map_err(|e| e.to_string())?;
        let cname = CString::new(format!("{name}.cu")).map_err(|e| e.to_string())?;
        let mut options = vec![
            ARCH_FLAG,
            self.include_flag.as_str(),
            "-lineinfo",
            // Real-architecture target: NVRTC runs ptxas too, and -v puts its report in the log.
            "--ptxas-options=-v",
        ];
        options.extend(self.stub_flag.as_deref());
        // SAFETY: NVRTC FFI; `src` and `cname` outlive the program, which is destroyed below.
        unsafe {
            let program = result::create_program(src.as_c_str(), Some(cname.as_c_str()))
                .map_err(|e| format!("nvrtcCreateProgram: {e:?}"))?;
            let compiled = result::compile_program(program, &options);
            let log = result::get_program_log(program)
                .map(|raw| CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned())
                .unwrap_or_default();
            let out = match compiled {
                Err(e) => Err(format!("{e:?}\n{log}")),
                Ok(()) => result::get_ptx(program)
                    .map_err(|e| format!("nvrtcGetPTX: {e:?}"))
                    .map(|raw| {
                        let ptx = CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned();
                        Compiled {
                            ptx,
                            registers: parse_registers(&log),
                            spill: parse_spill(&log),
                            log,
                        }
                    }),
            };
            let _ = result::destroy_program(program);
            out
        }
    }
}

/// The number before `registers` in `ptxas info    : Used 24 registers, ...`.
fn parse_registers(log: &str) -> Option<u32> {
    log.lines()
        .filter_map(|line| {
            let (n, tail) = line.split("Used ").nth(1)?.split_once(' ')?;
            tail.starts_with("registers").then(|| n.parse().ok())?
        })
        .max()
}

/// `N bytes spill stores, M bytes spill loads` (summed over the functions in the log).
fn parse_spill(log: &str) -> Option<(u32, u32)> {
    let mut found = None;
    for line in log.lines() {
        let num_before = |key: &str| -> Option<u32> {
            let head = line.split(key).next()?;
            head.trim_end()
                .rsplit(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        if line.contains("bytes spill stores") {
            let st = num_before(" bytes spill stores")?;
            let ld = num_before(" bytes spill loads").unwrap_or(0);
            let (s0, l0) = found.unwrap_or((0, 0));
            found = Some((s0 + st, l0 + ld));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "ptxas info    : 0 bytes gmem\n\
        ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
        ptxas info    : Function properties for k\n\
        \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
        ptxas info    : Used 24 registers, used 0 barriers, 380 bytes cmem[0]\n";

    #[test]
    fn ptxas_report_is_parsed() {
        assert_eq!(parse_registers(LOG), Some(24));
        assert_eq!(parse_spill(LOG), Some((4, 12)));
    }
}
