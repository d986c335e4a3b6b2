//! Output for people and scripts: byte formatting, aligned tables, and the
//! `-o table|json` switch. Results go to stdout, diagnostics to stderr.

use std::io::{self, Write};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    /// Aligned tables for people.
    #[default]
    Table,
    /// JSON with stable field names, for scripts.
    Json,
}

pub use proto::units::bytes;

/// A large count as a person reads it: `671.0B`, `8.0B`, `30.5M`.
pub fn count(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.1}B", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1}M", f / 1e6)
    } else {
        n.to_string()
    }
}

/// A table: a header row and data rows, columns aligned; numeric-looking
/// cells are right-aligned.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(header: I) -> Table {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row.
    pub fn row<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, cells: I) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Renders the table, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let ncol = self.header.len();
        let mut width = vec![0usize; ncol];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(ncol) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let numeric: Vec<bool> = (0..ncol)
            .map(|i| {
                self.rows.iter().all(|r| {
                    r.get(i)
                        .and_then(|c| c.chars().next())
                        .is_none_or(|ch| ch.is_ascii_digit() || ch == '-')
                })
            })
            .collect();
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, w) in width.iter().enumerate() {
                let c = r.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = w - c.chars().count();
                if numeric[i] && !std::ptr::eq(r, &self.header) {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    line.push_str(&" ".repeat(pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Writes to stdout; a closed pipe (`haloctl … | head`) is a quiet exit.
pub fn print(s: &str) {
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("haloctl: writing output: {e}");
        std::process::exit(1);
    }
}

/// Prints a value as pretty JSON with a trailing newline.
pub fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    print(&s);
    Ok(())
}

/// A certificate's expiry in words at `now_unix`: `expires in 312d` (hours
/// in its last day), or `EXPIRED`.
pub fn cert_expiry(not_after_unix: i64, now_unix: i64) -> String {
    let left = not_after_unix.saturating_sub(now_unix);
    if left <= 0 {
        "EXPIRED".into()
    } else if left < 86_400 {
        format!("expires in {}h", (left + 3599) / 3600)
    } else {
        format!("expires in {}d", left / 86_400)
    }
}

/// The warning for a certificate (`subject`: which, e.g. `node halo1's
/// certificate`) that is expired or expires within 30 days at `now_unix`;
/// `None` otherwise.
pub fn cert_warning(subject: &str, not_after_unix: i64, now_unix: i64) -> Option<String> {
    if !proto::tls::expires_soon(not_after_unix, now_unix) {
        return None;
    }
    let when = cert_expiry(not_after_unix, now_unix);
    let when = if when == "EXPIRED" {
        "has EXPIRED".to_owned()
    } else {
        when
    };
    Some(format!(
        "warning: {subject} {when}; renew it with `haloctl certs issue`"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_right_align_numbers() {
        let mut t = Table::new(["ctx", "model"]);
        t.row(["4096", "a"]);
        t.row(["131072", "bbb"]);
        assert_eq!(t.render(), "ctx     model\n  4096  a\n131072  bbb\n");
    }
}
