//! Fuzz the header parser: any bytes, as a whole file (length prefix, header, data).
//!
//! `cargo +nightly fuzz run header` (from the repository root).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|file: &[u8]| {
    // As `read_header` does: an 8-byte length, checked, then the header bytes.
    let Some((prefix, rest)) = file.split_first_chunk::<8>() else {
        return;
    };
    let header_len = u64::from_le_bytes(*prefix);
    let Some(header) = usize::try_from(header_len).ok().and_then(|n| rest.get(..n)) else {
        return;
    };
    let file_len = file.len() as u64;
    if let Ok(h) = weightstream::format::parse_header("fuzz.safetensors", header, file_len) {
        // What the parser accepted holds together.
        assert_eq!(h.data_start, 8 + header_len);
        let mut end = 0;
        for t in &h.tensors {
            assert_eq!(t.data_offsets.0, end);
            assert_eq!(Some(t.byte_len()), t.dtype.bytes_for(t.elements()));
            end = t.data_offsets.1;
        }
        assert_eq!(h.data_start + end, file_len);
    }
    // Arbitrary bytes as header of an arbitrary length: must not panic either.
    let _ = weightstream::format::parse_header("fuzz.safetensors", file, u64::MAX);
});
