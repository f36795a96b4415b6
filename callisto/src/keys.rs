//! `callisto keys create|list|revoke`, and the admin key `callisto dev` makes on first start.
//!
//! Keys live in one file of hashes (`auth.api_keys_file`, by default `DATA_DIR/api-keys.json`);
//! running services reload it within seconds, so these commands work on the file directly,
//! whether or not a service is running. Whoever can write that file can grant any scope, so
//! it is created with mode 0600, like the dev key beside it.

use std::collections::BTreeSet;
use std::path::PathBuf;

use callisto_core::auth::Scope;
use callisto_core::auth::keys::{self, NewKey, StoredKey};
use callisto_core::config::{Limit, Settings};
use chrono::{DateTime, Utc};

/// Where `callisto dev` leaves its admin key for the walkthrough and the batch commands.
pub const DEV_KEY_FILE: &str = "dev-api-key";

pub fn dev_key_path(settings: &Settings) -> PathBuf {
    settings.storage.data_dir.join(DEV_KEY_FILE)
}

/// On the first start of a data dir, creates an API key with every scope, writes it to
/// `DATA_DIR/dev-api-key` (mode 0600), and says once how to use it.
pub fn ensure_dev_key(settings: &Settings) -> anyhow::Result<()> {
    let path = dev_key_path(settings);
    if path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&settings.storage.data_dir)?;
    let created = create(settings, "callisto dev".into(), Scope::ALL.into_iter().collect(), None, None)?;
    keys::write_private(&path, created.key.as_bytes())?;
    eprintln!(
        "callisto dev: created an admin API key (id {}) in {path}; call the API with\n  \
         -H \"Authorization: ApiKey $(cat {path})\"",
        created.stored.id,
        path = path.display()
    );
    Ok(())
}

/// One audit line for a key change made from this machine's command line.
fn audit_key(action: &str, key: &StoredKey) {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    tracing::info!(
        target: "audit",
        principal = %format!("local:{user}"),
        auth_method = "local",
        action = %format!("keys.{action}"),
        resource = %format!("api_key:{}", key.id),
        outcome = "ok",
        "audit"
    );
}

/// `callisto keys create`: the new key, shown this once.
pub fn create(
    settings: &Settings,
    name: String,
    scopes: BTreeSet<Scope>,
    expires_at: Option<DateTime<Utc>>,
    rate_limit: Option<Limit>,
) -> anyhow::Result<keys::CreatedKey> {
    let created =
        keys::create(&settings.auth.api_keys_path(&settings.storage), NewKey { name, scopes, expires_at, rate_limit })?;
    audit_key("create", &created.stored);
    Ok(created)
}

/// `callisto keys list`: every key, without hashes.
pub fn list(settings: &Settings) -> anyhow::Result<Vec<serde_json::Value>> {
    let file = keys::KeyFile::load(&settings.auth.api_keys_path(&settings.storage))?;
    let now = Utc::now();
    Ok(file
        .keys
        .iter()
        .map(|k| {
            serde_json::json!({
                "id": k.id, "name": k.name, "scopes": k.scopes, "created_at": k.created_at,
                "expires_at": k.expires_at, "revoked_at": k.revoked_at, "rate_limit": k.rate_limit,
                "usable": k.is_usable(now),
            })
        })
        .collect())
}

/// `callisto keys revoke`.
pub fn revoke(settings: &Settings, id: &str) -> anyhow::Result<StoredKey> {
    let revoked = keys::revoke(&settings.auth.api_keys_path(&settings.storage), id)?;
    audit_key("revoke", &revoked);
    Ok(revoked)
}

/// The key batch commands present to a running dev: the given one, else the dev key.
pub fn batch_key(settings: &Settings, given: Option<&str>) -> Option<String> {
    given
        .map(str::to_owned)
        .or_else(|| std::fs::read_to_string(dev_key_path(settings)).ok().map(|k| k.trim().to_owned()))
        .filter(|k| !k.is_empty())
}
