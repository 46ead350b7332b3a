//! The `weightstream` command line: `inspect`, `load`, `bench`, `demo`.
//!
//! Exit status: 0 on success; 1 on bad input or a failed load, with one line
//! `error: <file>: <what>` on stderr; 2 on a usage error (clap's own).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod inspect;
mod load;

#[derive(Parser)]
#[command(name = "weightstream", version, about = "Stream .safetensors checkpoints into GPU (or host) memory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a checkpoint's headers and list its tensors.
    Inspect(inspect::Args),
    /// Load a checkpoint to a device and report what was loaded.
    Load(load::Args),
    /// Compare load strategies on the same checkpoint, in the same run.
    Bench(bench::Args),
    /// Write a demo checkpoint to a temp dir, load it, verify it, remove it.
    Demo(demo::Args),
}

fn main() -> ExitCode {
    // `bench` runs its mmap baseline in a child process of this executable.
    if let Some(code) = weightstream::bench::child_main() {
        return code;
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Load(a) => load::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Demo(a) => demo::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error's Display already starts with the file when there is one.
            let msg = e.to_string().replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}
