//! Per-layer K/V scales from safetensors checkpoints.
//!
//! Checkpoints calibrated for an FP8 KV cache store one scalar per layer and tensor. For layer
//! `N` the loader looks up, for each side, the first of these names that exists:
//!
//! | side | names, most specific first |
//! |---|---|
//! | K | `model.layers.N.self_attn.k_scale`, `model.layers.N.self_attn.k_proj.output_scale`, `model.layers.N.self_attn.kv_scale` |
//! | V | `model.layers.N.self_attn.v_scale`, `model.layers.N.self_attn.v_proj.output_scale`, `model.layers.N.self_attn.kv_scale` |
//!
//! (the older single `kv_scale` serves K and V alike; [`scale_tensor_names`] lists them).
//!
//! - A scale is a scalar: shape `[]` or `[1]`, dtype F32, F16 or BF16, converted exactly to
//!   f32. Another dtype or shape is [`Fp8KvError::CheckpointTensor`].
//! - A scale that is NaN, ±inf, 0 or negative is [`Fp8KvError::CheckpointScale`], naming the
//!   layer and the tensor.
//! - A layer without a K (or V) scale gets 1.0 (the default of vLLM and LMDeploy) and a
//!   [`ScaleWarning::Missing`] naming the layer and the side. **The loader never prints**:
//!   warnings are returned in [`LoadedScales::warnings`]; [`LoadedScales::log_warnings`]
//!   hands each one to the `log` crate (target `fp8kv`) for callers that want that.
//! - A file that cannot be opened or read, or is not a valid safetensors file, is
//!   [`Fp8KvError::CheckpointFile`].
//! - Sharded checkpoints: pass every shard; a scale tensor found in two shards is
//!   [`Fp8KvError::CheckpointTensor`] (which one is meant would be a guess). Scales of layers
//!   at or past `num_layers` and every other tensor are ignored.
//!
//! Files are read header first (at most [`MAX_HEADER_BYTES`]); after that only the few bytes
//! of each scale tensor are read, so loading scales from multi-gigabyte shards is cheap.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, Metadata, TensorInfo};
use safetensors::SafeTensors;

use crate::error::{Fp8KvError, KvSide, Result};
use crate::scales::KvScales;

/// The largest safetensors header the loader reads (the `safetensors` crate's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bytes of the little-endian `u64` header length that starts a safetensors file.
const HEADER_LEN_BYTES: u64 = 8;

/// Something the loader noticed that is not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScaleWarning {
    /// No tensor holds this layer's scale for `side`; 1.0 was used.
    Missing {
        /// The layer.
        layer: usize,
        /// K or V.
        side: KvSide,
    },
}

impl std::fmt::Display for ScaleWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScaleWarning::Missing { layer, side } => write!(
                f,
                "layer {layer}: no {side} scale in the checkpoint (looked for {}); using 1.0",
                scale_tensor_names(*layer, *side).join(", ")
            ),
        }
    }
}

/// The scales of every layer and what the loader warned about.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedScales {
    /// One entry per layer, layer `i` at index `i`.
    pub scales: Vec<KvScales>,
    /// Warnings in layer order (K before V within a layer).
    pub warnings: Vec<ScaleWarning>,
}

impl LoadedScales {
    /// Hands each warning once to the `log` crate (`log::warn!`, target `fp8kv`: the
    /// application's logger shows it). The loader itself never logs or prints.
    pub fn log_warnings(&self) {
        for w in &self.warnings {
            log::warn!(target: "fp8kv", "{w}");
        }
    }
}

/// The tensor names holding layer `layer`'s scale for `side`, in lookup order: the per-side
/// `k_scale` / `v_scale`, the `k_proj` / `v_proj` `output_scale` spelling, then the shared
/// `kv_scale`.
pub fn scale_tensor_names(layer: usize, side: KvSide) -> [String; 3] {
    let attn = format!("model.layers.{layer}.self_attn");
    [
        format!("{attn}.{side}_scale"),
        format!("{attn}.{side}_proj.output_scale"),
        format!("{attn}.kv_scale"),
    ]
}

/// Loads `num_layers` layers' scales from one safetensors file.
///
/// Errors: [`Fp8KvError::ZeroSize`] for `num_layers == 0`, and the checkpoint errors listed in
/// the [module docs](self).
pub fn load_kv_scales(path: &Path, num_layers: usize) -> Result<LoadedScales> {
    load_kv_scales_sharded(&[path], num_layers)
}

/// Loads `num_layers` layers' scales from the shards of one checkpoint (each scale may be in
/// any shard, but in one only).
///
/// Errors: [`Fp8KvError::ZeroSize`] for no shards or `num_layers == 0`, and the checkpoint
/// errors listed in the [module docs](self).
pub fn load_kv_scales_sharded<P: AsRef<Path>>(
    paths: &[P],
    num_layers: usize,
) -> Result<LoadedScales> {
    check_counts(paths.len(), num_layers)?;
    let shards = paths
        .iter()
        .map(|p| Shard::open(p.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    load(shards, num_layers)
}

/// [`load_kv_scales`] on the bytes of a safetensors file held in memory (named `bytes[0]` in
/// errors).
pub fn kv_scales_from_bytes(bytes: &[u8], num_layers: usize) -> Result<LoadedScales> {
    kv_scales_from_shard_bytes(&[bytes], num_layers)
}

/// [`load_kv_scales_sharded`] on shards held in memory (shard `i` is named `bytes[i]` in
/// errors).
pub fn kv_scales_from_shard_bytes(shards: &[&[u8]], num_layers: usize) -> Result<LoadedScales> {
    check_counts(shards.len(), num_layers)?;
    let shards = shards
        .iter()
        .enumerate()
        .map(|(i, b)| Shard::from_bytes(format!("bytes[{i}]"), b))
        .collect::<Result<Vec<_>>>()?;
    load(shards, num_layers)
}

fn check_counts(shards: usize, num_layers: usize) -> Result<()> {
    if shards == 0 {
        return Err(Fp8KvError::ZeroSize {
            what: "checkpoint shards",
        });
    }
    if num_layers == 0 {
        return Err(Fp8KvError::ZeroSize { what: "num_layers" });
    }
    Ok(())
}

/// Where a shard's tensor bytes are.
enum ShardData<'a> {
    /// The data section of an in-memory file.
    Bytes(&'a [u8]),
    /// An open file and the offset of its data section.
    File { file: File, data_start: u64 },
}

/// One safetensors file: its name for errors, its parsed header and its data.
struct Shard<'a> {
    label: String,
    metadata: Metadata,
    data: ShardData<'a>,
}

impl Shard<'static> {
    /// Opens a file and reads only its header; checks that the header's tensors cover the
    /// rest of the file exactly, as the `safetensors` crate does for a whole buffer.
    fn open(path: &Path) -> Result<Self> {
        let label = path.display().to_string();
        let err = |reason: String| Fp8KvError::CheckpointFile {
            file: label.clone(),
            reason,
        };
        let mut file = File::open(path).map_err(|e| err(format!("cannot open it: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| err(format!("cannot stat it: {e}")))?
            .len();
        if file_len < HEADER_LEN_BYTES {
            return Err(err(format!(
                "{file_len} bytes is too short for a safetensors file (8-byte header length first)"
            )));
        }
        let mut len_bytes = [0u8; HEADER_LEN_BYTES as usize];
        file.read_exact(&mut len_bytes)
            .map_err(|e| err(format!("cannot read the header length: {e}")))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES {
            return Err(err(format!(
                "header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes"
            )));
        }
        if header_len > file_len - HEADER_LEN_BYTES {
            return Err(err(format!(
                "header of {header_len} bytes runs past the end of the {file_len}-byte file"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| err(format!("cannot read the header: {e}")))?;
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| err(format!("invalid safetensors header: {e}")))?;
        let data_start = HEADER_LEN_BYTES + header_len;
        let data_len = metadata.data_len() as u64;
        if data_len != file_len - data_start {
            return Err(err(format!(
                "the header describes {data_len} bytes of tensor data, the file holds {}",
                file_len - data_start
            )));
        }
        Ok(Shard {
            label,
            metadata,
            data: ShardData::File { file, data_start },
        })
    }
}

impl<'a> Shard<'a> {
    /// Parses an in-memory file (the `safetensors` crate validates header and offsets).
    fn from_bytes(label: String, bytes: &'a [u8]) -> Result<Self> {
        let (header_len, metadata) =
            SafeTensors::read_metadata(bytes).map_err(|e| Fp8KvError::CheckpointFile {
                file: label.clone(),
                reason: format!("not a valid safetensors file: {e}"),
            })?;
        let data = bytes
            .get(HEADER_LEN_BYTES as usize + header_len..)
            .unwrap_or_default();
        Ok(Shard {
            label,
            metadata,
            data: ShardData::Bytes(data),
        })
    }

    /// The raw bytes of a tensor of this shard.
    fn read(&mut self, name: &str, info: &TensorInfo) -> Result<Vec<u8>> {
        let (start, end) = info.data_offsets;
        let err = |reason: String| Fp8KvError::CheckpointTensor {
            file: self.label.clone(),
            tensor: name.to_string(),
            reason,
        };
        match &mut self.data {
            ShardData::Bytes(data) => data
                .get(start..end)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| err(format!("data offsets [{start}, {end}) outside the file"))),
            ShardData::File { file, data_start } => {
                let mut buf = vec![0u8; end.saturating_sub(start)];
                file.seek(SeekFrom::Start(*data_start + start as u64))
                    .and_then(|_| file.read_exact(&mut buf))
                    .map_err(|e| err(format!("cannot read its data: {e}")))?;
                Ok(buf)
            }
        }
    }
}

/// The index of the one shard holding `name`, `None` if none does.
fn find(shards: &[Shard<'_>], name: &str) -> Result<Option<usize>> {
    let mut hits = shards
        .iter()
        .enumerate()
        .filter(|(_, s)| s.metadata.info(name).is_some())
        .map(|(i, _)| i);
    match (hits.next(), hits.next()) {
        (None, _) => Ok(None),
        (Some(i), None) => Ok(Some(i)),
        (Some(i), Some(j)) => Err(Fp8KvError::CheckpointTensor {
            file: shards[j].label.clone(),
            tensor: name.to_string(),
            reason: format!(
                "also in {}; a scale must be in one shard only",
                shards[i].label
            ),
        }),
    }
}

/// Reads the scalar tensor `name` of `shard` as f32 (F32, F16 or BF16; shape `[]` or `[1]`).
fn read_scalar(shard: &mut Shard<'_>, name: &str) -> Result<f32> {
    let info = shard
        .metadata
        .info(name)
        .cloned()
        .ok_or_else(|| Fp8KvError::CheckpointTensor {
            file: shard.label.clone(),
            tensor: name.to_string(),
            reason: "not in this shard".into(),
        })?;
    let label = shard.label.clone();
    let bad = |reason: String| Fp8KvError::CheckpointTensor {
        file: label.clone(),
        tensor: name.to_string(),
        reason,
    };
    if !(info.shape.is_empty() || info.shape == [1]) {
        return Err(bad(format!(
            "shape {:?}: a KV scale must be a scalar of shape [] or [1] (per-head or \
             per-channel scales are not supported)",
            info.shape
        )));
    }
    let width = match info.dtype {
        StDtype::F32 => 4,
        StDtype::F16 | StDtype::BF16 => 2,
        other => {
            return Err(bad(format!(
                "dtype {other:?}: a KV scale must be F32, F16 or BF16"
            )))
        }
    };
    let bytes = shard.read(name, &info)?;
    if bytes.len() != width {
        return Err(bad(format!(
            "{} bytes of data for one {:?} value",
            bytes.len(),
            info.dtype
        )));
    }
    Ok(match info.dtype {
        StDtype::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        StDtype::F16 => half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
        _ => half::bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
    })
}

fn load(mut shards: Vec<Shard<'_>>, num_layers: usize) -> Result<LoadedScales> {
    let mut scales = Vec::with_capacity(num_layers);
    let mut warnings = Vec::new();
    for layer in 0..num_layers {
        let mut pair = [1.0f32; 2];
        for (value, side) in pair.iter_mut().zip([KvSide::K, KvSide::V]) {
            let mut found = None;
            for name in scale_tensor_names(layer, side) {
                if let Some(i) = find(&shards, &name)? {
                    found = Some((i, name));
                    break;
                }
            }
            let Some((i, tensor)) = found else {
                warnings.push(ScaleWarning::Missing { layer, side });
                continue;
            };
            let v = read_scalar(&mut shards[i], &tensor)?;
            if !(v.is_finite() && v > 0.0) {
                return Err(Fp8KvError::CheckpointScale {
                    layer,
                    tensor,
                    value: v,
                });
            }
            *value = v;
        }
        scales.push(KvScales::new(pair[0], pair[1])?);
    }
    Ok(LoadedScales { scales, warnings })
}
