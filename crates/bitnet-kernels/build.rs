//! Compiles `kernels/*.cu` to PTX with nvcc, only when the `cuda` feature is on (the default
//! build needs no CUDA toolkit). The PTX is embedded by `src/cuda/mod.rs` and JIT-compiled by the
//! driver for whatever GPU runs it: `sm_80` PTX (the int8 `mma` needs sm_80) runs on Ampere, Ada
//! and Hopper alike. `BITNET_CUDA_ARCH=sm_90` (say) targets another virtual architecture.
//!
//! nvcc is taken from `$NVCC`, then `$CUDA_ROOT/bin`, `$CUDA_PATH/bin`, `$CUDA_HOME/bin`, then `PATH`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in [
        "NVCC",
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
        "BITNET_CUDA_ARCH",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=kernels");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = env::var("BITNET_CUDA_ARCH").unwrap_or_else(|_| "sm_80".into());
    let nvcc = find_nvcc();
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ holds the CUDA sources")
        .map(|e| e.expect("readable kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo::rerun-if-changed={}", src.display());
        let ptx = out_dir.join(src.with_extension("ptx").file_name().expect("file name"));
        let status = Command::new(&nvcc)
            .args(["-ptx", "-O3", "-std=c++17", "-ftz=false", "-prec-div=true"])
            .arg(format!("-arch={arch}"))
            .arg(src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}); the `cuda` feature needs the CUDA toolkit \
                     (see docs/CUDA.md)",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}

fn find_nvcc() -> PathBuf {
    if let Some(p) = env::var_os("NVCC") {
        return p.into();
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = env::var_os(var) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    "nvcc".into()
}
