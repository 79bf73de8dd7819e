//! Display strings for a person's code: color name, localised reasons, ordered instructions
//! and, in care mode, a short voice read-out. zh-CN and en; any other language falls back to
//! zh-CN. Pure functions, no I/O.
//!
//! Sentences are templates with optional segments: `[...]` is kept only when every `{slot}`
//! inside it has a value, so a missing date or parameter drops the clause instead of leaving
//! a broken sentence. Only the documented parameter keys are read, and each value inserted
//! is stripped of control characters and capped at [`MAX_PARAM_CHARS`] characters.

use chrono::{DateTime, Datelike, FixedOffset, Utc};
use healthcode_proto::common::v1::{CodeColor, ColorReason, Locale, ReasonCode};
use healthcode_proto::gateway::v1::{CodeDisplay, DisplayReason};
use prost_types::Timestamp;

/// Longest parameter value inserted into a sentence, in characters.
pub const MAX_PARAM_CHARS: usize = 64;
/// At most this many instructions in care mode.
pub const MAX_CARE_STEPS: usize = 3;

/// The documented `ColorReason.params` keys; no other key is ever read.
const PARAM_AREA_NAME: &str = "area_name";
const PARAM_PROVINCE_CODE: &str = "province_code";
const PARAM_TESTS_REMAINING: &str = "negative_tests_remaining";
const PARAM_DIRECTIVE_KIND: &str = "directive_kind";

/// Negative tests a yellow code asks for when no reason says how many remain (requirements §3).
const DEFAULT_YELLOW_TESTS: u32 = 2;
/// A `negative_tests_remaining` above this is treated as garbage.
const MAX_TESTS_REMAINING: u32 = 99;
/// China Standard Time, UTC+8 (no daylight saving).
const CST_OFFSET_SECS: i32 = 8 * 3600;

/// A language the display strings exist in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Lang {
    #[default]
    ZhCn,
    En,
}

impl Lang {
    /// `en` and any `en-*` / `en_*` tag (case-insensitive) is English; everything else,
    /// including an empty or unknown tag, falls back to zh-CN.
    pub fn from_tag(tag: &str) -> Lang {
        let primary = tag.trim().split(['-', '_']).next().unwrap_or_default();
        if primary.eq_ignore_ascii_case("en") {
            Lang::En
        } else {
            Lang::ZhCn
        }
    }

    /// The BCP 47 tag reported in `CodeDisplay.locale`.
    pub fn tag(self) -> &'static str {
        match self {
            Lang::ZhCn => "zh-CN",
            Lang::En => "en",
        }
    }
}

/// One string in both languages.
#[derive(Debug, Clone, Copy)]
struct Phrase {
    zh: &'static str,
    en: &'static str,
}

const fn p(zh: &'static str, en: &'static str) -> Phrase {
    Phrase { zh, en }
}

impl Phrase {
    fn get(self, lang: Lang) -> &'static str {
        match lang {
            Lang::ZhCn => self.zh,
            Lang::En => self.en,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tables

/// The color's name. Unspecified reads "status unknown", never anything green.
pub fn color_name(color: CodeColor, lang: Lang) -> &'static str {
    let name = match color {
        CodeColor::Green => p("绿码", "Green code"),
        CodeColor::Yellow => p("黄码", "Yellow code"),
        CodeColor::Red => p("红码", "Red code"),
        CodeColor::Unspecified => p("状态未知", "Status unknown"),
    };
    name.get(lang)
}

/// First sentence of the voice read-out.
fn voice_status(color: CodeColor) -> Phrase {
    match color {
        CodeColor::Green => p("您的健康码是绿码。", "Your health code is green."),
        CodeColor::Yellow => p("您的健康码是黄码。", "Your health code is yellow."),
        CodeColor::Red => p("您的健康码是红码。", "Your health code is red."),
        CodeColor::Unspecified => p(
            "您的健康码状态未知。",
            "Your health code status is unknown.",
        ),
    }
}

/// Reason templates: (full, care mode). Slots: `{date}` (occurred_at, China Standard Time),
/// `{area}`, `{province}`, `{directive}`, `{tests}` and `{s}` (English plural of `{tests}`).
/// Every slot sits inside an optional `[...]` segment.
fn reason_templates(code: ReasonCode) -> (Phrase, Phrase) {
    match code {
        ReasonCode::CloseContact => (
            p(
                "[{date}]与确诊病例密切接触",
                "Close contact of a confirmed case[ on {date}]",
            ),
            p(
                "您接触过确诊病人[（{date}）]",
                "You were near a confirmed case[ ({date})]",
            ),
        ),
        ReasonCode::SecondaryContact => (
            p(
                "[{date}]与密切接触者有接触",
                "Contact of a close contact[ on {date}]",
            ),
            p(
                "您接触过密接人员[（{date}）]",
                "You were near a close contact[ ({date})]",
            ),
        ),
        ReasonCode::HighRiskAreaStay => (
            p(
                "[{date}]到访高风险区[（{area}）]",
                "Visited a high-risk area[ ({area})][ on {date}]",
            ),
            p(
                "您去过高风险地区[（{date}）]",
                "You were in a high-risk area[ ({date})]",
            ),
        ),
        ReasonCode::MediumRiskAreaStay => (
            p(
                "[{date}]到访中风险区[（{area}）]",
                "Visited a medium-risk area[ ({area})][ on {date}]",
            ),
            p(
                "您去过中风险地区[（{date}）]",
                "You were in a medium-risk area[ ({date})]",
            ),
        ),
        ReasonCode::PositiveTest => (
            p(
                "[{date}采样的]核酸检测结果为阳性",
                "Positive nucleic-acid test[ (sampled {date})]",
            ),
            p(
                "核酸检测是阳性[（{date}）]",
                "Your test was positive[ ({date})]",
            ),
        ),
        ReasonCode::PoolPositiveRetestPending => (
            p(
                "[{date}采样的]混管样本呈阳性，等待单管复检",
                "In a positive pooled sample[ (sampled {date})]; waiting for a single-tube retest",
            ),
            p("需要再测一次核酸", "You need one more test"),
        ),
        ReasonCode::TestOverdue => (
            p(
                "近期没有核酸阴性结果[（上次采样：{date}）][，还需{tests}次阴性结果]",
                "No recent negative nucleic-acid result[ (last sampled {date})][; {tests} more negative result{s} needed]",
            ),
            p("核酸检测太久没做了", "Your last test is too old"),
        ),
        ReasonCode::VaccinationIncomplete => (
            p(
                "新冠疫苗尚未完成全程接种",
                "Vaccination course not completed",
            ),
            p("疫苗还没打完", "Your vaccination is not finished"),
        ),
        ReasonCode::BoosterOverdue => (
            p("加强针已逾期未接种", "Booster dose overdue"),
            p("该打加强针了", "Your booster shot is due"),
        ),
        ReasonCode::CentralisedQuarantine => (
            p(
                "[自{date}起]集中隔离中",
                "Under centralised quarantine[ since {date}]",
            ),
            p("您正在集中隔离", "You are in a quarantine centre"),
        ),
        ReasonCode::HomeQuarantine => (
            p(
                "[自{date}起]居家隔离中",
                "Under home quarantine[ since {date}]",
            ),
            p("您正在居家隔离", "You are in home quarantine"),
        ),
        ReasonCode::HomeMonitoring => (
            p(
                "[自{date}起]居家健康监测中",
                "Under home health monitoring[ since {date}]",
            ),
            p("您正在居家健康监测", "You are under health checks at home"),
        ),
        ReasonCode::ManualOverride => (
            p(
                "[{date}]经人工审核确定",
                "Set by an approved manual review[ on {date}]",
            ),
            p("工作人员核实后调整", "Set by health staff"),
        ),
        ReasonCode::AppealCorrected => (
            p(
                "[{date}]经申诉更正",
                "Corrected after an appeal[ on {date}]",
            ),
            p("您的申诉已更正", "Corrected after your appeal"),
        ),
        ReasonCode::OtherProvinceDecision => (
            p(
                "[{date}]由外省防疫部门判定[（{province}）][：{directive}]",
                "Decided by another province[ ({province})][ on {date}][: {directive}]",
            ),
            p("外省的判定", "Decided by another province"),
        ),
        ReasonCode::Unspecified => (p("其他原因", "Other reason"), p("其他原因", "Other reason")),
    }
}

const GREEN_STEPS: &[Phrase] = &[p("需要时出示此码", "Show this code when asked")];
const YELLOW_STEPS: &[Phrase] = &[
    p(
        "3天内完成{tests}次核酸检测",
        "Take {tests} nucleic-acid test{s} within 3 days",
    ),
    p(
        "转为绿码前请勿进入公共场所",
        "Avoid public places until the code turns green",
    ),
    p(
        "可在应用内自助申诉",
        "Self-service appeal available in the app",
    ),
];
const RED_STEPS: &[Phrase] = &[
    p("请勿出行", "Do not travel"),
    p(
        "服从当地疾控部门的隔离安排",
        "Follow the quarantine arrangements of the local disease-control office",
    ),
    p(
        "如有异议，请拨打12345热线申诉",
        "Appeals via the 12345 hotline",
    ),
];
const UNKNOWN_STEPS: &[Phrase] = &[
    p(
        "暂时无法确认健康码状态，请稍后刷新",
        "The code status could not be confirmed; refresh later",
    ),
    p(
        "状态确认前不能作为通行凭证",
        "Not valid for entry until the status is confirmed",
    ),
];

const GREEN_CARE_STEPS: &[Phrase] = &[p("需要时出示此码", "Show this code when asked")];
const YELLOW_CARE_STEPS: &[Phrase] = &[
    p("3天内做{tests}次核酸", "Get {tests} test{s} in 3 days"),
    p("先不要去公共场所", "Stay away from public places"),
    p("可以在应用里申诉", "You can appeal in the app"),
];
const RED_CARE_STEPS: &[Phrase] = &[
    p("不要出行", "Do not travel"),
    p("听从当地疾控人员安排", "Do what local health staff say"),
    p("有疑问请打12345", "Questions? Call 12345"),
];
const UNKNOWN_CARE_STEPS: &[Phrase] = &[
    p("请稍后再试", "Please try again later"),
    p("现在不能用来通行", "Not valid for entry now"),
];

const PENDING_STEP: Phrase = p(
    "健康码颜色变更正在等待确认，以确认结果为准",
    "A color change is awaiting confirmation",
);
const PENDING_CARE_STEP: Phrase = p("您的码可能会变，正在确认", "Your code may change soon");

/// Ordered steps for a color, full or care mode.
fn steps(color: CodeColor, care_mode: bool) -> &'static [Phrase] {
    match (color, care_mode) {
        (CodeColor::Green, false) => GREEN_STEPS,
        (CodeColor::Yellow, false) => YELLOW_STEPS,
        (CodeColor::Red, false) => RED_STEPS,
        (CodeColor::Unspecified, false) => UNKNOWN_STEPS,
        (CodeColor::Green, true) => GREEN_CARE_STEPS,
        (CodeColor::Yellow, true) => YELLOW_CARE_STEPS,
        (CodeColor::Red, true) => RED_CARE_STEPS,
        (CodeColor::Unspecified, true) => UNKNOWN_CARE_STEPS,
    }
}

/// Provincial-level divisions by the first two digits of their GB/T 2260 code.
fn province_name(code: &str) -> Option<Phrase> {
    let prefix = code.get(..2)?;
    Some(match prefix {
        "11" => p("北京", "Beijing"),
        "12" => p("天津", "Tianjin"),
        "13" => p("河北", "Hebei"),
        "14" => p("山西", "Shanxi"),
        "15" => p("内蒙古", "Inner Mongolia"),
        "21" => p("辽宁", "Liaoning"),
        "22" => p("吉林", "Jilin"),
        "23" => p("黑龙江", "Heilongjiang"),
        "31" => p("上海", "Shanghai"),
        "32" => p("江苏", "Jiangsu"),
        "33" => p("浙江", "Zhejiang"),
        "34" => p("安徽", "Anhui"),
        "35" => p("福建", "Fujian"),
        "36" => p("江西", "Jiangxi"),
        "37" => p("山东", "Shandong"),
        "41" => p("河南", "Henan"),
        "42" => p("湖北", "Hubei"),
        "43" => p("湖南", "Hunan"),
        "44" => p("广东", "Guangdong"),
        "45" => p("广西", "Guangxi"),
        "46" => p("海南", "Hainan"),
        "50" => p("重庆", "Chongqing"),
        "51" => p("四川", "Sichuan"),
        "52" => p("贵州", "Guizhou"),
        "53" => p("云南", "Yunnan"),
        "54" => p("西藏", "Xizang"),
        "61" => p("陕西", "Shaanxi"),
        "62" => p("甘肃", "Gansu"),
        "63" => p("青海", "Qinghai"),
        "64" => p("宁夏", "Ningxia"),
        "65" => p("新疆", "Xinjiang"),
        "71" => p("台湾", "Taiwan"),
        "81" => p("香港", "Hong Kong"),
        "82" => p("澳门", "Macao"),
        _ => return None,
    })
}

/// A `directive_kind` value (the risk service's `DirectiveKind`, by name with or without its
/// prefix, or by number). Only these labels are inserted, never the raw value.
fn directive_label(value: &str) -> Option<Phrase> {
    let upper = value.trim().to_ascii_uppercase();
    let kind = upper.strip_prefix("DIRECTIVE_KIND_").unwrap_or(&upper);
    match kind {
        "CENTRALISED_QUARANTINE" | "CENTRALIZED_QUARANTINE" | "1" => {
            Some(p("集中隔离", "centralised quarantine"))
        }
        "HOME_QUARANTINE" | "2" => Some(p("居家隔离", "home quarantine")),
        "HOME_MONITORING" | "3" => Some(p("居家健康监测", "home health monitoring")),
        _ => None,
    }
}

const MONTHS_EN: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// "5月1日" / "1 May", in China Standard Time.
fn format_date(ts: &Timestamp, lang: Lang) -> Option<String> {
    let offset = FixedOffset::east_opt(CST_OFFSET_SECS)?;
    let local = DateTime::<Utc>::from_timestamp(ts.seconds, 0)?.with_timezone(&offset);
    Some(match lang {
        Lang::ZhCn => format!("{}月{}日", local.month(), local.day()),
        Lang::En => {
            let month = MONTHS_EN.get(usize::try_from(local.month0()).ok()?)?;
            format!("{} {month}", local.day())
        }
    })
}

// ---------------------------------------------------------------------------------------
// Parameters and templates

/// A documented parameter, cleaned: control characters removed, trimmed, at most
/// [`MAX_PARAM_CHARS`] characters; `None` when absent or blank.
fn param(reason: &ColorReason, key: &str) -> Option<String> {
    let raw = reason.params.get(key)?;
    let cleaned: String = raw.chars().filter(|c| !c.is_control()).collect();
    let capped: String = cleaned.trim().chars().take(MAX_PARAM_CHARS).collect();
    let capped = capped.trim_end();
    (!capped.is_empty()).then(|| capped.to_string())
}

/// `negative_tests_remaining` as a sane count (1 to 99).
fn tests_remaining(reason: &ColorReason) -> Option<u32> {
    reason
        .params
        .get(PARAM_TESTS_REMAINING)?
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_TESTS_REMAINING).contains(n))
}

/// Values for a template's slots.
#[derive(Debug, Default)]
struct Slots {
    date: Option<String>,
    area: Option<String>,
    province: Option<String>,
    directive: Option<&'static str>,
    tests: Option<u32>,
}

impl Slots {
    fn from_reason(reason: &ColorReason, lang: Lang) -> Slots {
        Slots {
            date: reason
                .occurred_at
                .as_ref()
                .and_then(|ts| format_date(ts, lang)),
            area: param(reason, PARAM_AREA_NAME),
            province: param(reason, PARAM_PROVINCE_CODE).map(|code| match province_name(&code) {
                Some(name) => name.get(lang).to_string(),
                None => code,
            }),
            directive: param(reason, PARAM_DIRECTIVE_KIND)
                .and_then(|kind| directive_label(&kind))
                .map(|label| label.get(lang)),
            tests: tests_remaining(reason),
        }
    }

    fn get(&self, name: &str) -> Option<String> {
        match name {
            "date" => self.date.clone(),
            "area" => self.area.clone(),
            "province" => self.province.clone(),
            "directive" => self.directive.map(str::to_string),
            "tests" => self.tests.map(|n| n.to_string()),
            "s" => self
                .tests
                .map(|n| (if n == 1 { "" } else { "s" }).to_string()),
            _ => None,
        }
    }
}

/// Fills a template: `{slot}` takes its value; a `[...]` segment is kept only when all of its
/// slots have one. Values are inserted as text and never re-read as template syntax.
fn fill(template: &str, slots: &Slots) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    // The open `[...]` segment: its text so far, and whether every slot in it was filled.
    let mut segment: Option<(String, bool)> = None;
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        match c {
            '[' => segment = Some((String::new(), true)),
            ']' => {
                if let Some((text, true)) = segment.take() {
                    out.push_str(&text);
                }
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|&n| n != '}').collect();
                match (&mut segment, slots.get(&name)) {
                    (Some((text, _)), Some(value)) => text.push_str(&value),
                    (Some((_, complete)), None) => *complete = false,
                    (None, Some(value)) => out.push_str(&value),
                    (None, None) => {}
                }
            }
            _ => match &mut segment {
                Some((text, _)) => text.push(c),
                None => out.push(c),
            },
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Rendering

/// One reason as a sentence in `lang`; the shorter plain-words variant in care mode.
/// An unknown reason code reads as "other reason".
pub fn reason_text(reason: &ColorReason, lang: Lang, care_mode: bool) -> String {
    let code = ReasonCode::try_from(reason.code).unwrap_or(ReasonCode::Unspecified);
    let (full, care) = reason_templates(code);
    let template = if care_mode { care } else { full };
    fill(template.get(lang), &Slots::from_reason(reason, lang))
}

/// The display strings for a code. `reasons` as the risk service gave them (strictest
/// first); `change_pending` adds a line saying a change awaits confirmation.
pub fn render(
    color: CodeColor,
    reasons: &[ColorReason],
    change_pending: bool,
    lang: Lang,
    care_mode: bool,
) -> CodeDisplay {
    let step_slots = Slots {
        tests: Some(
            reasons
                .iter()
                .find_map(tests_remaining)
                .unwrap_or(DEFAULT_YELLOW_TESTS),
        ),
        ..Slots::default()
    };
    let mut instructions: Vec<String> = steps(color, care_mode)
        .iter()
        .map(|step| fill(step.get(lang), &step_slots))
        .collect();
    if care_mode {
        let room = MAX_CARE_STEPS - usize::from(change_pending);
        instructions.truncate(room);
    }
    let voice_text = if care_mode {
        voice(color, lang, instructions.first().map(String::as_str))
    } else {
        String::new()
    };
    if change_pending {
        let pending = if care_mode {
            PENDING_CARE_STEP
        } else {
            PENDING_STEP
        };
        instructions.push(pending.get(lang).to_string());
    }

    CodeDisplay {
        locale: Some(Locale {
            tag: lang.tag().to_string(),
        }),
        color_name: color_name(color, lang).to_string(),
        reasons: reasons
            .iter()
            .map(|reason| DisplayReason {
                code: reason.code,
                text: reason_text(reason, lang, care_mode),
                holds_until: reason.holds_until.as_ref().map(|ts| Timestamp {
                    seconds: ts.seconds,
                    nanos: ts.nanos,
                }),
            })
            .collect(),
        instructions,
        care_mode,
        voice_text,
    }
}

/// "您的健康码是绿码。需要时出示此码。" / "Your health code is green. Show this code when asked."
fn voice(color: CodeColor, lang: Lang, first_step: Option<&str>) -> String {
    let mut text = voice_status(color).get(lang).to_string();
    if let Some(step) = first_step {
        let (gap, stop) = match lang {
            Lang::ZhCn => ("", "。"),
            Lang::En => (" ", "."),
        };
        text.push_str(gap);
        text.push_str(step);
        if !step.ends_with(['。', '！', '？', '.', '!', '?']) {
            text.push_str(stop);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const LANGS: [Lang; 2] = [Lang::ZhCn, Lang::En];
    const COLORS: [CodeColor; 4] = [
        CodeColor::Unspecified,
        CodeColor::Green,
        CodeColor::Yellow,
        CodeColor::Red,
    ];
    /// 2022-05-01T00:00:00+08:00.
    const MAY_1_CST: i64 = 1_651_334_400;

    fn all_reason_codes() -> Vec<ReasonCode> {
        let codes: Vec<ReasonCode> = (0_i32..)
            .map_while(|v| ReasonCode::try_from(v).ok())
            .collect();
        assert!(
            codes.len() >= 16,
            "expected the 15 reason codes and unspecified"
        );
        codes
    }

    fn reason(code: ReasonCode) -> ColorReason {
        ColorReason {
            code: code as i32,
            ..Default::default()
        }
    }

    fn full_reason(code: ReasonCode) -> ColorReason {
        let mut r = reason(code);
        r.occurred_at = Some(Timestamp {
            seconds: MAY_1_CST,
            nanos: 0,
        });
        r.holds_until = Some(Timestamp {
            seconds: MAY_1_CST + 14 * 86_400,
            nanos: 0,
        });
        for (k, v) in [
            ("area_name", "朝阳区望京街道"),
            ("province_code", "440000"),
            ("negative_tests_remaining", "2"),
            ("directive_kind", "DIRECTIVE_KIND_HOME_QUARANTINE"),
        ] {
            r.params.insert(k.to_string(), v.to_string());
        }
        r
    }

    fn well_formed(text: &str) -> bool {
        !text.is_empty()
            && text.trim() == text
            && !text.contains(['{', '}', '[', ']'])
            && !text.contains("()")
            && !text.contains("（）")
    }

    #[test]
    fn every_reason_code_has_text_in_both_languages() {
        for code in all_reason_codes() {
            for r in [reason(code), full_reason(code)] {
                for care in [false, true] {
                    let zh = reason_text(&r, Lang::ZhCn, care);
                    let en = reason_text(&r, Lang::En, care);
                    assert!(well_formed(&zh), "{code:?} zh: {zh:?}");
                    assert!(well_formed(&en), "{code:?} en: {en:?}");
                    assert_ne!(zh, en, "{code:?}");
                }
            }
        }
    }

    #[test]
    fn dates_are_china_standard_time() {
        let r = full_reason(ReasonCode::MediumRiskAreaStay);
        let mut plain = r.clone();
        plain.params.clear();
        assert_eq!(reason_text(&plain, Lang::ZhCn, false), "5月1日到访中风险区");
        assert_eq!(
            reason_text(&plain, Lang::En, false),
            "Visited a medium-risk area on 1 May"
        );
        assert_eq!(
            reason_text(&r, Lang::En, false),
            "Visited a medium-risk area (朝阳区望京街道) on 1 May"
        );
    }

    #[test]
    fn language_tags() {
        for tag in ["en", "EN", "en-US", "en-gb", "en_GB", " en "] {
            assert_eq!(Lang::from_tag(tag), Lang::En, "{tag}");
        }
        for tag in [
            "",
            "zh",
            "zh-CN",
            "zh-Hant-TW",
            "fr",
            "de-DE",
            "english",
            "e",
        ] {
            assert_eq!(Lang::from_tag(tag), Lang::ZhCn, "{tag}");
        }
    }

    #[test]
    fn unknown_tag_falls_back_to_zh_cn() {
        let d = render(CodeColor::Green, &[], false, Lang::from_tag("fr"), false);
        assert_eq!(d.locale.map(|l| l.tag).as_deref(), Some("zh-CN"));
        assert_eq!(d.color_name, "绿码");
        let d = render(CodeColor::Green, &[], false, Lang::from_tag("en-AU"), false);
        assert_eq!(d.locale.map(|l| l.tag).as_deref(), Some("en"));
        assert_eq!(d.color_name, "Green code");
    }

    #[test]
    fn unspecified_never_says_green() {
        let reasons = [full_reason(ReasonCode::TestOverdue)];
        for lang in LANGS {
            assert_ne!(
                color_name(CodeColor::Unspecified, lang),
                color_name(CodeColor::Green, lang)
            );
            for care in [false, true] {
                for pending in [false, true] {
                    let d = render(CodeColor::Unspecified, &reasons, pending, lang, care);
                    let mut all = vec![d.color_name.clone(), d.voice_text.clone()];
                    all.extend(d.instructions.iter().cloned());
                    all.extend(d.reasons.iter().map(|r| r.text.clone()));
                    for text in all {
                        let lower = text.to_lowercase();
                        assert!(!lower.contains("green") && !text.contains('绿'), "{text}");
                    }
                }
            }
        }
    }

    #[test]
    fn care_mode_is_short_with_voice_text() {
        for color in COLORS {
            for lang in LANGS {
                for pending in [false, true] {
                    let d = render(color, &[], pending, lang, true);
                    assert!(d.care_mode);
                    assert!(!d.instructions.is_empty());
                    assert!(d.instructions.len() <= MAX_CARE_STEPS, "{color:?} {lang:?}");
                    assert!(!d.voice_text.is_empty());
                    assert!(d.voice_text.contains(&d.instructions[0]));
                    let plain = render(color, &[], pending, lang, false);
                    assert!(!plain.care_mode);
                    assert!(plain.voice_text.is_empty());
                }
            }
        }
        let d = render(CodeColor::Green, &[], false, Lang::ZhCn, true);
        assert_eq!(d.voice_text, "您的健康码是绿码。需要时出示此码。");
        let d = render(CodeColor::Green, &[], false, Lang::En, true);
        assert_eq!(
            d.voice_text,
            "Your health code is green. Show this code when asked."
        );
    }

    #[test]
    fn long_params_are_truncated() {
        let mut r = reason(ReasonCode::HighRiskAreaStay);
        r.params.insert("area_name".into(), "x".repeat(100));
        let text = reason_text(&r, Lang::En, false);
        assert!(text.contains(&"x".repeat(MAX_PARAM_CHARS)));
        assert!(!text.contains(&"x".repeat(MAX_PARAM_CHARS + 1)));

        let mut r = reason(ReasonCode::OtherProvinceDecision);
        r.params.insert("province_code".into(), "9".repeat(100));
        let text = reason_text(&r, Lang::ZhCn, false);
        assert!(text.contains(&"9".repeat(MAX_PARAM_CHARS)));
        assert!(!text.contains(&"9".repeat(MAX_PARAM_CHARS + 1)));

        // Characters, not bytes.
        let mut r = reason(ReasonCode::MediumRiskAreaStay);
        r.params.insert("area_name".into(), "区".repeat(100));
        let text = reason_text(&r, Lang::En, false);
        assert!(text.contains(&"区".repeat(MAX_PARAM_CHARS)));
        assert!(!text.contains(&"区".repeat(MAX_PARAM_CHARS + 1)));
    }

    #[test]
    fn missing_params_still_produce_text() {
        for code in all_reason_codes() {
            let mut blank = reason(code);
            for key in ["area_name", "province_code", "directive_kind"] {
                blank.params.insert(key.to_string(), " \n ".to_string());
            }
            blank
                .params
                .insert("negative_tests_remaining".into(), "many".into());
            for r in [reason(code), blank] {
                for lang in LANGS {
                    for care in [false, true] {
                        let text = reason_text(&r, lang, care);
                        assert!(well_formed(&text), "{code:?} {lang:?}: {text:?}");
                    }
                }
            }
        }
        let text = reason_text(&reason(ReasonCode::OtherProvinceDecision), Lang::En, false);
        assert_eq!(text, "Decided by another province");
    }

    #[test]
    fn only_documented_params_are_inserted() {
        let mut r = reason(ReasonCode::OtherProvinceDecision);
        r.params.insert("name".into(), "张三".into());
        r.params.insert("phone".into(), "13800138000".into());
        r.params.insert("directive_kind".into(), "<script>".into());
        r.params.insert("province_code".into(), "110000".into());
        for lang in LANGS {
            let text = reason_text(&r, lang, false);
            assert!(
                !text.contains("张三") && !text.contains("13800138000"),
                "{text}"
            );
            assert!(!text.contains("<script>"), "{text}");
        }
        assert_eq!(
            reason_text(&r, Lang::En, false),
            "Decided by another province (Beijing)"
        );
        r.params
            .insert("directive_kind".into(), "home_monitoring".into());
        assert_eq!(
            reason_text(&r, Lang::ZhCn, false),
            "由外省防疫部门判定（北京）：居家健康监测"
        );
    }

    #[test]
    fn pending_change_adds_an_instruction() {
        for color in COLORS {
            for lang in LANGS {
                let without = render(color, &[], false, lang, false);
                let with = render(color, &[], true, lang, false);
                assert_eq!(with.instructions.len(), without.instructions.len() + 1);
                assert_eq!(
                    with.instructions.last().map(String::as_str),
                    Some(PENDING_STEP.get(lang))
                );
                let care = render(color, &[], true, lang, true);
                assert_eq!(
                    care.instructions.last().map(String::as_str),
                    Some(PENDING_CARE_STEP.get(lang))
                );
            }
        }
    }

    #[test]
    fn instructions_follow_the_color() {
        let d = render(CodeColor::Yellow, &[], false, Lang::En, false);
        assert_eq!(
            d.instructions,
            [
                "Take 2 nucleic-acid tests within 3 days",
                "Avoid public places until the code turns green",
                "Self-service appeal available in the app",
            ]
        );
        let mut r = reason(ReasonCode::TestOverdue);
        r.params
            .insert("negative_tests_remaining".into(), "1".into());
        let d = render(CodeColor::Yellow, &[r], false, Lang::En, false);
        assert_eq!(d.instructions[0], "Take 1 nucleic-acid test within 3 days");
        let d = render(CodeColor::Red, &[], false, Lang::En, false);
        assert_eq!(d.instructions[0], "Do not travel");
        assert_eq!(d.instructions[2], "Appeals via the 12345 hotline");
        let d = render(CodeColor::Green, &[], false, Lang::ZhCn, false);
        assert_eq!(d.instructions, ["需要时出示此码"]);
    }

    #[test]
    fn reasons_keep_code_and_holds_until() {
        let r = full_reason(ReasonCode::CloseContact);
        let d = render(
            CodeColor::Red,
            std::slice::from_ref(&r),
            false,
            Lang::ZhCn,
            false,
        );
        assert_eq!(d.reasons.len(), 1);
        assert_eq!(d.reasons[0].code, ReasonCode::CloseContact as i32);
        assert_eq!(d.reasons[0].holds_until, r.holds_until);
        assert_eq!(d.reasons[0].text, "5月1日与确诊病例密切接触");
        // An unknown code from a newer partner still reads as something.
        let mut unknown = reason(ReasonCode::Unspecified);
        unknown.code = 999;
        assert_eq!(reason_text(&unknown, Lang::En, false), "Other reason");
    }
}
