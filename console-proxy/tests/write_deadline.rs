//! Writes toward the browser have a deadline: a browser that stops reading while QEMU's VNC server
//! keeps sending (its socket buffers full) is dropped once a write has waited for the write
//! timeout, while a healthy session next to it keeps its screen updates and keep-alive pings.
mod common;

use std::time::{Duration, Instant};

use common::{Rfb, claims, start_proxy, wait_until, ws_url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_that_stops_reading_is_dropped_within_the_write_timeout() {
    let limit = Duration::from_secs(2);
    let (proxy, keys) = start_proxy(|c| {
        c.write_timeout = limit;
        c.keepalive = Duration::from_secs(1);
    })
    .await;
    let mut healthy = Rfb::open(&ws_url(proxy.addr, &keys, &claims())).await.unwrap();
    let mut stalled = Rfb::open(&ws_url(proxy.addr, &keys, &claims())).await.unwrap();
    assert_eq!(proxy.active_sessions(), 2);

    // The stalled browser asks for whole screens (about 1 MiB each) and reads none of them.
    let started = Instant::now();
    let request = stalled.full_request();
    let stall = async {
        while proxy.active_sessions() == 2 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the stalled session was never dropped"
            );
            // Its own writes may block once the proxy is gone or stuck: bounded.
            let _ = tokio::time::timeout(Duration::from_millis(200), stalled.send(&request)).await;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        started.elapsed()
    };
    // Meanwhile the healthy one keeps reading screens (and answering pings).
    let read_on = async {
        let mut frames = 0;
        while started.elapsed() < limit * 3 {
            healthy.frame().await.expect("the healthy session kept working");
            frames += 1;
        }
        frames
    };
    let (took, frames) = tokio::join!(stall, read_on);
    println!("stalled session dropped after {took:?}; healthy session read {frames} screens");
    assert!(
        took >= limit,
        "dropped after {took:?}, before the write timeout of {limit:?}"
    );
    assert!(
        took <= limit + Duration::from_secs(6),
        "dropped after {took:?}; the write timeout is {limit:?}"
    );

    // The healthy session is still open, gets pings, and answers.
    let pings_before = healthy.pings;
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(2500) {
        healthy.frame().await.expect("the healthy session is still open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        healthy.pings > pings_before,
        "no keep-alive ping in 2.5 s with a 1 s interval"
    );
    assert_eq!(proxy.active_sessions(), 1);
    healthy.close().await;
    wait_until(Duration::from_secs(5), "the healthy session did not end", || {
        proxy.active_sessions() == 0
    })
    .await;
    proxy.shutdown().await;
}
