//! Prometheus text exposition (format 0.0.4), the one writer every halo
//! daemon's `/metrics` uses: families with `# HELP` / `# TYPE`, samples
//! with escaped label values, histograms with cumulative buckets. What a
//! daemon measures stays with the daemon; how it is written lives here.
//! [`serve`] (in `metrics/http.rs`) is the `/metrics` listener the agent and
//! the controller share.

mod http;

pub use http::{MetricsListener, ServeError, check_listen, fetch, serve};

use std::fmt::Write as _;

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (reset on restart); names end in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations counted into buckets.
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

/// Upper bounds (seconds) of latency histograms: 1 ms to 2 minutes.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0,
];

/// One histogram's counts against fixed bucket bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations ≤ each bound (not cumulative; summed when written).
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    /// Counts one observation.
    pub fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&le| value <= le) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += value;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// A Prometheus text document being written.
#[derive(Debug, Default)]
pub struct Text {
    out: String,
}

impl Text {
    /// An empty document.
    pub fn new() -> Text {
        Text {
            out: String::with_capacity(4096),
        }
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. Every sample of
    /// the family follows before the next family starts.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Text {
        let _ = writeln!(
            self.out,
            "# HELP {name} {}\n# TYPE {name} {}",
            help_escape(help),
            kind.as_str()
        );
        self
    }

    /// One sample line: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Text {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        self.out.push(' ');
        self.out.push_str(&number(value));
        self.out.push('\n');
        self
    }

    /// A sample whose value is an integer (counters, bytes): written
    /// exactly, where an `f64` would round above 2^53.
    pub fn int(&mut self, name: &str, labels: &[(&str, &str)], value: u64) -> &mut Text {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A histogram's `_bucket` (cumulative, ending with `+Inf`), `_sum`
    /// and `_count` lines, under the family `name`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) -> &mut Text {
        let mut cumulative = 0;
        for (le, n) in h.bounds.iter().zip(&h.buckets) {
            cumulative += n;
            let _ = write!(self.out, "{name}_bucket");
            write_labels(&mut self.out, labels, Some(&number(*le)));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let _ = write!(self.out, "{name}_bucket");
        write_labels(&mut self.out, labels, Some("+Inf"));
        let _ = writeln!(self.out, " {}", h.count);
        let _ = write!(self.out, "{name}_sum");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", number(h.sum));
        let _ = write!(self.out, "{name}_count");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", h.count);
        self
    }

    /// Lines written elsewhere in this format (already escaped), appended
    /// as they are.
    pub fn raw(&mut self, lines: &str) -> &mut Text {
        self.out.push_str(lines);
        if !lines.is_empty() && !lines.ends_with('\n') {
            self.out.push('\n');
        }
        self
    }

    /// The document.
    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        out.push_str(&escape(v));
        out.push('"');
    }
    out.push('}');
}

/// A number as the format spells it (`+Inf`, `-Inf`, `NaN`).
pub fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

/// A label value escaped as the text format requires (`\`, `"`, newline).
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

fn help_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// One sample read from a text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels in order, values unescaped.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

/// The samples of a text exposition (comments and lines that do not parse
/// are skipped): what the agent reads from llama-server and `haloctl top`
/// reads from the agents.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut s = after;
        loop {
            s = s.trim_start_matches([',', ' ']);
            if let Some(r) = s.strip_prefix('}') {
                s = r;
                break;
            }
            let eq = s.find('=')?;
            let key = s[..eq].trim().to_owned();
            let mut chars = s[eq + 1..].strip_prefix('"')?.char_indices();
            let mut value = String::new();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    c => value.push(c),
                }
            };
            labels.push((key, value));
            s = &s[eq + 1 + 1 + end + 1..];
        }
        rest = s;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_histograms_are_written_as_the_format_says() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut t = Text::new();
        t.family("halo_x_total", Kind::Counter, "Things.\nMore.")
            .int("halo_x_total", &[("node", "a\"b\\c\nd")], 3);
        t.family("halo_d_seconds", Kind::Histogram, "Durations.")
            .histogram("halo_d_seconds", &[("op", "get")], &h);
        t.family("halo_g", Kind::Gauge, "A gauge.")
            .sample("halo_g", &[], f64::INFINITY);
        let s = t.finish();
        assert_eq!(
            s,
            "# HELP halo_x_total Things.\\nMore.\n# TYPE halo_x_total counter\n\
             halo_x_total{node=\"a\\\"b\\\\c\\nd\"} 3\n\
             # HELP halo_d_seconds Durations.\n# TYPE halo_d_seconds histogram\n\
             halo_d_seconds_bucket{op=\"get\",le=\"0.1\"} 1\n\
             halo_d_seconds_bucket{op=\"get\",le=\"1\"} 2\n\
             halo_d_seconds_bucket{op=\"get\",le=\"+Inf\"} 3\n\
             halo_d_seconds_sum{op=\"get\"} 5.55\n\
             halo_d_seconds_count{op=\"get\"} 3\n\
             # HELP halo_g A gauge.\n# TYPE halo_g gauge\nhalo_g +Inf\n"
        );
    }

    #[test]
    fn what_is_written_parses_back() {
        let mut t = Text::new();
        t.family("a_total", Kind::Counter, "A.")
            .int("a_total", &[("k", "x\"y,z}"), ("m", "")], 7)
            .sample("a_total", &[], 1.5);
        let s = parse(&t.finish());
        assert_eq!(
            s,
            vec![
                Sample {
                    name: "a_total".into(),
                    labels: vec![("k".into(), "x\"y,z}".into()), ("m".into(), String::new())],
                    value: 7.0
                },
                Sample {
                    name: "a_total".into(),
                    labels: vec![],
                    value: 1.5
                },
            ]
        );
        // llama-server's own spelling (a colon in names), and junk skipped.
        let l = parse(
            "# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total 12\nnot a sample\n{x} 1\n",
        );
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].name, "llamacpp:prompt_tokens_total");
        assert_eq!(l[0].value, 12.0);
    }
}
