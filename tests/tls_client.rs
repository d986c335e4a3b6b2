//! haloctl as a real process with nothing from the environment, and the
//! TLS client side of the tests: flags and client configs for the
//! certificates `haloctl certs` writes, and channels that use them.

use crate::bin;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::LazyLock;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The command line binary of this package.
pub static HALOCTL: LazyLock<PathBuf> = LazyLock::new(|| bin("haloctl-shim"));

/// Runs haloctl with no controller, TLS or config file from the
/// environment.
pub fn haloctl(args: &[&str]) -> std::process::Output {
    Command::new(&*HALOCTL)
        .args(args)
        .env_remove("HALO_CONTROLLER")
        .env_remove("HALO_TLS_CERT")
        .env_remove("HALO_TLS_KEY")
        .env_remove("HALO_TLS_CA")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .expect("run haloctl")
}

/// [`haloctl`] that must succeed; its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = haloctl(args);
    assert!(
        o.status.success(),
        "haloctl {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `--tls-cert/--tls-key/--tls-ca` for the `ROLE-NAME` files of the CA
/// directory `dir` (as `haloctl certs` names them).
pub fn tls_flags(dir: &Path, base: &str) -> Vec<String> {
    let file = |name: String| dir.join(name).display().to_string();
    vec![
        "--tls-cert".into(),
        file(format!("{base}.pem")),
        "--tls-key".into(),
        file(format!("{base}.key")),
        "--tls-ca".into(),
        file("ca.pem".into()),
    ]
}

/// A client config trusting only the CA in `ca_dir`, showing `who` (a
/// `ROLE-NAME` in a directory), or no certificate.
pub fn client_config(ca_dir: &Path, who: Option<(&Path, &str)>) -> ClientTlsConfig {
    let ca = std::fs::read(ca_dir.join("ca.pem")).expect("ca");
    let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((dir, base)) = who {
        let cert = std::fs::read(dir.join(format!("{base}.pem"))).expect("cert");
        let key = std::fs::read(dir.join(format!("{base}.key"))).expect("key");
        c = c.identity(Identity::from_pem(cert, key));
    }
    c
}

/// A lazy channel to `https://127.0.0.1:PORT` with `tls` (each use of a
/// new one makes a new handshake).
pub fn channel(port: u16, tls: ClientTlsConfig) -> Channel {
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}
