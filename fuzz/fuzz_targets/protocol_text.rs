//! Text frames into the protocol decoders.
//!
//! Whatever a peer sends: `decode_client` and `decode_server` never panic; a
//! client message that decodes is valid, so its encoding decodes back to the
//! same message (names were trimmed once and stay so); the error event for a
//! refused frame encodes, and never echoes more than a bounded piece of the
//! frame.

#![no_main]

use hubbub_protocol::{Limits, ProtocolError, decode_client, decode_server};
use libfuzzer_sys::fuzz_target;

/// The longest `type` an error echoes back, in characters (the decoder's
/// documented bound).
const MAX_ECHOED_TYPE_CHARS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Tight limits as well as the defaults, so the limit paths are reached
    // with short inputs.
    let tight = Limits {
        max_username_chars: 3,
        max_room_chars: 4,
        max_text_chars: 8,
        max_file_name_chars: 5,
        max_transfer_id_chars: 6,
    };
    for limits in [Limits::default(), tight] {
        match decode_client(text, &limits) {
            Ok(msg) => {
                let encoded = msg.to_json();
                let again = decode_client(&encoded, &limits)
                    .unwrap_or_else(|err| panic!("{encoded} (from {text:?}) no longer decodes: {err}"));
                assert_eq!(again, msg, "round trip changed the message");
                assert!(hubbub_protocol::ClientMessage::TYPES.contains(&msg.kind()));
            }
            Err(err) => {
                if let ProtocolError::UnknownType(kind) = &err {
                    assert!(kind.chars().count() <= MAX_ECHOED_TYPE_CHARS, "unbounded echo");
                }
                let event = err.to_event().to_json();
                assert!(decode_server(&event).is_ok(), "error event {event} does not decode");
            }
        }
    }
    if let Ok(msg) = decode_server(text) {
        let encoded = msg.to_json();
        let again =
            decode_server(&encoded).unwrap_or_else(|err| panic!("{encoded} no longer decodes: {err}"));
        assert_eq!(again, msg, "server message round trip changed it");
    }
});
