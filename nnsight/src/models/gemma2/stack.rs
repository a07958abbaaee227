//! The decoder stack Gemma 2 and Gemma 3 share: [`gemma_stack!`] writes a family's decoder layer (attention and
//! MLP, each between a pre-norm and a post-norm, added to the residual stream), its decoder model (the scaled
//! embedding, the layers, the final norm) and its causal LM (the model, the tied `lm_head`, the final soft cap, the
//! masks and rotary tables of the full and the sliding layers, the KV cache), given the family's attention module.

/// Writes a Gemma family's decoder layer, decoder model and causal LM:
///
/// ```ignore
/// gemma_stack! {
///     /// Documentation of the causal LM.
///     root: Gemma2 = "Gemma2ForCausalLM", architecture "gemma2", family Gemma2,
///     model: Gemma2Model = "Gemma2Model",
///     layer: Gemma2DecoderLayer = "Gemma2DecoderLayer",
///     attention: Gemma2Attention = Gemma2Attention::load, // fn(&mut Weights, &str, &GemmaConfig, usize)
///     mlp: "Gemma2MLP", norm: "Gemma2RMSNorm", embedding: "Gemma2TextScaledWordEmbedding",
/// }
/// ```
///
/// The types are named by the caller, their `kind`s (what the module tree prints) are the Hugging Face class
/// names given, and their fields are the state dict's names (`model.layers.N.pre_feedforward_layernorm`).
macro_rules! gemma_stack {
    (
        $(#[$root_doc:meta])*
        root: $root:ident = $root_kind:literal, architecture $arch:literal, family $family:ident,
        model: $model:ident = $model_kind:literal,
        layer: $layer:ident = $layer_kind:literal,
        attention: $attn:ty = $load_attn:expr,
        mlp: $mlp_kind:literal, norm: $norm_kind:literal, embedding: $embed_kind:literal $(,)?
    ) => {
        #[doc = concat!("One decoder layer (`", $layer_kind, "`): `x + post_attention_layernorm(self_attn(")]
        /// input_layernorm(x)))`, then `h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`.
        #[derive(Debug, $crate::Traceable)]
        #[traceable(kind = $layer_kind)]
        pub struct $layer {
            #[traceable(path)]
            path: String,
            /// Norm before attention.
            pub input_layernorm: $crate::models::gemma2::GemmaRmsNorm,
            /// Attention.
            pub self_attn: $attn,
            /// Norm of the attention's output, before it joins the residual stream.
            pub post_attention_layernorm: $crate::models::gemma2::GemmaRmsNorm,
            /// Norm before the MLP.
            pub pre_feedforward_layernorm: $crate::models::gemma2::GemmaRmsNorm,
            /// The GeGLU MLP (`hidden_activation` on the gate).
            pub mlp: $crate::models::llama::LlamaMlp,
            /// Norm of the MLP's output, before it joins the residual stream.
            pub post_feedforward_layernorm: $crate::models::gemma2::GemmaRmsNorm,
        }

        impl $layer {
            fn load(
                w: &mut $crate::load::Weights,
                path: &str,
                c: &$crate::models::gemma2::GemmaConfig,
                layer: usize,
            ) -> $crate::Result<Self> {
                use $crate::models::gemma2::GemmaRmsNorm;
                use $crate::nn::join_path;
                let norm = |w: &mut $crate::load::Weights, name: &str| {
                    GemmaRmsNorm::load(w, &join_path(path, name), c.hidden_size, c.rms_norm_eps, $norm_kind)
                };
                let act = $crate::nn::ActivationFn::from_hf(c.activation_name())
                    .ok_or_else(|| $crate::Error::config(w.source(), "unsupported hidden_activation"))?;
                let sizes = (c.hidden_size, c.intermediate_size, false);
                Ok($layer {
                    path: path.to_string(),
                    input_layernorm: norm(w, "input_layernorm")?,
                    self_attn: ($load_attn)(w, &join_path(path, "self_attn"), c, layer)?,
                    post_attention_layernorm: norm(w, "post_attention_layernorm")?,
                    pre_feedforward_layernorm: norm(w, "pre_feedforward_layernorm")?,
                    mlp: $crate::models::llama::LlamaMlp::load_gated(w, &join_path(path, "mlp"), sizes, act, $mlp_kind)?,
                    post_feedforward_layernorm: norm(w, "post_feedforward_layernorm")?,
                })
            }
        }

        impl $crate::nn::Forward for $layer {
            fn forward(&self, cx: &mut $crate::nn::Ctx<'_>, x: &tch::Tensor) -> $crate::Result<tch::Tensor> {
                use $crate::error::TchResultExt as _;
                let p = self.path.as_str();
                let h = cx.call(&self.input_layernorm, x)?;
                let h = cx.call(&self.self_attn, &h)?;
                let h = cx.call(&self.post_attention_layernorm, &h)?;
                let x = x.f_add(&h).at(p)?;
                let h = cx.call(&self.pre_feedforward_layernorm, &x)?;
                let h = cx.call(&self.mlp, &h)?;
                let h = cx.call(&self.post_feedforward_layernorm, &h)?;
                x.f_add(&h).at(p)
            }
        }

        #[doc = concat!("The decoder stack (`", $model_kind, "`): token ids in, final-norm hidden states out.")]
        #[derive(Debug, $crate::Traceable)]
        #[traceable(kind = $model_kind)]
        pub struct $model {
            #[traceable(path)]
            path: String,
            /// Token embeddings `[vocab, hidden]`, scaled by `sqrt(hidden)` in the module.
            pub embed_tokens: $crate::models::gemma2::GemmaScaledEmbedding,
            /// Decoder layers.
            pub layers: $crate::nn::ModuleList<$layer>,
            /// Final norm.
            pub norm: $crate::models::gemma2::GemmaRmsNorm,
        }

        impl $crate::nn::Forward for $model {
            fn forward(&self, cx: &mut $crate::nn::Ctx<'_>, ids: &tch::Tensor) -> $crate::Result<tch::Tensor> {
                let mut h = cx.call(&self.embed_tokens, ids)?;
                for layer in &self.layers {
                    h = cx.call(layer, &h)?;
                }
                cx.call(&self.norm, &h)
            }
        }

        $(#[$root_doc])*
        #[derive(Debug, $crate::Traceable)]
        #[traceable(kind = $root_kind)]
        pub struct $root {
            #[traceable(path)]
            path: String,
            /// The decoder stack (`model.*` in the state dict).
            pub model: $model,
            /// The head `[vocab, hidden]` (the embedding matrix when tied). Its output is before the final soft
            /// cap; the model's output (`model.output`) after it.
            pub lm_head: $crate::nn::Linear,
            #[traceable(skip)]
            config: $crate::models::gemma2::GemmaConfig,
            /// Inverse rotary frequencies of the global layers.
            #[traceable(skip)]
            inv_freq: tch::Tensor,
            /// Those of the sliding layers where they differ (Gemma 3).
            #[traceable(skip)]
            local_inv_freq: Option<tch::Tensor>,
        }

        impl $root {
            /// The configuration.
            pub fn config(&self) -> &$crate::models::gemma2::GemmaConfig {
                &self.config
            }
        }

        impl $crate::nn::Forward for $root {
            fn forward(&self, cx: &mut $crate::nn::Ctx<'_>, ids: &tch::Tensor) -> $crate::Result<tch::Tensor> {
                let h = cx.call(&self.model, ids)?;
                let h = $crate::models::head_positions(cx, &self.path, h)?;
                let logits = cx.call(&self.lm_head, &h)?;
                $crate::models::gemma2::soft_cap(&logits, self.config.final_logit_softcapping, &self.path)
            }
        }

        impl $crate::models::CausalLm for $root {
            const ARCHITECTURE: &'static str = $arch;

            fn from_config(
                raw: &$crate::models::RawConfig,
                w: &mut $crate::load::Weights,
            ) -> $crate::Result<Self> {
                use $crate::models::gemma2::{GemmaConfig, GemmaFamily, GemmaRmsNorm, GemmaScaledEmbedding};
                use $crate::nn::{Linear, ModuleList};
                let c = GemmaConfig::from_raw(raw, GemmaFamily::$family)?;
                let (h, vocab) = (c.hidden_size, c.vocab_size);
                let embed_tokens = GemmaScaledEmbedding::load(w, "model.embed_tokens", vocab, h, $embed_kind)?;
                let layers = (0..c.num_hidden_layers)
                    .map(|i| $layer::load(w, &format!("model.layers.{i}"), &c, i as usize))
                    .collect::<$crate::Result<Vec<_>>>()?;
                let norm = GemmaRmsNorm::load(w, "model.norm", h, c.rms_norm_eps, $norm_kind)?;
                let lm_head = if c.tie_word_embeddings && !w.contains("lm_head.weight") {
                    Linear::from_tensors("lm_head", embed_tokens.weight.shallow_clone(), None)
                } else {
                    Linear::load(w, "lm_head", h, vocab, false)?
                };
                let (inv_freq, local_inv_freq) = $crate::models::gemma2::inv_freqs(&c, w)?;
                let model = $model {
                    path: "model".into(),
                    embed_tokens,
                    layers: ModuleList::new("model.layers", layers),
                    norm,
                };
                Ok($root { path: String::new(), model, lm_head, config: c, inv_freq, local_inv_freq })
            }

            fn prepare(&self, batch: &$crate::models::batch::Batch) -> $crate::Result<$crate::nn::ForwardState> {
                let local = self.local_inv_freq.as_ref().unwrap_or(&self.inv_freq);
                let window = self.config.window();
                $crate::models::llama::prepare_with([&self.inv_freq, local], window, self.dtype(), batch)
            }

            fn cache_layers(&self) -> usize {
                self.model.layers.len()
            }

            fn standard_names(&self) -> $crate::models::StandardNames {
                $crate::models::StandardNames::llama_layout(self.model.layers.len())
            }

            fn prepare_cached(
                &self,
                input: &$crate::models::CachedInput,
                kv: $crate::nn::KvCache,
            ) -> $crate::Result<$crate::nn::ForwardState> {
                let local = self.local_inv_freq.as_ref().unwrap_or(&self.inv_freq);
                let (window, kind) = (self.config.window(), self.dtype());
                $crate::models::llama::prepare_cached_with([&self.inv_freq, local], window, kind, input, kv)
            }

            fn vocab_size(&self) -> i64 {
                self.config.vocab_size
            }

            fn dtype(&self) -> tch::Kind {
                self.lm_head.weight.kind()
            }

            fn to_device(&mut self, device: tch::Device, kind: tch::Kind) -> $crate::Result<()> {
                use $crate::error::TchResultExt as _;
                $crate::models::move_params(self, device, kind)?;
                self.inv_freq = self.inv_freq.f_to_device(device).at("model.rotary_emb")?;
                if let Some(t) = self.local_inv_freq.as_mut() {
                    *t = t.f_to_device(device).at("model.rotary_emb")?;
                }
                Ok(())
            }
        }
    };
}
pub(crate) use gemma_stack;
