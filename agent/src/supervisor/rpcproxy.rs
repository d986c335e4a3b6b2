//! The access control ggml-rpc-server lacks. llama.cpp's RPC server
//! executes whatever any client that reaches its port asks (allocate,
//! write and read memory, run graphs), so the agent runs it on a loopback
//! port and puts a proxy on the instance's public port: a connection from
//! the one allowed client IP (`options.rpc_client`, the split's host) is
//! forwarded byte for byte to the server; any other is closed at once and
//! logged in the instance's log.
//!
//! The proxy is a process of its own, the agent's binary run as
//! `halo-agent __rpc-proxy …` ([`main`]), in the RPC server's process group,
//! so that it outlives an agent restart as the server does (an in-agent
//! proxy would drop the host's connection, and llama-server aborts when its
//! RPC connection breaks). The agent binds the public port itself and hands
//! the listening socket over as the proxy's stdin: a port it cannot bind
//! fails the start before anything runs, and the proxy takes no address
//! from its command line. The proxy exits when the server (pid + start
//! time) is gone; stopping the instance signals the whole group.

use crate::procfs::{self, ProcessId};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// The first argument that runs `halo-agent` as an RPC proxy.
pub const PROXY_ARG: &str = "__rpc-proxy";
/// Buffer per direction: a model load pushes gigabytes of tensors through.
const BUFFER: usize = 256 * 1024;
/// Deadline for reaching the server on loopback.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the proxy checks that its server still runs.
const SERVER_POLL: Duration = Duration::from_millis(100);
/// Refusals logged one by one before only every `REFUSAL_LOG_EVERY`-th is.
const REFUSALS_LOGGED: u64 = 20;
const REFUSAL_LOG_EVERY: u64 = 1000;
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Exit code for arguments or a stdin that are not what the agent passes.
const EXIT_USAGE: u8 = 64;

/// What the proxy is told on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProxyArgs {
    /// ggml-rpc-server's loopback address.
    pub target: SocketAddr,
    /// The only client IP forwarded.
    pub allow: IpAddr,
    /// The server: the proxy exits when it is gone.
    pub server: ProcessId,
}

impl ProxyArgs {
    /// The proxy's arguments after [`PROXY_ARG`].
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--target".into(),
            self.target.to_string(),
            "--allow".into(),
            self.allow.to_string(),
            "--server".into(),
            format!("{}:{}", self.server.pid, self.server.start_ticks),
        ]
    }

    /// Parses what [`ProxyArgs::to_args`] wrote.
    pub fn parse(args: &[String]) -> Result<ProxyArgs, String> {
        let mut target = None;
        let mut allow = None;
        let mut server = None;
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("`{flag}` needs a value"))?;
            match flag.as_str() {
                "--target" => {
                    target = Some(
                        value
                            .parse()
                            .map_err(|_| format!("bad --target `{value}`"))?,
                    );
                }
                "--allow" => {
                    allow = Some(
                        value
                            .parse()
                            .map_err(|_| format!("bad --allow `{value}`"))?,
                    );
                }
                "--server" => {
                    let (pid, ticks) = value
                        .split_once(':')
                        .ok_or_else(|| format!("bad --server `{value}`"))?;
                    server = Some(ProcessId {
                        pid: pid.parse().map_err(|_| format!("bad --server `{value}`"))?,
                        start_ticks: ticks
                            .parse()
                            .map_err(|_| format!("bad --server `{value}`"))?,
                    });
                }
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        Ok(ProxyArgs {
            target: target.ok_or("--target missing")?,
            allow: allow.ok_or("--allow missing")?,
            server: server.ok_or("--server missing")?,
        })
    }
}

/// Entry point of `halo-agent __rpc-proxy ARGS` (the listening socket on
/// stdin). Exits 0 when the server is gone, 64 on bad arguments.
pub fn main(args: &[String]) -> ExitCode {
    let args = match ProxyArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            say(&format!("cannot start: {e}"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let listener = match std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(std::net::TcpListener::from)
        .and_then(|l| {
            l.set_nonblocking(true)?;
            l.local_addr()?;
            Ok(l)
        }) {
        Ok(l) => l,
        Err(e) => {
            say(&format!("stdin is not a listening socket: {e}"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say(&format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                say(&format!("cannot use the listening socket: {e}"));
                return ExitCode::FAILURE;
            }
        };
        serve(listener, &args).await;
        ExitCode::SUCCESS
    })
}

/// One line to stderr (the instance's log), prefixed.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "[halo-agent rpc proxy] {line}");
}

/// Accepts until the server is gone.
async fn serve(listener: TcpListener, args: &ProxyArgs) {
    let public = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    say(&format!(
        "listening on {public}: forwarding {} to {}",
        args.allow, args.target
    ));
    let allow = args.allow.to_canonical();
    let mut refused: u64 = 0;
    let mut poll = tokio::time::interval(SERVER_POLL);
    loop {
        let accepted = tokio::select! {
            _ = poll.tick() => {
                if !procfs::is_alive(args.server) {
                    say(&format!("ggml-rpc-server (pid {}) is gone; exiting", args.server.pid));
                    return;
                }
                continue;
            }
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                say(&format!("accept failed: {e}"));
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if peer.ip().to_canonical() != allow {
            drop(stream);
            refused += 1;
            if refused <= REFUSALS_LOGGED || refused.is_multiple_of(REFUSAL_LOG_EVERY) {
                say(&format!(
                    "refused an RPC connection from {peer}: only {allow} may use this RPC server \
                     ({refused} refused so far)"
                ));
            }
            continue;
        }
        tokio::spawn(forward(stream, peer, args.target));
    }
}

/// Copies both ways until either side closes.
async fn forward(mut downstream: TcpStream, peer: SocketAddr, target: SocketAddr) {
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            say(&format!(
                "{peer}: cannot reach ggml-rpc-server at {target}: {e}"
            ));
            return;
        }
        Err(_) => {
            say(&format!(
                "{peer}: ggml-rpc-server at {target} did not accept within {CONNECT_TIMEOUT:?}"
            ));
            return;
        }
    };
    // RPC is request/response, a round trip per graph: no Nagle delay.
    let _ = downstream.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    match tokio::io::copy_bidirectional_with_sizes(&mut downstream, &mut upstream, BUFFER, BUFFER)
        .await
    {
        Ok((up, down)) => say(&format!(
            "{peer}: closed ({up} bytes to the server, {down} back)"
        )),
        Err(e) => say(&format!("{peer}: ended: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip_and_junk_is_refused() {
        let a = ProxyArgs {
            target: "127.0.0.1:40123".parse().expect("addr"),
            allow: "10.0.0.1".parse().expect("ip"),
            server: ProcessId {
                pid: 42,
                start_ticks: 7,
            },
        };
        assert_eq!(ProxyArgs::parse(&a.to_args()), Ok(a.clone()));
        let mut bad = a.to_args();
        bad[5] = "42".into();
        assert!(ProxyArgs::parse(&bad).is_err());
        assert!(ProxyArgs::parse(&["--target".into()]).is_err());
        assert!(ProxyArgs::parse(&["--x".into(), "1".into()]).is_err());
        assert!(ProxyArgs::parse(&a.to_args()[2..]).is_err());
    }
}
