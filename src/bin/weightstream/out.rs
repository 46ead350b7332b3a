//! Writing to stdout without panicking: `println!` panics when stdout is full (`/dev/full`) or
//! closed; these return the error instead, as an [`weightstream::Error::Io`] on `<stdout>`.
//!
//! A write error ends the command with exit status 1 and `error: <stdout>: ...`, except a
//! closed pipe (`weightstream load m.safetensors | head -1`), which ends it quietly with exit
//! status 0, as `inspect` always did: the reader has what it wanted.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The name stdout has in errors.
pub const STDOUT: &str = "<stdout>";

/// Write `line` and a newline to stdout (`outln!` formats and calls this), and flush, so that
/// a write error surfaces here and not in a destructor that cannot report it.
pub fn write_line(line: fmt::Arguments<'_>) -> weightstream::Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(line).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush()).map_err(stdout_error)
}

/// A failed write to stdout as the CLI reports it.
pub fn stdout_error(source: io::Error) -> weightstream::Error {
    weightstream::Error::Io { file: PathBuf::from(STDOUT), tensor: None, source }
}

/// Whether `e` says that the reader of stdout went away (a closed pipe).
pub fn is_closed_stdout(e: &weightstream::Error) -> bool {
    matches!(e, weightstream::Error::Io { file, source, .. }
        if file.as_path() == Path::new(STDOUT) && source.kind() == io::ErrorKind::BrokenPipe)
}

/// `println!` that returns a `weightstream::Result` instead of panicking on a write error.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out::write_line(format_args!($($arg)*))
    };
}
