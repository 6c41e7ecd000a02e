//! The storage VM's upload request path on arbitrary bytes: the first line as the upload
//! headers (ticket and signature check), the tus headers and a Range header; the rest as a
//! multipart body in chunks whose size the first body byte picks, read to its end.
#![no_main]

use std::future::Future as _;
use std::sync::LazyLock;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use systemvm_proto::console::KeySet;
use systemvm_proto::transfer::{ExtractLink, UploadTicket};
use systemvm_transfer::multipart::FilePart;
use systemvm_transfer::{range, tus, upload_headers};

static KEYS: LazyLock<KeySet> = LazyLock::new(|| {
    KeySet::from_json(r#"{"primary":1,"keys":[{"id":1,"key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}]}"#)
        .expect("key set")
});

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (head, body) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let text = String::from_utf8_lossy(head);
    let _ = tus::metadata(&text);
    let _ = tus::number("Upload-Offset", Some(&text));
    let _ = tus::check_version(Some(&text));
    if let range::Range::Part { start, end } = range::parse(Some(&text), body.len() as u64) {
        assert!(start <= end && (end as usize) < body.len());
    }
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(head) {
        for name in ["x-metadata", "x-signature", "x-expires"] {
            headers.insert(name, v.clone());
        }
    }
    let h = upload_headers(&headers);
    assert!(UploadTicket::open(&KEYS, "id", &h.metadata, &h.signature, &h.expires, 0).is_err());
    assert!(ExtractLink::open(&KEYS, &text, 0).is_none());

    let chunk = usize::from(body.first().copied().unwrap_or(0)) + 1;
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        body.chunks(chunk).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let mut part = FilePart::new(futures_util::stream::iter(chunks), "XyZ".to_owned());
    let mut read = std::pin::pin!(async move {
        let mut total = 0usize;
        while let Ok(Some(c)) = part.next_chunk().await {
            total += c.len();
        }
        total
    });
    let mut cx = Context::from_waker(Waker::noop());
    // The stream is always ready: the future ends without ever waiting.
    for _ in 0..1_000_000 {
        if let Poll::Ready(total) = read.as_mut().poll(&mut cx) {
            assert!(total <= body.len());
            return;
        }
    }
    panic!("the multipart reader did not finish on an in-memory body");
});
