//! Wall-clock time for audit events: unix milliseconds, RFC 3339 text (always UTC, `Z`,
//! millisecond precision) and the parsing of the `from`/`to` filters.
//!
//! Must never depend on the local time zone, and never accept a timestamp it cannot represent.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-05-12T10:14:33.871Z`
pub fn format_rfc3339_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

/// `20260512T101433Z`, for file names.
pub fn format_compact(ms: i64) -> String {
    let t = format_rfc3339_ms(ms);
    // "YYYY-MM-DDTHH:MM:SS.mmmZ" → "YYYYMMDDTHHMMSSZ"
    let mut out: String = t[..19].chars().filter(|c| *c != '-' && *c != ':').collect();
    out.push('Z');
    out
}

/// Parses RFC 3339 (`2026-05-12T10:14:33Z`, fractional seconds and numeric offsets allowed) or a
/// bare date (`2026-05-12`, midnight UTC) into unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = s.get(from..from + len)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    if civil_from_days(days) != (y, mo as u32, d as u32) {
        return None; // e.g. February 30th
    }
    let mut ms = days * 86_400_000;
    if b.len() == 10 {
        return Some(ms);
    }
    if !matches!(b[10], b'T' | b't' | b' ') || b.len() < 19 || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    ms += ((h * 60 + mi) * 60 + sec.min(59)) * 1000;
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 3)];
        let mut frac_ms: i64 = frac.parse().ok()?;
        for _ in frac.len()..3 {
            frac_ms *= 10;
        }
        ms += frac_ms;
    }
    match &s[i..] {
        "Z" | "z" => Some(ms),
        off if off.len() == 6 && (off.starts_with('+') || off.starts_with('-')) => {
            if off.as_bytes()[3] != b':' {
                return None;
            }
            let oh = num(i + 1, 2)?;
            let om = num(i + 4, 2)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let offset = (oh * 60 + om) * 60_000;
            Some(if off.starts_with('+') {
                ms - offset
            } else {
                ms + offset
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        let ms = parse_rfc3339("2026-05-12T10:14:33.871Z").expect("parse");
        assert_eq!(format_rfc3339_ms(ms), "2026-05-12T10:14:33.871Z");
        assert_eq!(format_compact(ms), "20260512T101433Z");
        assert_eq!(
            parse_rfc3339("2026-05-12T12:14:33.871+02:00"),
            Some(ms),
            "offsets are applied"
        );
        assert_eq!(
            parse_rfc3339("2024-02-29"),
            parse_rfc3339("2024-02-29T00:00:00Z")
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00Z"),
            Some(1_709_164_800_000)
        );
        for bad in [
            "2023-02-29",
            "2026-13-01",
            "2026-05-12T25:00:00Z",
            "2026-05-12T10:14:33",
            "yesterday",
            "2026-05-12T10:14:33.Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        // Round trip over a range of days, including before 1970 (years 327..4160).
        for day in (-600_000i64..800_000).step_by(997) {
            let ms = day * 86_400_000 + 12_345;
            assert_eq!(parse_rfc3339(&format_rfc3339_ms(ms)), Some(ms));
        }
    }
}
