//! Loading a real model: SmolLM2-135M-Instruct as a GGUF (Q4_1), for the Burn example model.

pub mod error;
pub mod fetch;
pub mod gguf;

pub use error::ModelError;
