//! `entwine status`: the twins as a table, from a running platform's API or from the store.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use entwine_store::{Store, TwinStatus};

/// Flags of `entwine status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A running platform (`entwine up`).
    #[arg(
        long,
        default_value = "http://127.0.0.1:8080",
        conflicts_with = "database_url"
    )]
    pub url: String,
    /// Read the store directly instead (`sqlite://…`, `postgres://…`), with the pool of the
    /// typed configuration (`database.max_connections`, `database.acquire_timeout`).
    #[arg(long)]
    pub database_url: Option<String>,
    /// A configuration file, YAML or TOML [default: `ENTWINE_CONFIG`].
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Prints the table.
pub async fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let twins = match &args.database_url {
        Some(url) => {
            let loaded = crate::cli::load_config(None, entwine_config::Flags::default())?;
            let store = Store::open(url, &loaded.store_options()?)?;
            let twins = store
                .twins()
                .await
                .context("cannot read the twins from the store")?;
            store.close().await;
            twins
        }
        None => {
            let loaded = crate::cli::load_config(None, entwine_config::Flags::default())?;
            fetch(&args.url, loaded.client_token()?).await?
        }
    };
    print!("{}", table(&twins, now_ms()));
    Ok(())
}

/// The twins from the API at `base`, presenting `token` (`auth.token`) when given.
async fn fetch(
    base: &str,
    token: Option<secrecy::SecretString>,
) -> anyhow::Result<Vec<TwinStatus>> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        use secrecy::ExposeSecret as _;
        let mut value =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
                .context("auth.token holds a character a header cannot")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .default_headers(headers)
        .build()?;
    let twins = all_twins(&http, base)
        .await?
        .iter()
        .map(parse_twin)
        .collect::<Option<Vec<_>>>()
        .context("a twin in the answer lacks a field")?;
    Ok(twins)
}

/// Every twin of the platform at `base`, as JSON objects: `GET /api/twins` page after page,
/// following each page's `next` until the last.
pub async fn all_twins(
    http: &reqwest::Client,
    base: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let base = base.trim_end_matches('/');
    let mut url = format!("{base}/api/twins?limit={}", entwine_platform::api::MAX_PAGE);
    let mut twins = Vec::new();
    loop {
        let response = http.get(&url).send().await.with_context(|| {
            format!("cannot reach {url} (is `entwine up` running? --url names it)")
        })?;
        anyhow::ensure!(
            response.status() != reqwest::StatusCode::UNAUTHORIZED,
            "{url} answered 401: the API asks for a token; set auth.token (ENTWINE_AUTH__TOKEN) to one of its auth.tokens"
        );
        anyhow::ensure!(
            response.status().is_success(),
            "{url} answered {}",
            response.status()
        );
        let mut page: serde_json::Value = response
            .json()
            .await
            .with_context(|| format!("{url} did not answer JSON"))?;
        let items = page
            .get_mut("items")
            .and_then(|items| items.as_array_mut())
            .with_context(|| format!("{url}: expected a page of twins {{items, next}}"))?;
        twins.append(items);
        match page.get("next").and_then(serde_json::Value::as_str) {
            Some(next) => url = format!("{base}{next}"),
            None => return Ok(twins),
        }
    }
}

fn parse_twin(v: &serde_json::Value) -> Option<TwinStatus> {
    serde_json::from_value(v.clone()).ok()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The twins as an aligned text table; ages are relative to `now_ms`.
pub fn table(twins: &[TwinStatus], now_ms: i64) -> String {
    if twins.is_empty() {
        return "no twins yet: no device state has been evaluated\n".into();
    }
    let width = twins
        .iter()
        .map(|t| t.device_id.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut out = format!(
        "{:<width$}  {:<12}  {:>5}  {:>5}  {:>5}  {:>5}  {:>10}  {:>9}\n",
        "DEVICE", "LIFECYCLE", "ODTE", "A", "R", "T", "LAST SEEN", "MIRRORED"
    );
    for t in twins {
        out.push_str(&format!(
            "{:<width$}  {:<12}  {:>5.2}  {:>5.2}  {:>5.2}  {:>5.2}  {:>10}  {:>9}\n",
            t.device_id,
            t.lifecycle.as_str(),
            t.odte,
            t.availability,
            t.reliability,
            t.timeliness,
            t.last_physical_timestamp
                .map_or_else(|| "never".into(), |seen| age(now_ms - seen)),
            match (t.last_digital_timestamp, t.last_physical_timestamp) {
                (Some(digital), Some(physical)) => format!("+{} ms", digital - physical),
                _ => "–".into(),
            },
        ));
    }
    out
}

fn age(ms: i64) -> String {
    match ms {
        ..=999 => "just now".into(),
        1000..=59_999 => format!("{} s ago", ms / 1000),
        60_000..=3_599_999 => format!("{} min ago", ms / 60_000),
        _ => format!("{} h ago", ms / 3_600_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use entwine_core::twin::TwinLifecycle;

    #[test]
    fn the_table_shows_each_twin_with_its_figures_and_ages() {
        let twin = TwinStatus {
            model: None,
            device_id: "iiot-device-1".into(),
            lifecycle: TwinLifecycle::Entangled,
            since: 1_000_000,
            odte: 1.0,
            availability: 1.0,
            reliability: 1.0,
            timeliness: 1.0,
            evaluated_at: 1_000_004,
            last_physical_timestamp: Some(1_000_000),
            last_digital_timestamp: Some(1_000_004),
            digital_state_id: Some(9),
        };
        let json = serde_json::to_value(&twin).unwrap();
        assert_eq!(
            parse_twin(&json),
            Some(twin.clone()),
            "the API's JSON reads back"
        );
        let table = table(&[twin], 1_012_000);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("DEVICE"));
        assert!(lines[1].starts_with("iiot-device-1  entangled"), "{table}");
        assert!(
            lines[1].contains("12 s ago") && lines[1].contains("+4 ms"),
            "{table}"
        );
        assert_eq!(
            super::table(&[], 0),
            "no twins yet: no device state has been evaluated\n"
        );
    }
}
