//! `weightstream load` (in progress).

/// Arguments of `load`.
#[derive(clap::Args)]
pub struct Args {}

/// Run `load`.
pub fn run(_args: Args) -> weightstream::Result<()> {
    Err(weightstream::Error::InvalidOption { what: "`load` is not built yet".into() })
}
