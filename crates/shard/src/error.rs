//! The shard crate's errors.
//!
//! Storage failures are fatal for the replica that meets them (openraft stops the group); they
//! are never turned into client refusals. Refusals of the metadata rules are not errors at all:
//! they are [`crate::Outcome::Refused`] results, the same on every replica.

/// A failure of the storage engine or of the bytes it returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The engine failed (disk, RocksDB).
    #[error("storage I/O failed: {0}")]
    Io(String),
    /// Bytes on disk do not decode: a bug or a damaged disk.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The data was written in another key layout than this build reads ([`crate::keys::LAYOUT`]).
    #[error("data directory has key layout {found}; this build reads layout {expected}")]
    Layout {
        /// The layout on disk (1: written before layouts were recorded).
        found: u32,
        /// The layout this build reads and writes.
        expected: u32,
    },
}

impl StorageError {
    /// An engine failure.
    pub fn io(message: impl Into<String>) -> Self {
        StorageError::Io(message.into())
    }

    /// Undecodable stored data.
    pub fn corrupt(message: impl Into<String>) -> Self {
        StorageError::Corrupt(message.into())
    }
}

impl From<StorageError> for std::io::Error {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::Io(m) => std::io::Error::other(m),
            StorageError::Corrupt(m) => std::io::Error::new(std::io::ErrorKind::InvalidData, m),
            layout @ StorageError::Layout { .. } => {
                std::io::Error::new(std::io::ErrorKind::InvalidData, layout.to_string())
            }
        }
    }
}
