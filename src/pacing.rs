// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How the request worker waits for work: after a burst it polls the available ring for a
//! while with notifications off (the driver then need not kick, and Linux's driver busy-waits
//! on the used ring, so the device's response time is the guest's), otherwise it sleeps in
//! epoll until a kick.
//!
//! A poll window is worth its CPU only when the driver's next request comes within it and the
//! worker has a CPU to itself. A worker that polls on the CPU of the vCPU it serves holds up
//! that vCPU, and a request that comes while the worker waits for its next turn on a busy CPU
//! waits for it too (notifications are off: no kick), for a whole time slice of whatever runs
//! meanwhile. So in the default `adaptive` mode the window adapts, as KVM's halt polling does:
//!
//! - it grows (doubling, up to the budget `--poll-us`) when the request that woke the worker
//!   came soon after an empty window, and shrinks (halving, to 0) when the worker slept longer
//!   than the budget;
//! - the worker yields its CPU every 1024 spins (about 16 us), so that a vCPU waiting for the
//!   same CPU runs at once instead of after the window;
//! - a window ends at once when the worker notices it lost its CPU (a yield that came back
//!   late, or two clock reads of the poll loop far apart, and the kernel counted an
//!   involuntary switch: another task ran on its CPU) for the second time in a row, with no
//!   sign in between that it had the CPU to itself: the worker then polls no more for a
//!   while (1 ms, doubling while it happens again right after each back-off, up to 128 ms) and
//!   sleeps, so that a kick wakes it, on a free CPU if there is one, and the scheduler
//!   preempts for it otherwise;
//! - a gap with no involuntary switch is the hypervisor's (the whole CPU did not run, as a
//!   nested or overcommitted VM sees every few milliseconds): no task of this host waited for
//!   the worker's CPU, so the window goes on.
//!
//! Windows at the full budget that ended empty just before the next request used to count as
//! trouble too (a worker holding up the vCPU on its own CPU sees that). But a driver whose
//! gaps are a little longer than the budget shows the same, and a back-off makes its gaps
//! longer still (each request then waits for a kick and a wake-up): on a worker alone on its
//! CPU the back-offs fed each other for seconds. The yields catch the shared CPU directly.
//!
//! `fixed` keeps every window at the budget and polls on after a lost CPU (the daemon's
//! behaviour before the adaptive windows, kept for comparison).

use std::time::{Duration, Instant};

use crate::stats::Pacing;

/// `--poll-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PollMode {
    /// Windows follow the driver's gaps between requests (0 up to the budget); no polling
    /// for a while after the worker lost its CPU during one.
    #[default]
    Adaptive,
    /// Every window is the budget, polled to its end even after the worker lost its CPU.
    Fixed,
}

/// The poll settings of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollPolicy {
    /// The longest window (`--poll-us`); zero turns polling off.
    pub budget: Duration,
    pub mode: PollMode,
}

/// The first window an adaptive worker tries after polling was off (then it doubles).
const START_NS: u64 = 4_000;
/// The clock is read every this many spins (deadline and lost-CPU checks).
const CHECK_EVERY: u32 = 64;
/// Two clock reads this far apart in a poll loop mean the worker was not running between
/// them: 64 spins take about a microsecond, a time slice of another task milliseconds.
const LOST_CPU_NS: u64 = 30_000;
/// Lost CPUs in a row that make a back-off. A vCPU on the worker's CPU takes every yield (it
/// always waits for the CPU); a task that wakes now and then (a timer, a monitor reading
/// /proc every few milliseconds) takes one, and the worker has its CPU back before the next.
/// Backing off for each of those fed the back-offs: a resumed window met the next one within
/// milliseconds, and the worker stayed off for most of a run with a CPU to itself.
const LOST_IN_A_ROW: u32 = 2;
/// The back-off after a lost CPU, doubled while it happens again
/// within `PERSISTS_NS` of the back-off's end, back to the minimum otherwise.
const BACKOFF_MIN_NS: u64 = 1_000_000;
/// One window per 128 ms costs a vCPU sharing the worker's CPU at most 50 us in 128 ms, and a
/// back-off that was not needed is over soon.
const BACKOFF_MAX_NS: u64 = 128_000_000;
/// A vCPU that wants the worker's CPU takes it within a scheduler tick of the worker polling
/// again: trouble that soon after a back-off is the same trouble. Unrelated preemptions (a few
/// per second on a busy host) rarely come that soon, so they cannot ratchet the back-off up:
/// doubling whenever trouble followed trouble within four back-offs could hold a worker at
/// the longest back-off for as long as they kept coming.
const PERSISTS_NS: u64 = 4_000_000;
/// Poll windows yield the CPU every this many spins.
const YIELD_EVERY: u32 = 1024;
/// One pass in this many is timed (two clock reads).
const SAMPLE_EVERY: u32 = 64;

/// How a poll window ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollEnd {
    /// The probe saw work (or a change the next pass must look at).
    Moved,
    /// The window passed with nothing found.
    Empty,
    /// The worker lost its CPU during the window; nothing found.
    LostCpu,
    /// No window: polling is off for now (the window shrank to 0, or a back-off runs).
    Skipped,
    /// The probe said stop (the queue is off or unusable).
    Stopped,
}

/// What the worker found at a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Nothing,
    Moved,
    Stop,
}

/// The adaptive window, apart from clocks and counters (times in nanoseconds since any fixed
/// origin): what decides how long the next window is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    budget: u64,
    /// The next window (0: no polling).
    len: u64,
    /// No polling before this time.
    quiet_until: u64,
    backoff: u64,
    /// The last trouble, if any.
    trouble_at: Option<u64>,
}

impl Window {
    fn new(budget: u64) -> Window {
        Window {
            budget,
            len: START_NS.min(budget),
            quiet_until: 0,
            backoff: BACKOFF_MIN_NS,
            trouble_at: None,
        }
    }

    /// The worker woke after sleeping `slept`; `after_empty` when a window ran before the sleep
    /// and found nothing.
    fn woke(&mut self, slept: u64, after_empty: bool) {
        if self.budget == 0 {
            return;
        }
        if slept > self.budget {
            // The driver went quiet for longer than a window can cover.
            self.len /= 2;
            if self.len < START_NS {
                self.len = 0;
            }
        } else if after_empty {
            // The next request came soon after the window: a longer one might catch it.
            self.len = (self.len * 2).clamp(START_NS, self.budget);
        } else if self.len == 0 {
            self.len = START_NS.min(self.budget);
        }
    }

    /// Polling hurts (another task wanted the worker's CPU): none for a while.
    fn trouble(&mut self, now: u64) {
        self.backoff = if self.trouble_at.is_some() && now <= self.quiet_until + PERSISTS_NS {
            (self.backoff * 2).min(BACKOFF_MAX_NS)
        } else {
            BACKOFF_MIN_NS
        };
        self.trouble_at = Some(now);
        self.quiet_until = now + self.backoff;
        self.len = START_NS.min(self.budget);
    }

    /// The window to poll at `now` (0: none).
    fn at(&self, now: u64) -> u64 {
        if now < self.quiet_until {
            0
        } else {
            self.len
        }
    }
}

/// The calling thread's involuntary context switches (another task took its CPU), or `None`
/// when the kernel does not say.
fn involuntary_switches() -> Option<u64> {
    // SAFETY: an all-zero `rusage` is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into the `rusage` it is given, which lives across the call.
    let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    (r == 0).then_some(usage.ru_nivcsw as u64)
}

/// Per-worker state: the window and the timing samples in flight.
#[derive(Debug)]
pub struct Pacer {
    policy: PollPolicy,
    window: Window,
    /// Where the worker's involuntary switches come from (the kernel; a fake in tests), and
    /// the count at the last look.
    switches: fn() -> Option<u64>,
    switches_seen: Option<u64>,
    /// How the worker gives its CPU away in a window (the scheduler's yield; a fake in tests).
    yield_cpu: fn(),
    /// Times in a row another task took the worker's CPU, with no sign between them that the
    /// worker had it to itself (a yield that came straight back, or a window that caught a
    /// request without losing its CPU).
    lost_in_a_row: u32,
    /// The clock's origin for `window`'s times.
    origin: Instant,
    /// When the worker last went to sleep, and whether a window before it found nothing.
    slept_at: Option<Instant>,
    slept_after_empty: bool,
    passes: u32,
    /// The sampled pass: when its first request was found.
    found_at: Option<Instant>,
    /// The sampled pass's used entries went out at this time; the next request's gap.
    published_at: Option<Instant>,
}

impl Pacer {
    /// A pacer for the calling thread (the worker).
    pub fn new(policy: PollPolicy) -> Pacer {
        Pacer::with_switches(policy, involuntary_switches)
    }

    fn with_switches(policy: PollPolicy, switches: fn() -> Option<u64>) -> Pacer {
        Pacer::with_hooks(policy, switches, std::thread::yield_now)
    }

    fn with_hooks(policy: PollPolicy, switches: fn() -> Option<u64>, yield_cpu: fn()) -> Pacer {
        Pacer {
            yield_cpu,
            policy,
            window: Window::new(policy.budget.as_nanos() as u64),
            switches,
            switches_seen: switches(),
            lost_in_a_row: 0,
            origin: Instant::now(),
            slept_at: None,
            slept_after_empty: false,
            passes: 0,
            found_at: None,
            published_at: None,
        }
    }

    pub fn policy(&self) -> PollPolicy {
        self.policy
    }

    /// After a gap in the poll loop: did another task run on the worker's CPU since the last
    /// look? (A kernel that does not say counts as yes.)
    fn another_task_ran(&mut self) -> bool {
        let now = (self.switches)();
        let ran = now.is_none() || now != self.switches_seen;
        self.switches_seen = now;
        ran
    }

    /// A gap in the poll loop: notes whether another task took the CPU (`lost`) or the CPU
    /// stopped (`stolen`); `true` when an adaptive window ends here.
    fn gap(&mut self, fixed: bool, lost: &mut bool, stolen: &mut bool) -> bool {
        if !self.another_task_ran() {
            *stolen = true;
            return false;
        }
        *lost = true;
        self.lost_in_a_row += 1;
        !fixed && self.lost_in_a_row >= LOST_IN_A_ROW
    }

    fn ns(&self, t: Instant) -> u64 {
        t.duration_since(self.origin).as_nanos() as u64
    }

    /// The worker woke up for the request queue.
    pub fn woke(&mut self, stats: &Pacing) {
        Pacing::add(&stats.wakeups, 1);
        let Some(slept_at) = self.slept_at.take() else {
            return;
        };
        let now = Instant::now();
        let slept = now.duration_since(slept_at).as_nanos() as u64;
        stats.sleep_ns.record(slept);
        if self.policy.mode == PollMode::Adaptive {
            self.window.woke(slept, self.slept_after_empty);
            Pacing::set(&stats.window_ns, self.window.len);
        } else {
            Pacing::set(&stats.window_ns, self.window.budget);
        }
    }

    /// The worker goes back to sleep (notifications on); `after_empty` when a poll window
    /// before it found nothing.
    pub fn sleeping(&mut self, stats: &Pacing, after_empty: bool) {
        Pacing::add(&stats.sleeps, 1);
        self.slept_at = Some(Instant::now());
        self.slept_after_empty = after_empty;
        self.published_at = None;
    }

    /// A pass starts: sampled passes are timed (a sampled pass that found nothing is not
    /// carried over to the next one).
    pub fn pass_starts(&mut self) {
        self.passes = self.passes.wrapping_add(1);
        self.found_at = (self.passes % SAMPLE_EVERY == 0).then(Instant::now);
    }

    /// The pass's used entries are out.
    pub fn pass_published(&mut self, stats: &Pacing) {
        if let Some(found) = self.found_at.take() {
            let now = Instant::now();
            stats
                .service_ns
                .record(now.duration_since(found).as_nanos() as u64);
            self.published_at = Some(now);
        }
    }

    /// Polls with `probe` (given the spin count) for the current window.
    pub fn poll(&mut self, stats: &Pacing, mut probe: impl FnMut(u32) -> Probe) -> PollEnd {
        let fixed = self.policy.mode == PollMode::Fixed;
        let start = Instant::now();
        let window = if fixed {
            self.policy.budget.as_nanos() as u64
        } else {
            self.window.at(self.ns(start))
        };
        if window == 0 {
            if self.window.len > 0 {
                Pacing::add(&stats.windows_skipped, 1);
            }
            self.published_at = None;
            return PollEnd::Skipped;
        }
        Pacing::add(&stats.windows, 1);
        let mut last = start;
        let mut spins = 0u32;
        // A fixed window keeps polling after a lost CPU; it is counted all the same.
        let mut lost = false;
        let mut stolen = false;
        let end = loop {
            match probe(spins) {
                Probe::Moved => break PollEnd::Moved,
                Probe::Stop => break PollEnd::Stopped,
                Probe::Nothing => {}
            }
            spins = spins.wrapping_add(1);
            if spins % CHECK_EVERY == 0 {
                let now = Instant::now();
                let since = now.duration_since(last).as_nanos() as u64;
                last = now;
                if since > LOST_CPU_NS && self.gap(fixed, &mut lost, &mut stolen) {
                    break PollEnd::LostCpu;
                }
                if now.duration_since(start).as_nanos() as u64 >= window {
                    break PollEnd::Empty;
                }
            }
            if spins % YIELD_EVERY == 0 {
                // Give the CPU away if someone else (a vCPU) waits for it.
                let before = Instant::now();
                (self.yield_cpu)();
                Pacing::add(&stats.yields, 1);
                let after = Instant::now();
                if after.duration_since(before).as_nanos() as u64 > LOST_CPU_NS {
                    Pacing::add(&stats.yields_late, 1);
                    if self.gap(fixed, &mut lost, &mut stolen) {
                        break PollEnd::LostCpu;
                    }
                } else {
                    self.lost_in_a_row = 0;
                }
                last = after;
            }
            std::hint::spin_loop();
        };
        let now = Instant::now();
        Pacing::add(&stats.poll_ns, now.duration_since(start).as_nanos() as u64);
        if lost {
            Pacing::add(&stats.windows_preempted, 1);
        } else if end == PollEnd::Moved {
            self.lost_in_a_row = 0;
        }
        if stolen {
            Pacing::add(&stats.windows_stolen, 1);
        }
        match end {
            PollEnd::Moved => {
                if let Some(published) = self.published_at.take() {
                    stats
                        .polled_gap_ns
                        .record(now.duration_since(published).as_nanos() as u64);
                }
            }
            PollEnd::Empty => Pacing::add(&stats.windows_empty, 1),
            PollEnd::LostCpu => {
                self.window.trouble(self.ns(now));
                Pacing::set(&stats.backoff_ns, self.window.backoff);
                Pacing::set(&stats.window_ns, self.window.len);
            }
            PollEnd::Stopped | PollEnd::Skipped => {}
        }
        if end != PollEnd::Moved {
            self.published_at = None;
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    use super::*;

    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;

    #[test]
    fn windows_grow_while_the_next_request_comes_just_after_them() {
        let mut w = Window::new(50 * US);
        assert_eq!(w.len, START_NS);
        for expect in [8 * US, 16 * US, 32 * US, 50 * US, 50 * US] {
            w.woke(10 * US, true);
            assert_eq!(w.len, expect);
        }
        // Whole budgets that keep missing just before the next request are no trouble: the
        // window stays (a shared CPU shows in the yields instead).
        for _ in 0..100 {
            w.woke(5 * US, true);
        }
        assert_eq!(w.at(0), 50 * US);
        // Caught: the window stays.
        w.woke(10 * US, false);
        assert_eq!(w.len, 50 * US);
    }

    #[test]
    fn windows_shrink_to_nothing_while_the_driver_is_quiet_and_come_back() {
        let mut w = Window::new(50 * US);
        w.len = 50 * US;
        let mut now = 0;
        for expect in [25 * US, 12_500, 6_250, 0, 0] {
            now += 10 * MS;
            w.woke(10 * MS, true);
            assert_eq!(w.len, expect);
        }
        // A short gap again: polling resumes at the start.
        now += 10 * US;
        w.woke(10 * US, false);
        assert_eq!(w.len, START_NS);
        assert_eq!(w.at(now), START_NS);
    }

    #[test]
    fn back_offs_double_while_trouble_follows_trouble_and_reset_after_calm() {
        let mut w = Window::new(50 * US);
        let mut now = 0;
        let mut expect = BACKOFF_MIN_NS;
        for _ in 0..14 {
            w.trouble(now);
            assert_eq!(w.backoff, expect);
            assert_eq!(w.at(now), 0);
            now = w.quiet_until + 10 * US;
            assert_eq!(w.at(now), START_NS);
            expect = (expect * 2).min(BACKOFF_MAX_NS);
        }
        assert_eq!(w.backoff, BACKOFF_MAX_NS);
        // Calm for a while after the back-off: back to the minimum.
        now = w.quiet_until + PERSISTS_NS + 1;
        w.trouble(now);
        assert_eq!(w.backoff, BACKOFF_MIN_NS);
    }

    #[test]
    fn unrelated_preemptions_do_not_ratchet_the_back_off_up() {
        // A preemption every 200 ms, none right after a back-off: each back-off is the
        // shortest, and the worker polls nearly all the time.
        let mut w = Window::new(50 * US);
        let mut now = 0;
        let mut off = 0;
        for _ in 0..50 {
            now += 200 * MS;
            w.trouble(now);
            assert_eq!(w.backoff, BACKOFF_MIN_NS);
            off += w.quiet_until - now;
        }
        assert!(off * 100 <= now, "off {off} ns of {now}");
        // Right at the end of a back-off, and then just too late.
        w.trouble(w.quiet_until + PERSISTS_NS);
        assert_eq!(w.backoff, 2 * BACKOFF_MIN_NS);
        w.trouble(w.quiet_until + PERSISTS_NS + 1);
        assert_eq!(w.backoff, BACKOFF_MIN_NS);
    }

    #[test]
    fn no_budget_no_window() {
        let mut w = Window::new(0);
        assert_eq!(w.at(0), 0);
        w.woke(5, true);
        w.woke(5, false);
        assert_eq!(w.at(30), 0);
    }

    const SIZE: usize = std::mem::size_of::<libc::cpu_set_t>();
    fn affinity() -> libc::cpu_set_t {
        // SAFETY: an all-zero cpu_set_t is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: writes only the set it is given, for this thread (pid 0).
        assert_eq!(unsafe { libc::sched_getaffinity(0, SIZE, &mut set) }, 0);
        set
    }
    fn set_affinity(set: &libc::cpu_set_t) {
        // SAFETY: reads only the set it is given; changes this thread's affinity only.
        assert_eq!(unsafe { libc::sched_setaffinity(0, SIZE, set) }, 0);
    }
    fn only(cpu: usize) -> libc::cpu_set_t {
        // SAFETY: an all-zero cpu_set_t is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE, inside the set.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        set
    }

    /// Runs `f` on this thread pinned to one CPU with another thread spinning on that CPU.
    fn sharing_a_cpu<T>(f: impl FnOnce() -> T) -> T {
        let own = affinity();
        let cpu = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `c` is below CPU_SETSIZE, inside the set.
            .find(|&c| unsafe { libc::CPU_ISSET(c, &own) })
            .expect("a CPU");
        set_affinity(&only(cpu));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                set_affinity(&only(cpu));
                while !stop.load(Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let out = f();
        stop.store(true, Relaxed);
        spinner.join().unwrap();
        set_affinity(&own);
        out
    }

    /// A probe that stops the worker for 100 us (a gap in the poll loop) on its 10th look.
    fn gap_then_nothing(spins: u32) -> Probe {
        if spins == 10 {
            std::thread::sleep(Duration::from_micros(100));
        }
        Probe::Nothing
    }

    #[test]
    fn a_gap_with_no_other_task_on_the_cpu_is_not_a_lost_cpu() {
        // The hypervisor stopped the CPU: the kernel counted no involuntary switch.
        fn still() -> Option<u64> {
            Some(7)
        }
        let stats = Pacing::default();
        let policy = PollPolicy {
            budget: Duration::from_micros(50),
            mode: PollMode::Adaptive,
        };
        let mut p = Pacer::with_switches(policy, still);
        assert_eq!(p.poll(&stats, gap_then_nothing), PollEnd::Empty);
        assert_eq!(stats.windows_stolen.load(Relaxed), 1);
        assert_eq!(stats.windows_preempted.load(Relaxed), 0);
        assert_eq!(p.window.quiet_until, 0, "no back-off");
        assert_eq!(
            p.window.at(p.ns(Instant::now())),
            START_NS,
            "the next window polls"
        );
    }

    #[test]
    fn gaps_while_another_task_ran_in_a_row_end_the_window_and_back_off() {
        static SWITCHES: AtomicU64 = AtomicU64::new(0);
        fn switching() -> Option<u64> {
            Some(SWITCHES.fetch_add(1, Relaxed))
        }
        fn unknown() -> Option<u64> {
            None
        }
        for switches in [switching as fn() -> Option<u64>, unknown] {
            let stats = Pacing::default();
            let policy = PollPolicy {
                budget: Duration::from_micros(50),
                mode: PollMode::Adaptive,
            };
            let mut p = Pacer::with_switches(policy, switches);
            // Once is a task that woke for a moment: the window goes on.
            assert_eq!(p.poll(&stats, gap_then_nothing), PollEnd::Empty);
            assert_eq!(stats.windows_preempted.load(Relaxed), 1);
            // A window that catches a request with its CPU to itself clears the count.
            assert_eq!(p.poll(&stats, |_| Probe::Moved), PollEnd::Moved);
            assert_eq!(p.poll(&stats, gap_then_nothing), PollEnd::Empty);
            assert_eq!(stats.windows_preempted.load(Relaxed), 2);
            assert_eq!(p.window.quiet_until, 0, "no back-off");
            // Twice in a row: the window ends and polling backs off.
            assert_eq!(p.poll(&stats, gap_then_nothing), PollEnd::LostCpu);
            assert_eq!(stats.windows_preempted.load(Relaxed), 3);
            assert_eq!(stats.windows_stolen.load(Relaxed), 0);
            assert_eq!(p.window.at(p.ns(Instant::now())), 0, "backed off");
            assert_eq!(p.poll(&stats, |_| Probe::Moved), PollEnd::Skipped);
            assert_eq!(stats.windows_skipped.load(Relaxed), 1);
            // A fixed window polls on through it, counted all the same.
            let stats = Pacing::default();
            let mut p = Pacer::with_switches(
                PollPolicy {
                    mode: PollMode::Fixed,
                    ..policy
                },
                switches,
            );
            assert_eq!(p.poll(&stats, gap_then_nothing), PollEnd::Empty);
            assert_eq!(stats.windows_preempted.load(Relaxed), 1);
        }
    }

    #[test]
    fn the_kernel_counts_this_threads_involuntary_switches() {
        // Two threads spinning on one CPU: the scheduler preempts this one within a few time
        // slices, and the count moves.
        let (before, now) = sharing_a_cpu(|| {
            let before = involuntary_switches().expect("getrusage");
            let start = Instant::now();
            let mut now = before;
            while now == before && start.elapsed() < Duration::from_secs(10) {
                now = involuntary_switches().expect("getrusage");
            }
            (before, now)
        });
        assert!(
            now > before,
            "no involuntary switch counted in 10 s on a shared CPU"
        );
    }

    #[test]
    fn windows_yield_and_a_vcpu_on_the_cpu_stops_them_at_the_second_lost_turn() {
        static SWITCHES: AtomicU64 = AtomicU64::new(0);
        fn switching() -> Option<u64> {
            Some(SWITCHES.fetch_add(1, Relaxed))
        }
        fn never() -> Option<u64> {
            Some(0)
        }
        /// Another task (a vCPU) runs for 100 us whenever the worker yields.
        fn late() {
            std::thread::sleep(Duration::from_micros(100));
        }
        let policy = PollPolicy {
            budget: Duration::from_millis(200),
            mode: PollMode::Adaptive,
        };
        // Adaptive: the first yield that comes back late does not end the window, the second
        // in a row does.
        let stats = Pacing::default();
        let mut p = Pacer::with_hooks(policy, switching, late);
        p.window.len = p.window.budget;
        assert_eq!(p.poll(&stats, |_| Probe::Nothing), PollEnd::LostCpu);
        assert_eq!(p.lost_in_a_row, LOST_IN_A_ROW);
        // (A gap of the loop itself on a busy machine counts too: at most that many yields.)
        assert!(stats.yields.load(Relaxed) <= u64::from(LOST_IN_A_ROW));
        assert!(stats.yields_late.load(Relaxed) >= 1);
        assert_eq!(stats.windows_preempted.load(Relaxed), 1);
        // Fixed: the window polls to its end through late yields, counting the lost CPU.
        let stats = Pacing::default();
        let mut p = Pacer::with_hooks(
            PollPolicy {
                budget: Duration::from_millis(5),
                mode: PollMode::Fixed,
            },
            switching,
            late,
        );
        assert_eq!(p.poll(&stats, |_| Probe::Nothing), PollEnd::Empty);
        assert!(stats.yields_late.load(Relaxed) >= 2);
        assert_eq!(stats.windows_preempted.load(Relaxed), 1);
        // Late yields with no other task counted (the hypervisor's doing): the window goes on.
        let stats = Pacing::default();
        let mut p = Pacer::with_hooks(policy, never, late);
        p.window.len = 2_000_000;
        assert_eq!(p.poll(&stats, |_| Probe::Nothing), PollEnd::Empty);
        assert!(stats.yields_late.load(Relaxed) >= 2);
        assert_eq!(stats.windows_stolen.load(Relaxed), 1);
        assert_eq!(stats.windows_preempted.load(Relaxed), 0);
        // Yields that come straight back clear the count: the window polls to its end.
        let stats = Pacing::default();
        let mut p = Pacer::with_switches(policy, switching);
        p.lost_in_a_row = 1;
        p.window.len = 2_000_000;
        let end = p.poll(&stats, |_| Probe::Nothing);
        assert!(
            stats.yields.load(Relaxed) >= 1,
            "yields every {YIELD_EVERY} spins"
        );
        if stats.yields_late.load(Relaxed) == 0 && stats.windows_preempted.load(Relaxed) == 0 {
            assert_eq!(end, PollEnd::Empty);
            assert_eq!(p.lost_in_a_row, 0);
        }
    }

    #[test]
    fn a_window_at_the_start_length_or_the_budget_is_kept() {
        // Halving down to exactly the start length keeps polling.
        let mut w = Window::new(50 * US);
        w.len = 2 * START_NS;
        w.woke(10 * MS, true);
        assert_eq!(w.len, START_NS);
        // A sleep exactly as long as the budget is not a quiet driver: the window grows.
        w.woke(50 * US, true);
        assert_eq!(w.len, 2 * START_NS);
    }

    #[test]
    fn a_pacer_polls_its_window_and_reports_how_it_ended() {
        let stats = Pacing::default();
        let mut p = Pacer::new(PollPolicy {
            budget: Duration::from_micros(200),
            mode: PollMode::Adaptive,
        });
        // Found on the third look.
        assert_eq!(
            p.poll(&stats, |spins| if spins == 2 {
                Probe::Moved
            } else {
                Probe::Nothing
            }),
            PollEnd::Moved
        );
        assert_eq!(p.poll(&stats, |_| Probe::Stop), PollEnd::Stopped);
        // Nothing: the window (START_NS) passes, or the worker lost its CPU in a loaded
        // test run; either way nothing was found.
        let end = p.poll(&stats, |_| Probe::Nothing);
        assert!(matches!(end, PollEnd::Empty | PollEnd::LostCpu), "{end:?}");
        let fixed = Pacer::new(PollPolicy {
            budget: Duration::ZERO,
            mode: PollMode::Fixed,
        })
        .poll(&stats, |_| Probe::Moved);
        assert_eq!(fixed, PollEnd::Skipped, "a zero budget never polls");
        let skipped = stats.windows_skipped.load(Relaxed);
        let mut off = Pacer::new(PollPolicy {
            budget: Duration::ZERO,
            mode: PollMode::Adaptive,
        });
        assert_eq!(off.poll(&stats, |_| Probe::Moved), PollEnd::Skipped);
        assert_eq!(
            stats.windows_skipped.load(Relaxed),
            skipped,
            "no window to skip when polling is off"
        );
    }
}
