//! CPU time of the machine, of this process, and of its threads whose name
//! starts with a prefix, read from `/proc` (Linux).

use std::time::Duration;

/// Clock ticks per second of `/proc/*/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: u64 = 100;

/// CPU time (user and system) so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Times {
    /// Every process on the machine, all cores together.
    pub machine: Duration,
    /// The whole process, threads that ended included.
    pub process: Duration,
    /// Its live threads named with the prefix.
    pub named: Duration,
}

impl Times {
    /// This process's times now, `named` for threads whose name starts with
    /// `prefix`; `None` where `/proc` is not readable.
    pub fn now(prefix: &str) -> Option<Self> {
        let machine = busy(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let process = ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        let mut named = 0;
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let path = task.path();
            let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
                continue;
            };
            if comm.starts_with(prefix) {
                let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
                named += ticks(&stat).unwrap_or(0);
            }
        }
        let time = |t: u64| Duration::from_millis(t * 1000 / USER_HZ);
        Some(Self {
            machine: time(machine),
            process: time(process),
            named: time(named),
        })
    }

    /// What other processes used: the machine's time less this process's.
    pub fn others(&self) -> Duration {
        self.machine.saturating_sub(self.process)
    }

    /// The time spent between `earlier` and `self`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            machine: self.machine.saturating_sub(earlier.machine),
            process: self.process.saturating_sub(earlier.process),
            named: self.named.saturating_sub(earlier.named),
        }
    }
}

/// `utime + stime` of a `stat` line: fields 14 and 15, counted after the
/// command name in parentheses (which may hold spaces).
fn ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Busy ticks of all cores in `/proc/stat`'s `cpu` line: user, nice, system,
/// irq, softirq and steal (not idle or iowait; guest time is in user).
fn busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    Some(
        [0, 1, 2, 5, 6, 7]
            .iter()
            .filter_map(|&i| fields.get(i))
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_read_after_a_name_with_spaces_and_parentheses() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0";
        assert_eq!(ticks(stat), Some(12));
        assert_eq!(ticks("garbage"), None);
    }

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  10 1 20 500 7 2 3 4 0 0\ncpu0 5 0 10 250 3 1 1 2 0 0\n";
        assert_eq!(busy(stat), Some(10 + 1 + 20 + 2 + 3 + 4));
        assert_eq!(busy("intr 1 2"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {}
        let t = Times::now("no thread is named so").expect("Linux");
        assert!(t.process > Duration::ZERO);
        assert!(t.machine >= t.process);
        assert_eq!(t.named, Duration::ZERO);
    }
}
