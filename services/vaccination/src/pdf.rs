//! Printable A4 vaccination certificate, written with [`pdf_writer`].
//!
//! The document is what a citizen prints or saves from the app. Each page is
//! A4 (595 x 842 pt) and holds, from back to front:
//!
//! 1. **The watermark.** It is drawn first, so it lies behind everything else:
//!    the watermark text and the watermark id, repeated along parallel lines
//!    rotated 35° across the whole page, filled in grey through an
//!    `ExtGState` with a fill opacity of 0.15. The watermark id is also written
//!    to the document information dictionary (`/Subject` and `/Keywords` hold
//!    `watermark:<id>`), so a leaked copy can be traced even when the visible
//!    mark has been cropped.
//! 2. **A thin double frame** around the page.
//! 3. **The content.** On the first page: the title, the subtitle (issuing
//!    province, or "International certificate (EU DCC format)"), a rule,
//!    the label/value lines (holder, already masked by the caller, the
//!    certificate id, the issue time, ...) and then one block per dose
//!    (vaccine, maker, batch, dose n/N, date, unit, worker key id), each
//!    headed "Dose n". Long values are wrapped to the column width (word
//!    breaks where possible, otherwise hard breaks) and capped at a few lines.
//!    When the dose blocks do not fit, they continue on further pages, which
//!    repeat the title in a small running header.
//! 4. **The QR code** at the top right of the first page: the `qr_payload`
//!    (`HCV1:...` or `HC1:...`) encoded at error-correction level M, drawn as
//!    filled black rectangles (one per horizontal run of dark modules) on an
//!    opaque white square with a quiet zone of four modules, 176–200 pt wide,
//!    with the watermark id printed small beneath it. The payload itself is
//!    never printed as text.
//! 5. **The footer** at the bottom of each page (verification hint and the
//!    key id that signed the digest), and "n / N" when there is more than one
//!    page.
//!
//! Fonts: without CJK text the standard Type 1 fonts Helvetica and
//! Helvetica-Bold are used with `WinAnsiEncoding` (characters outside it print
//! as `?`). When [`PdfCertificate::chinese`] is set, all text uses the
//! predefined, non-embedded CJK font `STSong-Light` through a Type 0 font with
//! the predefined CMap `UniGB-UCS2-H` (strings are UCS-2 big-endian; characters
//! beyond the Basic Multilingual Plane print as `?`) and a `CIDFontType0`
//! descendant of the Adobe-GB1 collection; bold is simulated by filling and
//! stroking the glyphs.
//!
//! The output is deterministic: no timestamps are written, the content streams
//! are Flate-compressed with a fixed level and the file identifier is a SHA-256
//! digest of the certificate's title, subtitle, watermark id and QR payload.

use std::io::Write as _;

use pdf_writer::types::{CidFontType, FontFlags, SystemInfo, TextRenderingMode};
use pdf_writer::{Content, Filter, Name, Pdf, Rect, Ref, Str, TextStr};
use qrcode::{Color, EcLevel, QrCode};
use sha2::{Digest as _, Sha256};

/// One "label: value" row of the certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PdfLine {
    pub label: String,
    pub value: String,
}

impl PdfLine {
    pub fn new(label: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            value: value.into(),
        }
    }
}

/// Everything printed on the certificate. See the module documentation.
#[derive(Debug, Clone)]
pub struct PdfCertificate<'a> {
    /// e.g. "Vaccination Certificate" or "新冠病毒疫苗接种电子凭证".
    pub title: String,
    /// e.g. the issuing province, or "International certificate (EU DCC format)".
    pub subtitle: String,
    /// Holder (already masked), certificate id, issue time, ...
    pub lines: Vec<PdfLine>,
    /// One block per dose: vaccine, maker, batch, dose n/N, date, unit, worker key id.
    pub doses: Vec<Vec<PdfLine>>,
    /// Text encoded in the QR code (`HCV1:...` or `HC1:...`), up to about 2 KB.
    pub qr_payload: &'a str,
    /// Printed in the visible watermark and stored in the document information.
    pub watermark_id: &'a str,
    /// e.g. "OFFICIAL COPY · <province>"; drawn diagonally behind the content.
    pub watermark_text: String,
    /// e.g. "Verify: scan the QR or call VerifyDomesticCertificate. Digest signed by key <id>."
    pub footer: String,
    /// True when any text holds CJK characters: all text then uses a CJK font.
    pub chinese: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PdfError {
    #[error("qr: {0}")]
    Qr(String),
}

// ---------------------------------------------------------------------------
// Page geometry (PDF points, origin at the bottom left).

const PAGE_W: f32 = 595.0;
const PAGE_H: f32 = 842.0;
const LEFT: f32 = 50.0;
const RIGHT: f32 = 545.0;

const TITLE_SIZE: f32 = 20.0;
const TITLE_LEADING: f32 = 24.0;
const SUBTITLE_SIZE: f32 = 11.0;
const SUBTITLE_LEADING: f32 = 14.0;
const RUNNING_TITLE_SIZE: f32 = 10.0;

const LABEL_SIZE: f32 = 9.0;
const LABEL_W: f32 = 110.0;
const VALUE_X: f32 = 168.0;
const VALUE_SIZE: f32 = 10.0;
const LEADING: f32 = 13.5;
const DESCENT: f32 = 4.0;
const ROW_GAP: f32 = 3.5;
const MAX_FIELD_LINES: usize = 12;

const HEADING_SIZE: f32 = 11.5;

const FOOTER_SIZE: f32 = 7.5;
const FOOTER_LEADING: f32 = 9.5;
const FOOTER_BASE: f32 = 40.0;
const FOOTER_MAX_LINES: usize = 6;

const QR_QUIET_ZONE: usize = 4;
const QR_GUTTER: f32 = 12.0;
const QR_CAPTION_SIZE: f32 = 7.5;
const QR_CAPTION_LEADING: f32 = 9.0;

const WATERMARK_SIZE: f32 = 16.0;
const WATERMARK_ANGLE_DEG: f32 = 35.0;
const WATERMARK_ALPHA: f32 = 0.15;
const WATERMARK_GRAY: f32 = 0.45;
const WATERMARK_MAX_CHARS: usize = 160;

// Resource names used in the content streams.
const FONT_REGULAR: Name<'static> = Name(b"F1");
const FONT_BOLD: Name<'static> = Name(b"F2");
const FONT_CJK: Name<'static> = Name(b"F3");
const GS_WATERMARK: Name<'static> = Name(b"GSwm");

/// Helvetica advance widths (1/1000 em) for the printable ASCII range 32..=126,
/// from the Adobe core-font metrics.
const HELVETICA_WIDTHS: [u16; 95] = [
    278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278, // 32-47
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 278, 278, 584, 584, 584, 556, // 48-63
    1015, 667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722, 778, // 64-79
    667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 278, 278, 278, 469, 556, // 80-95
    333, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556, 556, // 96-111
    556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584, // 112-126
];

/// Helvetica-Bold is a little wider than Helvetica; good enough for wrapping.
const BOLD_FACTOR: f32 = 1.1;

/// Render the certificate to the bytes of a PDF file.
pub fn render(cert: &PdfCertificate<'_>) -> Result<Vec<u8>, PdfError> {
    // Encode the QR code first, so that an oversized payload fails early.
    let code = QrCode::with_error_correction_level(cert.qr_payload.as_bytes(), EcLevel::M)
        .map_err(|e| PdfError::Qr(e.to_string()))?;

    let painter = Painter {
        chinese: cert.chinese,
    };
    let pages = build_pages(&painter, cert, &code);
    Ok(write_document(cert, pages))
}

// ---------------------------------------------------------------------------
// Text: faces, encoding, measuring, wrapping and drawing.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Face {
    Regular,
    Bold,
}

struct Painter {
    chinese: bool,
}

impl Painter {
    fn font(&self, face: Face) -> Name<'static> {
        if self.chinese {
            FONT_CJK
        } else {
            match face {
                Face::Regular => FONT_REGULAR,
                Face::Bold => FONT_BOLD,
            }
        }
    }

    /// The bytes to show for `text` in the current font's encoding.
    fn encode(&self, text: &str) -> Vec<u8> {
        if self.chinese {
            encode_ucs2_be(text)
        } else {
            encode_win_ansi(text)
        }
    }

    /// Advance width of `ch` in em.
    fn char_width(&self, ch: char, face: Face) -> f32 {
        if self.chinese {
            // STSong-Light: the Latin range and half-width forms are 500 units
            // wide (as declared in the CID font's /W array), the rest 1000.
            if (' '..='~').contains(&ch) || ('\u{FF61}'..='\u{FF9F}').contains(&ch) {
                0.5
            } else {
                1.0
            }
        } else {
            let base = match ch {
                ' '..='~' => HELVETICA_WIDTHS
                    .get((ch as usize).saturating_sub(32))
                    .map_or(0.6, |w| f32::from(*w) / 1000.0),
                '\u{2014}' | '\u{2026}' | '\u{2030}' | '\u{2122}' => 1.0,
                _ => 0.6,
            };
            match face {
                Face::Regular => base,
                Face::Bold => base * BOLD_FACTOR,
            }
        }
    }

    fn text_width(&self, text: &str, face: Face, size: f32) -> f32 {
        text.chars().map(|c| self.char_width(c, face)).sum::<f32>() * size
    }

    /// Wrap `text` to lines no wider than `max_width` points. Breaks at spaces
    /// (which are dropped), after `-`, `/`, `,` and CJK characters, and
    /// anywhere when a word is longer than a line. Explicit newlines start new
    /// lines. At most `max_lines` lines are kept; a cut is marked with "...".
    fn wrap(
        &self,
        text: &str,
        face: Face,
        size: f32,
        max_width: f32,
        max_lines: usize,
    ) -> Vec<String> {
        let max_width = max_width.max(size);
        let max_lines = max_lines.max(1);
        let mut out: Vec<String> = Vec::new();

        for paragraph in text.split('\n') {
            let mut line: Vec<(char, f32)> = Vec::new();
            let mut width = 0.0f32;
            for raw in paragraph.chars() {
                let ch = if raw.is_control() { ' ' } else { raw };
                if ch == ' ' && line.is_empty() {
                    continue;
                }
                let w = self.char_width(ch, face) * size;
                if width + w > max_width && !line.is_empty() {
                    if ch == ' ' {
                        out.push(collect_line(&line));
                        line.clear();
                        width = 0.0;
                        continue;
                    }
                    let tail = match line.iter().rposition(|&(c, _)| c == ' ' || breaks_after(c)) {
                        Some(i) => line.split_off(i + 1),
                        None => Vec::new(),
                    };
                    out.push(collect_line(&line));
                    line = tail;
                    width = line.iter().map(|&(_, cw)| cw).sum();
                    if width + w > max_width && !line.is_empty() {
                        out.push(collect_line(&line));
                        line.clear();
                        width = 0.0;
                    }
                }
                line.push((ch, w));
                width += w;
            }
            out.push(collect_line(&line));
        }

        if out.len() > max_lines {
            out.truncate(max_lines);
            if let Some(last) = out.last_mut() {
                let mut kept = last.trim_end().to_string();
                while !kept.is_empty()
                    && self.text_width(&kept, face, size) + self.text_width("...", face, size)
                        > max_width
                {
                    kept.pop();
                }
                *last = format!("{}...", kept.trim_end());
            }
        }
        if out.is_empty() {
            out.push(String::new());
        }
        out
    }

    /// Draw one line of text with its baseline starting at (x, y).
    #[allow(clippy::too_many_arguments)]
    fn text(&self, c: &mut Content, face: Face, size: f32, gray: f32, x: f32, y: f32, s: &str) {
        if s.is_empty() {
            return;
        }
        let bytes = self.encode(s);
        // STSong-Light has no bold variant: fill and stroke the outlines.
        let fake_bold = self.chinese && face == Face::Bold;
        c.save_state();
        c.set_fill_gray(gray);
        if fake_bold {
            c.set_stroke_gray(gray);
            c.set_line_width(size * 0.035);
        }
        c.begin_text();
        c.set_font(self.font(face), size);
        if fake_bold {
            c.set_text_rendering_mode(TextRenderingMode::FillStroke);
        }
        c.next_line(x, y);
        c.show(Str(bytes.as_slice()));
        c.end_text();
        c.restore_state();
    }

    /// A new page's content stream: the watermark (first, so it lies behind
    /// everything) and the frame.
    fn begin_page(&self, watermark: &str) -> Content {
        let mut c = Content::new();
        self.watermark(&mut c, watermark);
        c.save_state();
        c.set_stroke_gray(0.7);
        c.set_line_width(0.8);
        c.rect(30.0, 28.0, PAGE_W - 60.0, PAGE_H - 56.0);
        c.stroke();
        c.set_line_width(0.3);
        c.rect(34.0, 32.0, PAGE_W - 68.0, PAGE_H - 64.0);
        c.stroke();
        c.restore_state();
        c
    }

    /// The watermark: `unit` repeated along parallel diagonal lines that cover
    /// the page, light grey and semi-transparent.
    fn watermark(&self, c: &mut Content, unit: &str) {
        if unit.trim().is_empty() {
            return;
        }
        let unit_width = self.text_width(unit, Face::Bold, WATERMARK_SIZE);
        // Each line must cross the whole page diagonal (about 1030 pt).
        let repeats = if unit_width < 1.0 {
            1
        } else {
            ((1250.0 / unit_width).ceil() as usize).clamp(1, 24)
        };
        let line = vec![unit; repeats].join("      ");
        let bytes = self.encode(&line);

        let (sin, cos) = WATERMARK_ANGLE_DEG.to_radians().sin_cos();
        c.save_state();
        c.set_parameters(GS_WATERMARK);
        c.set_fill_gray(WATERMARK_GRAY);
        c.begin_text();
        c.set_font(self.font(Face::Bold), WATERMARK_SIZE);
        // Lines at a perpendicular distance `d` from the origin, spaced 110 pt,
        // covering d in [-380, 720], which spans the page corners
        // (-341 at the bottom right, 690 at the top left).
        for i in 0..11u8 {
            let d = -380.0 + f32::from(i) * 110.0;
            let x0 = if i % 2 == 0 { -60.0 } else { -150.0 };
            let y0 = (d + sin * x0) / cos;
            c.set_text_matrix([cos, sin, -sin, cos, x0, y0]);
            c.show(Str(bytes.as_slice()));
        }
        c.end_text();
        c.restore_state();
    }

    /// The footer block, bottom of the page, with "n / N" when `total > 1`.
    fn footer(&self, c: &mut Content, lines: &[String], page: usize, total: usize) {
        let first = footer_first_baseline(lines.len());
        let rule_y = first + FOOTER_SIZE + 4.0;
        rule(c, LEFT, RIGHT, rule_y, 0.6, 0.5);
        let mut y = first;
        for line in lines {
            self.text(c, Face::Regular, FOOTER_SIZE, 0.3, LEFT, y, line);
            y -= FOOTER_LEADING;
        }
        if total > 1 {
            let label = format!("{} / {}", page + 1, total);
            let w = self.text_width(&label, Face::Regular, FOOTER_SIZE);
            self.text(
                c,
                Face::Regular,
                FOOTER_SIZE,
                0.3,
                RIGHT - w,
                rule_y + 4.0,
                &label,
            );
        }
    }
}

fn footer_first_baseline(lines: usize) -> f32 {
    FOOTER_BASE + lines.saturating_sub(1) as f32 * FOOTER_LEADING
}

/// The lowest point content may reach above a footer of `lines` lines.
fn content_bottom_limit(lines: usize) -> f32 {
    footer_first_baseline(lines) + FOOTER_SIZE + 4.0 + 14.0
}

fn collect_line(line: &[(char, f32)]) -> String {
    let s: String = line.iter().map(|&(c, _)| c).collect();
    s.trim_end().to_string()
}

fn breaks_after(c: char) -> bool {
    matches!(c, '-' | '/' | ',') || is_cjk(c)
}

fn is_cjk(c: char) -> bool {
    matches!(c,
        '\u{2E80}'..='\u{303F}'
        | '\u{3040}'..='\u{30FF}'
        | '\u{3400}'..='\u{4DBF}'
        | '\u{4E00}'..='\u{9FFF}'
        | '\u{AC00}'..='\u{D7AF}'
        | '\u{F900}'..='\u{FAFF}'
        | '\u{FF00}'..='\u{FFEF}'
        | '\u{20000}'..='\u{2FA1F}')
}

fn rule(c: &mut Content, x0: f32, x1: f32, y: f32, gray: f32, width: f32) {
    c.save_state();
    c.set_stroke_gray(gray);
    c.set_line_width(width);
    c.move_to(x0, y);
    c.line_to(x1, y);
    c.stroke();
    c.restore_state();
}

/// Windows-1252 (`WinAnsiEncoding`) byte for `ch`, or `None`.
fn win_ansi_byte(ch: char) -> Option<u8> {
    let cp = u32::from(ch);
    match cp {
        0x20..=0x7E | 0xA0..=0xFF => u8::try_from(cp).ok(),
        _ => match ch {
            '\u{20AC}' => Some(0x80),
            '\u{201A}' => Some(0x82),
            '\u{0192}' => Some(0x83),
            '\u{201E}' => Some(0x84),
            '\u{2026}' => Some(0x85),
            '\u{2020}' => Some(0x86),
            '\u{2021}' => Some(0x87),
            '\u{02C6}' => Some(0x88),
            '\u{2030}' => Some(0x89),
            '\u{0160}' => Some(0x8A),
            '\u{2039}' => Some(0x8B),
            '\u{0152}' => Some(0x8C),
            '\u{017D}' => Some(0x8E),
            '\u{2018}' => Some(0x91),
            '\u{2019}' => Some(0x92),
            '\u{201C}' => Some(0x93),
            '\u{201D}' => Some(0x94),
            '\u{2022}' => Some(0x95),
            '\u{2013}' => Some(0x96),
            '\u{2014}' => Some(0x97),
            '\u{02DC}' => Some(0x98),
            '\u{2122}' => Some(0x99),
            '\u{0161}' => Some(0x9A),
            '\u{203A}' => Some(0x9B),
            '\u{0153}' => Some(0x9C),
            '\u{017E}' => Some(0x9E),
            '\u{0178}' => Some(0x9F),
            _ => None,
        },
    }
}

/// `text` in `WinAnsiEncoding`; control characters become spaces, anything
/// outside the encoding becomes `?`.
fn encode_win_ansi(text: &str) -> Vec<u8> {
    text.chars()
        .map(|ch| {
            if ch.is_control() {
                b' '
            } else {
                win_ansi_byte(ch).unwrap_or(b'?')
            }
        })
        .collect()
}

/// `text` as UCS-2 big-endian (for the `UniGB-UCS2-H` CMap); control
/// characters become spaces, characters beyond the BMP become `?`.
fn encode_ucs2_be(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 2);
    for ch in text.chars() {
        let unit = if ch.is_control() {
            0x20
        } else {
            u16::try_from(u32::from(ch)).unwrap_or(0x3F)
        };
        out.extend_from_slice(&unit.to_be_bytes());
    }
    out
}

// ---------------------------------------------------------------------------
// Layout.

/// The region taken by the QR code (and its caption) on the first page.
struct QrZone {
    left: f32,
    bottom: f32,
}

struct Layout<'p> {
    painter: &'p Painter,
    done: Vec<Content>,
    current: Content,
    page: usize,
    /// Baseline of the next row.
    y: f32,
    bottom_limit: f32,
    qr_zone: Option<QrZone>,
    watermark: String,
    running_title: String,
}

impl<'p> Layout<'p> {
    fn new(
        painter: &'p Painter,
        watermark: String,
        running_title: String,
        bottom_limit: f32,
    ) -> Self {
        let current = painter.begin_page(&watermark);
        Self {
            painter,
            done: Vec::new(),
            current,
            page: 0,
            y: PAGE_H - 62.0,
            bottom_limit,
            qr_zone: None,
            watermark,
            running_title,
        }
    }

    fn new_page(&mut self) {
        let next = self.painter.begin_page(&self.watermark);
        let previous = std::mem::replace(&mut self.current, next);
        self.done.push(previous);
        self.page += 1;

        let title = self.painter.wrap(
            &self.running_title,
            Face::Bold,
            RUNNING_TITLE_SIZE,
            RIGHT - LEFT,
            1,
        );
        let top = PAGE_H - 62.0;
        if let Some(first) = title.first() {
            self.painter.text(
                &mut self.current,
                Face::Bold,
                RUNNING_TITLE_SIZE,
                0.35,
                LEFT,
                top,
                first,
            );
        }
        rule(&mut self.current, LEFT, RIGHT, top - 8.0, 0.5, 0.6);
        self.y = top - 30.0;
    }

    /// Start a new page unless `extent` points below the current baseline
    /// still lie above the footer.
    fn ensure(&mut self, extent: f32) {
        if self.y - extent < self.bottom_limit {
            self.new_page();
        }
    }

    /// Right edge of a row whose top is at `row_top`: left of the QR code
    /// while beside it, the right margin otherwise.
    fn right_edge(&self, row_top: f32) -> f32 {
        match &self.qr_zone {
            Some(zone) if self.page == 0 && row_top > zone.bottom - 2.0 => zone.left - QR_GUTTER,
            _ => RIGHT,
        }
    }

    /// Title, subtitle and the rule under them, on the first page. Returns the
    /// rule's height.
    fn header(&mut self, title: &str, subtitle: &str) -> f32 {
        let mut y = PAGE_H - 62.0;
        let mut last = y;
        for line in self
            .painter
            .wrap(title, Face::Bold, TITLE_SIZE, RIGHT - LEFT, 3)
        {
            self.painter.text(
                &mut self.current,
                Face::Bold,
                TITLE_SIZE,
                0.0,
                LEFT,
                y,
                &line,
            );
            last = y;
            y -= TITLE_LEADING;
        }
        if !subtitle.trim().is_empty() {
            y = last - 20.0;
            for line in self
                .painter
                .wrap(subtitle, Face::Regular, SUBTITLE_SIZE, RIGHT - LEFT, 3)
            {
                self.painter.text(
                    &mut self.current,
                    Face::Regular,
                    SUBTITLE_SIZE,
                    0.3,
                    LEFT,
                    y,
                    &line,
                );
                last = y;
                y -= SUBTITLE_LEADING;
            }
        }
        let rule_y = last - 12.0;
        rule(&mut self.current, LEFT, RIGHT, rule_y, 0.15, 1.2);
        self.y = rule_y - 24.0;
        rule_y
    }

    /// The QR code at the top right of the first page, below the header rule.
    fn qr(&mut self, code: &QrCode, caption: &str, rule_y: f32) {
        let modules = code.width() + 2 * QR_QUIET_ZONE;
        let size = if modules > 100 { 200.0 } else { 176.0 };
        let top = rule_y - 14.0;
        let left = RIGHT - size;
        draw_qr(&mut self.current, code, left, top, size);

        let mut bottom = top - size;
        let mut y = bottom - 10.0;
        for line in self
            .painter
            .wrap(caption, Face::Regular, QR_CAPTION_SIZE, size, 2)
        {
            self.painter.text(
                &mut self.current,
                Face::Regular,
                QR_CAPTION_SIZE,
                0.35,
                left,
                y,
                &line,
            );
            bottom = y - 3.0;
            y -= QR_CAPTION_LEADING;
        }
        self.qr_zone = Some(QrZone { left, bottom });
    }

    fn wrap_value(&self, value: &str) -> Vec<String> {
        let right = self.right_edge(self.y + VALUE_SIZE);
        self.painter.wrap(
            value,
            Face::Regular,
            VALUE_SIZE,
            right - VALUE_X,
            MAX_FIELD_LINES,
        )
    }

    /// One label/value row; both columns wrap.
    fn field(&mut self, label: &str, value: &str) {
        let labels = self
            .painter
            .wrap(label, Face::Bold, LABEL_SIZE, LABEL_W, MAX_FIELD_LINES);
        let mut values = self.wrap_value(value);
        let mut rows = labels.len().max(values.len()).max(1);
        if self.y - ((rows - 1) as f32 * LEADING + DESCENT) < self.bottom_limit {
            self.new_page();
            values = self.wrap_value(value);
            rows = labels.len().max(values.len()).max(1);
        }

        let mut y = self.y;
        for line in &labels {
            self.painter.text(
                &mut self.current,
                Face::Bold,
                LABEL_SIZE,
                0.3,
                LEFT,
                y,
                line,
            );
            y -= LEADING;
        }
        let mut y = self.y;
        for line in &values {
            self.painter.text(
                &mut self.current,
                Face::Regular,
                VALUE_SIZE,
                0.0,
                VALUE_X,
                y,
                line,
            );
            y -= LEADING;
        }
        self.y -= rows as f32 * LEADING + ROW_GAP;
    }

    /// A block heading with a thin rule under it; never left alone at the
    /// bottom of a page.
    fn heading(&mut self, text: &str) {
        self.y -= 8.0;
        self.ensure(20.0 + LEADING + DESCENT);
        let right = self.right_edge(self.y + HEADING_SIZE);
        let lines = self
            .painter
            .wrap(text, Face::Bold, HEADING_SIZE, right - LEFT, 1);
        if let Some(line) = lines.first() {
            self.painter.text(
                &mut self.current,
                Face::Bold,
                HEADING_SIZE,
                0.1,
                LEFT,
                self.y,
                line,
            );
        }
        rule(&mut self.current, LEFT, right, self.y - 5.0, 0.6, 0.5);
        self.y -= 20.0;
    }

    fn finish(mut self) -> Vec<Content> {
        self.done.push(self.current);
        self.done
    }
}

/// The QR code as filled rectangles (one per horizontal run of dark modules)
/// on an opaque white square that includes the quiet zone.
fn draw_qr(c: &mut Content, code: &QrCode, left: f32, top: f32, size: f32) {
    let n = code.width();
    if n == 0 {
        return;
    }
    let module = size / (n + 2 * QR_QUIET_ZONE) as f32;
    c.save_state();
    // White background (the quiet zone must stay light over the watermark)
    // and a faint border.
    c.set_fill_gray(1.0);
    c.set_stroke_gray(0.8);
    c.set_line_width(0.5);
    c.rect(left, top - size, size, size);
    c.fill_nonzero_and_stroke();

    c.set_fill_gray(0.0);
    let colors = code.to_colors();
    for (row, cells) in colors.chunks(n).enumerate() {
        let y = top - (QR_QUIET_ZONE + row + 1) as f32 * module;
        let mut col = 0;
        while col < cells.len() {
            if cells.get(col) == Some(&Color::Dark) {
                let start = col;
                while cells.get(col) == Some(&Color::Dark) {
                    col += 1;
                }
                let x = left + (QR_QUIET_ZONE + start) as f32 * module;
                c.rect(x, y, (col - start) as f32 * module, module);
            } else {
                col += 1;
            }
        }
    }
    c.fill_nonzero();
    c.restore_state();
}

fn watermark_unit(cert: &PdfCertificate<'_>) -> String {
    let text = cert.watermark_text.trim();
    let id = cert.watermark_id.trim();
    let unit = match (text.is_empty(), id.is_empty()) {
        (false, false) => format!("{text} \u{00B7} {id}"),
        (false, true) => text.to_string(),
        (true, false) => id.to_string(),
        (true, true) => String::new(),
    };
    unit.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(WATERMARK_MAX_CHARS)
        .collect()
}

fn dose_heading(index: usize, chinese: bool) -> String {
    let n = index + 1;
    if chinese {
        format!("第{n}剂 / Dose {n}")
    } else {
        format!("Dose {n}")
    }
}

/// Lay the certificate out into one content stream per page.
fn build_pages(painter: &Painter, cert: &PdfCertificate<'_>, code: &QrCode) -> Vec<Content> {
    let footer = painter.wrap(
        &cert.footer,
        Face::Regular,
        FOOTER_SIZE,
        RIGHT - LEFT,
        FOOTER_MAX_LINES,
    );
    let mut layout = Layout::new(
        painter,
        watermark_unit(cert),
        cert.title.clone(),
        content_bottom_limit(footer.len()),
    );

    let rule_y = layout.header(&cert.title, &cert.subtitle);
    layout.qr(code, cert.watermark_id, rule_y);

    for line in &cert.lines {
        layout.field(&line.label, &line.value);
    }
    for (i, dose) in cert.doses.iter().enumerate() {
        layout.heading(&dose_heading(i, cert.chinese));
        for line in dose {
            layout.field(&line.label, &line.value);
        }
    }

    let mut pages = layout.finish();
    let total = pages.len();
    for (i, page) in pages.iter_mut().enumerate() {
        painter.footer(page, &footer, i, total);
    }
    pages
}

// ---------------------------------------------------------------------------
// Document structure.

#[derive(Clone, Copy)]
enum FontRefs {
    Latin {
        regular: Ref,
        bold: Ref,
    },
    Cjk {
        type0: Ref,
        cid: Ref,
        descriptor: Ref,
    },
}

struct RefAlloc(i32);

impl RefAlloc {
    fn alloc(&mut self) -> Ref {
        let r = Ref::new(self.0);
        self.0 = self.0.saturating_add(1);
        r
    }
}

/// zlib-compress a content stream; `None` if the encoder fails (then the
/// stream is written uncompressed).
fn deflate(data: &[u8]) -> Option<Vec<u8>> {
    let mut encoder = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(data.len() / 3 + 64),
        flate2::Compression::new(6),
    );
    encoder.write_all(data).ok()?;
    encoder.finish().ok()
}

/// A stable file identifier derived from the certificate.
fn file_id(cert: &PdfCertificate<'_>) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(b"healthcode-vaccination-pdf-v1");
    for part in [
        cert.title.as_str(),
        cert.subtitle.as_str(),
        cert.watermark_id,
        cert.qr_payload,
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize()[..16].to_vec()
}

fn write_document(cert: &PdfCertificate<'_>, pages: Vec<Content>) -> Vec<u8> {
    let mut refs = RefAlloc(1);
    let catalog_ref = refs.alloc();
    let tree_ref = refs.alloc();
    let info_ref = refs.alloc();
    let gs_ref = refs.alloc();
    let fonts = if cert.chinese {
        FontRefs::Cjk {
            type0: refs.alloc(),
            cid: refs.alloc(),
            descriptor: refs.alloc(),
        }
    } else {
        FontRefs::Latin {
            regular: refs.alloc(),
            bold: refs.alloc(),
        }
    };
    let page_refs: Vec<(Ref, Ref)> = pages.iter().map(|_| (refs.alloc(), refs.alloc())).collect();

    let mut pdf = Pdf::new();
    let id = file_id(cert);
    pdf.set_file_id((id.clone(), id));

    {
        let mut catalog = pdf.catalog(catalog_ref);
        catalog.pages(tree_ref);
        if cert.chinese {
            catalog.lang(TextStr("zh-CN"));
        }
    }
    pdf.pages(tree_ref)
        .kids(page_refs.iter().map(|&(page, _)| page))
        .count(i32::try_from(page_refs.len()).unwrap_or(i32::MAX));

    // Document information: the watermark id is recorded here too.
    let watermark = format!("watermark:{}", cert.watermark_id);
    let keywords = format!("{watermark}, vaccination certificate");
    pdf.document_info(info_ref)
        .title(TextStr(&cert.title))
        .subject(TextStr(&watermark))
        .keywords(TextStr(&keywords))
        .creator(TextStr("healthcode vaccination service"))
        .producer(TextStr("healthcode vaccination service (pdf-writer)"));

    pdf.ext_graphics(gs_ref)
        .non_stroking_alpha(WATERMARK_ALPHA)
        .stroking_alpha(WATERMARK_ALPHA);

    match fonts {
        FontRefs::Latin { regular, bold } => {
            pdf.type1_font(regular)
                .base_font(Name(b"Helvetica"))
                .encoding_predefined(Name(b"WinAnsiEncoding"));
            pdf.type1_font(bold)
                .base_font(Name(b"Helvetica-Bold"))
                .encoding_predefined(Name(b"WinAnsiEncoding"));
        }
        FontRefs::Cjk {
            type0,
            cid,
            descriptor,
        } => {
            // The Type 0 font's /BaseFont is the CIDFont name, a hyphen and
            // the CMap name (PDF 32000-1, 9.7.6.1).
            pdf.type0_font(type0)
                .base_font(Name(b"STSong-Light-UniGB-UCS2-H"))
                .encoding_predefined(Name(b"UniGB-UCS2-H"))
                .descendant_font(cid);
            {
                let mut cid_font = pdf.cid_font(cid);
                cid_font
                    .subtype(CidFontType::Type0)
                    .base_font(Name(b"STSong-Light"))
                    .system_info(SystemInfo {
                        registry: Str(b"Adobe"),
                        ordering: Str(b"GB1"),
                        supplement: 4,
                    })
                    .font_descriptor(descriptor)
                    .default_width(1000.0);
                // Half-width ranges of Adobe-GB1 (proportional Latin, half-width
                // forms); everything else is 1000 units wide.
                cid_font
                    .widths()
                    .same(1, 95, 500.0)
                    .same(814, 939, 500.0)
                    .same(7712, 7716, 500.0)
                    .same(22127, 22357, 500.0);
            }
            pdf.font_descriptor(descriptor)
                .name(Name(b"STSong-Light"))
                .flags(FontFlags::SERIF | FontFlags::SYMBOLIC)
                .bbox(Rect::new(-134.0, -254.0, 1001.0, 905.0))
                .italic_angle(0.0)
                .ascent(905.0)
                .descent(-254.0)
                .cap_height(626.0)
                .stem_v(48.0);
        }
    }

    for (content, &(page_ref, content_ref)) in pages.into_iter().zip(page_refs.iter()) {
        {
            let mut page = pdf.page(page_ref);
            page.parent(tree_ref)
                .media_box(Rect::new(0.0, 0.0, PAGE_W, PAGE_H))
                .contents(content_ref);
            let mut resources = page.resources();
            {
                let mut font_dict = resources.fonts();
                match fonts {
                    FontRefs::Latin { regular, bold } => {
                        font_dict.pair(FONT_REGULAR, regular).pair(FONT_BOLD, bold);
                    }
                    FontRefs::Cjk { type0, .. } => {
                        font_dict.pair(FONT_CJK, type0);
                    }
                }
            }
            resources.ext_g_states().pair(GS_WATERMARK, gs_ref);
        }

        let raw = content.finish();
        match deflate(raw.as_slice()) {
            Some(compressed) => {
                pdf.stream(content_ref, &compressed)
                    .filter(Filter::FlateDecode);
            }
            None => {
                let _ = pdf.stream(content_ref, raw.as_slice());
            }
        }
    }

    pdf.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(chinese: bool, doses: usize) -> PdfCertificate<'static> {
        let dose = |n: usize| {
            vec![
                PdfLine::new(
                    if chinese { "疫苗" } else { "Vaccine" },
                    "COVID-19 Vaccine (Vero Cell), Inactivated",
                ),
                PdfLine::new(
                    if chinese {
                        "生产企业"
                    } else {
                        "Manufacturer"
                    },
                    "Beijing Institute of Biological Products Co., Ltd.",
                ),
                PdfLine::new("Batch", "202104031234"),
                PdfLine::new("Dose", format!("{n}/3")),
                PdfLine::new("Date", format!("2021-05-0{n}")),
                PdfLine::new(
                    if chinese {
                        "接种单位"
                    } else {
                        "Vaccination unit"
                    },
                    if chinese {
                        "浙江省杭州市西湖区北山街道社区卫生服务中心预防接种门诊（临时接种点）"
                    } else {
                        "Community Health Service Centre, Beishan Street, Xihu District, Hangzhou — temporary site"
                    },
                ),
                PdfLine::new("Worker key id", "k-2f9c1d7e"),
            ]
        };
        PdfCertificate {
            title: if chinese { "新冠病毒疫苗接种电子凭证".into() } else { "Vaccination Certificate".into() },
            subtitle: if chinese { "浙江省".into() } else { "Zhejiang Province".into() },
            lines: vec![
                PdfLine::new(if chinese { "姓名" } else { "Holder" }, if chinese { "张*" } else { "Zh*** S**" }),
                PdfLine::new(
                    "Certificate ID",
                    "VC-330100-2021-0000000000000000000000000000000000000000000000001234",
                ),
                PdfLine::new("Issued", "2021-06-01T08:00:00Z"),
            ],
            doses: (1..=doses).map(dose).collect(),
            qr_payload: "HCV1:6BFOXN*TS0BI$ZD4N9:9S6RCVN5+O30K3/XIV0W23NTDEPWK G2EP4J0B",
            watermark_id: "WM-7f3a9c2e11",
            watermark_text: "OFFICIAL COPY \u{00B7} Zhejiang".into(),
            footer: "Verify: scan the QR or call VerifyDomesticCertificate. Digest signed by key k-2f9c1d7e.".into(),
            chinese,
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn assert_pdf_shape(bytes: &[u8]) {
        assert!(bytes.starts_with(b"%PDF-"), "missing header");
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        assert!(bytes[..end].ends_with(b"%%EOF"), "missing %%EOF");
    }

    #[test]
    fn latin_certificate_renders() {
        let cert = sample(false, 2);
        let bytes = render(&cert).expect("render");
        assert_pdf_shape(&bytes);
        assert!(
            contains(&bytes, b"WM-7f3a9c2e11"),
            "watermark id not in document info"
        );
        assert!(contains(&bytes, b"watermark:WM-7f3a9c2e11"));
        assert!(contains(&bytes, b"/Helvetica-Bold"));
        assert!(contains(&bytes, b"/WinAnsiEncoding"));
        assert!(contains(&bytes, b"/ca 0.15"));
        assert!(!contains(&bytes, b"STSong-Light"));
    }

    #[test]
    fn chinese_certificate_renders() {
        let cert = sample(true, 2);
        let bytes = render(&cert).expect("render");
        assert_pdf_shape(&bytes);
        assert!(contains(&bytes, b"WM-7f3a9c2e11"));
        assert!(contains(&bytes, b"/STSong-Light"));
        assert!(contains(&bytes, b"/UniGB-UCS2-H"));
        assert!(contains(&bytes, b"/CIDFontType0"));
        assert!(contains(&bytes, b"(GB1)"));
        assert!(!contains(&bytes, b"/Helvetica"));
    }

    #[test]
    fn output_is_deterministic() {
        let cert = sample(false, 3);
        assert_eq!(
            render(&cert).expect("first"),
            render(&cert).expect("second")
        );
        let cert = sample(true, 3);
        assert_eq!(
            render(&cert).expect("first"),
            render(&cert).expect("second")
        );
    }

    #[test]
    fn oversized_payload_is_a_qr_error() {
        let payload = "x".repeat(4000);
        let mut cert = sample(false, 1);
        cert.qr_payload = &payload;
        match render(&cert) {
            Err(PdfError::Qr(msg)) => assert!(!msg.is_empty()),
            Ok(_) => panic!("a 4000-byte payload cannot fit a QR code"),
        }
    }

    #[test]
    fn large_payload_still_fits() {
        // About 2 KB of Base45-like text, as an EU DCC "HC1:" payload would be.
        let payload = format!(
            "HC1:{}",
            "6BFOXN*TS0BI$ZD4N9:9S6RCVN5+O30K3/XIV0W23".repeat(50)
        );
        let mut cert = sample(false, 2);
        cert.qr_payload = &payload;
        let bytes = render(&cert).expect("render");
        assert_pdf_shape(&bytes);
    }

    #[test]
    fn many_doses_continue_on_more_pages() {
        let cert = sample(false, 12);
        let painter = Painter { chinese: false };
        let code = QrCode::with_error_correction_level(cert.qr_payload.as_bytes(), EcLevel::M)
            .expect("qr");
        let pages = build_pages(&painter, &cert, &code);
        assert!(pages.len() > 1, "12 dose blocks should not fit one page");
        let bytes = render(&cert).expect("render");
        assert_pdf_shape(&bytes);
        assert!(contains(
            &bytes,
            format!("/Count {}", pages.len()).as_bytes()
        ));
    }

    #[test]
    fn empty_certificate_renders() {
        let cert = PdfCertificate {
            title: String::new(),
            subtitle: String::new(),
            lines: Vec::new(),
            doses: Vec::new(),
            qr_payload: "HCV1:",
            watermark_id: "",
            watermark_text: String::new(),
            footer: String::new(),
            chinese: false,
        };
        let bytes = render(&cert).expect("render");
        assert_pdf_shape(&bytes);
    }

    #[test]
    fn win_ansi_encoding() {
        assert_eq!(encode_win_ansi("Az (1)"), b"Az (1)".to_vec());
        assert_eq!(encode_win_ansi("é·€—"), vec![0xE9, 0xB7, 0x80, 0x97]);
        assert_eq!(encode_win_ansi("中\u{1F600}\t"), b"?? ".to_vec());
    }

    #[test]
    fn ucs2_encoding() {
        assert_eq!(encode_ucs2_be("A中"), vec![0x00, 0x41, 0x4E, 0x2D]);
        assert_eq!(encode_ucs2_be("\u{1F600}"), vec![0x00, 0x3F]);
    }

    #[test]
    fn wrapping_respects_width_and_line_cap() {
        let painter = Painter { chinese: false };
        let text = "Community Health Service Centre, Beishan Street, Xihu District, Hangzhou";
        let lines = painter.wrap(text, Face::Regular, 10.0, 120.0, 10);
        assert!(lines.len() > 1);
        for line in &lines {
            assert!(
                painter.text_width(line, Face::Regular, 10.0) <= 120.0,
                "{line:?} too wide"
            );
        }
        assert_eq!(lines.join(" "), text);

        let long_id = "X".repeat(200);
        let lines = painter.wrap(&long_id, Face::Regular, 10.0, 100.0, 3);
        assert_eq!(lines.len(), 3);
        assert!(lines[2].ends_with("..."));

        let chinese = Painter { chinese: true };
        let lines = chinese.wrap(
            "浙江省杭州市西湖区北山街道社区卫生服务中心",
            Face::Regular,
            10.0,
            55.0,
            20,
        );
        assert!(lines.len() >= 4);
        for line in &lines {
            assert!(chinese.text_width(line, Face::Regular, 10.0) <= 55.0);
        }
    }
}
