//! `GET /health` against a llama-server: 503 while the model loads, 200
//! when ready (`tools/server/server-http.cpp`; a public endpoint, no API
//! key). A few lines of HTTP/1.1 over a TCP stream, with one deadline over
//! connect, write and read: the agent needs only the status code.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most bytes read looking for the status line.
const MAX_STATUS_LINE: usize = 256;

/// The HTTP status of `GET /health`, or `None` when nothing answers in time
/// (refused, reset, timed out, or not HTTP).
pub async fn health(addr: SocketAddr, deadline: Duration) -> Option<u16> {
    tokio::time::timeout(deadline, get_status(addr))
        .await
        .ok()
        .flatten()
}

async fn get_status(addr: SocketAddr) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 64];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        if buf.len() >= MAX_STATUS_LINE {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_status_line(&buf)
}

/// Largest `/slots` answer read (a slot is a few hundred bytes).
const MAX_SLOTS_ANSWER: usize = 1 << 20;

/// How many of llama-server's slots are processing a request (`GET /slots`
/// with the instance's key), or `None` when it does not say in time.
pub async fn busy_slots(addr: SocketAddr, api_key: &str, deadline: Duration) -> Option<usize> {
    tokio::time::timeout(deadline, get_slots(addr, api_key))
        .await
        .ok()
        .flatten()
}

async fn get_slots(addr: SocketAddr, api_key: &str) -> Option<usize> {
    count_busy(&get_ok(addr, "/slots", api_key, MAX_SLOTS_ANSWER).await?)
}

/// A whole `GET path` answer from llama-server with its key, when it is a
/// 200 of at most `max` bytes.
async fn get_ok(addr: SocketAddr, path: &str, api_key: &str, max: usize) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {api_key}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > max {
            return None;
        }
    }
    (parse_status_line(&buf)? == 200).then_some(buf)
}

/// Largest `/metrics` answer read.
const MAX_METRICS_ANSWER: usize = 1 << 20;

/// llama-server's `/metrics` text (with the instance's key; served with
/// `--metrics`), or `None` when it does not answer 200 in time.
pub async fn metrics(addr: SocketAddr, api_key: &str, deadline: Duration) -> Option<String> {
    tokio::time::timeout(deadline, get_metrics(addr, api_key))
        .await
        .ok()
        .flatten()
}

async fn get_metrics(addr: SocketAddr, api_key: &str) -> Option<String> {
    body(&get_ok(addr, "/metrics", api_key, MAX_METRICS_ANSWER).await?)
}

/// The body of a whole HTTP/1.1 answer, de-chunked when it was sent in
/// chunks.
fn body(answer: &[u8]) -> Option<String> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..split])
        .ok()?
        .to_ascii_lowercase();
    let rest = &answer[split + 4..];
    let chunked = head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    if !chunked {
        return String::from_utf8(rest.to_vec()).ok();
    }
    let mut out = Vec::with_capacity(rest.len());
    let mut r = rest;
    loop {
        let eol = r.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&r[..eol]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            break;
        }
        let data = r.get(eol + 2..eol + 2 + size)?;
        out.extend_from_slice(data);
        r = r.get(eol + 2 + size + 2..)?;
    }
    String::from_utf8(out).ok()
}

/// The slots processing a request in a `/slots` answer (the JSON array
/// between its first `[` and last `]`, which also covers a body sent as one
/// chunk), read the way the gateway reads them.
fn count_busy(answer: &[u8]) -> Option<usize> {
    let start = answer.iter().position(|&b| b == b'[')?;
    let end = answer.iter().rposition(|&b| b == b']')?;
    let (idle, total) = gateway::balance::parse_slots(answer.get(start..=end)?)?;
    Some(total - idle)
}

/// `HTTP/1.1 200 OK` → 200.
fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split(' ');
    if !words.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code: u16 = words.next()?.parse().ok()?;
    (100..=599).contains(&code).then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_bodies_are_read_plain_or_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\na 1\n";
        assert_eq!(body(plain).as_deref(), Some("a 1\n"));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\na \r\n2\r\n1\n\r\n0\r\n\r\n";
        assert_eq!(body(chunked).as_deref(), Some("a 1\n"));
        assert_eq!(
            body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            None
        );
    }

    #[test]
    fn busy_slots_are_counted_from_the_answer() {
        let a = b"HTTP/1.1 200 OK\r\nContent-Length: 70\r\n\r\n[{\"id\":0,\"is_processing\":true},{\"id\":1,\"is_processing\":false}]";
        assert_eq!(count_busy(a), Some(1));
        assert_eq!(count_busy(b"HTTP/1.1 200 OK\r\n\r\n[]"), Some(0));
        assert_eq!(count_busy(b"HTTP/1.1 200 OK\r\n\r\nnot json"), None);
    }
    use tokio::net::TcpListener;

    #[test]
    fn status_lines_parse_and_junk_does_not() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 abc\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[tokio::test]
    async fn a_server_that_answers_gives_its_code_and_a_silent_one_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut req = [0u8; 256];
            let _ = s.read(&mut req).await;
            let _ = s
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                .await;
            // Second connection: accept and say nothing.
            let (_s2, _) = l.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        assert_eq!(health(addr, Duration::from_secs(2)).await, Some(503));
        assert_eq!(health(addr, Duration::from_millis(100)).await, None);
    }

    #[tokio::test]
    async fn nothing_listening_is_none() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        assert_eq!(health(addr, Duration::from_secs(1)).await, None);
    }
}
