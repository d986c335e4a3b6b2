//! `haloctl certs`: a small CA for halo's mutual TLS and
//! the certificates it signs, each recording its role as a SAN URI
//! `urn:halo:role:<role>` (see `proto::tls`), plus role-less certificates
//! for etcd's own TLS (server and peer). Keys are ECDSA P-256, written
//! 0600; nothing is overwritten without `--force`.

use crate::Failure;
use crate::cli::{CertsArgs, CertsCommand, IssueArgs};
use proto::tls::Role;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::path::Path;
use time::{Duration, OffsetDateTime};

/// The CA's file names in `--dir`.
pub const CA_CERT: &str = "ca.pem";
/// The CA's key file name.
pub const CA_KEY: &str = "ca.key";
/// How long the CA is valid.
const CA_DAYS: i64 = 3650;

/// Runs `haloctl certs …`.
pub fn run(a: &CertsArgs) -> Result<(), Failure> {
    match &a.command {
        CertsCommand::Init { dir, force, days } => init(dir, *force, *days),
        CertsCommand::Issue(i) => issue(i),
    }
}

fn other(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::Other(anyhow::anyhow!("{what}: {e}"))
}

/// Writes `data` to `path`, mode `mode`, refusing an existing file unless
/// `force`.
fn write_file(path: &Path, data: &[u8], mode: u32, force: bool) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(mode);
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Failure::Refused(format!(
                "{} exists; pass --force to replace it",
                path.display()
            ))
        } else {
            other(&format!("writing {}", path.display()), e)
        }
    })?;
    // An existing file keeps its mode on truncate: set it again.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(data))
        .map_err(|e| other(&format!("writing {}", path.display()), e))
}

fn refuse_existing(paths: &[&Path], force: bool) -> Result<(), Failure> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(Failure::Refused(format!(
            "{} exists; pass --force to replace it",
            p.display()
        ))),
        None => Ok(()),
    }
}

fn validity(days: u32) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    // An hour back for clocks a little behind; `--days 0` ended a minute
    // ago: an already expired certificate (for tests of refusal).
    let not_after = match days {
        0 => now - Duration::minutes(1),
        d => now + Duration::days(i64::from(d)),
    };
    (now - Duration::hours(1), not_after)
}

fn init(dir: &Path, force: bool, days: Option<u32>) -> Result<(), Failure> {
    std::fs::create_dir_all(dir).map_err(|e| other(&format!("creating {}", dir.display()), e))?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    refuse_existing(&[&cert_path, &key_path], force)?;
    let key = KeyPair::generate().map_err(|e| other("generating the CA key", e))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "halo CA");
    dn.push(DnType::OrganizationName, "halo");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let (nb, na) = validity(days.unwrap_or(CA_DAYS as u32));
    params.not_before = nb;
    params.not_after = na;
    let cert = params
        .self_signed(&key)
        .map_err(|e| other("signing the CA certificate", e))?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644, force)?;
    println!(
        "wrote {} and {} (keep the key private; it signs every halo certificate)",
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

/// The kind of certificate `haloctl certs issue` writes, named `etcd`.
pub const ETCD_KIND: &str = "etcd";

/// What a certificate is for: a halo role, or etcd, which gets no role (so
/// no halo service accepts its key) but serves TLS and dials peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Role(Role),
    Etcd,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Role(r) => r.as_str(),
            Kind::Etcd => ETCD_KIND,
        }
    }
}

fn issue(a: &IssueArgs) -> Result<(), Failure> {
    let kind = match Role::parse(&a.role) {
        Some(r) => Kind::Role(r),
        // A person's or a tool's certificate that may change things.
        None if a.role == "client" => Kind::Role(Role::Admin),
        None if a.role == ETCD_KIND => Kind::Etcd,
        None => {
            let mut all: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
            all.push(ETCD_KIND);
            return Err(Failure::Usage(format!(
                "unknown role `{}`: one of {}",
                a.role,
                all.join(", ")
            )));
        }
    };
    if a.name.is_empty()
        || a.name.len() > 63
        || !a
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(Failure::Usage(format!(
            "name `{}`: use 1-63 characters of A-Z a-z 0-9 - _ .",
            a.name
        )));
    }
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| {
            Failure::Usage(format!(
                "{}: {e} (run `haloctl certs init --dir {}` first)",
                p.display(),
                a.dir.display()
            ))
        })
    };
    let ca_pem = read(&a.dir.join(CA_CERT))?;
    let ca_key = KeyPair::from_pem(&read(&a.dir.join(CA_KEY))?)
        .map_err(|e| other(&format!("{}", a.dir.join(CA_KEY).display()), e))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| other(&format!("{}", a.dir.join(CA_CERT).display()), e))?;
    let base = format!("{}-{}", kind.as_str(), a.name);
    let out = a.out.clone().unwrap_or_else(|| a.dir.clone());
    std::fs::create_dir_all(&out).map_err(|e| other(&format!("creating {}", out.display()), e))?;
    let (cert_path, key_path) = (
        out.join(format!("{base}.pem")),
        out.join(format!("{base}.key")),
    );
    refuse_existing(&[&cert_path, &key_path], a.force)?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, a.name.as_str());
    dn.push(DnType::OrganizationalUnitName, kind.as_str());
    params.distinguished_name = dn;
    if let Kind::Role(role) = kind {
        let uri = role.uri().try_into().map_err(|e| other("role URI", e))?;
        params.subject_alt_names.push(SanType::URI(uri));
    }
    for h in &a.hosts {
        let san = match h.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                h.clone()
                    .try_into()
                    .map_err(|e| Failure::Usage(format!("--host `{h}`: {e}")))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let (nb, na) = validity(a.days);
    params.not_before = nb;
    params.not_after = na;
    let key = KeyPair::generate().map_err(|e| other("generating the key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| other("signing the certificate", e))?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, a.force)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644, a.force)?;
    if a.hosts.is_empty()
        && matches!(
            kind,
            Kind::Role(Role::Agent | Role::Controller | Role::Gateway) | Kind::Etcd
        )
    {
        eprintln!(
            "haloctl: note: no --host; {} certificates also serve TLS, and clients \
             accept them only under a name or address given with --host",
            kind.as_str()
        );
    }
    let what = match kind {
        Kind::Role(r) => format!("role {r}"),
        Kind::Etcd => "etcd, no halo role".to_owned(),
    };
    println!(
        "wrote {} and {} ({what}, valid {} days)",
        cert_path.display(),
        key_path.display(),
        a.days
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{CertsArgs, CertsCommand, IssueArgs};
    use std::os::unix::fs::PermissionsExt;

    fn issue_args(dir: &Path, role: &str, name: &str) -> IssueArgs {
        IssueArgs {
            role: role.into(),
            name: name.into(),
            dir: dir.to_owned(),
            out: None,
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
            days: 30,
            force: false,
        }
    }

    #[test]
    fn init_then_issue_records_the_role_and_keeps_keys_private() {
        let d = tempfile::tempdir().expect("tempdir");
        let init = CertsArgs {
            command: CertsCommand::Init {
                dir: d.path().to_owned(),
                force: false,
                days: None,
            },
        };
        assert!(run(&init).is_ok());
        assert!(
            matches!(run(&init), Err(Failure::Refused(_))),
            "overwrote the CA"
        );
        let a = CertsArgs {
            command: CertsCommand::Issue(issue_args(d.path(), "read-only", "alice")),
        };
        assert!(run(&a).is_ok());
        for k in ["ca.key", "read-only-alice.key"] {
            let mode = std::fs::metadata(d.path().join(k))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{k}");
        }
        let pem = std::fs::read_to_string(d.path().join("read-only-alice.pem")).expect("pem");
        let der = pem_to_der(&pem);
        assert_eq!(proto::tls::roles_of_cert(&der), vec![Role::ReadOnly]);
        assert!(matches!(run(&a), Err(Failure::Refused(_))), "overwrote");
        // `client` is an admin certificate.
        let c = CertsArgs {
            command: CertsCommand::Issue(issue_args(d.path(), "client", "carol")),
        };
        assert!(run(&c).is_ok());
        let pem = std::fs::read_to_string(d.path().join("admin-carol.pem")).expect("pem");
        assert_eq!(
            proto::tls::roles_of_cert(&pem_to_der(&pem)),
            vec![Role::Admin]
        );
        // A gateway's certificate names its role.
        let g = CertsArgs {
            command: CertsCommand::Issue(issue_args(d.path(), "gateway", "laptop")),
        };
        assert!(run(&g).is_ok());
        let pem = std::fs::read_to_string(d.path().join("gateway-laptop.pem")).expect("pem");
        assert_eq!(
            proto::tls::roles_of_cert(&pem_to_der(&pem)),
            vec![Role::Gateway]
        );
        let bad = CertsArgs {
            command: CertsCommand::Issue(issue_args(d.path(), "root", "x")),
        };
        match run(&bad) {
            Err(Failure::Usage(m)) => assert!(m.contains("gateway"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_etcd_certificate_serves_and_dials_tls_but_names_no_role() {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let d = tempfile::tempdir().expect("tempdir");
        let init = CertsArgs {
            command: CertsCommand::Init {
                dir: d.path().to_owned(),
                force: false,
                days: None,
            },
        };
        assert!(run(&init).is_ok());
        let mut args = issue_args(d.path(), "etcd", "halo1");
        args.hosts = vec!["10.0.0.5".into()];
        let a = CertsArgs {
            command: CertsCommand::Issue(args),
        };
        assert!(run(&a).is_ok());
        let pem = std::fs::read_to_string(d.path().join("etcd-halo1.pem")).expect("pem");
        let der = pem_to_der(&pem);
        assert!(proto::tls::roles_of_cert(&der).is_empty(), "no halo role");
        let (_, cert) = X509Certificate::from_der(&der).expect("x509");
        let eku = cert
            .extended_key_usage()
            .expect("eku")
            .expect("eku present")
            .value;
        assert!(eku.server_auth && eku.client_auth, "{eku:?}");
        let ku = cert.key_usage().expect("ku").expect("ku present").value;
        assert!(ku.digital_signature(), "{ku:?}");
        let san = cert.subject_alternative_name().expect("san").expect("san");
        let names = &san.value.general_names;
        assert!(
            names
                .iter()
                .any(|n| matches!(n, GeneralName::IPAddress(ip) if *ip == [10, 0, 0, 5])),
            "{names:?}"
        );
        assert!(
            !names.iter().any(|n| matches!(n, GeneralName::URI(_))),
            "{names:?}"
        );
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        p.contents
    }
}
