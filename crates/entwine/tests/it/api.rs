//! The twins API's refusals, in-process over a real store.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use entwine_testing::TestStore;
use serde_json::Value;
use tower::ServiceExt;

async fn get(store: &TestStore, uri: &str) -> (StatusCode, Value) {
    let (feed, _) = tokio::sync::broadcast::channel(8);
    let (lifecycle, _) = tokio::sync::broadcast::channel(8);
    let app = entwine_platform::api::router(
        store.store.clone(),
        std::sync::Arc::new(entwine_core::model::ModelSet::default()),
        feed,
        lifecycle,
        None,
        tokio_util::sync::CancellationToken::new(),
        Default::default(),
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
    assert_eq!(
        (status, body),
        (
            StatusCode::OK,
            serde_json::json!({"items": [], "total": 0, "offset": 0, "next": null})
        )
    );
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
        ("/api/twins?sort=temperature", "sort"),
        ("/api/twins?order=up", "order"),
        ("/api/twins?lifecycle=asleep", "lifecycle"),
        ("/api/twins?offset=-1", "offset"),
        ("/api/twins?after=x&sort=odte", "after"),
        ("/api/twins?after=x&order=desc", "after"),
        ("/api/twins?page=2", "page"),
        ("/api/fleet?all=1", "all"),
        ("/api/stream?events=digitalstate,alarms", "events"),
        ("/api/twins?limit=1001", "limit"),
        ("/api/twins?limit=0", "limit"),
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

/// `n` twins `dev-0001` … straight into the twin table, entangled.
async fn twins(store: &entwine_store::Store, n: usize) {
    entwine_testing::execute(
        store,
        &format!(
            "INSERT INTO twin (device_id, lifecycle, since, evaluated_at, availability,
                               reliability, timeliness, odte)
             SELECT 'dev-' || lpad(i::text, 4, '0'), 'entangled', 0, 0, 1, 1, 1, 1
             FROM generate_series(1, {n}) AS i"
        ),
    )
    .await;
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["device_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn twins_come_in_pages_of_100_by_default_each_naming_the_next() {
    let t = TestStore::postgres().await;
    twins(&t.store, 1001).await;
    let (status, first) = get(&t, "/api/twins").await;
    assert_eq!(status, StatusCode::OK);
    let first_ids = ids(&first);
    assert_eq!(first_ids.len(), 100);
    assert_eq!(
        (first_ids[0].as_str(), first_ids[99].as_str()),
        ("dev-0001", "dev-0100")
    );
    assert_eq!(first["next"], "/api/twins?after=dev-0100&limit=100");
    // The longest page is 1000: the 901 twins after the first page, and no next page.
    let (_, rest) = get(&t, "/api/twins?after=dev-0100&limit=1000").await;
    let rest_ids = ids(&rest);
    assert_eq!(rest_ids.len(), 901);
    assert_eq!(
        (rest_ids[0].as_str(), rest_ids[900].as_str()),
        ("dev-0101", "dev-1001")
    );
    assert_eq!(rest["next"], Value::Null);
    // Following `next` with a small limit visits every twin once.
    let (mut seen, mut uri) = (Vec::new(), Some("/api/twins?limit=400".to_owned()));
    let mut pages = 0;
    while let Some(next) = uri {
        let (_, page) = get(&t, &next).await;
        seen.extend(ids(&page));
        uri = page["next"].as_str().map(str::to_owned);
        pages += 1;
        assert!(pages <= 3, "1001 twins are three pages of 400");
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (1..=1001).map(|i| format!("dev-{i:04}")).collect();
    assert_eq!(seen, expected);
    let (_, past_the_end) = get(&t, "/api/twins?after=dev-1001").await;
    assert_eq!(
        past_the_end,
        serde_json::json!({"items": [], "total": 1001, "offset": 1001, "next": null})
    );
}

#[tokio::test]
async fn a_twin_id_with_a_nul_or_not_utf8_is_a_400_in_json_not_a_500() {
    let t = TestStore::postgres().await;
    twins(&t.store, 1).await;
    for uri in ["/api/twins/%00", "/api/twins/dev%00/history"] {
        let (status, body) = get(&t, uri).await;
        assert_eq!(
            (status, body),
            (
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "id: contains a NUL character"})
            ),
            "{uri}"
        );
    }
    for uri in ["/api/twins/%FF", "/api/twins/%C3%28/history"] {
        let (status, body) = get(&t, uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("id: Invalid URL"),
            "{uri}: {body}"
        );
    }
    let (status, body) = get(&t, "/api/twins/dev-0001").await;
    assert_eq!(
        (status, &body["lifecycle"]),
        (StatusCode::OK, &serde_json::json!("entangled"))
    );
}

#[tokio::test]
async fn status_follows_the_pages_of_a_running_platform() {
    let t = TestStore::postgres().await;
    twins(&t.store, 1001).await;
    let (feed, _) = tokio::sync::broadcast::channel(8);
    let (lifecycle, _) = tokio::sync::broadcast::channel(8);
    let app = entwine_platform::api::router(
        t.store.clone(),
        std::sync::Arc::new(entwine_core::model::ModelSet::default()),
        feed,
        lifecycle,
        None,
        tokio_util::sync::CancellationToken::new(),
        Default::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let server = tokio::spawn(entwine_http::serve(
        listener,
        app,
        entwine_http::Limits::default(),
        async move { token.cancelled().await },
    ));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_entwine"))
        .args(["status", "--url", &format!("http://{address}")])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 1 + 1001, "a header and every twin once");
    assert!(lines[0].starts_with("DEVICE "), "{}", lines[0]);
    assert!(lines[1].starts_with("dev-0001 "), "{}", lines[1]);
    assert!(lines[1001].starts_with("dev-1001 "), "{}", lines[1001]);
    stop.cancel();
    server.await.unwrap().unwrap();
}

/// Twelve twins `dev-01` … `dev-12`: twin `i` is unbound, bound, entangled or disentangled as
/// `i % 4` is 0, 1, 2 or 3, with ODTE `i / 20` and `since` `1000 · (13 − i)`.
async fn mixed_twins(store: &entwine_store::Store) {
    entwine_testing::execute(
        store,
        "INSERT INTO twin (device_id, lifecycle, since, evaluated_at, availability,
                           reliability, timeliness, odte)
         SELECT 'dev-' || lpad(i::text, 2, '0'),
                (ARRAY['unbound', 'bound', 'entangled', 'disentangled'])[i % 4 + 1],
                1000 * (13 - i), 0, 1, i / 20.0, 1, i / 20.0
         FROM generate_series(1, 12) AS i",
    )
    .await;
}

#[tokio::test]
async fn twins_are_filtered_sorted_and_paged_by_offset_and_the_fleet_summarized() {
    let t = TestStore::postgres().await;
    mixed_twins(&t.store).await;
    // Entangled: dev-02 (0.10), dev-06 (0.30), dev-10 (0.50); by ODTE, highest first.
    let (status, page) = get(
        &t,
        "/api/twins?lifecycle=entangled&sort=odte&order=desc&limit=2",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(ids(&page), ["dev-10", "dev-06"]);
    assert_eq!((&page["total"], &page["offset"]), (&3.into(), &0.into()));
    assert_eq!(
        page["next"],
        "/api/twins?lifecycle=entangled&sort=odte&order=desc&offset=2&limit=2"
    );
    let (_, last) = get(&t, page["next"].as_str().unwrap()).await;
    assert_eq!(ids(&last), ["dev-02"]);
    assert_eq!((&last["offset"], &last["next"]), (&2.into(), &Value::Null));
    // A part of the id, in any case: dev-10, dev-11, dev-12; sorted by `since` (ascending:
    // dev-12 entered its lifecycle first).
    let (_, found) = get(&t, "/api/twins?q=DEV-1&sort=since").await;
    assert_eq!(ids(&found), ["dev-12", "dev-11", "dev-10"]);
    // Every twin is the seed's here; no twin is of a model called "meter".
    let (_, seed) = get(&t, "/api/twins?model=seed&limit=1").await;
    assert_eq!(
        (ids(&seed), &seed["total"]),
        (vec!["dev-01".to_owned()], &12.into())
    );
    assert_eq!(seed["next"], "/api/twins?model=seed&after=dev-01&limit=1");
    let (_, none) = get(&t, "/api/twins?model=meter").await;
    assert_eq!((&none["total"], ids(&none).len()), (&0.into(), 0));

    let (status, fleet) = get(&t, "/api/fleet").await;
    assert_eq!(status, StatusCode::OK, "{fleet}");
    // ODTE 0.05 … 0.60 by 0.05: [0, 0.1) holds 0.05; [0.1, 0.2) 0.10 and 0.15; … [0.6, 0.7)
    // 0.60.
    assert_eq!(
        fleet,
        serde_json::json!({
            "twins": 12,
            "lifecycle": {"unbound": 3, "bound": 3, "entangled": 3, "disentangled": 3},
            "odte": {"bucket_width": 0.1, "counts": [1, 2, 2, 2, 2, 2, 1, 0, 0, 0]},
            "models": {"seed": 12},
            "dead_letters": {"messages": 0, "deliveries": 0},
        })
    );
}

#[tokio::test]
async fn the_stream_carries_lifecycle_changes_of_the_device_asked_for() {
    use entwine_core::twin::TwinLifecycle;
    let t = TestStore::sqlite().await;
    let (feed, _) = tokio::sync::broadcast::channel(8);
    let (lifecycle, _) = tokio::sync::broadcast::channel(8);
    let app = entwine_platform::api::router(
        t.store.clone(),
        std::sync::Arc::new(entwine_core::model::ModelSet::default()),
        feed,
        lifecycle.clone(),
        None,
        tokio_util::sync::CancellationToken::new(),
        Default::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let server = tokio::spawn(entwine_http::serve(
        listener,
        app,
        entwine_http::Limits::default(),
        async move { token.cancelled().await },
    ));
    // Answered once subscribed: nothing sent after this is missed.
    let stream = reqwest::get(format!(
        "http://{address}/api/stream?events=lifecycle&device_id=dev-2"
    ))
    .await
    .unwrap();
    assert_eq!(stream.status(), 200);
    let mut stream = entwine_testing::EventStream::new(stream);
    let change = |device: &str| entwine_store::TwinChange {
        device_id: device.into(),
        from: Some(TwinLifecycle::Entangled),
        to: TwinLifecycle::Unbound,
        at: 42_000,
        odte: 0.0,
        availability: 1.0,
        reliability: 0.0,
        timeliness: 0.0,
    };
    // Another device's change first: a stream that did not filter would show it first.
    lifecycle.send(change("dev-1")).unwrap();
    lifecycle.send(change("dev-2")).unwrap();
    // The first lifecycle event (the stream has no other kind here) is dev-2's.
    let data = stream
        .next("lifecycle", std::time::Duration::from_secs(10))
        .await;
    assert_eq!(
        data,
        serde_json::json!({"device_id": "dev-2", "from": "entangled", "to": "unbound",
                           "at": 42000, "odte": 0.0, "availability": 1.0,
                           "reliability": 0.0, "timeliness": 0.0})
    );
    drop(stream);
    stop.cancel();
    server.await.unwrap().unwrap();
}
