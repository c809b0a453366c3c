//! Kernel timestamps (`bpf_ktime_get_boot_ns`, CLOCK_BOOTTIME) to wall-clock time.

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime - boottime, in ns.
    offset: i128,
}

fn now(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    /// Samples both clocks a few times and keeps the tightest bracket.
    pub fn sample() -> Clock {
        let mut best = (i128::MAX, 0i128);
        for _ in 0..5 {
            let b1 = now(libc::CLOCK_BOOTTIME);
            let r = now(libc::CLOCK_REALTIME);
            let b2 = now(libc::CLOCK_BOOTTIME);
            if b2 - b1 < best.0 {
                best = (b2 - b1, r - (b1 + b2) / 2);
            }
        }
        Clock { offset: best.1 }
    }

    pub fn to_unix_ns(&self, boot_ns: u64) -> u64 {
        (boot_ns as i128 + self.offset).max(0) as u64
    }

    pub fn boot_now_ns() -> u64 {
        now(libc::CLOCK_BOOTTIME) as u64
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn boot_to_unix_matches_system_time() {
        let c = super::Clock::sample();
        let unix = c.to_unix_ns(super::Clock::boot_now_ns());
        let sys = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        assert!(
            (unix as i128 - sys).abs() < 5_000_000,
            "off by {} ns",
            unix as i128 - sys
        );
    }
}
