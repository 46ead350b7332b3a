//! A sentence-transformers BERT (all-MiniLM-L6-v2, say) loaded through weightstream into
//! candle-transformers' `BertModel`; prints the sentence embedding of a text as JSON:
//! `{"embedding": [...]}` (mean pooling over the tokens, then L2-normalised).
//!
//! ```sh
//! cargo run --release --features candle --example candle_bert -- MODEL_DIR "some text"
//! ```
//! MODEL_DIR holds `model.safetensors`, `config.json` and `tokenizer.json`.
//!
//! The functions below are also the test's (`tests/candle_backend.rs` includes this file), so
//! the embedding is computed in one place.

use std::error::Error;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, DTYPE};
use tokenizers::Tokenizer;
use weightstream::Loader;

/// What a failure here is: candle's, the tokenizer's, weightstream's or the file system's.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// A BERT checkpoint's model and tokenizer.
pub struct Bert {
    pub model: BertModel,
    pub tokenizer: Tokenizer,
}

/// The model of `dir`, its weights handed out by `vb`.
pub fn load_bert(dir: &Path, vb: VarBuilder) -> Result<Bert, BoxError> {
    let config: Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let model = BertModel::load(vb, &config)?;
    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
    Ok(Bert { model, tokenizer })
}

/// The model of `dir`, its weights loaded by weightstream (every weight in candle's memory when
/// it returns).
pub fn load_with_weightstream(dir: &Path, device: &Device) -> Result<Bert, BoxError> {
    let vb = weightstream::candle::var_builder(&Loader::new(), dir.join("model.safetensors"), DTYPE, device)?;
    load_bert(dir, vb)
}

/// The sentence embedding of `text`: the last hidden states averaged over the tokens the
/// attention mask keeps, then L2-normalised (sentence-transformers' mean pooling).
pub fn embed(bert: &Bert, text: &str) -> Result<Vec<f32>, BoxError> {
    let enc = bert.tokenizer.encode(text, true)?;
    let device = &bert.model.device;
    let ids = Tensor::new(enc.get_ids(), device)?.unsqueeze(0)?;
    let types = Tensor::new(enc.get_type_ids(), device)?.unsqueeze(0)?;
    let mask = Tensor::new(enc.get_attention_mask(), device)?.unsqueeze(0)?;
    let hidden = bert.model.forward(&ids, &types, Some(&mask))?; // (1, tokens, hidden)
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (1, tokens, 1)
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?; // (1, hidden)
    let mean = summed.broadcast_div(&mask.sum(1)?)?;
    let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(mean.broadcast_div(&norm)?.squeeze(0)?.to_vec1::<f32>()?)
}

/// The cosine similarity of two L2-normalised embeddings: their dot product.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, text] = args.as_slice() else {
        return Err(
            "usage: candle_bert MODEL_DIR TEXT (MODEL_DIR has model.safetensors, config.json, tokenizer.json)".into()
        );
    };
    let bert = load_with_weightstream(Path::new(dir), &Device::Cpu)?;
    let embedding = embed(&bert, text)?;
    println!("{}", serde_json::json!({ "embedding": embedding }));
    Ok(())
}
