//! A strict parser for the Prometheus / OpenMetrics text exposition berthd serves at
//! `metrics_listen` `/metrics`, and a scrape helper. Every sample line must parse (name, label
//! set with escapes, value), `# TYPE` lines are kept per family, and the OpenMetrics `# EOF`
//! terminator must end the text.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context as _};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// `# TYPE <family> <type>`.
    pub types: HashMap<String, String>,
    /// The text as served, for assertion messages.
    pub text: String,
}

impl Exposition {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut exposition = Exposition {
            text: text.to_owned(),
            ..Exposition::default()
        };
        let mut saw_eof = false;
        for (number, line) in text.lines().enumerate() {
            let context = || format!("line {}: {line:?}", number + 1);
            if saw_eof {
                bail!("{}: text after # EOF", context());
            }
            if line == "# EOF" {
                saw_eof = true;
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (family, kind) = rest
                    .split_once(' ')
                    .with_context(|| format!("{}: TYPE without a type", context()))?;
                exposition.types.insert(family.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let sample = parse_sample(line).with_context(context)?;
            exposition.samples.push(sample);
        }
        if !saw_eof {
            bail!("the exposition does not end with # EOF");
        }
        Ok(exposition)
    }

    /// The value of the sample `name` whose label set is exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|sample| sample.name == name && sample.labels == wanted)
            .map(|sample| sample.value)
    }

    /// The lines of the text naming `prefix`, for reports.
    pub fn lines_starting(&self, prefix: &str) -> Vec<&str> {
        self.text
            .lines()
            .filter(|line| line.starts_with(prefix))
            .collect()
    }
}

/// `name{k="v",...} value [timestamp]` or `name value [timestamp]`.
fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let name_end = line.find(['{', ' ']).context("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || matches!(character, '_' | ':'))
        || name.starts_with(|character: char| character.is_ascii_digit())
    {
        bail!("bad metric name {name:?}");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, remainder) = parse_labels(after_brace)?;
        labels = parsed;
        rest = remainder;
    }
    let rest = rest
        .strip_prefix(' ')
        .context("no space before the value")?;
    let mut fields = rest.split(' ');
    let value_text = fields.next().context("no value")?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        other => other
            .parse::<f64>()
            .with_context(|| format!("bad value {other:?}"))?,
    };
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<f64>()
            .with_context(|| format!("bad timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        bail!("trailing fields");
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` (after the `{`); returns the labels and what follows the `}`.
fn parse_labels(text: &str) -> anyhow::Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let equals = rest.find('=').context("label without =")?;
        let key = &rest[..equals];
        if key.is_empty()
            || !key
                .chars()
                .all(|character| character.is_ascii_alphanumeric() || character == '_')
        {
            bail!("bad label name {key:?}");
        }
        rest = rest[equals + 1..]
            .strip_prefix('"')
            .context("label value not quoted")?;
        let mut value = String::new();
        let mut characters = rest.char_indices();
        let end = loop {
            let (index, character) = characters.next().context("unterminated label value")?;
            match character {
                '"' => break index,
                '\\' => match characters.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    other => bail!("bad escape {other:?}"),
                },
                other => value.push(other),
            }
        };
        if labels.insert(key.to_owned(), value).is_some() {
            bail!("label {key} twice");
        }
        rest = &rest[end + 1..];
        if let Some(after_comma) = rest.strip_prefix(',') {
            rest = after_comma;
        }
    }
}

/// `GET http://{addr}/metrics`: the Content-Type and the parsed body.
pub async fn scrape(addr: &str) -> anyhow::Result<(String, Exposition)> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .with_context(|| format!("scraping http://{addr}/metrics"))?;
    if !response.status().is_success() {
        bail!("/metrics answered {}", response.status());
    }
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.context("reading /metrics")?;
    Ok((content_type, Exposition::parse(&text)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_histograms_and_requires_eof() {
        let text = "# HELP berth_pulls Image pulls.\n# TYPE berth_pulls counter\n\
                    berth_pulls_total{result=\"ok\",registry=\"127.0.0.1:5000\"} 1\n\
                    odd{v=\"a\\\"b,c\\\\d\\ne\"} 2.5 1700000000\n\
                    h_bucket{le=\"+Inf\"} 3\nplain 4\n# EOF\n";
        let exposition = Exposition::parse(text).unwrap();
        assert_eq!(
            exposition.value(
                "berth_pulls_total",
                &[("result", "ok"), ("registry", "127.0.0.1:5000")]
            ),
            Some(1.0)
        );
        assert_eq!(exposition.value("odd", &[("v", "a\"b,c\\d\ne")]), Some(2.5));
        assert_eq!(exposition.value("h_bucket", &[("le", "+Inf")]), Some(3.0));
        assert_eq!(exposition.value("plain", &[]), Some(4.0));
        assert_eq!(
            exposition.value("berth_pulls_total", &[("result", "ok")]),
            None
        );
        assert_eq!(exposition.types["berth_pulls"], "counter");
        Exposition::parse("a 1\n").unwrap_err();
        Exposition::parse("a{b=c} 1\n# EOF\n").unwrap_err();
        Exposition::parse("a 1 2 3\n# EOF\n").unwrap_err();
    }
}
