//! The test binary finds libtorch by itself (rpath, no LD_LIBRARY_PATH) and has libtorch_cuda loaded whenever the
//! libtorch in use ships it — the condition for `tch::Cuda::is_available()` to be true on a GPU machine.

use std::path::PathBuf;

fn mapped_libraries() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains(".so"))
        .map(String::from)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

#[test]
fn libtorch_is_found_without_ld_library_path_and_cuda_library_is_loaded() {
    // Make sure libtorch is initialised in this process.
    let _ = tch::Tensor::from_slice(&[1.0f32]).sum(tch::Kind::Float);
    let libs = mapped_libraries();
    let cpu = libs.iter().find(|l| l.ends_with("/libtorch_cpu.so")).expect("libtorch_cpu.so is loaded");
    let lib_dir = PathBuf::from(cpu).parent().unwrap().to_path_buf();
    // cargo puts build folders on LD_LIBRARY_PATH; none of them may be where libtorch came from.
    let ld = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    for dir in ld.split(':').filter(|d| !d.is_empty()) {
        assert!(
            !PathBuf::from(dir).join("libtorch_cpu.so").exists(),
            "libtorch was found through LD_LIBRARY_PATH ({dir})"
        );
    }
    if lib_dir.join("libtorch_cuda.so").exists() {
        assert!(
            libs.iter().any(|l| l.ends_with("/libtorch_cuda.so")),
            "{} has libtorch_cuda.so but it is not loaded: the reference to it in csrc/shim.cpp (see nnsight/build.rs) was lost",
            lib_dir.display()
        );
    }
    eprintln!("libtorch from {}; cuda available: {}", lib_dir.display(), tch::Cuda::is_available());
}
