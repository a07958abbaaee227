//! Prints what libtorch sees: version, CUDA availability and device count. With `--require-cuda` it fails
//! when CUDA is unavailable (used by `make gpu-check`).

fn main() {
    let require = std::env::args().any(|a| a == "--require-cuda");
    let cuda = tch::Cuda::is_available();
    println!("cuda available: {cuda}");
    println!("cuda devices:   {}", tch::Cuda::device_count());
    println!("cudnn:          {}", tch::Cuda::cudnn_is_available());
    if require && !cuda {
        eprintln!(
            "error: CUDA is not available to tch: is libtorch_cuda linked (see nnsight/build.rs) and is a GPU present?"
        );
        std::process::exit(1);
    }
}
