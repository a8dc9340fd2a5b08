//! Crontab-style schedules for beat entries: the five fields of cron (minute, hour, day of
//! month, month, day of week) with `*`, lists, ranges, steps and three-letter names, matched
//! in UTC. A crontab entry sits on the one-minute grid; its ticks are the minutes that match.

use std::fmt;

use chrono::{DateTime, Datelike, Timelike};

/// A parsed crontab line.
#[derive(Debug, Clone, PartialEq)]
pub struct Cron {
    text: String,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Cron's rule: when both day fields are restricted, a day matches if either does.
    days_restricted: bool,
    weekdays_restricted: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// What a crontab line may look like, for error messages.
pub const CRON_ACCEPTED: &str = "five cron fields in UTC, \"minute hour day-of-month month \
     day-of-week\", each *, a number, a range a-b, a step */n or a-b/n, or a list of those, \
     e.g. \"*/5 * * * *\" or \"0 9 * * mon-fri\"";

impl Cron {
    /// Parses a line; the error says which field is wrong.
    pub fn parse(text: &str) -> Result<Cron, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(format!("{} fields where cron has 5", fields.len()));
        };
        let weekdays = field(weekday, "day of week", 0, 7, &WEEKDAYS, 0)?;
        // 7 is Sunday too.
        let weekdays = (weekdays | (weekdays >> 7)) & 0x7f;
        let cron = Cron {
            text: fields.join(" "),
            minutes: field(minute, "minute", 0, 59, &[], 0)?,
            hours: field(hour, "hour", 0, 23, &[], 0)?,
            days: field(day, "day of month", 1, 31, &[], 0)?,
            months: field(month, "month", 1, 12, &MONTHS, 1)?,
            weekdays,
            days_restricted: day != "*",
            weekdays_restricted: weekday != "*",
        };
        // Within 8 years every date that can exist has existed (29 February included).
        let start = 0i64;
        if !(0..8 * 366).any(|d| cron.matches_day(start + d * 86_400)) {
            return Err("no date ever matches (such as 30 February)".into());
        }
        Ok(cron)
    }

    /// Whether minute `minute` since the Unix epoch matches.
    pub fn matches_minute(&self, minute: u64) -> bool {
        let secs = minute.saturating_mul(60).min(i64::MAX as u64) as i64;
        let Some(t) = DateTime::from_timestamp(secs, 0) else {
            return false;
        };
        bit(self.minutes, t.minute()) && bit(self.hours, t.hour()) && self.matches_day(secs)
    }

    fn matches_day(&self, secs: i64) -> bool {
        let Some(t) = DateTime::from_timestamp(secs, 0) else {
            return false;
        };
        if !bit(self.months, t.month()) {
            return false;
        }
        let day = bit(self.days, t.day());
        let weekday = bit(self.weekdays, t.weekday().num_days_from_sunday());
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => day || weekday,
            _ => day && weekday,
        }
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn bit(mask: u64, n: u32) -> bool {
    mask & (1 << n) != 0
}

/// One field as a bit mask; `names[i]` stands for `i + name_base`.
fn field(
    text: &str,
    what: &str,
    min: u32,
    max: u32,
    names: &[&str],
    name_base: u32,
) -> Result<u64, String> {
    let bad = || format!("the {what} field {text:?} is not valid ({min} to {max})");
    let value = |s: &str| -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        let n = match names.iter().position(|n| *n == lower) {
            Some(i) => i as u32 + name_base,
            None => s.parse().map_err(|_| bad())?,
        };
        if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(bad())
        }
    };
    let mut mask = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().ok().filter(|s| *s > 0).ok_or_else(bad)?),
            None => (part, 1),
        };
        let (lo, hi) = match range {
            "*" => (min, max),
            r => match r.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                // `5/15` means from 5 to the end in steps of 15, as in Vixie cron.
                None if part.contains('/') => (value(r)?, max),
                None => {
                    let v = value(r)?;
                    (v, v)
                }
            },
        };
        if lo > hi {
            return Err(bad());
        }
        for n in (lo..=hi).step_by(step as usize) {
            mask |= 1 << n;
        }
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minute index of a UTC date and time.
    fn at(text: &str) -> u64 {
        (DateTime::parse_from_rfc3339(text).unwrap().timestamp() / 60) as u64
    }

    #[test]
    fn fields_steps_ranges_and_names() {
        let c = Cron::parse("*/15 9-17 * * mon-fri").unwrap();
        assert!(c.matches_minute(at("2026-11-25T09:45:00Z"))); // a Wednesday
        assert!(!c.matches_minute(at("2026-11-25T09:46:00Z")));
        assert!(!c.matches_minute(at("2026-11-25T18:00:00Z")));
        assert!(!c.matches_minute(at("2026-11-29T10:00:00Z"))); // a Sunday
        let c = Cron::parse("0 0 1 jan,jul *").unwrap();
        assert!(c.matches_minute(at("2027-07-01T00:00:00Z")));
        assert!(!c.matches_minute(at("2027-08-01T00:00:00Z")));
        let sunday = Cron::parse("30 6 * * 7").unwrap();
        assert!(sunday.matches_minute(at("2026-11-29T06:30:00Z")));
        assert_eq!(sunday.to_string(), "30 6 * * 7");
        let c = Cron::parse("5/20 * * * *").unwrap();
        let hits: Vec<u64> = (0..60)
            .filter(|m| c.matches_minute(at("2026-11-25T10:00:00Z") + m))
            .collect();
        assert_eq!(hits, [5, 25, 45]);
    }

    #[test]
    fn both_day_fields_restricted_means_either() {
        // The 13th, or any Friday (cron's rule).
        let c = Cron::parse("0 12 13 * fri").unwrap();
        assert!(c.matches_minute(at("2026-11-13T12:00:00Z")));
        assert!(c.matches_minute(at("2026-11-27T12:00:00Z")));
        assert!(!c.matches_minute(at("2026-11-26T12:00:00Z")));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let err = |t: &str| Cron::parse(t).unwrap_err();
        assert!(err("* * * *").contains("4 fields"));
        assert!(err("60 * * * *").contains("minute field \"60\""));
        assert!(err("* 5-2 * * *").contains("hour field"));
        assert!(err("*/0 * * * *").contains("minute field"));
        assert!(err("* * * foo *").contains("month field"));
        assert!(err("0 0 30 feb *").contains("no date ever matches"));
        assert!(Cron::parse("0 0 29 2 *").is_ok());
    }
}
