//! Build script.
//!
//! 1. Compiles `kernels/host_shim.cpp` (the kernels' per-element math, `kernels/convert_math.cuh`,
//!    for the host) into a static library linked into the crate, so tests run the very code the
//!    GPU runs.
//! 2. Writes `$OUT_DIR/convert_nvrtc.cu`: `kernels/convert.cu` with the header inlined, the
//!    source NVRTC compiles at run time (it gets no include path).
//! 3. With the `cuda` feature, looks for nvcc (`NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`,
//!    `/usr/local/cuda`, the repository's `.venv` pip wheel) and compiles the kernels to PTX for
//!    `compute_80` into `$OUT_DIR/convert.ptx`, setting `cfg(ws_convert_ptx)` so the crate embeds
//!    it. nvcc missing or failing only prints a warning: the crate then uses NVRTC.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    for f in ["build.rs", "kernels/convert.cu", "kernels/convert_math.cuh", "kernels/host_shim.cpp"] {
        println!("cargo:rerun-if-changed={f}");
    }
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "WEIGHTSTREAM_NO_NVCC"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    println!("cargo:rustc-check-cfg=cfg(ws_convert_ptx)");

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")); // ok: build script, cargo always sets it
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")); // ok: build script, cargo always sets it
    let kernels = manifest.join("kernels");

    // 1. Host shim. Always optimised: the exhaustive tests run it over billions of inputs.
    cc::Build::new()
        .cpp(true)
        .cpp_link_stdlib(None)
        .file(kernels.join("host_shim.cpp"))
        .include(&kernels)
        .opt_level(2)
        .flag_if_supported("-fno-exceptions")
        .flag_if_supported("-fno-rtti")
        .warnings(true)
        .compile("weightstream_convert_shim");

    // 2. Self-contained source for NVRTC.
    let header = read(&kernels.join("convert_math.cuh"));
    let kernel = read(&kernels.join("convert.cu"));
    let inlined: String = kernel
        .lines()
        .map(|l| if l.trim_start().starts_with("#include \"convert_math.cuh\"") { header.as_str() } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(out.join("convert_nvrtc.cu"), inlined).expect("write $OUT_DIR/convert_nvrtc.cu"); // ok: build script, cannot go on without it

    // 3. PTX with nvcc, when the CUDA target is built and nvcc is found.
    if env::var_os("CARGO_FEATURE_CUDA").is_none() || env::var_os("WEIGHTSTREAM_NO_NVCC").is_some() {
        return;
    }
    let Some(nvcc) = find_nvcc(&manifest) else {
        println!("cargo:warning=nvcc not found: the CUDA conversion kernels will be compiled at run time with NVRTC");
        return;
    };
    let ptx = out.join("convert.ptx");
    let _ = fs::remove_file(&ptx);
    let mut cmd = Command::new(&nvcc);
    cmd.arg("-ptx").arg("-arch=compute_80").arg("-O3").arg("-I").arg(&kernels);
    // The pip wheel's nvcc needs CCCL's headers, which live beside it.
    if let Some(root) = nvcc.parent().and_then(Path::parent) {
        let cccl = root.join("include").join("cccl");
        if cccl.is_dir() {
            cmd.arg("-I").arg(cccl);
        }
    }
    cmd.arg("-o").arg(&ptx).arg(kernels.join("convert.cu"));
    match cmd.output() {
        Ok(o) if o.status.success() && ptx.is_file() => {
            println!("cargo:rustc-cfg=ws_convert_ptx");
        }
        Ok(o) => {
            let msg = String::from_utf8_lossy(&o.stderr);
            let first = msg.lines().find(|l| !l.trim().is_empty()).unwrap_or("no message");
            println!(
                "cargo:warning={} failed ({}): {first}; the kernels will be compiled at run time with NVRTC",
                nvcc.display(),
                o.status
            );
        }
        Err(e) => println!(
            "cargo:warning=could not run {}: {e}; the kernels will be compiled at run time with NVRTC",
            nvcc.display()
        ),
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(v) {
            candidates.push(PathBuf::from(p).join("bin").join(exe));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join(exe)));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin").join(exe));
    if let Ok(entries) = fs::read_dir(manifest.join(".venv").join("lib")) {
        let mut pys: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        pys.sort();
        for py in pys.into_iter().rev() {
            for cu in ["cu13", "cu12"] {
                candidates.push(py.join("site-packages/nvidia").join(cu).join("bin").join(exe));
            }
            candidates.push(py.join("site-packages/nvidia/cuda_nvcc/bin").join(exe));
        }
    }
    candidates.into_iter().find(|c| c.is_file())
}
