//! A workstation gateway (`haloctl gateway`) and a client for it, for the
//! tests that send requests through one URL and one user key.

use crate::cluster::ControllerProc;
use crate::{Proc, bin, free_port, text, wait_for};
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A running `haloctl gateway`.
#[derive(Debug)]
pub struct Front {
    /// Base URL (`http://127.0.0.1:PORT`).
    pub url: String,
    _proc: Proc,
}

/// haloctl against `c` with an admin certificate.
pub fn haloctl(c: &ControllerProc, home: &Path) -> Command {
    let mut cmd = Command::new(bin("haloctl-shim"));
    cmd.env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .envs(c.haloctl_env());
    cmd
}

/// Starts `haloctl gateway` with a gateway certificate, reading routes
/// from `c`, and waits until it listens.
pub fn workstation_gateway(dir: &Path, c: &ControllerProc, extra: &[&str]) -> Front {
    let port = free_port();
    let mut cmd = haloctl(c, dir);
    for (k, v) in crate::pki::pki().env("gateway", "workstation") {
        cmd.env(k, v);
    }
    cmd.args(["gateway", "--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env("HALO_LOG", "info");
    let mut proc = Proc::spawn("gateway", cmd, dir);
    let up = wait_for(Duration::from_secs(20), || {
        proc.assert_running();
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    assert!(up.is_some(), "gateway did not listen:\n{}", proc.log());
    Front {
        url: format!("http://127.0.0.1:{port}"),
        _proc: proc,
    }
}

/// `haloctl keys create NAME ARGS…`: the key's text.
pub fn create_key(c: &ControllerProc, home: &Path, name: &str, args: &[&str]) -> String {
    let o = haloctl(c, home)
        .args(["keys", "create", name])
        .args(args)
        .output()
        .expect("haloctl keys create");
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("halo-"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no key in {}", text(&o.stdout)))
}

pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(150)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// One answer: status, the replica the gateway says served it, the body.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The node that served it (`x-halo-node`).
    pub node: String,
    /// The body (a whole stream for a streamed answer).
    pub body: String,
}

pub fn post(url: &str, key: Option<&str>, body: &serde_json::Value) -> Result<Answer, String> {
    let mut req = http().post(url).header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let mut resp = req.send(body.to_string()).map_err(|e| e.to_string())?;
    let node = resp
        .headers()
        .get("x-halo-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let status = resp.status().as_u16();
    let mut s = String::new();
    resp.body_mut()
        .as_reader()
        .read_to_string(&mut s)
        .map_err(|e| e.to_string())?;
    Ok(Answer {
        status,
        node,
        body: s,
    })
}

pub fn chat_body(model: &str, system: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "Hello"},
        ],
    })
}

/// Whether an answer is a complete chat completion (streamed or not).
pub fn complete(a: &Answer, stream: bool) -> bool {
    a.status == 200
        && if stream {
            a.body.contains("data: [DONE]") && a.body.contains("\"choices\"")
        } else {
            a.body.contains("\"choices\"")
        }
}
