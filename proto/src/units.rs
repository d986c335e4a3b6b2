//! The one way halo prints a byte count and reads the clock, shared by the
//! daemons' messages, the controller's decisions and events, and haloctl.

use std::time::{SystemTime, UNIX_EPOCH};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Bytes in the largest unit that holds at least one of it, with one
/// decimal: `170.3 GiB`, `2.5 MiB`, `12.0 KiB`, `900 B`.
#[must_use]
pub fn bytes(n: u64) -> String {
    // Display only: f64 holds any byte count here to well within 0.05 of
    // the unit.
    #[allow(clippy::cast_precision_loss)]
    let f = n as f64;
    if n >= GIB {
        format!("{:.1} GiB", f / GIB as f64)
    } else if n >= MIB {
        format!("{:.1} MiB", f / MIB as f64)
    } else if n >= KIB {
        format!("{:.1} KiB", f / KIB as f64)
    } else {
        format!("{n} B")
    }
}

/// Milliseconds since the Unix epoch (0 before it, saturating after
/// `u64::MAX`).
#[must_use]
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since the Unix epoch (0 before it).
#[must_use]
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_printed_in_the_unit_that_reads_best() {
        assert_eq!(bytes(900), "900 B");
        assert_eq!(bytes(12 * KIB), "12.0 KiB");
        assert_eq!(bytes(5 * MIB / 2), "2.5 MiB");
        assert_eq!(bytes(84 * GIB + 190 * MIB), "84.2 GiB");
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(GIB - 1), "1024.0 MiB");
    }

    #[test]
    fn the_clock_is_after_2020() {
        assert!(now_unix_ms() > 1_577_836_800_000);
        assert!(now_unix() > 1_577_836_800);
    }
}
