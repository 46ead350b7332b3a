//! Memory of parsing hostile headers and index files stays proportional to their size (issue
//! 12, items 6 and 7): a counting global allocator measures the peak of what `parse_header` and
//! `ShardIndex::read` allocate for header bombs scaled to about 8 MB.
//!
//! In a file of its own because the allocator counts the whole process; the tests take a lock so
//! that one measures at a time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use weightstream::format::{parse_header, ShardIndex, MAX_METADATA_KEYS};
use weightstream::Error;

/// The system allocator, counting the bytes live now and the peak since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::SeqCst) + by;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees for `layout` are `System`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (so from `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as in `dealloc`; `new_size` is the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as if the old and the new block were live together, as when realloc moves.
            grew(new_size);
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak bytes allocated while `f` ran, beyond what was live when it started; and its result.
fn peak_during<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (PEAK.load(Ordering::SeqCst) - base, out)
}

const SCALE: usize = 8 << 20;

/// A header of `{..}` entries made by `entry(i)`, joined with commas until it is about `SCALE`
/// bytes.
fn header_of(mut entry: impl FnMut(usize) -> String) -> (Vec<u8>, usize) {
    let mut h = String::from("{");
    let mut n = 0;
    while h.len() < SCALE {
        if n > 0 {
            h.push(',');
        }
        h.push_str(&entry(n));
        n += 1;
    }
    h.push('}');
    (h.into_bytes(), n)
}

/// Parse `header` for a file of `data_len` data bytes; assert the peak allocation is within
/// 3x the header plus `slack` bytes; return the result.
fn parse_within(what: &str, header: &[u8], data_len: u64, slack: usize) -> weightstream::Result<usize> {
    let file_len = 8 + header.len() as u64 + data_len;
    let (peak, result) = peak_during(|| parse_header("bomb.safetensors", header, file_len).map(|h| h.tensors.len()));
    let bound = 3 * header.len() + slack;
    eprintln!("{what}: header {} B, peak {} B ({:.2}x)", header.len(), peak, peak as f64 / header.len() as f64);
    assert!(peak <= bound, "{what}: peak {peak} B > 3 x {} + {slack}", header.len());
    result
}

#[test]
fn zero_size_tensors_cost_at_most_three_times_their_header() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (h, n) = header_of(|i| format!(r#""{i:x}":{{"dtype":"F16","shape":[0],"data_offsets":[0,0]}}"#));
    assert_eq!(parse_within("zero-size tensors", &h, 0, 4 << 20).unwrap(), n);
}

#[test]
fn one_byte_tensors_cost_at_most_three_times_their_header() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (h, n) = header_of(|i| format!(r#""{i:x}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{}]}}"#, i + 1));
    assert_eq!(parse_within("one-byte tensors", &h, n as u64, 4 << 20).unwrap(), n);
}

#[test]
fn long_shapes_are_refused_before_they_are_stored() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ones = vec!["1"; 10_000].join(",");
    let (h, n) = header_of(|i| format!(r#""{i}":{{"dtype":"U8","shape":[{ones}],"data_offsets":[{i},{}]}}"#, i + 1));
    let err = parse_within("rank 10,000 tensors", &h, n as u64, 4 << 20).unwrap_err();
    assert!(matches!(err, Error::RankTooLarge { .. }), "{err}");
    // One tensor of rank 4 million: the dimensions past the limit are skipped, not stored.
    let h = format!(r#"{{"t":{{"dtype":"U8","shape":[{}],"data_offsets":[0,1]}}}}"#, vec!["1"; 4 << 20].join(","));
    let err = parse_within("one tensor of rank 4M", h.as_bytes(), 1, 1 << 20).unwrap_err();
    assert!(matches!(err, Error::RankTooLarge { .. }), "{err}");
}

#[test]
fn metadata_keys_are_counted_before_they_are_stored() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (body, _) = header_of(|i| format!(r#""{i:x}":"""#));
    let h = format!(r#"{{"__metadata__":{}}}"#, String::from_utf8(body).unwrap());
    let err = parse_within("8 MB of metadata keys", h.as_bytes(), 0, 16 << 20).unwrap_err();
    assert!(matches!(err, Error::TooManyMetadataKeys { .. }), "{err}");
    // The most keys allowed cost a bounded amount beyond the header.
    let keys: Vec<String> = (0..MAX_METADATA_KEYS).map(|i| format!(r#""{i:x}":"""#)).collect();
    let h = format!(r#"{{"__metadata__":{{{}}}}}"#, keys.join(","));
    assert_eq!(parse_within("the most metadata keys", h.as_bytes(), 0, 16 << 20).unwrap(), 0);
}

#[test]
fn index_metadata_is_skipped_unread() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.safetensors"), b"").unwrap();
    let zeros = vec!["0"; SCALE / 2].join(",");
    let text = format!(
        r#"{{"metadata":{{"total_size":3,"junk":[{zeros}],"more":{{"a":[[],[],{{}}]}}}},"weight_map":{{"w":"s.safetensors"}}}}"#
    );
    let path = dir.path().join("model.safetensors.index.json");
    std::fs::write(&path, &text).unwrap();
    drop(zeros);
    let (peak, index) = peak_during(|| ShardIndex::read(&path));
    let index = index.unwrap();
    assert_eq!(index.weight_map.len(), 1);
    eprintln!("index of {} B: peak {peak} B", text.len());
    // The file's bytes, once, and little else.
    assert!(peak <= text.len() + (1 << 20), "peak {peak} B for an index of {} B", text.len());
}
