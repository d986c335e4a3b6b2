//! Reaching the controller: where it is (`--controller`, `HALO_CONTROLLER`,
//! `~/.config/halo/haloctl.toml`, else `http://127.0.0.1:7300`), the gRPC
//! client, and the mapping of transport and status errors to haloctl's
//! exit codes (3 when the controller cannot be reached).

use crate::Failure;
use proto::v1::controller_service_client::ControllerServiceClient;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// The controller address used when nothing else names one.
pub const DEFAULT_CONTROLLER: &str = "http://127.0.0.1:7300";

/// How long connecting may take before haloctl gives up (exit 3).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one call may take before haloctl gives up (exit 3). Streams
/// (`events`, `logs -f`) are bounded only until they start.
pub const CALL_TIMEOUT: Duration = proto::limits::CONTROLLER_CALL_TIMEOUT;

/// A connected controller client.
pub type Client = ControllerServiceClient<Channel>;

/// Where the controller address came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--controller URL`.
    Flag,
    /// `HALO_CONTROLLER`.
    Env,
    /// The config file at this path.
    File(PathBuf),
    /// Nothing set: [`DEFAULT_CONTROLLER`].
    Default,
}

/// The controller's address and where it was set.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port`.
    pub url: String,
    /// Where `url` came from.
    pub source: Source,
    /// Mutual TLS to the controller, when configured (`https://` URLs).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// The same certificate, key and CA as read (`haloctl top` shows them
    /// to the agents' `/metrics`).
    pub material: Option<proto::tls::TlsMaterial>,
    /// haloctl's own certificate when it has expired: a failed connection
    /// is then blamed on it, whatever the transport says (TLS 1.3 can lose
    /// the server's alert to a reset).
    pub expired_cert: Option<PathBuf>,
    /// The CA of `--tls-ca` (PEM), which also signs the agents' HTTPS
    /// gateways that `haloctl bench --gateway` talks to.
    pub ca_pem: Option<Vec<u8>>,
}

/// `--tls-cert`, `--tls-key` and `--tls-ca` as given on the command line;
/// `HALO_TLS_CERT`, `HALO_TLS_KEY`, `HALO_TLS_CA` and the config file's
/// `tls_cert`, `tls_key`, `tls_ca` fill in, in that order.
#[derive(Debug, Clone, Default)]
pub struct TlsArgs {
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Its key.
    pub key: Option<PathBuf>,
    /// The CA.
    pub ca: Option<PathBuf>,
}

impl Target {
    /// Resolves the address: `--controller`, then `HALO_CONTROLLER`, then
    /// the config file, then the default.
    pub fn resolve(flag: Option<&str>) -> Result<Target, Failure> {
        let env = std::env::var("HALO_CONTROLLER").ok();
        for (v, source) in [(flag, Source::Flag), (env.as_deref(), Source::Env)] {
            if let Some(u) = v.filter(|u| !u.trim().is_empty()) {
                return Ok(Target {
                    url: normalize(u),
                    source,
                    tls: None,
                    expired_cert: None,
                    material: None,
                    ca_pem: None,
                });
            }
        }
        if let Some(path) = config_path()
            && path.is_file()
            && let Some(url) = read_config(&path)?.controller
        {
            return Ok(Target {
                url: normalize(&url),
                source: Source::File(path),
                tls: None,
                expired_cert: None,
                material: None,
                ca_pem: None,
            });
        }
        Ok(Target {
            url: DEFAULT_CONTROLLER.to_owned(),
            source: Source::Default,
            tls: None,
            expired_cert: None,
            material: None,
            ca_pem: None,
        })
    }

    /// Turns on mutual TLS when all three files are named (flag, then env,
    /// then config file, each file separately); `http://` becomes
    /// `https://`. Some but not all of them is a usage error.
    pub fn with_tls(mut self, args: &TlsArgs) -> Result<Target, Failure> {
        let given = |flag: &Option<PathBuf>, env: &str| {
            flag.clone().or_else(|| {
                std::env::var_os(env)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
        };
        let (mut cert, mut key, mut ca) = (
            given(&args.cert, "HALO_TLS_CERT"),
            given(&args.key, "HALO_TLS_KEY"),
            given(&args.ca, "HALO_TLS_CA"),
        );
        // The config file only when something is left to fill in. When
        // nothing asked for TLS, a bad file is not this step's business
        // (`--controller` with a broken file worked before TLS existed).
        let asked = cert.is_some() || key.is_some() || ca.is_some();
        if (cert.is_none() || key.is_none() || ca.is_none())
            && let Some(p) = config_path().filter(|p| p.is_file())
        {
            let file = match read_config(&p) {
                Ok(f) => f,
                Err(e) if asked => return Err(e),
                Err(_) => ConfigFile::default(),
            };
            cert = cert.or(file.tls_cert);
            key = key.or(file.tls_key);
            ca = ca.or(file.tls_ca);
        }
        let files = proto::tls::TlsFiles::from_parts(cert, key, ca).map_err(|e| {
            Failure::Usage(
                e.to_string()
                    .replace("tls_cert", "--tls-cert")
                    .replace("tls_key", "--tls-key")
                    .replace("tls_ca", "--tls-ca"),
            )
        })?;
        if let Some(files) = files {
            let material = files.load().map_err(|e| Failure::Usage(e.to_string()))?;
            let now = proto::units::now_unix();
            let not_after = proto::tls::cert_not_after_unix(material.cert_pem());
            if let Some(w) = not_after.and_then(|na| {
                crate::output::cert_warning(
                    &format!("haloctl's certificate {}", files.cert.display()),
                    na,
                    now,
                )
            }) {
                eprintln!("{w}");
            }
            if not_after.is_some_and(|na| na <= now) {
                self.expired_cert = Some(files.cert.clone());
            }
            self.tls = Some(material.client_config());
            self.ca_pem = Some(material.ca_pem().to_vec());
            self.material = Some(material);
            if let Some(rest) = self.url.strip_prefix("http://") {
                self.url = format!("https://{rest}");
            }
        }
        Ok(self)
    }

    /// Where the address came from, in words.
    pub fn origin(&self) -> String {
        match &self.source {
            Source::Flag => "--controller".into(),
            Source::Env => "HALO_CONTROLLER".into(),
            Source::File(p) => p.display().to_string(),
            Source::Default => "the default; set --controller, HALO_CONTROLLER or \
                 ~/.config/halo/haloctl.toml"
                .into(),
        }
    }

    /// The failure for "cannot reach the controller", with a hint.
    pub fn unreachable(&self, why: &str) -> Failure {
        // A controller speaks mutual TLS unless started with
        // --insecure-loopback-only: a plaintext attempt fails at the TLS
        // handshake, which looks like a dropped connection.
        let hint = if let Some(cert) = &self.expired_cert {
            format!(
                "hint: a TLS failure: haloctl's certificate {} has expired; \
                 `haloctl certs issue admin NAME` makes a new one",
                cert.display()
            )
        } else if is_tls_failure(why) {
            format!(
                "hint: a TLS failure: haloctl's certificate must be valid, not expired and \
                 signed by the controller's CA, and --tls-ca must be the CA that signed the \
                 controller's; `haloctl certs issue admin NAME` makes a new one; {}",
                local_env_hint()
            )
        } else if self.tls.is_none() {
            format!(
                "hint: is halo-controller running? `bash deploy/quickstart.sh` starts a local \
                 cluster; `haloctl --controller http://HOST:7300 …` points elsewhere\n\
                 hint: halo-controller speaks mutual TLS unless started with \
                 --insecure-loopback-only: {}",
                cert_flags_hint()
            )
        } else {
            "hint: is halo-controller running? `bash deploy/quickstart.sh` starts a local \
             cluster; `haloctl --controller http://HOST:7300 …` points elsewhere"
                .to_owned()
        };
        Failure::Unreachable(format!(
            "cannot reach the controller at {} ({}): {why}\n{hint}",
            self.url,
            self.origin()
        ))
    }

    /// The failure for an address that answers gRPC but is no controller
    /// (exit 3): most often an agent's port.
    pub fn not_a_controller(&self) -> Failure {
        Failure::Unreachable(format!(
            "{} ({}) is not a halo-controller: it does not serve halo.v1.ControllerService\n\
             hint: is it an agent's port? Point haloctl at the controller (port 7300 unless \
             its `listen` says otherwise)",
            self.url,
            self.origin()
        ))
    }

    /// The failure for a call that got no answer within [`CALL_TIMEOUT`]
    /// (exit 3), naming the controller and the deadline.
    pub fn timed_out(&self) -> Failure {
        Failure::Unreachable(format!(
            "the controller at {} ({}) did not answer within {} s\n\
             hint: is it overloaded, or stuck on its store? `haloctl events` shows what it is doing",
            self.url,
            self.origin(),
            CALL_TIMEOUT.as_secs()
        ))
    }

    /// Connects (bounded by a timeout). An `https://` address without a
    /// client certificate is a usage error before any connection: the
    /// controller would refuse the handshake anyway.
    pub async fn connect(&self) -> Result<Client, Failure> {
        if self.tls.is_none() && self.url.starts_with("https://") {
            return Err(Failure::Usage(format!(
                "{} ({}) speaks mutual TLS and haloctl has no client certificate: {}",
                self.url,
                self.origin(),
                cert_flags_hint()
            )));
        }
        let mut ep = Endpoint::from_shared(self.url.clone())
            .map_err(|e| Failure::Usage(format!("bad controller address `{}`: {e}", self.url)))?;
        if let Some(tls) = &self.tls {
            ep = ep
                .tls_config(tls.clone())
                .map_err(|e| Failure::Usage(format!("TLS: {}", proto::error_chain(&e))))?;
        }
        let ep = ep
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .timeout(CALL_TIMEOUT);
        match tokio::time::timeout(CONNECT_TIMEOUT, ep.connect()).await {
            Ok(Ok(ch)) => Ok(ControllerServiceClient::new(ch)
                .max_decoding_message_size(proto::limits::CONTROLLER.max_response_bytes)
                .max_encoding_message_size(proto::limits::CONTROLLER.max_request_bytes)),
            Ok(Err(e)) => Err(self.unreachable(&proto::error_chain(&e))),
            Err(_) => Err(self.unreachable("timed out connecting")),
        }
    }

    /// Maps a gRPC status to haloctl's outcome.
    pub fn status(&self, s: tonic::Status) -> Failure {
        use tonic::Code;
        if proto::limits::is_timeout(&s) {
            return self.timed_out();
        }
        match s.code() {
            Code::Unavailable => self.unreachable(s.message()),
            Code::Unimplemented => self.not_a_controller(),
            // A connection that broke under the call (e.g. the controller
            // refused this client's certificate after the handshake, which
            // reaches the client as a transport error or a cancelled
            // stream): the cause is in the status's source, not its
            // message; with an expired own certificate, that is the cause.
            Code::Unknown | Code::Cancelled
                if std::error::Error::source(&s).is_some() || self.expired_cert.is_some() =>
            {
                let mut why = s.message().to_owned();
                if let Some(src) = std::error::Error::source(&s) {
                    let chain = proto::error_chain(src);
                    why = if chain.starts_with(&why) {
                        chain
                    } else {
                        format!("{why}: {chain}")
                    };
                }
                self.unreachable(&why)
            }
            Code::NotFound
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists => Failure::Refused(s.message().to_owned()),
            _ => Failure::Other(anyhow::anyhow!(
                "controller answered {:?}: {}",
                s.code(),
                s.message()
            )),
        }
    }
}

/// Whether a transport failure is TLS's (a certificate refused, an alert).
fn is_tls_failure(why: &str) -> bool {
    let w = why.to_ascii_lowercase();
    ["certificate", "alert", "handshake"]
        .iter()
        .any(|k| w.contains(k))
}

/// How to give haloctl a certificate, naming where the quick start put its
/// own.
fn cert_flags_hint() -> String {
    format!(
        "give haloctl a certificate with --tls-cert, --tls-key and --tls-ca (or \
         HALO_TLS_CERT/KEY/CA, or tls_* in haloctl.toml); {}",
        local_env_hint()
    )
}

/// Where the quick start's haloctl settings are: `$HALO_LOCAL_DIR/env` when
/// that is set, else its default.
fn local_env_hint() -> String {
    match std::env::var("HALO_LOCAL_DIR") {
        Ok(d) if !d.trim().is_empty() => {
            format!(
                "the local cluster's are exported by `. {}/env`",
                d.trim_end_matches('/')
            )
        }
        _ => "the local cluster's are exported by `. .halo-local/env` (or \
              $HALO_LOCAL_DIR/env where the quick start ran with HALO_LOCAL_DIR)"
            .to_owned(),
    }
}

/// Adds `http://` when no scheme is given.
fn normalize(u: &str) -> String {
    let u = u.trim().trim_end_matches('/');
    if u.contains("://") {
        u.to_owned()
    } else {
        format!("http://{u}")
    }
}

/// `$XDG_CONFIG_HOME/halo/haloctl.toml`, else `~/.config/halo/haloctl.toml`.
pub fn config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))?;
    Some(base.join("halo").join("haloctl.toml"))
}

/// The config file's fields.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    /// Controller address.
    controller: Option<String>,
    /// Client certificate for mutual TLS.
    tls_cert: Option<PathBuf>,
    /// Its key.
    tls_key: Option<PathBuf>,
    /// The CA.
    tls_ca: Option<PathBuf>,
}

fn read_config(path: &Path) -> Result<ConfigFile, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("reading {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

/// A current-thread runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(anyhow::anyhow!("starting the async runtime: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_past_its_deadline_exits_3_naming_the_controller_and_the_timeout() {
        let t = Target {
            url: "http://10.0.0.9:7300".into(),
            source: Source::Flag,
            tls: None,
            expired_cert: None,
            material: None,
            ca_pem: None,
        };
        for s in [
            tonic::Status::cancelled("Timeout expired"),
            tonic::Status::deadline_exceeded("deadline has elapsed"),
        ] {
            let f = t.status(s);
            let Failure::Unreachable(m) = f else {
                panic!("{f:?}");
            };
            assert!(m.contains("http://10.0.0.9:7300"), "{m}");
            assert!(m.contains("within 30 s"), "{m}");
        }
    }

    #[test]
    fn addresses_without_a_scheme_get_http() {
        assert_eq!(normalize("10.0.0.1:7300"), "http://10.0.0.1:7300");
        assert_eq!(normalize("https://c:7300/"), "https://c:7300");
    }

    #[test]
    fn the_config_file_names_the_controller() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("haloctl.toml");
        std::fs::write(&p, "controller = \"halo1:7300\"\n").expect("write");
        assert_eq!(
            read_config(&p).ok().and_then(|c| c.controller).as_deref(),
            Some("halo1:7300")
        );
        std::fs::write(&p, "controler = \"x\"\n").expect("write");
        assert!(read_config(&p).is_err());
    }
}
