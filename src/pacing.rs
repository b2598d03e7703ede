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
//! - a window ends at once when the worker notices it lost its CPU meanwhile (two clock reads
//!   of the poll loop far apart: another task ran on its CPU), and windows at the full budget
//!   that keep ending empty just before the next request (what a worker sees that holds up the
//!   vCPU on its own CPU) count the same: the worker then polls no more for a while (1 ms,
//!   doubling while it keeps happening, up to 1 s) and sleeps, so that a kick wakes it, on a
//!   free CPU if there is one, and the scheduler preempts for it otherwise.
//!
//! `fixed` keeps every window at the budget and yields the CPU every 1024 spins (the daemon's
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
    /// Every window is the budget; the worker yields the CPU every 1024 spins.
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
/// Windows at the full budget in a row that ended empty just before the next request.
const MISSES: u32 = 4;
/// The back-off after trouble (a lost CPU, or `MISSES`), doubled while trouble follows trouble
/// within four back-offs, back to the minimum after a calm spell.
const BACKOFF_MIN_NS: u64 = 1_000_000;
const BACKOFF_MAX_NS: u64 = 1_000_000_000;
/// `--poll-mode fixed` yields every this many spins.
const FIXED_YIELD_EVERY: u32 = 1024;
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
    /// Full-budget windows in a row that ended empty just before the next request.
    misses: u32,
}

impl Window {
    fn new(budget: u64) -> Window {
        Window {
            budget,
            len: START_NS.min(budget),
            quiet_until: 0,
            backoff: BACKOFF_MIN_NS,
            trouble_at: None,
            misses: 0,
        }
    }

    /// The worker woke at `now` after sleeping `slept`; `after_empty` when a window ran before
    /// the sleep and found nothing.
    fn woke(&mut self, now: u64, slept: u64, after_empty: bool) {
        if self.budget == 0 {
            return;
        }
        if slept > self.budget {
            // The driver went quiet for longer than a window can cover.
            self.len /= 2;
            if self.len < START_NS {
                self.len = 0;
            }
            self.misses = 0;
        } else if after_empty {
            if self.len < self.budget {
                // The next request came soon after the window: a longer one might catch it.
                self.len = (self.len * 2).clamp(START_NS, self.budget);
            } else {
                self.misses += 1;
                if self.misses >= MISSES {
                    // Whole budgets spent for nothing, the request right behind each: the gap
                    // is longer than the budget, or (the usual case) the worker holds up the
                    // vCPU it waits for.
                    self.trouble(now);
                }
            }
        } else if self.len == 0 {
            self.len = START_NS.min(self.budget);
        }
    }

    /// A window found work.
    fn caught(&mut self) {
        self.misses = 0;
    }

    /// Polling hurts (the worker lost its CPU, or kept missing): none for a while.
    fn trouble(&mut self, now: u64) {
        self.backoff = match self.trouble_at {
            Some(at) if now.saturating_sub(at) <= 4 * self.backoff => {
                (self.backoff * 2).min(BACKOFF_MAX_NS)
            }
            _ => BACKOFF_MIN_NS,
        };
        self.trouble_at = Some(now);
        self.quiet_until = now + self.backoff;
        self.len = START_NS.min(self.budget);
        self.misses = 0;
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

/// Per-worker state: the window and the timing samples in flight.
#[derive(Debug)]
pub struct Pacer {
    policy: PollPolicy,
    window: Window,
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
    pub fn new(policy: PollPolicy) -> Pacer {
        Pacer {
            policy,
            window: Window::new(policy.budget.as_nanos() as u64),
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
            let before = self.window.backoff;
            let trouble = self.window.trouble_at;
            self.window
                .woke(self.ns(now), slept, self.slept_after_empty);
            if self.window.trouble_at != trouble {
                Pacing::add(&stats.backoffs_missed, 1);
            }
            if self.window.backoff != before {
                Pacing::set(&stats.backoff_ns, self.window.backoff);
            }
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
                if since > LOST_CPU_NS {
                    lost = true;
                    if !fixed {
                        break PollEnd::LostCpu;
                    }
                }
                if now.duration_since(start).as_nanos() as u64 >= window {
                    break PollEnd::Empty;
                }
            }
            if fixed && spins % FIXED_YIELD_EVERY == 0 {
                // Give the CPU away if someone else (a vCPU) waits for it.
                let before = Instant::now();
                std::thread::yield_now();
                Pacing::add(&stats.yields, 1);
                if before.elapsed().as_nanos() as u64 > LOST_CPU_NS {
                    Pacing::add(&stats.yields_late, 1);
                }
            }
            std::hint::spin_loop();
        };
        let now = Instant::now();
        Pacing::add(&stats.poll_ns, now.duration_since(start).as_nanos() as u64);
        if lost {
            Pacing::add(&stats.windows_preempted, 1);
        }
        match end {
            PollEnd::Moved => {
                self.window.caught();
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
    use super::*;

    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;

    #[test]
    fn windows_grow_while_the_next_request_comes_just_after_them() {
        let mut w = Window::new(50 * US);
        assert_eq!(w.len, START_NS);
        let mut now = 0;
        for expect in [8 * US, 16 * US, 32 * US, 50 * US, 50 * US] {
            now += 20 * US;
            w.woke(now, 10 * US, true);
            assert_eq!(w.len, expect);
        }
        // Caught: the window stays.
        w.caught();
        now += 20 * US;
        w.woke(now, 10 * US, false);
        assert_eq!(w.len, 50 * US);
    }

    #[test]
    fn windows_shrink_to_nothing_while_the_driver_is_quiet_and_come_back() {
        let mut w = Window::new(50 * US);
        w.len = 50 * US;
        let mut now = 0;
        for expect in [25 * US, 12_500, 6_250, 0, 0] {
            now += 10 * MS;
            w.woke(now, 10 * MS, true);
            assert_eq!(w.len, expect);
        }
        // A short gap again: polling resumes at the start.
        now += 10 * US;
        w.woke(now, 10 * US, false);
        assert_eq!(w.len, START_NS);
        assert_eq!(w.at(now), START_NS);
    }

    #[test]
    fn full_windows_that_keep_missing_back_off() {
        let mut w = Window::new(50 * US);
        w.len = 50 * US;
        let mut now = 0;
        for _ in 0..MISSES - 1 {
            now += 60 * US;
            w.woke(now, 5 * US, true);
            assert_eq!(w.at(now), 50 * US);
        }
        // A catch in between starts the count again.
        w.caught();
        for _ in 0..MISSES - 1 {
            now += 60 * US;
            w.woke(now, 5 * US, true);
        }
        assert_eq!(w.at(now), 50 * US);
        now += 60 * US;
        w.woke(now, 5 * US, true);
        assert_eq!(w.at(now), 0, "backed off");
        assert_eq!(w.at(now + BACKOFF_MIN_NS - 1), 0);
        assert_eq!(w.at(now + BACKOFF_MIN_NS), START_NS, "back, from the start");
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
        // Calm for more than four back-offs: back to the minimum.
        now += 4 * BACKOFF_MAX_NS + 1;
        w.trouble(now);
        assert_eq!(w.backoff, BACKOFF_MIN_NS);
    }

    #[test]
    fn no_budget_no_window() {
        let mut w = Window::new(0);
        assert_eq!(w.at(0), 0);
        w.woke(10, 5, true);
        w.woke(20, 5, false);
        assert_eq!(w.at(30), 0);
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
    }
}
