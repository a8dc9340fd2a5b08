//! Crontab-style schedules for beat entries: the five fields of cron (minute, hour, day of
//! month, month, day of week) with `*`, lists, ranges, steps and three-letter names, matched
//! against the wall clock of the `timezone` setting (Celery's, default UTC). A crontab entry
//! sits on the one-minute grid of UTC; its ticks are the minutes whose local time matches.
//!
//! Daylight-saving changes, as Vixie cron treats them: for an entry at fixed hours, a
//! wall-clock time skipped when clocks go forward runs at the first minute after the jump
//! (once, however many skipped minutes match), and a time that happens twice when clocks go
//! back runs at its first occurrence only. An entry for every hour (`*` in the hour field)
//! follows real time instead: it runs in both passes of a repeated hour and has nothing to
//! catch up after a skipped one, so `*/15 * * * *` stays every 15 minutes across the change.

use std::fmt;

use chrono::offset::LocalResult;
use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, TimeZone, Timelike};
use chrono_tz::Tz;

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
    /// Fixed hours get the daylight-saving adjustments; every hour follows real time.
    hours_restricted: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// What a crontab line may look like, for error messages.
pub const CRON_ACCEPTED: &str =
    "five cron fields in the timezone setting, \"minute hour day-of-month month \
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
            hours_restricted: hour != "*",
        };
        // Within 8 years every date that can exist has existed (29 February included).
        let start = NaiveDate::from_ymd_opt(2000, 1, 1).unwrap_or_default();
        if !start.iter_days().take(8 * 366).any(|d| cron.matches_day(d)) {
            return Err("no date ever matches (such as 30 February)".into());
        }
        Ok(cron)
    }

    /// Whether minute `minute` since the Unix epoch is due in time zone `tz`: its wall-clock
    /// time matches (and is not the second pass of a time that happens twice), or it is the
    /// first minute after a forward jump that skipped a matching time.
    pub fn matches_minute(&self, minute: u64, tz: Tz) -> bool {
        let Some(local) = local_minute(minute, tz) else {
            return false;
        };
        if !self.hours_restricted {
            return self.matches_wall(local);
        }
        if self.matches_wall(local) {
            return match tz.from_local_datetime(&local) {
                // Clocks went back: only the earlier of the two instants runs.
                LocalResult::Ambiguous(first, _) => first.naive_utc() == utc_minute(minute),
                _ => true,
            };
        }
        let Some(before) = minute.checked_sub(1).and_then(|m| local_minute(m, tz)) else {
            return false;
        };
        // Clocks went forward: the wall-clock minutes in between never happen.
        let skipped = (local - before).num_minutes() - 1;
        (1..=skipped).any(|k| self.matches_wall(before + chrono::Duration::minutes(k)))
    }

    fn matches_wall(&self, t: NaiveDateTime) -> bool {
        bit(self.minutes, t.minute()) && bit(self.hours, t.hour()) && self.matches_day(t.date())
    }

    fn matches_day(&self, t: NaiveDate) -> bool {
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

/// Minute `minute` since the Unix epoch in UTC.
fn utc_minute(minute: u64) -> NaiveDateTime {
    let secs = minute.saturating_mul(60).min(i64::MAX as u64) as i64;
    DateTime::from_timestamp(secs, 0)
        .map(|t| t.naive_utc())
        .unwrap_or_default()
}

/// The wall-clock time in `tz` at minute `minute` since the Unix epoch.
fn local_minute(minute: u64, tz: Tz) -> Option<NaiveDateTime> {
    let secs = i64::try_from(minute.checked_mul(60)?).ok()?;
    Some(
        DateTime::from_timestamp(secs, 0)?
            .with_timezone(&tz)
            .naive_local(),
    )
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

    impl Cron {
        fn matches_minute_utc(&self, minute: u64) -> bool {
            self.matches_minute(minute, Tz::UTC)
        }
    }

    /// The minutes of `[from, to)` (UTC, RFC 3339) that are due in `tz`, as UTC times.
    fn due_between(c: &Cron, tz: Tz, from: &str, to: &str) -> Vec<String> {
        (at(from)..at(to))
            .filter(|&m| c.matches_minute(m, tz))
            .map(|m| utc_minute(m).format("%Y-%m-%dT%H:%MZ").to_string())
            .collect()
    }

    #[test]
    fn fields_match_the_wall_clock_of_the_time_zone() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let c = Cron::parse("0 9 * * mon-fri").unwrap();
        // 09:00 in Berlin is 08:00 UTC in winter (CET) and 07:00 UTC in summer (CEST).
        assert!(c.matches_minute(at("2026-11-25T08:00:00Z"), berlin));
        assert!(!c.matches_minute(at("2026-11-25T09:00:00Z"), berlin));
        assert!(c.matches_minute(at("2026-07-01T07:00:00Z"), berlin));
        // The day fields use the local date: 00:30 on Saturday in Tokyo is Friday in UTC.
        let tokyo: Tz = "Asia/Tokyo".parse().unwrap();
        let sat = Cron::parse("30 0 * * sat").unwrap();
        assert!(sat.matches_minute(at("2026-11-27T15:30:00Z"), tokyo));
        assert!(!sat.matches_minute(at("2026-11-28T15:30:00Z"), tokyo));
    }

    #[test]
    fn a_time_skipped_by_clocks_going_forward_runs_once_right_after_the_jump() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:30 never happens.
        let c = Cron::parse("30 2 * * *").unwrap();
        let due = due_between(&c, berlin, "2026-03-28T00:00:00Z", "2026-03-31T00:00:00Z");
        assert_eq!(
            due,
            [
                "2026-03-28T01:30Z",
                "2026-03-29T01:00Z",
                "2026-03-30T00:30Z"
            ]
        );
        // Every minute of the skipped hour matches, yet the job runs once for all of them.
        let c = Cron::parse("* 2 29 3 *").unwrap();
        let due = due_between(&c, berlin, "2026-03-29T00:00:00Z", "2026-03-29T03:00:00Z");
        assert_eq!(due, ["2026-03-29T01:00Z"]);
        // An every-hour entry has nothing to catch up: the skipped hour is an hour of real
        // time it ran through.
        let c = Cron::parse("30 * * * *").unwrap();
        let due = due_between(&c, berlin, "2026-03-29T00:00:00Z", "2026-03-29T03:00:00Z");
        assert_eq!(
            due,
            [
                "2026-03-29T00:30Z",
                "2026-03-29T01:30Z",
                "2026-03-29T02:30Z"
            ]
        );
        // A job at a time that exists runs as usual on that day.
        let c = Cron::parse("15 3 * * *").unwrap();
        let due = due_between(&c, berlin, "2026-03-29T00:00:00Z", "2026-03-29T03:00:00Z");
        assert_eq!(due, ["2026-03-29T01:15Z"]);
    }

    #[test]
    fn a_time_that_happens_twice_when_clocks_go_back_runs_once() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // 2026-10-25: 03:00 CEST goes back to 02:00 CET (01:00 UTC); 02:30 happens at 00:30
        // and at 01:30 UTC. Only the first runs.
        let c = Cron::parse("30 2 * * *").unwrap();
        let due = due_between(&c, berlin, "2026-10-24T00:00:00Z", "2026-10-27T00:00:00Z");
        assert_eq!(
            due,
            [
                "2026-10-24T00:30Z",
                "2026-10-25T00:30Z",
                "2026-10-26T01:30Z"
            ]
        );
        // So does every minute of a fixed hour that happens twice.
        let c = Cron::parse("*/20 2 * * *").unwrap();
        let due = due_between(&c, berlin, "2026-10-25T00:00:00Z", "2026-10-25T03:00:00Z");
        assert_eq!(
            due,
            [
                "2026-10-25T00:00Z",
                "2026-10-25T00:20Z",
                "2026-10-25T00:40Z"
            ]
        );
        // An every-hour entry follows real time: every 15 minutes through both passes.
        let c = Cron::parse("*/15 * * * *").unwrap();
        let due = due_between(&c, berlin, "2026-10-25T00:00:00Z", "2026-10-25T02:00:00Z");
        assert_eq!(
            due,
            [
                "2026-10-25T00:00Z",
                "2026-10-25T00:15Z",
                "2026-10-25T00:30Z",
                "2026-10-25T00:45Z",
                "2026-10-25T01:00Z",
                "2026-10-25T01:15Z",
                "2026-10-25T01:30Z",
                "2026-10-25T01:45Z"
            ]
        );
    }

    /// Minute index of a UTC date and time.
    fn at(text: &str) -> u64 {
        (DateTime::parse_from_rfc3339(text).unwrap().timestamp() / 60) as u64
    }

    #[test]
    fn fields_steps_ranges_and_names() {
        let c = Cron::parse("*/15 9-17 * * mon-fri").unwrap();
        assert!(c.matches_minute_utc(at("2026-11-25T09:45:00Z"))); // a Wednesday
        assert!(!c.matches_minute_utc(at("2026-11-25T09:46:00Z")));
        assert!(!c.matches_minute_utc(at("2026-11-25T18:00:00Z")));
        assert!(!c.matches_minute_utc(at("2026-11-29T10:00:00Z"))); // a Sunday
        let c = Cron::parse("0 0 1 jan,jul *").unwrap();
        assert!(c.matches_minute_utc(at("2027-07-01T00:00:00Z")));
        assert!(!c.matches_minute_utc(at("2027-08-01T00:00:00Z")));
        let sunday = Cron::parse("30 6 * * 7").unwrap();
        assert!(sunday.matches_minute_utc(at("2026-11-29T06:30:00Z")));
        assert_eq!(sunday.to_string(), "30 6 * * 7");
        let c = Cron::parse("5/20 * * * *").unwrap();
        let hits: Vec<u64> = (0..60)
            .filter(|m| c.matches_minute_utc(at("2026-11-25T10:00:00Z") + m))
            .collect();
        assert_eq!(hits, [5, 25, 45]);
    }

    #[test]
    fn both_day_fields_restricted_means_either() {
        // The 13th, or any Friday (cron's rule).
        let c = Cron::parse("0 12 13 * fri").unwrap();
        assert!(c.matches_minute_utc(at("2026-11-13T12:00:00Z")));
        assert!(c.matches_minute_utc(at("2026-11-27T12:00:00Z")));
        assert!(!c.matches_minute_utc(at("2026-11-26T12:00:00Z")));
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
