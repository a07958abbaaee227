//! Loading checkpoints: Hugging Face folders (safetensors, sharded or not, and `tokenizer.json`) and GGUF files
//! (dequantized on load, tokenizer rebuilt from the metadata).

mod default_model;
pub mod gguf;
pub mod safetensors;
pub mod tokenizer;
mod weights;

pub use default_model::{cache_dir, default_model, default_model_candidates, DEFAULT_MODEL_FILE};
pub use weights::Weights;
