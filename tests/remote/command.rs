//! The `nnsight` binary: `tree`, `generate`, and `serve` in another process, traced from this one.

use super::*;
use nnsight::nn::fast_linear;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The binary, quiet, with every linear layer through `at::linear`: the CPU kernel is otherwise chosen by
/// timing in each process, and two processes that chose differently would round differently (a few ulps), so
/// the results compared bit for bit below are computed with `at::linear` on both sides (see [`aten_here`]).
fn nnsight() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nnsight"));
    c.env("NNSIGHT_QUIET", "1").env("NNSIGHT_LINEAR", "aten").env_remove("NNSIGHT_NO_ONEDNN");
    c
}

/// This thread's linear layers through `at::linear`, as the child process's (undone when dropped).
fn aten_here() -> impl Drop {
    struct Follow;
    impl Drop for Follow {
        fn drop(&mut self) {
            fast_linear::set_linear_mode(None);
        }
    }
    fast_linear::set_linear_mode(Some(fast_linear::LinearMode::Aten));
    Follow
}

#[test]
fn tree_and_generate_print_what_the_library_gives() {
    let out = nnsight().arg("tree").arg(common::data("tiny-gpt2")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim_end(), local().tree().to_string().trim_end());

    let out = nnsight()
        .args(["generate", &common::data("tiny-gpt2").to_string_lossy(), "Hello", "--max-new-tokens", "4"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _aten = aten_here();
    let model = local();
    let expected = model.generate("Hello", &GenerateOptions::new().max_new_tokens(4)).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), expected.rows[0].text(&model).unwrap().trim_end());
}

#[test]
fn serve_refuses_a_public_address_without_keys() {
    let out = nnsight()
        .args(["serve", "--model", &common::data("tiny-gpt2").to_string_lossy(), "--listen", "0.0.0.0:0"])
        .env_remove("NNSIGHT_API_KEYS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without API keys"));
}

#[test]
fn a_served_model_is_traced_from_another_process() -> nnsight::Result<()> {
    let model_arg = format!("{}=tiny", common::data("tiny-gpt2").to_string_lossy());
    let mut child = nnsight()
        .args(["serve", "--model", &model_arg, "--listen", "127.0.0.1:0"])
        .env("NNSIGHT_API_KEYS", "k1,k2")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut url = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        assert!(!line.contains("k1") && !line.contains("k2"), "keys are never printed: {line}");
        if let Some(rest) = line.strip_prefix("serving tiny at ") {
            url = rest.split_whitespace().next().map(String::from);
            break;
        }
    }
    let url = url.expect("the server says where it listens");
    let run = || -> nnsight::Result<Tensor> {
        let remote = LanguageModel::<Gpt2>::connect(&Remote::new(url.as_str(), "tiny").key("k2"))?;
        intervene!(remote.trace("Hello world") {
            let out = remote.lm_head.output.save();
        });
        Ok(out)
    };
    let result = run();
    let _ = child.kill();
    let _ = child.wait();
    let _aten = aten_here();
    assert!(result?.equal(&local().forward("Hello world")?));
    Ok(())
}
