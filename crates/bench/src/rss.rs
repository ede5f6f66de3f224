//! A server's resident memory: `/proc/<pid>/status` (VmRSS) or its `process_resident_memory_bytes`
//! metric.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub enum RssSource {
    Pid(u32),
    Metrics { http: reqwest::Client, url: String },
}

impl RssSource {
    pub fn metrics(url: String) -> Self {
        Self::Metrics {
            http: reqwest::Client::new(),
            url,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Pid(pid) => format!("/proc/{pid}/status VmRSS"),
            Self::Metrics { url, .. } => format!("{url} process_resident_memory_bytes"),
        }
    }

    /// Resident bytes now.
    pub async fn read(&self) -> anyhow::Result<u64> {
        match self {
            Self::Pid(pid) => {
                let path = format!("/proc/{pid}/status");
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {path} (is process {pid} running?)"))?;
                vm_rss(&text).with_context(|| format!("no VmRSS line in {path}"))
            }
            Self::Metrics { http, url } => {
                let text = http
                    .get(url)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .with_context(|| format!("GET {url}"))?
                    .text()
                    .await
                    .with_context(|| format!("reading {url}"))?;
                metric(&text, "process_resident_memory_bytes")
                    .map(|v| v as u64)
                    .with_context(|| format!("{url} has no process_resident_memory_bytes"))
            }
        }
    }
}

fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The value of an unlabelled Prometheus sample.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok())?
    })
}

/// How the resident size ended up after a run.
pub struct Settled {
    pub bytes: u64,
    pub settled: bool,
    pub waited: Duration,
}

/// Samples every 200 ms until the last second of samples stays within max(64 KiB, 0.2 %), or
/// `limit` passes; returns the last sample.
pub async fn settle(source: &RssSource, limit: Duration) -> anyhow::Result<Settled> {
    const EVERY: Duration = Duration::from_millis(200);
    const WINDOW: usize = 6;
    let start = Instant::now();
    let mut window: Vec<u64> = Vec::with_capacity(WINDOW);
    loop {
        let bytes = source.read().await?;
        if window.len() == WINDOW {
            window.remove(0);
        }
        window.push(bytes);
        let (lo, hi) = (
            window.iter().copied().min().unwrap_or(bytes),
            window.iter().copied().max().unwrap_or(bytes),
        );
        let settled = window.len() == WINDOW && hi - lo <= (64 * 1024).max(hi / 500);
        if settled || start.elapsed() >= limit {
            return Ok(Settled {
                bytes,
                settled,
                waited: start.elapsed(),
            });
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// Fails early when the source cannot be read at all.
pub async fn probe(source: &RssSource) -> anyhow::Result<u64> {
    match source.read().await {
        Ok(bytes) if bytes > 0 => Ok(bytes),
        Ok(_) => bail!("{} reads 0", source.describe()),
        Err(e) => Err(e.context(
            "cannot read the server's memory: give --pid, or check that /metrics is reachable",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tpushgate\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(vm_rss(status), Some(1234 * 1024));
    }

    #[test]
    fn reads_metrics() {
        let text = "# HELP process_resident_memory_bytes x\n# TYPE process_resident_memory_bytes gauge\n\
                    process_resident_memory_bytes 12345678\nprocess_open_fds 12\n";
        assert_eq!(
            metric(text, "process_resident_memory_bytes"),
            Some(12_345_678.0)
        );
        assert_eq!(metric(text, "missing"), None);
    }

    #[tokio::test]
    async fn reads_our_own_rss() {
        let source = RssSource::Pid(std::process::id());
        assert!(probe(&source).await.unwrap() > 0);
    }
}
