//! Loading per-layer K/V scales from safetensors checkpoints (`fp8kv::checkpoint`), on small
//! files the tests write themselves. Expected values are written as literal bit patterns
//! (decoded by hand in the comments), not computed by the loader's conversions.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use fp8kv::checkpoint::{
    kv_scales_from_bytes, kv_scales_from_shard_bytes, load_kv_scales, load_kv_scales_sharded,
    LoadedScales, ScaleWarning,
};
use fp8kv::{Fp8KvError, KvScales, KvSide};
use safetensors::tensor::{Dtype, TensorView};

/// One tensor to write: name, dtype, shape, little-endian bytes.
type Tensor = (&'static str, Dtype, Vec<usize>, Vec<u8>);

/// A temporary directory (unique per process and call) removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fp8kv-checkpoint-{}-{test}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn views(tensors: &[Tensor]) -> Vec<(String, TensorView<'_>)> {
    tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                name.to_string(),
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect()
}

fn write(path: &Path, tensors: &[Tensor]) {
    safetensors::serialize_to_file(views(tensors), None, path).unwrap();
}

fn to_bytes(tensors: &[Tensor]) -> Vec<u8> {
    safetensors::serialize(views(tensors), None).unwrap()
}

fn f32_scalar(name: &'static str, x: f32, shape: &[usize]) -> Tensor {
    (name, Dtype::F32, shape.to_vec(), x.to_le_bytes().to_vec())
}

fn bits16(name: &'static str, dtype: Dtype, bits: u16, shape: &[usize]) -> Tensor {
    (name, dtype, shape.to_vec(), bits.to_le_bytes().to_vec())
}

fn scales(k: f32, v: f32) -> KvScales {
    KvScales::new(k, v).unwrap()
}

/// A weight tensor next to the scales: the loader must skip it (and never read it).
fn weight() -> Tensor {
    let bytes = (0..64 * 64 * 2).map(|i| (i * 7 % 251) as u8).collect();
    (
        "model.layers.0.self_attn.k_proj.weight",
        Dtype::BF16,
        vec![64, 64],
        bytes,
    )
}

#[test]
fn scales_in_each_spelling_and_dtype_load_exactly() {
    let dir = TempDir::new("spellings");
    let path = dir.path("model.safetensors");
    write(
        &path,
        &[
            weight(),
            // Layer 0: per-side names, F32 of shape [] and F16 of shape [1].
            // 0.0234375 = 3/128 is exact in f32; f16 0x2E00: exponent 11 - 15 = -4, mantissa
            // 1.5 → 0.09375.
            f32_scalar("model.layers.0.self_attn.k_scale", 0.0234375, &[]),
            bits16("model.layers.0.self_attn.v_scale", Dtype::F16, 0x2E00, &[1]),
            // Layer 1: the k_proj / v_proj output_scale spelling, BF16. 0x3D80: exponent
            // 123 - 127 = -4 → 0.0625; 0x3E20: exponent -3, mantissa 1.25 → 0.15625.
            bits16(
                "model.layers.1.self_attn.k_proj.output_scale",
                Dtype::BF16,
                0x3D80,
                &[],
            ),
            bits16(
                "model.layers.1.self_attn.v_proj.output_scale",
                Dtype::BF16,
                0x3E20,
                &[1],
            ),
            // Layer 2: the single kv_scale, the same for K and V.
            f32_scalar("model.layers.2.self_attn.kv_scale", 0.5, &[1]),
            // Layer 3 is past num_layers: ignored, even though its value is invalid.
            f32_scalar("model.layers.3.self_attn.k_scale", -1.0, &[]),
        ],
    );
    let loaded = load_kv_scales(&path, 3).unwrap();
    assert_eq!(
        loaded,
        LoadedScales {
            scales: vec![
                scales(0.0234375, 0.09375),
                scales(0.0625, 0.15625),
                scales(0.5, 0.5)
            ],
            warnings: vec![],
        }
    );
}

#[test]
fn per_side_names_win_over_the_shared_kv_scale() {
    let tensors = [
        f32_scalar("model.layers.0.self_attn.kv_scale", 0.5, &[]),
        f32_scalar("model.layers.0.self_attn.k_scale", 0.25, &[]),
        // V: output_scale before kv_scale.
        f32_scalar("model.layers.0.self_attn.v_proj.output_scale", 0.125, &[]),
        // Layer 1: K from k_scale, V falls back to kv_scale.
        f32_scalar("model.layers.1.self_attn.k_scale", 2.0, &[]),
        f32_scalar("model.layers.1.self_attn.kv_scale", 4.0, &[]),
    ];
    let loaded = kv_scales_from_bytes(&to_bytes(&tensors), 2).unwrap();
    assert_eq!(loaded.scales, vec![scales(0.25, 0.125), scales(2.0, 4.0)]);
    assert!(loaded.warnings.is_empty());
}

#[test]
fn missing_scales_fall_back_to_one_with_a_warning_naming_the_layer() {
    let tensors = [
        f32_scalar("model.layers.0.self_attn.kv_scale", 0.5, &[]),
        f32_scalar("model.layers.1.self_attn.v_scale", 0.75, &[]),
        weight(),
    ];
    let loaded = kv_scales_from_bytes(&to_bytes(&tensors), 3).unwrap();
    assert_eq!(
        loaded.scales,
        vec![scales(0.5, 0.5), scales(1.0, 0.75), scales(1.0, 1.0)]
    );
    assert_eq!(
        loaded.warnings,
        vec![
            ScaleWarning::Missing {
                layer: 1,
                side: KvSide::K
            },
            ScaleWarning::Missing {
                layer: 2,
                side: KvSide::K
            },
            ScaleWarning::Missing {
                layer: 2,
                side: KvSide::V
            },
        ]
    );
    let text = loaded.warnings[0].to_string();
    for needle in [
        "layer 1",
        "no k scale",
        "model.layers.1.self_attn.k_scale",
        "model.layers.1.self_attn.k_proj.output_scale",
        "model.layers.1.self_attn.kv_scale",
        "using 1.0",
    ] {
        assert!(text.contains(needle), "{needle:?} not in {text:?}");
    }
    // Logging is the caller's choice: each warning reaches the application's logger once,
    // under the library's target.
    let logged = capture_logs(|| loaded.log_warnings());
    assert_eq!(logged.len(), loaded.warnings.len(), "{logged:?}");
    for (record, w) in logged.iter().zip(&loaded.warnings) {
        assert_eq!(
            record,
            &(log::Level::Warn, "fp8kv".to_string(), w.to_string())
        );
    }
}

/// The records `f` logs on this thread, through a capturing logger installed once.
fn capture_logs(f: impl FnOnce()) -> Vec<(log::Level, String, String)> {
    use std::cell::RefCell;
    thread_local! {
        static RECORDS: RefCell<Vec<(log::Level, String, String)>> = const { RefCell::new(Vec::new()) };
    }
    struct Capture;
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            let rec = (r.level(), r.target().to_string(), r.args().to_string());
            RECORDS.with(|v| v.borrow_mut().push(rec));
        }
        fn flush(&self) {}
    }
    static LOGGER: Capture = Capture;
    // Another test may have installed it already; either way it is this logger.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Trace);
    RECORDS.with(|v| v.borrow_mut().clear());
    f();
    RECORDS.with(|v| v.borrow_mut().drain(..).collect())
}

#[test]
fn non_finite_or_non_positive_scales_are_errors_naming_layer_and_tensor() {
    // (tensor, expected value as f32 bits). f16 0x7E00 is a NaN, bf16 0x7F80 is +inf,
    // f16 0x8000 is -0.0.
    let cases: [(Tensor, Option<u32>); 6] = [
        (
            bits16("model.layers.1.self_attn.k_scale", Dtype::F16, 0x7E00, &[]),
            None,
        ),
        (
            bits16(
                "model.layers.1.self_attn.v_scale",
                Dtype::BF16,
                0x7F80,
                &[1],
            ),
            Some(0x7F80_0000),
        ),
        (
            f32_scalar("model.layers.1.self_attn.kv_scale", f32::NEG_INFINITY, &[]),
            Some(0xFF80_0000),
        ),
        (
            f32_scalar("model.layers.1.self_attn.k_proj.output_scale", 0.0, &[]),
            Some(0),
        ),
        (
            f32_scalar("model.layers.1.self_attn.v_proj.output_scale", -0.5, &[1]),
            Some(0xBF00_0000),
        ),
        (
            bits16("model.layers.1.self_attn.k_scale", Dtype::F16, 0x8000, &[]),
            Some(0x8000_0000),
        ),
    ];
    for (bad, want_bits) in cases {
        let name = bad.0;
        let tensors = [
            f32_scalar("model.layers.0.self_attn.kv_scale", 0.5, &[]),
            bad,
        ];
        let err = kv_scales_from_bytes(&to_bytes(&tensors), 2).unwrap_err();
        let Fp8KvError::CheckpointScale {
            layer,
            tensor,
            value,
        } = &err
        else {
            panic!("{name}: expected CheckpointScale, got {err:?}");
        };
        assert_eq!((*layer, tensor.as_str()), (1, name), "{err}");
        match want_bits {
            None => assert!(value.is_nan(), "{err}"),
            Some(bits) => assert_eq!(value.to_bits(), bits, "{err}"),
        }
        let text = err.to_string();
        assert!(text.contains("layer 1") && text.contains(name), "{text}");
    }
}

#[test]
fn scales_of_another_dtype_or_shape_are_errors() {
    let name = "model.layers.0.self_attn.k_scale";
    let cases: [(Tensor, &str); 6] = [
        (
            (name, Dtype::I32, vec![], 1i32.to_le_bytes().to_vec()),
            "I32",
        ),
        (
            (name, Dtype::F64, vec![], 0.5f64.to_le_bytes().to_vec()),
            "F64",
        ),
        ((name, Dtype::F8_E4M3, vec![], vec![0x38]), "F8_E4M3"),
        (
            (
                name,
                Dtype::F32,
                vec![2],
                [0.5f32, 0.25].map(f32::to_le_bytes).concat(),
            ),
            "[2]",
        ),
        (
            (name, Dtype::F32, vec![1, 1], 0.5f32.to_le_bytes().to_vec()),
            "[1, 1]",
        ),
        ((name, Dtype::F32, vec![0], vec![]), "[0]"),
    ];
    let dir = TempDir::new("dtype-shape");
    for (i, (bad, needle)) in cases.into_iter().enumerate() {
        let path = dir.path(&format!("bad{i}.safetensors"));
        write(&path, &[bad]);
        let err = load_kv_scales(&path, 1).unwrap_err();
        let Fp8KvError::CheckpointTensor {
            file,
            tensor,
            reason,
        } = &err
        else {
            panic!("{needle}: expected CheckpointTensor, got {err:?}");
        };
        assert_eq!(tensor, name);
        assert_eq!(Path::new(file), path.as_path());
        assert!(reason.contains(needle), "{needle:?} not in {reason:?}");
    }
}

#[test]
fn unreadable_or_malformed_files_are_errors() {
    let dir = TempDir::new("malformed");
    let good = to_bytes(&[
        weight(),
        f32_scalar("model.layers.0.self_attn.kv_scale", 0.5, &[]),
    ]);
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut huge_header = good.clone();
    huge_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut header_past_end = good.clone();
    header_past_end[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
    let mut bad_json = good.clone();
    bad_json[8] = b'[';
    let mut not_utf8 = good.clone();
    not_utf8[9] = 0xFF;
    let mut extra_byte = good.clone();
    extra_byte.push(0);
    let truncated = good[..good.len() - 1].to_vec();
    let header_only = good[..8 + header_len].to_vec();
    let cases: [(&str, Vec<u8>); 9] = [
        ("empty", vec![]),
        ("four bytes", vec![1, 2, 3, 4]),
        ("huge header length", huge_header),
        ("header past the end", header_past_end),
        ("not JSON", bad_json),
        ("not UTF-8", not_utf8),
        ("a byte past the data", extra_byte),
        ("truncated data", truncated),
        ("header only", header_only),
    ];
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let path = dir.path(&format!("m{i}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        let err = load_kv_scales(&path, 1).unwrap_err();
        assert!(
            matches!(&err, Fp8KvError::CheckpointFile { file, .. } if Path::new(file) == path),
            "{what}: {err:?}"
        );
        let err = kv_scales_from_bytes(&bytes, 1).unwrap_err();
        assert!(
            matches!(&err, Fp8KvError::CheckpointFile { file, .. } if file == "bytes[0]"),
            "{what} (bytes): {err:?}"
        );
    }
    let missing = dir.path("does-not-exist.safetensors");
    let err = load_kv_scales(&missing, 1).unwrap_err();
    assert!(
        matches!(&err, Fp8KvError::CheckpointFile { reason, .. } if reason.contains("cannot open")),
        "{err:?}"
    );
    // A directory is not a file either.
    let err = load_kv_scales(&dir.0, 1).unwrap_err();
    assert!(matches!(err, Fp8KvError::CheckpointFile { .. }), "{err:?}");
}

#[test]
fn sharded_checkpoints_read_each_scale_from_its_shard() {
    let dir = TempDir::new("shards");
    let (a, b) = (dir.path("a.safetensors"), dir.path("b.safetensors"));
    write(
        &a,
        &[
            weight(),
            f32_scalar("model.layers.0.self_attn.k_scale", 0.25, &[]),
            f32_scalar("model.layers.1.self_attn.v_scale", 0.375, &[]),
        ],
    );
    write(
        &b,
        &[
            f32_scalar("model.layers.0.self_attn.v_scale", 0.125, &[]),
            f32_scalar("model.layers.1.self_attn.kv_scale", 3.0, &[]),
        ],
    );
    let want = vec![scales(0.25, 0.125), scales(3.0, 0.375)];
    let loaded = load_kv_scales_sharded(&[&a, &b], 2).unwrap();
    assert_eq!(loaded.scales, want);
    assert!(loaded.warnings.is_empty());
    // The order of the shards does not matter; bytes give the same result.
    assert_eq!(load_kv_scales_sharded(&[&b, &a], 2).unwrap().scales, want);
    let (ab, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(kv_scales_from_shard_bytes(&[&ab, &bb], 2).unwrap(), loaded);

    // The same scale in two shards is ambiguous.
    let c = dir.path("c.safetensors");
    write(
        &c,
        &[f32_scalar("model.layers.0.self_attn.k_scale", 0.25, &[])],
    );
    let err = load_kv_scales_sharded(&[&a, &b, &c], 2).unwrap_err();
    let Fp8KvError::CheckpointTensor {
        file,
        tensor,
        reason,
    } = &err
    else {
        panic!("expected CheckpointTensor, got {err:?}");
    };
    assert_eq!(Path::new(file), c.as_path());
    assert_eq!(tensor, "model.layers.0.self_attn.k_scale");
    assert!(reason.contains(&a.display().to_string()), "{reason}");
    // One bad shard fails the load with its own name.
    let junk = dir.path("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let err = load_kv_scales_sharded(&[&a, &junk], 2).unwrap_err();
    assert!(
        matches!(&err, Fp8KvError::CheckpointFile { file, .. } if Path::new(file) == junk),
        "{err:?}"
    );
}

#[test]
fn file_and_bytes_loaders_agree() {
    let dir = TempDir::new("agree");
    let path = dir.path("model.safetensors");
    let tensors = [
        weight(),
        bits16("model.layers.0.self_attn.k_scale", Dtype::BF16, 0x3D80, &[]),
        bits16(
            "model.layers.2.self_attn.kv_scale",
            Dtype::F16,
            0x2E00,
            &[1],
        ),
    ];
    write(&path, &tensors);
    let from_file = load_kv_scales(&path, 3).unwrap();
    let from_bytes = kv_scales_from_bytes(&std::fs::read(&path).unwrap(), 3).unwrap();
    assert_eq!(from_file, from_bytes);
    assert_eq!(
        from_file.scales,
        vec![
            scales(0.0625, 1.0),
            scales(1.0, 1.0),
            scales(0.09375, 0.09375)
        ]
    );
    assert_eq!(from_file.warnings.len(), 3);
}

#[test]
fn zero_layers_or_no_shards_are_errors() {
    let bytes = to_bytes(&[f32_scalar("model.layers.0.self_attn.kv_scale", 0.5, &[])]);
    assert!(matches!(
        kv_scales_from_bytes(&bytes, 0),
        Err(Fp8KvError::ZeroSize { what: "num_layers" })
    ));
    assert!(matches!(
        kv_scales_from_shard_bytes(&[], 1),
        Err(Fp8KvError::ZeroSize {
            what: "checkpoint shards"
        })
    ));
    let none: [&Path; 0] = [];
    assert!(matches!(
        load_kv_scales_sharded(&none, 1),
        Err(Fp8KvError::ZeroSize {
            what: "checkpoint shards"
        })
    ));
}
