//! The open-file limit: every connection is a descriptor, in the bench and in the server.

use anyhow::bail;
use rlimit::Resource;

/// Descriptors a process keeps for itself besides its connections (runtime, pipes, HTTP, Redis).
pub const RESERVED_FDS: u64 = 64;

/// Raises the soft limit on open files to the hard limit; returns the (soft, hard) limits now
/// in force.
pub fn raise_nofile() -> (u64, u64) {
    let Ok((soft, hard)) = Resource::NOFILE.get() else {
        return (1024, 1024);
    };
    if soft < hard && Resource::NOFILE.set(hard, hard).is_ok() {
        return (hard, hard);
    }
    (soft, hard)
}

/// Fails with a clear message when one process would need more than `soft` descriptors for
/// `per_process` connections, naming the `--procs` that would fit `total` connections.
pub fn check(per_process: u64, total: u64, procs: u32, soft: u64, hard: u64) -> anyhow::Result<()> {
    let need = per_process + RESERVED_FDS;
    if need <= soft {
        return Ok(());
    }
    let room = soft.saturating_sub(RESERVED_FDS).max(1);
    let suggest = total.div_ceil(room).max(u64::from(procs) + 1);
    bail!(
        "this run needs about {need} open files in one process ({per_process} connections over \
         {procs} process(es)), but the open-file limit is {soft} (hard limit {hard}). Spread the \
         clients over more processes with --procs {suggest}, or raise the limit (ulimit -n)"
    )
}

/// The soft open-file limit of another process, from `/proc/<pid>/limits`.
pub fn nofile_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_enough_processes() {
        assert!(check(1000, 1000, 1, 20_000, 20_000).is_ok());
        let err = check(30_000, 30_000, 1, 20_000, 20_000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--procs 2"), "{err}");
        let err = check(60_000, 120_000, 2, 20_000, 20_000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--procs 7"), "{err}");
    }

    #[test]
    fn reads_our_own_limit() {
        let (soft, hard) = raise_nofile();
        assert!(soft <= hard);
        assert_eq!(nofile_of(std::process::id()), Some(soft));
    }
}
