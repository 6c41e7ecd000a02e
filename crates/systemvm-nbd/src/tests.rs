use proptest::prelude::*;

use super::*;

fn greeting() -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u64(INIT_MAGIC);
    b.put_u64(OPT_MAGIC);
    b.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    b.to_vec()
}

fn rep(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u64(REP_MAGIC);
    b.put_u32(option);
    b.put_u32(kind);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.to_vec()
}

fn info_export(size: u64) -> Vec<u8> {
    let mut d = BytesMut::new();
    d.put_u16(INFO_EXPORT);
    d.put_u64(size);
    d.put_u16(1 | 2);
    rep(OPT_GO, REP_INFO, &d)
}

fn context(id: u32, name: &str) -> Vec<u8> {
    let mut d = BytesMut::new();
    d.put_u32(id);
    d.put_slice(name.as_bytes());
    rep(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &d)
}

/// A server's whole side of a handshake agreeing to `base:allocation` as context 1.
fn server_side(size: u64) -> Vec<u8> {
    [
        greeting(),
        rep(OPT_STRUCTURED_REPLY, REP_ACK, &[]),
        context(1, "base:allocation"),
        rep(OPT_SET_META_CONTEXT, REP_ACK, &[]),
        info_export(size),
        rep(OPT_GO, REP_ACK, &[]),
    ]
    .concat()
}

fn export(size: u64) -> Export {
    let mut h = ClientHandshake::new("vda", &["base:allocation"]);
    h.feed(&server_side(size)).unwrap().unwrap()
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(cookie);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.to_vec()
}

#[test]
fn handshake_negotiates_structured_replies_contexts_and_go() {
    let mut h = ClientHandshake::new("vda", &["base:allocation"]);
    assert_eq!(h.feed(&greeting()[..10]).unwrap(), None);
    assert!(h.take_output().is_empty(), "nothing before the whole greeting");
    assert_eq!(h.feed(&greeting()[10..]).unwrap(), None);
    let out = h.take_output();
    // Client flags, then NBD_OPT_STRUCTURED_REPLY.
    assert_eq!(&out[..4], &[0, 0, 0, 3]);
    assert_eq!(&out[4..12], &OPT_MAGIC.to_be_bytes());
    assert_eq!(&out[12..16], &OPT_STRUCTURED_REPLY.to_be_bytes());
    assert_eq!(h.feed(&rep(OPT_STRUCTURED_REPLY, REP_ACK, &[])).unwrap(), None);
    let out = h.take_output();
    assert_eq!(&out[8..12], &OPT_SET_META_CONTEXT.to_be_bytes());
    assert!(out.windows(15).any(|w| w == b"base:allocation"));
    h.feed(&context(7, "base:allocation")).unwrap();
    h.feed(&rep(OPT_SET_META_CONTEXT, REP_ACK, &[])).unwrap();
    let out = h.take_output();
    assert_eq!(&out[8..12], &OPT_GO.to_be_bytes());
    let mut bs = BytesMut::new();
    bs.put_u16(INFO_BLOCK_SIZE);
    bs.put_u32(1);
    bs.put_u32(4096);
    bs.put_u32(32 << 20);
    h.feed(&rep(OPT_GO, REP_INFO, &bs)).unwrap();
    h.feed(&info_export(1 << 30)).unwrap();
    let e = h.feed(&rep(OPT_GO, REP_ACK, &[])).unwrap().unwrap();
    assert_eq!(e.size, 1 << 30);
    assert!(e.structured);
    assert_eq!(e.context("base:allocation"), Some(7));
    assert_eq!(e.block_sizes, Some((1, 4096, 32 << 20)));
    assert_eq!(e.max_read(), 32 << 20);
}

#[test]
fn handshake_refusals_are_errors() {
    let mut h = ClientHandshake::new("vda", &["qemu:dirty-bitmap:b"]);
    h.feed(&greeting()).unwrap();
    h.feed(&rep(OPT_STRUCTURED_REPLY, REP_ACK, &[])).unwrap();
    // The server knows no such context: an ACK without it.
    let e = h.feed(&rep(OPT_SET_META_CONTEXT, REP_ACK, &[])).unwrap_err();
    assert!(matches!(e, NbdError::Refused { .. }), "{e}");

    let mut h = ClientHandshake::new("nope", &[]);
    h.feed(&greeting()).unwrap();
    h.feed(&rep(OPT_STRUCTURED_REPLY, REP_ACK, &[])).unwrap();
    let e = h
        .feed(&rep(OPT_GO, (1 << 31) + 6, b"unknown export"))
        .unwrap_err();
    assert!(e.to_string().contains("unknown export"), "{e}");

    let mut h = ClientHandshake::new("vda", &[]);
    assert!(h.feed(&[0u8; 18]).is_err(), "not NBD");
    let mut h = ClientHandshake::new("vda", &[]);
    h.feed(&greeting()).unwrap();
    h.feed(&rep(OPT_STRUCTURED_REPLY, REP_ACK, &[])).unwrap();
    assert!(h.feed(&rep(OPT_GO, REP_ACK, &[])).is_err(), "GO without a size");
    let mut h = ClientHandshake::new("vda", &[]);
    h.feed(&greeting()).unwrap();
    let mut huge = rep(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    huge[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(
        h.feed(&huge).is_err(),
        "a huge option reply is refused before buffering"
    );
}

#[test]
fn reads_holes_and_block_status_decode() {
    let mut t = Transmission::new(export(1 << 20));
    let (read, bytes) = t
        .request(Request::Read {
            offset: 4096,
            len: 8192,
        })
        .unwrap();
    assert_eq!(bytes.len(), 28);
    let (status, _) = t
        .request(Request::BlockStatus {
            offset: 0,
            len: 1 << 20,
        })
        .unwrap();
    let mut data = BytesMut::new();
    data.put_u64(4096);
    data.put_slice(&[7u8; 4096]);
    let mut hole = BytesMut::new();
    hole.put_u64(8192);
    hole.put_u32(4096);
    let mut bs = BytesMut::new();
    bs.put_u32(1);
    for (l, f) in [(65536u32, 0u32), ((1 << 20) - 65536, STATE_HOLE | STATE_ZERO)] {
        bs.put_u32(l);
        bs.put_u32(f);
    }
    let stream = [
        chunk(0, REPLY_OFFSET_DATA, read, &data),
        chunk(REPLY_FLAG_DONE, REPLY_OFFSET_HOLE, read, &hole),
        chunk(REPLY_FLAG_DONE, REPLY_BLOCK_STATUS, status, &bs),
    ]
    .concat();
    let mut replies = Vec::new();
    for piece in stream.chunks(7) {
        replies.extend(t.feed(piece).unwrap());
    }
    assert_eq!(replies.len(), 3);
    assert!(matches!(&replies[0].chunk, Some(Chunk::Data { offset: 4096, data }) if data.len() == 4096));
    assert_eq!(
        replies[1].chunk,
        Some(Chunk::Hole {
            offset: 8192,
            len: 4096
        })
    );
    assert!(replies[1].done);
    let Some(Chunk::BlockStatus { context, extents }) = &replies[2].chunk else {
        panic!("{replies:?}");
    };
    assert_eq!(*context, 1);
    assert_eq!(
        extents_from(0, 1 << 20, extents),
        vec![(0, 65536, 0), (65536, (1 << 20) - 65536, 3)]
    );
    assert_eq!(t.in_flight(), 0);
}

#[test]
fn replies_outside_their_request_are_errors() {
    let mut t = Transmission::new(export(1 << 20));
    let (read, _) = t.request(Request::Read { offset: 0, len: 4096 }).unwrap();
    let mut data = BytesMut::new();
    data.put_u64(4000);
    data.put_slice(&[0u8; 200]);
    assert!(
        t.feed(&chunk(REPLY_FLAG_DONE, REPLY_OFFSET_DATA, read, &data))
            .is_err()
    );

    let mut t = Transmission::new(export(1 << 20));
    assert!(
        t.feed(&chunk(REPLY_FLAG_DONE, REPLY_NONE, 99, &[])).is_err(),
        "unknown cookie"
    );
    let mut t = Transmission::new(export(1 << 20));
    let (status, _) = t.request(Request::BlockStatus { offset: 0, len: 4096 }).unwrap();
    let mut bs = BytesMut::new();
    bs.put_u32(9);
    bs.put_u32(4096);
    bs.put_u32(0);
    assert!(
        t.feed(&chunk(REPLY_FLAG_DONE, REPLY_BLOCK_STATUS, status, &bs))
            .is_err(),
        "unknown context"
    );
    let mut t = Transmission::new(export(1 << 20));
    assert!(
        t.request(Request::Read {
            offset: 1 << 20,
            len: 1
        })
        .is_err(),
        "past the end"
    );
    assert!(
        t.request(Request::Read {
            offset: 0,
            len: MAX_READ + 1
        })
        .is_err()
    );
    let mut t = Transmission::new(export(1 << 20));
    let (read, _) = t.request(Request::Read { offset: 0, len: 4096 }).unwrap();
    let mut big = chunk(REPLY_FLAG_DONE, REPLY_OFFSET_DATA, read, &[]);
    big[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(t.feed(&big).is_err(), "a huge chunk is refused before buffering");
}

#[test]
fn server_errors_and_simple_replies() {
    let mut t = Transmission::new(export(1 << 20));
    let (read, _) = t.request(Request::Read { offset: 0, len: 16 }).unwrap();
    let mut err = BytesMut::new();
    err.put_u32(5);
    err.put_u16(4);
    err.put_slice(b"oops");
    let r = t.feed(&chunk(REPLY_FLAG_DONE, REPLY_ERROR, read, &err)).unwrap();
    assert_eq!(
        r[0].chunk,
        Some(Chunk::Error {
            code: 5,
            message: "oops".into()
        })
    );
    let (read, _) = t.request(Request::Read { offset: 16, len: 16 }).unwrap();
    let mut simple = BytesMut::new();
    simple.put_u32(SIMPLE_REPLY_MAGIC);
    simple.put_u32(0);
    simple.put_u64(read);
    simple.put_slice(&[1u8; 16]);
    let r = t.feed(&simple).unwrap();
    assert!(matches!(&r[0].chunk, Some(Chunk::Data { offset: 16, data }) if data.len() == 16));
    assert!(r[0].done);
}

proptest! {
    /// Whatever a server sends, in whatever pieces, the handshake and the reply decoder return
    /// (an error or progress) and never panic.
    #[test]
    fn arbitrary_server_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512), cut in 0usize..512) {
        let cut = cut.min(data.len());
        let mut h = ClientHandshake::new("vda", &["base:allocation"]);
        let _ = h.feed(&data[..cut]).and_then(|_| h.feed(&data[cut..]));
        let mut with_greeting = server_side(1 << 20);
        with_greeting.truncate(cut.min(with_greeting.len()));
        with_greeting.extend_from_slice(&data);
        let mut h = ClientHandshake::new("vda", &["base:allocation"]);
        let _ = h.feed(&with_greeting);
        let mut t = Transmission::new(export(1 << 20));
        let _ = t.request(Request::Read { offset: 0, len: 4096 });
        let _ = t.request(Request::BlockStatus { offset: 0, len: 1 << 20 });
        let _ = t.feed(&data[..cut]).and_then(|_| t.feed(&data[cut..]));
    }

    /// A valid reply stream decodes the same however it is split.
    #[test]
    fn replies_decode_the_same_in_any_pieces(sizes in proptest::collection::vec(1usize..64, 1..40)) {
        let whole = {
            let mut t = Transmission::new(export(1 << 20));
            let (read, _) = t.request(Request::Read { offset: 0, len: 1024 }).unwrap();
            let mut d = BytesMut::new();
            d.put_u64(0);
            d.put_slice(&[9u8; 1024]);
            let stream = chunk(REPLY_FLAG_DONE, REPLY_OFFSET_DATA, read, &d);
            (t, stream)
        };
        let (mut t, stream) = whole;
        let mut got = Vec::new();
        let mut at = 0;
        for s in sizes.iter().cycle() {
            if at >= stream.len() {
                break;
            }
            let end = (at + s).min(stream.len());
            got.extend(t.feed(&stream[at..end]).unwrap());
            at = end;
        }
        prop_assert_eq!(got.len(), 1);
        prop_assert!(got[0].done);
        prop_assert_eq!(t.in_flight(), 0);
    }
}
