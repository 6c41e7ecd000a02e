//! The RFB handshake parsers on untrusted bytes, split at fuzzer-chosen points: no panics, and an
//! outcome independent of how the bytes were split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use systemvm_proto::rfb::{ClientHandshake, InputFilter, ServerHandshake};

fuzz_target!(|input: (u8, bool, &[u8])| {
    let (split, password, data) = input;
    let split = usize::from(split).max(1);

    let run_client = |chunk: usize| {
        let mut hs = ClientHandshake::new(password.then_some("secret12"), true);
        let mut sent = Vec::new();
        for piece in data.chunks(chunk) {
            match hs.advance(piece) {
                Ok(p) => {
                    sent.extend(p.send);
                    if let Some(done) = p.done {
                        return (sent, Ok(Some(done.server_init)));
                    }
                }
                Err(e) => return (sent, Err(e)),
            }
        }
        (sent, Ok(None))
    };
    // Bytes sent before an error may differ (an error drops the batch it ends); the outcome may not.
    assert_eq!(run_client(split).1, run_client(data.len().max(1)).1);

    let mut server = ServerHandshake::new();
    for piece in data.chunks(split) {
        if server.advance(piece).map(|p| p.done.is_some()).unwrap_or(true) {
            break;
        }
    }

    // The input filter drops input (view-only) and observes it (idle timeout) with one parser:
    // both fail alike, and count the same input events when neither fails.
    let mut filter = InputFilter::default();
    let mut observer = InputFilter::default();
    let mut out = Vec::new();
    let (mut dropped, mut seen) = (0, 0);
    for piece in data.chunks(split) {
        match (filter.filter(piece, &mut out), observer.observe(piece)) {
            (Ok(a), Ok(b)) => {
                dropped += a;
                seen += b;
            }
            (Err(a), Err(b)) => {
                assert_eq!(a, b);
                return;
            }
            (a, b) => panic!("filter and observe disagree: {a:?} vs {b:?}"),
        }
    }
    assert_eq!(dropped, seen);
});
