//! Deny by default: a daemon speaks mutual TLS, or — only when its operator
//! says so with `--insecure-loopback-only` — plaintext on loopback
//! addresses. An agent starts processes on request, so a plaintext listener
//! on a mesh address would hand the node to anyone who can reach it.

use std::net::{IpAddr, SocketAddr};

/// The flag (and, without dashes and with underscores, the config key)
/// that allows plaintext on loopback.
pub const INSECURE_FLAG: &str = "--insecure-loopback-only";

/// Whether `host` (an IP, a bracketed IPv6 address or `localhost`) is a
/// loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") {
        return true;
    }
    h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host part of `host:port` (IPv6 in brackets allowed).
fn host_of(addr: &str) -> &str {
    let a = addr
        .trim()
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    match a.rsplit_once(':') {
        Some((h, _)) => h,
        None => a,
    }
}

/// Checks a daemon's choice between mutual TLS (`tls`) and plaintext
/// (`insecure`): exactly one, and plaintext only when `listen` and every
/// address in `peers` (addresses this daemon dials, `host:port`) are
/// loopback. The error is one line saying what to do.
pub fn check(
    tls: bool,
    insecure: bool,
    listen: SocketAddr,
    peers: &[(&str, &str)],
) -> Result<(), String> {
    match (tls, insecure) {
        (true, false) => Ok(()),
        (true, true) => Err(format!(
            "both tls_cert/tls_key/tls_ca and {INSECURE_FLAG} are set: choose one"
        )),
        (false, false) => Err(format!(
            "no TLS configured: set tls_cert, tls_key and tls_ca (make them with \
             `haloctl certs init` and `haloctl certs issue`), or pass {INSECURE_FLAG} \
             to serve plaintext on a loopback address"
        )),
        (false, true) => {
            if !listen.ip().is_loopback() {
                return Err(format!(
                    "{INSECURE_FLAG} refuses listen address {listen}: plaintext only on \
                     127.0.0.0/8 or ::1; other addresses need tls_cert, tls_key and tls_ca"
                ));
            }
            if let Some((name, addr)) = peers.iter().find(|(_, a)| !is_loopback_host(host_of(a))) {
                return Err(format!(
                    "{INSECURE_FLAG} refuses {name} at {addr}: plaintext only to loopback \
                     addresses; other addresses need tls_cert, tls_key and tls_ca"
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn tls_or_loopback_plaintext_nothing_else() {
        let lo = addr("127.0.0.1:7301");
        assert!(check(true, false, addr("10.0.0.5:7301"), &[]).is_ok());
        assert!(check(false, true, lo, &[("halo1", "127.0.0.2:7301")]).is_ok());
        assert!(check(false, true, addr("[::1]:7301"), &[("h", "localhost:1")]).is_ok());
        let e = check(false, false, lo, &[]).expect_err("no TLS, no flag");
        assert!(
            e.contains("haloctl certs init") && e.contains(INSECURE_FLAG),
            "{e}"
        );
        let e = check(false, true, addr("0.0.0.0:7301"), &[]).expect_err("wildcard");
        assert!(e.contains("0.0.0.0:7301"), "{e}");
        let e = check(false, true, lo, &[("halo2", "100.64.0.2:7301")]).expect_err("peer");
        assert!(e.contains("halo2 at 100.64.0.2:7301"), "{e}");
        let e = check(false, true, lo, &[("halo2", "halo2.tailnet:7301")]).expect_err("dns");
        assert!(e.contains("halo2"), "{e}");
        assert!(check(true, true, lo, &[]).is_err());
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "localhost",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["10.0.0.1", "0.0.0.0", "::", "halo1", "localhost.evil"] {
            assert!(!is_loopback_host(h), "{h}");
        }
        assert_eq!(host_of("[::1]:7301"), "[::1]");
        assert_eq!(host_of("http://127.0.0.1:7300"), "127.0.0.1");
    }
}
