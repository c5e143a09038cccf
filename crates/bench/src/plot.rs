//! PNG plots of a suite result with plotters' bitmap backend. Text is drawn with the DejaVu Sans
//! font embedded in this crate (ab_glyph), so rendering needs no fontconfig and no system fonts.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::suite::{NetnsSummary, PvpRow, ScalingRow};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("the embedded font could not be loaded")]
    Font,
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("no data for {0}")]
    NoData(&'static str),
}

fn draw_err<E: std::fmt::Display>(path: &Path) -> impl FnOnce(E) -> PlotError + '_ {
    move |e| PlotError::Draw { path: path.to_path_buf(), message: e.to_string() }
}

/// Registers the embedded font once per process.
pub fn init_font() -> Result<(), PlotError> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

const SERIES_COLORS: [RGBColor; 4] =
    [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xff, 0x7f, 0x0e), RGBColor(0x2c, 0xa0, 0x2c), RGBColor(0xd6, 0x27, 0x28)];

/// The largest measured value of all series, if any is above zero (the y axis' top).
fn largest(series: &[(String, Vec<Option<f64>>)]) -> Option<f64> {
    let max = series.iter().flat_map(|(_, ys)| ys.iter().flatten()).cloned().fold(0.0_f64, f64::max);
    (max > 0.0).then_some(max)
}

/// One line per system over categorical x positions.
struct Lines<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    x_labels: Vec<String>,
    /// (name, y per x position; None where not measured)
    series: Vec<(String, Vec<Option<f64>>)>,
}

fn draw_lines(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    path: &Path,
    l: &Lines<'_>,
) -> Result<(), PlotError> {
    let y_max = largest(&l.series).ok_or(PlotError::NoData("a line plot"))?;
    let n = l.x_labels.len().max(1);
    let labels = l.x_labels.clone();
    let mut chart = ChartBuilder::on(area)
        .caption(l.title, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(-0.3f64..(n as f64 - 0.7), 0.0..y_max * 1.15)
        .map_err(draw_err(path))?;
    chart
        .configure_mesh()
        .x_desc(l.x_desc)
        .y_desc(l.y_desc)
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(draw_err(path))?;
    for (k, (name, ys)) in l.series.iter().enumerate() {
        let color = SERIES_COLORS[k % SERIES_COLORS.len()];
        let points: Vec<(f64, f64)> = ys.iter().enumerate().filter_map(|(i, y)| y.map(|y| (i as f64, y))).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))
            .map_err(draw_err(path))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, color.filled()))).map_err(draw_err(path))?;
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(draw_err(path))?;
    Ok(())
}

/// Grouped bars: groups along x, one bar per series in each group.
struct Bars<'a> {
    title: &'a str,
    y_desc: &'a str,
    groups: Vec<String>,
    series: Vec<(String, Vec<Option<f64>>)>,
}

fn draw_bars(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    path: &Path,
    b: &Bars<'_>,
) -> Result<(), PlotError> {
    let y_max = largest(&b.series).ok_or(PlotError::NoData("a bar chart"))?;
    let n = b.groups.len().max(1);
    let groups = b.groups.clone();
    let mut chart = ChartBuilder::on(area)
        .caption(b.title, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0.0..y_max * 1.2)
        .map_err(draw_err(path))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(b.y_desc)
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                groups.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(draw_err(path))?;
    let k = b.series.len().max(1) as f64;
    let width = 0.8 / k;
    for (s, (name, ys)) in b.series.iter().enumerate() {
        let color = SERIES_COLORS[s % SERIES_COLORS.len()];
        let x0 = -0.4 + s as f64 * width;
        chart
            .draw_series(ys.iter().enumerate().filter_map(|(g, y)| {
                y.map(|y| Rectangle::new([(g as f64 + x0, 0.0), (g as f64 + x0 + width * 0.9, y)], color.filled()))
            }))
            .map_err(draw_err(path))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart
            .draw_series(ys.iter().enumerate().filter_map(|(g, y)| {
                y.map(|y| {
                    Text::new(
                        fmt_value(y),
                        (g as f64 + x0 + width * 0.05, y + y_max * 0.02),
                        (FAMILY, 13).into_font().color(&BLACK),
                    )
                })
            }))
            .map_err(draw_err(path))?;
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(draw_err(path))?;
    Ok(())
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// vhost-user PVP: Mpps and Gbit/s per frame size, one line per switch.
pub fn throughput_vs_frame_size(path: &Path, rows: &[PvpRow]) -> Result<(), PlotError> {
    if rows.is_empty() {
        return Err(PlotError::NoData("the PVP plot"));
    }
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let (left, right) = root.split_horizontally(700);
    let x_labels: Vec<String> = rows.iter().map(|r| format!("{} B", r.frame_bytes)).collect();
    let systems = [("vmq", 0usize), ("dpdk-testpmd", 1), ("OVS-DPDK", 2)];
    let pick = |i: usize, gbps: bool| -> Vec<Option<f64>> {
        rows.iter()
            .map(|r| {
                let mpps = r.mpps[i];
                if gbps { mpps.map(|m| m * 1e6 * r.frame_bytes as f64 * 8.0 / 1e9) } else { mpps }
            })
            .collect()
    };
    let mpps = Lines {
        title: "vhost-user PVP, 1 forwarding core: Mpps",
        x_desc: "frame size",
        y_desc: "Mpps delivered (both directions)",
        x_labels: x_labels.clone(),
        series: systems
            .iter()
            .map(|(n, i)| (n.to_string(), pick(*i, false)))
            .filter(|(_, ys)| ys.iter().any(Option::is_some))
            .collect(),
    };
    let gbps = Lines {
        title: "vhost-user PVP, 1 forwarding core: Gbit/s",
        x_desc: "frame size",
        y_desc: "Gbit/s delivered (frame bytes)",
        x_labels,
        series: systems
            .iter()
            .map(|(n, i)| (n.to_string(), pick(*i, true)))
            .filter(|(_, ys)| ys.iter().any(Option::is_some))
            .collect(),
    };
    draw_lines(&left, path, &mpps)?;
    draw_lines(&right, path, &gbps)?;
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// CPU seconds per GB delivered, offloads on and off, per system; one panel per MTU.
pub fn cpu_per_gb(path: &Path, netns: &NetnsSummary) -> Result<(), PlotError> {
    let mtus: Vec<u32> = netns.mtus();
    if mtus.is_empty() {
        return Err(PlotError::NoData("the CPU plot"));
    }
    let root = BitMapBackend::new(path, (700 * mtus.len() as u32, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let panels = root.split_evenly((1, mtus.len()));
    for (panel, mtu) in panels.iter().zip(&mtus) {
        let systems = netns.systems();
        let title = format!("netns TCP, 1 stream, MTU {mtu}: CPU per GB");
        let bars = Bars {
            title: &title,
            y_desc: "CPU seconds per GB (all processes)",
            groups: systems.iter().map(|s| crate::suite::system_label(s).to_string()).collect(),
            series: [true, false]
                .iter()
                .map(|&on| {
                    (
                        format!("offloads {}", if on { "on" } else { "off" }),
                        systems.iter().map(|s| netns.cpu_s_per_gb(s, *mtu, on, 1)).collect(),
                    )
                })
                .collect(),
        };
        draw_bars(panel, path, &bars)?;
    }
    root.present().map_err(draw_err(path))?;
    Ok(())
}

type RowFilter = dyn Fn(&ScalingRow) -> bool;

/// In-process uplink -> VMs: aggregate Mpps and worker ns per frame against the VM count.
pub fn rate_vs_vms(path: &Path, rows: &[ScalingRow], frame_len: usize) -> Result<(), PlotError> {
    let mut vms: Vec<usize> = rows.iter().filter(|r| r.frame_len == frame_len).map(|r| r.vms).collect();
    vms.sort_unstable();
    vms.dedup();
    if vms.is_empty() {
        return Err(PlotError::NoData("the VM scaling plot"));
    }
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let (left, right) = root.split_horizontally(700);
    let lines = |f: &dyn Fn(&ScalingRow) -> f64| -> Vec<(String, Vec<Option<f64>>)> {
        let mut series = Vec::new();
        let kinds: [(&str, &RowFilter); 3] = [
            ("vmq mode, budget 8 queues", &|r| r.mode == "vmq" && r.queues == 8),
            ("vmq mode, a queue per VM", &|r| r.mode == "vmq" && r.queues as usize >= r.vms),
            ("switch mode", &|r| r.mode == "switch" && r.queues == 8),
        ];
        for (label, select) in kinds {
            let ys: Vec<Option<f64>> = vms
                .iter()
                .map(|&n| rows.iter().find(|r| r.frame_len == frame_len && r.vms == n && select(r)).map(f))
                .collect();
            if ys.iter().flatten().count() > 0 {
                series.push((label.to_string(), ys));
            }
        }
        series
    };
    let x_labels: Vec<String> = vms.iter().map(|n| n.to_string()).collect();
    let title_rate = format!("uplink -> VMs, {frame_len} B, 2 workers: rate");
    let title_cost = format!("uplink -> VMs, {frame_len} B, 2 workers: cost");
    draw_lines(
        &left,
        path,
        &Lines {
            title: &title_rate,
            x_desc: "VM ports",
            y_desc: "Mpps delivered",
            x_labels: x_labels.clone(),
            series: lines(&|r| r.median_mpps),
        },
    )?;
    draw_lines(
        &right,
        path,
        &Lines {
            title: &title_cost,
            x_desc: "VM ports",
            y_desc: "worker CPU ns per frame",
            x_labels,
            series: lines(&|r| r.median_cpu_ns_per_frame),
        },
    )?;
    root.present().map_err(draw_err(path))?;
    Ok(())
}
