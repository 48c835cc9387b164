//! Gossip packets sealed with the cluster key: XChaCha20-Poly1305, a fresh
//! random 24-byte nonce per packet (large enough that random nonces never
//! repeat in practice), the format version as associated data.
//!
//! The key is derived (HKDF-SHA256) from secret material every member holds
//! and no outsider does, so a node of another cluster, or anyone on the
//! network, can neither read gossip nor inject it: its packets fail to open
//! and are dropped and counted by the caller. Replaying an old packet is
//! harmless: SWIM ignores stale incarnations and metadata versions.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;

/// The sealed packet format's version, the first byte of every packet.
const SEAL_VERSION: u8 = 1;
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;

/// Bytes a sealed packet carries beyond its plaintext.
pub const SEAL_OVERHEAD: usize = 1 + NONCE_BYTES + TAG_BYTES;

/// Seals and opens gossip packets with one cluster's key.
#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("packet too short to be sealed")]
    TooShort,
    #[error("packet format version {0} is not {SEAL_VERSION}")]
    Version(u8),
    #[error("packet does not authenticate under the cluster key")]
    Forged,
}

impl Sealer {
    /// The sealer for the cluster whose members hold `secret`.
    pub fn from_secret(secret: &[u8]) -> Sealer {
        let hkdf = Hkdf::<Sha256>::new(Some(b"hivemind gossip"), secret);
        let mut key = [0u8; 32];
        hkdf.expand(b"xchacha20poly1305 key v1", &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Sealer {
            cipher: XChaCha20Poly1305::new(&key.into()),
        }
    }

    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &[SEAL_VERSION],
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for gossip-sized packets");
        let mut packet = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
        packet.push(SEAL_VERSION);
        packet.extend_from_slice(&nonce);
        packet.extend_from_slice(&sealed);
        packet
    }

    pub fn open(&self, packet: &[u8]) -> Result<Vec<u8>, OpenError> {
        if packet.len() < SEAL_OVERHEAD {
            return Err(OpenError::TooShort);
        }
        if packet[0] != SEAL_VERSION {
            return Err(OpenError::Version(packet[0]));
        }
        let (nonce, sealed) = packet[1..].split_at(NONCE_BYTES);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &[SEAL_VERSION],
                },
            )
            .map_err(|_| OpenError::Forged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sealed packet opens under the same secret and carries the plaintext.
    #[test]
    fn a_sealed_packet_opens_with_the_same_key() {
        let sealer = Sealer::from_secret(b"cluster one");
        let packet = sealer.seal(b"hello");
        assert_eq!(packet.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(sealer.open(&packet).unwrap(), b"hello");
    }

    /// Another cluster's key, a flipped bit, a short or re-versioned packet
    /// are all refused.
    #[test]
    fn foreign_or_damaged_packets_are_refused() {
        let sealer = Sealer::from_secret(b"cluster one");
        let other = Sealer::from_secret(b"cluster two");
        let packet = sealer.seal(b"hello");
        assert_eq!(other.open(&packet), Err(OpenError::Forged));
        let mut flipped = packet.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(sealer.open(&flipped), Err(OpenError::Forged));
        assert_eq!(sealer.open(&packet[..10]), Err(OpenError::TooShort));
        let mut versioned = packet;
        versioned[0] = 9;
        assert_eq!(sealer.open(&versioned), Err(OpenError::Version(9)));
    }
}
