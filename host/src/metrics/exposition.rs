//! The Prometheus text exposition format (version 0.0.4), written by hand: `# HELP` and
//! `# TYPE` once per family, then one line per sample, label values escaped.
//!
//! This module only formats; it must never read a metric itself, and never write a label
//! value without escaping it.

use std::fmt::Write as _;

/// The `Content-Type` of a scrape answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample's value: counts are written exactly, measurements as decimals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    Int(u64),
    Float(f64),
}

impl From<u64> for Num {
    fn from(v: u64) -> Self {
        Num::Int(v)
    }
}

impl From<usize> for Num {
    fn from(v: usize) -> Self {
        Num::Int(v as u64)
    }
}

impl From<f64> for Num {
    fn from(v: f64) -> Self {
        Num::Float(v)
    }
}

/// The labels of one sample, in order.
#[derive(Debug, Clone, Copy)]
pub struct Labels<'a>(pub &'a [(&'static str, &'a str)]);

impl Labels<'static> {
    /// No labels.
    pub const NONE: Labels<'static> = Labels(&[]);
}

/// A whole scrape answer being written.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self {
            out: String::with_capacity(16 << 10),
        }
    }

    /// Starts a family: writes its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &'static str, kind: Kind, help: &str) -> Family<'_> {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        Family {
            out: &mut self.out,
            name,
        }
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &'static str, kind: Kind, help: &str, value: impl Into<Num>) {
        self.family(name, kind, help).sample(&Labels::NONE, value);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// The samples of one family.
pub struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl Family<'_> {
    /// One sample named as the family.
    pub fn sample(&mut self, labels: &Labels<'_>, value: impl Into<Num>) {
        self.line("", labels, None, value.into());
    }

    /// One sample named `family + suffix` (a histogram's `_sum` and `_count`).
    pub fn sample_suffixed(&mut self, suffix: &str, labels: &Labels<'_>, value: impl Into<Num>) {
        self.line(suffix, labels, None, value.into());
    }

    /// A histogram bucket: `labels` plus `le`.
    pub fn sample_le(
        &mut self,
        suffix: &str,
        labels: &Labels<'_>,
        le: &str,
        value: impl Into<Num>,
    ) {
        self.line(suffix, labels, Some(le), value.into());
    }

    fn line(&mut self, suffix: &str, labels: &Labels<'_>, le: Option<&str>, value: Num) {
        let out = &mut *self.out;
        out.push_str(self.name);
        out.push_str(suffix);
        let mut pairs = labels.0.iter().copied().chain(le.map(|v| ("le", v)));
        if let Some((k, v)) = pairs.next() {
            out.push('{');
            write_pair(out, k, v);
            for (k, v) in pairs {
                out.push(',');
                write_pair(out, k, v);
            }
            out.push('}');
        }
        out.push(' ');
        match value {
            Num::Int(v) => {
                let _ = write!(out, "{v}");
            }
            Num::Float(v) if v.is_nan() => out.push_str("NaN"),
            Num::Float(v) if v == f64::INFINITY => out.push_str("+Inf"),
            Num::Float(v) if v == f64::NEG_INFINITY => out.push_str("-Inf"),
            Num::Float(v) => {
                let _ = write!(out, "{v}");
            }
        }
        out.push('\n');
    }
}

fn write_pair(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    out.push_str("=\"");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_samples_are_formatted_and_escaped() {
        let mut e = Exposition::new();
        e.single("a_total", Kind::Counter, "A.", 3u64);
        let mut f = e.family("b", Kind::Gauge, "B with \\ and\nnewline.");
        f.sample(&Labels(&[("x", "q\"\\\n"), ("y", "2")]), 0.5);
        f.sample(&Labels::NONE, f64::INFINITY);
        f.sample_le("_bucket", &Labels(&[("s", "t")]), "+Inf", 7u64);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP a_total A.\n# TYPE a_total counter\na_total 3\n\
             # HELP b B with \\\\ and\\nnewline.\n# TYPE b gauge\n\
             b{x=\"q\\\"\\\\\\n\",y=\"2\"} 0.5\nb +Inf\nb_bucket{s=\"t\",le=\"+Inf\"} 7\n"
        );
    }
}
