//! WebSocket frame headers on untrusted bytes: no panics; what parses re-encodes to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use systemvm_proto::ws::{FrameHeader, MAX_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, len))) = FrameHeader::parse(data) {
        let mut buf = [0u8; MAX_HEADER_LEN];
        let n = header.encode(&mut buf);
        assert!(n <= len);
        assert_eq!(FrameHeader::parse(&buf[..n]), Ok(Some((header, n))));
    }
});
