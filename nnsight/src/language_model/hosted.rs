//! A [`LanguageModel`] as a server hosts it ([`Hosted`]): it runs a request's job here and describes itself to
//! clients (configuration, tokenizer, parameter shapes).

use super::LanguageModel;
use crate::exec::{run_job, Job, Watch};
use crate::interleave::Finished;
use crate::models::CausalLm;
use crate::remote::{Hosted, ModelInfo};
use crate::{Error, Result};

impl<M: CausalLm + 'static> Hosted for LanguageModel<M>
where
    LanguageModel<M>: Send,
{
    fn run_job(&self, job: &Job, watch: Watch<'_>) -> Result<Finished> {
        run_job(self, job, Some(watch))
    }

    fn describe(&self, name: &str) -> Result<ModelInfo> {
        let parameters = crate::nn::named_parameters(self.model())
            .into_iter()
            .map(|(n, t)| (n, t.size(), crate::graph::value::kind_name(t.kind()).to_string()))
            .collect();
        Ok(ModelInfo {
            name: name.to_string(),
            architecture: crate::models::by_model_type(self.config.model_type()?)?.name.to_string(),
            config: self.config_json().clone(),
            tokenizer: self
                .tokenizer()
                .to_string(false)
                .map_err(|e| Error::Tokenizer { message: format!("cannot describe the tokenizer: {e}") })?,
            special: *self.special_tokens(),
            parameters,
        })
    }
}
