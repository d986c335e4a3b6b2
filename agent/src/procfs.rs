//! Process identity and signals for the processes the agent supervises.
//! A pid alone names a process only until it exits and the number is reused,
//! so the agent keys every process it started on pid + start time
//! (`/proc/PID/stat` field 22, clock ticks since boot) and checks both, plus
//! the command line, before it adopts or signals a process it did not spawn
//! in this run. These read the real `/proc` (the memory probe's root may be
//! a fixture tree; process control never is).

use rustix::process::{Pid, Signal};
use std::io;

/// Most bytes read from `/proc/PID/cmdline` (the kernel caps it near here
/// for most processes anyway).
const MAX_CMDLINE_BYTES: u64 = 256 * 1024;

/// A process as the agent records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessId {
    /// Process id (also its process group id: instances lead their group).
    pub pid: u32,
    /// `/proc/PID/stat` field 22.
    pub start_ticks: u64,
}

/// `(state, starttime)` from `/proc/PID/stat`; `None` when the process is
/// gone or the file is unreadable.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) sits in parentheses and may hold spaces
    // or parentheses itself; fields after the last ')' are plain.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `state` is field 3, so field 22 is 19 further on.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The start time of `pid`, or `None` when it does not exist.
pub fn start_ticks(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, t)| t)
}

/// The identity of a live process.
pub fn identify(pid: u32) -> Option<ProcessId> {
    start_ticks(pid).map(|start_ticks| ProcessId { pid, start_ticks })
}

/// Whether `id` still names a live (not zombie) process.
pub fn is_alive(id: ProcessId) -> bool {
    matches!(stat(id.pid), Some((state, t)) if t == id.start_ticks && state != 'Z' && state != 'X')
}

/// The argv of `pid` (lossy UTF-8); `None` when unreadable.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    use std::io::Read;
    let file = std::fs::File::open(format!("/proc/{pid}/cmdline")).ok()?;
    let mut buf = Vec::new();
    file.take(MAX_CMDLINE_BYTES).read_to_end(&mut buf).ok()?;
    if buf.last() == Some(&0) {
        buf.pop();
    }
    if buf.is_empty() {
        return None;
    }
    Some(
        buf.split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Pids whose command line equals `argv` exactly.
pub fn find_by_cmdline(argv: &[String]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| cmdline(pid).as_deref() == Some(argv))
        .collect()
}

/// Sends `signal` to the process group `pgid`. `Ok(false)` when the group
/// no longer exists (ESRCH counts as gone).
pub fn signal_group(pgid: u32, signal: Signal) -> io::Result<bool> {
    let pid = i32::try_from(pgid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    match rustix::process::kill_process_group(pid, signal) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::SRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Sends `signal` to the one process `pid`. `Ok(false)` when it no longer
/// exists.
pub fn signal_process(pid: u32, signal: Signal) -> io::Result<bool> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    match rustix::process::kill_process(pid, signal) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::SRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A signal's name for people (`SIGKILL`), or its number.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    format!("signal {sig} ({name})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_stable_identity_and_a_command_line() {
        let me = std::process::id();
        let id = identify(me).expect("self");
        assert!(is_alive(id));
        assert_eq!(identify(me), Some(id));
        assert!(!is_alive(ProcessId {
            start_ticks: id.start_ticks + 1,
            ..id
        }));
        let argv = cmdline(me).expect("cmdline");
        assert!(!argv.is_empty());
        assert!(find_by_cmdline(&argv).contains(&me));
    }

    #[test]
    fn a_pid_that_does_not_exist_is_gone() {
        // Above the largest pid_max Linux allows (2^22).
        assert_eq!(identify(5_000_000), None);
        assert_eq!(signal_group(5_000_000, Signal::TERM).ok(), Some(false));
    }
}
