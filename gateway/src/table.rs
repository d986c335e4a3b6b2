//! The routing table: what a request's `model` names, which replicas may
//! serve it, and which user keys may ask. Built by [`crate::feed`] from the
//! controller's `Routes` and the agents' watch streams; read by the server
//! on every request (an `Arc` swap, never a lock held across a request).

use proto::domain::EditorMode;
use proto::v1;
use std::collections::BTreeSet;

/// Everything the gateway routes by, at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// One per placement.
    pub routes: Vec<Route>,
    /// User keys that may call the gateway.
    pub keys: Vec<UserKey>,
    /// When the controller last answered (Unix ms); 0 = never.
    pub controller_at_unix_ms: u64,
}

/// One placement.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Placement name.
    pub placement: String,
    /// Catalog name.
    pub model: String,
    /// Editor modes its catalog entry serves.
    pub modes: Vec<EditorMode>,
    /// The placement's state in words, for messages ("loading", "moving").
    pub state: String,
    /// Its replicas (a split is one, at its host).
    pub replicas: Vec<Replica>,
    /// The catalog model is on demand: with no placement, a request asks
    /// the controller to load it.
    pub on_demand: bool,
}

/// One replica's instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    /// Node name.
    pub node: String,
    /// Agent address (host:port) whose watch stream reports the instance.
    pub agent_address: String,
    /// The StartInstance request id: names the instance on the watch stream.
    pub request_id: String,
    /// Instance id; empty while none exists.
    pub instance_id: String,
    /// `http://host:port`; empty while none exists.
    pub base_url: String,
    /// Bearer token of the instance.
    pub api_key: String,
    /// Whether requests may go to it now.
    pub ready: bool,
    /// Its state in words ("ready", "loading", "failed", "unreachable").
    pub state: String,
}

/// A user key as stored (hash only).
#[derive(Debug, Clone, PartialEq)]
pub struct UserKey {
    /// Its name (shown in metrics and logs instead of the key).
    pub name: String,
    /// SHA-256 of the key's text.
    pub sha256: [u8; 32],
    /// Modes it may use (empty = all).
    pub modes: Vec<EditorMode>,
    /// Catalog or placement names it may use (empty = all).
    pub models: Vec<String>,
    /// When it stops working (Unix ms).
    pub expires_unix_ms: Option<u64>,
}

/// What a request's `model` resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct Target<'a> {
    /// The name as asked (for metrics and messages).
    pub asked: String,
    /// The mode, when the name was one.
    pub mode: Option<EditorMode>,
    /// Matching placements.
    pub routes: Vec<&'a Route>,
}

/// Why a request was not routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No placement, catalog name or mode by that name (404).
    #[error("model {asked:?} does not exist; known: {}", known.join(", "))]
    Unknown {
        /// The name asked for.
        asked: String,
        /// What exists.
        known: Vec<String>,
    },
    /// The name is unusable (400): empty, too long, or not printable.
    #[error("{0}")]
    BadName(String),
    /// The key may not use it (403).
    #[error("key {key:?} may not use {asked:?}")]
    Forbidden {
        /// The key's name.
        key: String,
        /// The name asked for.
        asked: String,
    },
}

/// Why a key was refused (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No `Authorization: Bearer` header.
    #[error("no API key: send 'Authorization: Bearer <key>' (haloctl keys create NAME makes one)")]
    Missing,
    /// Not a key the cluster knows (or revoked).
    #[error("invalid API key")]
    Invalid,
    /// Past its expiry.
    #[error("API key {0:?} has expired")]
    Expired(String),
}

/// Longest model name looked up.
pub const MAX_MODEL_NAME: usize = 256;

/// SHA-256 of a key's text.
pub fn key_hash(secret: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Table {
    /// The key whose text is `secret` (compared by hash), unexpired at `now`.
    pub fn authenticate(
        &self,
        secret: Option<&str>,
        now_unix_ms: u64,
    ) -> Result<&UserKey, KeyError> {
        let secret = secret.ok_or(KeyError::Missing)?;
        let h = key_hash(secret);
        // Hash comparison: the stored value is a hash, so a timing leak
        // reveals nothing usable about a key's text.
        let k = self
            .keys
            .iter()
            .find(|k| k.sha256 == h)
            .ok_or(KeyError::Invalid)?;
        match k.expires_unix_ms {
            Some(e) if e <= now_unix_ms => Err(KeyError::Expired(k.name.clone())),
            _ => Ok(k),
        }
    }

    /// The stored key `key` was read from, as this table has it, unexpired
    /// at `now`: a key checked earlier and revoked or expired since fails.
    pub fn authenticate_hash(&self, key: &UserKey, now_unix_ms: u64) -> Result<&UserKey, KeyError> {
        let k = self
            .keys
            .iter()
            .find(|k| k.sha256 == key.sha256)
            .ok_or(KeyError::Invalid)?;
        match k.expires_unix_ms {
            Some(e) if e <= now_unix_ms => Err(KeyError::Expired(k.name.clone())),
            _ => Ok(k),
        }
    }

    /// Resolves `asked` (a placement name, a catalog name, or an editor
    /// mode, in that order) to its placements, keeping those `key` may use.
    pub fn resolve<'a>(
        &'a self,
        asked: &str,
        key: Option<&UserKey>,
    ) -> Result<Target<'a>, RouteError> {
        if asked.is_empty() {
            return Err(RouteError::BadName("the request names no model".into()));
        }
        if asked.len() > MAX_MODEL_NAME || asked.chars().any(char::is_control) {
            return Err(RouteError::BadName(format!(
                "model name is not a name (at most {MAX_MODEL_NAME} printable characters)"
            )));
        }
        let by_placement: Vec<&Route> = self
            .routes
            .iter()
            .filter(|r| r.placement == asked)
            .collect();
        let by_model: Vec<&Route> = self.routes.iter().filter(|r| r.model == asked).collect();
        let (routes, mode) = if !by_placement.is_empty() {
            (by_placement, None)
        } else if !by_model.is_empty() {
            (by_model, None)
        } else {
            match EditorMode::ALL.into_iter().find(|m| m.as_str() == asked) {
                Some(m) => (
                    self.routes
                        .iter()
                        .filter(|r| r.modes.contains(&m))
                        .collect(),
                    Some(m),
                ),
                None => (Vec::new(), None),
            }
        };
        if routes.is_empty() {
            return Err(RouteError::Unknown {
                asked: asked.to_owned(),
                known: self.names(),
            });
        }
        let routes = match key {
            None => routes,
            Some(k) => {
                let allowed: Vec<&Route> =
                    routes.into_iter().filter(|r| k.allows(r, mode)).collect();
                if allowed.is_empty() {
                    return Err(RouteError::Forbidden {
                        key: k.name.clone(),
                        asked: asked.to_owned(),
                    });
                }
                allowed
            }
        };
        Ok(Target {
            asked: asked.to_owned(),
            mode,
            routes,
        })
    }

    /// Every name a request may use: placements, catalog names, modes served.
    pub fn names(&self) -> Vec<String> {
        let mut s = BTreeSet::new();
        for r in &self.routes {
            if !r.placement.is_empty() {
                s.insert(r.placement.clone());
            }
            s.insert(r.model.clone());
            for m in &r.modes {
                s.insert(m.as_str().to_owned());
            }
        }
        s.into_iter().collect()
    }
}

impl UserKey {
    /// Whether the key may use `route`, asked for by `mode` (when the name
    /// was a mode).
    pub fn allows(&self, route: &Route, mode: Option<EditorMode>) -> bool {
        let mode_ok = self.modes.is_empty()
            || match mode {
                Some(m) => self.modes.contains(&m),
                None => route.modes.iter().any(|m| self.modes.contains(m)),
            };
        let model_ok = self.models.is_empty()
            || self
                .models
                .iter()
                .any(|n| n == &route.model || n == &route.placement);
        mode_ok && model_ok
    }
}

impl Target<'_> {
    /// Whether no matching catalog model is placed at all (a request then
    /// waits only briefly: a re-placement, not a load, is what it can
    /// expect).
    pub fn unplaced(&self) -> bool {
        self.routes.iter().all(|r| r.placement.is_empty())
    }

    /// The catalog model to ask the controller to load: the first matching
    /// on-demand model with no placement, unless a matching placement
    /// exists already.
    pub fn to_demand(&self) -> Option<&str> {
        if self.routes.iter().any(|r| !r.placement.is_empty()) {
            return None;
        }
        self.routes
            .iter()
            .find(|r| r.on_demand)
            .map(|r| r.model.as_str())
    }

    /// Whether a matching model is on demand (loading one takes a load's
    /// time, not a re-placement's).
    pub fn on_demand(&self) -> bool {
        self.routes.iter().any(|r| r.on_demand)
    }

    /// Whether every matching placement is held by the controller (no node
    /// has room for what it was seen to use) or paused: waiting would not
    /// help.
    pub fn held(&self) -> bool {
        !self.routes.is_empty()
            && self
                .routes
                .iter()
                .all(|r| r.state.starts_with("held") || r.state == "paused")
    }

    /// Ready replicas of every matching placement.
    pub fn ready(&self) -> impl Iterator<Item = &Replica> {
        self.routes
            .iter()
            .flat_map(|r| r.replicas.iter())
            .filter(|r| r.ready && !r.base_url.is_empty())
    }

    /// The placements' states, for a 503's message.
    pub fn states(&self) -> String {
        self.routes
            .iter()
            .map(|r| {
                let name = if r.placement.is_empty() {
                    &r.model
                } else {
                    &r.placement
                };
                format!("{name} is {}", r.state)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Parses a lower-case hex SHA-256.
pub fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl UserKey {
    /// The stored key a `Routes` answer carries; `None` when its hash is
    /// not one.
    pub fn from_wire(k: &v1::UserKey) -> Option<UserKey> {
        Some(UserKey {
            name: k.name.clone(),
            sha256: parse_hash(&k.sha256)?,
            modes: k
                .modes
                .iter()
                .filter_map(|m| EditorMode::from_wire(*m))
                .collect(),
            models: k.models.clone(),
            expires_unix_ms: k.expires_unix_ms,
        })
    }
}

/// The table a controller's `Routes` answer describes (replica readiness
/// as the controller saw it; [`crate::feed`] overlays the agents' view).
pub fn from_routes(r: &v1::RoutesResponse) -> Table {
    Table {
        routes: r
            .routes
            .iter()
            .map(|p| Route {
                placement: p.placement.clone(),
                model: p.model.clone(),
                modes: p
                    .modes
                    .iter()
                    .filter_map(|m| EditorMode::from_wire(*m))
                    .collect(),
                state: p.state.clone(),
                on_demand: p.on_demand,
                replicas: p
                    .replicas
                    .iter()
                    .map(|x| Replica {
                        node: x.node.clone(),
                        agent_address: x.agent_address.clone(),
                        request_id: x.request_id.clone(),
                        instance_id: x.instance_id.clone(),
                        base_url: x.base_url.clone(),
                        api_key: x.api_key.clone(),
                        ready: x.state() == v1::InstanceState::Ready,
                        state: state_word(x.state()).to_owned(),
                    })
                    .collect(),
            })
            .collect(),
        keys: r.keys.iter().filter_map(UserKey::from_wire).collect(),
        controller_at_unix_ms: r.at_unix_ms,
    }
}

/// An instance state in words.
pub fn state_word(s: v1::InstanceState) -> &'static str {
    proto::domain::InstanceState::try_from(s).map_or("not started", |s| s.as_str())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built themselves.
mod tests {
    use super::*;

    fn route(placement: &str, model: &str, modes: &[EditorMode]) -> Route {
        Route {
            placement: placement.into(),
            model: model.into(),
            modes: modes.to_vec(),
            state: "ready".into(),
            replicas: vec![],
            on_demand: false,
        }
    }

    fn table() -> Table {
        Table {
            routes: vec![
                route("tiny", "tiny-q4", &[EditorMode::Ask, EditorMode::Code]),
                route("big", "deepseek", &[EditorMode::Architect]),
            ],
            keys: vec![UserKey {
                name: "alice".into(),
                sha256: key_hash("halo-secret"),
                modes: vec![EditorMode::Ask],
                models: vec![],
                expires_unix_ms: Some(1000),
            }],
            controller_at_unix_ms: 1,
        }
    }

    #[test]
    fn names_resolve_by_placement_then_model_then_mode() {
        let t = table();
        assert_eq!(t.resolve("tiny", None).unwrap().routes[0].placement, "tiny");
        assert_eq!(
            t.resolve("deepseek", None).unwrap().routes[0].placement,
            "big"
        );
        let code = t.resolve("code", None).unwrap();
        assert_eq!(
            (code.routes[0].placement.as_str(), code.mode),
            ("tiny", Some(EditorMode::Code))
        );
        match t.resolve("../etc", None) {
            Err(RouteError::Unknown { known, .. }) => {
                assert!(known.contains(&"architect".to_owned()))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.resolve(&"x".repeat(10_000), None),
            Err(RouteError::BadName(_))
        ));
        assert!(matches!(t.resolve("", None), Err(RouteError::BadName(_))));
    }

    #[test]
    fn keys_are_checked_by_hash_expiry_and_scope() {
        let t = table();
        assert_eq!(t.authenticate(None, 0), Err(KeyError::Missing));
        assert_eq!(t.authenticate(Some("nope"), 0), Err(KeyError::Invalid));
        let k = t.authenticate(Some("halo-secret"), 999).unwrap();
        assert!(t.resolve("ask", Some(k)).is_ok());
        assert!(t.resolve("tiny", Some(k)).is_ok(), "tiny serves ask");
        assert!(matches!(
            t.resolve("architect", Some(k)),
            Err(RouteError::Forbidden { .. })
        ));
        assert_eq!(
            t.authenticate(Some("halo-secret"), 1000),
            Err(KeyError::Expired("alice".into()))
        );
    }

    #[test]
    fn hashes_round_trip_through_hex() {
        let h = key_hash("x");
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_hash(&hex), Some(h));
        assert_eq!(parse_hash("zz"), None);
    }
}
