//! Schema registries: where schema ids in the wire format come from.
//!
//! [`SchemaRegistry`] is the port. [`EmbeddedRegistry`] is the stand-in used when no registry
//! URL is configured: it assigns ids the way a Confluent registry does (one global id per
//! distinct schema, versions per subject) and persists them in a redb file, so an id never
//! changes meaning across restarts.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema id {0} is not registered")]
    UnknownId(u32),
    #[error("schema registry storage failed: {0}")]
    Storage(String),
    #[error("schema registry holds an unparsable schema under id {id}: {reason}")]
    Corrupt { id: u32, reason: String },
    /// The registry cannot be reached or keeps failing; retry later.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// The registry answered no (e.g. an incompatible schema under a subject).
    #[error("schema registry refused: {0}")]
    Refused(String),
}

/// A registry of Avro schemas keyed by numeric id, as in Confluent's Schema Registry.
///
/// Calls may block (a remote registry makes HTTP calls), so callers resolve ids at start-up
/// and cache them; the [`Codec`](crate::Codec) does exactly that.
pub trait SchemaRegistry: Send + Sync {
    /// Registers `schema` under `subject` and returns its id. Registering the same schema
    /// again returns the same id.
    fn register(&self, subject: &str, schema: &Schema) -> Result<u32, RegistryError>;

    /// Looks up the schema a producer wrote with.
    fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, RegistryError>;
}

/// id → schema text as registered.
const SCHEMAS: TableDefinition<u32, &str> = TableDefinition::new("schemas");
/// Parsing Canonical Form → id, so equal schemas share one id.
const BY_CANONICAL: TableDefinition<&str, u32> = TableDefinition::new("schemas_by_canonical_form");
/// (subject, version) → id.
const SUBJECT_VERSIONS: TableDefinition<(&str, u32), u32> = TableDefinition::new("subject_versions");

/// A persistent registry inside one redb file.
pub struct EmbeddedRegistry {
    db: Database,
    parsed: RwLock<HashMap<u32, Arc<Schema>>>,
}

impl std::fmt::Debug for EmbeddedRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedRegistry").finish_non_exhaustive()
    }
}

fn storage<E: std::fmt::Display>(e: E) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

impl EmbeddedRegistry {
    /// Opens (or creates) the registry file at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let db = Database::create(path).map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(SCHEMAS).map_err(storage)?;
        txn.open_table(BY_CANONICAL).map_err(storage)?;
        txn.open_table(SUBJECT_VERSIONS).map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(Self { db, parsed: RwLock::new(HashMap::new()) })
    }

    /// Every version registered under `subject`, oldest first, as (version, id).
    pub fn versions(&self, subject: &str) -> Result<Vec<(u32, u32)>, RegistryError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(SUBJECT_VERSIONS).map_err(storage)?;
        table
            .range((subject, 0)..=(subject, u32::MAX))
            .map_err(storage)?
            .map(|entry| {
                let (k, v) = entry.map_err(storage)?;
                Ok((k.value().1, v.value()))
            })
            .collect()
    }
}

impl SchemaRegistry for EmbeddedRegistry {
    fn register(&self, subject: &str, schema: &Schema) -> Result<u32, RegistryError> {
        let canonical = schema.canonical_form();
        let text = serde_json::to_string(schema).map_err(storage)?;
        let txn = self.db.begin_write().map_err(storage)?;
        let id = {
            let mut by_canonical = txn.open_table(BY_CANONICAL).map_err(storage)?;
            let mut schemas = txn.open_table(SCHEMAS).map_err(storage)?;
            let existing = by_canonical.get(canonical.as_str()).map_err(storage)?.map(|g| g.value());
            match existing {
                Some(id) => id,
                None => {
                    let next = schemas.last().map_err(storage)?.map_or(1, |(k, _)| k.value() + 1);
                    schemas.insert(next, text.as_str()).map_err(storage)?;
                    by_canonical.insert(canonical.as_str(), next).map_err(storage)?;
                    next
                }
            }
        };
        {
            let mut subjects = txn.open_table(SUBJECT_VERSIONS).map_err(storage)?;
            let mut latest: Option<(u32, u32)> = None;
            for entry in subjects.range((subject, 0)..=(subject, u32::MAX)).map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                latest = Some((k.value().1, v.value()));
            }
            // Confluent semantics: re-registering the latest schema adds no version.
            if latest.map(|(_, latest_id)| latest_id) != Some(id) {
                let version = latest.map_or(1, |(v, _)| v + 1);
                subjects.insert((subject, version), id).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
        Ok(id)
    }

    fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(schema) = self.parsed.read().expect("registry cache poisoned").get(&id) {
            return Ok(schema.clone());
        }
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(SCHEMAS).map_err(storage)?;
        let text = table.get(id).map_err(storage)?.ok_or(RegistryError::UnknownId(id))?.value().to_owned();
        let schema =
            Arc::new(Schema::parse_str(&text).map_err(|e| RegistryError::Corrupt { id, reason: e.to_string() })?);
        self.parsed.write().expect("registry cache poisoned").insert(id, schema.clone());
        Ok(schema)
    }
}
