//! `haloctl keys`: the user keys editors and tools send to halo's gateways.
//! `create` prints a new key's text once (the controller keeps only its
//! SHA-256), `list` shows names, scopes and expiry, `revoke` deletes one;
//! every gateway stops accepting it as soon as it reads the change.

use crate::Failure;
use crate::cli::{CreateArgs, KeysArgs, KeysCommand, ListKeysArgs, RevokeArgs};
use crate::client::Target;
use crate::cluster::{client_call, mode};
use crate::output::{Format, Table, print, print_json};
use proto::v1;
use serde::Serialize;

/// One key in `haloctl keys list -o json`.
#[derive(Debug, Serialize, PartialEq)]
pub struct KeyJson {
    /// Name.
    pub name: String,
    /// Modes it may use (empty: all).
    pub modes: Vec<String>,
    /// Catalog or placement names it may use (empty: all).
    pub models: Vec<String>,
    /// When it was made, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// When it stops working; absent: never.
    pub expires_unix_ms: Option<u64>,
}

/// `haloctl keys create -o json`: the key and its text.
#[derive(Debug, Serialize, PartialEq)]
pub struct CreatedJson {
    /// The key as `list` shows it.
    #[serde(flatten)]
    pub key: KeyJson,
    /// The key's text: shown only here.
    pub secret: String,
}

/// The JSON view of keys.
pub fn keys_json(keys: &[v1::UserKey]) -> Vec<KeyJson> {
    keys.iter()
        .map(|k| KeyJson {
            name: k.name.clone(),
            modes: k.modes.iter().map(|&m| mode(m).to_owned()).collect(),
            models: k.models.clone(),
            created_unix_ms: k.created_unix_ms,
            expires_unix_ms: k.expires_unix_ms,
        })
        .collect()
}

/// `YYYY-MM-DD HH:MMZ` (UTC) of a Unix time in milliseconds.
pub fn utc(unix_ms: u64) -> String {
    let secs = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{}-{:02}-{:02} {:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => format!("{unix_ms} ms"),
    }
}

fn all_or(v: &[String]) -> String {
    if v.is_empty() {
        "all".into()
    } else {
        v.join(",")
    }
}

fn expiry(k: &KeyJson, now_unix_ms: u64) -> String {
    match k.expires_unix_ms {
        None => "never".into(),
        Some(e) if e <= now_unix_ms => format!("{} (expired)", utc(e)),
        Some(e) => utc(e),
    }
}

/// The `haloctl keys list` table.
pub fn render_keys(keys: &[KeyJson]) -> String {
    render_keys_at(keys, proto::units::now_unix_ms())
}

/// The `haloctl keys list` table at `now_unix_ms` (expired keys say so).
pub fn render_keys_at(keys: &[KeyJson], now_unix_ms: u64) -> String {
    if keys.is_empty() {
        return "No user keys. `haloctl keys create NAME` makes one.\n".into();
    }
    let mut t = Table::new(["NAME", "MODES", "MODELS", "CREATED", "EXPIRES"]);
    for k in keys {
        t.row([
            k.name.clone(),
            all_or(&k.modes),
            all_or(&k.models),
            utc(k.created_unix_ms),
            expiry(k, now_unix_ms),
        ]);
    }
    t.render()
}

/// What `haloctl keys create` prints: the scope, the key, how to use it.
pub fn render_created(c: &CreatedJson) -> String {
    format!(
        "created key {}: modes {}, models {}, expires {}\n\
         {}\n\
         This is the only time the key is shown (halo keeps its hash). Send it as \
         \"Authorization: Bearer <key>\" to the gateway URL `haloctl endpoints` shows.\n",
        c.key.name,
        all_or(&c.key.modes),
        all_or(&c.key.models),
        c.key.expires_unix_ms.map_or_else(|| "never".into(), utc),
        c.secret
    )
}

/// `haloctl keys …`.
pub fn run(t: &Target, a: &KeysArgs) -> Result<(), Failure> {
    match &a.command {
        KeysCommand::Create(c) => create(t, c),
        KeysCommand::List(l) => list(t, l),
        KeysCommand::Revoke(r) => revoke(t, r),
    }
}

fn create(t: &Target, a: &CreateArgs) -> Result<(), Failure> {
    let req = v1::CreateKeyRequest {
        name: a.name.clone(),
        modes: a
            .modes
            .iter()
            .map(|m| v1::EditorMode::from(*m) as i32)
            .collect(),
        models: a.models.clone(),
        expires_days: a.expires.unwrap_or(0),
    };
    let resp = client_call(t, |mut c| async move { c.create_key(req).await })?;
    let key = resp
        .key
        .ok_or_else(|| anyhow::anyhow!("the controller's answer holds no key"))?;
    let created = CreatedJson {
        key: keys_json(std::slice::from_ref(&key)).remove(0),
        secret: resp.secret,
    };
    match a.output {
        Format::Json => print_json(&created)?,
        Format::Table => print(&render_created(&created)),
    }
    Ok(())
}

fn list(t: &Target, a: &ListKeysArgs) -> Result<(), Failure> {
    let resp = client_call(t, |mut c| async move {
        c.list_keys(v1::ListKeysRequest {}).await
    })?;
    let v = keys_json(&resp.keys);
    match a.output {
        Format::Json => print_json(&v)?,
        Format::Table => print(&render_keys(&v)),
    }
    Ok(())
}

fn revoke(t: &Target, a: &RevokeArgs) -> Result<(), Failure> {
    let req = v1::RevokeKeyRequest {
        name: a.name.clone(),
    };
    client_call(t, |mut c| async move { c.revoke_key(req).await })?;
    print(&format!(
        "revoked key {}: gateways refuse it as soon as they see the change\n",
        a.name
    ));
    Ok(())
}
