//! `rfb-bench`: how fast full Raw framebuffer updates reach an RFB client, directly over TCP or
//! through a WebSocket relay (console-proxy, websockify). See `docs/benchmarks.md`.
//!
//! The client asks for a non-incremental full-screen update, reads it whole, and asks again. Raw
//! payloads are read straight from the socket (or from WebSocket frames) into one buffer allocated
//! once, so the client costs little more than the kernel's copy.
#![forbid(unsafe_code)]

mod cpu;
mod rfb;
mod ws;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;

use crate::rfb::{Client, MsgReader};

#[derive(Parser)]
#[command(
    version,
    about = "Raw RFB framebuffer throughput, directly or through a WebSocket relay"
)]
struct Cli {
    /// `tcp://HOST:PORT` (RFB directly) or `ws://HOST:PORT/PATH?QUERY` (RFB in binary WebSocket frames).
    url: String,
    /// Frames measured.
    #[arg(long, default_value_t = 200)]
    frames: u32,
    /// Frames read before measuring.
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// VNC password, used when the server offers VNC Authentication.
    #[arg(long, env = "RFB_BENCH_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Print one JSON line instead of text: mbps (10^6 bytes of RFB stream per second), fps, bytes,
    /// secs, width, height, frames, partial (frames not covering the screen) and cpu (cores busy:
    /// client, each --cpu-pid label, host = the whole machine).
    #[arg(long)]
    json: bool,
    /// Also report the CPU use of process PID and its descendants during the measured window, as
    /// LABEL=PID (repeatable).
    #[arg(long = "cpu-pid", value_parser = parse_cpu_pid)]
    cpu_pids: Vec<(String, u32)>,
    /// Seconds to wait for the server on any read before giving up.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

/// Where to connect.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Tcp { addr: String },
    Ws { addr: String, path_query: String },
}

fn parse_url(url: &str) -> anyhow::Result<Target> {
    if let Some(addr) = url.strip_prefix("tcp://") {
        let addr = addr.trim_end_matches('/');
        ensure!(
            addr.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
            "{url}: expected tcp://HOST:PORT"
        );
        return Ok(Target::Tcp {
            addr: addr.to_owned(),
        });
    }
    if let Some(rest) = url.strip_prefix("ws://") {
        let (addr, path_query) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        ensure!(
            addr.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
            "{url}: expected ws://HOST:PORT/PATH"
        );
        return Ok(Target::Ws {
            addr: addr.to_owned(),
            path_query,
        });
    }
    if url.starts_with("wss://") {
        bail!("{url}: wss:// is not supported; benchmark the relay over ws://");
    }
    bail!("{url}: expected tcp://HOST:PORT or ws://HOST:PORT/PATH?QUERY")
}

fn parse_cpu_pid(s: &str) -> Result<(String, u32), String> {
    let (label, pid) = s.split_once('=').ok_or("expected LABEL=PID")?;
    if label.is_empty()
        || !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err("LABEL must be letters, digits, '-' or '_'".into());
    }
    Ok((label.to_owned(), pid.parse().map_err(|_| "PID must be a number")?))
}

/// The measured window.
#[derive(Debug)]
struct Report {
    width: u16,
    height: u16,
    frames: u32,
    /// Frames whose Raw pixels did not cover the whole screen.
    partial: u32,
    bytes: u64,
    secs: f64,
    /// CPU use in cores, by label ("client" is this process, "host" the whole machine).
    cpu: Vec<(String, f64)>,
}

impl Report {
    fn mbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
    fn fps(&self) -> f64 {
        f64::from(self.frames) / self.secs
    }
    fn json(&self) -> String {
        let mut cpu = String::new();
        for (i, (label, v)) in self.cpu.iter().enumerate() {
            let _ = write!(cpu, "{}\"{label}\":{v:.3}", if i > 0 { "," } else { "" });
        }
        format!(
            "{{\"mbps\":{:.1},\"fps\":{:.2},\"bytes\":{},\"secs\":{:.4},\"width\":{},\"height\":{},\"frames\":{},\"partial\":{},\"cpu\":{{{cpu}}}}}",
            self.mbps(),
            self.fps(),
            self.bytes,
            self.secs,
            self.width,
            self.height,
            self.frames,
            self.partial
        )
    }
}

fn connect(addr: &str, timeout: Duration) -> anyhow::Result<TcpStream> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr}"))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e).with_context(|| format!("cannot connect to {addr}")),
        None => bail!("{addr} resolves to no address"),
    }
}

fn run(cli: &Cli) -> anyhow::Result<Report> {
    ensure!(cli.frames > 0, "--frames must be at least 1");
    let timeout = Duration::from_secs(cli.timeout.max(1));
    let password = cli.password.as_deref();
    match parse_url(&cli.url)? {
        Target::Tcp { addr } => {
            let stream = connect(&addr, timeout)?;
            let reader = MsgReader::new(stream.try_clone()?);
            let mut client = Client::connect(reader, stream, password, rfb::FRAMEBUFFER_BUF)?;
            measure(cli, &mut client)
        }
        Target::Ws { addr, path_query } => {
            let mut stream = connect(&addr, timeout)?;
            let already = ws::handshake(&mut stream, &addr, &path_query)?;
            let reader = MsgReader::new(ws::FrameReader::new(stream.try_clone()?, &already));
            let mut client = Client::connect(
                reader,
                ws::FrameWriter::new(stream),
                password,
                rfb::FRAMEBUFFER_BUF,
            )?;
            let report = measure(cli, &mut client)?;
            // Leave politely; the report stands whatever the server does with the close.
            let _ = client.writer().close();
            Ok(report)
        }
    }
}

fn measure<R: Read, W: Write>(cli: &Cli, client: &mut Client<R, W>) -> anyhow::Result<Report> {
    let sample = || {
        let trees: Vec<u64> = cli
            .cpu_pids
            .iter()
            .map(|(_, pid)| cpu::tree_cpu_ns(*pid))
            .collect();
        (cpu::self_cpu_ns(), trees, cpu::host_ticks())
    };
    let mut window = None;
    let mut partial = 0;
    for i in 0..cli.warmup + cli.frames {
        if i == cli.warmup {
            window = Some((client.received(), sample(), Instant::now()));
        }
        client
            .request_full()
            .context("failed to send FramebufferUpdateRequest")?;
        let update = client.read_update().with_context(|| format!("frame {i}"))?;
        if i >= cli.warmup && update.raw_pixels < u64::from(client.width) * u64::from(client.height) {
            partial += 1;
        }
    }
    let Some((start_bytes, start_cpu, start)) = window else {
        bail!("no frame measured")
    };
    let secs = start.elapsed().as_secs_f64();
    let bytes = client.received() - start_bytes;
    let end_cpu = sample();
    let frac = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e9 / secs;
    let mut cpu = vec![("client".to_owned(), frac(start_cpu.0, end_cpu.0))];
    for (((label, _), a), b) in cli.cpu_pids.iter().zip(&start_cpu.1).zip(&end_cpu.1) {
        cpu.push((label.clone(), frac(*a, *b)));
    }
    // All CPUs together, in cores: tells whether something else ran during the window.
    if let (Some((busy0, total0, cpus)), Some((busy1, total1, _))) = (start_cpu.2, end_cpu.2)
        && total1 > total0
    {
        let busy = busy1.saturating_sub(busy0) as f64 / (total1 - total0) as f64;
        cpu.push(("host".to_owned(), busy * cpus as f64));
    }
    Ok(Report {
        width: client.width,
        height: client.height,
        frames: cli.frames,
        partial,
        bytes,
        secs,
        cpu,
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let report = match run(&cli) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("rfb-bench: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if cli.json {
        println!("{}", report.json());
    } else {
        // The query may hold a console token: leave it out.
        let shown = cli.url.split('?').next().unwrap_or_default();
        let cpu: Vec<String> = report
            .cpu
            .iter()
            .map(|(l, v)| format!("{l} {:.0}%", v * 100.0))
            .collect();
        println!(
            "{shown}: {}x{}, {} frames, {} bytes in {:.3} s: {:.1} MB/s, {:.1} fps (CPU: {}){}",
            report.width,
            report.height,
            report.frames,
            report.bytes,
            report.secs,
            report.mbps(),
            report.fps(),
            cpu.join(", "),
            if report.partial > 0 {
                format!(", {} partial frames", report.partial)
            } else {
                String::new()
            }
        );
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("tcp://127.0.0.1:5901").unwrap(),
            Target::Tcp {
                addr: "127.0.0.1:5901".into()
            }
        );
        assert_eq!(
            parse_url("ws://127.0.0.1:6080/").unwrap(),
            Target::Ws {
                addr: "127.0.0.1:6080".into(),
                path_query: "/".into()
            }
        );
        assert_eq!(
            parse_url("ws://localhost:8080/websockify?token=a.b-c").unwrap(),
            Target::Ws {
                addr: "localhost:8080".into(),
                path_query: "/websockify?token=a.b-c".into()
            }
        );
        assert_eq!(
            parse_url("ws://[::1]:8080?x=1").unwrap(),
            Target::Ws {
                addr: "[::1]:8080".into(),
                path_query: "/?x=1".into()
            }
        );
        assert_eq!(
            parse_url("ws://h:1").unwrap(),
            Target::Ws {
                addr: "h:1".into(),
                path_query: "/".into()
            }
        );
        for bad in [
            "http://h:1/",
            "tcp://h",
            "tcp://:5900",
            "ws://h:port/",
            "wss://h:1/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpu_pid_args() {
        assert_eq!(parse_cpu_pid("xvnc=42"), Ok(("xvnc".into(), 42)));
        assert!(parse_cpu_pid("x v=1").is_err());
        assert!(parse_cpu_pid("x=").is_err());
        assert!(parse_cpu_pid("42").is_err());
    }

    #[test]
    fn json_line() {
        let r = Report {
            width: 1920,
            height: 1080,
            frames: 2,
            partial: 0,
            bytes: 16_000_000,
            secs: 0.5,
            cpu: vec![("client".into(), 0.25), ("xvnc".into(), 0.5)],
        };
        assert_eq!(
            r.json(),
            "{\"mbps\":32.0,\"fps\":4.00,\"bytes\":16000000,\"secs\":0.5000,\"width\":1920,\"height\":1080,\
             \"frames\":2,\"partial\":0,\"cpu\":{\"client\":0.250,\"xvnc\":0.500}}"
        );
    }
}
