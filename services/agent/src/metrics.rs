//! Host status reports: CPU, memory, disk and load sampled locally and averaged over the
//! report period, so the scheduler receives one small report per period instead of a stream
//! of samples (the seeds' "pre-aggregated locally"). A report is written to the outbox
//! before it is sent, like a result, so none is lost across disconnects.
//!
//! Also decides the agent's own health: a nearly full disk or memory makes it degraded.
//!
//! Sources are Linux's `/proc` files and `df -P` (disk usage without unsafe `statvfs`
//! calls); a source that cannot be read is left out of the report rather than reported as 0.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Disk usage at or above this percentage makes the agent degraded.
pub(crate) const DISK_DEGRADED_PCT: f64 = 90.0;
/// Memory usage at or above this percentage makes the agent degraded.
pub(crate) const MEM_DEGRADED_PCT: f64 = 95.0;

/// CPU time counters from `/proc/stat`'s first line: (busy, total) jiffies.
fn cpu_counters(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    let total: u64 = values.iter().take(8).sum();
    Some((total.saturating_sub(idle), total))
}

/// Memory in use as a percentage, from `/proc/meminfo` (MemTotal and MemAvailable).
fn mem_pct(meminfo: &str) -> Option<f64> {
    let field = |name: &str| -> Option<f64> {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:")?;
    (total > 0.0).then(|| (total - available) / total * 100.0)
}

/// One-minute load average from `/proc/loadavg`.
fn load1(loadavg: &str) -> Option<f64> {
    loadavg.split_whitespace().next()?.parse().ok()
}

/// Use% of the file system holding `path`, from `df -P` output.
fn disk_pct(df_output: &str) -> Option<f64> {
    let line = df_output.lines().nth(1)?;
    let capacity = line.split_whitespace().nth(4)?;
    capacity.trim_end_matches('%').parse().ok()
}

/// Samples the host and accumulates averages until [`Sampler::take`].
#[derive(Debug)]
pub(crate) struct Sampler {
    /// File system to report (the one holding the outbox: the disk the agent needs).
    disk_path: PathBuf,
    /// Previous CPU counters, to turn cumulative jiffies into a busy percentage.
    last_cpu: Option<(u64, u64)>,
    /// Sum and count per metric since the last report.
    sums: BTreeMap<&'static str, (f64, u32)>,
}

impl Sampler {
    /// A sampler reporting the disk that holds `disk_path`.
    pub(crate) fn new(disk_path: &Path) -> Self {
        let dir = disk_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Sampler {
            disk_path: dir.to_path_buf(),
            last_cpu: None,
            sums: BTreeMap::new(),
        }
    }

    fn add(&mut self, name: &'static str, value: Option<f64>) {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            let entry = self.sums.entry(name).or_insert((0.0, 0));
            entry.0 += v;
            entry.1 += 1;
        }
    }

    /// Takes one sample (blocking: reads files and runs `df`).
    pub(crate) fn sample(&mut self) {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        if let Some(now) = read("/proc/stat").as_deref().and_then(cpu_counters) {
            if let Some((busy0, total0)) = self.last_cpu {
                let (busy, total) = (now.0.saturating_sub(busy0), now.1.saturating_sub(total0));
                if total > 0 {
                    self.add("cpu_pct", Some(busy as f64 / total as f64 * 100.0));
                }
            }
            self.last_cpu = Some(now);
        }
        self.add(
            "mem_pct",
            read("/proc/meminfo").as_deref().and_then(mem_pct),
        );
        self.add("load1", read("/proc/loadavg").as_deref().and_then(load1));
        let df = std::process::Command::new("df")
            .arg("-P")
            .arg(&self.disk_path)
            .output()
            .ok();
        self.add(
            "disk_pct",
            df.and_then(|o| disk_pct(&String::from_utf8_lossy(&o.stdout))),
        );
    }

    /// Averages since the last call, and starts a new window.
    pub(crate) fn take(&mut self) -> BTreeMap<String, f64> {
        std::mem::take(&mut self.sums)
            .into_iter()
            .map(|(k, (sum, n))| (k.to_owned(), sum / f64::from(n.max(1))))
            .collect()
    }
}

/// Why the agent should report itself degraded, if it should.
pub(crate) fn degraded_reason(metrics: &BTreeMap<String, f64>) -> Option<String> {
    if let Some(d) = metrics.get("disk_pct").filter(|d| **d >= DISK_DEGRADED_PCT) {
        return Some(format!("disk {d:.0}% full"));
    }
    if let Some(m) = metrics.get("mem_pct").filter(|m| **m >= MEM_DEGRADED_PCT) {
        return Some(format!("memory {m:.0}% used"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(cpu_counters(stat), Some((150, 1000)));
        assert_eq!(cpu_counters("intr 1 2"), None);
        let meminfo = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n";
        assert_eq!(mem_pct(meminfo), Some(75.0));
        assert_eq!(mem_pct("MemTotal: 0 kB\nMemAvailable: 0 kB\n"), None);
        assert_eq!(load1("0.52 0.40 0.30 1/100 999\n"), Some(0.52));
        let df =
            "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/sda1 100 93 7 93% /\n";
        assert_eq!(disk_pct(df), Some(93.0));
        assert_eq!(disk_pct(""), None);
    }

    #[test]
    fn windows_average_and_reset() {
        let mut s = Sampler::new(Path::new("outbox.redb"));
        s.add("x", Some(10.0));
        s.add("x", Some(20.0));
        s.add("x", Some(f64::NAN));
        s.add("y", None);
        let avg = s.take();
        assert_eq!(avg.get("x"), Some(&15.0));
        assert!(
            !avg.contains_key("y"),
            "missing sources are left out, not reported as 0"
        );
        assert!(s.take().is_empty());
    }

    #[test]
    fn real_samples_on_this_host_are_plausible() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sampler::new(&dir.path().join("outbox.redb"));
        s.sample();
        std::thread::sleep(std::time::Duration::from_millis(50));
        s.sample();
        let avg = s.take();
        for key in ["cpu_pct", "mem_pct", "disk_pct"] {
            let v = avg[key];
            assert!((0.0..=100.0).contains(&v), "{key} = {v}");
        }
        assert!(avg["load1"] >= 0.0);
    }

    #[test]
    fn degraded_on_full_disk_or_memory() {
        let m = |d: f64, mem: f64| {
            BTreeMap::from([("disk_pct".to_owned(), d), ("mem_pct".to_owned(), mem)])
        };
        assert_eq!(degraded_reason(&m(50.0, 50.0)), None);
        assert_eq!(
            degraded_reason(&m(93.2, 50.0)).as_deref(),
            Some("disk 93% full")
        );
        assert_eq!(
            degraded_reason(&m(10.0, 97.0)).as_deref(),
            Some("memory 97% used")
        );
    }
}
