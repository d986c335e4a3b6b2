//! Loading a daemon's configuration, the part halo-agent and
//! halo-controller share: the one-line [`ConfigError`], reading a TOML file
//! ([`read_toml`]), and start-up up to the async runtime ([`start`]): the
//! command line parsed by clap (a usage error is one line and exit
//! [`EXIT_CONFIG`]), the config resolved by the daemon's own
//! `Config::resolve` (file < env < flag; an error is `PROG: config: …` and
//! exit [`EXIT_CONFIG`]), logging, then the runtime. Each daemon keeps its
//! own keys, defaults and checks in its own crate.

use serde::de::DeserializeOwned;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code for a bad command line or config (`EX_USAGE`), also used for
/// a start-up failure that is a config clash.
pub const EXIT_CONFIG: u8 = 64;
/// Exit code when a needed service or address is unavailable
/// (`EX_UNAVAILABLE`): a busy listen address, an unreachable store.
pub const EXIT_UNAVAILABLE: u8 = 69;

/// A configuration that cannot be used. Displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not valid TOML for its schema, or a value in it is wrong.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, on one line (with the line number when known).
        message: String,
    },
    /// A value is not acceptable.
    #[error("`{key}`: {reason}")]
    Invalid {
        /// The config key (file key; the flag and env var are derived from it).
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// The error for config key `key`.
pub fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// How a TOML error is put on one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TomlErrors {
    /// `line N: MESSAGE`: the line of the error's span (0 when unknown) and
    /// the bare message (the agent's config file).
    Line,
    /// The toml crate's whole report, its non-empty lines joined by spaces
    /// (the controller's config and catalog files).
    Report,
}

/// Reads the TOML file at `path` into `T`; errors name the file and, as
/// `style` says, where in it.
pub fn read_toml<T: DeserializeOwned>(path: &Path, style: TomlErrors) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: match style {
            TomlErrors::Line => {
                let line = e.span().map_or(0, |s| {
                    text[..s.start.min(text.len())].matches('\n').count() + 1
                });
                format!("line {line}: {}", e.message().replace('\n', " "))
            }
            TomlErrors::Report => e
                .to_string()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join(" "),
        },
    })
}

/// The command line of `prog`; `Err` the exit code once `--help` or
/// `--version` was printed (success) or a usage error was reported on one
/// line (`PROG: … (see --help)`, [`EXIT_CONFIG`]).
pub fn parse_args<A: clap::Parser>(prog: &str) -> Result<A, ExitCode> {
    match A::try_parse() {
        Ok(a) => Ok(a),
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            let text = e.to_string();
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("{prog}: {line} (see --help)");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// Starts daemon `prog` up to its async runtime: parses the command line,
/// resolves and validates the whole config with `resolve` before anything
/// is bound, sets up logging ([`crate::runtime::init_tracing`]) and builds
/// the runtime. `Err` is the exit code, the reason already on stderr.
pub fn start<A, C, E>(
    prog: &str,
    resolve: impl FnOnce(A) -> Result<C, E>,
) -> Result<(C, tokio::runtime::Runtime), ExitCode>
where
    A: clap::Parser,
    E: Display,
{
    let args = parse_args::<A>(prog)?;
    let config = resolve(args).map_err(|e| {
        eprintln!("{prog}: config: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    crate::runtime::init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("{prog}: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })?;
    Ok((config, runtime))
}
