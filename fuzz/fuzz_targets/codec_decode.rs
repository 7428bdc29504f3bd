//! `codec::decode` on arbitrary bytes: never a panic; what decodes re-encodes to bytes
//! that decode again and are stable under a second round trip; and the hand-written
//! reader of counts and totals reads exactly what bincode reads.
#![no_main]

use crdt_rate_limiter::testing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    assert!(testing::readers_agree(data), "the hand-written reader and bincode disagree");
    if let Some(again) = testing::reencode(data) {
        assert!(again.len() <= crdt_rate_limiter::codec::MAX_DECODE_BYTES);
        let twice = testing::reencode(&again).expect("a re-encoded message decodes");
        assert_eq!(again, twice, "encoding is stable");
    }
});
