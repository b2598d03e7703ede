// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Rate-limited logging: a guest can make the daemon answer bad requests forever, but not fill
//! the host's logs. Each call site owns a [`RateLimit`]; lines beyond the budget are counted and
//! the count is reported with the next line that gets through.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// At most `burst` lines, refilled at `per_second`.
#[derive(Debug)]
pub struct RateLimit {
    state: Mutex<Bucket>,
    burst: u32,
    per_second: u32,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(burst: u32, per_second: u32) -> Self {
        RateLimit {
            state: Mutex::new(Bucket {
                tokens: burst as f64,
                last: None,
                suppressed: 0,
            }),
            burst,
            per_second,
        }
    }

    /// Whether a line may be logged now; `Some(n)` with the number of lines suppressed since
    /// the last one that got through.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = b
            .last
            .map_or(Duration::ZERO, |last| now.saturating_duration_since(last));
        b.last = Some(now);
        b.tokens = (b.tokens + elapsed.as_secs_f64() * f64::from(self.per_second))
            .min(f64::from(self.burst));
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed += 1;
            None
        }
    }
}

/// Logs at `level` through a static [`RateLimit`] owned by the call site (10 lines a second,
/// bursts of 20), appending how many lines were dropped since the last one.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new(20, 10);
        if log::log_enabled!($level) {
            if let Some(suppressed) = LIMIT.check() {
                if suppressed > 0 {
                    log::log!($level, "{} ({} similar lines suppressed)", format_args!($($arg)+), suppressed);
                } else {
                    log::log!($level, $($arg)+);
                }
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_and_suppressed_count() {
        let limit = RateLimit::new(3, 10);
        let t0 = Instant::now();
        assert_eq!(limit.check_at(t0), Some(0));
        assert_eq!(limit.check_at(t0), Some(0));
        assert_eq!(limit.check_at(t0), Some(0));
        assert_eq!(limit.check_at(t0), None);
        assert_eq!(limit.check_at(t0), None);
        // 100 ms later one token is back, and the two dropped lines are reported.
        assert_eq!(limit.check_at(t0 + Duration::from_millis(100)), Some(2));
        assert_eq!(limit.check_at(t0 + Duration::from_millis(100)), None);
    }
}
