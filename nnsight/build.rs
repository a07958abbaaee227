//! Linking libtorch, for this package and for every crate that depends on it:
//! - an rpath to libtorch's `lib/` folder on this package's binaries, examples and tests, so nothing needs
//!   `LD_LIBRARY_PATH`; crates that depend on nnsight get the folder as `DEP_NNSIGHT_LIBTORCH_LIB` (this package
//!   `links = "nnsight"`), which the `build.rs` that `nnsight new` writes turns into their own rpath;
//! - `libtorch_cuda` kept in every final binary when the libtorch in use has it, so that
//!   `tch::Cuda::is_available()` is true on a GPU machine (tch-rs issues 329 and 907). The linker drops a library
//!   that nothing references (`--as-needed`), so the shim references one symbol of `libtorch_cuda` from a section
//!   the linker must keep, and `torch_cuda` is named as a link library, which cargo passes on to dependents.
//! - the shim (`csrc/shim.cpp`): what tch does not expose of libtorch.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Set by torch-sys (`links = "tch"`, `cargo:libtorch_lib=...`).
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report libtorch's lib folder; run scripts/setup.sh");
        return;
    };
    let lib = PathBuf::from(lib);
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // For dependents (DEP_NNSIGHT_LIBTORCH_LIB) and for `nnsight new` (the crates it writes say where libtorch is).
    println!("cargo:libtorch_lib={}", lib.display());
    println!("cargo:rustc-env=NNSIGHT_LIBTORCH_LIB={}", lib.display());
    let cuda = lib.join("libtorch_cuda.so").exists();
    build_shim(&lib, cuda);
    if cuda {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
}

/// Compiles `csrc/shim.cpp` against the headers next to libtorch's `lib/`.
fn build_shim(lib: &Path, cuda: bool) {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    let root = lib.parent().expect("libtorch lib/ has a parent");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .file("csrc/shim.cpp");
    if cuda {
        build.define("NNSIGHT_KEEP_TORCH_CUDA", None);
    }
    build.compile("nnsight_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10");
}
