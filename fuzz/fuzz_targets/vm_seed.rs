//! A system VM's config-drive `user-data` and a kernel command line, both arbitrary: the image's
//! parser never panics, framed with its `#cloud-config` header or not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (cmdline, user_data) = match data.iter().position(|b| *b == 0) {
        Some(i) => (String::from_utf8_lossy(&data[..i]).into_owned(), &data[i + 1..]),
        None => (String::new(), data),
    };
    if let Err(e) = systemvm_proto::seed::parse(user_data, &cmdline) {
        let _ = e.to_string();
    }
    let mut framed = b"#cloud-config\n".to_vec();
    framed.extend_from_slice(user_data);
    let _ = systemvm_proto::seed::parse(&framed, &cmdline);
});
