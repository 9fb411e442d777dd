//! A handler's rate limit (`[limits] rate`): a token bucket the transports draw from before
//! they take a message, so a rate-limited handler pulls no more than it can start. A leaf
//! module.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `[limits] rate` and `burst`: messages started per second, on average, and at most at once
/// after a pause.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: u32,
}

/// `per_sec` is finite and positive ([`Rate::parse`]), so equality is total.
impl Eq for Rate {}

impl Rate {
    /// Parses `"500/s"`, `"30/m"` (or `/min`), `"1000/h"`: a positive number of messages per
    /// unit of time.
    pub fn parse(text: &str) -> Result<f64, String> {
        let bad = || {
            format!(
                "rate {text:?} is not a rate; expected messages per second, minute or hour: \"500/s\", \"30/m\", \"1000/h\""
            )
        };
        let (n, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let n: f64 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            _ => return Err(bad()),
        };
        if !(n.is_finite() && n > 0.0) {
            return Err(format!("rate {text:?} must be more than 0"));
        }
        let per_sec = n / per;
        if per_sec > 10_000_000.0 {
            return Err(format!("rate {text:?} is above 10000000/s"));
        }
        Ok(per_sec)
    }

    /// The burst when the manifest does not say: a tenth of a second's worth, at least 1.
    pub fn default_burst(per_sec: f64) -> u32 {
        (per_sec / 10.0).ceil().clamp(1.0, 1_000_000.0) as u32
    }
}

/// A token bucket: starts full (`burst` tokens), refills at `per_sec`.
#[derive(Debug)]
pub struct Limiter {
    rate: Rate,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    pub fn new(rate: Rate) -> Self {
        Limiter { rate, state: Mutex::new((f64::from(rate.burst), Instant::now())) }
    }

    /// The most messages taken at once: a transport pulls no more than this per batch.
    pub fn burst(&self) -> usize {
        self.rate.burst as usize
    }

    /// Takes a token if one is there; otherwise how long until one is.
    fn try_take_or_wait(&self) -> Result<(), Duration> {
        let Ok(mut state) = self.state.lock() else { return Ok(()) };
        let (tokens, at) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate.per_sec).min(f64::from(self.rate.burst));
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate.per_sec))
        }
    }

    /// Takes a token if one is there now.
    pub fn try_take(&self) -> bool {
        self.try_take_or_wait().is_ok()
    }

    /// Waits for a token and takes it.
    pub async fn take(&self) {
        while let Err(wait) = self.try_take_or_wait() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_their_units() {
        assert_eq!(Rate::parse("500/s"), Ok(500.0));
        assert_eq!(Rate::parse("30/m"), Ok(0.5));
        assert_eq!(Rate::parse(" 3600 / h "), Ok(1.0));
        assert_eq!(Rate::parse("2.5/s"), Ok(2.5));
        for bad in ["500", "0/s", "-1/s", "x/s", "5/day", "inf/s", "NaN/s", "20000000/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad} was accepted");
        }
        assert_eq!(Rate::default_burst(200.0), 20);
        assert_eq!(Rate::default_burst(0.5), 1);
    }

    #[test]
    fn the_bucket_starts_full_and_then_refills_at_its_rate() {
        let limiter = Limiter::new(Rate { per_sec: 10.0, burst: 3 });
        assert!(limiter.try_take() && limiter.try_take() && limiter.try_take());
        let wait = limiter.try_take_or_wait().unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
    }
}
