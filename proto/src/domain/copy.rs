//! A model copy between two nodes (`haloctl models copy`): where it stands,
//! as the receiving agent reports it and haloctl prints it, with the rate
//! and time left worked out once here.

use super::ConversionError;
use crate::v1;

/// Where a copy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    /// Bytes are moving.
    Copying,
    /// Copied, verified and renamed into place.
    Done,
    /// An identical file was already there: nothing was copied.
    AlreadyPresent,
    /// Stopped; `message` says why.
    Failed,
}

impl CopyState {
    /// Whether the copy has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, CopyState::Copying)
    }

    /// The name haloctl prints.
    pub fn name(self) -> &'static str {
        match self {
            CopyState::Copying => "copying",
            CopyState::Done => "done",
            CopyState::AlreadyPresent => "already present",
            CopyState::Failed => "failed",
        }
    }
}

/// One report of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyProgress {
    /// The model id (on both nodes).
    pub model_id: String,
    /// The sending node.
    pub from_node: String,
    /// The receiving node.
    pub to_node: String,
    /// Bytes of every part.
    pub bytes_total: u64,
    /// Bytes in place on the receiver, resumed ones included.
    pub bytes_done: u64,
    /// Bytes an earlier, interrupted copy had left.
    pub resumed_from_bytes: u64,
    /// Milliseconds since this copy began.
    pub elapsed_ms: u64,
    /// Where it stands.
    pub state: CopyState,
    /// Hex SHA-256 of each part, once verified.
    pub sha256: Vec<String>,
    /// Why it failed, or what was found.
    pub message: String,
}

impl CopyProgress {
    /// Bytes moved by this copy (not the resumed ones).
    pub fn bytes_moved(&self) -> u64 {
        self.bytes_done.saturating_sub(self.resumed_from_bytes)
    }

    /// Bytes per second moved by this copy; `None` before any time passed.
    pub fn rate_bytes_per_sec(&self) -> Option<f64> {
        (self.elapsed_ms > 0).then(|| self.bytes_moved() as f64 * 1000.0 / self.elapsed_ms as f64)
    }

    /// Seconds left at the rate so far; `None` while nothing moved.
    pub fn secs_left(&self) -> Option<u64> {
        let rate = self.rate_bytes_per_sec().filter(|r| *r > 0.0)?;
        let left = self.bytes_total.saturating_sub(self.bytes_done);
        Some((left as f64 / rate).ceil() as u64)
    }

    /// One line for people: bytes, percent, rate and time left.
    pub fn line(&self) -> String {
        let pct = if self.bytes_total == 0 {
            100.0
        } else {
            self.bytes_done as f64 * 100.0 / self.bytes_total as f64
        };
        let rate = self.rate_bytes_per_sec().map_or_else(
            || "-".to_owned(),
            |r| format!("{}/s", crate::units::bytes(r as u64)),
        );
        let left = self
            .secs_left()
            .map_or_else(|| "-".to_owned(), |s| format!("{s} s"));
        let resumed = if self.resumed_from_bytes > 0 {
            format!(
                ", resumed at {}",
                crate::units::bytes(self.resumed_from_bytes)
            )
        } else {
            String::new()
        };
        format!(
            "{} {} -> {}: {} / {} ({pct:.1}%), {rate}, {left} left{resumed}",
            self.model_id,
            self.from_node,
            self.to_node,
            crate::units::bytes(self.bytes_done),
            crate::units::bytes(self.bytes_total),
        )
    }
}

impl From<CopyState> for v1::CopyState {
    fn from(s: CopyState) -> Self {
        match s {
            CopyState::Copying => v1::CopyState::Copying,
            CopyState::Done => v1::CopyState::Done,
            CopyState::AlreadyPresent => v1::CopyState::AlreadyPresent,
            CopyState::Failed => v1::CopyState::Failed,
        }
    }
}

impl From<CopyProgress> for v1::CopyProgress {
    fn from(p: CopyProgress) -> Self {
        v1::CopyProgress {
            model_id: p.model_id,
            from_node: p.from_node,
            to_node: p.to_node,
            bytes_total: p.bytes_total,
            bytes_done: p.bytes_done,
            resumed_from_bytes: p.resumed_from_bytes,
            elapsed_ms: p.elapsed_ms,
            state: v1::CopyState::from(p.state) as i32,
            sha256: p.sha256,
            message: p.message,
        }
    }
}

impl TryFrom<v1::CopyProgress> for CopyProgress {
    type Error = ConversionError;

    fn try_from(p: v1::CopyProgress) -> Result<Self, Self::Error> {
        let state = match v1::CopyState::try_from(p.state) {
            Ok(v1::CopyState::Copying) => CopyState::Copying,
            Ok(v1::CopyState::Done) => CopyState::Done,
            Ok(v1::CopyState::AlreadyPresent) => CopyState::AlreadyPresent,
            Ok(v1::CopyState::Failed) => CopyState::Failed,
            Ok(v1::CopyState::Unspecified) | Err(_) => {
                return Err(ConversionError::Invalid {
                    field: "state",
                    reason: format!("unknown copy state {}", p.state),
                });
            }
        };
        if p.bytes_done > p.bytes_total || p.resumed_from_bytes > p.bytes_done {
            return Err(ConversionError::Invalid {
                field: "bytes_done",
                reason: format!(
                    "{} done of {} with {} resumed",
                    p.bytes_done, p.bytes_total, p.resumed_from_bytes
                ),
            });
        }
        Ok(CopyProgress {
            model_id: p.model_id,
            from_node: p.from_node,
            to_node: p.to_node,
            bytes_total: p.bytes_total,
            bytes_done: p.bytes_done,
            resumed_from_bytes: p.resumed_from_bytes,
            elapsed_ms: p.elapsed_ms,
            state,
            sha256: p.sha256,
            message: p.message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(done: u64, resumed: u64, elapsed_ms: u64) -> CopyProgress {
        CopyProgress {
            model_id: "m.gguf".into(),
            from_node: "halo1".into(),
            to_node: "halo2".into(),
            bytes_total: 400 << 20,
            bytes_done: done,
            resumed_from_bytes: resumed,
            elapsed_ms,
            state: CopyState::Copying,
            sha256: Vec::new(),
            message: String::new(),
        }
    }

    #[test]
    fn rate_and_time_left_count_only_the_bytes_this_copy_moved() {
        // 100 MiB resumed, 100 MiB moved in 2 s: 50 MiB/s, 200 MiB left.
        let p = progress(200 << 20, 100 << 20, 2000);
        assert_eq!(p.rate_bytes_per_sec(), Some(f64::from(50u32 << 20)));
        assert_eq!(p.secs_left(), Some(4));
        assert_eq!(
            p.line(),
            "m.gguf halo1 -> halo2: 200.0 MiB / 400.0 MiB (50.0%), 50.0 MiB/s, 4 s left, \
             resumed at 100.0 MiB"
        );
        assert_eq!(progress(0, 0, 0).secs_left(), None);
    }

    #[test]
    fn a_report_round_trips_and_impossible_counts_are_refused() {
        let p = progress(3, 1, 5);
        assert_eq!(
            CopyProgress::try_from(v1::CopyProgress::from(p.clone())),
            Ok(p)
        );
        let mut w = v1::CopyProgress::from(progress(3, 1, 5));
        w.bytes_done = w.bytes_total + 1;
        assert!(CopyProgress::try_from(w).is_err());
        let mut w = v1::CopyProgress::from(progress(3, 1, 5));
        w.state = 0;
        assert!(CopyProgress::try_from(w).is_err());
    }
}
