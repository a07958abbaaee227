//! Puts libtorch's `lib/` folder on the run path of every binary, test and example of this crate, so they start
//! without LD_LIBRARY_PATH. nnsight reports the folder it was built against as DEP_NNSIGHT_LIBTORCH_LIB.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_NNSIGHT_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_NNSIGHT_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
