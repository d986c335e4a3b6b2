//! What the cargo-fuzz targets (`agent/fuzz`, `controller/fuzz`) share;
//! built only with the `fuzz` feature, never into the daemons.

use prost::Message;

/// Decodes `bytes` as `M`; on success asserts that re-encoding and decoding
/// again gives the same message.
///
/// # Panics
/// When a decoded message does not survive a re-encode: the bug a fuzz
/// target looks for.
pub fn decode<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("re-encoded message decodes");
    assert_eq!(again, m, "re-encode changed the message");
    Some(m)
}
