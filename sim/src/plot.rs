//! `--svg`: a run's timeline, and a sweep, drawn with plotters' SVG backend (text is
//! left to the SVG viewer's fonts, so nothing here needs a font or a system library).
//! The same data give the same bytes.

use std::fmt;
use std::path::Path;

use plotters::prelude::*;

use crate::report::{Fault, Report, Timeline};
use crate::sweep::SweepTable;

/// The picture could not be drawn or written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlotError(pub String);

impl fmt::Display for PlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PlotError {}

fn drawing<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> PlotError {
    PlotError(format!("cannot draw the picture: {e}"))
}

fn write(path: &Path, svg: &str) -> Result<(), PlotError> {
    std::fs::write(path, svg).map_err(|e| PlotError(format!("--svg {}: {e}", path.display())))
}

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 720;
const PARTITION: RGBAColor = RGBAColor(220, 50, 47, 0.12);
const CRASH: RGBColor = RGBColor(220, 50, 47);
const RESTART: RGBColor = RGBColor(38, 139, 60);
const CLOCK: RGBColor = RGBColor(181, 137, 0);
const LIMIT: RGBColor = RGBColor(0, 0, 0);
const CLIENT_COLORS: [RGBColor; 3] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(148, 103, 189)];

/// Draws `timeline` (from [`crate::try_run_traced`]) into the SVG file at `path`: on
/// top, per window, what the cluster admitted for each of the busiest clients (solid)
/// against the limit and the exact limiter (dashed); below, how many of one client's
/// admissions in the current window the slowest node had not yet seen. Partitions are
/// shaded, crashes, restarts and clock steps are vertical lines, and the end of traffic and the
/// moment all replicas agreed are marked.
///
/// # Errors
/// The file cannot be written.
pub fn draw_timeline(report: &Report, timeline: &Timeline, path: &Path) -> Result<(), PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let c = &report.config;
        let title = format!(
            "{} nodes, {} admission, gossip {} ms, limit {} per {} ms, seed {}",
            c.nodes, c.mode, c.gossip_ms, c.limit, c.window_ms, c.seed
        );
        let root = root.titled(&title, ("sans-serif", 20)).map_err(drawing)?;
        let (upper, lower) = root.split_vertically(HEIGHT * 3 / 5);
        let tl = timeline;
        let w = tl.window_ms;
        let windows = tl.clients.first().map_or(0, |c| c.admitted.len()) as u64;
        let end_ms = (windows * w).max(tl.duration_ms).max(1);
        // Both panels share the time axis: the traffic, the tail until the replicas
        // agreed, and a margin for the labels.
        let last_ms = tl.lag.last().map_or(0, |&(t, _)| t).max(end_ms);
        let x_end = last_ms + last_ms / 10;
        let top = tl.clients.iter().flat_map(|c| c.admitted.iter().chain(&c.ideal)).copied().max().unwrap_or(0).max(tl.limit);
        let y_max = top + top / 5 + 1;

        let mut chart = ChartBuilder::on(&upper)
            .caption("admitted per window, busiest clients (solid: the cluster, dashed: an exact global limiter)", ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0u64..x_end, 0u64..y_max)
            .map_err(drawing)?;
        chart.configure_mesh().x_desc("virtual ms").y_desc("requests admitted").light_line_style(WHITE.mix(0.0)).draw().map_err(drawing)?;
        shade_faults(&mut chart, &tl.faults, y_max)?;
        chart
            .draw_series(LineSeries::new([(0, tl.limit), (end_ms, tl.limit)], LIMIT.stroke_width(2)))
            .map_err(drawing)?
            .label(format!("limit {}", tl.limit))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], LIMIT.stroke_width(2)));
        for (k, client) in tl.clients.iter().enumerate() {
            let color = CLIENT_COLORS[k % CLIENT_COLORS.len()];
            let steps = |v: &[u64]| -> Vec<(u64, u64)> {
                v.iter().enumerate().flat_map(|(i, &a)| [(i as u64 * w, a), (((i as u64 + 1) * w).min(end_ms), a)]).collect()
            };
            chart
                .draw_series(LineSeries::new(steps(&client.admitted), color.stroke_width(2)))
                .map_err(drawing)?
                .label(format!("{} ({} offered)", client.name, client.offered))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(DashedLineSeries::new(steps(&client.ideal), 6, 4, color.mix(0.7).stroke_width(1))).map_err(drawing)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(drawing)?;

        let lag_top = tl.lag.iter().map(|&(_, l)| l).max().unwrap_or(0);
        let lag_max = lag_top + lag_top / 5 + 1;
        let agreed = match tl.convergence_ms {
            Some(ms) => format!("all replicas agreed {ms} ms after the end of traffic"),
            None => "the replicas never agreed".to_string(),
        };
        let mut chart = ChartBuilder::on(&lower)
            .caption(
                format!("view lag: most admissions of one client this window that some live node has not seen; {agreed}"),
                ("sans-serif", 15),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0u64..x_end, 0u64..lag_max)
            .map_err(drawing)?;
        chart.configure_mesh().x_desc("virtual ms").y_desc("unseen admissions").light_line_style(WHITE.mix(0.0)).draw().map_err(drawing)?;
        shade_faults(&mut chart, &tl.faults, lag_max)?;
        chart.draw_series(LineSeries::new(tl.lag.iter().copied(), CLIENT_COLORS[0].stroke_width(1))).map_err(drawing)?;
        let label_at = |x: u64, text: String, color: RGBColor| {
            Text::new(text, (x, lag_max - lag_max / 12), ("sans-serif", 13).into_font().color(&color))
        };
        chart.draw_series([PathElement::new([(tl.duration_ms, 0), (tl.duration_ms, lag_max)], BLACK.mix(0.6))]).map_err(drawing)?;
        chart.draw_series([label_at(tl.duration_ms, " end".to_string(), BLACK)]).map_err(drawing)?;
        for f in &tl.faults {
            if let Fault::Partition { to_ms, .. } = *f {
                chart.draw_series([label_at(to_ms, " heals".to_string(), CRASH)]).map_err(drawing)?;
            }
        }
        if let Some(ms) = tl.convergence_ms {
            let at = tl.duration_ms + ms;
            chart.draw_series([PathElement::new([(at, 0), (at, lag_max / 2)], RESTART.stroke_width(2))]).map_err(drawing)?;
            chart
                .draw_series([Text::new(" agreed", (at, lag_max / 2), ("sans-serif", 13).into_font().color(&RESTART))])
                .map_err(drawing)?;
        }
        root.present().map_err(drawing)?;
    }
    write(path, &svg)
}

/// Partitions as shaded spans; crashes, leaves, restarts and clock steps as labelled vertical lines.
fn shade_faults<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<plotters::coord::types::RangedCoordu64, plotters::coord::types::RangedCoordu64>>,
    faults: &[Fault],
    y_max: u64,
) -> Result<(), PlotError> {
    for f in faults {
        let (color, what, at_ms) = match *f {
            Fault::Partition { from_ms, to_ms } => {
                chart.draw_series([Rectangle::new([(from_ms, 0), (to_ms, y_max)], PARTITION.filled())]).map_err(drawing)?;
                let text = Text::new(" partition".to_string(), (from_ms, y_max - y_max / 25), ("sans-serif", 12).into_font().color(&CRASH));
                chart.draw_series([text]).map_err(drawing)?;
                continue;
            }
            Fault::Crash { node, at_ms } => (CRASH, format!(" crash {node}"), at_ms),
            Fault::Restart { node, at_ms } => (RESTART, format!(" restart {node}"), at_ms),
            Fault::Leave { node, at_ms } => (CRASH, format!(" leave {node}"), at_ms),
            Fault::ClockStep { node, at_ms, delta_ms } => (CLOCK, format!(" clock {node} {delta_ms:+} ms"), at_ms),
        };
        chart.draw_series([PathElement::new([(at_ms, 0), (at_ms, y_max)], color.stroke_width(1))]).map_err(drawing)?;
        let text = Text::new(what, (at_ms, y_max - y_max / 10), ("sans-serif", 12).into_font().color(&color));
        chart.draw_series([text]).map_err(drawing)?;
    }
    Ok(())
}

/// Draws a sweep: over-admission (%) against cluster size, one line per gossip interval.
///
/// # Errors
/// The file cannot be written.
pub fn draw_sweep(table: &SweepTable, path: &Path) -> Result<(), PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT / 2 + 120)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let b = &table.base;
        let pct = |r: &Report| 100.0 * r.over_admission_ratio;
        let top = table.cells.iter().map(|c| pct(&c.report)).fold(0.0f64, f64::max);
        let y_max = if top > 0.0 { top * 1.2 } else { 1.0 };
        let columns = table.nodes.len().max(1);
        let caption = format!(
            "over-admission by cluster size ({} admission, {} clients at {}x a limit of {} per {} ms, loss {}, seed {})",
            b.mode, b.clients, b.rate, b.limit, b.window_ms, b.loss, b.seed
        );
        let nodes = table.nodes.clone();
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 15))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..(columns as f64 - 0.5).max(0.5), 0.0..y_max)
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .x_desc("nodes")
            .y_desc("over-admitted, % of ideal")
            .x_labels(columns)
            .x_label_formatter(&|x| nodes.get(x.round() as usize).map_or(String::new(), |n| n.to_string()))
            .draw()
            .map_err(drawing)?;
        for (k, &g) in table.gossip_ms.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let points: Vec<(f64, f64)> =
                table.nodes.iter().enumerate().filter_map(|(i, &n)| table.cell(g, n).map(|c| (i as f64, pct(&c.report)))).collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(drawing)?
                .label(format!("gossip {g} ms"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK.mix(0.3)).draw().map_err(drawing)?;
        root.present().map_err(drawing)?;
    }
    write(path, &svg)
}
