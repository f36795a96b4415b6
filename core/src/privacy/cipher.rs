//! AES-256-GCM for personal data (sealed with a person's data key) and for data keys (wrapped
//! by the master key). Every ciphertext has a fresh random 96-bit nonce and is bound to where
//! it belongs through associated data: a sealed payload to its event id, a wrapped key to its
//! person id. Moving either elsewhere fails authentication.

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use callisto_avro::events::{PersonalData, SealedPersonalData};
use sha2::Digest;
use uuid::Uuid;
use zeroize::Zeroizing;

/// The `algorithm` written into every sealed payload.
pub const ALGORITHM: &str = "AES-256-GCM";
const NONCE_LEN: usize = 12;
/// Bytes of a data key and of a master key.
pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum CipherError {
    #[error("authentication failed: the ciphertext was altered or belongs to another {0}")]
    Authentication(&'static str),
    #[error("malformed sealed data: {0}")]
    Malformed(String),
}

/// A person's data key, zeroed on drop. Only the 32 key bytes are kept (the keyring caches many
/// of these); the AES key schedule is expanded per use, which costs far less than the event's
/// Avro encoding.
pub struct DataKey {
    raw: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl DataKey {
    fn from_bytes(bytes: &[u8]) -> Result<Self, CipherError> {
        if bytes.len() != KEY_LEN {
            return Err(CipherError::Malformed(format!("a data key is {KEY_LEN} bytes, not {}", bytes.len())));
        }
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        raw.copy_from_slice(bytes);
        Ok(Self { raw })
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(self.raw.as_slice()))
    }

    /// Encrypts `data` (Avro binary of `PersonalData`) for the event `event_id`.
    pub fn seal(&self, key_id: &str, event_id: Uuid, data: &PersonalData) -> Result<SealedPersonalData, CipherError> {
        let plaintext = Zeroizing::new(encode_personal(data)?);
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = event_aad(event_id);
        let ciphertext = self
            .cipher()
            .encrypt(&nonce, Payload { msg: &plaintext, aad: aad.as_bytes() })
            .map_err(|_| CipherError::Malformed("encryption failed".into()))?;
        Ok(SealedPersonalData {
            key_id: key_id.to_owned(),
            algorithm: ALGORITHM.to_owned(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Decrypts a payload sealed for `event_id`.
    pub fn open(&self, event_id: Uuid, sealed: &SealedPersonalData) -> Result<PersonalData, CipherError> {
        if sealed.algorithm != ALGORITHM {
            return Err(CipherError::Malformed(format!("unknown algorithm {:?}", sealed.algorithm)));
        }
        if sealed.nonce.len() != NONCE_LEN {
            return Err(CipherError::Malformed(format!("a nonce is {NONCE_LEN} bytes, not {}", sealed.nonce.len())));
        }
        let aad = event_aad(event_id);
        let plaintext = Zeroizing::new(
            self.cipher()
                .decrypt(Nonce::from_slice(&sealed.nonce), Payload { msg: &sealed.ciphertext, aad: aad.as_bytes() })
                .map_err(|_| CipherError::Authentication("event"))?,
        );
        decode_personal(&plaintext)
    }
}

/// The event id as the associated data of its sealed payload: the 36-character lowercase
/// hyphenated text, as the event's own `event_id` field holds it.
fn event_aad(event_id: Uuid) -> String {
    event_id.hyphenated().to_string()
}

fn wrap_aad(person: Uuid) -> String {
    format!("callisto-data-key:{person}")
}

/// Serialized straight into Avro binary with the schema (no intermediate `Value` and no schema
/// resolution, which would cost more than the encryption itself). The schema names no other
/// type, so no named-type table is needed.
fn encode_personal(data: &PersonalData) -> Result<Vec<u8>, CipherError> {
    let schema = callisto_avro::schemas::personal_data_schema();
    let mut out = Vec::with_capacity(128);
    apache_avro::write_avro_datum_ref(schema, data, &mut out).map_err(|e| CipherError::Malformed(e.to_string()))?;
    Ok(out)
}

fn decode_personal(bytes: &[u8]) -> Result<PersonalData, CipherError> {
    let mut body = bytes;
    let value = callisto_avro::schemas::personal_data_reader()
        .read(&mut body)
        .map_err(|e| CipherError::Malformed(e.to_string()))?;
    if !body.is_empty() {
        return Err(CipherError::Malformed(format!("{} trailing bytes after the personal data", body.len())));
    }
    apache_avro::from_value(&value).map_err(|e| CipherError::Malformed(e.to_string()))
}

/// 32 bytes from the operating system's generator, zeroed when dropped.
fn random_key() -> Zeroizing<[u8; KEY_LEN]> {
    let mut raw = Zeroizing::new([0u8; KEY_LEN]);
    OsRng.fill_bytes(&mut *raw);
    raw
}

/// A key-encryption key: wraps and unwraps data keys, never events.
pub struct MasterKey {
    id: String,
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl MasterKey {
    /// From 32 secret bytes. Its id is the first 16 hex digits of their SHA-256, so stored keys
    /// can say which master key wraps them without revealing it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CipherError> {
        if bytes.len() != KEY_LEN {
            return Err(CipherError::Malformed(format!("a master key is {KEY_LEN} bytes, not {}", bytes.len())));
        }
        let id = hex::encode(&sha2::Sha256::digest(bytes)[..8]);
        Ok(Self { id, cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(bytes)) })
    }

    /// From the text of a master key file: 64 hex digits, surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Result<Self, CipherError> {
        let bytes = Zeroizing::new(
            hex::decode(text.trim())
                .map_err(|_| CipherError::Malformed("a master key file holds 64 hex digits".into()))?,
        );
        Self::from_bytes(&bytes)
    }

    /// 32 fresh random bytes as 64 hex digits: the content of a new master key file.
    pub fn generate_hex() -> Zeroizing<String> {
        Zeroizing::new(hex::encode(*random_key()))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// A fresh data key for `person`, and its wrapped form (nonce, then ciphertext and tag).
    pub fn new_data_key(&self, person: Uuid) -> Result<(DataKey, Vec<u8>), CipherError> {
        let raw = random_key();
        let wrapped = self.wrap(person, &*raw)?;
        Ok((DataKey::from_bytes(&*raw)?, wrapped))
    }

    fn wrap(&self, person: Uuid, raw: &[u8]) -> Result<Vec<u8>, CipherError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = wrap_aad(person);
        let ciphertext = self
            .cipher
            .encrypt(&nonce, Payload { msg: raw, aad: aad.as_bytes() })
            .map_err(|_| CipherError::Malformed("wrapping failed".into()))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&ciphertext);
        Ok(wrapped)
    }

    fn unwrap_raw(&self, person: Uuid, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, CipherError> {
        if wrapped.len() <= NONCE_LEN {
            return Err(CipherError::Malformed("a wrapped key is too short".into()));
        }
        let (nonce, ciphertext) = wrapped.split_at(NONCE_LEN);
        let aad = wrap_aad(person);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: aad.as_bytes() })
            .map(Zeroizing::new)
            .map_err(|_| CipherError::Authentication("person"))
    }

    /// The data key `wrapped` holds for `person`.
    pub fn unwrap_key(&self, person: Uuid, wrapped: &[u8]) -> Result<DataKey, CipherError> {
        DataKey::from_bytes(&self.unwrap_raw(person, wrapped)?)
    }

    /// `wrapped` (by `from`) re-wrapped by this master key; the data key itself is unchanged,
    /// so events sealed with it stay readable.
    pub fn rewrap_from(&self, from: &MasterKey, person: Uuid, wrapped: &[u8]) -> Result<Vec<u8>, CipherError> {
        let raw = from.unwrap_raw(person, wrapped)?;
        self.wrap(person, &raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn personal() -> PersonalData {
        PersonalData { given_name: Some("Ada".into()), text: Some("secret note".into()), ..PersonalData::default() }
    }

    #[test]
    fn sealed_data_opens_only_for_its_event_and_key() {
        let master = MasterKey::from_hex(&MasterKey::generate_hex()).unwrap();
        let person = Uuid::new_v4();
        let (key, wrapped) = master.new_data_key(person).unwrap();
        let event = Uuid::new_v4();
        let sealed = key.seal("k", event, &personal()).unwrap();
        assert!(!sealed.ciphertext.windows(3).any(|w| w == b"Ada"), "no plaintext in the ciphertext");
        assert_eq!(key.open(event, &sealed).unwrap(), personal());
        assert!(matches!(key.open(Uuid::new_v4(), &sealed), Err(CipherError::Authentication(_))));
        let unwrapped = master.unwrap_key(person, &wrapped).unwrap();
        assert_eq!(unwrapped.open(event, &sealed).unwrap(), personal());
        assert!(master.unwrap_key(Uuid::new_v4(), &wrapped).is_err(), "a wrapped key is bound to its person");
        let (other, _) = master.new_data_key(person).unwrap();
        assert!(other.open(event, &sealed).is_err());
        let mut flipped = sealed.clone();
        flipped.ciphertext[0] ^= 1;
        assert!(key.open(event, &flipped).is_err());
    }

    #[test]
    fn personal_data_is_plain_avro_of_its_schema() {
        let full = PersonalData {
            given_name: Some("Ada".into()),
            family_name: Some("Lovelace".into()),
            email: Some("ada@example.org".into()),
            phone: Some("+44 20 7946 0000".into()),
            date_of_birth: chrono::NaiveDate::from_ymd_opt(1815, 12, 10),
            address: Some(callisto_avro::Address {
                line1: "12 St James Square".into(),
                line2: None,
                city: "London".into(),
                postcode: "SW1Y 4JH".into(),
                country: "GB".into(),
            }),
            text: Some("notes".into()),
            reason: None,
        };
        let schema = callisto_avro::schemas::personal_data_schema();
        let bytes = encode_personal(&full).unwrap();
        // What any Avro library writes for the same record, through a resolved generic value.
        let generic = apache_avro::to_value(&full).unwrap().resolve(schema).unwrap();
        assert_eq!(bytes, apache_avro::to_avro_datum(schema, generic).unwrap());
        assert_eq!(decode_personal(&bytes).unwrap(), full);
        assert_eq!(
            decode_personal(&encode_personal(&PersonalData::default()).unwrap()).unwrap(),
            PersonalData::default()
        );
    }

    #[test]
    fn rewrapping_keeps_the_data_key() {
        let old = MasterKey::from_hex(&MasterKey::generate_hex()).unwrap();
        let new = MasterKey::from_hex(&MasterKey::generate_hex()).unwrap();
        assert_ne!(old.id(), new.id());
        let person = Uuid::new_v4();
        let (key, wrapped) = old.new_data_key(person).unwrap();
        let sealed = key.seal("k", Uuid::nil(), &personal()).unwrap();
        let rewrapped = new.rewrap_from(&old, person, &wrapped).unwrap();
        assert!(old.unwrap_key(person, &rewrapped).is_err());
        assert_eq!(new.unwrap_key(person, &rewrapped).unwrap().open(Uuid::nil(), &sealed).unwrap(), personal());
    }
}
