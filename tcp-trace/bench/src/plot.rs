//! The report's plot (report.svg), drawn with plotters' SVG backend: one horizontal bar chart
//! per figure, bars at the median, whiskers from min to max over rounds, dashed red targets.
//! Horizontal, so that each bar's setup reads in full beside it.
use plotters::{
    coord::{Shift, ranged1d::SegmentValue},
    prelude::*,
};

use super::figures::{
    AGENT_CPU, AGENT_CPU_CONNECTION, BPF_RUN, BPF_TRANSITION, LOSS, P99_CHURN, P99_TRICKLE,
    PEAK_RSS, POPULATION_RSS, RATIO_COUNTED, Row,
};

const WIDTH: u32 = 1000;
/// Room for the setups, left of the bars.
const LABEL_WIDTH: u32 = 380;
const BAR_HEIGHT: u32 = 22;
/// A panel's title and axis.
const PANEL_CHROME: u32 = 70;
const TITLE_HEIGHT: u32 = 34;

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
    /// Values spread over decades: drawn on a log10 axis.
    log: bool,
}

impl Panel {
    fn height(&self) -> u32 {
        PANEL_CHROME + BAR_HEIGHT * self.bars.len().max(1) as u32
    }
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

fn measured(rows: &[Row], measures: &[&str]) -> Vec<Bar> {
    labelled(rows, |r| {
        measures.contains(&r.measure).then(|| r.setup.clone())
    })
}

fn panels(rows: &[Row]) -> Vec<Panel> {
    vec![
        Panel {
            title: "1. Rate traced / untraced, late CPU counted",
            bars: measured(rows, &[RATIO_COUNTED]),
            targets: vec![(0.97, "0.97"), (0.85, "0.85")],
            log: false,
        },
        Panel {
            title: "2. Events lost, worst consumer",
            bars: measured(rows, &[LOSS]),
            targets: vec![],
            log: false,
        },
        Panel {
            title: "3. Kernel-to-client latency p99 (ms)",
            bars: measured(rows, &[P99_CHURN, P99_TRICKLE]),
            targets: vec![(10.0, "10 ms churn"), (2.0, "2 ms trickle")],
            log: true,
        },
        Panel {
            title: "4. BPF ns per transition: the state program, and all programs",
            bars: labelled(rows, |r| {
                if r.measure == BPF_RUN {
                    let (tracer, prog) = r.setup.split_once(": ")?;
                    let state =
                        prog.starts_with("inet_sock_set") || prog.starts_with("tracepoint_sock");
                    state.then(|| format!("{tracer}: state program"))
                } else if r.measure == BPF_TRANSITION && r.setup.starts_with("tcp-trace") {
                    Some(format!("{}: all programs", r.setup))
                } else {
                    None
                }
            }),
            targets: vec![(150.0, "150 ns")],
            log: true,
        },
        Panel {
            title: "5. Agent memory (MiB)",
            bars: labelled(rows, |r| {
                (r.measure == PEAK_RSS || r.measure == POPULATION_RSS)
                    .then(|| format!("{}: {}", r.measure, r.setup))
            }),
            targets: vec![(64.0, "64 MiB")],
            log: false,
        },
        Panel {
            title: "5. Agent CPU-s per million connections",
            bars: measured(rows, &[AGENT_CPU_CONNECTION]),
            targets: vec![(0.3, "0.3 always-on")],
            log: false,
        },
        Panel {
            title: "5, 6. Tracer CPU-s per million transitions",
            bars: measured(rows, &[AGENT_CPU]),
            targets: vec![(1.0, "1 s")],
            log: true,
        },
    ]
}

/// The whole plot as an SVG document.
pub fn svg(rows: &[Row], quick: bool) -> Result<String, String> {
    let panels = panels(rows);
    let height = TITLE_HEIGHT + panels.iter().map(Panel::height).sum::<u32>();
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let title = format!(
            "tcp-trace benchmark{}: bars median, whiskers min–max over rounds, dashed targets",
            if quick {
                " (QUICK MODE, not meaningful)"
            } else {
                ""
            }
        );
        let mut area = root
            .titled(&title, ("sans-serif", 16))
            .map_err(|e| e.to_string())?;
        for panel in &panels {
            let (this, rest) = area.split_vertically(panel.height());
            draw(&this, panel).map_err(|e| format!("{}: {e}", panel.title))?;
            area = rest;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(area: &DrawingArea<SVGBackend<'_>, Shift>, panel: &Panel) -> DrawResult {
    if panel.bars.is_empty() {
        area.draw(&Text::new(
            format!("{}: not measured", panel.title),
            (LABEL_WIDTH as i32, 20),
            ("sans-serif", 14).into_font().color(&BLACK.mix(0.5)),
        ))?;
        return Ok(());
    }
    // A log axis is a linear one over log10 of the values, labelled with the values.
    let axis = |v: f64| if panel.log { v.max(1e-9).log10() } else { v };
    let values = || {
        panel
            .bars
            .iter()
            .flat_map(|b| [b.min, b.median, b.max])
            .chain(panel.targets.iter().map(|t| t.0))
    };
    let (lo, hi) = if panel.log {
        let positive = values().filter(|v| *v > 0.0);
        let smallest = positive.clone().fold(f64::INFINITY, f64::min);
        let largest = positive.fold(0.0_f64, f64::max);
        if smallest.is_finite() {
            (
                smallest.log10().floor(),
                largest.log10().ceil().max(smallest.log10().floor() + 1.0),
            )
        } else {
            (-2.0, 0.0)
        }
    } else {
        let largest = values().fold(0.0_f64, f64::max);
        (0.0, if largest > 0.0 { largest * 1.12 } else { 1.0 })
    };
    let n = panel.bars.len();
    let labels: Vec<&str> = panel.bars.iter().map(|b| b.label.as_str()).collect();
    let log = panel.log;
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 14))
        .margin_right(24)
        .y_label_area_size(LABEL_WIDTH)
        .x_label_area_size(24)
        .build_cartesian_2d(lo..hi, (0..n).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_style(("sans-serif", 11))
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).map_or(String::new(), |l| l.to_string()),
            _ => String::new(),
        })
        .x_label_formatter(&|v| number(if log { 10f64.powf(*v) } else { *v }))
        .draw()?;
    chart.draw_series(panel.bars.iter().enumerate().map(|(i, bar)| {
        let mut rect = Rectangle::new(
            [
                (lo, SegmentValue::Exact(i)),
                (axis(bar.median).max(lo), SegmentValue::Exact(i + 1)),
            ],
            color(&bar.label).filled(),
        );
        rect.set_margin(4, 4, 0, 0);
        rect
    }))?;
    chart.draw_series(panel.bars.iter().enumerate().map(|(i, bar)| {
        ErrorBar::new_horizontal(
            SegmentValue::CenterOf(i),
            axis(bar.min).max(lo),
            axis(bar.median).max(lo),
            axis(bar.max).max(lo),
            BLACK.stroke_width(1),
            8,
        )
    }))?;
    chart.draw_series(panel.bars.iter().enumerate().map(|(i, bar)| {
        Text::new(
            number(bar.median),
            (
                axis(bar.max.max(bar.median)).max(lo),
                SegmentValue::CenterOf(i),
            ),
            ("sans-serif", 10),
        )
    }))?;
    for (value, label) in &panel.targets {
        let x = axis(*value);
        if x < lo || x > hi {
            continue;
        }
        chart.draw_series(DashedLineSeries::new(
            [(x, SegmentValue::Exact(0)), (x, SegmentValue::Exact(n))],
            5,
            3,
            RED.stroke_width(1),
        ))?;
        chart.draw_series([Text::new(
            label.to_string(),
            (x, SegmentValue::Exact(n)),
            ("sans-serif", 10).into_font().color(&RED),
        )])?;
    }
    Ok(())
}

fn color(label: &str) -> RGBColor {
    if label.starts_with("bpftrace") || label.starts_with("empty program") {
        RGBColor(0xe8, 0xa3, 0x3c)
    } else if label.starts_with("no tracer") {
        RGBColor(0x99, 0x99, 0x99)
    } else {
        RGBColor(0x3c, 0x78, 0xd8)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        figures::{Format, LOSS, P99_CHURN},
        stats::Spread,
    };

    fn row(measure: &'static str, setup: &str, values: &[f64]) -> Row {
        Row {
            figure: 1,
            measure,
            setup: setup.into(),
            value: Spread::of(values.iter().copied()),
            format: Format::Ratio,
            target: "",
            holds: None,
        }
    }

    #[test]
    fn the_plot_is_one_svg_with_a_bar_per_row_and_empty_panels_said_so() {
        let rows = [
            row(
                RATIO_COUNTED,
                "tcp-trace, 0 subscribers, 2 workers",
                &[0.9, 0.95],
            ),
            row(RATIO_COUNTED, "bpftrace, 2 workers", &[0.5]),
            // Zeros on a linear axis and a log axis must not break the scale.
            row(LOSS, "tcp-trace, 1 subscriber, 2 workers", &[0.0]),
            row(
                P99_CHURN,
                "tcp-trace, 1 subscriber, 2 workers",
                &[0.0, 12.5],
            ),
        ];
        let svg = svg(&rows, true).expect("the plot draws");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("bpftrace, 2 workers"));
        assert!(svg.contains("not measured"), "the memory panel has no rows");
    }
}
