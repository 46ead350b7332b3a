//! `weightstream inspect PATH [--json]`: validate every header of a checkpoint and list its
//! tensors, as JSON (the contract in DESIGN.md "CLI contract") or as a table.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use weightstream::Checkpoint;

/// Arguments of `inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file, an index JSON, a directory, or a Hugging Face cache folder.
    pub path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The JSON report: `{"files":[..],"metadata":{..},"total_bytes":N,"tensors":[..]}`.
#[derive(Serialize)]
struct Report<'a> {
    files: Vec<FileEntry<'a>>,
    /// The files' `__metadata__` maps merged (a later file's value wins on a shared key).
    metadata: BTreeMap<&'a str, &'a str>,
    total_bytes: u64,
    tensors: Vec<TensorEntry<'a>>,
}

#[derive(Serialize)]
struct FileEntry<'a> {
    path: &'a Path,
    /// Length of the header JSON (the bytes after the 8-byte length prefix).
    header_bytes: u64,
    tensors: usize,
    /// Bytes of tensor data in the file.
    bytes: u64,
}

#[derive(Serialize)]
struct TensorEntry<'a> {
    name: &'a str,
    dtype: &'static str,
    shape: &'a [u64],
    file: &'a Path,
    data_offsets: [u64; 2],
}

impl<'a> Report<'a> {
    fn new(ckpt: &'a Checkpoint) -> Self {
        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::with_capacity(ckpt.tensor_count());
        let files = ckpt
            .files
            .iter()
            .map(|f| {
                metadata.extend(f.header.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                tensors.extend(f.header.tensors.iter().map(|t| TensorEntry {
                    name: &t.name,
                    dtype: t.dtype.name(),
                    shape: &t.shape,
                    file: &f.path,
                    data_offsets: [t.data_offsets.0, t.data_offsets.1],
                }));
                FileEntry {
                    path: &f.path,
                    header_bytes: f.header.header_len,
                    tensors: f.header.tensors.len(),
                    bytes: f.header.data_len(),
                }
            })
            .collect();
        Report { files, metadata, total_bytes: ckpt.total_bytes(), tensors }
    }
}

/// Run `inspect`.
pub fn run(args: Args) -> weightstream::Result<()> {
    let ckpt = Checkpoint::open(&args.path)?;
    let report = Report::new(&ckpt);
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let written = if args.json { write_json(&mut out, &report) } else { write_table(&mut out, &report) };
    match written.and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // The reader went away (`| head`): stop quietly, as other command-line tools do.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(source) => Err(weightstream::Error::Io { file: PathBuf::from("<stdout>"), tensor: None, source }),
    }
}

fn write_json(out: &mut impl Write, report: &Report<'_>) -> io::Result<()> {
    serde_json::to_writer(&mut *out, report).map_err(io::Error::from)?;
    writeln!(out)
}

fn write_table(out: &mut impl Write, report: &Report<'_>) -> io::Result<()> {
    writeln!(
        out,
        "{} file{}, {} tensor{}, {}",
        report.files.len(),
        plural(report.files.len()),
        report.tensors.len(),
        plural(report.tensors.len()),
        human_bytes(report.total_bytes)
    )?;
    for f in &report.files {
        writeln!(
            out,
            "  {}  header {} B, {} tensor{}, {}",
            f.path.display(),
            f.header_bytes,
            f.tensors,
            plural(f.tensors),
            human_bytes(f.bytes)
        )?;
    }
    if !report.metadata.is_empty() {
        writeln!(out, "metadata:")?;
        for (k, v) in &report.metadata {
            writeln!(out, "  {k}: {}", one_line(v))?;
        }
    }
    if report.tensors.is_empty() {
        return Ok(());
    }
    let shapes: Vec<String> = report.tensors.iter().map(|t| format!("{:?}", t.shape)).collect();
    let name_w = report.tensors.iter().map(|t| t.name.chars().count()).max().unwrap_or(0).max(4);
    let dtype_w = report.tensors.iter().map(|t| t.dtype.len()).max().unwrap_or(0).max(5);
    let shape_w = shapes.iter().map(String::len).max().unwrap_or(0).max(5);
    let several_files = report.files.len() > 1;
    writeln!(out)?;
    write!(out, "{:<name_w$}  {:<dtype_w$}  {:<shape_w$}  {:>12}", "name", "dtype", "shape", "bytes")?;
    if several_files {
        write!(out, "  file")?;
    }
    writeln!(out)?;
    for (t, shape) in report.tensors.iter().zip(&shapes) {
        let bytes = t.data_offsets[1] - t.data_offsets[0];
        write!(out, "{:<name_w$}  {:<dtype_w$}  {:<shape_w$}  {:>12}", one_line(t.name), t.dtype, shape, bytes)?;
        if several_files {
            let file = t.file.file_name().map(Path::new).unwrap_or(t.file);
            write!(out, "  {}", file.display())?;
        }
        writeln!(out)?;
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `s` with control characters escaped, so that a hostile name cannot break the table.
fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars().flat_map(char::escape_debug).collect::<String>().into()
    } else {
        s.into()
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2} {} ({n} B)", UNITS[unit])
}
