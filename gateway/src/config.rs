//! The gateway's limits and switches: one value, built by whoever serves
//! the gateway (the agent from `gateway_*` keys, haloctl from flags).

use std::time::Duration;

/// How the gateway bounds and logs what it serves.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// How long a request waits for a ready replica before a 503.
    pub queue_timeout: Duration,
    /// Waiting requests per model; beyond it: 503 with `Retry-After`.
    pub queue_limit: usize,
    /// Largest request body; beyond it: 413.
    pub max_body_bytes: usize,
    /// A connection that does not finish sending a request's headers in
    /// this time is closed (counted from its first byte, or from the
    /// accept for a new connection).
    pub header_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections; at the cap, the longest-idle connection is closed
    /// to make room, and when none is idle new ones wait.
    pub max_connections: usize,
    /// Requests in flight per user key; beyond it: 429 with `Retry-After: 1`.
    pub max_in_flight_per_key: usize,
    /// Whether prompt text may appear in logs (never by default).
    pub log_prompts: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            queue_timeout: Duration::from_secs(120),
            queue_limit: 256,
            max_body_bytes: 16 << 20,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_in_flight_per_key: 64,
            log_prompts: false,
        }
    }
}

impl GatewayConfig {
    /// Refuses values the gateway cannot work with (zero limits).
    pub fn validate(&self) -> Result<(), String> {
        let zero = [
            ("queue_timeout", self.queue_timeout.is_zero()),
            ("header_timeout", self.header_timeout.is_zero()),
            ("idle_timeout", self.idle_timeout.is_zero()),
            ("max_body_bytes", self.max_body_bytes == 0),
            ("max_connections", self.max_connections == 0),
            ("max_in_flight_per_key", self.max_in_flight_per_key == 0),
        ];
        match zero.iter().find(|(_, z)| *z) {
            Some((name, _)) => Err(format!("gateway {name} must be greater than zero")),
            None => Ok(()),
        }
    }
}
