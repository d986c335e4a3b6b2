//! Certificates for the tests: one CA per test process and a certificate
//! per role and name, made by `haloctl certs` (the library the CLI runs),
//! so every cluster test speaks mutual TLS as a deployment does.

use clap::Parser;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A CA in a directory that lives as long as the test process.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    issued: Mutex<BTreeSet<String>>,
}

/// The test process's CA (made on first use).
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("halo-pki-")
            .tempdir()
            .expect("tempdir")
            .keep();
        haloctl_certs(&["init", "--dir", &dir.display().to_string()]);
        Pki {
            dir,
            issued: Mutex::new(BTreeSet::new()),
        }
    })
}

fn haloctl_certs(args: &[&str]) {
    let argv = ["haloctl", "certs"].into_iter().chain(args.iter().copied());
    let cli = ctl::cli::Cli::try_parse_from(argv).expect("haloctl certs arguments");
    match cli.command {
        ctl::cli::Command::Certs(a) => ctl::certs::run(&a).expect("haloctl certs"),
        _ => unreachable!("a certs command"),
    }
}

impl Pki {
    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The certificate and key of `role` `name` (issued on first use, for
    /// 127.0.0.1 and localhost).
    pub fn files(&self, role: &str, name: &str) -> (PathBuf, PathBuf) {
        let base = format!("{role}-{name}");
        let mut issued = self.issued.lock().expect("pki lock");
        if !issued.contains(&base) {
            self.issue_now(role, name, &[]);
            issued.insert(base);
        }
        self.paths(role, name)
    }

    /// Issues `role` `name` again, for 127.0.0.1, localhost and `hosts`
    /// (replacing an earlier one).
    pub fn reissue(&self, role: &str, name: &str, hosts: &[&str]) -> (PathBuf, PathBuf) {
        let mut issued = self.issued.lock().expect("pki lock");
        self.issue_now(role, name, hosts);
        issued.insert(format!("{role}-{name}"));
        self.paths(role, name)
    }

    fn issue_now(&self, role: &str, name: &str, hosts: &[&str]) {
        let d = self.dir.display().to_string();
        let mut args = vec!["issue", role, name, "--dir", &d, "--force"];
        for h in ["127.0.0.1", "localhost"].iter().chain(hosts) {
            args.extend(["--host", h]);
        }
        haloctl_certs(&args);
    }

    fn paths(&self, role: &str, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{role}-{name}.pem")),
            self.dir.join(format!("{role}-{name}.key")),
        )
    }

    /// Copies the CA certificate and `role` `name`'s certificate and key,
    /// issued again for `hosts` too, into `dir` as `ca.pem`, `AS.pem` and
    /// `AS.key`, readable by everyone: for a container whose user is not
    /// the test's (a test directory only; real keys stay 0600).
    pub fn export(&self, dir: &Path, role: &str, name: &str, hosts: &[&str], as_base: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).expect("mkdir tls");
        let (cert, key) = self.reissue(role, name, hosts);
        for (from, to) in [
            (self.ca(), "ca.pem".to_owned()),
            (cert, format!("{as_base}.pem")),
            (key, format!("{as_base}.key")),
        ] {
            std::fs::copy(&from, dir.join(&to)).expect("copy certificate");
            std::fs::set_permissions(dir.join(&to), std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
    }

    /// `--tls-cert F --tls-key F --tls-ca F` for `role` `name`.
    pub fn flags(&self, role: &str, name: &str) -> Vec<String> {
        let (cert, key) = self.files(role, name);
        [
            ("--tls-cert", cert),
            ("--tls-key", key),
            ("--tls-ca", self.ca()),
        ]
        .into_iter()
        .flat_map(|(f, p)| [f.to_owned(), p.display().to_string()])
        .collect()
    }

    /// `HALO_TLS_CERT`, `HALO_TLS_KEY`, `HALO_TLS_CA` for a haloctl run as
    /// `role` `name`.
    pub fn env(&self, role: &str, name: &str) -> [(&'static str, PathBuf); 3] {
        let (cert, key) = self.files(role, name);
        [
            ("HALO_TLS_CERT", cert),
            ("HALO_TLS_KEY", key),
            ("HALO_TLS_CA", self.ca()),
        ]
    }

    /// A gRPC client config showing `role` `name`'s certificate and
    /// trusting only this CA.
    pub fn client(&self, role: &str, name: &str) -> ClientTlsConfig {
        let (cert, key) = self.files(role, name);
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca())))
            .identity(Identity::from_pem(read(&cert), read(&key)))
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
