//! The report's plot: six small bar charts (median bars, min–max whiskers, dashed targets) as a
//! plain SVG, written by hand so the bench adds no dependency to the workspace.
use std::fmt::Write as _;

use super::report::{
    AGENT_CPU, BPF_RUN, BPF_TRANSITION, LOSS, P99_CHURN, P99_TRICKLE, PEAK_RSS, POPULATION_RSS,
    RATIO_COUNTED, Row,
};

const PANEL_W: f64 = 400.0;
const PANEL_H: f64 = 300.0;
const COLUMNS: usize = 3;
const MARGIN_LEFT: f64 = 52.0;
const MARGIN_TOP: f64 = 34.0;
const MARGIN_BOTTOM: f64 = 62.0;
const MARGIN_RIGHT: f64 = 14.0;

struct Bar {
    label: String,
    median: f64,
    min: f64,
    max: f64,
}

struct Panel {
    title: &'static str,
    bars: Vec<Bar>,
    targets: Vec<(f64, &'static str)>,
    log: bool,
}

fn bars(rows: &[Row], pick: impl Fn(&Row) -> bool) -> Vec<Bar> {
    labelled(rows, |r| pick(r).then(|| short(&r.setup)))
}

/// Bars for the rows `label` names.
fn labelled(rows: &[Row], label: impl Fn(&Row) -> Option<String>) -> Vec<Bar> {
    rows.iter()
        .filter_map(|r| {
            let v = r.value?;
            Some(Bar {
                label: label(r)?,
                median: v.median,
                min: v.min,
                max: v.max,
            })
        })
        .collect()
}

/// The per-transition program of each tracer, and tcp-trace's programs all together.
fn bpf_bars(rows: &[Row]) -> Vec<Bar> {
    labelled(rows, |r| {
        if r.measure == BPF_RUN {
            let (tracer, prog) = r.setup.split_once(": ")?;
            let is_state = prog.starts_with("inet_sock_set") || prog.starts_with("tracepoint_sock");
            is_state.then(|| format!("{}: state", short(tracer)))
        } else if r.measure == BPF_TRANSITION && r.setup.starts_with("tcp-trace") {
            Some(format!("{}: all programs", short(&r.setup)))
        } else {
            None
        }
    })
}

fn short(setup: &str) -> String {
    setup
        .replace("tcp-trace", "tt")
        .replace(" subscribers", " sub")
        .replace(" subscriber", " sub")
        .replace(", full churn", "")
        .replace("bench's consumers of ", "")
        .replace(" conn/s", "/s")
        .replace("inet_sock_set_s", "state")
        .replace("tracepoint_sock", "tracepoint")
}

pub fn svg(rows: &[Row], quick: bool) -> String {
    let panels = [
        Panel {
            title: "1. Rate traced / untraced, late CPU counted",
            bars: bars(rows, |r| r.measure == RATIO_COUNTED),
            targets: vec![(0.97, "0.97"), (0.85, "0.85")],
            log: false,
        },
        Panel {
            title: "2. Events lost, worst consumer",
            bars: bars(rows, |r| r.measure == LOSS),
            targets: vec![],
            log: false,
        },
        Panel {
            title: "3. Kernel-to-client latency p99 (ms)",
            bars: bars(rows, |r| r.measure == P99_CHURN || r.measure == P99_TRICKLE),
            targets: vec![(10.0, "10 ms churn"), (2.0, "2 ms trickle")],
            log: true,
        },
        Panel {
            title: "4. BPF ns per transition",
            bars: bpf_bars(rows),
            targets: vec![(150.0, "150 ns")],
            log: true,
        },
        Panel {
            title: "5. Agent memory (MiB)",
            bars: labelled(rows, |r| {
                if r.measure == PEAK_RSS {
                    Some("peak, churn".into())
                } else if r.measure == POPULATION_RSS {
                    let subscribers = r.setup.rsplit(", ").next().unwrap_or_default();
                    Some(format!("idle population, {}", short(subscribers)))
                } else {
                    None
                }
            }),
            targets: vec![(64.0, "64 MiB")],
            log: false,
        },
        Panel {
            title: "5, 6. Tracer CPU-s per million transitions",
            bars: bars(rows, |r| r.measure == AGENT_CPU),
            targets: vec![(1.0, "1 s")],
            log: true,
        },
    ];
    let rows_of_panels = panels.len().div_ceil(COLUMNS);
    let width = PANEL_W * COLUMNS as f64;
    let height = PANEL_H * rows_of_panels as f64 + 30.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="#fff"/><text x="{}" y="20" font-size="15" text-anchor="middle" font-weight="bold">tcp-trace benchmark{} — bars: median, whiskers: min–max over rounds, dashed: target</text>"##,
        width / 2.0,
        if quick {
            " (QUICK MODE, not meaningful)"
        } else {
            ""
        }
    );
    for (i, panel) in panels.iter().enumerate() {
        let x = PANEL_W * (i % COLUMNS) as f64;
        let y = 30.0 + PANEL_H * (i / COLUMNS) as f64;
        draw(&mut out, panel, x, y);
    }
    out.push_str("</svg>\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn draw(out: &mut String, panel: &Panel, x0: f64, y0: f64) {
    let (left, top) = (x0 + MARGIN_LEFT, y0 + MARGIN_TOP);
    let plot_w = PANEL_W - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = PANEL_H - MARGIN_TOP - MARGIN_BOTTOM;
    let bottom = top + plot_h;
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="13" text-anchor="middle">{}</text>"#,
        x0 + PANEL_W / 2.0,
        y0 + 18.0,
        escape(panel.title)
    );
    if panel.bars.is_empty() {
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" font-size="12" text-anchor="middle" fill="#888">not measured</text>"##,
            left + plot_w / 2.0,
            top + plot_h / 2.0
        );
        return;
    }
    let top_value = panel
        .bars
        .iter()
        .map(|b| b.max.max(b.median))
        .chain(panel.targets.iter().map(|t| t.0))
        .fold(0.0_f64, f64::max);
    let scale = Scale::new(panel, top_value);
    // Axis and ticks.
    let _ = writeln!(
        out,
        r##"<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333"/><line x1="{left}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="#333"/>"##,
        left + plot_w
    );
    for tick in scale.ticks() {
        let ty = bottom - scale.frac(tick) * plot_h;
        let _ = writeln!(
            out,
            r##"<line x1="{}" y1="{ty}" x2="{}" y2="{ty}" stroke="#eee"/><text x="{}" y="{}" font-size="10" text-anchor="end">{}</text>"##,
            left + 1.0,
            left + plot_w,
            left - 4.0,
            ty + 3.0,
            number(tick)
        );
    }
    let slot = plot_w / panel.bars.len() as f64;
    let bar_w = (slot * 0.6).min(48.0);
    // About 5 px per character at font size 9.
    let line_chars = ((slot / 5.2) as usize).clamp(6, 24);
    for (i, bar) in panel.bars.iter().enumerate() {
        let cx = left + slot * (i as f64 + 0.5);
        let y_med = bottom - scale.frac(bar.median) * plot_h;
        let _ = writeln!(
            out,
            r##"<rect x="{}" y="{y_med}" width="{bar_w}" height="{}" fill="{}"/>"##,
            cx - bar_w / 2.0,
            (bottom - y_med).max(0.0),
            color(&bar.label)
        );
        let (y_min, y_max) = (
            bottom - scale.frac(bar.min) * plot_h,
            bottom - scale.frac(bar.max) * plot_h,
        );
        let _ = writeln!(
            out,
            r##"<line x1="{cx}" y1="{y_min}" x2="{cx}" y2="{y_max}" stroke="#222"/><line x1="{}" y1="{y_max}" x2="{}" y2="{y_max}" stroke="#222"/><line x1="{}" y1="{y_min}" x2="{}" y2="{y_min}" stroke="#222"/>"##,
            cx - 5.0,
            cx + 5.0,
            cx - 5.0,
            cx + 5.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{cx}" y="{}" font-size="10" text-anchor="middle">{}</text>"#,
            y_max.min(y_med) - 4.0,
            number(bar.median)
        );
        for (j, line) in wrap(&bar.label, line_chars).iter().enumerate() {
            let _ = writeln!(
                out,
                r#"<text x="{cx}" y="{}" font-size="9" text-anchor="middle">{}</text>"#,
                bottom + 12.0 + 10.0 * j as f64,
                escape(line)
            );
        }
    }
    for (value, label) in &panel.targets {
        let ty = bottom - scale.frac(*value) * plot_h;
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{ty}" x2="{}" y2="{ty}" stroke="#c00" stroke-dasharray="5,3"/><text x="{}" y="{}" font-size="9" fill="#c00" text-anchor="end">{}</text>"##,
            left + plot_w,
            left + plot_w,
            ty - 2.0,
            escape(label)
        );
    }
}

fn color(label: &str) -> &'static str {
    if label.starts_with("bpftrace") {
        "#e8a33c"
    } else if label.starts_with("no tracer") {
        "#999"
    } else {
        "#3c78d8"
    }
}

/// A label in lines of at most `width` characters (a longer word gets a line of its own).
fn wrap(label: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in label.split_inclusive([',', ':', ' ']) {
        match lines.last_mut() {
            Some(line) if line.trim_end().len() + word.trim_end().len() < width => {
                line.push_str(word)
            }
            _ => lines.push(word.to_owned()),
        }
    }
    lines
        .into_iter()
        .map(|l| l.trim().to_owned())
        .take(5)
        .collect()
}

fn number(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

struct Scale {
    log: bool,
    lo: f64,
    hi: f64,
}

impl Scale {
    fn new(panel: &Panel, top: f64) -> Scale {
        if panel.log {
            let smallest = panel
                .bars
                .iter()
                .map(|b| b.min)
                .chain(panel.targets.iter().map(|t| t.0))
                .filter(|v| *v > 0.0)
                .fold(f64::INFINITY, f64::min);
            // A decade below the smallest value, so a bar or target on a power of ten shows.
            let lo = if smallest.is_finite() {
                10f64.powf((smallest.log10() - 1e-9).floor())
            } else {
                0.01
            };
            let hi = 10f64.powf(top.max(lo * 10.0).log10().ceil());
            Scale { log: true, lo, hi }
        } else {
            // All zeros (no loss) still get a readable axis.
            let hi = if top > 0.0 {
                nice_ceiling(top * 1.1)
            } else {
                1.0
            };
            Scale {
                log: false,
                lo: 0.0,
                hi,
            }
        }
    }

    /// Where `v` is between the bottom (0) and the top (1).
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            let v = v.max(self.lo);
            ((v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())).clamp(0.0, 1.0)
        } else {
            ((v - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let mut out = Vec::new();
            let mut t = self.lo;
            while t <= self.hi * 1.0001 {
                out.push(t);
                t *= 10.0;
            }
            out
        } else {
            (0..=5).map(|i| self.hi * i as f64 / 5.0).collect()
        }
    }
}

/// The smallest 1, 2 or 5 × 10^k at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * magnitude)
}
