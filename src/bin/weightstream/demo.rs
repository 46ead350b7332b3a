//! `weightstream demo` (in progress).

/// Arguments of `demo`.
#[derive(clap::Args)]
pub struct Args {}

/// Run `demo`.
pub fn run(_args: Args) -> weightstream::Result<()> {
    Err(weightstream::Error::InvalidOption { what: "`demo` is not built yet".into() })
}
