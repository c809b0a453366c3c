//! Head sampling as OpenTelemetry users configure it: `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG`. The decision for a trace is made where it starts; a span with a
//! parent follows the parent's sampled flag under the `parentbased_*` samplers.

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    /// Keep traces whose id falls below this ratio.
    Ratio(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    pub root: Root,
    /// Follow the incoming sampled flag when there is a parent.
    pub parent_based: bool,
}

impl Default for Sampler {
    /// The SDK default: `parentbased_always_on`.
    fn default() -> Self {
        Sampler {
            root: Root::AlwaysOn,
            parent_based: true,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplerError {
    #[error("OTEL_TRACES_SAMPLER={0:?} is not supported: use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio")]
    Unknown(String),
    #[error("OTEL_TRACES_SAMPLER_ARG={0:?} is not a ratio between 0 and 1")]
    Ratio(String),
}

impl Sampler {
    pub fn from_env() -> Result<Sampler, SamplerError> {
        Self::from_values(
            std::env::var("OTEL_TRACES_SAMPLER").ok(),
            std::env::var("OTEL_TRACES_SAMPLER_ARG").ok(),
        )
    }

    pub fn from_values(name: Option<String>, arg: Option<String>) -> Result<Sampler, SamplerError> {
        let name = name
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty());
        let ratio = || -> Result<f64, SamplerError> {
            match arg.as_deref().map(str::trim).filter(|a| !a.is_empty()) {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| SamplerError::Ratio(a.to_owned())),
            }
        };
        let (root, parent_based) = match name.as_deref() {
            None | Some("parentbased_always_on") => (Root::AlwaysOn, true),
            Some("parentbased_always_off") => (Root::AlwaysOff, true),
            Some("parentbased_traceidratio") => (Root::Ratio(ratio()?), true),
            Some("always_on") => (Root::AlwaysOn, false),
            Some("always_off") => (Root::AlwaysOff, false),
            Some("traceidratio") => (Root::Ratio(ratio()?), false),
            Some(other) => return Err(SamplerError::Unknown(other.to_owned())),
        };
        Ok(Sampler { root, parent_based })
    }

    /// The kernel's form of the root decision: keep when `(low 8 bytes of the trace id) >> 1` is
    /// below this (see `sample`).
    pub fn kernel_threshold(&self) -> u64 {
        match self.root {
            Root::AlwaysOn => agent_common::SAMPLE_ALWAYS,
            Root::AlwaysOff => 0,
            Root::Ratio(r) if r >= 1.0 => agent_common::SAMPLE_ALWAYS,
            Root::Ratio(r) if r <= 0.0 => 0,
            Root::Ratio(r) => (r * (1u64 << 63) as f64) as u64,
        }
    }

    /// Whether to record a span of `trace_id`; `parent_sampled` is the incoming flag, if any.
    pub fn sample(&self, trace_id: &[u8; 16], parent_sampled: Option<bool>) -> bool {
        if let (true, Some(flag)) = (self.parent_based, parent_sampled) {
            return flag;
        }
        match self.root {
            Root::AlwaysOn => true,
            Root::AlwaysOff => false,
            Root::Ratio(r) if r >= 1.0 => true,
            Root::Ratio(r) if r <= 0.0 => false,
            Root::Ratio(r) => {
                // The low 8 bytes of the trace id, as the SDKs' TraceIdRatioBased does, so every hop
                // of a trace reaches the same decision. Compared in integers on 63 bits.
                let mut low = [0u8; 8];
                low.copy_from_slice(&trace_id[8..]);
                let x = u64::from_be_bytes(low) >> 1;
                x < (r * (1u64 << 63) as f64) as u64
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, arg: Option<&str>) -> Result<Sampler, SamplerError> {
        Sampler::from_values(Some(name.into()), arg.map(Into::into))
    }

    #[test]
    fn parses_every_sampler() {
        assert_eq!(
            Sampler::from_values(None, None).unwrap(),
            Sampler::default()
        );
        assert_eq!(
            s("always_off", None).unwrap(),
            Sampler {
                root: Root::AlwaysOff,
                parent_based: false
            }
        );
        assert_eq!(
            s("parentbased_traceidratio", Some("0.25")).unwrap().root,
            Root::Ratio(0.25)
        );
        assert_eq!(s("TraceIdRatio", None).unwrap().root, Root::Ratio(1.0));
        assert!(matches!(
            s("sometimes", None),
            Err(SamplerError::Unknown(_))
        ));
        assert!(matches!(
            s("traceidratio", Some("1.5")),
            Err(SamplerError::Ratio(_))
        ));
        assert!(matches!(
            s("traceidratio", Some("a quarter")),
            Err(SamplerError::Ratio(_))
        ));
    }

    #[test]
    fn parent_based_follows_the_flag() {
        let pb = s("parentbased_always_off", None).unwrap();
        assert!(pb.sample(&[1; 16], Some(true)));
        assert!(!pb.sample(&[1; 16], None));
        let on = s("always_on", None).unwrap();
        assert!(
            on.sample(&[1; 16], Some(false)),
            "non-parent-based samplers ignore the flag"
        );
    }

    #[test]
    fn ratio_is_deterministic_and_about_right() {
        use rand::Rng;
        let q = s("traceidratio", Some("0.25")).unwrap();
        let mut rng = rand::rng();
        let ids: Vec<[u8; 16]> = (0..20_000).map(|_| rng.random()).collect();
        let kept = ids.iter().filter(|id| q.sample(id, None)).count();
        assert!(
            (4_500..5_500).contains(&kept),
            "kept {kept} of 20000 at 0.25"
        );
        assert!(ids
            .iter()
            .all(|id| q.sample(id, None) == q.sample(id, None)));
        assert!(!s("traceidratio", Some("0"))
            .unwrap()
            .sample(&[0xff; 16], None));
        assert!(s("traceidratio", Some("1"))
            .unwrap()
            .sample(&[0xff; 16], None));
    }
}
