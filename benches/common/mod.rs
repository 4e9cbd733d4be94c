//! Shared by the benches: criterion around device timings.
//!
//! Each bench measures with its own timer (the device's profiler for decode, launches between
//! two device syncs for fill and flatten); criterion drives it through `iter_custom`, so
//! `cargo bench` prints criterion's statistics, keeps its reports (`target/criterion`, and
//! `--save-baseline` / `--baseline` comparisons) and shows throughput in bytes. The benches
//! then print their own line per case (fraction of the copy ceiling, targets) from the median
//! of the same samples.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use criterion::{Criterion, Throughput};

thread_local! {
    static CRITERION: RefCell<Option<Criterion>> = const { RefCell::new(None) };
    static SEEN: RefCell<HashMap<String, usize>> = RefCell::new(HashMap::new());
}

/// What [`measure`] got.
pub enum Timed {
    /// Median seconds per call over criterion's samples.
    Median(f64),
    /// Criterion's command-line filter excluded this case.
    Filtered,
    /// Criterion is not running (a mode that times its own way).
    Off,
}

/// Starts criterion for this run. With `parse_args`, criterion reads the command line (its
/// filter, `--save-baseline`, ...); pass `false` when the bench's own flags are present, which
/// criterion's parser would reject.
pub fn start(parse_args: bool) {
    let c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let c = if parse_args {
        c.configure_from_args()
    } else {
        c
    };
    CRITERION.with(|s| *s.borrow_mut() = Some(c));
}

/// Criterion's closing summary.
pub fn finish() {
    CRITERION.with(|s| {
        if let Some(c) = s.borrow_mut().take() {
            c.final_summary();
        }
    });
}

/// Times case `name` of `group` through criterion: `run(iters)` makes `iters` back-to-back
/// calls and returns their total seconds. A name seen before in this run gets a `#2`, `#3`
/// suffix (criterion wants unique ids; comparisons re-run shapes).
pub fn measure(group: &str, name: &str, bytes: u64, run: &mut dyn FnMut(u64) -> f64) -> Timed {
    let name = SEEN.with(|s| {
        let mut s = s.borrow_mut();
        let n = s.entry(format!("{group}/{name}")).or_insert(0);
        *n += 1;
        if *n == 1 {
            name.to_string()
        } else {
            format!("{name} #{n}")
        }
    });
    CRITERION.with(|s| {
        let mut s = s.borrow_mut();
        let Some(c) = s.as_mut() else {
            return Timed::Off;
        };
        // Seconds per call of every call criterion made; its measured samples are the last
        // `sample_size` (warm-up calls come first).
        let mut per_call = Vec::new();
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let secs = run(iters);
                per_call.push(secs / iters.max(1) as f64);
                Duration::from_secs_f64(secs)
            })
        });
        g.finish();
        if per_call.is_empty() {
            return Timed::Filtered;
        }
        let mut last: Vec<f64> = per_call.iter().rev().take(10).copied().collect();
        last.sort_by(f64::total_cmp);
        Timed::Median(last[last.len() / 2])
    })
}
