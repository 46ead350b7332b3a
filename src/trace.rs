//! A Chrome trace (Perfetto-compatible) of a load: a span per read, copy and conversion.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use crate::error::{Error, Result};

/// One span of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// What happened: `"read"`, `"copy"`, `"convert"`, `"deliver"`.
    pub name: &'static str,
    /// The track (`"read slot 0"`, `"stream 1"`).
    pub track: String,
    /// Start, in microseconds since the load began.
    pub start_us: f64,
    /// Duration in microseconds.
    pub dur_us: f64,
    /// Bytes moved.
    pub bytes: u64,
}

/// Collects spans during a load.
///
/// ```
/// let mut t = weightstream::trace::TraceRecorder::new();
/// let s = std::time::Instant::now();
/// t.span("read", "read slot 0", s, std::time::Instant::now(), 4096);
/// let dir = tempfile::tempdir()?;
/// t.write_chrome_json(dir.path().join("t.json"))?;
/// assert_eq!(t.spans().len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRecorder {
    origin: Instant,
    spans: Vec<Span>,
}

impl Default for TraceRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceRecorder {
    /// A recorder whose time zero is now.
    pub fn new() -> Self {
        TraceRecorder { origin: Instant::now(), spans: Vec::new() }
    }

    /// Time zero.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Record a span between two instants.
    pub fn span(&mut self, name: &'static str, track: impl Into<String>, start: Instant, end: Instant, bytes: u64) {
        let start_us = start.saturating_duration_since(self.origin).as_secs_f64() * 1e6;
        let dur_us = end.saturating_duration_since(start).as_secs_f64() * 1e6;
        self.spans.push(Span { name, track: track.into(), start_us, dur_us, bytes });
    }

    /// Record a span given in microseconds since time zero (device-timed spans).
    pub fn span_us(&mut self, name: &'static str, track: impl Into<String>, start_us: f64, dur_us: f64, bytes: u64) {
        self.spans.push(Span { name, track: track.into(), start_us, dur_us, bytes });
    }

    /// The spans recorded.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// Write the Chrome trace event JSON.
    pub fn write_chrome_json(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut tracks: Vec<&str> = self.spans.iter().map(|s| s.track.as_str()).collect();
        tracks.sort();
        tracks.dedup();
        let tid = |t: &str| tracks.binary_search(&t).unwrap_or(0) + 1;
        let mut events = Vec::with_capacity(self.spans.len() + tracks.len());
        for (i, t) in tracks.iter().enumerate() {
            events.push(
                serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": i + 1, "args": {"name": t}}),
            );
        }
        for s in &self.spans {
            events.push(serde_json::json!({
                "name": s.name, "cat": s.name, "ph": "X", "pid": 1, "tid": tid(&s.track),
                "ts": s.start_us, "dur": s.dur_us, "args": {"bytes": s.bytes},
            }));
        }
        let doc = serde_json::json!({"traceEvents": events, "displayTimeUnit": "ms"});
        let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        f.write_all(doc.to_string().as_bytes()).map_err(|e| Error::io(path, e))
    }
}
