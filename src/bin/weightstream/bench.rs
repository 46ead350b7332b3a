//! `weightstream bench` (in progress).

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct Args {}

/// Run `bench`.
pub fn run(_args: Args) -> weightstream::Result<()> {
    Err(weightstream::Error::InvalidOption { what: "`bench` is not built yet".into() })
}
