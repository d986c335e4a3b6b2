//! The fixtures halo writes are real models to llama.cpp: the tiny model
//! loads in `llama-server` and answers; sparse big models are accepted by
//! `llama-fit-params`, which projects their memory without touching the hole.

use agent::gguf::fixtures;
use std::process::Command;
use std::time::Duration;
use tests::{Proc, free_port, http_status, llama_bin, post_json, wait_for};

#[test]
fn llama_server_loads_tiny_model_and_answers_completions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny.gguf");
    let size = fixtures::write_tiny_llama(&model, 7).expect("write tiny model");
    assert!(size < 1024 * 1024, "tiny model is {size} bytes");

    let port = free_port();
    let mut cmd = Command::new(llama_bin("llama-server"));
    cmd.arg("-m")
        .arg(&model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-c", "512", "-t", "1", "--no-webui"]);
    let mut server = Proc::spawn("llama-server", cmd, dir.path());
    let base = format!("http://127.0.0.1:{port}");
    let ready = wait_for(Duration::from_secs(60), || {
        server.assert_running();
        (http_status(&format!("{base}/health")) == Some(200)).then_some(())
    });
    assert!(ready.is_some(), "llama-server not ready:\n{}", server.log());

    let completion = post_json(
        &format!("{base}/completion"),
        &serde_json::json!({"prompt": "Hello", "n_predict": 8}),
    )
    .expect("/completion");
    assert!(completion["content"].is_string(), "{completion}");
    assert!(
        completion["tokens_predicted"].as_u64().unwrap_or(0) > 0,
        "{completion}"
    );

    let chat = post_json(
        &format!("{base}/v1/chat/completions"),
        &serde_json::json!({
            "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 8
        }),
    )
    .expect("/v1/chat/completions");
    assert!(
        chat["choices"][0]["message"]["content"].is_string(),
        "{chat}"
    );
}
