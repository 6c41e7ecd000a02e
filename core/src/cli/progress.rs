//! The text of the download progress display: bytes done of the total, the rate over the last
//! seconds and the time left, from the percentages `listTemplates` reports.
//!
//! `listTemplates` gives a percentage only; the total comes from the image's size
//! (`Content-Length` of a `HEAD` request to its URL, when the CLI can reach it), and the bytes
//! done are that percentage of it. Without a total the rate and the time left are worked out in
//! percent.
//!
//! Invariants: formatting is pure (no clock, no I/O), so it is tested with made-up samples; the
//! rate is `None` until two samples at least [`MIN_SPAN`] apart exist, and the time left is
//! `None` while the rate is zero or unknown (never an infinite or negative estimate).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::table::format_bytes;

/// Samples older than this (behind the newest) no longer count toward the rate.
pub const WINDOW: Duration = Duration::from_secs(10);
/// The shortest span over which a rate is given.
pub const MIN_SPAN: Duration = Duration::from_millis(500);
/// Time allowed for the `HEAD` request that learns an image's size.
pub const SIZE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Progress samples (when, how far in the meter's unit) over the last [`WINDOW`].
#[derive(Debug, Clone, Default)]
pub struct Meter {
    samples: VecDeque<(Instant, f64)>,
}

impl Meter {
    /// A meter with no samples.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `done` (bytes, or percent when the total is unknown) at `at`. A value below the
    /// last one (a download restarted from the beginning) starts the window afresh.
    pub fn record(&mut self, at: Instant, done: f64) {
        if self.samples.back().is_some_and(|&(_, last)| done < last) {
            self.samples.clear();
        }
        self.samples.push_back((at, done));
        while self
            .samples
            .front()
            .is_some_and(|&(t, _)| at.saturating_duration_since(t) > WINDOW)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
    }

    /// Units per second between the oldest and the newest sample of the window.
    pub fn rate(&self) -> Option<f64> {
        let (&(t0, d0), &(t1, d1)) = (self.samples.front()?, self.samples.back()?);
        let span = t1.saturating_duration_since(t0);
        (span >= MIN_SPAN).then(|| (d1 - d0).max(0.0) / span.as_secs_f64())
    }
}

/// Time left to cover `remaining` units at `rate` units per second.
pub fn eta(remaining: f64, rate: Option<f64>) -> Option<Duration> {
    let rate = rate.filter(|r| r.is_finite() && *r > 0.0)?;
    let secs = (remaining.max(0.0) / rate).ceil();
    // Capped at 100 days: beyond that an estimate means nothing.
    (secs.is_finite() && secs < 8_640_000.0).then(|| Duration::from_secs(secs as u64))
}

/// A duration as the display shows it: `45s`, `3m 05s`, `2h 07m`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The details beside a download's percentage: `12.0 MiB / 100.0 MiB, 2.0 MiB/s, ETA 44s` with
/// a known `total` (bytes), else `1.5%/s, ETA 39s`; `rate` is in bytes (or percent) per second.
/// Parts not known yet are left out; a finished download shows no rate and no time left.
pub fn format_progress(percent: u64, total: Option<u64>, rate: Option<f64>) -> String {
    let percent = percent.min(100);
    let rate = rate.filter(|_| percent < 100);
    let mut parts = Vec::new();
    let remaining = match total {
        Some(total) => {
            let done = total.saturating_mul(percent) / 100;
            parts.push(format!("{} / {}", format_bytes(done), format_bytes(total)));
            if let Some(r) = rate {
                parts.push(format!("{}/s", format_bytes(r.max(0.0) as u64)));
            }
            (total - done) as f64
        }
        None => {
            if let Some(r) = rate {
                parts.push(format!("{r:.1}%/s"));
            }
            (100 - percent) as f64
        }
    };
    if let Some(left) = eta(remaining, rate) {
        parts.push(format!("ETA {}", format_duration(left)));
    }
    parts.join(", ")
}

/// What follows the percentage on a progress line: [`format_progress`]'s details and the
/// template's `status` (cut to `status_width` characters), ` - ` between them. A status that only
/// repeats the percentage (`42% Downloaded`) is left out.
pub fn progress_text(
    percent: u64,
    total: Option<u64>,
    rate: Option<f64>,
    status: &str,
    status_width: usize,
) -> String {
    let details = format_progress(percent, total, rate);
    let status = if status.ends_with("% Downloaded") {
        String::new()
    } else {
        super::table::cut(status.trim(), status_width)
    };
    [details, status]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" - ")
}

/// The units a [`Meter`] counts for a download of `percent` with this `total`: bytes when the
/// total is known, else percent.
pub fn done_units(percent: u64, total: Option<u64>) -> f64 {
    let percent = percent.min(100);
    match total {
        Some(total) => (total.saturating_mul(percent) / 100) as f64,
        None => percent as f64,
    }
}

/// The size of the image at `url` (`Content-Length` of a `HEAD` request), when this machine can
/// reach it within [`SIZE_PROBE_TIMEOUT`]; https is checked against the system CA bundle.
pub async fn probe_size(url: String) -> Option<u64> {
    let https = url.starts_with("https://");
    if !https && !url.starts_with("http://") {
        return None;
    }
    let bundle = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
    let tls = super::client::tls_config(https.then_some(bundle).filter(|b| b.is_file())).ok()?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(SIZE_PROBE_TIMEOUT)
        .build()
        .ok()?;
    let answer = client.head(url).send().await.ok()?;
    if !answer.status().is_success() {
        return None;
    }
    answer
        .headers()
        .get(reqwest::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
        .filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn progress_with_a_total_shows_bytes_rate_and_eta() {
        assert_eq!(format_progress(0, Some(100 * MIB), None), "0 B / 100.0 MiB");
        assert_eq!(
            format_progress(12, Some(100 * MIB), Some(2.0 * MIB as f64)),
            "12.0 MiB / 100.0 MiB, 2.0 MiB/s, ETA 44s"
        );
        assert_eq!(
            format_progress(50, Some(2 * 1024 * MIB), Some(1.0 * MIB as f64)),
            "1.0 GiB / 2.0 GiB, 1.0 MiB/s, ETA 17m 04s"
        );
        // Done: no rate, no time left; a stalled download (rate 0) has no estimate.
        assert_eq!(
            format_progress(100, Some(10 * MIB), Some(MIB as f64)),
            "10.0 MiB / 10.0 MiB"
        );
        assert_eq!(
            format_progress(30, Some(10 * MIB), Some(0.0)),
            "3.0 MiB / 10.0 MiB, 0 B/s"
        );
        // Percentages past 100 are clamped.
        assert_eq!(format_progress(250, Some(1024), None), "1.0 KiB / 1.0 KiB");
    }

    #[test]
    fn progress_without_a_total_works_in_percent() {
        assert_eq!(format_progress(42, None, None), "");
        assert_eq!(format_progress(42, None, Some(1.5)), "1.5%/s, ETA 39s");
        assert_eq!(format_progress(99, None, Some(0.01)), "0.0%/s, ETA 1m 40s");
        assert_eq!(format_progress(100, None, Some(3.0)), "");
    }

    #[test]
    fn progress_text_joins_details_and_status() {
        assert_eq!(
            progress_text(0, None, None, "Waiting for a storage VM", 48),
            "Waiting for a storage VM"
        );
        assert_eq!(
            progress_text(40, Some(100 * MIB), Some(MIB as f64), "40% Downloaded", 48),
            "40.0 MiB / 100.0 MiB, 1.0 MiB/s, ETA 1m 00s"
        );
        assert_eq!(progress_text(40, None, None, "40% Downloaded", 48), "");
        assert_eq!(
            progress_text(100, Some(MIB), None, "Download Complete", 48),
            "1.0 MiB / 1.0 MiB - Download Complete"
        );
        assert_eq!(
            progress_text(7, None, None, "Failed: a very long reason indeed", 12),
            "Failed: a v…"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_secs(59)), "59s");
        assert_eq!(format_duration(Duration::from_secs(185)), "3m 05s");
        assert_eq!(format_duration(Duration::from_secs(7620)), "2h 07m");
        assert_eq!(eta(10.0, Some(4.0)), Some(Duration::from_secs(3)));
        assert_eq!(eta(10.0, None), None);
        assert_eq!(eta(10.0, Some(0.0)), None);
        assert_eq!(eta(10.0, Some(f64::NAN)), None);
        assert_eq!(eta(1e300, Some(1e-300)), None);
        assert_eq!(eta(-5.0, Some(1.0)), Some(Duration::ZERO));
    }

    #[test]
    fn meter_rates_over_the_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut m = Meter::new();
        assert_eq!(m.rate(), None);
        m.record(at(0), 0.0);
        m.record(at(100), 10.0);
        assert_eq!(m.rate(), None, "too short a span for a rate");
        m.record(at(1000), 100.0);
        assert_eq!(m.rate(), Some(100.0));
        // Older samples leave the window: the rate follows the recent speed.
        for s in 2..=30 {
            m.record(at(s * 1000), 100.0 + (s - 1) as f64 * 10.0);
        }
        let r = m.rate().expect("rate");
        assert!((r - 10.0).abs() < 1e-9, "{r}");
        // A restart from zero starts afresh.
        m.record(at(31_000), 5.0);
        assert_eq!(m.rate(), None);
        m.record(at(32_000), 25.0);
        assert_eq!(m.rate(), Some(20.0));
    }

    #[test]
    fn done_units_follow_the_total() {
        assert_eq!(done_units(50, Some(1000)), 500.0);
        assert_eq!(done_units(50, None), 50.0);
        assert_eq!(done_units(200, Some(1000)), 1000.0);
    }
}
