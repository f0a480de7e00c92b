//! The twins console: entwine's dashboard in the browser, built into the binary.
//!
//! [`router`] serves one page and its assets:
//!
//! - `GET /`: the page (`index.html`; hash routing: `#/` the fleet, `#/twins/<id>` a twin),
//!   `Cache-Control: no-cache` with an `ETag`;
//! - `GET /assets/<build>/<name>`: an asset under the hash of the whole build, as the page names
//!   them: `Cache-Control: public, max-age=31536000, immutable`;
//! - `GET /assets/<name>`: the same asset by its name alone, revalidated (`no-cache`, `ETag`).
//!
//! Each answers `304 Not Modified` to a matching `If-None-Match` and sends the gzipped bytes
//! (compressed once, at build time) to a client that accepts gzip. The assets hold no data, so
//! they need no token; the page asks for one when the API answers 401, keeps it in
//! `localStorage` and sends it (`Authorization: Bearer`, `?access_token=` for the stream).
//!
//! The front-end libraries (uPlot) are npm packages pinned with their integrity in
//! `package-lock.json`; the build script downloads, verifies and unpacks them (see `build.rs`
//! for `ENTWINE_WEB_TARBALLS`, the offline path).

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

/// One built-in asset.
#[derive(Debug)]
pub(crate) struct Asset {
    name: &'static str,
    content_type: &'static str,
    etag: &'static str,
    bytes: &'static [u8],
    gzip: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// `Cache-Control` of an asset named under the build hash: it never changes.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// `Cache-Control` of the page and of assets by their bare name: revalidate with the ETag.
const REVALIDATE: &str = "no-cache";

/// The hash of this build's assets, the first segment of the paths the page names them by
/// (`/assets/<build>/app.js`).
pub fn build() -> &'static str {
    BUILD
}

/// The names of the built-in assets (the page, its scripts and styles, the vendored libraries).
pub fn asset_names() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|a| a.name)
}

/// The dashboard: `GET /` and `GET /assets/…`, without authentication (see the crate's
/// documentation).
pub fn router() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{*path}", get(asset))
}

fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

async fn index(headers: HeaderMap) -> Response {
    match find("index.html") {
        Some(page) => serve(page, REVALIDATE, &headers),
        None => not_found("/"),
    }
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    let (asset, cache) = match path.split_once('/') {
        Some((build, name)) if build == BUILD => (find(name), IMMUTABLE),
        // An older build's name: the current bytes, revalidated, so a page still open across
        // an upgrade loads what exists (never cached as that build's for good).
        Some((_, name)) if !name.contains('/') => (find(name), REVALIDATE),
        Some(_) => (None, REVALIDATE),
        None => (find(&path), REVALIDATE),
    };
    match asset {
        // The page is served at `/` only.
        Some(asset) if asset.name != "index.html" => serve(asset, cache, &headers),
        _ => not_found(&format!("/assets/{path}")),
    }
}

fn not_found(path: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        error_body(&format!("no asset at {path}")),
    )
        .into_response()
}

/// `{"error": message}`, as every error of the platform's HTTP server.
fn error_body(message: &str) -> Json<std::collections::BTreeMap<&'static str, String>> {
    Json(std::collections::BTreeMap::from([(
        "error",
        message.to_string(),
    )]))
}

fn serve(asset: &'static Asset, cache: &'static str, request: &HeaderMap) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if matches_etag(request, asset.etag) {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Gzip only where it saves something (a tiny file can grow).
    if accepts_gzip(request) && asset.gzip.len() < asset.bytes.len() {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        return (headers, asset.gzip).into_response();
    }
    (headers, asset.bytes).into_response()
}

/// Whether `If-None-Match` names `etag` (or is `*`), weak or strong.
fn matches_etag(request: &HeaderMap, etag: &str) -> bool {
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
}

/// Whether `Accept-Encoding` accepts gzip (`gzip` or `*`, with a non-zero quality).
fn accepts_gzip(request: &HeaderMap) -> bool {
    request
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut request = Request::get(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = router()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, body.to_vec())
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[tokio::test]
    async fn the_page_names_every_script_and_style_under_the_build_hash() {
        let (status, headers, body) = get("/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
        let page = String::from_utf8(body).unwrap();
        assert!(!page.contains("{{build}}"), "placeholder left in the page");
        for name in ["app.js", "style.css", "uPlot.iife.min.js", "uPlot.min.css"] {
            let path = format!("/assets/{}/{name}", build());
            assert!(page.contains(&path), "the page names {path}");
            let (status, headers, body) = get(&path, &[]).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(headers[header::CACHE_CONTROL], IMMUTABLE, "{path}");
            assert!(!body.is_empty(), "{path}");
        }
    }

    #[tokio::test]
    async fn assets_have_their_content_type_and_a_bare_name_is_revalidated() {
        let (status, headers, body) = get("/assets/uPlot.iife.min.js", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
        // uPlot's IIFE build defines the global the page uses.
        assert!(String::from_utf8(body).unwrap().contains("uPlot"));
        let (_, headers, _) = get("/assets/style.css", &[]).await;
        assert_eq!(headers[header::CONTENT_TYPE], "text/css; charset=utf-8");
    }

    #[tokio::test]
    async fn a_matching_etag_answers_304_and_gzip_is_sent_when_accepted() {
        let (_, headers, plain) = get("/assets/app.js", &[]).await;
        let etag = headers[header::ETAG].to_str().unwrap().to_string();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
        let (status, _, body) = get("/assets/app.js", &[("if-none-match", &etag)]).await;
        assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));
        let weak = format!("W/{etag}");
        let (status, _, _) = get("/", &[("if-none-match", "\"other\"")]).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = get("/assets/app.js", &[("if-none-match", &weak)]).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);

        let (status, headers, gzipped) = get(
            "/assets/uPlot.iife.min.js",
            &[("accept-encoding", "br, gzip")],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_ENCODING], "gzip");
        let (_, _, js) = get("/assets/uPlot.iife.min.js", &[]).await;
        assert!(
            gzipped.len() < js.len() / 2,
            "{} of {}",
            gzipped.len(),
            js.len()
        );
        assert_eq!(gunzip(&gzipped), js);
        let (_, headers, body) = get("/assets/app.js", &[("accept-encoding", "gzip;q=0")]).await;
        assert!(!headers.contains_key(header::CONTENT_ENCODING));
        assert_eq!(body, plain);
    }

    #[tokio::test]
    async fn an_unknown_asset_is_a_json_404() {
        for path in [
            "/assets/nothing.js",
            "/assets/index.html",
            &format!("/assets/{}/a/b.js", build()),
        ] {
            let (status, headers, body) = get(path, &[]).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(headers[header::CONTENT_TYPE], "application/json");
            let text = String::from_utf8(body).unwrap();
            assert_eq!(text, format!("{{\"error\":\"no asset at {path}\"}}"));
        }
    }

    #[test]
    fn the_assets_are_the_pages_and_the_vendored_library() {
        let names: Vec<_> = asset_names().collect();
        for name in [
            "index.html",
            "app.js",
            "style.css",
            "uPlot.iife.min.js",
            "uPlot.min.css",
        ] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
        assert_eq!(build().len(), 12);
    }
}
