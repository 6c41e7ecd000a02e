//! The ACPI power button, as the kernel's `button` driver reports it through evdev: a
//! `KEY_POWER` press on any `/dev/input/event*` device asks the init for a clean shutdown.
//!
//! Invariants: a reader thread per device, each ending with its device; a malformed or short
//! record is skipped.

use std::io::Read as _;
use std::sync::mpsc::Sender;

/// `struct input_event` on 64-bit Linux: a 16-byte timeval, type, code, value.
pub const EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

/// Whether one `input_event` record is a power-button press.
pub fn is_power_press(record: &[u8]) -> bool {
    if record.len() != EVENT_SIZE {
        return false;
    }
    let kind = u16::from_ne_bytes([record[16], record[17]]);
    let code = u16::from_ne_bytes([record[18], record[19]]);
    let value = i32::from_ne_bytes([record[20], record[21], record[22], record[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

/// Watches every input device present now; sends `()` on a power-button press.
pub fn watch(tx: &Sender<()>) -> usize {
    let Ok(dir) = std::fs::read_dir("/dev/input") else {
        return 0;
    };
    let mut n = 0;
    for e in dir.flatten() {
        if !e.file_name().to_string_lossy().starts_with("event") {
            continue;
        }
        let Ok(mut f) = std::fs::File::open(e.path()) else {
            continue;
        };
        let tx = tx.clone();
        n += 1;
        std::thread::spawn(move || {
            let mut rec = [0u8; EVENT_SIZE];
            while f.read_exact(&mut rec).is_ok() {
                if is_power_press(&rec) && tx.send(()).is_err() {
                    return;
                }
            }
        });
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut r = vec![0u8; 16];
        r.extend_from_slice(&kind.to_ne_bytes());
        r.extend_from_slice(&code.to_ne_bytes());
        r.extend_from_slice(&value.to_ne_bytes());
        r
    }

    #[test]
    fn only_a_power_press() {
        assert!(is_power_press(&record(1, 116, 1)));
        assert!(!is_power_press(&record(1, 116, 0)));
        assert!(!is_power_press(&record(1, 30, 1)));
        assert!(!is_power_press(&record(0, 116, 1)));
        assert!(!is_power_press(&record(1, 116, 1)[..20]));
    }
}
