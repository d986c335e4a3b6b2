//! What every request fuzz target shares.

use prost::Message;

/// Decodes `bytes` as `M`; on success asserts that re-encoding and decoding
/// again gives the same message.
pub fn decode<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("re-encoded message decodes");
    assert_eq!(again, m, "re-encode changed the message");
    Some(m)
}
