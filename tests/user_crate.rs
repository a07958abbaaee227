//! A crate of the user's own, outside this workspace: `nnsight new` writes it, and plain `cargo build`, `cargo run`
//! and `cargo test` work there with no LIBTORCH or LD_LIBRARY_PATH exported (the set-up registered libtorch with
//! cargo; nnsight's build script hands its folder to the crate's `build.rs`). The crate shares this workspace's
//! target folder, so nothing is compiled twice.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace's target folder: the test binary is `<target>/debug/deps/integration-HASH`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors().nth(3).expect("<target>/debug/deps/<binary>").to_path_buf()
}

/// `cargo ARGS` in `dir`, with nothing of libtorch in the environment (and nothing of the cargo and make that
/// run this test).
fn cargo(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args).current_dir(dir).env("CARGO_TARGET_DIR", target_dir());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("LIBTORCH") || key == "LD_LIBRARY_PATH" || key.contains("MAKEFLAGS") || key == "MFLAGS" {
            cmd.env_remove(&key);
        }
    }
    cmd.output().expect("run cargo")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn nnsight_new_makes_a_crate_that_builds_runs_and_tests_with_nothing_exported() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path().join("exp");
    let new = Command::new(env!("CARGO_BIN_EXE_nnsight")).arg("new").arg(&dir).output().expect("run nnsight new");
    assert!(new.status.success(), "nnsight new failed:\n{}", text(&new));
    for file in ["Cargo.toml", "build.rs", "src/main.rs", "tests/experiment.rs"] {
        assert!(dir.join(file).is_file(), "nnsight new wrote no {file}");
    }

    let run = cargo(&dir, &["run", "--quiet"]);
    let out = text(&run);
    assert!(run.status.success(), "cargo run failed in the new crate:\n{out}");
    let first = out.lines().skip_while(|l| !l.starts_with("top next tokens")).nth(1).unwrap_or_default();
    assert!(first.trim_start().starts_with("\" Paris\""), "the top next token is not \" Paris\":\n{out}");
    assert!(out.contains("layer 5 output [1, 9, 576]"), "{out}");
    assert!(out.contains("logit lens"), "{out}");

    let test = cargo(&dir, &["test", "--quiet"]);
    assert!(test.status.success(), "cargo test failed in the new crate:\n{}", text(&test));
    assert!(text(&test).contains("1 passed"), "{}", text(&test));

    // The binary finds libtorch through its run path, and keeps libtorch_cuda whenever this libtorch ships it.
    let binary = target_dir().join("debug/exp");
    let elf = Command::new("readelf").arg("-d").arg(&binary).output().expect("run readelf");
    let dynamic = String::from_utf8_lossy(&elf.stdout);
    let runpath = dynamic
        .lines()
        .find(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .unwrap_or_else(|| panic!("{} has no run path:\n{dynamic}", binary.display()));
    let lib = runpath
        .split(['[', ']', ':'])
        .map(PathBuf::from)
        .find(|p| p.join("libtorch_cpu.so").is_file())
        .unwrap_or_else(|| panic!("no libtorch lib/ folder on the run path: {runpath}"));
    if lib.join("libtorch_cuda.so").is_file() {
        assert!(
            dynamic.contains("[libtorch_cuda.so]"),
            "libtorch_cuda.so is not among the needed libraries:\n{dynamic}"
        );
    }
}

#[test]
fn nnsight_new_refuses_a_folder_that_is_not_empty() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    std::fs::write(tmp.path().join("notes.txt"), "mine").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nnsight")).arg("new").arg(tmp.path()).output().expect("run nnsight new");
    assert!(!out.status.success());
    let err = text(&out);
    assert!(err.contains("exists and is not empty"), "{err}");
    assert_eq!(std::fs::read_to_string(tmp.path().join("notes.txt")).unwrap(), "mine", "nnsight new touched a file");
}
