//! The client-chosen id of a chat message, kept exactly as the client spelled
//! it.
//!
//! A `clientMsgId` may be any spelling of a UUID that the `uuid` crate
//! parses: hyphenated or not, upper- or lower-case, braced, or a
//! `urn:uuid:` URN. Clients match acknowledgements by comparing strings
//! (Swift's `uuidString` is upper-case, for one), so the id goes back in
//! `messageAck` and in the room's `chatMessage` as it came. Two spellings of
//! one UUID are still the same id: equality, hashing and the server's
//! de-duplication use the parsed [`Uuid`].

use std::fmt;
use std::hash::{Hash, Hasher};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use uuid::Uuid;

/// A `clientMsgId`: a UUID and the text it was sent as.
///
/// It compares and hashes by its UUID, so `6F1C…` and `{6f1c…}` are equal;
/// [`ClientMsgId::as_str`] gives the spelling back. It holds its text inline
/// (at most [`ClientMsgId::MAX_LEN`] ASCII bytes), so it never allocates.
///
/// ```
/// use hubbub_protocol::ClientMsgId;
///
/// let upper = ClientMsgId::parse("6F1C2A9E-3B0D-4C55-9A57-2F8E4D1B7C10").unwrap();
/// let lower = ClientMsgId::parse("6f1c2a9e3b0d4c559a572f8e4d1b7c10").unwrap();
/// assert_eq!(upper, lower);
/// assert_eq!(upper.as_str(), "6F1C2A9E-3B0D-4C55-9A57-2F8E4D1B7C10");
/// assert_eq!(serde_json::to_string(&upper).unwrap(), r#""6F1C2A9E-3B0D-4C55-9A57-2F8E4D1B7C10""#);
/// assert!(ClientMsgId::parse("not-a-uuid").is_err());
/// ```
#[derive(Clone, Copy)]
pub struct ClientMsgId {
    /// The parsed id: what equality, hashing and de-duplication use.
    uuid: Uuid,
    /// The text as sent, in the first `len` bytes; always ASCII.
    text: [u8; Self::MAX_LEN],
    /// How many bytes of `text` are used.
    len: u8,
}

/// A `clientMsgId` that is not a UUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("clientMsgId must be a UUID")]
pub struct InvalidClientMsgId;

impl ClientMsgId {
    /// Longest spelling a UUID can have: `urn:uuid:` and 36 characters.
    pub const MAX_LEN: usize = 45;

    /// Parses any spelling of a UUID, keeping the spelling.
    pub fn parse(text: &str) -> Result<Self, InvalidClientMsgId> {
        // The length check comes first, so nothing longer is even looked at;
        // every spelling the parser accepts is ASCII and at most MAX_LEN.
        if text.len() > Self::MAX_LEN {
            return Err(InvalidClientMsgId);
        }
        let uuid = Uuid::try_parse(text).map_err(|_| InvalidClientMsgId)?;
        let mut stored = [0; Self::MAX_LEN];
        stored[..text.len()].copy_from_slice(text.as_bytes());
        // The length fits a u8: it was checked against MAX_LEN above.
        Ok(Self { uuid, text: stored, len: text.len() as u8 })
    }

    /// The parsed UUID.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// The id as the client spelled it.
    pub fn as_str(&self) -> &str {
        // Only text that parsed as a UUID is stored, and every spelling of a
        // UUID is ASCII, so these bytes are valid UTF-8.
        std::str::from_utf8(&self.text[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl From<Uuid> for ClientMsgId {
    /// The canonical spelling: lower-case and hyphenated.
    fn from(uuid: Uuid) -> Self {
        let mut text = [0; Self::MAX_LEN];
        let len = uuid.hyphenated().encode_lower(&mut text).len();
        // A hyphenated UUID is 36 bytes, well under MAX_LEN.
        Self { uuid, text, len: len as u8 }
    }
}

impl From<ClientMsgId> for Uuid {
    fn from(id: ClientMsgId) -> Self {
        id.uuid
    }
}

impl PartialEq for ClientMsgId {
    fn eq(&self, other: &Self) -> bool {
        self.uuid == other.uuid
    }
}

impl Eq for ClientMsgId {}

impl Hash for ClientMsgId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.uuid.hash(state);
    }
}

impl fmt::Debug for ClientMsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ClientMsgId").field(&self.as_str()).finish()
    }
}

impl fmt::Display for ClientMsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ClientMsgId {
    type Err = InvalidClientMsgId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl Serialize for ClientMsgId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ClientMsgId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;

        impl Visitor<'_> for IdVisitor {
            type Value = ClientMsgId;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a UUID string")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<ClientMsgId, E> {
                ClientMsgId::parse(text).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(IdVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANONICAL: &str = "6f1c2a9e-3b0d-4c55-9a57-2f8e4d1b7c10";

    #[test]
    fn every_spelling_is_kept_and_all_are_one_id() {
        let canonical = ClientMsgId::parse(CANONICAL).unwrap();
        for spelling in [
            "6F1C2A9E-3B0D-4C55-9A57-2F8E4D1B7C10",
            "{6f1c2a9e-3b0d-4c55-9a57-2f8e4d1b7c10}",
            "urn:uuid:6f1c2a9e-3b0d-4c55-9a57-2f8e4d1b7c10",
            "6f1c2a9e3b0d4c559a572f8e4d1b7c10",
            "6F1C2a9e-3b0d-4c55-9a57-2f8e4d1b7C10",
        ] {
            let id = ClientMsgId::parse(spelling).unwrap();
            assert_eq!(id.as_str(), spelling);
            assert_eq!(id, canonical);
            assert_eq!(id.uuid(), canonical.uuid());
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(json, format!("\"{spelling}\""));
            assert_eq!(serde_json::from_str::<ClientMsgId>(&json).unwrap().as_str(), spelling);
        }
        assert_eq!(ClientMsgId::from(canonical.uuid()).as_str(), CANONICAL);
    }

    #[test]
    fn anything_else_is_refused() {
        let long = format!("{CANONICAL}{}", " ".repeat(100));
        for bad in ["", "not-a-uuid", " 6f1c2a9e-3b0d-4c55-9a57-2f8e4d1b7c10", &long, "é"] {
            assert_eq!(ClientMsgId::parse(bad), Err(InvalidClientMsgId), "{bad:?}");
        }
        for bad in ["42", "null", "[1,2]", r#"{"a":1}"#] {
            assert!(serde_json::from_str::<ClientMsgId>(bad).is_err(), "{bad}");
        }
    }
}
