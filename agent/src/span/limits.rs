//! The OpenTelemetry attribute limits (`OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`,
//! `OTEL_ATTRIBUTE_COUNT_LIMIT`, and their `OTEL_SPAN_*` forms, which win): values longer than the
//! limit are cut to that many characters, attributes past the count are dropped and counted on the
//! span (`dropped_attributes_count` in OTLP).
use super::{Span, Value};

/// The SDKs' default attribute count limit.
pub const DEFAULT_COUNT: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Characters kept of a string value (None: no limit, the SDKs' default).
    pub value_len: Option<usize>,
    pub count: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            value_len: None,
            count: DEFAULT_COUNT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{name}={value:?} is not a non-negative whole number")]
pub struct LimitError {
    name: &'static str,
    value: String,
}

fn number(name: &'static str, value: Option<String>) -> Result<Option<usize>, LimitError> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| LimitError {
            name,
            value: v.to_owned(),
        }),
    }
}

impl Limits {
    pub fn from_env() -> Result<Limits, LimitError> {
        let get = |k: &str| std::env::var(k).ok();
        Limits::from_values(
            get("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT"),
            get("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"),
            get("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"),
            get("OTEL_ATTRIBUTE_COUNT_LIMIT"),
        )
    }

    pub fn from_values(
        span_len: Option<String>,
        len: Option<String>,
        span_count: Option<String>,
        count: Option<String>,
    ) -> Result<Limits, LimitError> {
        let value_len = match number("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", span_len)? {
            Some(n) => Some(n),
            None => number("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", len)?,
        };
        let count = match number("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", span_count)? {
            Some(n) => n,
            None => number("OTEL_ATTRIBUTE_COUNT_LIMIT", count)?.unwrap_or(DEFAULT_COUNT),
        };
        Ok(Limits { value_len, count })
    }

    /// Applies the limits to `span`'s attributes.
    pub fn apply(&self, span: &mut Span) {
        if span.attributes.len() > self.count {
            span.dropped_attributes_count += (span.attributes.len() - self.count) as u32;
            span.attributes.truncate(self.count);
        }
        let Some(max) = self.value_len else { return };
        for a in &mut span.attributes {
            if let Value::Str(s) = &mut a.value {
                if let Some((cut, _)) = s.char_indices().nth(max) {
                    s.to_mut().truncate(cut);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.into())
    }

    #[test]
    fn span_forms_win_and_garbage_is_refused() {
        assert_eq!(
            Limits::from_values(None, None, None, None).unwrap(),
            Limits::default()
        );
        let l = Limits::from_values(s("10"), s("99"), None, s("5")).unwrap();
        assert_eq!((l.value_len, l.count), (Some(10), 5));
        let l = Limits::from_values(None, s("7"), s("3"), s("5")).unwrap();
        assert_eq!((l.value_len, l.count), (Some(7), 3));
        let e = Limits::from_values(s("ten"), None, None, None).unwrap_err();
        assert!(
            e.to_string()
                .contains("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT"),
            "{e}"
        );
        assert!(Limits::from_values(None, None, None, s("-1")).is_err());
    }
}
