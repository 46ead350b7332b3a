//! `weightstream inspect PATH [--json]`.

use std::path::PathBuf;

/// Arguments of `inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file, an index JSON, a directory, or a Hugging Face cache folder.
    pub path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Run `inspect`.
pub fn run(args: Args) -> weightstream::Result<()> {
    let ckpt = weightstream::Checkpoint::open(&args.path)?;
    println!("{} files, {} tensors, {} bytes", ckpt.files.len(), ckpt.tensor_count(), ckpt.total_bytes());
    Ok(())
}
