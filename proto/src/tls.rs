//! Mutual TLS: PEM files for a daemon's or a
//! client's certificate, key and CA; the tonic server and client configs
//! built from them; and the caller's role, read from its certificate.
//!
//! A certificate carries its role as a subject-alternative-name URI
//! `urn:halo:role:<role>` (`haloctl certs issue` writes it). The server asks
//! every client for a certificate signed by the CA (the TLS handshake fails
//! without one); each service then checks the role per method with a
//! [`Policy`] — the one place per service that lists which methods mutate.

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The prefix of the SAN URI that names a certificate's role.
pub const ROLE_URI_PREFIX: &str = "urn:halo:role:";

/// Who a certificate belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// A node's agent (serves `AgentService`; calls nothing).
    Agent,
    /// The controller (calls agents).
    Controller,
    /// A person or tool allowed to change desired state.
    Admin,
    /// A person or tool allowed to look only.
    ReadOnly,
    /// An OpenAI-compatible gateway (`haloctl gateway`): reads the routing
    /// table from the controller and watches agents; serves HTTPS to
    /// editors with the same certificate.
    Gateway,
}

impl Role {
    /// Every role, in the order `haloctl certs issue` lists them.
    pub const ALL: [Role; 5] = [
        Role::Agent,
        Role::Controller,
        Role::Admin,
        Role::ReadOnly,
        Role::Gateway,
    ];

    /// The name used on the command line and in the SAN URI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Controller => "controller",
            Role::Admin => "admin",
            Role::ReadOnly => "read-only",
            Role::Gateway => "gateway",
        }
    }

    /// The SAN URI recording this role.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why TLS material could not be used. Displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Only some of the three files were given.
    #[error("set all of tls_cert, tls_key and tls_ca, or none (missing: {0})")]
    Partial(String),
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no PEM block of the expected kind.
    #[error("{}: no PEM {kind} in it", path.display())]
    NotPem {
        /// The file.
        path: PathBuf,
        /// "CERTIFICATE" or "PRIVATE KEY".
        kind: &'static str,
    },
    /// tonic/rustls refused the material.
    #[error("TLS setup: {0}")]
    Setup(String),
    /// A file holds PEM that cannot be used (a bad certificate, a key that
    /// does not match the certificate…).
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The three PEM files of one side of a mutual-TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate (chain), PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The CA that signs the other side's certificates, PEM.
    pub ca: PathBuf,
}

/// The files' contents, read and checked for PEM blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    pub(crate) cert: Vec<u8>,
    pub(crate) key: Vec<u8>,
    pub(crate) ca: Vec<u8>,
}

/// Certificates expiring within this many seconds (30 days) are warned
/// about: by the daemons when they load their own, by `haloctl` for its own
/// and for every node's.
pub const EXPIRY_WARNING_SECS: i64 = 30 * 86_400;

/// Whether a certificate valid until `not_after_unix` is expired or expires
/// within [`EXPIRY_WARNING_SECS`] of `now_unix`.
pub fn expires_soon(not_after_unix: i64, now_unix: i64) -> bool {
    not_after_unix.saturating_sub(now_unix) < EXPIRY_WARNING_SECS
}

/// The not-after (Unix seconds) of the first certificate in a PEM file's
/// contents; `None` when there is none or it cannot be parsed.
pub fn cert_not_after_unix(pem: &[u8]) -> Option<i64> {
    use x509_parser::prelude::FromDer;
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&block.contents).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The private-key PEM labels halo reads (PKCS#8, SEC1, PKCS#1).
const KEY_PEM_LABELS: [&str; 3] = ["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"];

/// Reads a PEM file that must hold a certificate (chain).
pub fn read_cert_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    read_pem(path, &["CERTIFICATE"], "CERTIFICATE")
}

/// Reads a PEM file that must hold a private key.
pub fn read_key_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    read_pem(path, &KEY_PEM_LABELS, "PRIVATE KEY")
}

fn read_pem(path: &Path, kinds: &[&str], kind: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    if !kinds
        .iter()
        .any(|k| text.contains(&format!("-----BEGIN {k}-----")))
    {
        return Err(TlsError::NotPem {
            path: path.to_owned(),
            kind,
        });
    }
    Ok(bytes)
}

impl TlsFiles {
    /// All three paths, or none (`Ok(None)`: plaintext, which the daemons
    /// allow only on loopback); a partial set is a mistake.
    pub fn from_parts(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, TlsError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            (c, k, a) => {
                let missing: Vec<&str> = [
                    (c.is_none(), "tls_cert"),
                    (k.is_none(), "tls_key"),
                    (a.is_none(), "tls_ca"),
                ]
                .into_iter()
                .filter_map(|(m, n)| m.then_some(n))
                .collect();
                Err(TlsError::Partial(missing.join(", ")))
            }
        }
    }

    /// Reads the three files.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        Ok(TlsMaterial {
            cert: read_cert_pem(&self.cert)?,
            key: read_key_pem(&self.key)?,
            ca: read_cert_pem(&self.ca)?,
        })
    }

    /// Reads the files and builds the server config: this side's identity,
    /// and a client certificate signed by the CA required of every caller.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        Ok(self.load()?.server_config())
    }

    /// Reads the files and builds the client config: this side's identity,
    /// and only the CA trusted for the server.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        Ok(self.load()?.client_config())
    }
}

impl TlsMaterial {
    /// This side's certificate (chain), PEM, as read.
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert
    }

    /// The CA certificate, PEM, as read.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }

    /// See [`TlsFiles::server_config`].
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(false)
    }

    /// See [`TlsFiles::client_config`].
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .identity(self.identity())
            .ca_certificate(Certificate::from_pem(&self.ca))
    }
}

/// The roles recorded in a DER certificate's SAN URIs (unknown role names
/// are skipped); empty when it has none or cannot be parsed.
pub fn roles_of_cert(der: &[u8]) -> Vec<Role> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => u.strip_prefix(ROLE_URI_PREFIX).and_then(Role::parse),
            _ => None,
        })
        .collect()
}

/// The caller's role from its TLS client certificate: `Unauthenticated`
/// without one, `PermissionDenied` unless it names exactly one role.
pub fn peer_role<T>(req: &Request<T>) -> Result<Role, Status> {
    let certs = req
        .peer_certs()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let mut roles = roles_of_cert(certs[0].as_ref());
    roles.dedup();
    match roles.as_slice() {
        [r] => Ok(*r),
        [] => Err(Status::permission_denied(format!(
            "the client certificate names no role ({ROLE_URI_PREFIX}…)"
        ))),
        _ => Err(Status::permission_denied(
            "the client certificate names more than one role",
        )),
    }
}

/// Which roles may call which methods of one service. Methods not listed
/// as mutating are reads.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The service, for messages.
    pub service: &'static str,
    /// gRPC method names that change something.
    pub mutating: &'static [&'static str],
    /// Roles allowed to call the mutating methods.
    pub writers: &'static [Role],
    /// Roles allowed to call the other methods.
    pub readers: &'static [Role],
    /// Methods only the roles listed with them may call, whatever
    /// `writers` and `readers` say (an agent's FetchModel: agents only).
    pub only: &'static [(&'static str, &'static [Role])],
}

impl Policy {
    /// Checks the caller of `method`; `Ok` with its role when allowed.
    pub fn check<T>(&self, method: &str, req: &Request<T>) -> Result<Role, Status> {
        let role = peer_role(req)?;
        let mutating = self.mutating.contains(&method);
        let allowed = match self.only.iter().find(|(m, _)| *m == method) {
            Some((_, roles)) => roles,
            None if mutating => self.writers,
            None => self.readers,
        };
        if allowed.contains(&role) {
            Ok(role)
        } else {
            let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
            Err(Status::permission_denied(format!(
                "{}.{method} needs role {}; the client certificate's role is {role}",
                self.service,
                names.join(" or ")
            )))
        }
    }
}

/// Per-service access checks: off (plaintext, the default) or a [`Policy`]
/// enforced on every call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Access {
    policy: Option<Policy>,
}

impl Access {
    /// No checks: the service runs without TLS.
    pub fn open() -> Access {
        Access { policy: None }
    }

    /// Enforces `policy` (the service runs with mutual TLS).
    pub fn enforce(policy: Policy) -> Access {
        Access {
            policy: Some(policy),
        }
    }

    /// Whether checks are on.
    pub fn is_enforced(&self) -> bool {
        self.policy.is_some()
    }

    /// Checks the caller of `method` when enforced; always `Ok` otherwise.
    pub fn check<T>(&self, method: &str, req: &Request<T>) -> Result<(), Status> {
        match &self.policy {
            None => Ok(()),
            Some(p) => p.check(method, req).map(|_| ()),
        }
    }

    /// Checks the caller of `method` like [`Access::check`], and says
    /// whether it may see secrets (instances' API keys): every allowed
    /// role but `read-only`, which looks without being able to use what
    /// it sees. Without TLS (loopback only) everyone may.
    pub fn check_secrets<T>(&self, method: &str, req: &Request<T>) -> Result<bool, Status> {
        match &self.policy {
            None => Ok(true),
            Some(p) => p.check(method, req).map(|r| r != Role::ReadOnly),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_their_names() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
            assert!(r.uri().starts_with(ROLE_URI_PREFIX));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn all_three_files_or_none() {
        assert_eq!(TlsFiles::from_parts(None, None, None).ok(), Some(None));
        let e = TlsFiles::from_parts(Some("c".into()), None, Some("a".into()));
        assert!(
            e.is_err_and(|e| e.to_string().contains("missing: tls_key")),
            "partial set accepted"
        );
    }

    #[test]
    fn a_call_without_a_certificate_is_unauthenticated() {
        let policy = Policy {
            service: "S",
            mutating: &["Write"],
            writers: &[Role::Admin],
            readers: &[Role::Admin, Role::ReadOnly],
            only: &[("Fetch", &[Role::Agent])],
        };
        let req = Request::new(());
        let e = policy.check("Read", &req).err().map(|s| s.code());
        assert_eq!(e, Some(tonic::Code::Unauthenticated));
        assert!(Access::open().check("Write", &req).is_ok());
    }

    #[test]
    fn garbage_is_no_certificate() {
        assert!(roles_of_cert(b"not a certificate").is_empty());
    }
}
