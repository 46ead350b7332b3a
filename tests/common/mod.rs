//! Helpers shared by the integration tests: the directory of files written by the reference
//! Python `safetensors` (generated on first use by `scripts/make_test_files.py`).
//!
//! Use from a test file with `mod common;`.
#![allow(dead_code)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The generator script.
pub fn generator_script() -> PathBuf {
    repo_root().join("scripts").join("make_test_files.py")
}

/// Where the generated files live (gitignored).
pub fn generated_dir() -> PathBuf {
    repo_root().join("tests").join("data").join("generated")
}

/// The Python to run the generator with: `$WEIGHTSTREAM_PYTHON`, else the repository's
/// `.venv/bin/python`, else `python3` from `PATH`.
pub fn python() -> OsString {
    if let Some(p) = std::env::var_os("WEIGHTSTREAM_PYTHON").filter(|p| !p.is_empty()) {
        return p;
    }
    let venv = repo_root().join(".venv").join("bin").join("python");
    if venv.exists() {
        return venv.into_os_string();
    }
    "python3".into()
}

/// The directory of Python-written test files with its `manifest.json`, generating it when it
/// is missing or was made by another version of the script. `None` (after printing one line
/// saying why) when Python or its packages (`safetensors`, `numpy`, `ml_dtypes`) are missing.
///
/// Safe when several test binaries call it at once: each generates into its own temporary
/// directory and renames it into place; the first rename wins, the others use its result.
pub fn python_data_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match DIR.get_or_init(find_or_generate) {
        Ok(dir) => Some(dir.clone()),
        Err(why) => {
            println!("SKIPPED: no Python-written test files: {why}");
            None
        }
    }
}

/// The sha256 (hex) of the generator script; the manifest records the one it was made by.
fn script_digest() -> Result<String, String> {
    let bytes = std::fs::read(generator_script()).map_err(|e| format!("reading the generator script: {e}"))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of `bytes` in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn is_current(dir: &Path, digest: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("manifest.json")) else {
        return false;
    };
    let Ok(manifest) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    manifest["script_sha256"].as_str() == Some(digest)
}

fn unique_sibling(dir: &Path, tag: &str) -> PathBuf {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let name =
        format!(".{}.{tag}-{}-{nanos}", dir.file_name().unwrap_or_default().to_string_lossy(), std::process::id());
    dir.with_file_name(name)
}

fn find_or_generate() -> Result<PathBuf, String> {
    let dir = generated_dir();
    let digest = script_digest()?;
    if is_current(&dir, &digest) {
        return Ok(dir);
    }
    let python = python();
    let probe = Command::new(&python)
        .args(["-c", "import safetensors, numpy, ml_dtypes"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", Path::new(&python).display()))?;
    if !probe.status.success() {
        return Err(format!(
            "{} cannot import safetensors, numpy and ml_dtypes (set WEIGHTSTREAM_PYTHON or create .venv: \
             python3 -m venv .venv && .venv/bin/pip install safetensors numpy ml_dtypes)",
            Path::new(&python).display()
        ));
    }
    let parent = dir.parent().ok_or("generated dir has no parent")?;
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let tmp = unique_sibling(&dir, "tmp");
    let out = Command::new(&python)
        .arg(generator_script())
        .arg(&tmp)
        .output()
        .map_err(|e| format!("running the generator: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        // The packages import but the script failed: that is a bug to see, not a skip.
        panic!("scripts/make_test_files.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    // Record which script made it, then move it into place.
    let manifest_path = tmp.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| format!("generator wrote no manifest: {e}"))?;
    let mut manifest: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("bad manifest: {e}"))?;
    manifest["script_sha256"] = digest.clone().into();
    std::fs::write(&manifest_path, manifest.to_string()).map_err(|e| format!("writing manifest: {e}"))?;
    for _ in 0..5 {
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => return Ok(dir),
            Err(_) if is_current(&dir, &digest) => {
                // Another test binary won the race with the same script.
                let _ = std::fs::remove_dir_all(&tmp);
                return Ok(dir);
            }
            Err(_) => {
                // A stale directory (or a half-removed one) is in the way: move it aside first.
                let trash = unique_sibling(&dir, "old");
                if std::fs::rename(&dir, &trash).is_ok() {
                    let _ = std::fs::remove_dir_all(&trash);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Err(format!("could not move generated files into {}", dir.display()))
}

/// The parsed `manifest.json` of a data directory.
pub fn manifest(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest.json is JSON")
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every tensor of `path` as stored in the file, read independently of the loader.
pub fn file_tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let h = weightstream::format::read_header(path).unwrap();
    let bytes = std::fs::read(path).unwrap();
    h.tensors
        .iter()
        .map(|t| {
            let s = (h.data_start + t.data_offsets.0) as usize;
            (t.name.clone(), bytes[s..s + t.byte_len() as usize].to_vec())
        })
        .collect()
}

/// The CLI binary: cargo's path, or `.gpu/bin/weightstream` where the tests run on a machine
/// that did not build them.
pub fn weightstream_bin() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_weightstream"));
    if built.exists() {
        built
    } else {
        PathBuf::from(".gpu/bin/weightstream")
    }
}

/// SplitMix64: a small deterministic generator for sampled test inputs.
pub struct SplitMix(pub u64);
impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Whether a CUDA device is usable here; prints one `SKIPPED` line saying why when not.
#[cfg(feature = "cuda")]
pub fn cuda_device_present() -> bool {
    match weightstream::sink::cuda::device_count() {
        Ok(n) if n > 0 => true,
        Ok(_) => {
            println!("SKIPPED: CUDA driver present but no device");
            false
        }
        Err(e) => {
            println!("SKIPPED: {e}");
            false
        }
    }
}
