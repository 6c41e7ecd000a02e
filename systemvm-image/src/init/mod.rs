//! `systemvm-init`: process 1 of a system VM, after the initramfs has loaded the drivers and
//! switched to the read-only root. It mounts the scratch tmpfs (`/run`), reads the NoCloud config
//! drive, names the host, brings the network up (static from the seed, else DHCP), starts the
//! agent of the VM's role and keeps it running, reaps orphans, and powers off cleanly on an ACPI
//! power-button press (the agent gets SIGTERM and [`STOP_GRACE`] to finish).
//!
//! Invariants: the seed's copy lives only on tmpfs (`/run/systemvm`, 0700); the secret reaches
//! the agent through its environment only; a seed that cannot be read or parsed is reported on
//! the console and the init waits for a power-off instead of panicking (PID 1 must not exit);
//! the agent is restarted after an exit with a doubling delay (1 s … 30 s).

pub mod drive;
pub mod net;
pub mod power;

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::agent::{self, Spawn};
use systemvm_proto::seed::{self, BootConfig};

/// The seed's copy and the CA, on tmpfs.
pub const RUN_DIR: &str = "/run/systemvm";
/// How long the agent has to stop before the power goes.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long to look for the config drive (a CD-ROM is probed asynchronously).
const DRIVE_WAIT: Duration = Duration::from_secs(10);

/// A line on the serial console, with the guest's uptime (boot phases show in the log).
fn say(msg: impl std::fmt::Display) {
    let up = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let up = up.split_whitespace().next().unwrap_or("?");
    eprintln!("systemvm-init: [{up}] {msg}");
}

/// Runs process 1; never returns.
pub fn main() -> ! {
    let args: Vec<String> = std::env::args().collect();
    // udhcpc runs this binary as its event script.
    if std::process::id() != 1 {
        if let Some(event) = args.get(1) {
            std::process::exit(net::dhcp_event(event));
        }
        eprintln!("systemvm-init: process 1 of a system VM; not for running by hand");
        std::process::exit(2);
    }
    let (tx, power) = mpsc::channel();
    match boot() {
        Ok(spawn) => {
            let watched = power::watch(&tx);
            say(format!("watching {watched} input devices for the power button"));
            supervise(&spawn, &power);
        }
        Err(e) => {
            say(format!("boot failed: {e}"));
            power::watch(&tx);
            say("waiting for a power-off");
            let _ = power.recv();
        }
    }
    power_off()
}

fn boot() -> Result<Spawn, String> {
    sh(
        "mount",
        &["-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", "/run"],
    )?;
    for (dir, mode) in [(RUN_DIR, 0o700), ("/run/tmp", 0o1777), ("/run/cidata", 0o700)] {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {dir}: {e}"))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {dir}: {e}"))?;
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let user_data = read_seed()?;
    let config = seed::parse(&user_data, &cmdline).map_err(|e| e.to_string())?;
    say(format!(
        "role {:?}, VM {} ({})",
        config.role, config.vm_id, config.name
    ));
    let _ = sh("hostname", &[&config.name]);
    network(&config)?;
    let ca = Path::new(RUN_DIR).join("ca.pem");
    write_private(&ca, config.ca_pem.as_bytes())?;
    Ok(agent::command(&config, &ca))
}

/// Copies the config drive's `user-data` and `meta-data` to [`RUN_DIR`]; returns the user-data.
fn read_seed() -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + DRIVE_WAIT;
    let dev = loop {
        if let Some(dev) = drive::find() {
            break dev;
        }
        if Instant::now() > deadline {
            return Err(format!("no config drive labelled {} appeared", drive::LABEL));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let dev = dev.display().to_string();
    sh("mount", &["-t", "iso9660", "-o", "ro", &dev, "/run/cidata"])?;
    let read = |name: &str| std::fs::read(Path::new("/run/cidata").join(name));
    let user_data = read("user-data");
    let meta_data = read("meta-data").unwrap_or_default();
    let _ = sh("umount", &["/run/cidata"]);
    let user_data = user_data.map_err(|e| format!("config drive {dev} has no user-data: {e}"))?;
    if user_data.len() > seed::MAX_USER_DATA {
        return Err(format!("config drive user-data is {} bytes", user_data.len()));
    }
    write_private(&Path::new(RUN_DIR).join("user-data"), &user_data)?;
    write_private(&Path::new(RUN_DIR).join("meta-data"), &meta_data)?;
    say(format!("config drive {dev} read"));
    Ok(user_data)
}

fn network(c: &BootConfig) -> Result<(), String> {
    net::ip(&["link", "set", "lo", "up"])?;
    let Some(ifname) = net::interface() else {
        return Err("no network interface".into());
    };
    match &c.network {
        Some(n) => {
            net::apply_static(&ifname, n)?;
            say(format!("{ifname} {}/{} (static)", n.address, n.prefix));
        }
        None => {
            net::start_dhcp(&ifname)?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while !Path::new(net::BOUND_MARK).exists() {
                if Instant::now() > deadline {
                    return Err(format!("no DHCP lease on {ifname} within 30 s"));
                }
                reap_all();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("failed to write {}: {e}", path.display()))
}

fn sh(program: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(program).args(args).status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("{program} {} failed: {s}", args.join(" "))),
        Err(e) => Err(format!("{program} failed to start: {e}")),
    }
}

fn start(spawn: &Spawn) -> Result<i32, String> {
    let mut c = Command::new(&spawn.program);
    c.args(&spawn.args)
        .env_clear()
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .env("TMPDIR", "/run/tmp");
    c.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    // The serial console is a log file on the host: no colours.
    c.env("NO_COLOR", "1");
    for (k, v) in &spawn.env {
        c.env(k, v);
    }
    // Its own process group, so a stop reaches the agent's children too.
    c.process_group(0);
    let child = c
        .spawn()
        .map_err(|e| format!("failed to start {}: {e}", spawn.program.display()))?;
    i32::try_from(child.id()).map_err(|_| "pid out of range".to_owned())
}

/// Reaps every exited child; returns the pids (with their raw status) that ended.
fn reap_all() -> Vec<(i32, Option<i32>)> {
    use rustix::process::{WaitOptions, wait};
    let mut ended = Vec::new();
    while let Ok(Some((pid, status))) = wait(WaitOptions::NOHANG) {
        ended.push((pid.as_raw_nonzero().get(), status.exit_status()));
    }
    ended
}

fn supervise(spawn: &Spawn, power: &mpsc::Receiver<()>) {
    let mut delay = Duration::from_secs(1);
    let mut agent: Option<(i32, Instant)> = None;
    let mut next_start = Instant::now();
    loop {
        if agent.is_none() && Instant::now() >= next_start {
            match start(spawn) {
                Ok(pid) => {
                    say(format!(
                        "agent {} started (pid {pid}); {}",
                        spawn.program.display(),
                        memory()
                    ));
                    agent = Some((pid, Instant::now()));
                }
                Err(e) => {
                    say(e);
                    next_start = Instant::now() + delay;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
        for (pid, code) in reap_all() {
            if let Some((apid, since)) = agent
                && apid == pid
            {
                say(format!(
                    "agent exited ({code:?}); restarting in {} s",
                    delay.as_secs()
                ));
                if since.elapsed() > Duration::from_secs(60) {
                    delay = Duration::from_secs(1);
                }
                agent = None;
                next_start = Instant::now() + delay;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
        if power.recv_timeout(Duration::from_millis(200)).is_ok() {
            say("power button: stopping the agent");
            if let Some((pid, _)) = agent {
                stop(pid);
            }
            return;
        }
    }
}

/// `MemAvailable of MemTotal` from /proc/meminfo, for the console log.
fn memory() -> String {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    format!(
        "memory {} MiB available of {} MiB",
        kib("MemAvailable:") / 1024,
        kib("MemTotal:") / 1024
    )
}

fn stop(pid: i32) {
    use rustix::process::{Pid, Signal, kill_process_group};
    let Some(pid) = Pid::from_raw(pid) else {
        return;
    };
    let _ = kill_process_group(pid, Signal::TERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if reap_all().iter().any(|(p, _)| *p == pid.as_raw_nonzero().get()) {
            say("agent stopped");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    say("agent did not stop in time: killed");
    let _ = kill_process_group(pid, Signal::KILL);
}

fn power_off() -> ! {
    let _ = sh("sync", &[]);
    say("powering off");
    let _ = Command::new("poweroff").arg("-f").exec();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
