//! Loading checkpoints: Hugging Face folders (safetensors, sharded or not, and `tokenizer.json`) and GGUF files
//! (dequantized on load, tokenizer rebuilt from the metadata).

pub mod gguf;
pub mod safetensors;
pub mod tokenizer;
mod weights;

pub use weights::Weights;
