//! A small W3C WebDriver client over reqwest, for the dashboard's browser test and bench:
//! chromedriver as a child process (killed when dropped) and the few commands they use.
//!
//! Written here rather than taken from fantoccini, whose `webdriver` dependency is MPL-2.0,
//! outside the licences deny.toml allows; the protocol's JSON commands are all this needs.
//! Shared by the test and the bench example, each using a part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find(name: &str, debian: &str) -> Option<PathBuf> {
    let debian = PathBuf::from(debian);
    if debian.is_file() {
        return Some(debian);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

fn missing(what: &str) -> String {
    format!(
        "{what} not found: install Debian's chromium and chromium-driver \
         (`apt-get install -y chromium chromium-driver`; scripts/test does)"
    )
}

/// chromedriver on a free loopback port, killed when dropped.
pub(crate) struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// Starts chromedriver and waits until it is ready; panics saying what to install when
    /// chromium or chromedriver is missing.
    pub(crate) async fn start() -> Self {
        let chromedriver = find("chromedriver", "/usr/bin/chromedriver")
            .unwrap_or_else(|| panic!("{}", missing("chromedriver")));
        let port = entwine_testing::free_port();
        let child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", chromedriver.display()));
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let status = format!("{}/status", driver.url);
        entwine_testing::eventually(Duration::from_secs(20), "chromedriver ready", || async {
            match reqwest::get(&status).await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            }
        })
        .await;
        driver
    }

    /// A headless chromium session of `width`×`height`.
    pub(crate) async fn browser(&self, width: u32, height: u32) -> Browser {
        let chromium = find("chromium", "/usr/bin/chromium")
            .unwrap_or_else(|| panic!("{}", missing("chromium")));
        let http = reqwest::Client::new();
        let answer = command(
            &http,
            reqwest::Method::POST,
            &format!("{}/session", self.url),
            json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", format!("--window-size={width},{height}")],
            }}}}),
        )
        .await
        .expect("a chromium session through chromedriver");
        let id = answer["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        Browser {
            http,
            session: format!("{}/session/{id}", self.url),
        }
    }
}

async fn command(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Value,
) -> Result<Value, String> {
    let request = http.request(method, url);
    let request = if body.is_null() {
        request
    } else {
        request.json(&body)
    };
    let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let answer: Value = response.json().await.map_err(|e| format!("{url}: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "{url}: {status} {} {}",
            answer["value"]["error"], answer["value"]["message"]
        ));
    }
    Ok(answer["value"].clone())
}

/// One browser session.
pub(crate) struct Browser {
    http: reqwest::Client,
    session: String,
}

/// An element of the page.
pub(crate) struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Browser {
    async fn post(&self, path: &str, body: Value) -> Value {
        command(
            &self.http,
            reqwest::Method::POST,
            &format!("{}{path}", self.session),
            body,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Navigates to `url`.
    pub(crate) async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    /// The value `script` (a function body) returns in the page.
    pub(crate) async fn js(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": []}))
            .await
    }

    /// The first element matching the CSS `selector`.
    pub(crate) async fn find(&self, selector: &str) -> Element<'_> {
        let answer = self
            .post(
                "/element",
                json!({"using": "css selector", "value": selector}),
            )
            .await;
        Element {
            browser: self,
            id: answer[ELEMENT]
                .as_str()
                .expect("an element reference")
                .to_string(),
        }
    }

    /// Ends the session (closes the browser).
    pub(crate) async fn close(self) {
        command(
            &self.http,
            reqwest::Method::DELETE,
            &self.session,
            Value::Null,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Element<'_> {
    /// Clicks it.
    pub(crate) async fn click(&self) {
        self.browser
            .post(&format!("/element/{}/click", self.id), json!({}))
            .await;
    }

    /// Types `text` into it.
    pub(crate) async fn send_keys(&self, text: &str) {
        self.browser
            .post(
                &format!("/element/{}/value", self.id),
                json!({ "text": text }),
            )
            .await;
    }

    /// Empties it (an input).
    pub(crate) async fn clear(&self) {
        self.browser
            .post(&format!("/element/{}/clear", self.id), json!({}))
            .await;
    }
}
