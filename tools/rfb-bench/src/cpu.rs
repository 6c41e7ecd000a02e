//! CPU time of process trees over the measured window, from Linux `/proc` (`schedstat` gives
//! nanoseconds on CPU per thread).

use std::collections::HashMap;
use std::fs;

/// CPU nanoseconds of every thread of `pid` and of its descendants (0 where `/proc` is unreadable).
pub(crate) fn tree_cpu_ns(pid: u32) -> u64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| parent_of(&s))
            {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut total = 0;
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        total += process_cpu_ns(p);
        if let Some(kids) = children.get(&p) {
            todo.extend(kids);
        }
    }
    total
}

/// CPU nanoseconds of the threads of this process.
pub(crate) fn self_cpu_ns() -> u64 {
    process_cpu_ns(std::process::id())
}

fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// Busy and total jiffies of all CPUs together, and the number of CPUs, from `/proc/stat`.
pub(crate) fn host_ticks() -> Option<(u64, u64, usize)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    parse_host_ticks(&stat)
}

fn parse_host_ticks(stat: &str) -> Option<(u64, u64, usize)> {
    let total_line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = total_line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice, already counted in user/nice]
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    Some((total - idle.min(total), total, cpus))
}

/// The parent pid from a `/proc/PID/stat` line (the command name may hold spaces and parentheses).
fn parent_of(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines() {
        assert_eq!(parent_of("1234 (Xvnc) S 1 1234 1234 0 -1"), Some(1));
        assert_eq!(parent_of("99 (we ird) (name)) R 42 99 99"), Some(42));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn parses_proc_stat() {
        let stat = "cpu  100 5 50 800 20 0 25 0 0 0\ncpu0 50 0 25 400 10 0 12 0 0 0\ncpu1 50 5 25 400 10 0 13 0 0 0\nintr 1\n";
        assert_eq!(parse_host_ticks(stat), Some((180, 1000, 2)));
        assert_eq!(parse_host_ticks("intr 1"), None);
    }

    #[test]
    fn own_cpu_time_grows() {
        let before = self_cpu_ns();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        // Zero where /proc has no schedstat (kernels without CONFIG_SCHED_INFO).
        assert!(self_cpu_ns() >= before);
        assert!(tree_cpu_ns(std::process::id()) >= before);
    }
}
