//! API keys: shown once when created, stored only as a SHA-256 hash with a name, scopes, an
//! optional expiry and rate limit, and revocable.
//!
//! A key reads `cal_<id>_<secret>`: the id is public (logs, audit lines and `keys list` name a
//! key by it), the secret is 256 random bits. Such a secret cannot be guessed, so a fast hash
//! is the right one (a slow password hash protects low-entropy secrets, which these are not).
//!
//! The file is JSON, written atomically with mode 0600. Services poll it and pick up changes
//! without a restart, so `callisto keys create|revoke` (or a new mounted secret) takes effect
//! within seconds.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{AuthMethod, Principal, Scope};
use crate::config::Limit;

/// The key file's name in an embedded data dir.
pub const KEYS_FILE: &str = "api-keys.json";
const PREFIX: &str = "cal_";
/// How often a service looks for a changed key file.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// One key as stored: everything but the key itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    pub id: String,
    pub name: String,
    /// Hex SHA-256 of the whole key.
    pub sha256: String,
    pub scopes: BTreeSet<Scope>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// Replaces the default budgets for this key, each budget separately.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<Limit>,
}

impl StoredKey {
    pub fn is_usable(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| at > now)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub keys: Vec<StoredKey>,
}

impl KeyFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).with_context(|| format!("reading API keys from {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the file atomically (temp file, then rename) with mode 0600.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or(KEYS_FILE)));
        write_private(&tmp, &serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
    }
}

/// Writes `bytes` to a new file only its owner can read.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

/// What a new key is for.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    pub expires_at: Option<DateTime<Utc>>,
    pub rate_limit: Option<Limit>,
}

/// A freshly created key: the only moment the key itself exists outside its holder.
pub struct CreatedKey {
    pub key: String,
    pub stored: StoredKey,
}

/// Never prints the key.
impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey").field("key", &"<redacted>").field("stored", &self.stored).finish()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Adds a key to the file at `path` and returns it, the one time it is shown.
pub fn create(path: &Path, new: NewKey) -> anyhow::Result<CreatedKey> {
    anyhow::ensure!(!new.name.trim().is_empty() && new.name.len() <= 128, "a key needs a name of 1 to 128 characters");
    anyhow::ensure!(!new.scopes.is_empty(), "a key needs at least one scope");
    let mut rng = rand::rng();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let id = hex::encode(id);
    let key = format!("{PREFIX}{id}_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret));
    let stored = StoredKey {
        id,
        name: new.name,
        sha256: hex::encode(digest(&key)),
        scopes: new.scopes,
        created_at: Utc::now(),
        expires_at: new.expires_at,
        revoked_at: None,
        rate_limit: new.rate_limit,
    };
    let mut file = KeyFile::load(path)?;
    file.keys.push(stored.clone());
    file.save(path)?;
    Ok(CreatedKey { key, stored })
}

/// Marks key `id` revoked; services refuse it once they reload the file.
pub fn revoke(path: &Path, id: &str) -> anyhow::Result<StoredKey> {
    let mut file = KeyFile::load(path)?;
    let key = file.keys.iter_mut().find(|k| k.id == id).with_context(|| format!("no API key with id {id:?}"))?;
    if key.revoked_at.is_none() {
        key.revoked_at = Some(Utc::now());
    }
    let revoked = key.clone();
    file.save(path)?;
    Ok(revoked)
}

/// The key id inside a presented key, if it has the shape of one.
fn key_id(presented: &str) -> Option<&str> {
    let (id, secret) = presented.strip_prefix(PREFIX)?.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some(id)
}

/// The keys a service accepts, kept current with the file.
pub struct ApiKeys {
    path: PathBuf,
    loaded: RwLock<Loaded>,
}

#[derive(Default)]
struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    /// Key id → the key and its hash, decoded once at load.
    keys: HashMap<String, (StoredKey, [u8; 32])>,
}

impl ApiKeys {
    /// Loads `path` (a missing file is no keys yet) and follows its changes from now on.
    pub fn open(path: PathBuf) -> anyhow::Result<Arc<Self>> {
        let keys = Arc::new(Self { path, loaded: RwLock::new(Loaded::default()) });
        keys.reload()?;
        let weak: Weak<Self> = Arc::downgrade(&keys);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                let Some(keys) = weak.upgrade() else { return };
                if let Err(e) = keys.reload() {
                    tracing::warn!(error = %format!("{e:#}"), "api key file unreadable; keeping the keys loaded before");
                }
            }
        });
        Ok(keys)
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    /// Re-reads the file when its modification time or size changed.
    pub fn reload(&self) -> anyhow::Result<()> {
        let stamp = self.stamp();
        if stamp.is_some() && stamp == self.loaded.read().expect("key lock").stamp {
            return Ok(());
        }
        let file = KeyFile::load(&self.path)?;
        let count = file.keys.len();
        let keys = file
            .keys
            .into_iter()
            .filter_map(|k| match hex::decode(&k.sha256).ok().and_then(|h| <[u8; 32]>::try_from(h).ok()) {
                Some(hash) => Some((k.id.clone(), (k, hash))),
                None => {
                    tracing::warn!(key_id = %k.id, "api key with a malformed hash ignored");
                    None
                }
            })
            .collect();
        *self.loaded.write().expect("key lock") = Loaded { stamp, keys };
        tracing::info!(path = %self.path.display(), keys = count, "api keys loaded");
        Ok(())
    }

    /// The caller a presented key stands for; `None` for an unknown, revoked or expired key.
    pub fn verify(&self, presented: &str) -> Option<Principal> {
        let id = key_id(presented)?;
        let loaded = self.loaded.read().expect("key lock");
        let (stored, hash) = loaded.keys.get(id)?;
        let matches: bool = digest(presented).ct_eq(hash).into();
        (matches && stored.is_usable(Utc::now())).then(|| Principal {
            id: stored.id.clone(),
            method: AuthMethod::ApiKey,
            scopes: stored.scopes.clone(),
            limit: stored.rate_limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_key(scopes: &[Scope]) -> NewKey {
        NewKey { name: "test".into(), scopes: scopes.iter().copied().collect(), expires_at: None, rate_limit: None }
    }

    #[tokio::test]
    async fn created_keys_verify_until_revoked_and_only_hashes_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEYS_FILE);
        let created = create(&path, new_key(&[Scope::Search])).unwrap();
        let on_disk = std::fs::read_to_string(&path).unwrap();
        assert!(!on_disk.contains(created.key.splitn(3, '_').nth(2).unwrap()), "the secret is never stored");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let keys = ApiKeys::open(path.clone()).unwrap();
        let principal = keys.verify(&created.key).expect("a fresh key verifies");
        assert_eq!(principal.id, created.stored.id);
        assert!(principal.scopes.contains(&Scope::Search));
        let mut forged = created.key.clone();
        forged.pop();
        forged.push(if created.key.ends_with('A') { 'B' } else { 'A' });
        assert!(keys.verify(&forged).is_none(), "a key with a wrong secret is refused");

        revoke(&path, &created.stored.id).unwrap();
        // The modification time may not move within one tick on every filesystem; the size does.
        keys.reload().unwrap();
        assert!(keys.verify(&created.key).is_none(), "a revoked key is refused");
    }

    #[test]
    fn expired_keys_are_unusable() {
        let mut key = create(&tempfile::tempdir().unwrap().path().join("k.json"), new_key(&[Scope::Admin])).unwrap();
        key.stored.expires_at = Some(Utc::now() - chrono::Duration::seconds(1));
        assert!(!key.stored.is_usable(Utc::now()));
        assert!(!format!("{key:?}").contains(&key.key), "a created key never prints");
    }
}
