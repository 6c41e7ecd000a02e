//! The NBD client on arbitrary server bytes: the first byte picks where the handshake input ends
//! (the rest of the handshake is a valid server's when it is short), the remainder is fed to the
//! transmission phase, with a read and a block status in flight, in pieces the second byte sizes.
//! Decoded chunks always lie inside their request.
#![no_main]

use bytes::{BufMut as _, BytesMut};
use libfuzzer_sys::fuzz_target;
use systemvm_nbd::{Chunk, ClientHandshake, Export, Request, Transmission};

fn export() -> Export {
    Export {
        size: 1 << 20,
        flags: 1,
        block_sizes: Some((1, 4096, 1 << 16)),
        structured: true,
        contexts: vec![(1, "base:allocation".into()), (2, "qemu:dirty-bitmap:b".into())],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let Some((&piece, rest)) = rest.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(rest.len());
    let mut h = ClientHandshake::new("vda", &["base:allocation"]);
    let mut greeting = BytesMut::new();
    greeting.put_u64(systemvm_nbd::INIT_MAGIC);
    greeting.put_u64(systemvm_nbd::OPT_MAGIC);
    greeting.put_u16(3);
    let _ = h.feed(&greeting).and_then(|_| h.feed(&rest[..cut]));
    let _ = h.take_output();

    let mut t = Transmission::new(export());
    let Ok((read, _)) = t.request(Request::Read { offset: 4096, len: 8192 }) else {
        return;
    };
    let _ = t.request(Request::BlockStatus { offset: 0, len: 1 << 20 });
    let piece = usize::from(piece).max(1);
    for part in rest[cut..].chunks(piece) {
        match t.feed(part) {
            Ok(replies) => {
                for r in replies {
                    if let (Some(Chunk::Data { offset, data }), true) = (&r.chunk, r.cookie == read) {
                        assert!(*offset >= 4096 && offset + data.len() as u64 <= 4096 + 8192);
                    }
                }
            }
            Err(_) => return,
        }
    }
});
