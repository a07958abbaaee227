//! Compile-time checks: every `ui-tests/fail/*.rs` must fail to compile with its reviewed `.stderr`, every
//! `ui-tests/pass/*.rs` must compile (and run). Re-bless after a compiler change with
//! `TRYBUILD=overwrite cargo test --test integration ui::` and review the diff.

#[test]
fn ui() {
    // trybuild's pass cases are binaries of another crate, without nnsight's rpath: show them the libtorch this
    // process loaded.
    let _ = tch::Tensor::from_slice(&[0.0f32]);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    if let Some(lib) =
        maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with("/libtorch_cpu.so"))
    {
        let dir = std::path::Path::new(lib).parent().unwrap().display().to_string();
        let old = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
        // SAFETY: set before trybuild starts its child processes; no other thread reads the variable here.
        unsafe { std::env::set_var("LD_LIBRARY_PATH", format!("{dir}:{old}")) };
    }
    let t = trybuild::TestCases::new();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ui-tests");
    t.compile_fail(format!("{root}/fail/*.rs"));
    t.pass(format!("{root}/pass/*.rs"));
}
