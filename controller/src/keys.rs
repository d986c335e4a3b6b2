//! User keys of the gateways: `CreateKey` draws the secret (`halo-` and 43
//! base64url characters of 32 random bytes), stores only its SHA-256 with
//! the key's name, scope and expiry as JSON under [`KEYS`], and returns the
//! secret once; `ListKeys` and `Routes` read them back (the latter with the
//! hashes, for gateways); `RevokeKey` deletes one. Writes are the leader's,
//! like every desired-state write.

use crate::desired::{Desired, json};
use crate::error::Error;
use crate::store::{Compare, KEYS, Op, Store};
use proto::domain::EditorMode;
use proto::v1;
use serde::{Deserialize, Serialize};

/// Longest key name.
pub const MAX_NAME: usize = 64;
/// Longest validity a key may be given, in days (about ten years).
pub const MAX_EXPIRES_DAYS: u32 = 3650;
/// Most model names one key may be scoped to.
pub const MAX_MODELS: usize = 64;
/// What every secret starts with, so a leaked one is recognisable.
pub const SECRET_PREFIX: &str = "halo-";
/// Random bytes in a secret.
pub const SECRET_BYTES: usize = 32;

const DAY_MS: u64 = 86_400_000;

/// A user key as stored: never its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Its name (shown in lists, logs and metrics instead of the key).
    pub name: String,
    /// Lower-case hex SHA-256 of the key's text.
    pub sha256: String,
    /// Editor modes it may use (empty = all).
    #[serde(default)]
    pub modes: Vec<EditorMode>,
    /// Catalog or placement names it may use (empty = all).
    #[serde(default)]
    pub models: Vec<String>,
    /// When it was made, Unix ms.
    pub created_unix_ms: u64,
    /// When it stops working, Unix ms; `None` = never.
    #[serde(default)]
    pub expires_unix_ms: Option<u64>,
}

/// A checked `CreateKey` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// The key's name.
    pub name: String,
    /// Modes, without repeats, in the order asked.
    pub modes: Vec<EditorMode>,
    /// Model names, without repeats, in the order asked.
    pub models: Vec<String>,
    /// Days until it expires; 0 = never.
    pub expires_days: u32,
}

/// The store key of user key `name`.
pub fn key_key(name: &str) -> String {
    format!("{KEYS}{name}")
}

/// A key name is 1 to [`MAX_NAME`] characters of `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit (so it is never `.`, `..` or read as a
/// command-line flag).
pub fn check_key_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b));
    if ok {
        return Ok(());
    }
    let shown: String = name.chars().take(80).flat_map(char::escape_debug).collect();
    Err(Error::InvalidArgument(format!(
        "key name `{shown}`: use 1-{MAX_NAME} characters of A-Z a-z 0-9 . _ -, \
         starting with a letter or digit"
    )))
}

/// The checks `CreateKey` makes before anything is read or written. Pure,
/// so the fuzz target can run it.
pub fn new_key_request(r: &v1::CreateKeyRequest) -> Result<NewKey, Error> {
    check_key_name(&r.name)?;
    let mut modes = Vec::new();
    for &m in &r.modes {
        let mode = EditorMode::from_wire(m).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "modes: {m} is no editor mode (ask, code, autocomplete, architect, debug)"
            ))
        })?;
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    if r.models.len() > MAX_MODELS {
        return Err(Error::InvalidArgument(format!(
            "models: {} names; a key is scoped to at most {MAX_MODELS}",
            r.models.len()
        )));
    }
    let mut models: Vec<String> = Vec::new();
    for n in &r.models {
        proto::domain::catalog::check_name("models", n)?;
        if !models.contains(n) {
            models.push(n.clone());
        }
    }
    if r.expires_days > MAX_EXPIRES_DAYS {
        return Err(Error::InvalidArgument(format!(
            "expires_days {}: at most {MAX_EXPIRES_DAYS} (0 = never)",
            r.expires_days
        )));
    }
    Ok(NewKey {
        name: r.name.clone(),
        modes,
        models,
        expires_days: r.expires_days,
    })
}

/// A new secret: [`SECRET_PREFIX`] and [`SECRET_BYTES`] random bytes from
/// the operating system, base64url without padding (43 characters).
pub fn new_secret() -> Result<String, Error> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; SECRET_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| {
            Error::FailedPrecondition("the system's random number generator failed".into())
        })?;
    Ok(format!("{SECRET_PREFIX}{}", base64url(&bytes)))
}

/// Base64url (RFC 4648 §5) without padding.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let mut n = 0u32;
        for (i, &b) in chunk.iter().enumerate() {
            n |= u32::from(b) << (16 - 8 * i);
        }
        // 3 bytes make 4 characters, 2 make 3, 1 makes 2.
        for i in 0..=chunk.len() {
            let six = (n >> (18 - 6 * i)) & 63;
            out.push(char::from(ALPHABET[six as usize]));
        }
    }
    out
}

/// Lower-case hex SHA-256 of a key's text (what gateways compare).
pub fn sha256_hex(secret: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl NewKey {
    /// The record stored for this key with text `secret`, made at `now`.
    pub fn record(&self, secret: &str, now_unix_ms: u64) -> KeyRecord {
        KeyRecord {
            name: self.name.clone(),
            sha256: sha256_hex(secret),
            modes: self.modes.clone(),
            models: self.models.clone(),
            created_unix_ms: now_unix_ms,
            expires_unix_ms: (self.expires_days > 0)
                .then(|| now_unix_ms.saturating_add(u64::from(self.expires_days) * DAY_MS)),
        }
    }
}

/// Makes a key (leader only): the stored record and the secret, which
/// exists nowhere else.
pub async fn create(
    desired: &Desired,
    r: &v1::CreateKeyRequest,
) -> Result<(KeyRecord, String), Error> {
    let req = new_key_request(r)?;
    if desired.leadership().term().is_none() {
        return Err(Error::NotLeader);
    }
    let key = key_key(&req.name);
    let exists = |name: &str| {
        Error::AlreadyExists(format!(
            "a user key named `{name}` already exists (`haloctl keys revoke {name}` first, \
             or choose another name)"
        ))
    };
    if desired.store().get(&key).await?.is_some() {
        return Err(exists(&req.name));
    }
    let secret = new_secret()?;
    let rec = req.record(&secret, proto::units::now_unix_ms());
    let put = Op::Put {
        key: key.clone(),
        value: json(&rec),
    };
    match desired.write(vec![Compare::absent(&key)], vec![put]).await {
        // Made by a concurrent call between the read and the write.
        Err(Error::Conflict(_)) => Err(exists(&req.name)),
        r => r.map(|_| (rec, secret)),
    }
}

/// Every stored key, by name.
pub async fn list(desired: &Desired) -> Result<Vec<KeyRecord>, Error> {
    let (kvs, _) = desired.store().list(KEYS).await?;
    kvs.iter()
        .map(|kv| {
            serde_json::from_str::<KeyRecord>(&kv.value).map_err(|e| Error::Corrupt {
                key: kv.key.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Deletes key `name` (leader only).
pub async fn revoke(desired: &Desired, name: &str) -> Result<(), Error> {
    check_key_name(name)?;
    if desired.leadership().term().is_none() {
        return Err(Error::NotLeader);
    }
    let key = key_key(name);
    let Some(kv) = desired.store().get(&key).await? else {
        return Err(Error::NotFound(format!(
            "no user key named `{name}` (`haloctl keys list` shows them)"
        )));
    };
    desired
        .write(
            vec![Compare::at(&key, kv.mod_revision)],
            vec![Op::Delete { key }],
        )
        .await?;
    Ok(())
}

impl KeyRecord {
    /// The wire key; `with_hash` false leaves its hash out (`ListKeys`).
    pub fn to_wire(&self, with_hash: bool) -> v1::UserKey {
        v1::UserKey {
            name: self.name.clone(),
            sha256: if with_hash {
                self.sha256.clone()
            } else {
                String::new()
            },
            modes: self
                .modes
                .iter()
                .map(|m| v1::EditorMode::from(*m) as i32)
                .collect(),
            models: self.models.clone(),
            created_unix_ms: self.created_unix_ms,
            expires_unix_ms: self.expires_unix_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str) -> v1::CreateKeyRequest {
        v1::CreateKeyRequest {
            name: name.into(),
            ..v1::CreateKeyRequest::default()
        }
    }

    #[test]
    fn key_names_are_sane_identifiers() {
        for good in ["alice", "ci-bot_2", "Laptop.Work", "a", &"x".repeat(64)] {
            assert!(check_key_name(good).is_ok(), "{good:?} refused");
        }
        for bad in [
            "",
            &"x".repeat(65),
            ".",
            "..",
            "-rf",
            "a/b",
            "../etc",
            "a b",
            "ünï",
            "key\n",
            "a\0b",
        ] {
            let e = check_key_name(bad).expect_err(bad);
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.contains("1-64 characters")),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn secrets_are_halo_and_43_base64url_characters_and_differ() {
        let a = new_secret().expect("secret");
        let b = new_secret().expect("secret");
        assert_ne!(a, b);
        for s in [&a, &b] {
            let body = s.strip_prefix("halo-").expect("prefix");
            assert_eq!(body.len(), 43, "{s}");
            assert!(
                body.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
                "{s}"
            );
        }
    }

    #[test]
    fn base64url_matches_rfc_4648_vectors() {
        // RFC 4648 §10, without padding; and the URL-safe characters.
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url(raw.as_bytes()), enc);
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn the_hash_is_lower_case_hex_sha256() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn requests_are_checked_before_anything_is_stored() {
        let mut r = req("alice");
        r.modes = vec![
            v1::EditorMode::Ask as i32,
            v1::EditorMode::Code as i32,
            v1::EditorMode::Ask as i32,
        ];
        r.models = vec!["tiny".into(), "tiny".into()];
        r.expires_days = 30;
        let k = new_key_request(&r).expect("valid");
        assert_eq!(k.modes, vec![EditorMode::Ask, EditorMode::Code]);
        assert_eq!(k.models, vec!["tiny".to_owned()]);
        let rec = k.record("halo-x", 1000);
        assert_eq!(rec.expires_unix_ms, Some(1000 + 30 * DAY_MS));
        assert_eq!(rec.sha256, sha256_hex("halo-x"));
        assert!(!json(&rec).contains("halo-x"), "the text is stored");

        let refused = |r: v1::CreateKeyRequest, what: &str| {
            let e = new_key_request(&r).expect_err(what);
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.contains(what)),
                "{what}: {e}"
            );
        };
        let mut r = req("alice");
        r.modes = vec![v1::EditorMode::Unspecified as i32];
        refused(r, "no editor mode");
        let mut r = req("alice");
        r.modes = vec![99];
        refused(r, "99 is no editor mode");
        let mut r = req("alice");
        r.models = vec!["../etc".into()];
        refused(r, "models");
        let mut r = req("alice");
        r.models = (0..=MAX_MODELS).map(|i| format!("m{i}")).collect();
        refused(r, "at most 64");
        let mut r = req("alice");
        r.expires_days = MAX_EXPIRES_DAYS + 1;
        refused(r, "at most 3650");
        let mut r = req("alice");
        r.expires_days = MAX_EXPIRES_DAYS;
        assert!(new_key_request(&r).is_ok());
        refused(req("no/slash"), "key name");
    }

    #[test]
    fn list_keys_leaves_the_hash_out() {
        let rec = new_key_request(&req("bob"))
            .expect("valid")
            .record("halo-y", 5);
        assert_eq!(rec.expires_unix_ms, None);
        assert!(rec.to_wire(false).sha256.is_empty());
        assert_eq!(rec.to_wire(true).sha256, sha256_hex("halo-y"));
    }
}
