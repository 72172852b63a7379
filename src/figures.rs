//! Figures as SVG and PNG, drawn with plotters. Three kinds cover the
//! paper's figures: line charts (figures 3, 9, 10, 11), grouped bars
//! (figure 5), accuracy grids of stage by length (figures 6 to 8), and a
//! page of text (figure 4). Each figure is a list of panels side by side.
//!
//! The PNG is drawn with the fonts in assets/ (DejaVu subsets), so it is the
//! same on every machine; the SVG names the font family and leaves the
//! glyphs to the viewer.

use crate::error::{Error, Result};
use crate::files::write_atomic;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// The paper's colours: blue without chain of thought, red with it.
pub mod palette {
    use plotters::style::RGBColor;
    pub const BLUE: RGBColor = RGBColor(31, 119, 180);
    pub const RED: RGBColor = RGBColor(214, 39, 40);
    pub const GREEN: RGBColor = RGBColor(44, 160, 44);
    pub const ORANGE: RGBColor = RGBColor(255, 127, 14);
    pub const GREY: RGBColor = RGBColor(150, 150, 150);
}

/// A chart of lines (points joined), with a legend.
pub struct Lines {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
    pub series: Vec<Curve>,
}

pub struct Curve {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// Bars in labelled groups.
pub struct Bars {
    pub title: String,
    pub y_label: String,
    pub y_max: f64,
    pub groups: Vec<(String, Vec<Bar>)>,
}

/// One bar; bars of the same label share a colour and a legend entry.
pub struct Bar {
    pub label: String,
    pub color: RGBColor,
    /// A fraction (None: nothing to measure).
    pub value: Option<f64>,
}

/// Accuracy of each stage's model (rows, first stage at the top) on each
/// length (columns), shaded from white (0) to `color` (1); the cell of the
/// length a row was trained up to is outlined.
pub struct Grid {
    pub title: String,
    pub color: RGBColor,
    pub rows: Vec<GridRow>,
}

pub struct GridRow {
    pub label: String,
    /// Trained on 1..=trained digits.
    pub trained: usize,
    /// Accuracy on lengths 1, 2, ... (None: not evaluated).
    pub cells: Vec<Option<f64>>,
}

/// Lines of monospaced text.
pub struct TextPage {
    pub title: String,
    pub lines: Vec<String>,
}

pub enum Panel {
    Lines(Lines),
    Bars(Bars),
    Grid(Grid),
    Text(TextPage),
}

/// Panels side by side under a caption (the scale label goes here) and an
/// optional second line (the CPU-scale deviations).
pub struct Figure {
    pub caption: String,
    pub note: Option<String>,
    pub panels: Vec<Panel>,
    pub size: (u32, u32),
}

/// `text` broken at spaces into lines of at most `width` characters (a
/// longer word stands alone).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(line) if line.len() + 1 + word.len() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

fn register_fonts() {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        let sans = include_bytes!("../assets/DejaVuSans-ascii.ttf");
        let mono = include_bytes!("../assets/DejaVuSansMono-ascii.ttf");
        for (family, bytes) in [("sans-serif", &sans[..]), ("monospace", &mono[..])] {
            let registered = plotters::style::register_font(family, FontStyle::Normal, bytes);
            assert!(registered.is_ok(), "the bundled {family} font does not parse");
        }
    });
}

impl Figure {
    /// Writes `dir/name.svg` and `dir/name.png` (atomically) and returns their paths.
    pub fn save(&self, dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
        register_fonts();
        let (w, h) = self.size;
        let drawing_error = |e: Box<dyn std::error::Error>| Error::format(dir.join(name), format!("cannot draw: {e}"));
        let mut svg = String::new();
        self.draw(&SVGBackend::with_string(&mut svg, self.size).into_drawing_area()).map_err(drawing_error)?;
        let mut rgb = vec![0u8; (w * h * 3) as usize];
        self.draw(&BitMapBackend::with_buffer(&mut rgb, self.size).into_drawing_area()).map_err(drawing_error)?;
        let svg_path = dir.join(format!("{name}.svg"));
        let png_path = dir.join(format!("{name}.png"));
        write_atomic(&svg_path, svg.as_bytes())?;
        write_atomic(&png_path, &encode_png(&rgb, w, h).map_err(|e| Error::format(&png_path, e.to_string()))?)?;
        Ok(vec![svg_path, png_path])
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let mut body = root.titled(&self.caption, ("sans-serif", 16))?;
        // About 7 pixels a character at 13 points: the note wraps to the width.
        let chars = (root.dim_in_pixel().0 as usize / 7).max(20);
        for line in self.note.iter().flat_map(|note| wrap(note, chars)) {
            body = body.titled(&line, ("sans-serif", 13))?;
        }
        let areas = body.split_evenly((1, self.panels.len().max(1)));
        for (panel, area) in self.panels.iter().zip(&areas) {
            match panel {
                Panel::Lines(p) => draw_lines(area, p)?,
                Panel::Bars(p) => draw_bars(area, p)?,
                Panel::Grid(p) => draw_grid(area, p)?,
                Panel::Text(p) => draw_text(area, p)?,
            }
        }
        root.present()?;
        Ok(())
    }
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

/// Tick labels: integers without decimals, large counts as 3.5k or 1.2M.
fn tick_label(value: f64) -> String {
    match value.abs() {
        v if v >= 1e6 => format!("{:.1}M", value / 1e6),
        v if v >= 1e4 => format!("{:.0}k", value / 1e3),
        v if v >= 1e3 => format!("{:.1}k", value / 1e3),
        _ if value.fract() == 0.0 => format!("{value:.0}"),
        _ => format!("{value:.1}"),
    }
}

fn draw_lines<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Lines) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(p.x_range.0..p.x_range.1, p.y_range.0..p.y_range.1)?;
    // Every x of these charts is a count (digits, stages, carries): integer ticks only.
    let x_ticks = (p.x_range.1 - p.x_range.0).round() as usize + 1;
    chart
        .configure_mesh()
        .x_desc(&p.x_label)
        .y_desc(&p.y_label)
        .x_labels(x_ticks.min(30))
        .x_label_formatter(&|x| if x.fract() == 0.0 { tick_label(*x) } else { String::new() })
        .y_label_formatter(&|y| tick_label(*y))
        .light_line_style(WHITE)
        .draw()?;
    for series in &p.series {
        let color = series.color;
        chart
            .draw_series(LineSeries::new(series.points.iter().copied(), color.stroke_width(2)))?
            .label(&series.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(series.points.iter().map(|&point| Circle::new(point, 3, color.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Bars) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let slots: usize = p.groups.iter().map(|(_, bars)| bars.len() + 1).sum();
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..slots as f64, 0f64..p.y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(&p.y_label)
        // Above 100 % is room for the legend and the bars' labels, not a scale.
        .y_label_formatter(&|y| if *y > 1.0 + 1e-9 { String::new() } else { format!("{:.0} %", 100.0 * y) })
        .light_line_style(WHITE)
        .draw()?;
    let mut x = 0.5;
    for (g, (group, bars)) in p.groups.iter().enumerate() {
        let group_start = x;
        for Bar { label, color, value } in bars {
            let top = value.unwrap_or(0.0);
            let color = *color;
            let bar = chart.draw_series([Rectangle::new([(x, 0.0), (x + 0.9, top)], color.filled())])?;
            // The first group's bars name the colours in the legend.
            if g == 0 {
                bar.label(label).legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
            }
            let text = value.map_or("none kept".to_string(), |v| format!("{:.1} %", 100.0 * v));
            chart.draw_series([Text::new(text, (x + 0.05, top + p.y_max * 0.03), ("sans-serif", 11))])?;
            x += 1.0;
        }
        // The group's label under its bars, in the x label area.
        let (left, bottom) = chart.backend_coord(&(group_start, 0.0));
        let (base_x, base_y) = area.get_base_pixel();
        let style = ("sans-serif", 12).into_text_style(area);
        area.draw_text(group, &style, (left - base_x, bottom - base_y + 8))?;
        x += 1.0;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

fn shade(color: RGBColor, value: f64) -> RGBColor {
    let mix = |c: u8| (255.0 - (255.0 - c as f64) * value.clamp(0.0, 1.0)).round() as u8;
    RGBColor(mix(color.0), mix(color.1), mix(color.2))
}

/// The fill of a grid cell that was not evaluated.
const NOT_EVALUATED: RGBColor = RGBColor(215, 215, 215);

fn draw_grid<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Grid) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let columns = p.rows.iter().map(|row| row.cells.len()).max().unwrap_or(1).max(1);
    let rows = p.rows.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 15))
        .margin(12)
        .margin_bottom(36)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.5f64..columns as f64 + 0.5, 0f64..rows as f64)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("length (digits)")
        .x_labels(columns.min(30))
        .x_label_formatter(&|x| if x.fract() == 0.0 { format!("{x:.0}") } else { String::new() })
        .y_labels(0)
        .draw()?;
    let (base_x, base_y) = area.get_base_pixel();
    let label_style = ("sans-serif", 11).into_text_style(area);
    // The first stage on top, as in the paper.
    for (i, row) in p.rows.iter().enumerate() {
        let y = (rows - 1 - i) as f64;
        for (j, value) in row.cells.iter().enumerate() {
            let x = (j + 1) as f64;
            let fill = value.map_or(NOT_EVALUATED, |v| shade(p.color, v));
            chart.draw_series([Rectangle::new([(x - 0.5, y), (x + 0.5, y + 1.0)], fill.filled())])?;
        }
        let x = row.trained as f64;
        chart.draw_series([Rectangle::new([(x - 0.5, y), (x + 0.5, y + 1.0)], BLACK.stroke_width(2))])?;
        let (left, middle) = chart.backend_coord(&(0.5, y + 0.5));
        area.draw_text(&row.label, &label_style, (left - base_x - 75, middle - base_y - 6))?;
    }
    // The key, in the bottom margin: accuracy from 0 to 100 %, the fill of a
    // cell not evaluated, and the outline of the length a row was trained up to.
    let top = area.dim_in_pixel().1 as i32 - 22;
    let key = |x: i32, styles: &[ShapeStyle], text: &str| -> DrawResult {
        for &style in styles {
            area.draw(&Rectangle::new([(x, top), (x + 14, top + 14)], style))?;
        }
        area.draw_text(text, &label_style, (x + 18, top + 1))?;
        Ok(())
    };
    let mut x = 80;
    for accuracy in [0.0, 0.25, 0.5, 0.75, 1.0] {
        // Outlined, so that the white of 0 % shows.
        let swatch = [shade(p.color, accuracy).filled(), palette::GREY.stroke_width(1)];
        key(x, &swatch, &format!("{:.0} %", 100.0 * accuracy))?;
        x += 64;
    }
    key(x, &[NOT_EVALUATED.filled()], "not evaluated")?;
    key(x + 110, &[BLACK.stroke_width(2)], "trained up to")?;
    Ok(())
}

fn draw_text<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &TextPage) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let area = area.titled(&p.title, ("sans-serif", 15))?;
    for (i, line) in p.lines.iter().enumerate() {
        area.draw_text(line, &("monospace", 13).into_text_style(&area), (16, 8 + 18 * i as i32))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn a_note_wraps_at_spaces_to_the_width_and_keeps_every_word() {
        let note = "CPU-scale deviations (REPRODUCE.md): digit places, positions clipped at 4, compact slow format.";
        let lines = wrap(note, 40);
        assert!(lines.iter().all(|line| line.len() <= 40), "{lines:?}");
        assert_eq!(lines.join(" "), note);
        assert_eq!(wrap("a-word-longer-than-the-width b", 5), ["a-word-longer-than-the-width", "b"]);
    }
}
