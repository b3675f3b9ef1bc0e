//! Durations as configuration files write them.

use std::time::Duration;

/// `d` in the largest unit that states it exactly (`365days`, `1h`, `15m`,
/// `10s`, `250ms`), so a serialised configuration reads like a written
/// one and parses back (humantime syntax) to the same value.
pub fn format_exact(d: Duration) -> String {
    if d.subsec_nanos() != 0 {
        if d.subsec_nanos().is_multiple_of(1_000_000) {
            return format!("{}ms", d.as_millis());
        }
        return format!("{}ns", d.as_nanos());
    }
    let s = d.as_secs();
    match s {
        0 => "0s".to_owned(),
        // A day reads better as 24h; longer spans in days.
        _ if s.is_multiple_of(86_400) && s > 86_400 => format!("{}days", s / 86_400),
        _ if s.is_multiple_of(3_600) => format!("{}h", s / 3_600),
        _ if s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// Serde `serialize_with` for a [`Duration`] written with [`format_exact`].
pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_exact(*d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_largest_exact_unit() {
        let f = |s| format_exact(Duration::from_secs(s));
        assert_eq!(f(365 * 86_400), "365days");
        assert_eq!(f(3_600), "1h");
        assert_eq!(f(86_400), "24h");
        assert_eq!(f(90 * 60), "90m");
        assert_eq!(f(300), "5m");
        assert_eq!(f(61), "61s");
        assert_eq!(f(0), "0s");
        assert_eq!(format_exact(Duration::from_millis(1500)), "1500ms");
    }
}
