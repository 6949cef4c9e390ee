//! One Kafka record value as the codec sees it: the same bytes decoded as a JSON scan and as a
//! protobuf scan; a decoded scan goes through the validator's invariants (see `common`), an
//! error must carry its stable code.

#![no_main]

use libfuzzer_sys::fuzz_target;
use scand::proto::codec::{self, Encoding};

mod common;

fuzz_target!(|data: &[u8]| {
    for (encoding, error_code) in [
        (Encoding::Json, "json_decode"),
        (Encoding::Protobuf, "protobuf_decode"),
    ] {
        match codec::decode(data, encoding) {
            Ok(scan) => {
                let _ = common::check_scan(&scan);
            }
            Err(error) => {
                let code = error.code();
                common::check_code(code);
                let expected = if data.is_empty() { "empty" } else { error_code };
                assert_eq!(code, expected, "{encoding:?}: {error}");
                assert!(!error.to_string().is_empty());
            }
        }
    }
});
