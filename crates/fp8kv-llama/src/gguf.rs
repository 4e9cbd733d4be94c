//! GGUF v3 files: metadata, tensor descriptors, and tensors dequantized to f32.
//!
//! The container (header, every metadata value type, tensor descriptors, `general.alignment`)
//! is parsed by the `gguf-rs-lib` crate; this module adds typed accessors, the model's
//! hyperparameters ([`LlamaConfig`]) and the dequantization of the block formats the SmolLM2
//! Q4_1 file uses. The block layouts follow ggml (`ggml-common.h`, `block_q8_0` and
//! `block_q4_1`):
//!
//! - `Q8_0`: 34 bytes per 32 values: f16 scale `d`, then 32 `i8` quants; `x = d * q`.
//! - `Q4_1`: 20 bytes per 32 values: f16 scale `d`, f16 minimum `m`, then 16 bytes of nibbles;
//!   byte `j`'s low nibble is value `j` and its high nibble value `j + 16`; `x = d * q + m`.
//!
//! Shapes are GGUF's: `shape[0]` (ggml's `ne0`) is the contiguous, fastest-varying dimension.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use gguf_rs_lib::format::metadata::{Metadata, MetadataValue};
use gguf_rs_lib::format::types::GGUFTensorType;
use gguf_rs_lib::reader::GGUFFileReader;
use half::f16;

use super::error::{ModelError, Result};

/// Values per block in the `Q8_0` and `Q4_1` formats (ggml's `QK8_0`, `QK4_1`).
pub const QUANT_BLOCK_ELEMS: usize = 32;
/// Bytes per `Q8_0` block: f16 scale + 32 × i8.
pub const Q8_0_BLOCK_BYTES: usize = 2 + QUANT_BLOCK_ELEMS;
/// Bytes per `Q4_1` block: f16 scale + f16 minimum + 32 × 4 bits.
pub const Q4_1_BLOCK_BYTES: usize = 2 + 2 + QUANT_BLOCK_ELEMS / 2;

/// A tensor's storage type: the four this loader dequantizes, and the rest by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 8-bit blocks with an f16 scale.
    Q8_0,
    /// 4-bit blocks with an f16 scale and minimum.
    Q4_1,
    /// Any other GGML type (not dequantized here), by its GGML name.
    Other(&'static str),
}

impl GgmlType {
    fn from_gguf(ty: GGUFTensorType) -> Self {
        match ty {
            GGUFTensorType::F32 => GgmlType::F32,
            GGUFTensorType::F16 => GgmlType::F16,
            GGUFTensorType::Q8_0 => GgmlType::Q8_0,
            GGUFTensorType::Q4_1 => GgmlType::Q4_1,
            other => GgmlType::Other(other.name()),
        }
    }

    /// GGML's name for the type (`"Q4_1"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Other(name) => name,
        }
    }

    /// `(values, bytes)` per block for the supported types; `None` for the others.
    fn block_geometry(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 => Some((1, 2)),
            GgmlType::Q8_0 => Some((QUANT_BLOCK_ELEMS, Q8_0_BLOCK_BYTES)),
            GgmlType::Q4_1 => Some((QUANT_BLOCK_ELEMS, Q4_1_BLOCK_BYTES)),
            GgmlType::Other(_) => None,
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor descriptor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Its name (`"blk.0.attn_q.weight"`).
    pub name: String,
    /// Its storage type.
    pub ggml_type: GgmlType,
    /// GGUF shape: `shape[0]` is contiguous (ggml's `ne0`).
    pub shape: Vec<usize>,
    /// Where its data starts, from the start of the file.
    pub file_offset_bytes: u64,
}

impl TensorInfo {
    /// Number of values.
    pub fn num_elems(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor dequantized to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorF32 {
    /// GGUF shape: `shape[0]` is contiguous (ggml's `ne0`).
    pub shape: Vec<usize>,
    /// The values, `shape[0]` fastest.
    pub data: Vec<f32>,
}

impl TensorF32 {
    /// The shape in row-major order (last dimension contiguous), as Burn and NumPy write it:
    /// GGUF's shape reversed. A `[576, 49152]` GGUF embedding is a `[49152, 576]` matrix.
    pub fn row_major_shape(&self) -> Vec<usize> {
        self.shape.iter().rev().copied().collect()
    }
}

/// The hyperparameters of a `llama`-architecture model, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Transformer blocks (`llama.block_count`).
    pub block_count: usize,
    /// Hidden size (`llama.embedding_length`).
    pub embedding_length: usize,
    /// Query heads (`llama.attention.head_count`).
    pub head_count: usize,
    /// Key/value heads (`llama.attention.head_count_kv`).
    pub head_count_kv: usize,
    /// MLP inner size (`llama.feed_forward_length`).
    pub feed_forward_length: usize,
    /// RoPE base frequency (`llama.rope.freq_base`).
    pub rope_freq_base: f32,
    /// Rotary dimensions per head (`llama.rope.dimension_count`; the head dim when absent, as
    /// llama.cpp does).
    pub rope_dimension_count: usize,
    /// RMSNorm epsilon (`llama.attention.layer_norm_rms_epsilon`).
    pub rms_norm_eps: f32,
    /// Training context length (`llama.context_length`).
    pub context_length: usize,
    /// Vocabulary size (`llama.vocab_size`, else the length of `tokenizer.ggml.tokens`).
    pub vocab_size: usize,
}

impl LlamaConfig {
    /// Dimensions per attention head: `embedding_length / head_count`.
    pub fn head_dim(&self) -> usize {
        self.embedding_length / self.head_count
    }
}

/// An open GGUF file: its metadata and tensor descriptors in memory, tensor data read from the
/// file on demand.
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    version: u32,
    alignment: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl Gguf {
    /// Parses the header, metadata and tensor descriptors of the GGUF at `path` (v3,
    /// little-endian). Tensor data is not read here.
    pub fn open(path: &Path) -> Result<Self> {
        let gguf_err = |e: gguf_rs_lib::GGUFError| ModelError::Gguf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let file = File::open(path).map_err(|e| ModelError::io("opening", path, e))?;
        let reader = GGUFFileReader::new(BufReader::new(file)).map_err(gguf_err)?;
        let data_offset = reader.tensor_data_offset();
        let tensors: Vec<TensorInfo> = reader
            .tensor_infos()
            .iter()
            .map(|t| {
                let shape = t
                    .shape()
                    .dimensions
                    .iter()
                    .map(|&d| usize::try_from(d))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|_| ModelError::BadTensor {
                        tensor: t.name().to_string(),
                        reason: "a dimension does not fit usize".to_string(),
                    })?;
                Ok(TensorInfo {
                    name: t.name().to_string(),
                    ggml_type: GgmlType::from_gguf(t.tensor_type()),
                    shape,
                    file_offset_bytes: data_offset + t.data_offset(),
                })
            })
            .collect::<Result<_>>()?;
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Gguf {
            path: path.to_path_buf(),
            version: reader.header().version,
            alignment: reader.tensor_alignment(),
            metadata: reader.metadata().clone(),
            tensors,
            by_name,
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF format version (3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data in bytes (`general.alignment`, 32 when absent).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All tensor descriptors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The descriptor of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| ModelError::TensorNotFound {
                name: name.to_string(),
            })
    }

    /// Tensor `name`'s stored bytes, as they are in the file (still quantized). Only the
    /// supported types have a known byte size.
    pub fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.tensor_info(name)?;
        let size_bytes = stored_size_bytes(info)?;
        let mut file =
            File::open(&self.path).map_err(|e| ModelError::io("opening", &self.path, e))?;
        file.seek(SeekFrom::Start(info.file_offset_bytes))
            .map_err(|e| ModelError::io("seeking in", &self.path, e))?;
        let mut bytes = vec![0u8; size_bytes];
        file.read_exact(&mut bytes)
            .map_err(|e| ModelError::io("reading tensor data from", &self.path, e))?;
        Ok(bytes)
    }

    /// Tensor `name` dequantized to f32, with its GGUF shape. F32, F16, Q8_0 and Q4_1 are
    /// supported; other types are a [`ModelError::UnsupportedTensorType`] naming the tensor.
    pub fn tensor_f32(&self, name: &str) -> Result<TensorF32> {
        let info = self.tensor_info(name)?;
        let bytes = self.tensor_bytes(name)?;
        let data = dequantize(&info.name, info.ggml_type, &bytes)?;
        Ok(TensorF32 {
            shape: info.shape.clone(),
            data,
        })
    }

    /// Whether metadata key `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.metadata.get(key).is_some()
    }

    /// All metadata keys (in no particular order).
    pub fn metadata_keys(&self) -> impl Iterator<Item = &str> {
        self.metadata.keys().map(String::as_str)
    }

    fn value(&self, key: &str) -> Result<&MetadataValue> {
        self.metadata
            .get(key)
            .ok_or_else(|| ModelError::MissingKey {
                key: key.to_string(),
            })
    }

    /// Metadata `key` as a `u64`: any integer type with a non-negative value.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.value(key)?;
        let n = match *v {
            MetadataValue::U8(x) => Some(u64::from(x)),
            MetadataValue::U16(x) => Some(u64::from(x)),
            MetadataValue::U32(x) => Some(u64::from(x)),
            MetadataValue::U64(x) => Some(x),
            MetadataValue::I8(x) => u64::try_from(x).ok(),
            MetadataValue::I16(x) => u64::try_from(x).ok(),
            MetadataValue::I32(x) => u64::try_from(x).ok(),
            MetadataValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        };
        n.ok_or_else(|| wrong_type(key, "a non-negative integer", v))
    }

    /// Metadata `key` as a `u32` (any integer type whose value fits).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let n = self.get_u64(key)?;
        u32::try_from(n).map_err(|_| ModelError::WrongKeyType {
            key: key.to_string(),
            expected: "an integer that fits u32",
            found: n.to_string(),
        })
    }

    /// Metadata `key` as a `usize` (any integer type whose value fits).
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let n = self.get_u64(key)?;
        usize::try_from(n).map_err(|_| ModelError::WrongKeyType {
            key: key.to_string(),
            expected: "an integer that fits usize",
            found: n.to_string(),
        })
    }

    /// Metadata `key` as an `f32` (stored as F32, or F64 narrowed).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match *self.value(key)? {
            MetadataValue::F32(x) => Ok(x),
            MetadataValue::F64(x) => Ok(x as f32),
            ref v => Err(wrong_type(key, "a float", v)),
        }
    }

    /// Metadata `key` as a `bool`.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match *self.value(key)? {
            MetadataValue::Bool(x) => Ok(x),
            ref v => Err(wrong_type(key, "a bool", v)),
        }
    }

    /// Metadata `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.value(key)? {
            MetadataValue::String(s) => Ok(s),
            v => Err(wrong_type(key, "a string", v)),
        }
    }

    /// Metadata `key` as an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key, "an array of strings", |v| match v {
            MetadataValue::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// Metadata `key` as an array of `i32`.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.array(key, "an array of i32", |v| match *v {
            MetadataValue::I32(x) => Some(x),
            _ => None,
        })
    }

    /// Metadata `key` as an array of `f32`.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.array(key, "an array of f32", |v| match *v {
            MetadataValue::F32(x) => Some(x),
            _ => None,
        })
    }

    fn array<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        elem: impl Fn(&'a MetadataValue) -> Option<T>,
    ) -> Result<Vec<T>> {
        match self.value(key)? {
            MetadataValue::Array(array) => array
                .values
                .iter()
                .map(|v| elem(v).ok_or_else(|| wrong_type(key, expected, v)))
                .collect(),
            v => Err(wrong_type(key, expected, v)),
        }
    }

    /// `general.architecture` (`"llama"` for SmolLM2).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// The model's hyperparameters. The architecture must be `llama`; every key is required
    /// except `llama.rope.dimension_count` and `llama.vocab_size` (see [`LlamaConfig`]).
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?;
        if arch != "llama" {
            return Err(ModelError::Unsupported {
                key: "general.architecture".to_string(),
                value: arch.to_string(),
                supported: "llama",
            });
        }
        let head_count = self.get_usize("llama.attention.head_count")?;
        let head_count_kv = self.get_usize("llama.attention.head_count_kv")?;
        let embedding_length = self.get_usize("llama.embedding_length")?;
        if head_count == 0 || embedding_length % head_count != 0 {
            return Err(ModelError::Unsupported {
                key: "llama.attention.head_count".to_string(),
                value: head_count.to_string(),
                supported: "a positive divisor of llama.embedding_length",
            });
        }
        if head_count_kv == 0 || head_count % head_count_kv != 0 {
            return Err(ModelError::Unsupported {
                key: "llama.attention.head_count_kv".to_string(),
                value: head_count_kv.to_string(),
                supported: "a positive divisor of llama.attention.head_count",
            });
        }
        let vocab_size = if self.contains_key("llama.vocab_size") {
            self.get_usize("llama.vocab_size")?
        } else {
            self.get_str_array("tokenizer.ggml.tokens")?.len()
        };
        let rope_dimension_count = if self.contains_key("llama.rope.dimension_count") {
            self.get_usize("llama.rope.dimension_count")?
        } else {
            embedding_length / head_count
        };
        Ok(LlamaConfig {
            block_count: self.get_usize("llama.block_count")?,
            embedding_length,
            head_count,
            head_count_kv,
            feed_forward_length: self.get_usize("llama.feed_forward_length")?,
            rope_freq_base: self.get_f32("llama.rope.freq_base")?,
            rope_dimension_count,
            rms_norm_eps: self.get_f32("llama.attention.layer_norm_rms_epsilon")?,
            context_length: self.get_usize("llama.context_length")?,
            vocab_size,
        })
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &MetadataValue) -> ModelError {
    let found = match found {
        MetadataValue::Array(a) => format!("an array of {} {}", a.values.len(), a.element_type),
        v => {
            // Keep the message short when the value is a long string (a chat template).
            let text: String = v.to_string_representation().chars().take(60).collect();
            format!("{} `{text}`", v.value_type())
        }
    };
    ModelError::WrongKeyType {
        key: key.to_string(),
        expected,
        found,
    }
}

/// Bytes tensor `info` occupies in the file, for the supported types.
fn stored_size_bytes(info: &TensorInfo) -> Result<usize> {
    let (block_elems, block_bytes) =
        info.ggml_type
            .block_geometry()
            .ok_or_else(|| ModelError::UnsupportedTensorType {
                tensor: info.name.clone(),
                ggml_type: info.ggml_type.name().to_string(),
            })?;
    let n = info.num_elems();
    if !n.is_multiple_of(block_elems) {
        return Err(ModelError::BadTensor {
            tensor: info.name.clone(),
            reason: format!(
                "{n} values are not whole {} blocks of {block_elems}",
                info.ggml_type
            ),
        });
    }
    Ok(n / block_elems * block_bytes)
}

/// Dequantizes `bytes` stored as `ggml_type` to f32. The value count follows from the byte
/// count, which must be whole blocks; `tensor` only names the tensor in errors.
pub fn dequantize(tensor: &str, ggml_type: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    let (block_elems, block_bytes) =
        ggml_type
            .block_geometry()
            .ok_or_else(|| ModelError::UnsupportedTensorType {
                tensor: tensor.to_string(),
                ggml_type: ggml_type.name().to_string(),
            })?;
    if !bytes.len().is_multiple_of(block_bytes) {
        return Err(ModelError::BadTensor {
            tensor: tensor.to_string(),
            reason: format!(
                "{} bytes are not whole {ggml_type} blocks of {block_bytes} bytes",
                bytes.len()
            ),
        });
    }
    let blocks = bytes.chunks_exact(block_bytes);
    let mut out = Vec::with_capacity(blocks.len() * block_elems);
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ggml_type {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|b| f16_at(b, 0))),
        GgmlType::Q8_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        GgmlType::Q4_1 => {
            for b in blocks {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let nibbles = &b[4..];
                // Low nibbles are values 0..16, high nibbles 16..32 (ggml's dequantize_row_q4_1).
                out.extend(nibbles.iter().map(|&q| d * f32::from(q & 0x0f) + m));
                out.extend(nibbles.iter().map(|&q| d * f32::from(q >> 4) + m));
            }
        }
        GgmlType::Other(_) => unreachable!("block_geometry rejected it above"),
    }
    Ok(out)
}
