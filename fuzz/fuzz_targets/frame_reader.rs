//! The transport's frame reader on an arbitrary stream, cut into reads at arbitrary
//! points: never a panic, never more than one frame plus one read buffered, and the same
//! frames whatever the cuts.
#![no_main]

use crdt_rate_limiter::testing::FrameReader;
use libfuzzer_sys::fuzz_target;

fn read(stream: &[u8], cuts: &[u8]) -> (Vec<u8>, Result<(), String>) {
    let mut reader = FrameReader::default();
    let mut kinds = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let n = (usize::from(cuts.get(i % cuts.len().max(1)).copied().unwrap_or(255)) + 1).min(rest.len());
        i += 1;
        reader.push(&rest[..n]);
        rest = &rest[n..];
        loop {
            match reader.next_frame() {
                Ok(Some(kind)) => kinds.push(kind),
                Ok(None) => break,
                Err(e) => return (kinds, Err(e)),
            }
        }
        assert!(reader.buffered() <= 5 + FrameReader::MAX_FRAME + 256);
    }
    let end = reader.finish();
    (kinds, end)
}

fuzz_target!(|data: &[u8]| {
    // The first byte says how many of the next bytes give the read sizes.
    let Some((&n, rest)) = data.split_first() else { return };
    let (cuts, stream) = rest.split_at(usize::from(n % 16).min(rest.len()));
    let (kinds, end) = read(stream, cuts);
    let (whole, whole_end) = read(stream, &[255]);
    assert_eq!(kinds, whole, "frames do not depend on how the stream was cut");
    assert_eq!(end.is_ok(), whole_end.is_ok());
});
