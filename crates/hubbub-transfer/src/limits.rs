//! The configurable bounds on file uploads.

use serde::{Deserialize, Serialize};

/// The bounds every upload is checked against.
///
/// Deserializes from a config section in which every field is optional (the
/// defaults below fill the gaps) and unknown fields are refused. Check a
/// configured value with [`TransferLimits::validate`] before using it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferLimits {
    /// Largest file accepted, in bytes. Default 100 MiB.
    pub max_file_size: u64,
    /// Chunk size of an upload whose `fileStart` names none. Default 65,536,
    /// the chunk size of the tutorial's uploader.
    pub default_chunk_size: u32,
    /// Smallest chunk size an upload may ask for. Default 4,096. An upload
    /// keeps 8 bytes of bookkeeping per chunk, so this bounds that memory at
    /// `8 * max_file_size / min_chunk_size` (200 KiB with the defaults).
    pub min_chunk_size: u32,
    /// Largest chunk size an upload may ask for. Default 65,536. A chunk frame
    /// is [`TransferLimits::max_frame_len`] bytes long and must fit within the
    /// server's maximum WebSocket message size.
    pub max_chunk_size: u32,
}

impl Default for TransferLimits {
    fn default() -> Self {
        Self {
            max_file_size: 100 * 1024 * 1024,
            default_chunk_size: 65_536,
            min_chunk_size: 4096,
            max_chunk_size: 65_536,
        }
    }
}

/// Why a [`TransferLimits`] value is unusable. Reported at startup, so the
/// messages name the config fields.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// `min_chunk_size` is zero.
    #[error("min_chunk_size must be at least 1 byte")]
    ZeroMinChunkSize,
    /// `min_chunk_size` is above `max_chunk_size`.
    #[error("min_chunk_size ({min}) must not be larger than max_chunk_size ({max})")]
    MinAboveMax {
        /// The configured `min_chunk_size`.
        min: u32,
        /// The configured `max_chunk_size`.
        max: u32,
    },
    /// `default_chunk_size` is outside `min_chunk_size..=max_chunk_size`.
    #[error(
        "default_chunk_size ({default}) must be between min_chunk_size ({min}) and max_chunk_size ({max})"
    )]
    DefaultOutOfRange {
        /// The configured `default_chunk_size`.
        default: u32,
        /// The configured `min_chunk_size`.
        min: u32,
        /// The configured `max_chunk_size`.
        max: u32,
    },
    /// A file of `max_file_size` bytes in `min_chunk_size` chunks would need
    /// more chunks than a 32-bit chunk index can number.
    #[error(
        "max_file_size ({max_file_size}) needs more than 4,294,967,295 chunks of min_chunk_size ({min_chunk_size}) bytes"
    )]
    TooManyChunks {
        /// The configured `max_file_size`.
        max_file_size: u64,
        /// The configured `min_chunk_size`.
        min_chunk_size: u32,
    },
}

impl TransferLimits {
    /// Checks that the limits are consistent: chunk size bounds in order, the
    /// default between them, and every allowed upload numberable with a
    /// 32-bit chunk index.
    ///
    /// ```
    /// use hubbub_transfer::{LimitsError, TransferLimits};
    ///
    /// assert_eq!(TransferLimits::default().validate(), Ok(()));
    /// let odd = TransferLimits { default_chunk_size: 1024, ..TransferLimits::default() };
    /// assert!(matches!(odd.validate(), Err(LimitsError::DefaultOutOfRange { .. })));
    /// ```
    pub fn validate(&self) -> Result<(), LimitsError> {
        let (min, max, default) = (self.min_chunk_size, self.max_chunk_size, self.default_chunk_size);
        if min == 0 {
            return Err(LimitsError::ZeroMinChunkSize);
        }
        if min > max {
            return Err(LimitsError::MinAboveMax { min, max });
        }
        if !(min..=max).contains(&default) {
            return Err(LimitsError::DefaultOutOfRange { default, min, max });
        }
        if self.max_file_size.div_ceil(u64::from(min)) > u64::from(u32::MAX) {
            return Err(LimitsError::TooManyChunks {
                max_file_size: self.max_file_size,
                min_chunk_size: min,
            });
        }
        Ok(())
    }

    /// The longest binary chunk frame these limits allow: the chunk index
    /// header plus `max_chunk_size`. The server's maximum message size must
    /// be at least this.
    pub fn max_frame_len(&self) -> usize {
        // A u32 always fits a usize on the 32- and 64-bit targets we support.
        hubbub_protocol::chunk::HEADER_LEN.saturating_add(self.max_chunk_size as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented() {
        let l = TransferLimits::default();
        assert_eq!(l.validate(), Ok(()));
        assert_eq!(l.max_file_size, 104_857_600);
        assert_eq!((l.default_chunk_size, l.min_chunk_size, l.max_chunk_size), (65_536, 4096, 65_536));
        assert_eq!(l.max_frame_len(), 65_540);
    }

    #[test]
    fn inconsistent_limits_are_refused() {
        let d = TransferLimits::default();
        let zero = TransferLimits { min_chunk_size: 0, ..d.clone() };
        assert_eq!(zero.validate(), Err(LimitsError::ZeroMinChunkSize));
        let inverted = TransferLimits { min_chunk_size: 8192, max_chunk_size: 4096, ..d.clone() };
        assert_eq!(inverted.validate(), Err(LimitsError::MinAboveMax { min: 8192, max: 4096 }));
        let high = TransferLimits { default_chunk_size: 65_537, ..d.clone() };
        assert_eq!(
            high.validate(),
            Err(LimitsError::DefaultOutOfRange { default: 65_537, min: 4096, max: 65_536 })
        );
        let huge = TransferLimits { max_file_size: u64::MAX, ..d };
        assert_eq!(
            huge.validate(),
            Err(LimitsError::TooManyChunks { max_file_size: u64::MAX, min_chunk_size: 4096 })
        );
    }

    #[test]
    fn config_fills_defaults_and_refuses_unknown_fields() {
        let l: TransferLimits = serde_json::from_str(r#"{"max_file_size": 1024}"#).unwrap();
        assert_eq!(l, TransferLimits { max_file_size: 1024, ..TransferLimits::default() });
        let typo = serde_json::from_str::<TransferLimits>(r#"{"max_file_sise": 1024}"#);
        assert!(typo.unwrap_err().to_string().contains("unknown field"));
        let back: TransferLimits = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
    }
}
