//! The GPU Burn tests' harness: a few worker threads over a case table, a tally of runs and
//! failures, and an opt-in trace of where a slow run spends its time.

/// Runs and failures of one operation's table; `finish` prints the count and fails the test
/// with every failure listed.
pub struct Tally {
    runs: usize,
    failures: Vec<String>,
}

impl Tally {
    /// No runs yet.
    pub fn new() -> Self {
        Tally {
            runs: 0,
            failures: Vec::new(),
        }
    }
    /// Counts one run; keeps its failure.
    pub fn check(&mut self, what: String, r: Result<(), String>) {
        self.runs += 1;
        if let Err(e) = r {
            self.failures.push(format!("{what}: {e}"));
        }
    }
    /// Prints the tally and fails on any failure.
    pub fn finish(self, op: &str) {
        println!(
            "burn {op}: {} runs, {} failed",
            self.runs,
            self.failures.len()
        );
        assert!(
            self.failures.is_empty(),
            "{} of {} burn {op} runs differ:\n{}",
            self.failures.len(),
            self.runs,
            self.failures.join("\n")
        );
    }
}

/// Runs `job` on every item from a few threads (each its own CUDA stream), collecting
/// `(label, result)`s. The GPU suite would otherwise spend minutes on one thread's host work.
pub fn par_map<T: Sync>(
    items: &[T],
    job: impl Fn(&T) -> Vec<(String, Result<(), String>)> + Sync,
) -> Tally {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    // FP8KV_BURN_THREADS overrides the worker count (1 to find a slow or stuck run).
    let workers = std::env::var("FP8KV_BURN_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4usize);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let t0 = std::time::Instant::now();
                let r = job(item);
                let failed = r.iter().filter(|(_, r)| r.is_err()).count();
                trace(|| {
                    let first = r.first().map_or("", |(l, _)| l.as_str());
                    let secs = t0.elapsed().as_secs_f64();
                    format!(
                        "item {i} ({first}..): {} runs, {failed} failed, {secs:.1} s",
                        r.len()
                    )
                });
                results.lock().unwrap().extend(r);
            });
        }
    });
    let mut tally = Tally::new();
    for (what, r) in results.into_inner().unwrap() {
        tally.check(what, r);
    }
    tally
}

/// With FP8KV_BURN_TRACE=1, a line per step (thread, seconds since start): where a slow or
/// stuck run spends its time.
pub fn trace(what: impl FnOnce() -> String) {
    static START: std::sync::OnceLock<Option<std::time::Instant>> = std::sync::OnceLock::new();
    let start = START.get_or_init(|| {
        (std::env::var("FP8KV_BURN_TRACE").as_deref() == Ok("1")).then(std::time::Instant::now)
    });
    if let Some(t) = start {
        let id = std::thread::current().id();
        eprintln!("[{:8.2}] {id:?} {}", t.elapsed().as_secs_f64(), what());
    }
}
