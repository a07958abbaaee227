//! Link arguments for every binary, example and test of this package:
//! - an rpath to libtorch's `lib/` folder, so nothing needs `LD_LIBRARY_PATH`;
//! - `libtorch_cuda` kept with `--no-as-needed` when the libtorch in use has it, so that
//!   `tch::Cuda::is_available()` is true on a GPU machine (tch-rs issues 329 and 907).

use std::path::PathBuf;

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
    build_shim(&lib);
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// Compiles `csrc/shim.cpp` (what tch does not expose: inference mode, later meta tensors and tensor hooks)
/// against the headers next to libtorch's `lib/`.
fn build_shim(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    let root = lib.parent().expect("libtorch lib/ has a parent");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .file("csrc/shim.cpp")
        .compile("nnsight_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10");
}
