//! Where the gateway may listen and how: HTTPS from PEM files, or plain
//! HTTP only on loopback or on an address of the operator's mesh
//! interfaces (WireGuard encrypts that link already).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// HTTPS from a certificate chain and key in PEM files (no client
/// certificates asked: editors have none).
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Plain HTTP is allowed only on a loopback address or on an address of
/// one of the named interfaces (the operator's WireGuard mesh, e.g.
/// "tailscale0"); the error says how to fix it.
pub fn check_plain_listen(addr: SocketAddr, mesh_interfaces: &[String]) -> Result<(), String> {
    let ip = addr.ip();
    if ip.is_loopback() {
        return Ok(());
    }
    let fix = "serve HTTPS with a certificate (`haloctl certs issue gateway NAME --host \
               HOST`, then the gateway's certificate and key options), listen on 127.0.0.1, \
               or name the WireGuard mesh interface that carries this address";
    if ip.is_unspecified() {
        return Err(format!(
            "plain HTTP on {addr} would listen on every interface, including ones outside the \
             mesh, where prompts and keys would cross the network in clear text: {fix}"
        ));
    }
    if mesh_interfaces.is_empty() {
        return Err(format!(
            "plain HTTP on {addr} would send prompts and keys in clear text: {fix}"
        ));
    }
    let addrs = interface_addresses().map_err(|e| format!("listing interfaces: {e}"))?;
    let on_mesh = addrs
        .iter()
        .any(|(name, a)| *a == ip && mesh_interfaces.iter().any(|m| m == name));
    if on_mesh {
        return Ok(());
    }
    let known: Vec<String> = mesh_interfaces
        .iter()
        .map(|m| {
            let mine: Vec<String> = addrs
                .iter()
                .filter(|(n, _)| n == m)
                .map(|(_, a)| a.to_string())
                .collect();
            if mine.is_empty() {
                format!("{m} (no such interface, or no address)")
            } else {
                format!("{m} ({})", mine.join(", "))
            }
        })
        .collect();
    Err(format!(
        "plain HTTP on {addr}: {ip} is not an address of the mesh interfaces {}: {fix}",
        known.join(", ")
    ))
}

/// Every (interface name, address) pair of this host.
pub fn interface_addresses() -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we own until freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive
        // until freeifaddrs below; its fields are read as libc documents.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated C string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null; its family says which sockaddr it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let ip = match family {
            libc::AF_INET => {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        out.push((name, ip));
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built themselves.
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_allowed_on_loopback_only_unless_a_mesh_interface_is_named() {
        assert!(check_plain_listen("127.0.0.1:8080".parse().unwrap(), &[]).is_ok());
        assert!(check_plain_listen("[::1]:8080".parse().unwrap(), &[]).is_ok());
        let any = check_plain_listen("0.0.0.0:8080".parse().unwrap(), &["lo".into()]);
        assert!(any.unwrap_err().contains("every interface"));
        let lan = check_plain_listen("192.0.2.7:8080".parse().unwrap(), &[]).unwrap_err();
        assert!(lan.contains("clear text"), "{lan}");
        let wrong =
            check_plain_listen("192.0.2.7:8080".parse().unwrap(), &["wg-nope".into()]).unwrap_err();
        assert!(wrong.contains("wg-nope (no such interface"), "{wrong}");
    }

    #[test]
    fn interface_addresses_include_loopback() {
        let all = interface_addresses().unwrap();
        assert!(
            all.iter().any(|(_, a)| a.is_loopback()),
            "no loopback address in {all:?}"
        );
    }

    #[test]
    fn an_address_of_a_named_interface_may_serve_plain_http() {
        // Any non-loopback address this host has, named by its interface.
        let all = interface_addresses().unwrap();
        if let Some((name, ip)) = all.iter().find(|(_, a)| !a.is_loopback()) {
            let addr = SocketAddr::new(*ip, 8080);
            assert!(check_plain_listen(addr, std::slice::from_ref(name)).is_ok());
            assert!(check_plain_listen(addr, &["other0".into()]).is_err());
        }
    }

    #[test]
    fn tls_files_that_are_not_pem_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("gw.crt");
        let key = dir.path().join("gw.key");
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let e = tls_acceptor(&cert, &key).err().unwrap();
        assert!(e.contains("gw.crt"), "{e}");
        let e = tls_acceptor(&dir.path().join("missing.crt"), &key)
            .err()
            .unwrap();
        assert!(e.contains("missing.crt"), "{e}");
    }
}
