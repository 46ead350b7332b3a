//! The `weightstream` command line: `inspect`, `load`, `bench`, `demo`.
//!
//! Exit status: 0 on success; 1 on bad input or a failed load, with one line
//! `error: <file>: <what>` on stderr; 2 on a usage error (clap's own); 128 + the signal's number
//! (130 for SIGINT, 143 for SIGTERM, as shells report) when `demo` was interrupted and removed
//! its files. A closed stdout pipe ends a command quietly with 0 (see `out.rs`).

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[macro_use]
mod out;

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

/// Why a command did not succeed.
pub enum Failure {
    /// It failed: exit status 1.
    Error(weightstream::Error),
    /// A termination signal stopped it after it cleaned up: exit status 128 + `signal`.
    Interrupted {
        /// The signal's number.
        signal: i32,
        /// What was cleaned up (or could not be).
        cleanup: String,
    },
}

impl From<weightstream::Error> for Failure {
    fn from(e: weightstream::Error) -> Self {
        Failure::Error(e)
    }
}

fn main() -> ExitCode {
    // `bench` runs its mmap baseline in a child process of this executable.
    if let Some(code) = weightstream::bench::child_main() {
        return code;
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a).map_err(Failure::from),
        Command::Load(a) => load::run(a).map_err(Failure::from),
        Command::Bench(a) => bench::run(a).map_err(Failure::from),
        Command::Demo(a) => demo::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`| head`): stop quietly, as other tools do.
        Err(Failure::Error(e)) if out::is_closed_stdout(&e) => ExitCode::SUCCESS,
        Err(Failure::Error(e)) => {
            // One line: the error's Display already starts with the file when there is one.
            let msg = e.to_string().replace('\n', " ");
            // Nothing more can be reported if stderr itself cannot be written.
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            ExitCode::from(1)
        }
        Err(Failure::Interrupted { signal, cleanup }) => {
            let name = match signal {
                signal_hook::consts::SIGINT => "SIGINT",
                signal_hook::consts::SIGTERM => "SIGTERM",
                _ => "a signal",
            };
            let _ = writeln!(std::io::stderr(), "error: interrupted by {name}; {cleanup}");
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
        }
    }
}
