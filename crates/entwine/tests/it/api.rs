//! The twins API's refusals, in-process over a real store.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use entwine_testing::TestStore;
use serde_json::Value;
use tower::ServiceExt;

async fn get(store: &TestStore, uri: &str) -> (StatusCode, Value) {
    let (feed, _) = tokio::sync::broadcast::channel(8);
    let app = entwine::api::router(
        store.store.clone(),
        feed,
        None,
        tokio_util::sync::CancellationToken::new(),
    );
    let response = app
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn unknown_twins_are_404_and_bad_parameters_400_naming_the_parameter() {
    let t = TestStore::sqlite().await;
    let (status, body) = get(&t, "/api/twins").await;
    assert_eq!((status, body), (StatusCode::OK, serde_json::json!([])));
    for uri in ["/api/twins/ghost", "/api/twins/ghost/history"] {
        let (status, body) = get(&t, uri).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(body["error"], "no twin \"ghost\"");
    }
    for (uri, parameter) in [
        ("/api/twins/ghost/history?limit=0", "limit"),
        ("/api/twins/ghost/history?limit=5000", "limit"),
        ("/api/twins/ghost/history?limit=ten", "limit"),
        ("/api/twins/ghost/history?since=-1", "since"),
        ("/api/twins/ghost/history?before=yesterday", "before"),
        ("/api/twins/ghost/history?page=2", "page"),
        ("/api/twins?sort=odte", "sort"),
        ("/api/stream?device=x", "device"),
    ] {
        let (status, body) = get(&t, uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{parameter}: ")),
            "{uri}: {body}"
        );
    }
    let (status, body) = get(&t, "/metrics").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "no recorder in this process: {body}"
    );
}

#[tokio::test]
async fn an_unavailable_store_is_a_503() {
    let t = TestStore::sqlite_empty();
    let (status, body) = get(&t, "/api/twins").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}
