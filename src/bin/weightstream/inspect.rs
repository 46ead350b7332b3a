//! `weightstream inspect PATH [--json]`: validate every header of a checkpoint and list its
//! tensors, as JSON (the contract in DESIGN.md "CLI contract") or as a table.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use weightstream::text::escape_controls;
use weightstream::Checkpoint;

/// Arguments of `inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file, an index JSON, a directory, or a Hugging Face cache folder; or an
    /// s3://, gs://, az:// or http(s):// URL of a file, an index or a prefix.
    pub path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: crate::load::RemoteArgs,
}

/// The JSON report: `{"files":[..],"metadata":{..},"total_bytes":N,"tensors":[..]}`. The
/// tensors are written straight from the checkpoint's headers, one at a time: nothing is built
/// per tensor.
#[derive(Serialize)]
struct Report<'a> {
    files: Vec<FileEntry<'a>>,
    /// The files' `__metadata__` maps merged (a later file's value wins on a shared key).
    metadata: BTreeMap<&'a str, &'a str>,
    total_bytes: u64,
    tensors: Tensors<'a>,
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

/// Every tensor of a checkpoint, in file order, serialized as a sequence of [`TensorEntry`].
struct Tensors<'a>(&'a Checkpoint);

impl<'a> Tensors<'a> {
    fn iter(&self) -> impl Iterator<Item = TensorEntry<'a>> + 'a {
        self.0.files.iter().flat_map(|f| {
            f.header.tensors.iter().map(move |t| TensorEntry {
                name: &t.name,
                dtype: t.dtype.name(),
                shape: &t.shape,
                file: &f.path,
                data_offsets: [t.data_offsets.0, t.data_offsets.1],
            })
        })
    }
}

impl Serialize for Tensors<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'a> Report<'a> {
    fn new(ckpt: &'a Checkpoint) -> Self {
        let mut metadata = BTreeMap::new();
        let files = ckpt
            .files
            .iter()
            .map(|f| {
                metadata.extend(f.header.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                FileEntry {
                    path: &f.path,
                    header_bytes: f.header.header_len,
                    tensors: f.header.tensors.len(),
                    bytes: f.header.data_len(),
                }
            })
            .collect();
        Report { files, metadata, total_bytes: ckpt.total_bytes(), tensors: Tensors(ckpt) }
    }
}

/// Run `inspect`.
pub fn run(args: Args) -> weightstream::Result<()> {
    let ckpt = args.remote.apply(weightstream::Loader::new()).open(&args.path)?;
    let report = Report::new(&ckpt);
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let written = if args.json { write_json(&mut out, &report) } else { write_table(&mut out, &report) };
    match written.and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // The reader went away (`| head`): stop quietly, as other command-line tools do.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(source) => Err(crate::out::stdout_error(source)),
    }
}

fn write_json(out: &mut impl Write, report: &Report<'_>) -> io::Result<()> {
    serde_json::to_writer(&mut *out, report).map_err(io::Error::from)?;
    writeln!(out)
}

fn write_table(out: &mut impl Write, report: &Report<'_>) -> io::Result<()> {
    let tensor_count = report.files.iter().map(|f| f.tensors).sum::<usize>();
    writeln!(
        out,
        "{} file{}, {} tensor{}, {}",
        report.files.len(),
        plural(report.files.len()),
        tensor_count,
        plural(tensor_count),
        human_bytes(report.total_bytes)
    )?;
    for f in &report.files {
        writeln!(
            out,
            "  {}  header {} B, {} tensor{}, {}",
            escape_controls(&f.path.to_string_lossy()),
            f.header_bytes,
            f.tensors,
            plural(f.tensors),
            human_bytes(f.bytes)
        )?;
    }
    if !report.metadata.is_empty() {
        writeln!(out, "metadata:")?;
        for (k, v) in &report.metadata {
            writeln!(out, "  {}: {}", escape_controls(k), escape_controls(v))?;
        }
    }
    if tensor_count == 0 {
        return Ok(());
    }
    // Column widths from a first pass; no `format!` width (those panic above 65,535), and no
    // string kept per tensor.
    let mut shape = String::new();
    let (mut name_w, mut dtype_w, mut shape_w) = (4, 5, 5);
    for t in report.tensors.iter() {
        name_w = name_w.max(escape_controls(t.name).chars().count());
        dtype_w = dtype_w.max(t.dtype.len());
        render_shape(&mut shape, t.shape);
        shape_w = shape_w.max(shape.len());
    }
    let several_files = report.files.len() > 1;
    writeln!(out)?;
    write_padded(out, "name", name_w)?;
    write_padded(out, "dtype", dtype_w)?;
    write_padded(out, "shape", shape_w)?;
    write!(out, "{:>12}", "bytes")?;
    if several_files {
        write!(out, "  file")?;
    }
    writeln!(out)?;
    for t in report.tensors.iter() {
        let bytes = t.data_offsets[1] - t.data_offsets[0];
        write_padded(out, &escape_controls(t.name), name_w)?;
        write_padded(out, t.dtype, dtype_w)?;
        render_shape(&mut shape, t.shape);
        write_padded(out, &shape, shape_w)?;
        write!(out, "{bytes:>12}")?;
        if several_files {
            let file = t.file.file_name().map(Path::new).unwrap_or(t.file);
            write!(out, "  {}", escape_controls(&file.to_string_lossy()))?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// `shape` as `[2, 3]` into `buf` (cleared first).
fn render_shape(buf: &mut String, shape: &[u64]) {
    use std::fmt::Write as _;
    buf.clear();
    // Writing to a String cannot fail.
    let _ = write!(buf, "{shape:?}");
}

/// `text` left-aligned in a column of `width` characters, then the two-space gap.
fn write_padded(out: &mut impl Write, text: &str, width: usize) -> io::Result<()> {
    const SPACES: &str = "                                                                ";
    out.write_all(text.as_bytes())?;
    let mut pad = width.saturating_sub(text.chars().count()) + 2;
    while pad > 0 {
        let n = pad.min(SPACES.len());
        out.write_all(&SPACES.as_bytes()[..n])?;
        pad -= n;
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
